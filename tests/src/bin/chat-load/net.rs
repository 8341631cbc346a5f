//! Client connections: tokens, source-address spreading, the WebSocket
//! upgrade, a reader task per connection, and request/reply helpers.
//!
//! Every connection asks for `?encoding=binary` so pushes arrive as
//! protobuf, reads into a 4 KiB buffer (a 128 KiB one would dominate the
//! load generator's memory at 19k connections), and binds its socket to one
//! of several 127.0.0.N source addresses so ephemeral ports never run out.
//!
//! The WebSocket layer is thin on purpose: the upgrade request and its
//! check are written here, frames are parsed and built with tungstenite's
//! `FrameHeader` and `Frame` (RFC 6455 framing, client frames masked), and
//! the TCP stream is split into owned halves. Through tokio-tungstenite's
//! split stream a push cost the reader a lock, two waker proxies and a
//! zeroed 4 KiB read buffer twice (once for the frame, once to find the
//! socket empty): ~15% of the load generator's CPU in fan-out, on the same
//! two cores as the node it measures (docs/benchmarks.md, round 30).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use prost::Message as _;
use prost::bytes::{Buf, Bytes, BytesMut};
use proto::v1::{ClientFrame, ServerFrame, client_frame, server_frame};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

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

/// Bytes the reader asks the socket for at least, and the read buffer's
/// starting size.
const READ_CHUNK: usize = 4096;
/// Fed requests are written out once this many bytes wait.
const WRITE_BUFFER: usize = 8192;
/// Largest server frame accepted (tungstenite's default `max_frame_size`).
const MAX_FRAME: u64 = 16 << 20;
/// Largest upgrade response accepted.
const MAX_UPGRADE_RESPONSE: usize = 16 << 10;

/// The write half, shared by the connection's owner (requests, its close)
/// and its reader (pongs, the close reply).
type Writer = Arc<Mutex<WriteSide>>;

/// What a connection writes through.
///
/// Invariant: once `closed`, nothing more is written (RFC 6455 section
/// 5.5.1: no frame follows a close).
struct WriteSide {
    half: OwnedWriteHalf,
    closed: bool,
}

/// One authenticated connection: the write half and the replies (frames
/// with an id) the reader task forwarded. Pushes never come here: the
/// reader records load messages in the [`Recorder`] and drops the rest.
pub struct Conn {
    /// The user.
    pub user: String,
    /// Index of the connection (source address, recorder shard).
    pub index: usize,
    tx: Writer,
    /// Frames fed and not yet written, masked and framed.
    out: Vec<u8>,
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
    let mut stream = socket.connect(addr).await.context("TCP connect")?;
    stream.set_nodelay(true)?;
    let token = mint(&target.secret, user)?;
    let path = format!("/ws?encoding=binary&token={token}");
    let buf = upgrade(&mut stream, addr, &path)
        .await
        .context("WebSocket upgrade")?;
    let (rx, tx) = stream.into_split();
    let tx = Arc::new(Mutex::new(WriteSide {
        half: tx,
        closed: false,
    }));
    let (reply_tx, replies) = mpsc::unbounded_channel();
    tokio::spawn(read_loop(rx, buf, tx.clone(), reply_tx, rec, index));
    Ok(Conn {
        user: user.to_string(),
        index,
        tx,
        out: Vec::new(),
        replies,
        next_id: 1,
    })
}

/// The client side of the WebSocket upgrade (RFC 6455 section 4) of
/// `path` on `host`: returns what the server sent after its `101`
/// response (frames may follow it in the same read).
async fn upgrade(stream: &mut TcpStream, host: SocketAddr, path: &str) -> Result<BytesMut> {
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("the server closed the connection during the upgrade");
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = response.parse(&buf)? else {
            ensure!(
                buf.len() < MAX_UPGRADE_RESPONSE,
                "an upgrade response over {MAX_UPGRADE_RESPONSE} bytes"
            );
            continue;
        };
        let code = response.code.unwrap_or(0);
        if code != 101 {
            let body = String::from_utf8_lossy(&buf[head..]);
            bail!(
                "HTTP {code} {}: {}",
                response.reason.unwrap_or(""),
                body.trim()
            );
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        ensure!(
            header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")),
            "a 101 response without `Upgrade: websocket`"
        );
        ensure!(
            header("sec-websocket-accept") == Some(derive_accept_key(key.as_bytes()).as_bytes()),
            "a 101 response with a wrong Sec-WebSocket-Accept"
        );
        buf.advance(head);
        return Ok(buf);
    }
}

