//! A real WebSocket client of the chat protocol, for end-to-end tests.
//!
//! Owns: one WebSocket connection (tokio-tungstenite over a plain TCP socket
//! to 127.0.0.1), the next request id, and an inbox of frames read but not
//! yet consumed (pushes, and replies nobody has asked for yet).
//!
//! Encodings: in [`Mode::Json`] requests go out as text frames holding the
//! proto3 JSON of `ClientFrame` (serde_json over the generated pbjson
//! types); in [`Mode::Binary`] as protobuf bytes. Whatever the mode, frames
//! from the server are decoded by their WebSocket type (text = JSON, binary
//! = protobuf), and counted per type so tests can check which encoding the
//! server chose. Tests can also send raw hand-written text or bytes.
//!
//! Matching: [`Client::request`] sends a frame with a fresh id and reads
//! until the frame with that id arrives; frames that arrive in between are
//! kept in the inbox, in order, for [`Client::next_push`] and friends.
//!
//! Every wait has a timeout ([`crate::REQUEST_TIMEOUT`] unless given) and
//! every loop is bounded by a deadline.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::REQUEST_TIMEOUT;
use crate::node::NodeProcess;
use crate::v1::{self, ClientFrame, ServerFrame, client_frame::Kind as Req, server_frame::Kind};

/// Most frames [`Client::wait_close`] drains before giving up.
pub const MAX_DRAIN_FRAMES: usize = 1_000_000;

/// Most pages [`Client::history_all`] fetches.
pub const MAX_HISTORY_PAGES: usize = 10_000;

/// How the client encodes its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Text frames with proto3 JSON.
    Json,
    /// Binary frames with protobuf bytes.
    Binary,
}

/// Where the token goes at upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVia {
    /// `Authorization: Bearer TOKEN`.
    Header,
    /// `?token=TOKEN`.
    Query,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Request encoding.
    pub mode: Mode,
    /// Where the token goes.
    pub auth: AuthVia,
    /// `?encoding=` at upgrade. `None` lets pushes follow the client's last
    /// frame. [`ClientOptions::new`] sets it to match `mode`.
    pub encoding_param: Option<&'static str>,
    /// `SO_RCVBUF` of the client socket (slow-reader tests keep it small so
    /// the kernel cannot hide a client that does not read).
    pub recv_buffer: Option<u32>,
    /// A token to use instead of a freshly minted valid one.
    pub token: Option<String>,
    /// How long the TCP connect plus the upgrade may take (a frozen node
    /// accepts TCP connections but never answers the upgrade).
    pub connect_timeout: Duration,
}

impl ClientOptions {
    /// Token in the header, `?encoding=` matching `mode`.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            auth: AuthVia::Header,
            encoding_param: Some(match mode {
                Mode::Json => "json",
                Mode::Binary => "binary",
            }),
            recv_buffer: None,
            token: None,
            connect_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// An `error` frame from the server, as a Rust error (tests downcast to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The error code.
    pub code: v1::ErrorCode,
    /// The server's message.
    pub message: String,
    /// The frame's id (the request's, or 0).
    pub id: u64,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server error {:?} (id {}): {}",
            self.code, self.id, self.message
        )
    }
}

impl std::error::Error for ServerError {}

/// How a connection ended, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code and reason (code 1005 when it had none).
    Frame(u16, String),
    /// The TCP connection ended without a close frame (EOF or reset).
    Abrupt(String),
}

impl Closed {
    /// The close code, if the server sent a close frame.
    pub fn code(&self) -> Option<u16> {
        match self {
            Closed::Frame(c, _) => Some(*c),
            Closed::Abrupt(_) => None,
        }
    }
}

/// One WebSocket connection speaking the chat protocol.
pub struct Client {
    /// The authenticated user.
    user: String,
    /// Request encoding.
    mode: Mode,
    /// The socket.
    ws: WebSocketStream<TcpStream>,
    /// Next request id (starts at 1; 0 means "push").
    next_id: u64,
    /// Frames read but not consumed yet, in arrival order.
    inbox: VecDeque<ServerFrame>,
    /// Set once the connection ended.
    closed: Option<Closed>,
    /// Text frames received.
    pub text_frames: u64,
    /// Binary frames received.
    pub binary_frames: u64,
}

