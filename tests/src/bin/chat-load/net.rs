//! Client connections: tokens, source-address spreading, the WebSocket
//! upgrade, a reader task per connection, and request/reply helpers.
//!
//! Every connection asks for `?encoding=binary` so pushes arrive as
//! protobuf, uses a 4 KiB WebSocket read buffer (the default 128 KiB one
//! would dominate the load generator's memory at 19k connections), and binds
//! its socket to one of several 127.0.0.N source addresses so ephemeral
//! ports never run out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use proto::v1::{ClientFrame, ServerFrame, client_frame, server_frame};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::stats::{Recorder, now_nanos};

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    /// The nodes' listeners (loopback only); connection `i` goes to
    /// `addrs[i % addrs.len()]` (see [`crate::plan::node_of`]).
    pub addrs: Vec<SocketAddr>,
    /// The node's `[auth] jwt_secret`.
    pub secret: String,
    /// Source addresses, used round-robin by connection index.
    pub sources: Vec<Ipv4Addr>,
}

impl Target {
    /// Checks that every address is in 127.0.0.0/8 (at least one, at
    /// most 64 nodes) and builds the source list
    /// 127.0.0.2 ..= 127.0.0.(1 + sources).
    pub fn new(addrs: &[SocketAddr], secret: String, sources: usize) -> Result<Target> {
        if addrs.is_empty() || addrs.len() > 64 {
            bail!("1..=64 node addresses");
        }
        for addr in addrs {
            match addr.ip() {
                IpAddr::V4(ip) if ip.octets()[0] == 127 => {}
                other => bail!("refusing to load {other}: only 127.0.0.0/8 is allowed"),
            }
        }
        Ok(Target {
            addrs: addrs.to_vec(),
            secret,
            sources: source_addrs(sources),
        })
    }

    /// A table row's scenario name: `name` for one node, `5. cluster (n
    /// nodes): name` for several.
    pub fn scenario(&self, name: &str) -> String {
        match self.addrs.len() {
            1 => name.to_string(),
            n => format!("5. cluster ({n} nodes): {name}"),
        }
    }

    /// `""` for one node, `"; connections round-robin over n nodes"` for
    /// several (for the parameters column).
    pub fn spread(&self) -> String {
        match self.addrs.len() {
            1 => String::new(),
            n => format!("; connections round-robin over {n} nodes"),
        }
    }

    /// The first node (for `/metrics` of single-node scenarios).
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The node connection `index` goes to.
    pub fn addr_for(&self, index: usize) -> SocketAddr {
        self.addrs[crate::plan::node_of(index, self.addrs.len())]
    }
}

/// 127.0.0.2 ..= 127.0.0.(1 + n), at least one, at most 250.
pub fn source_addrs(n: usize) -> Vec<Ipv4Addr> {
    (0..n.clamp(1, 250))
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect()
}

/// Reads `[auth] jwt_secret` from a node config file.
pub fn secret_from_config(path: &std::path::Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    value
        .get("auth")
        .and_then(|a| a.get("jwt_secret"))
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: no [auth] jwt_secret", path.display()))
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// An HS256 token for `user`, valid for an hour.
pub fn mint(secret: &str, user: &str) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3_600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims { sub: user, exp },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

type WsStream = WebSocketStream<TcpStream>;

/// WebSocket settings of every load connection.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192)
        .max_write_buffer_size(1 << 20)
}

/// One authenticated connection: the write half and the replies (frames
/// with an id) the reader task forwarded. Pushes never come here: the
/// reader records load messages in the [`Recorder`] and drops the rest.
pub struct Conn {
    /// The user.
    pub user: String,
    /// Index of the connection (source address, recorder shard).
    pub index: usize,
    tx: SplitSink<WsStream, Ws>,
    /// Replies from the server, in arrival order.
    pub replies: mpsc::UnboundedReceiver<ServerFrame>,
    next_id: u64,
}

