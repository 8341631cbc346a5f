//! One WebSocket connection: the task that owns the socket.
//!
//! It starts the connection's session actor, then loops: frames from the
//! client are size-checked and decoded here (bad ones get an error frame and
//! the connection stays usable), then handed to the session actor with a
//! reply handle holding one of the connection's in-flight permits (past
//! `max_in_flight` the task stops reading, and TCP pushes back on the
//! client). Everything queued for the client is written in batches with one
//! flush. A producer may ask to close (slow consumer, shutdown): queued
//! frames are then written within a short deadline and the socket closed
//! with that code.
//!
//! What it must not do: run requests itself, or buffer without bound.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use actors::outbound::{
    CLOSE_SLOW_CONSUMER, Event, Outbound, OutboundQueue, ReplyTo, SessionHandle,
};
use actors::session::{Session, SessionArgs, SessionMessage};
use actors::{ChatError, Router, UserId};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use metrics::Counter;
use proto::Encoding;
use proto::codec;
use ractor::{Actor, ActorRef};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, warn};

use crate::edge;

/// Most queued frames written before one flush.
const MAX_BATCH: usize = 256;
/// How long queued frames may take to drain before a requested close.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

// Per-frame counters, looked up in the recorder once instead of at every
// frame (see `actors::meters`). Resolved at the first frame, after `main`
// installed the recorder: no connection exists before that.
static FRAMES_IN: LazyLock<Counter> = LazyLock::new(|| metrics::counter!("chat_frames_in_total"));
static FRAMES_OUT: LazyLock<Counter> = LazyLock::new(|| metrics::counter!("chat_frames_out_total"));

/// Per-connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Frames over this get TOO_LARGE.
    pub max_frame_bytes: usize,
    /// Outbound queue capacity.
    pub outbound_queue: usize,
    /// In-flight requests.
    pub max_in_flight: usize,
}

/// The write half of a client's socket.
pub type WsSink<S> = SplitSink<WebSocketStream<S>, Message>;
/// The read half of a client's socket.
pub type WsStream<S> = SplitStream<WebSocketStream<S>>;

/// Serves one upgraded connection until it closes.
///
/// It takes the socket already split: an async fn keeps its by-value
/// arguments for its whole life, and a `WebSocketStream` is ~1.5 KB, which
/// every idle connection would otherwise hold twice (here and in the loop)
/// beside the halves' shared copy.
pub async fn serve<S>(
    mut sink: WsSink<S>,
    stream: WsStream<S>,
    user: UserId,
    router: Router,
    limits: ConnLimits,
    fixed_encoding: Option<Encoding>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (handle, queue) = SessionHandle::channel(limits.outbound_queue);
    let args = SessionArgs {
        user: user.clone(),
        handle: handle.clone(),
        router,
    };
    // Boxed: spawning awaits the session's `pre_start` (it reads the user's
    // groups), a future that need not sit in every idle connection's task.
    let (session, _) = match Box::pin(Actor::spawn(None, Session, args)).await {
        Ok(s) => s,
        Err(e) => {
            warn!(user = %user, error = %e, "session failed to start");
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Again,
                    reason: "session unavailable, retry".into(),
                })))
                .await;
            let _ = sink.close().await;
            return;
        }
    };
    metrics::gauge!("chat_connections").increment(1.0);
    let mut conn = Connection {
        handle,
        queue,
        session: session.clone(),
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        encoding: fixed_encoding.unwrap_or(Encoding::Json),
        fixed: fixed_encoding.is_some(),
        limits,
    };
    conn.run(sink, stream).await;
    session.stop(None);
    metrics::gauge!("chat_connections").decrement(1.0);
    debug!(user = %user, "connection closed");
}

struct Connection {
    handle: SessionHandle,
    queue: OutboundQueue,
    session: ActorRef<SessionMessage>,
    in_flight: Arc<Semaphore>,
    /// Encoding of pushes.
    encoding: Encoding,
    /// Whether `encoding` was fixed at upgrade.
    fixed: bool,
    limits: ConnLimits,
}

/// What ends the loop.
enum End {
    /// The client went away or the socket failed.
    Gone,
    /// Close with this code.
    Close(u16, &'static str),
}

impl Connection {
    async fn run<S>(&mut self, mut sink: WsSink<S>, mut stream: WsStream<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let end = loop {
            tokio::select! {
                biased;
                // A close request comes before queued frames (see
                // `close_with` for what is still let out).
                event = self.queue.next_event() => match event {
                    Event::Close(code) => {
                        break End::Close(code, if code == CLOSE_SLOW_CONSUMER {
                            "too slow: reconnect and sync"
                        } else {
                            "server going away"
                        });
                    }
                    Event::Item(item) => {
                        if self.write_batch(&mut sink, item).await.is_err() {
                            break End::Gone;
                        }
                    }
                },
                frame = stream.next() => {
                    match frame {
                        None => break End::Gone,
                        Some(Ok(msg)) => {
                            // Boxed: see `close_with`.
                            if let Some(end) = Box::pin(self.on_message(msg)).await {
                                break end;
                            }
                        }
                        Some(Err(WsError::Capacity(e))) => {
                            debug!(error = %e, "frame far over the limit");
                            break End::Close(1009, "frame too large");
                        }
                        Some(Err(e)) => {
                            debug!(error = %e, "socket error");
                            break End::Gone;
                        }
                    }
                }
            }
        };
        if let End::Close(code, reason) = end {
            // Boxed: a closing path's futures need not sit in every idle
            // connection's task.
            Box::pin(self.close_with(&mut sink, code, reason)).await;
        }
    }