/// Takes the next whole frame off the front of `buf`: `Ok(None)` when it
/// is not all there yet (nothing is consumed then). A server's frames are
/// unmasked, whole (the node never fragments) and without extensions;
/// anything else is an error.
fn next_frame(buf: &mut BytesMut) -> Result<Option<(OpCode, Bytes)>, String> {
    let mut cursor = std::io::Cursor::new(&buf[..]);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("bad frame header: {e}")),
    };
    if header.mask.is_some() {
        return Err("a masked frame from the server".into());
    }
    if !header.is_final || header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(format!("a fragmented or extended {} frame", header.opcode));
    }
    if len > MAX_FRAME {
        return Err(format!("a frame of {len} bytes (at most {MAX_FRAME})"));
    }
    let start = cursor.position() as usize;
    let end = start + len as usize;
    if buf.len() < end {
        buf.reserve(end - buf.len());
        return Ok(None);
    }
    buf.advance(start);
    Ok(Some((header.opcode, buf.split_to(len as usize).freeze())))
}

/// Appends one masked client frame (RFC 6455 section 5.3) to `out`.
fn put_frame(out: &mut Vec<u8>, opcode: OpCode, payload: Vec<u8>) -> Result<()> {
    let header = FrameHeader {
        is_final: true,
        opcode,
        mask: Some(rand::random()),
        ..FrameHeader::default()
    };
    Frame::from_payload(header, payload.into()).format(out)?;
    Ok(())
}

/// Writes one control frame (a pong, a close) at once; nothing once a
/// close went out.
async fn send_control(tx: &Writer, control: Control, payload: Vec<u8>) -> Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    put_frame(&mut out, OpCode::Control(control), payload)?;
    let mut w = tx.lock().await;
    if w.closed {
        return Ok(());
    }
    w.closed = control == Control::Close;
    w.half.write_all(&out).await?;
    Ok(())
}