/// Builds `ws://ADDR/ws?...` with the given query parameters.
fn ws_url(addr: SocketAddr, query: &[(&str, &str)]) -> String {
    let mut url = format!("ws://{addr}/ws");
    for (i, (k, v)) in query.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(k);
        url.push('=');
        url.push_str(v);
    }
    url
}

/// Opens a TCP connection to `addr` with an optional small receive buffer.
async fn tcp_connect(addr: SocketAddr, recv_buffer: Option<u32>) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(n) = recv_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("TCP connect {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Tries a WebSocket upgrade at `ws://ADDR/ws?query` with the given extra
/// headers, and returns the HTTP status: 101 when the upgrade succeeded
/// (the socket is then closed), else the error response's status (401 for a
/// bad token).
pub async fn upgrade_status(
    addr: SocketAddr,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Result<u16> {
    let mut req = ws_url(addr, query).into_client_request()?;
    for (k, v) in headers {
        let name: tungstenite::http::HeaderName = k.parse()?;
        req.headers_mut().insert(name, HeaderValue::from_str(v)?);
    }
    let stream = tcp_connect(addr, None).await?;
    let res = tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    .context("upgrade timed out")?;
    match res {
        Ok((mut ws, resp)) => {
            let _ = ws.close(None).await;
            Ok(resp.status().as_u16())
        }
        Err(tungstenite::Error::Http(resp)) => Ok(resp.status().as_u16()),
        Err(e) => Err(anyhow!(e).context("upgrade failed without an HTTP response")),
    }
}

impl Client {
    /// Connects as `user` with a valid token in the header, JSON mode.
    pub async fn connect(node: &NodeProcess, user: &str) -> Result<Self> {
        Self::connect_with(node, user, ClientOptions::new(Mode::Json)).await
    }

    /// Connects as `user` with a valid token in the header, binary mode.
    pub async fn connect_binary(node: &NodeProcess, user: &str) -> Result<Self> {
        Self::connect_with(node, user, ClientOptions::new(Mode::Binary)).await
    }

    /// Connects as `user` in `mode`.
    pub async fn connect_mode(node: &NodeProcess, user: &str, mode: Mode) -> Result<Self> {
        Self::connect_with(node, user, ClientOptions::new(mode)).await
    }

    /// Connects as `user` with explicit options.
    pub async fn connect_with(node: &NodeProcess, user: &str, opts: ClientOptions) -> Result<Self> {
        let token = opts.token.clone().unwrap_or_else(|| node.token(user));
        Self::connect_addr(node.addr(), user, &token, opts).await
    }

    /// Connects as `user` with `token` to the node listening on `addr`
    /// (`opts.token` is ignored). Used where no [`NodeProcess`] is at hand,
    /// e.g. a task that reconnects to another node of a cluster.
    pub async fn connect_addr(
        addr: SocketAddr,
        user: &str,
        token: &str,
        opts: ClientOptions,
    ) -> Result<Self> {
        tokio::time::timeout(
            opts.connect_timeout,
            Self::connect_addr_inner(addr, user, token, opts.clone()),
        )
        .await
        .with_context(|| {
            format!(
                "connect as {user} to {addr}: no upgrade within {:?}",
                opts.connect_timeout
            )
        })?
    }

    async fn connect_addr_inner(
        addr: SocketAddr,
        user: &str,
        token: &str,
        opts: ClientOptions,
    ) -> Result<Self> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if opts.auth == AuthVia::Query {
            query.push(("token", token));
        }
        if let Some(enc) = opts.encoding_param {
            query.push(("encoding", enc));
        }
        let mut req = ws_url(addr, &query).into_client_request()?;
        if opts.auth == AuthVia::Header {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            );
        }
        let stream = tcp_connect(addr, opts.recv_buffer).await?;
        let (ws, _resp) = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_tungstenite::client_async(req, stream),
        )
        .await
        .context("WebSocket upgrade timed out")?
        .with_context(|| format!("WebSocket upgrade as {user} to {addr}"))?;
        Ok(Self {
            user: user.to_string(),
            mode: opts.mode,
            ws,
            next_id: 1,
            inbox: VecDeque::new(),
            closed: None,
            text_frames: 0,
            binary_frames: 0,
        })
    }

    /// The user this client authenticated as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The request encoding.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How the connection ended, once it did.
    pub fn closed(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// A fresh request id.
    pub fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ---------------------------------------------------------------------
    // Raw sending
    // ---------------------------------------------------------------------

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        let text: String = text.into();
        self.send_ws(WsMessage::text(text)).await
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.send_ws(WsMessage::binary(bytes)).await
    }

    async fn send_ws(&mut self, msg: WsMessage) -> Result<()> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.ws.send(msg))
            .await
            .context("WebSocket send timed out")?
            .context("WebSocket send")?;
        Ok(())
    }

    /// Sends `frame` in this client's encoding (or `mode`), without waiting.
    pub async fn send_frame_as(&mut self, frame: &ClientFrame, mode: Mode) -> Result<()> {
        match mode {
            Mode::Json => {
                let text = serde_json::to_string(frame).context("encode ClientFrame as JSON")?;
                self.send_text(text).await
            }
            Mode::Binary => self.send_binary(frame.encode_to_vec()).await,
        }
    }

    /// Sends a request of `kind` with a fresh id without waiting for the
    /// reply (pipelining); returns the id for [`Client::wait_reply`].
    pub async fn send_request(&mut self, kind: Req) -> Result<u64> {
        let id = self.fresh_id();
        let frame = ClientFrame {
            id,
            kind: Some(kind),
        };
        let mode = self.mode;
        self.send_frame_as(&frame, mode).await?;
        Ok(id)
    }

    // ---------------------------------------------------------------------
    // Receiving
    // ---------------------------------------------------------------------

    /// Reads one frame from the socket before `deadline`. `Ok(None)` on
    /// timeout; an error once the connection has ended (recorded in
    /// [`Client::closed`]).
    async fn read_frame(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(ServerFrame, Option<String>)>> {
        loop {
            if let Some(c) = &self.closed {
                bail!("connection of {} closed: {c:?}", self.user);
            }
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(n) => n,
            };
            match next {
                None => {
                    self.closed = Some(Closed::Abrupt("end of stream".to_string()));
                }
                Some(Err(e)) => {
                    self.closed = Some(Closed::Abrupt(e.to_string()));
                }
                Some(Ok(WsMessage::Text(t))) => {
                    self.text_frames += 1;
                    let text = t.to_string();
                    let frame: ServerFrame = serde_json::from_str(&text).with_context(|| {
                        format!("server sent text that is not a ServerFrame: {text}")
                    })?;
                    return Ok(Some((frame, Some(text))));
                }
                Some(Ok(WsMessage::Binary(b))) => {
                    self.binary_frames += 1;
                    let frame = ServerFrame::decode(&b[..])
                        .context("server sent binary that is not a ServerFrame")?;
                    return Ok(Some((frame, None)));
                }
                Some(Ok(WsMessage::Close(cf))) => {
                    self.closed = Some(match cf {
                        Some(cf) => Closed::Frame(u16::from(cf.code), cf.reason.to_string()),
                        None => Closed::Frame(1005, String::new()),
                    });
                }
                Some(Ok(_)) => {} // ping, pong, raw frame
            }
        }
    }

    /// Waits for the reply with `id` (keeping other frames in the inbox).
    pub async fn wait_reply(&mut self, id: u64) -> Result<ServerFrame> {
        self.wait_reply_timeout(id, REQUEST_TIMEOUT).await
    }

    /// Waits up to `timeout` for the reply with `id`.
    pub async fn wait_reply_timeout(&mut self, id: u64, timeout: Duration) -> Result<ServerFrame> {
        Ok(self.wait_reply_raw(id, timeout).await?.0)
    }

    /// Like [`Client::wait_reply_timeout`], also returning the raw JSON text
    /// of the reply when it came as a text frame.
    async fn wait_reply_raw(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Result<(ServerFrame, Option<String>)> {
        if let Some(pos) = self.inbox.iter().position(|f| f.id == id) {
            let f = self.inbox.remove(pos).expect("position is in range");
            return Ok((f, None));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_frame(deadline).await {
                Ok(Some((f, raw))) => {
                    if f.id == id {
                        return Ok((f, raw));
                    }
                    self.inbox.push_back(f);
                }
                Ok(None) => bail!(
                    "{}: no reply to request {id} within {timeout:?} (inbox holds {} frames)",
                    self.user,
                    self.inbox.len()
                ),
                Err(e) => return Err(e.context(format!("{}: waiting for reply {id}", self.user))),
            }
        }
    }

    /// Sends a request and returns the whole reply frame.
    pub async fn request(&mut self, kind: Req) -> Result<ServerFrame> {
        let id = self.send_request(kind).await?;
        self.wait_reply(id).await
    }

    /// Sends a request; returns the reply's kind, or a [`ServerError`] for an
    /// `error` reply.
    pub async fn call(&mut self, kind: Req) -> Result<Kind> {
        let frame = self.request(kind).await?;
        reply_kind(frame)
    }

    /// Sends a request that must fail; returns the error.
    pub async fn expect_error(&mut self, kind: Req) -> Result<ServerError> {
        let frame = self.request(kind).await?;
        match frame.kind {
            Some(Kind::Error(e)) => Ok(to_server_error(frame.id, e)),
            other => bail!("expected an error reply, got {other:?}"),
        }
    }

    /// Sends raw `text` whose JSON `id` is `id`, and returns the reply frame
    /// and the reply's raw JSON value (when the reply was a text frame).
    pub async fn request_raw_text(
        &mut self,
        id: u64,
        text: &str,
    ) -> Result<(ServerFrame, Option<serde_json::Value>)> {
        self.send_text(text).await?;
        let (frame, raw) = self.wait_reply_raw(id, REQUEST_TIMEOUT).await?;
        let value = match raw {
            Some(r) => Some(serde_json::from_str(&r)?),
            None => None,
        };
        Ok((frame, value))
    }

    /// The next frame with id 0 (push) before `timeout`, from the inbox
    /// first. `Ok(None)` on timeout.
    pub async fn next_push(&mut self, timeout: Duration) -> Result<Option<ServerFrame>> {
        if let Some(pos) = self.inbox.iter().position(|f| f.id == 0) {
            return Ok(self.inbox.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_frame(deadline).await? {
                None => return Ok(None),
                Some((f, _)) if f.id == 0 => return Ok(Some(f)),
                Some((f, _)) => self.inbox.push_back(f),
            }
        }
    }

    /// The first frame (from the inbox, then the socket) for which `pred`
    /// holds, before `timeout`; other frames stay in the inbox. `Ok(None)`
    /// on timeout.
    pub async fn next_frame_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&ServerFrame) -> bool,
    ) -> Result<Option<ServerFrame>> {
        if let Some(pos) = self.inbox.iter().position(&pred) {
            return Ok(self.inbox.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_frame(deadline).await? {
                None => return Ok(None),
                Some((f, _)) if pred(&f) => return Ok(Some(f)),
                Some((f, _)) => self.inbox.push_back(f),
            }
        }
    }

    /// The next `message` push before `timeout`, skipping other pushes
    /// (receipts, typing, presence, reactions). An `error` or `goaway` push
    /// is an error. `Ok(None)` on timeout.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Option<v1::Message>> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            match self.next_push(left).await? {
                None => return Ok(None),
                Some(f) => match f.kind {
                    Some(Kind::Message(m)) => return Ok(Some(m)),
                    Some(Kind::Error(e)) => {
                        return Err(to_server_error(0, e).into());
                    }
                    Some(Kind::Goaway(g)) => {
                        bail!("{}: unexpected goaway: {}", self.user, g.reason)
                    }
                    _ => {}
                },
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// Collects `message` pushes of group `gid` until one with seq >=
    /// `until_seq` arrives; fails after `timeout` with what it has.
    pub async fn collect_messages(
        &mut self,
        gid: &str,
        until_seq: u64,
        timeout: Duration,
    ) -> Result<Vec<v1::Message>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<v1::Message> = Vec::new();
        loop {
            if got.last().is_some_and(|m| m.seq >= until_seq) {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left).await? {
                Some(m) if m.group_id == gid => got.push(m),
                Some(_) => {}
                None => bail!(
                    "{}: waited {timeout:?} for pushes of {gid} up to seq {until_seq}; got seqs {:?}",
                    self.user,
                    got.iter().map(|m| m.seq).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Fails if a `message` push of group `gid` arrives within `wait`.
    pub async fn expect_no_message(&mut self, gid: &str, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.next_message(left).await? {
                None => return Ok(()),
                Some(m) if m.group_id == gid => {
                    bail!("{}: unexpected message push {m:?}", self.user)
                }
                Some(_) => {}
            }
        }
    }

    /// Reads (and discards) frames until the connection ends or `timeout`
    /// passes; returns how it ended and how many frames were drained.
    pub async fn wait_close(&mut self, timeout: Duration) -> Result<(Closed, usize)> {
        let deadline = Instant::now() + timeout;
        let mut drained = self.inbox.len();
        self.inbox.clear();
        while drained < MAX_DRAIN_FRAMES {
            if let Some(c) = &self.closed {
                return Ok((c.clone(), drained));
            }
            match self.read_frame(deadline).await {
                Ok(Some(_)) => drained += 1,
                Ok(None) => bail!(
                    "{}: connection still open {timeout:?} later ({drained} frames drained)",
                    self.user
                ),
                Err(_) if self.closed.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        bail!(
            "{}: drained {MAX_DRAIN_FRAMES} frames and still open",
            self.user
        )
    }

    /// Drops the pushes (frames with id 0) waiting in the inbox; returns
    /// how many were dropped. Long-running senders call it so the inbox
    /// does not grow with the pushes of their own group.
    pub fn discard_pushes(&mut self) -> usize {
        let before = self.inbox.len();
        self.inbox.retain(|f| f.id != 0);
        before - self.inbox.len()
    }

    /// Frames read but not consumed yet.
    pub fn inbox(&self) -> &VecDeque<ServerFrame> {
        &self.inbox
    }

    /// Closes the connection normally (1000), best effort.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }

    // ---------------------------------------------------------------------
    // Typed helpers
    // ---------------------------------------------------------------------

    /// `createGroup`; returns the group id.
    pub async fn create_group(&mut self, name: &str, members: &[&str]) -> Result<String> {
        match self
            .call(Req::CreateGroup(v1::CreateGroup {
                name: name.to_string(),
                members: strings(members),
            }))
            .await?
        {
            Kind::GroupCreated(g) => Ok(g.group_id),
            other => bail!("createGroup: unexpected reply {other:?}"),
        }
    }

    /// `openDirect`; returns the group id.
    pub async fn open_direct(&mut self, user: &str) -> Result<String> {
        match self
            .call(Req::OpenDirect(v1::OpenDirect {
                user_id: user.to_string(),
            }))
            .await?
        {
            Kind::GroupCreated(g) => Ok(g.group_id),
            other => bail!("openDirect: unexpected reply {other:?}"),
        }
    }

    /// `addMembers`.
    pub async fn add_members(&mut self, gid: &str, users: &[&str]) -> Result<()> {
        self.call_ok(Req::AddMembers(v1::AddMembers {
            group_id: gid.to_string(),
            user_ids: strings(users),
        }))
        .await
    }

    /// `removeMembers`.
    pub async fn remove_members(&mut self, gid: &str, users: &[&str]) -> Result<()> {
        self.call_ok(Req::RemoveMembers(v1::RemoveMembers {
            group_id: gid.to_string(),
            user_ids: strings(users),
        }))
        .await
    }

    /// `setRole`.
    pub async fn set_role(&mut self, gid: &str, user: &str, role: v1::Role) -> Result<()> {
        self.call_ok(Req::SetRole(v1::SetRole {
            group_id: gid.to_string(),
            user_id: user.to_string(),
            role: role as i32,
        }))
        .await
    }

    /// `leaveGroup`.
    pub async fn leave_group(&mut self, gid: &str) -> Result<()> {
        self.call_ok(Req::LeaveGroup(v1::LeaveGroup {
            group_id: gid.to_string(),
        }))
        .await
    }

    /// `send` with just a text; returns the `sent` reply.
    pub async fn send(&mut self, gid: &str, client_msg_id: &str, text: &str) -> Result<v1::Sent> {
        self.send_msg(send_req(gid, client_msg_id, text)).await
    }

    /// `send` with every field; returns the `sent` reply.
    pub async fn send_msg(&mut self, msg: v1::Send) -> Result<v1::Sent> {
        match self.call(Req::Send(msg)).await? {
            Kind::Sent(s) => Ok(s),
            other => bail!("send: unexpected reply {other:?}"),
        }
    }

    /// `history`.
    pub async fn history(
        &mut self,
        gid: &str,
        after_seq: Option<u64>,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<v1::Messages> {
        match self
            .call(Req::History(v1::History {
                group_id: gid.to_string(),
                after_seq,
                before_seq,
                limit,
                thread_seq: None,
            }))
            .await?
        {
            Kind::Messages(m) => Ok(m),
            other => bail!("history: unexpected reply {other:?}"),
        }
    }

    /// The whole log after `after_seq`, paging forward with `page` messages
    /// per request until `hasMore` is false.
    pub async fn history_after(
        &mut self,
        gid: &str,
        after_seq: u64,
        page: u32,
    ) -> Result<Vec<v1::Message>> {
        let mut out: Vec<v1::Message> = Vec::new();
        let mut after = after_seq;
        for _ in 0..MAX_HISTORY_PAGES {
            let m = self.history(gid, Some(after), None, page).await?;
            if let Some(last) = m.messages.last() {
                after = last.seq;
            }
            let empty = m.messages.is_empty();
            out.extend(m.messages);
            if !m.has_more {
                return Ok(out);
            }
            if empty {
                bail!("history after {after}: empty page with hasMore = true");
            }
        }
        bail!("history of {gid}: more than {MAX_HISTORY_PAGES} pages")
    }

    /// The whole log of `gid` from seq 1, in pages of 500.
    pub async fn history_all(&mut self, gid: &str) -> Result<Vec<v1::Message>> {
        self.history_after(gid, 0, 500).await
    }

    /// `sync`; returns the user's groups.
    pub async fn sync(&mut self) -> Result<Vec<v1::GroupSummary>> {
        match self.call(Req::Sync(v1::Sync {})).await? {
            Kind::Groups(g) => Ok(g.groups),
            other => bail!("sync: unexpected reply {other:?}"),
        }
    }

    /// `sync`, then the summary of `gid` if the user has it.
    pub async fn sync_group(&mut self, gid: &str) -> Result<Option<v1::GroupSummary>> {
        Ok(self.sync().await?.into_iter().find(|g| g.group_id == gid))
    }

    /// `markRead`.
    pub async fn mark_read(&mut self, gid: &str, seq: u64) -> Result<()> {
        self.call_ok(Req::MarkRead(v1::MarkRead {
            group_id: gid.to_string(),
            seq,
        }))
        .await
    }

    /// `markDelivered`.
    pub async fn mark_delivered(&mut self, gid: &str, seq: u64) -> Result<()> {
        self.call_ok(Req::MarkDelivered(v1::MarkDelivered {
            group_id: gid.to_string(),
            seq,
        }))
        .await
    }

    /// `heartbeat` (a cheap request that must succeed).
    pub async fn heartbeat(&mut self) -> Result<()> {
        self.call_ok(Req::Heartbeat(v1::Heartbeat {})).await
    }

    /// Sends a request whose reply must be `ok`.
    pub async fn call_ok(&mut self, kind: Req) -> Result<()> {
        match self.call(kind).await? {
            Kind::Ok(_) => Ok(()),
            other => bail!("expected ok, got {other:?}"),
        }
    }
}

/// The reply's kind, or a [`ServerError`] for an `error` reply.
pub fn reply_kind(frame: ServerFrame) -> Result<Kind> {
    match frame.kind {
        Some(Kind::Error(e)) => Err(to_server_error(frame.id, e).into()),
        Some(k) => Ok(k),
        None => bail!("reply {} has no kind", frame.id),
    }
}

/// Converts an `error` payload into a [`ServerError`].
pub fn to_server_error(id: u64, e: v1::Error) -> ServerError {
    ServerError {
        code: v1::ErrorCode::try_from(e.code).unwrap_or(v1::ErrorCode::Unspecified),
        message: e.message,
        id,
    }
}

/// The error code of `err` if it is a [`ServerError`].
pub fn error_code(err: &anyhow::Error) -> Option<v1::ErrorCode> {
    err.downcast_ref::<ServerError>().map(|e| e.code)
}

/// A `send` request with only group, client message id and text.
pub fn send_req(gid: &str, client_msg_id: &str, text: &str) -> v1::Send {
    v1::Send {
        group_id: gid.to_string(),
        client_msg_id: client_msg_id.to_string(),
        text: text.to_string(),
        ..Default::default()
    }
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}
