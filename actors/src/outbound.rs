//! The way out to a client: a bounded queue per connection, shared pushes
//! encoded once, and reply handles that always answer.
//!
//! Producers (session, group and relay actors) never block on a client: they
//! `try_send` into the connection's bounded queue. A full queue means the
//! client does not read fast enough; the connection is then cut off with
//! close code [`CLOSE_SLOW_CONSUMER`] (the client reconnects and pulls
//! history), so memory per connection stays bounded.
//!
//! The consumer is the connection task in `node`, which owns the socket,
//! encodes replies, and writes queued frames in batches.
//!
//! The queue is a `VecDeque` behind a mutex rather than a tokio channel:
//! an empty `VecDeque` owns no buffer, so an idle connection pays nothing
//! for its queue, where a tokio channel allocates its first 32-slot block
//! and a cache-padded header (~1.3 KB) up front. That matters at one queue
//! per connection (issue 5's memory budget per idle connection).
//!
//! The connection task waits for "a frame or a close request" on one
//! [`AtomicWaker`] ([`OutboundQueue::poll_event`]): a fan-out wakes every
//! recipient's task once per push, and two `Notify`s (one per kind of
//! event) cost each wake-up two waiter-list registrations and removals
//! under their mutexes (docs/benchmarks.md, round 8).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use proto::Encoding;
use proto::v1::{ServerFrame, server_frame};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::error::{ChatError, ChatResult};

/// Close code: the client's outbound queue filled up.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code: the node is going away (shutdown or drain).
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// One item of a connection's outbound queue.
#[derive(Debug)]
pub enum Outbound {
    /// The reply to request `id`, encoded by the connection in the
    /// request's encoding; errors are mapped to error frames there.
    Reply {
        /// The request's id.
        id: u64,
        /// The request's encoding, which the reply uses.
        encoding: Encoding,
        /// What to answer (boxed: queue slots stay small).
        result: Box<ChatResult<server_frame::Kind>>,
    },
    /// A push shared by every recipient.
    Push(Arc<SharedPush>),
    /// Pushes of one commit, in order, shared by every recipient: one queue
    /// slot however many messages a batch holds.
    Batch(Arc<[Arc<SharedPush>]>),
}

/// A push frame shared by many connections, encoded at most once per encoding.
#[derive(Debug)]
pub struct SharedPush {
    frame: ServerFrame,
    json: OnceLock<Bytes>,
    binary: OnceLock<Bytes>,
}

impl SharedPush {
    /// A push of `kind`.
    pub fn new(kind: server_frame::Kind) -> Arc<Self> {
        Arc::new(SharedPush {
            frame: proto::codec::push(kind),
            json: OnceLock::new(),
            binary: OnceLock::new(),
        })
    }

    /// The frame.
    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The JSON encoding (UTF-8), computed on first use.
    pub fn json(&self) -> &Bytes {
        self.json
            .get_or_init(|| Bytes::from(proto::codec::encode_json(&self.frame)))
    }

    /// The protobuf encoding, computed on first use.
    pub fn binary(&self) -> &Bytes {
        self.binary
            .get_or_init(|| Bytes::from(proto::codec::encode_binary(&self.frame)))
    }
}

/// A drained queue whose buffer grew past this many slots (a burst) gives
/// the buffer back; smaller ones keep it for the next pushes.
const SHRINK_ABOVE_SLOTS: usize = 256;

/// One connection's queue and kill switch, shared by its producers and
/// its connection task.
///
/// Invariants: `items` never holds more than `capacity` items; once
/// `consumer_gone` is set nothing is queued any more and `items` is empty;
/// `code` changes at most once, from 0; every change of `items` or `code`
/// by a producer is followed by a wake of `waiter`.
#[derive(Debug)]
struct Shared {
    /// Queued frames, oldest first.
    items: Mutex<VecDeque<Outbound>>,
    /// Most frames queued at once.
    capacity: usize,
    /// The connection task, while it waits for a frame or a close request
    /// (one waiting task at a time: the queue has one consumer).
    waiter: AtomicWaker,
    /// The connection task dropped its side.
    consumer_gone: AtomicBool,
    /// 0 while the connection may live; otherwise the close code to use.
    code: AtomicU16,
}