/// Reads frames until the connection ends: binary frames go to
/// [`on_binary`], pings are answered, a close is answered and ends the
/// loop (its code is the close reason).
async fn read_loop(
    mut rx: OwnedReadHalf,
    mut buf: BytesMut,
    tx: Writer,
    replies: mpsc::UnboundedSender<ServerFrame>,
    rec: Arc<Recorder>,
    index: usize,
) {
    let how = loop {
        match next_frame(&mut buf) {
            Ok(Some((OpCode::Data(Data::Binary), payload))) => {
                if let Err(e) = on_binary(payload, &replies, &rec, index) {
                    rec.closed(e);
                }
            }
            Ok(Some((OpCode::Control(Control::Ping), payload))) => {
                if let Err(e) = send_control(&tx, Control::Pong, payload.to_vec()).await {
                    break format!("error: {e}");
                }
            }
            Ok(Some((OpCode::Control(Control::Close), payload))) => {
                // Echo the code, as RFC 6455 section 5.5.1 asks (unless
                // this side's close went first).
                let code = payload.get(..2).map(|c| c.to_vec()).unwrap_or_default();
                let _ = send_control(&tx, Control::Close, code).await;
                break match payload.get(..2) {
                    Some(c) => u16::from_be_bytes([c[0], c[1]]).to_string(),
                    None => "close".to_string(),
                };
            }
            // Text frames (JSON mode) and pongs carry nothing to record.
            Ok(Some(_)) => {}
            Ok(None) => {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                match rx.read_buf(&mut buf).await {
                    Ok(0) => break "eof".to_string(),
                    Ok(_) => {}
                    Err(e) => break format!("error: {e}"),
                }
            }
            Err(e) => break format!("error: {e}"),
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

    /// Queues a request in the write buffer (written out once
    /// [`WRITE_BUFFER`] bytes wait).
    pub async fn feed(&mut self, kind: client_frame::Kind) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            id,
            kind: Some(kind),
        };
        put_frame(
            &mut self.out,
            OpCode::Data(Data::Binary),
            frame.encode_to_vec(),
        )?;
        if self.out.len() >= WRITE_BUFFER {
            self.flush().await?;
        }
        Ok(id)
    }

    /// Writes out queued requests.
    pub async fn flush(&mut self) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut w = self.tx.lock().await;
        ensure!(!w.closed, "{}: the connection is closed", self.user);
        w.half.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
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
        if self.flush().await.is_ok() {
            let _ = send_control(&self.tx, Control::Close, Vec::new()).await;
        }
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

    /// A server frame as tungstenite writes one (unmasked).
    fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(header, Bytes::copy_from_slice(payload))
            .format(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn next_frame_takes_whole_frames_and_waits_for_the_rest() {
        let bin = OpCode::Data(Data::Binary);
        let small = server_frame(bin, b"first");
        // 300 bytes: a 16-bit extended length.
        let big_payload = vec![7u8; 300];
        let big = server_frame(bin, &big_payload);
        let mut all = small.clone();
        all.extend_from_slice(&big);
        // Every prefix short of the first frame: nothing, nothing consumed.
        for k in 0..small.len() {
            let mut buf = BytesMut::from(&all[..k]);
            assert_eq!(next_frame(&mut buf), Ok(None), "prefix of {k} bytes");
            assert_eq!(&buf[..], &all[..k], "prefix of {k} bytes was consumed");
        }
        // Both frames in one buffer come out in order, then nothing.
        let mut buf = BytesMut::from(&all[..all.len() - 1]);
        assert_eq!(
            next_frame(&mut buf),
            Ok(Some((bin, Bytes::from_static(b"first"))))
        );
        assert_eq!(next_frame(&mut buf), Ok(None), "the second lacks a byte");
        buf.extend_from_slice(&all[all.len() - 1..]);
        assert_eq!(
            next_frame(&mut buf),
            Ok(Some((bin, Bytes::from(big_payload))))
        );
        assert_eq!(next_frame(&mut buf), Ok(None));
        assert!(buf.is_empty());
        // Control frames come out with their opcode.
        let mut buf = BytesMut::from(&server_frame(OpCode::Control(Control::Close), &[3, 232])[..]);
        assert_eq!(
            next_frame(&mut buf),
            Ok(Some((
                OpCode::Control(Control::Close),
                Bytes::from_static(&[3, 232])
            )))
        );
    }

    #[test]
    fn next_frame_refuses_what_a_server_must_not_send() {
        let bin = OpCode::Data(Data::Binary);
        // Masked (a client's frame).
        let mut masked = Vec::new();
        put_frame(&mut masked, bin, b"x".to_vec()).unwrap();
        assert!(next_frame(&mut BytesMut::from(&masked[..])).is_err());
        // Fragmented.
        let mut part = Vec::new();
        Frame::message(b"x".to_vec(), bin, false)
            .format(&mut part)
            .unwrap();
        assert!(next_frame(&mut BytesMut::from(&part[..])).is_err());
        // An extension bit.
        let mut rsv = server_frame(bin, b"x");
        rsv[0] |= 0x40;
        assert!(next_frame(&mut BytesMut::from(&rsv[..])).is_err());
        // Over MAX_FRAME (64-bit length), refused from the header alone.
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
        let err = next_frame(&mut BytesMut::from(&huge[..])).unwrap_err();
        assert!(err.contains("at most"), "{err}");
        // A reserved opcode.
        assert!(next_frame(&mut BytesMut::from(&[0x83u8, 0][..])).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_carry_the_payload() {
        let payload: Vec<u8> = (0..200u8).collect();
        let mut out = Vec::new();
        put_frame(&mut out, OpCode::Data(Data::Binary), payload.clone()).unwrap();
        let mut cursor = std::io::Cursor::new(&out[..]);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert!(header.is_final);
        assert_eq!(header.opcode, OpCode::Data(Data::Binary));
        assert_eq!(len, 200);
        let mask = header.mask.expect("a client frame is masked");
        let start = cursor.position() as usize;
        let unmasked: Vec<u8> = out[start..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, payload);
    }

    /// A raw server that answers one upgrade request with `respond(key)`
    /// in a single write; returns the client's result.
    async fn upgrade_against(respond: fn(&str) -> Vec<u8>) -> Result<BytesMut> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 512];
                let n = tcp.read(&mut b).await.unwrap();
                assert!(n > 0, "the client closed before its request ended");
                req.extend_from_slice(&b[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            assert!(req.starts_with("GET /ws?x=1 HTTP/1.1\r\n"), "{req}");
            let key = req
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .to_string();
            tcp.write_all(&respond(&key)).await.unwrap();
        });
        let mut tcp = TcpStream::connect(addr).await?;
        let r = upgrade(&mut tcp, addr, "/ws?x=1").await;
        server.await?;
        r
    }

    fn switching(accept: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn upgrade_keeps_what_follows_the_101_and_refuses_the_rest() {
        // A frame in the same write as the 101 stays in the buffer.
        let tail = upgrade_against(|key| {
            let mut out = switching(&derive_accept_key(key.as_bytes()));
            out.extend_from_slice(&server_frame(OpCode::Data(Data::Binary), b"early"));
            out
        })
        .await
        .unwrap();
        assert_eq!(
            &tail[..],
            &server_frame(OpCode::Data(Data::Binary), b"early")[..]
        );
        // A refusal says its status and body.
        let err = upgrade_against(|_| b"HTTP/1.1 401 Unauthorized\r\n\r\nbad token\n".to_vec())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("401 Unauthorized: bad token"),
            "{err:#}"
        );
        // A wrong accept key is refused.
        let err = upgrade_against(|_| switching("d3Jvbmc="))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("Sec-WebSocket-Accept"),
            "{err:#}"
        );
    }

    /// Against tokio-tungstenite's server over loopback: the upgrade, a push
    /// and a ping sent right behind the 101 response (in its read), a
    /// request and its reply, the pong, and the close.
    #[tokio::test]
    async fn a_connection_speaks_websocket_to_a_tungstenite_server() {
        use crate::stats::tag;
        use futures::SinkExt;
        use proto::v1::{self, server_frame::Kind};
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let push = ServerFrame {
            id: 0,
            kind: Some(Kind::Message(v1::Message {
                text: tag(0, now_nanos(), 32),
                ..Default::default()
            })),
        };
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            // Queued before the client reads its 101: it may come in the
            // same read as the response.
            ws.feed(Message::Binary(push.encode_to_vec().into()))
                .await
                .unwrap();
            ws.feed(Message::Ping(Bytes::from_static(b"hi")))
                .await
                .unwrap();
            ws.flush().await.unwrap();
            let mut seen = Vec::new();
            while let Some(m) = ws.next().await {
                match m.unwrap() {
                    Message::Binary(b) => {
                        let req = ClientFrame::decode(b).unwrap();
                        seen.push(format!("request {}", req.id));
                        let reply = ServerFrame {
                            id: req.id,
                            kind: Some(Kind::Ok(v1::Ok {})),
                        };
                        ws.send(Message::Binary(reply.encode_to_vec().into()))
                            .await
                            .unwrap();
                    }
                    Message::Pong(p) => seen.push(format!("pong {}", String::from_utf8_lossy(&p))),
                    Message::Close(_) => {
                        seen.push("close".to_string());
                        break;
                    }
                    other => seen.push(format!("other {other:?}")),
                }
            }
            seen
        });
        let target = Target::new(&[addr], "secret".into(), 1).unwrap();
        let rec = Arc::new(Recorder::new());
        let mut conn = connect(&target, 0, "u1", rec.clone()).await.unwrap();
        let kind = conn
            .request(
                client_frame::Kind::Heartbeat(v1::Heartbeat {}),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(kind, Kind::Ok(v1::Ok {}));
        assert_eq!(rec.count(0), 1, "the push behind the 101 was recorded");
        conn.close().await;
        let seen = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        // The pong and the request race (two tasks write); the close is last.
        assert!(!seen.is_empty(), "the server saw nothing");
        let (close, mut rest) = (seen.last().cloned(), seen[..seen.len() - 1].to_vec());
        rest.sort();
        assert_eq!(rest, ["pong hi", "request 1"], "{seen:?}");
        assert_eq!(close.as_deref(), Some("close"), "{seen:?}");
    }
}
