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

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use actors::outbound::{
    CLOSE_SLOW_CONSUMER, Event, Outbound, OutboundQueue, ReplyTo, SessionHandle,
};
use actors::session::{Session, SessionArgs, SessionMessage};
use actors::{ChatError, Router, UserId};
use futures::stream::{SplitSink, SplitStream};
use futures::task::{ArcWake, AtomicWaker, waker_ref};
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

/// One step of the loop: the queue first (a close request, then the
/// oldest frame), then the socket, but the socket only when its read
/// side woke since it last said `Pending` (see [`ReadWake`]).
fn poll_step<S>(
    queue: &OutboundQueue,
    cx: &mut Context<'_>,
    reads: &Arc<ReadWake>,
    stream: &mut WsStream<S>,
) -> Poll<Step>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Poll::Ready(event) = queue.poll_event(cx) {
        return Poll::Ready(Step::Event(event));
    }
    // Registered before the flag is taken: a wake that lands while
    // the socket is polled sets the flag again and wakes this task.
    reads.task.register(cx.waker());
    if !reads.woken.swap(false, Ordering::AcqRel) {
        return Poll::Pending;
    }
    let waker = waker_ref(reads);
    match stream.poll_next_unpin(&mut Context::from_waker(&waker)) {
        Poll::Ready(frame) => {
            // The next frame may be buffered already: look again.
            reads.woken.store(true, Ordering::Release);
            Poll::Ready(Step::Frame(frame))
        }
        Poll::Pending => Poll::Pending,
    }
}

/// What one step of the loop found.
enum Step {
    /// From the outbound queue.
    Event(Event),
    /// From the socket (`None`: it closed).
    Frame(Option<Result<Message, WsError>>),
}

/// The waker the socket's read side gets: it marks that side as woken,
/// then wakes the connection's task.
///
/// A fan-out wakes every recipient's task once per push, and a
/// `tokio::select!` over the queue and the socket then polled the socket
/// too, though it had not woken: tungstenite zeroes its read buffer and
/// tries a read (through the split's lock, the WebSocket layers and the
/// readiness check) at every push, which found nothing (docs/benchmarks.md,
/// round 29). With this waker the loop polls the socket only after the
/// socket (or the lock of its halves) woke it, and again after each frame
/// it yields.
///
/// Invariant: `woken` is set by every wake of the read side and starts
/// set, so no readiness is lost between two looks.
struct ReadWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ReadWake {
    fn new() -> Arc<Self> {
        Arc::new(ReadWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        })
    }
}

impl ArcWake for ReadWake {
    fn wake_by_ref(this: &Arc<Self>) {
        this.woken.store(true, Ordering::Release);
        this.task.wake();
    }
}