impl Shared {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Outbound>> {
        // No code panics while holding the lock (push_back/pop_front and
        // shrinking), so a poisoned lock still guards a consistent queue.
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The producers' side of a connection: cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
}

/// The connection task's side (one per connection). The connection also
/// holds a [`SessionHandle`], so the queue does not end by itself: the
/// connection ends through its socket or its kill switch.
#[derive(Debug)]
pub struct OutboundQueue {
    shared: Arc<Shared>,
}

impl SessionHandle {
    /// A new connection queue holding at most `capacity` frames.
    pub fn channel(capacity: usize) -> (SessionHandle, OutboundQueue) {
        let shared = Arc::new(Shared {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            waiter: AtomicWaker::new(),
            consumer_gone: AtomicBool::new(false),
            code: AtomicU16::new(0),
        });
        (
            SessionHandle {
                shared: shared.clone(),
            },
            OutboundQueue { shared },
        )
    }

    /// Queues a frame without waiting. A full queue cuts the connection off
    /// as a slow consumer. Returns whether the frame was queued.
    pub fn push(&self, item: Outbound) -> bool {
        let shared = &*self.shared;
        {
            let mut items = shared.items();
            if shared.consumer_gone.load(Ordering::Acquire) {
                return false;
            }
            if items.len() >= shared.capacity {
                drop(items);
                self.close(CLOSE_SLOW_CONSUMER);
                return false;
            }
            items.push_back(item);
        }
        // A consumer not waiting now sees the frame when it next looks
        // (it registers, then looks again: see `OutboundQueue::poll_until`).
        shared.waiter.wake();
        true
    }

    /// Asks the connection to close with `code` (the first code asked wins).
    pub fn close(&self, code: u16) {
        if self
            .shared
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.shared.waiter.wake();
        }
    }

    /// Whether the connection is gone or closing.
    pub fn is_closed(&self) -> bool {
        self.shared.consumer_gone.load(Ordering::Acquire)
            || self.shared.code.load(Ordering::Acquire) != 0
    }
}

/// What the connection task waits for ([`OutboundQueue::poll_event`]).
#[derive(Debug)]
pub enum Event {
    /// A producer asked to close with this code (reported before any
    /// queued frame: the connection decides what to let out first).
    Close(u16),
    /// The oldest queued frame.
    Item(Outbound),
}

impl OutboundQueue {
    /// Waits until `check` finds something. Registers the task's waker
    /// before looking a second time, so a push or close that lands between
    /// the two looks wakes it (producers change state, then wake).
    fn poll_until<T>(&self, cx: &mut Context<'_>, check: impl Fn(&Self) -> Option<T>) -> Poll<T> {
        if let Some(v) = check(self) {
            return Poll::Ready(v);
        }
        self.shared.waiter.register(cx.waker());
        match check(self) {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }

    fn close_code(&self) -> Option<u16> {
        match self.shared.code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// A close request if there is one, else the oldest queued frame;
    /// `Pending` (with the task's waker registered) until either comes.
    /// One task waits on a queue at a time. A poll, not a future: the
    /// connection task polls its queue and its socket in one hand-written
    /// step (`node/src/ws.rs`).
    pub fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Event> {
        self.poll_until(cx, |q| {
            q.close_code()
                .map(Event::Close)
                .or_else(|| q.try_recv().map(Event::Item))
        })
    }

    /// The oldest queued frame, if any.
    pub fn try_recv(&self) -> Option<Outbound> {
        let mut items = self.shared.items();
        let item = items.pop_front();
        if items.is_empty() && items.capacity() > SHRINK_ABOVE_SLOTS {
            items.shrink_to_fit();
        }
        item
    }

    /// Resolves with the close code once a producer asked to close.
    pub async fn closed(&self) -> u16 {
        std::future::poll_fn(|cx| self.poll_until(cx, Self::close_code)).await
    }
}

impl Drop for OutboundQueue {
    fn drop(&mut self) {
        // Under the lock, so no push lands after the queue is emptied.
        let mut items = self.shared.items();
        self.shared.consumer_gone.store(true, Ordering::Release);
        *items = VecDeque::new();
    }
}

/// Sends replies to requests that came from another node (implemented by
/// the router, which knows the cluster transport).
pub trait RemoteReplier: Send + Sync + 'static {
    /// Delivers `result` for the origin node's pending request `token`.
    fn remote_reply(&self, node: &str, token: u64, result: ChatResult<server_frame::Kind>);
}

enum ReplyTarget {
    /// A connection on this node; the permit is its in-flight slot.
    Local {
        session: SessionHandle,
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// A pending request on another node.
    Remote {
        replier: Arc<dyn RemoteReplier>,
        node: String,
        token: u64,
    },
    /// An internal caller on this node awaiting the answer.
    Oneshot(Option<oneshot::Sender<ChatResult<server_frame::Kind>>>),
}

/// The handle a request's reply goes through. It always answers: dropped
/// unanswered (an actor stopped with the request in its mailbox), it replies
/// `UNAVAILABLE` so the client can retry instead of waiting forever.
pub struct ReplyTo {
    id: u64,
    encoding: Encoding,
    target: ReplyTarget,
    answered: bool,
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.target {
            ReplyTarget::Local { .. } => "local".to_string(),
            ReplyTarget::Remote { node, token, .. } => format!("{node}#{token}"),
            ReplyTarget::Oneshot(_) => "internal".to_string(),
        };
        write!(f, "ReplyTo({} -> {target})", self.id)
    }
}

impl ReplyTo {
    /// A reply handle for request `id` (which arrived in `encoding`) on
    /// `session`, holding the connection's in-flight `permit` until answered.
    pub fn new(
        id: u64,
        encoding: Encoding,
        session: SessionHandle,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        ReplyTo {
            id,
            encoding,
            target: ReplyTarget::Local {
                session,
                _permit: permit,
            },
            answered: false,
        }
    }