    /// Lets queued frames out (briefly), then closes with `code`.
    async fn close_with<W>(&mut self, sink: &mut W, code: u16, reason: &'static str)
    where
        W: futures::Sink<Message, Error = WsError> + Unpin,
    {
        if code != CLOSE_SLOW_CONSUMER {
            // Let queued frames (e.g. a goaway) out first, briefly.
            let _ = tokio::time::timeout(DRAIN_DEADLINE, async {
                while let Some(item) = self.queue.try_recv() {
                    if self.write_batch(sink, item).await.is_err() {
                        break;
                    }
                }
            })
            .await;
        } else {
            metrics::counter!("chat_slow_consumers_total").increment(1);
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(DRAIN_DEADLINE, sink.send(Message::Close(Some(frame)))).await;
        let _ = tokio::time::timeout(DRAIN_DEADLINE, sink.close()).await;
    }

    /// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]),
    /// then flushes once.
    async fn write_batch<W>(&mut self, sink: &mut W, first: Outbound) -> Result<(), WsError>
    where
        W: futures::Sink<Message, Error = WsError> + Unpin,
    {
        let mut n = self.feed(sink, first).await?;
        while n < MAX_BATCH {
            let Some(item) = self.queue.try_recv() else {
                break;
            };
            n += self.feed(sink, item).await?;
        }
        FRAMES_OUT.increment(n as u64);
        sink.flush().await
    }

    /// Feeds one queued item (a batch is several frames); returns the frames fed.
    async fn feed<W>(&self, sink: &mut W, item: Outbound) -> Result<usize, WsError>
    where
        W: futures::Sink<Message, Error = WsError> + Unpin,
    {
        match item {
            Outbound::Batch(pushes) => {
                for p in pushes.iter() {
                    sink.feed(edge::push_message(p, self.encoding)).await?;
                }
                Ok(pushes.len())
            }
            other => {
                sink.feed(edge::to_message(other, self.encoding)).await?;
                Ok(1)
            }
        }
    }

    /// Handles one client message; `Some` ends the connection.
    async fn on_message(&mut self, msg: Message) -> Option<End> {
        let (encoding, decoded) = match msg {
            Message::Text(t) => {
                if t.len() > self.limits.max_frame_bytes {
                    return self.too_large(t.len(), Encoding::Json);
                }
                (Encoding::Json, codec::decode_json(t.as_str()))
            }
            Message::Binary(b) => {
                if b.len() > self.limits.max_frame_bytes {
                    return self.too_large(b.len(), Encoding::Binary);
                }
                (Encoding::Binary, codec::decode_binary(&b))
            }
            Message::Close(_) => return Some(End::Gone),
            // Pings are answered by tungstenite; pongs and raw frames are ignored.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return None,
        };
        FRAMES_IN.increment(1);
        if !self.fixed {
            self.encoding = encoding;
        }
        let frame = match decoded {
            Ok(f) => f,
            Err((id, e)) => {
                ReplyTo::new(id, encoding, self.handle.clone(), None).fail(edge::decode_error(&e));
                return None;
            }
        };
        let Some(kind) = frame.kind else {
            return None; // codec::decode_* guarantee a kind.
        };
        // One permit per request in progress; waiting here stops reading.
        let permit = tokio::select! {
            p = self.in_flight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Some(End::Gone),
            },
            code = self.queue.closed() => return Some(End::Close(code, "closing")),
        };
        let reply = ReplyTo::new(frame.id, encoding, self.handle.clone(), Some(permit));
        if let Err(e) = self.session.cast(SessionMessage::Request { kind, reply }) {
            // The reply handle inside the failed message answers UNAVAILABLE.
            warn!(error = %e, "session actor gone");
            return Some(End::Close(1011, "session ended"));
        }
        None
    }

    fn too_large(&self, len: usize, encoding: Encoding) -> Option<End> {
        let e = ChatError::TooLarge(format!(
            "frame of {len} bytes; the limit is {}",
            self.limits.max_frame_bytes
        ));
        ReplyTo::new(0, encoding, self.handle.clone(), None).fail(e);
        None
    }
}

#[cfg(test)]
mod tests {
    /// The memory budget per idle connection (issue 5: at most 10 KB,
    /// measured 9.4–9.6 KB) relies on ractor's mailbox slots staying small,
    /// because every actor, the connection's session among them, allocates
    /// 32 of them when it starts (`vendor/ractor/PATCHED.md`). The registry
    /// ractor (unpatched), or `message_span_propogation` turned back on (a
    /// dependency's default features did that once), makes each slot
    /// 64 bytes or more: 1.3 KB or more per connection.
    #[test]
    fn ractor_mailbox_slots_stay_small() {
        let slot = std::mem::size_of::<ractor::message::BoxedMessage>();
        assert!(
            slot <= 24,
            "ractor's BoxedMessage is {slot} bytes; the patched ractor without \
             message_span_propogation has 24 (see vendor/ractor/PATCHED.md)"
        );
    }
}