impl Connection {
    async fn run<S>(&mut self, mut sink: WsSink<S>, mut stream: WsStream<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let reads = ReadWake::new();
        let end = loop {
            match poll_fn(|cx| poll_step(&self.queue, cx, &reads, &mut stream)).await {
                // A close request comes before queued frames (see
                // `close_with` for what is still let out).
                Step::Event(Event::Close(code)) => {
                    break End::Close(
                        code,
                        if code == CLOSE_SLOW_CONSUMER {
                            "too slow: reconnect and sync"
                        } else {
                            "server going away"
                        },
                    );
                }
                Step::Event(Event::Item(item)) => {
                    if self.write_batch(&mut sink, item).await.is_err() {
                        break End::Gone;
                    }
                }
                Step::Frame(None) => break End::Gone,
                Step::Frame(Some(Ok(msg))) => {
                    // Boxed: see `close_with`.
                    if let Some(end) = Box::pin(self.on_message(msg)).await {
                        break end;
                    }
                }
                Step::Frame(Some(Err(WsError::Capacity(e)))) => {
                    debug!(error = %e, "frame far over the limit");
                    break End::Close(1009, "frame too large");
                }
                Step::Frame(Some(Err(e))) => {
                    debug!(error = %e, "socket error");
                    break End::Gone;
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
    use std::future::poll_fn;
    use std::time::Duration;

    use actors::ChatError;
    use actors::outbound::{Event, Outbound, OutboundQueue, SessionHandle};
    use futures::{SinkExt, StreamExt};
    use proto::Encoding;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::{ReadWake, Step, WsStream, poll_step};

    fn reply(id: u64) -> Outbound {
        Outbound::Reply {
            id,
            encoding: Encoding::Binary,
            result: Box::new(Err(ChatError::NotFound("g".into()))),
        }
    }

    /// A server socket's read half, its client, and a queue with its handle.
    async fn pair() -> (
        WsStream<DuplexStream>,
        WebSocketStream<DuplexStream>,
        SessionHandle,
        OutboundQueue,
    ) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let (_sink, stream) = server.split();
        let (handle, queue) = SessionHandle::channel(16);
        (stream, client, handle, queue)
    }

    /// The next step within a second (a lost wake-up fails here).
    async fn step(
        queue: &OutboundQueue,
        reads: &std::sync::Arc<ReadWake>,
        stream: &mut WsStream<DuplexStream>,
    ) -> Step {
        tokio::time::timeout(
            Duration::from_secs(1),
            poll_fn(|cx| poll_step(queue, cx, reads, stream)),
        )
        .await
        .expect("the loop was not woken")
    }

    fn frame(step: Step) -> Vec<u8> {
        match step {
            Step::Frame(Some(Ok(Message::Binary(b)))) => b.to_vec(),
            Step::Frame(other) => panic!("expected a binary frame, got {other:?}"),
            Step::Event(_) => panic!("expected a frame, got a queue event"),
        }
    }

    fn reply_id(step: Step) -> u64 {
        match step {
            Step::Event(Event::Item(Outbound::Reply { id, .. })) => id,
            Step::Event(other) => panic!("expected a reply, got {other:?}"),
            Step::Frame(f) => panic!("expected a queue event, got {f:?}"),
        }
    }

    /// The connection loop's step polls the socket only after it woke
    /// (`ReadWake`), so what it must never do is miss a frame: one that
    /// arrived while pushes were queued, one that arrives while it waits,
    /// and the second of two that arrived together (one wake for both).
    #[tokio::test]
    async fn the_step_reads_every_frame_and_puts_the_queue_first() {
        let (mut stream, mut client, handle, queue) = pair().await;
        let reads = ReadWake::new();

        // A frame and two pushes waiting: the pushes first, then the frame.
        client.send(Message::Binary(vec![1].into())).await.unwrap();
        assert!(handle.push(reply(10)));
        assert!(handle.push(reply(11)));
        assert_eq!(reply_id(step(&queue, &reads, &mut stream).await), 10);
        assert_eq!(reply_id(step(&queue, &reads, &mut stream).await), 11);
        assert_eq!(frame(step(&queue, &reads, &mut stream).await), vec![1]);

        // Nothing anywhere: the step waits, and does not return by itself.
        let idle = tokio::time::timeout(
            Duration::from_millis(50),
            poll_fn(|cx| poll_step(&queue, cx, &reads, &mut stream)),
        )
        .await;
        assert!(idle.is_err(), "the step returned with nothing to do");

        // A push wakes it; the socket, which did not wake, is not read.
        assert!(handle.push(reply(12)));
        assert_eq!(reply_id(step(&queue, &reads, &mut stream).await), 12);

        // A frame while it waits wakes it (the wait registered the waker).
        let waiter = async { frame(step(&queue, &reads, &mut stream).await) };
        let sender = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.send(Message::Binary(vec![2].into())).await.unwrap();
        };
        let (got, ()) = tokio::join!(waiter, sender);
        assert_eq!(got, vec![2]);

        // Two frames in one write (one wake): both come out.
        client.feed(Message::Binary(vec![3].into())).await.unwrap();
        client.feed(Message::Binary(vec![4].into())).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(frame(step(&queue, &reads, &mut stream).await), vec![3]);
        assert_eq!(frame(step(&queue, &reads, &mut stream).await), vec![4]);

        // The client goes away: the step says so.
        drop(client);
        match step(&queue, &reads, &mut stream).await {
            Step::Frame(None) | Step::Frame(Some(Err(_))) => {}
            Step::Frame(Some(Ok(m))) => panic!("expected the end, got {m:?}"),
            Step::Event(e) => panic!("expected the end, got {e:?}"),
        }
    }

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