    /// A reply handle for a request of another node.
    pub fn remote(
        replier: Arc<dyn RemoteReplier>,
        node: String,
        token: u64,
        encoding: Encoding,
    ) -> Self {
        ReplyTo {
            id: 0,
            encoding,
            target: ReplyTarget::Remote {
                replier,
                node,
                token,
            },
            answered: false,
        }
    }

    /// A reply handle for an internal caller, and the receiver of its answer.
    pub fn oneshot() -> (Self, oneshot::Receiver<ChatResult<server_frame::Kind>>) {
        let (tx, rx) = oneshot::channel();
        let r = ReplyTo {
            id: 0,
            encoding: Encoding::Binary,
            target: ReplyTarget::Oneshot(Some(tx)),
            answered: false,
        };
        (r, rx)
    }

    /// The request id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The request's encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn deliver(&mut self, result: ChatResult<server_frame::Kind>) {
        self.answered = true;
        match &mut self.target {
            ReplyTarget::Local { session, .. } => {
                session.push(Outbound::Reply {
                    id: self.id,
                    encoding: self.encoding,
                    result: Box::new(result),
                });
            }
            ReplyTarget::Remote {
                replier,
                node,
                token,
            } => replier.remote_reply(node, *token, result),
            ReplyTarget::Oneshot(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(result);
                }
            }
        }
    }

    /// Sends the reply.
    pub fn send(mut self, result: ChatResult<server_frame::Kind>) {
        self.deliver(result);
    }

    /// Replies `ok`.
    pub fn ok(self) {
        self.send(Ok(server_frame::Kind::Ok(proto::v1::Ok {})))
    }

    /// Replies with an error.
    pub fn fail(self, e: ChatError) {
        self.send(Err(e))
    }

    /// Consumes the handle without a reply, for requests that have none on
    /// the wire (`typing`; its origin keeps no pending entry); the in-flight
    /// permit is released.
    pub fn silent(mut self) {
        self.answered = true;
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if !self.answered {
            self.deliver(Err(ChatError::Unavailable(
                "request interrupted; retry it".into(),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_of(o: Outbound) -> (u64, ChatResult<server_frame::Kind>) {
        match o {
            Outbound::Reply { id, result, .. } => (id, *result),
            Outbound::Push(_) | Outbound::Batch(_) => panic!("expected a reply"),
        }
    }

    /// Waits for the queue's next event, as the connection task does.
    async fn next_event(q: &OutboundQueue) -> Event {
        std::future::poll_fn(|cx| q.poll_event(cx)).await
    }

    /// The frame `next_event` returned (these tests ask no close first).
    fn item(e: Event) -> Outbound {
        match e {
            Event::Item(o) => o,
            Event::Close(code) => panic!("expected a frame, got close {code}"),
        }
    }

    #[tokio::test]
    async fn dropped_reply_answers_unavailable() {
        let (h, q) = SessionHandle::channel(4);
        drop(ReplyTo::new(7, Encoding::Json, h.clone(), None));
        let (id, r) = reply_of(item(next_event(&q).await));
        assert_eq!(id, 7);
        assert!(matches!(r, Err(ChatError::Unavailable(_))));
        ReplyTo::new(8, Encoding::Json, h, None).ok();
        let (id, r) = reply_of(item(next_event(&q).await));
        assert_eq!(id, 8);
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn full_queue_closes_as_slow_consumer() {
        let (h, q) = SessionHandle::channel(2);
        let p = SharedPush::new(server_frame::Kind::Ok(proto::v1::Ok {}));
        assert!(h.push(Outbound::Push(p.clone())));
        assert!(h.push(Outbound::Push(p.clone())));
        assert!(!h.is_closed());
        assert!(!h.push(Outbound::Push(p.clone())));
        assert!(h.is_closed());
        assert_eq!(q.closed().await, CLOSE_SLOW_CONSUMER);
        // The first code wins.
        h.close(CLOSE_GOING_AWAY);
        assert_eq!(q.closed().await, CLOSE_SLOW_CONSUMER);
    }

    fn ok_push() -> Outbound {
        Outbound::Push(SharedPush::new(server_frame::Kind::Ok(proto::v1::Ok {})))
    }

    /// A task waiting on `q` through `wait`, already parked in it.
    async fn waiting<T, F>(
        q: &Arc<OutboundQueue>,
        wait: impl FnOnce(Arc<OutboundQueue>) -> F,
    ) -> tokio::task::JoinHandle<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let task = tokio::spawn(wait(q.clone()));
        tokio::task::yield_now().await;
        task
    }

    /// What the waiting `task` got, once something woke it (at most 5 s).
    async fn woken<T>(task: tokio::task::JoinHandle<T>, by: &str) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("{by} did not wake the waiter"))
            .expect("waiter task")
    }

    #[tokio::test]
    async fn next_event_waits_for_a_push_and_keeps_order() {
        let (h, q) = SessionHandle::channel(8);
        let q = Arc::new(q);
        let waiter = waiting(&q, |q| async move { item(next_event(&q).await) }).await;
        ReplyTo::new(1, Encoding::Binary, h.clone(), None).ok();
        ReplyTo::new(2, Encoding::Binary, h.clone(), None).ok();
        let first = woken(waiter, "a reply").await;
        assert_eq!(reply_of(first).0, 1);
        assert_eq!(reply_of(q.try_recv().expect("second")).0, 2);
        assert!(q.try_recv().is_none());
    }

    #[tokio::test]
    async fn next_event_wakes_on_a_close_and_puts_it_before_queued_frames() {
        let (h, q) = SessionHandle::channel(8);
        let q = Arc::new(q);
        // A waiting task is woken by a push...
        let waiter = waiting(&q, |q| async move { next_event(&q).await }).await;
        assert!(h.push(ok_push()));
        let first = woken(waiter, "a push").await;
        assert!(matches!(first, Event::Item(Outbound::Push(_))));
        // ...and by a close request alone.
        let waiter = waiting(&q, |q| async move { next_event(&q).await }).await;
        h.close(CLOSE_GOING_AWAY);
        let closed = woken(waiter, "a close").await;
        assert!(matches!(closed, Event::Close(CLOSE_GOING_AWAY)));
        // A close comes first even with frames queued, which stay queued
        // for the connection to let out.
        let (h, q) = SessionHandle::channel(8);
        assert!(h.push(ok_push()));
        h.close(CLOSE_GOING_AWAY);
        assert!(matches!(
            next_event(&q).await,
            Event::Close(CLOSE_GOING_AWAY)
        ));
        assert!(q.try_recv().is_some());
    }

    #[test]
    fn nothing_is_queued_once_the_connection_is_gone() {
        let (h, q) = SessionHandle::channel(8);
        assert!(h.push(ok_push()));
        assert!(!h.is_closed());
        drop(q);
        assert!(h.is_closed());
        assert!(!h.push(ok_push()));
        assert!(h.shared.items().is_empty());
    }

    #[test]
    fn an_idle_queue_owns_no_buffer_and_a_drained_burst_gives_it_back() {
        let (h, q) = SessionHandle::channel(10_000);
        assert_eq!(h.shared.items().capacity(), 0);
        for _ in 0..1_000 {
            assert!(h.push(ok_push()));
        }
        assert!(h.shared.items().capacity() >= 1_000);
        let mut n = 0;
        while q.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 1_000);
        assert!(h.shared.items().capacity() <= SHRINK_ABOVE_SLOTS);
        // A small queue keeps its buffer for the next pushes.
        assert!(h.push(ok_push()));
        assert!(q.try_recv().is_some());
        assert!(h.shared.items().capacity() > 0);
    }

    #[test]
    fn shared_push_encodes_once_per_encoding() {
        let p = SharedPush::new(server_frame::Kind::Ok(proto::v1::Ok {}));
        let a = p.json().clone();
        assert_eq!(a.as_ptr(), p.json().as_ptr());
        assert!(std::str::from_utf8(&a).is_ok());
        assert!(!p.binary().is_empty() || p.frame().kind.is_some());
    }
}