/// Opens connection `index` for `user`.
pub async fn connect(
    target: &Target,
    index: usize,
    user: &str,
    rec: Arc<Recorder>,
) -> Result<Conn> {
    let src = target.sources[index % target.sources.len()];
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(src), 0))
        .with_context(|| format!("binding {src}"))?;
    let addr = target.addr_for(index);
    let stream = socket.connect(addr).await.context("TCP connect")?;
    stream.set_nodelay(true)?;
    let token = mint(&target.secret, user)?;
    let url = format!("ws://{}/ws?encoding=binary&token={token}", addr);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .context("WebSocket upgrade")?;
    let (tx, rx) = ws.split();
    let (reply_tx, replies) = mpsc::unbounded_channel();
    tokio::spawn(read_loop(rx, reply_tx, rec, index));
    Ok(Conn {
        user: user.to_string(),
        index,
        tx,
        replies,
        next_id: 1,
    })
}

async fn read_loop(
    mut rx: SplitStream<WsStream>,
    replies: mpsc::UnboundedSender<ServerFrame>,
    rec: Arc<Recorder>,
    index: usize,
) {
    let how = loop {
        match rx.next().await {
            Some(Ok(Ws::Binary(b))) => {
                if let Err(e) = on_binary(b, &replies, &rec, index) {
                    rec.closed(e);
                }
            }
            Some(Ok(Ws::Close(c))) => {
                break c.map_or("close".to_string(), |c| u16::from(c.code).to_string());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("error: {e}"),
            None => break "eof".to_string(),
        }
    };
    // The load generator's own closes at the end are not interesting.
    if how != "1000" && how != "eof" {
        rec.closed(how);
    }
}

/// The parts of a [`ServerFrame`] a reader looks at first: the reply id,
/// and of a push only a `message`'s text (the latency tag) or an `error`'s
/// code. Same field numbers as the real message, so it decodes any server
/// frame: prost skips the fields it does not name, without allocating, and
/// the text is a slice of the frame's own buffer. A full decode per push
/// (group, sender and client ids, text, into fresh strings) was ~12% of the
/// load generator's CPU in fan-out runs (docs/benchmarks.md, round 14).
#[derive(Clone, PartialEq, prost::Message)]
struct Peek {
    /// `ServerFrame.id`: non-zero for a reply.
    #[prost(uint64, tag = "1")]
    id: u64,
    /// `ServerFrame.kind.error`.
    #[prost(message, optional, tag = "15")]
    error: Option<ErrorPeek>,
    /// `ServerFrame.kind.message`.
    #[prost(message, optional, tag = "20")]
    message: Option<TextPeek>,
}

/// `Error.code` (prost generates the `code()` getter, as for `Error`).
#[derive(Clone, PartialEq, prost::Message)]
struct ErrorPeek {
    #[prost(enumeration = "proto::v1::ErrorCode", tag = "1")]
    code: i32,
}

/// `Message.text`, as bytes (the wire type of `string` and `bytes` is the
/// same; UTF-8 is checked when it is read).
#[derive(Clone, PartialEq, prost::Message)]
struct TextPeek {
    #[prost(bytes = "bytes", tag = "4")]
    text: prost::bytes::Bytes,
}

/// Handles one binary frame: a reply is decoded whole and forwarded, a
/// load message push is recorded, an error push is counted as a close
/// reason (`Err`), other pushes are dropped.
fn on_binary(
    b: prost::bytes::Bytes,
    replies: &mpsc::UnboundedSender<ServerFrame>,
    rec: &Recorder,
    index: usize,
) -> Result<(), String> {
    let undecodable = || "undecodable frame".to_string();
    let peek = Peek::decode(b.clone()).map_err(|_| undecodable())?;
    if peek.id != 0 {
        let frame = ServerFrame::decode(b).map_err(|_| undecodable())?;
        let _ = replies.send(frame);
        return Ok(());
    }
    if let Some(m) = peek.message {
        let text = std::str::from_utf8(&m.text).map_err(|_| undecodable())?;
        rec.on_text(index, text, now_nanos());
    } else if let Some(e) = peek.error {
        return Err(format!("error push {:?}", e.code()));
    }
    Ok(())
}

impl Conn {
    /// Sends a request and flushes at once.
    pub async fn send_flush(&mut self, kind: client_frame::Kind) -> Result<u64> {
        let id = self.feed(kind).await?;
        self.flush().await?;
        Ok(id)
    }

    /// Queues a request in the write buffer.
    pub async fn feed(&mut self, kind: client_frame::Kind) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            id,
            kind: Some(kind),
        };
        self.tx
            .feed(Ws::Binary(frame.encode_to_vec().into()))
            .await?;
        Ok(id)
    }

    /// Writes out queued requests.
    pub async fn flush(&mut self) -> Result<()> {
        Ok(self.tx.flush().await?)
    }

    /// Sends a request and waits (up to `timeout`) for its reply; other
    /// replies that arrive meanwhile are dropped. An `error` reply is an
    /// `Err`.
    pub async fn request(
        &mut self,
        kind: client_frame::Kind,
        timeout: Duration,
    ) -> Result<server_frame::Kind> {
        let id = self.send_flush(kind).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.replies.recv())
                .await
                .map_err(|_| anyhow!("{}: no reply to request {id} in {timeout:?}", self.user))?
                .ok_or_else(|| anyhow!("{}: connection closed", self.user))?;
            if frame.id != id {
                continue;
            }
            return match frame.kind {
                Some(server_frame::Kind::Error(e)) => Err(anyhow!(
                    "{}: server error {:?}: {}",
                    self.user,
                    e.code(),
                    e.message
                )),
                Some(k) => Ok(k),
                None => Err(anyhow!("reply without a kind")),
            };
        }
    }

    /// Closes the connection politely (best effort).
    pub async fn close(mut self) {
        let _ = self.tx.send(Ws::Close(None)).await;
    }
}

/// Opens connections `range` for users `prefix<i>`, at most `parallel`
/// handshakes at once. Failures are counted, not fatal; returns the
/// connections in index order (missing failed ones) and the failures'
/// first error.
pub async fn connect_many(
    target: &Target,
    prefix: &str,
    range: std::ops::Range<usize>,
    parallel: usize,
    rec: Arc<Recorder>,
) -> (Vec<Conn>, usize, Option<String>) {
    let results: Vec<(usize, Result<Conn>)> = futures::stream::iter(range)
        .map(|i| {
            let rec = rec.clone();
            let user = crate::plan::user_id(prefix, i);
            async move {
                let r =
                    tokio::time::timeout(Duration::from_secs(30), connect(target, i, &user, rec))
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("connect timed out")));
                (i, r)
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut conns = Vec::with_capacity(results.len());
    let mut failed = 0;
    let mut first_err = None;
    for (_, r) in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => {
                failed += 1;
                first_err.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    conns.sort_by_key(|c| c.index);
    (conns, failed, first_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_records_pushes_and_forwards_whole_replies() {
        use crate::stats::tag;
        use proto::v1::{self, server_frame::Kind};
        let rec = Recorder::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bytes = |f: &ServerFrame| prost::bytes::Bytes::from(f.encode_to_vec());
        // A load message push, with every other field set: its tag is recorded.
        let sent = now_nanos().saturating_sub(2_000_000);
        let push = ServerFrame {
            id: 0,
            kind: Some(Kind::Message(v1::Message {
                group_id: "g1".into(),
                seq: 9,
                sender_id: "u1".into(),
                text: tag(2, sent, 64),
                sent_at_ms: 1,
                reply_to_seq: Some(3),
                mentions: vec!["u2".into()],
                client_msg_id: "c1".into(),
                ..Default::default()
            })),
        };
        assert_eq!(on_binary(bytes(&push), &tx, &rec, 0), Ok(()));
        assert_eq!(rec.count(2), 1);
        // Its latency is the ~2 ms since `sent`.
        assert!(crate::stats::Summary::of(&rec.merged(2)).p50_us >= 2_000);
        // A system message (no tag) is counted as foreign text.
        let mut system = push.clone();
        if let Some(Kind::Message(m)) = &mut system.kind {
            m.text.clear();
        }
        assert_eq!(on_binary(bytes(&system), &tx, &rec, 0), Ok(()));
        assert_eq!(rec.untagged.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A reply goes to the connection whole, equal to what was sent.
        let reply = ServerFrame {
            id: 7,
            kind: Some(Kind::Sent(v1::Sent {
                group_id: "g1".into(),
                client_msg_id: "c1".into(),
                seq: 9,
                sent_at_ms: 1,
            })),
        };
        assert_eq!(on_binary(bytes(&reply), &tx, &rec, 0), Ok(()));
        assert_eq!(rx.try_recv().ok(), Some(reply));
        // An error push is a close reason; other pushes are dropped.
        let error = ServerFrame {
            id: 0,
            kind: Some(Kind::Error(v1::Error {
                code: v1::ErrorCode::RateLimited as i32,
                message: "slow down".into(),
            })),
        };
        assert_eq!(
            on_binary(bytes(&error), &tx, &rec, 0),
            Err("error push RateLimited".to_string())
        );
        let typing = ServerFrame {
            id: 0,
            kind: Some(Kind::Typing(v1::TypingEvent {
                group_id: "g1".into(),
                user_id: "u2".into(),
            })),
        };
        assert_eq!(on_binary(bytes(&typing), &tx, &rec, 0), Ok(()));
        // Garbage and a text that is not UTF-8 are undecodable, not a panic.
        let garbage = prost::bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
        assert_eq!(
            on_binary(garbage, &tx, &rec, 0),
            Err("undecodable frame".to_string())
        );
        let bad_text = vec![0xa2, 0x01, 0x03, 0x22, 0x01, 0xff];
        assert_eq!(
            on_binary(prost::bytes::Bytes::from(bad_text), &tx, &rec, 0),
            Err("undecodable frame".to_string())
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(rec.count(2), 1);
    }

    #[test]
    fn only_loopback_targets() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert!(Target::new(&[a("127.0.0.1:8080")], "s".into(), 4).is_ok());
        assert!(Target::new(&[a("127.5.6.7:1")], "s".into(), 4).is_ok());
        assert!(Target::new(&[a("10.0.0.1:8080")], "s".into(), 4).is_err());
        assert!(Target::new(&[a("[::1]:8080")], "s".into(), 4).is_err());
        assert!(Target::new(&[], "s".into(), 4).is_err());
        // Every node of a cluster must be loopback.
        assert!(Target::new(&[a("127.0.0.1:1"), a("10.0.0.1:2")], "s".into(), 4).is_err());
        let t = Target::new(
            &[
                a("127.0.0.1:8081"),
                a("127.0.0.1:8082"),
                a("127.0.0.1:8083"),
            ],
            "s".into(),
            4,
        )
        .unwrap();
        assert_eq!(t.addr(), a("127.0.0.1:8081"));
        let picked: Vec<SocketAddr> = (0..5).map(|i| t.addr_for(i)).collect();
        assert_eq!(
            picked,
            vec![
                a("127.0.0.1:8081"),
                a("127.0.0.1:8082"),
                a("127.0.0.1:8083"),
                a("127.0.0.1:8081"),
                a("127.0.0.1:8082")
            ]
        );
    }

    #[test]
    fn source_addresses() {
        let s = source_addrs(3);
        assert_eq!(
            s,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        assert_eq!(source_addrs(0).len(), 1);
        assert_eq!(source_addrs(1000).len(), 250);
    }

    #[test]
    fn tokens_are_hs256_with_sub_and_exp() {
        let t = mint("0123456789abcdef-secret", "alice").unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let d = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef-secret"),
            &v,
        )
        .unwrap();
        assert_eq!(d.claims["sub"], "alice");
    }

    #[test]
    fn secret_is_read_from_the_node_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.toml");
        std::fs::write(
            &p,
            "[node]\nname = \"n\"\n[auth]\njwt_secret = \"abc-0123456789abcdef\"\n",
        )
        .unwrap();
        assert_eq!(secret_from_config(&p).unwrap(), "abc-0123456789abcdef");
        std::fs::write(&p, "[node]\nname = \"n\"\n").unwrap();
        assert!(secret_from_config(&p).is_err());
    }
}
