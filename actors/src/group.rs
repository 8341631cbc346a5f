//! The group actor: the single writer of one group.
//!
//! One per active group, started on demand by the node's host (see
//! [`crate::host`]) and stopped when idle. It loads the group from storage
//! (taking a new epoch, which fences any previous owner), validates every
//! request against its member cache, assigns sequence numbers, commits
//! batches (group commit: everything that arrives while a commit is in flight
//! goes into the next transaction; up to [`MAX_COMMITS_IN_FLIGHT`] batches
//! are in storage at once), acknowledges only after the commit, then fans
//! out through the node relays. It also keeps every member's
//! delivered/read pointers and writes them in batches.
//!
//! Supervised by the host. If it dies, the host forgets it and the next
//! request starts a fresh one from storage; requests that were in its mailbox
//! are answered `UNAVAILABLE` by their [`ReplyTo`] handles, and a retried
//! `send` is deduplicated by its `clientMsgId`.
//!
//! Dedupe records trail the log: a send's record is written with a later
//! batch, about [`DEDUPE_FLUSH`] records at a time, and the group's
//! watermark (`Model::dedupe_indexed`) says up to which seq they are all
//! written. The sends after it are in the log itself (with their sender and
//! `clientMsgId`): loading reads that tail into memory, so a retry is
//! answered from memory, or found by the commit in the written records. A
//! batch then dirties its log and head pages, not one dedupe page per
//! sender as well (1,000-group durable appends: docs/benchmarks.md, round 10).
//!
//! What it must not do: block (storage runs on the store's lanes and reports
//! back with [`GroupMessage::Committed`]), reply before a commit, or keep
//! running after a commit failed (its view may be stale: it stops and the
//! next request reloads).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use prost::Message as _;
use proto::v1::{self, server_frame::Kind};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::model::{DedupeRecord, GroupMeta, LogQuery, MemberRecord, role};
use tracing::{debug, info, warn};

use crate::committer::{GroupJob, GroupReply, InOrder};
use crate::error::{ChatError, ChatResult};
use crate::ids::{GroupId, UserId};
use crate::outbound::{ReplyTo, SharedPush};
use crate::relay::RelayMessage;
use crate::router::Router;

mod plan;
mod receipts;
mod sends;
pub use plan::GroupOp;
use plan::{Batch, Effect, Waiter};
pub use plan::{SendRecord, Writes};
use receipts::Receipts;
use sends::{SendHash, Sends};

/// Messages of a group actor.
#[derive(Debug)]
pub enum GroupMessage {
    /// A client request from `user`, answered through `reply`.
    Request {
        /// Who asks (authenticated at the session).
        user: UserId,
        /// What they ask.
        op: GroupOp,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// The commit with this id, started by this actor, finished. Results
    /// may arrive out of order; they are applied in commit order.
    Committed(u64, Result<CommitOutcome, CommitFailure>),
    /// Timer: write dirty pointers now.
    FlushTick,
    /// Timer: stop if idle.
    IdleTick,
    /// Timer: push coalesced receipts.
    ReceiptsTick,
    /// The host dropped this actor from its registry: flush and stop. Sent
    /// through the mailbox, so every request queued before it is served.
    Retire,
}

impl ractor::Message for GroupMessage {}

/// What a successful commit transaction reports.
#[derive(Debug)]
pub enum CommitOutcome {
    /// Everything in the batch was written.
    Written,
    /// Some sends were already committed earlier (retries after this actor
    /// started); nothing was written. Their `(user, clientMsgId)` and outcome.
    Duplicates(Vec<SendRecord>),
}

/// Why a commit failed.
#[derive(Debug)]
pub enum CommitFailure {
    /// Another owner took a newer epoch: this actor must stop.
    Fenced,
    /// The stored group does not match this actor's view.
    Stale(String),
    /// Storage failed (timeout, engine error).
    Storage(ChatError),
}

/// Most commits of one group in storage at once. While one batch is in
/// the node's commit stage the next is planned and queued behind it, so the
/// writer finds it there when its transaction ends instead of waiting for
/// this actor to apply, answer and plan (one group's durable appends went
/// from latency-bound to writer-bound; docs/benchmarks.md, round 5). A batch
/// is planned behind others only when none of them changes the membership,
/// and it stops before any membership change itself: the member cache it is
/// validated against is then exactly the one it commits under.
pub const MAX_COMMITS_IN_FLIGHT: usize = 2;

/// Committed sends without a dedupe record after which a batch writes
/// theirs (and moves the watermark).
pub const DEDUPE_FLUSH: usize = 128;

/// Sends in one batch from which it writes their dedupe records itself.
/// Checking a send that will be recorded later costs a read now and a
/// write later, where recording it now costs one insert (which finds a
/// retry too); the deferral pays only for small batches, whose records
/// would each dirty a page of their own (one-group durable appends, ~550
/// sends a batch, every batch deferring: 130, 129k/s against 145, 145k/s
/// before; docs/benchmarks.md, round 10).
pub const DEDUPE_DIRECT: usize = 64;

/// Seqs past the dedupe watermark after which a batch moves it even with
/// fewer than [`DEDUPE_FLUSH`] sends to record (membership changes and
/// announcements take seqs too). With the batches in flight, this bounds
/// the log tail that loading reads: at most about `DEDUPE_LAG +
/// MAX_COMMITS_IN_FLIGHT × MAX_SENDS_PER_BATCH` entries.
pub const DEDUPE_LAG: u64 = 512;

/// Fewest waiting requests for which a batch is planned behind another (and
/// at least half as many as the batch ahead of it). A smaller batch would
/// cost the commit stage its per-batch checks and writes for little: when
/// many quiet groups share the stage, it is busy anyway, and splitting
/// their batches only made it slower (1,000 groups, consecutive runs:
/// 18.2-18.7k/s with a minimum of one request, 22.5-24.8k/s with this one).
pub const PIPELINE_MIN_REQUESTS: usize = 64;

/// Arguments of a group actor.
pub struct GroupArgs {
    /// The group.
    pub id: GroupId,
    /// Routing, storage and configuration of this node.
    pub router: Router,
}

/// A member as the group actor keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// [`role::MEMBER`] or [`role::ADMIN`].
    pub role: i32,
    /// Seq of the system message that added the member.
    pub joined_at_seq: u64,
    /// When they joined (ms).
    pub joined_at_ms: u64,
    /// Highest seq delivered to one of their devices.
    pub delivered: u64,
    /// Highest seq they read.
    pub read: u64,
}

impl Member {
    fn record(&self) -> MemberRecord {
        MemberRecord {
            role: self.role,
            joined_at_seq: self.joined_at_seq,
            delivered_seq: self.delivered,
            read_seq: self.read,
            joined_at_ms: self.joined_at_ms,
        }
    }
    fn from_record(r: &MemberRecord) -> Self {
        Member {
            role: r.role,
            joined_at_seq: r.joined_at_seq,
            joined_at_ms: r.joined_at_ms,
            delivered: r.delivered_seq,
            read: r.read_seq,
        }
    }
    fn is_admin(&self) -> bool {
        self.role == role::ADMIN
    }
}

/// The group actor's state.
///
/// Invariants:
/// - `meta`, `head` and `members` equal what storage holds for the group
///   after the last successful commit of this actor (this actor is the only
///   writer while `epoch` is the stored epoch); `meta` is `None` only while
///   the group does not exist (then `epoch` is 0).
/// - At most [`MAX_COMMITS_IN_FLIGHT`] commits are in flight (`in_flight`,
///   in commit order, each based on the head the one before it leaves);
///   every one but the last is plain (`InFlight::plain`); `pending`
///   holds requests not yet planned, in arrival order.
/// - An `abandoned` flight holds no waiters (they went back to `pending`)
///   and cannot commit (the batch before it was not written, so its base
///   head never appears); nothing new is planned until it has reported.
/// - Every pointer in `members` is ≤ `head`, and never decreases.
/// - `dirty` ⊆ keys of `members`: members whose pointers changed since the
///   last pointer write; `pointer_waiters` are answered when they are written.
/// - Every send committed with a seq ≤ the stored dedupe watermark (kept
///   by `sends`: `Sends::watermark`) has its dedupe record in storage;
///   every committed send without one is in `sends`' unindexed list (all
///   after the watermark, up to `head`). That list may hold some that have
///   one too: the log tail read at loading does not tell them apart, and
///   rewriting a record is harmless. At most one commit in flight moves
///   the watermark.
pub struct GroupState {
    id: GroupId,
    router: Router,
    epoch: u64,
    meta: Option<GroupMeta>,
    head: u64,
    members: HashMap<UserId, Member>,
    pending: VecDeque<Waiter>,
    in_flight: VecDeque<InFlight>,
    /// Id of the next commit.
    next_flight: u64,
    /// Keeps this group's commits in plan order into the commit stage,
    /// also while the stage's queue is full.
    line: InOrder,
    dirty: HashSet<UserId>,
    pointer_waiters: Vec<ReplyTo>,
    flush_scheduled: bool,
    /// The sends waiting in `pending` or `in_flight` (a superset), the
    /// recent ones, and the committed sends after the stored dedupe
    /// watermark (which it keeps) whose records may still be missing (its
    /// `unindexed`).
    sends: Sends,
    /// Last forwarded typing indicator per user.
    typing: HashMap<UserId, Instant>,
    /// Pointer counts and pending receipt pushes; describes exactly the
    /// pointers in `members`.
    receipts: Receipts,
    receipts_scheduled: bool,
    last_activity: Instant,
    retiring: bool,
}

impl InFlight {
    /// Changes no membership: another batch may be planned behind it.
    fn plain(&self) -> bool {
        self.writes.create.is_none()
            && self
                .batch
                .effects
                .iter()
                .all(|e| matches!(e, Effect::SenderRead(..)))
    }
}

/// A commit in flight: what to do once it lands.
struct InFlight {
    id: u64,
    /// Its result, once reported, while an earlier commit has not reported.
    result: Option<Result<CommitOutcome, CommitFailure>>,
    /// The batch before it was not written; its waiters were requeued.
    abandoned: bool,
    writes: Arc<Writes>,
    batch: Batch,
    waiters: Vec<Waiter>,
    pointer_waiters: Vec<ReplyTo>,
    /// Members whose pointers this commit writes (dirty again if it is redone).
    flushed: HashSet<UserId>,
    /// Senders whose pointers this commit moves to their messages.
    sender_pointers: HashSet<UserId>,
}

/// The group actor.
pub struct Group;

impl Actor for Group {
    type Msg = GroupMessage;
    type State = GroupState;
    type Arguments = GroupArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: GroupArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Nothing slow here: the host waits for pre_start. Loading happens in
        // post_start, while requests already queue in the mailbox.
        let dedupe_cache = args.router.config().tuning.dedupe_cache;
        Ok(GroupState {
            id: args.id,
            router: args.router,
            epoch: 0,
            meta: None,
            head: 0,
            members: HashMap::new(),
            pending: VecDeque::new(),
            in_flight: VecDeque::new(),
            next_flight: 0,
            line: InOrder::default(),
            dirty: HashSet::new(),
            pointer_waiters: Vec::new(),
            flush_scheduled: false,
            sends: Sends::new(dedupe_cache),
            typing: HashMap::new(),
            receipts: Receipts::default(),
            receipts_scheduled: false,
            last_activity: Instant::now(),
            retiring: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let gid = state.id.to_string();
        // Load and fence in one transaction: a new epoch, then the state. A
        // group that does not exist takes no epoch (its creation does).
        let loaded = state
            .router
            .store()
            .write(move |t, m| {
                let Some(meta) = m.meta(t, &gid)? else {
                    return Ok(None);
                };
                let epoch = m.claim_epoch(t, &gid)?;
                let head = m.head(t, &gid)?;
                let members = m.members(t, &gid)?;
                // The sends whose dedupe records are not written yet. A group
                // written before the watermark existed has all its records:
                // it gets one now, before its sends start to defer theirs.
                let indexed = match m.dedupe_indexed(t, &gid)? {
                    Some(indexed) => indexed.min(head),
                    None => {
                        m.set_dedupe_indexed(t, &gid, head)?;
                        head
                    }
                };
                // One read of the log's end: the tail past the watermark, and
                // the recent messages, whose senders get receipts.
                let unindexed = usize::try_from(head - indexed).unwrap_or(usize::MAX);
                let limit = unindexed.max(receipts::RECENT);
                let end = m.log_page(t, &gid, LogQuery::Latest, limit)?;
                Ok(Some((meta, epoch, head, members, indexed, end.entries)))
            })
            .await
            .map_err(|e| format!("loading group {}: {e}", state.id))?;
        if let Some((meta, epoch, head, members, indexed, end)) = loaded {
            state.sends.set_watermark(indexed);
            let recent_from = end.len().saturating_sub(receipts::RECENT);
            for (i, (seq, body)) in end.into_iter().enumerate() {
                let msg = match v1::Message::decode(&body[..]) {
                    Ok(msg) => msg,
                    Err(e) => {
                        // Unreadable for history too; the group stays usable.
                        warn!(group = %state.id, seq, error = %e, "undecodable log entry");
                        continue;
                    }
                };
                let Some(sender) = UserId::parse(&msg.sender_id) else {
                    continue;
                };
                if i >= recent_from {
                    state.receipts.sent(seq, &sender);
                }
                if seq > indexed && msg.system.is_none() && !msg.client_msg_id.is_empty() {
                    let rec = DedupeRecord {
                        seq,
                        sent_at_ms: msg.sent_at_ms,
                    };
                    state
                        .sends
                        .defer(&(sender, Arc::from(msg.client_msg_id), rec));
                }
            }
            state.members = members
                .iter()
                .filter_map(|(u, r)| Some((UserId::parse(u)?, Member::from_record(r))))
                .collect();
            for m in state.members.values() {
                state.receipts.join(m.delivered, m.read);
            }
            state.meta = Some(meta);
            state.epoch = epoch;
            state.head = head;
        }
        debug!(group = %state.id, epoch = state.epoch, head = state.head, exists = state.exists(), "group loaded");
        let idle = state.router.config().tuning.group_idle;
        myself.send_interval(idle / 2, || GroupMessage::IdleTick);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GroupMessage::Request { user, op, reply } => {
                state.last_activity = Instant::now();
                state.request(&myself, user, op, reply);
                // An actor for a group that does not exist (and is not
                // being created) has nothing to keep: it goes at once.
                if !state.exists()
                    && !state.retiring
                    && state.in_flight.is_empty()
                    && state.pending.is_empty()
                {
                    state.retiring = true;
                    state.router.retire(&state.id, &myself);
                }
            }
            GroupMessage::Committed(id, result) => state.committed(&myself, id, result),
            GroupMessage::ReceiptsTick => {
                state.receipts_scheduled = false;
                state.push_receipts();
            }
            GroupMessage::FlushTick => {
                state.flush_scheduled = false;
                state.maybe_commit(&myself, true);
            }
            GroupMessage::IdleTick => {
                let idle = state.router.config().tuning.group_idle;
                if !state.retiring
                    && state.last_activity.elapsed() >= idle
                    && state.in_flight.is_empty()
                    && state.pending.is_empty()
                    && state.dirty.is_empty()
                {
                    state.retiring = true;
                    state.router.retire(&state.id, &myself);
                }
            }
            GroupMessage::Retire => {
                state.retiring = true;
                if state.in_flight.is_empty() && state.pending.is_empty() && state.dirty.is_empty()
                {
                    myself.stop(Some("retired".into()));
                } else {
                    // Finish the work in hand; `committed` stops us after.
                    state.maybe_commit(&myself, true);
                }
            }
        }
        Ok(())
    }
}

impl GroupState {
    fn exists(&self) -> bool {
        self.meta.is_some()
    }

    fn request(
        &mut self,
        myself: &ActorRef<GroupMessage>,
        user: UserId,
        op: GroupOp,
        reply: ReplyTo,
    ) {
        // Requests that need no commit are answered here and now.
        match op {
            GroupOp::Create { .. } => {}
            _ if !self.exists() => {
                return reply.fail(ChatError::NotFound(format!("group {}", self.id)));
            }
            GroupOp::MarkDelivered(seq) => return self.mark(myself, &user, seq, false, reply),
            GroupOp::MarkRead(seq) => return self.mark(myself, &user, seq, true, reply),
            GroupOp::Typing => return self.typing(&user, reply),
            GroupOp::Readers(seq) => return self.readers(&user, seq, reply),
            GroupOp::Send(ref s) => {
                // A retry of a recent send is answered from memory; one of a
                // send still waiting is attached to it.
                let hash = self.sends.hash(&user, &s.client_msg_id);
                if let Some(rec) = self.sends.committed(hash, &user, &s.client_msg_id) {
                    return reply.send(Ok(sent(&self.id, &s.client_msg_id, rec)));
                }
                if let Some(w) = self.pending_send(hash, &user, &s.client_msg_id) {
                    w.extra.push(reply);
                    return;
                }
                self.note_waiting_send(hash);
            }
            _ => {}
        }
        self.pending.push_back(Waiter::new(user, op, reply));
        self.maybe_commit(myself, false);
    }

    /// The waiting send of `user` with `cmid`, if any. The set of waiting
    /// sends answers the common case (no such send) in O(1).
    fn pending_send(&mut self, hash: SendHash, user: &UserId, cmid: &str) -> Option<&mut Waiter> {
        if !self.sends.may_wait(hash) {
            return None;
        }
        let in_flight = self.in_flight.iter_mut().flat_map(|f| f.waiters.iter_mut());
        self.pending.iter_mut().chain(in_flight).find(|w| {
            w.user == *user && matches!(&w.op, GroupOp::Send(s) if s.client_msg_id == cmid)
        })
    }

    /// Records a waiting send, about to be queued. Answered sends are not
    /// removed one by one: the set is rebuilt from the queued waiters when
    /// it outgrows them, before this send is added (it is not queued yet,
    /// so a rebuild after would leave it out, and a retry of it would be
    /// planned as a second send).
    fn note_waiting_send(&mut self, hash: SendHash) {
        let live = self.pending.len()
            + self
                .in_flight
                .iter()
                .map(|f| f.waiters.len())
                .sum::<usize>();
        if self.sends.waiting_len() > 2 * live + 1_024 {
            let in_flight = self.in_flight.iter().flat_map(|f| f.waiters.iter());
            let live = self
                .pending
                .iter()
                .chain(in_flight)
                .filter_map(|w| match &w.op {
                    GroupOp::Send(s) => Some((&w.user, s.client_msg_id.as_str())),
                    _ => None,
                });
            self.sends.reset_waiting(live);
        }
        self.sends.wait(hash);
    }

    fn member(&self, user: &UserId) -> ChatResult<&Member> {
        self.members
            .get(user)
            .ok_or_else(|| ChatError::Forbidden(format!("{user} is not a member of {}", self.id)))
    }

    fn mark(
        &mut self,
        myself: &ActorRef<GroupMessage>,
        user: &UserId,
        seq: u64,
        read: bool,
        reply: ReplyTo,
    ) {
        let head = self.head;
        let m = match self.members.get_mut(user) {
            Some(m) => m,
            None => {
                return reply.fail(ChatError::Forbidden(format!("not a member of {}", self.id)));
            }
        };
        let seq = seq.min(head);
        let old = (m.delivered, m.read);
        let new = (old.0.max(seq), if read { old.1.max(seq) } else { old.1 });
        if new == old {
            // Nothing moves, but a move already made may not be written
            // yet: `ok` must wait for it (ok means durable).
            if self.dirty.contains(user) {
                self.pointer_waiters.push(reply);
            } else if let Some(f) = self.in_flight.iter_mut().rev().find(|f| {
                !f.abandoned && (f.flushed.contains(user) || f.sender_pointers.contains(user))
            }) {
                f.pointer_waiters.push(reply);
            } else {
                reply.ok();
            }
            return;
        }
        (m.delivered, m.read) = new;
        self.receipts.moved(old, new);
        self.dirty.insert(user.clone());
        self.pointer_waiters.push(reply);
        self.schedule_flush(myself);
        self.schedule_receipts(myself);
    }

    /// Makes sure a [`GroupMessage::ReceiptsTick`] comes: receipts are
    /// pushed at most once per `receipts_interval`, however many pointers move.
    fn schedule_receipts(&mut self, myself: &ActorRef<GroupMessage>) {
        if !self.receipts_scheduled && self.receipts.dirty() {
            self.receipts_scheduled = true;
            let delay = self.router.config().tuning.receipts_interval;
            myself.send_after(delay, || GroupMessage::ReceiptsTick);
        }
    }

    /// Describes one seq's receipts.
    fn seq_receipt(&self, seq: u64, detail: bool) -> v1::SeqReceipt {
        let readers = if detail {
            let mut r: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| m.read >= seq)
                .map(|(u, _)| u.to_string())
                .collect();
            r.sort();
            r
        } else {
            Vec::new()
        };
        v1::SeqReceipt {
            seq,
            delivered_to: self.receipts.delivered.at_least(seq),
            read_by: self.receipts.read.at_least(seq),
            readers,
        }
    }

    fn detail(&self) -> bool {
        self.members.len() <= self.router.config().limits.receipts_detail_limit
    }

    /// Pushes the receipts that changed since the last push to the senders
    /// of those messages and to watchers.
    fn push_receipts(&mut self) {
        let Some((seqs, to)) = self.receipts.take_changes(self.head, Instant::now()) else {
            return;
        };
        if to.is_empty() {
            return;
        }
        let detail = self.detail();
        let push = SharedPush::new(Kind::Receipts(v1::Receipts {
            group_id: self.id.to_string(),
            all_read_seq: self.receipts.read.min(),
            all_delivered_seq: self.receipts.delivered.min(),
            seqs: seqs.iter().map(|s| self.seq_receipt(*s, detail)).collect(),
        }));
        self.router.meters().receipt_pushes.increment(1);
        self.router
            .broadcast(RelayMessage::DeliverTo { users: to, push });
    }

    /// Makes sure a [`GroupMessage::FlushTick`] comes within `pointer_flush`.
    fn schedule_flush(&mut self, myself: &ActorRef<GroupMessage>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            let delay = self.router.config().tuning.pointer_flush;
            myself.send_after(delay, || GroupMessage::FlushTick);
        }
    }

    fn typing(&mut self, user: &UserId, reply: ReplyTo) {
        if let Err(e) = self.member(user) {
            return reply.fail(e);
        }
        let throttle = self.router.config().tuning.typing_throttle;
        let now = Instant::now();
        match self.typing.get(user) {
            Some(last) if now.duration_since(*last) < throttle => {}
            _ => {
                self.typing.insert(user.clone(), now);
                if self.typing.len() > 10_000 {
                    self.typing.retain(|_, t| now.duration_since(*t) < throttle);
                }
                let push = SharedPush::new(Kind::Typing(v1::TypingEvent {
                    group_id: self.id.to_string(),
                    user_id: user.to_string(),
                }));
                self.router.broadcast(RelayMessage::Deliver {
                    group: self.id.clone(),
                    pushes: vec![push],
                    except: Some(user.clone()),
                });
            }
        }
        // Typing has no reply on the wire; the handle is consumed silently.
        reply.silent();
    }

    fn readers(&mut self, user: &UserId, seq: u64, reply: ReplyTo) {
        if let Err(e) = self.member(user) {
            return reply.fail(e);
        }
        if seq == 0 || seq > self.head {
            return reply.fail(ChatError::NotFound(format!("message {seq}")));
        }
        self.receipts.watch(user, Instant::now());
        let r = self.seq_receipt(seq, self.detail());
        reply.send(Ok(Kind::Readers(v1::ReadersReply {
            group_id: self.id.to_string(),
            seq,
            read_by: r.read_by,
            delivered_to: r.delivered_to,
            readers: r.readers,
        })));
    }

    /// Whether another batch may be planned now (see
    /// [`MAX_COMMITS_IN_FLIGHT`]).
    fn can_plan(&self) -> bool {
        let Some(last) = self.in_flight.back() else {
            return true;
        };
        self.in_flight.len() < MAX_COMMITS_IN_FLIGHT
            && self.in_flight.iter().all(|f| f.plain() && !f.abandoned)
            && self.pending.len() >= (last.waiters.len() / 2).max(PIPELINE_MIN_REQUESTS)
    }

    /// The highest `(delivered, read)` pointers the commits in flight write,
    /// by member. Memory catches up with a commit's sender pointers only when
    /// it lands, so a record written behind it must not go below them.
    fn pointers_ahead(&self) -> HashMap<UserId, (u64, u64)> {
        let mut ahead: HashMap<UserId, (u64, u64)> = HashMap::new();
        for (u, r) in self.in_flight.iter().flat_map(|f| f.writes.pointers.iter()) {
            let p = ahead.entry(u.clone()).or_default();
            *p = (p.0.max(r.delivered_seq), p.1.max(r.read_seq));
        }
        ahead
    }

    /// Starts a commit if one may start (see [`Self::can_plan`]) and there
    /// is work: pending requests, or (when `pointers_due`) dirty pointers.
    fn maybe_commit(&mut self, myself: &ActorRef<GroupMessage>, pointers_due: bool) {
        if !self.can_plan() {
            return;
        }
        let behind = !self.in_flight.is_empty();
        let base_head = self.in_flight.back().map_or(self.head, |f| f.writes.head);
        let (mut batch, waiters) = plan::plan(self, base_head, behind);
        let with_pointers =
            !self.dirty.is_empty() && (pointers_due || !batch.is_empty() || self.retiring);
        if batch.is_empty() && !with_pointers {
            // Nothing to write: the planned requests (no-ops) are answered now.
            for mut w in waiters {
                let result = w.result.take().unwrap_or(Ok(Kind::Ok(v1::Ok {})));
                w.answer(result);
            }
            if self.retiring && self.in_flight.is_empty() {
                myself.stop(Some("retired".into()));
            }
            return;
        }
        let mut flushed = HashSet::new();
        let mut pointers: HashMap<UserId, MemberRecord> = HashMap::new();
        let ahead = self.pointers_ahead();
        let record = |u: &UserId, m: &Member| {
            let mut rec = m.record();
            if let Some(&(delivered, read)) = ahead.get(u) {
                rec.delivered_seq = rec.delivered_seq.max(delivered);
                rec.read_seq = rec.read_seq.max(read);
            }
            rec
        };
        let pointer_waiters = if with_pointers {
            for u in std::mem::take(&mut self.dirty) {
                if let Some(m) = self.members.get(&u) {
                    pointers.insert(u.clone(), record(&u, m));
                    flushed.insert(u);
                }
            }
            std::mem::take(&mut self.pointer_waiters)
        } else {
            Vec::new()
        };
        // Senders have read their own messages: written in the same commit.
        let mut sender_pointers = HashSet::new();
        for e in &batch.effects {
            if let Effect::SenderRead(u, seq) = e
                && let Some(m) = self.members.get(u)
            {
                let rec = pointers.entry(u.clone()).or_insert_with(|| {
                    sender_pointers.insert(u.clone());
                    record(u, m)
                });
                rec.read_seq = rec.read_seq.max(*seq);
                rec.delivered_seq = rec.delivered_seq.max(*seq);
            }
        }
        batch.writes.pointers = pointers.into_iter().collect();
        self.index_dedupes(&mut batch.writes);
        let writes = batch.shared_writes();
        let id = self.next_flight;
        self.next_flight += 1;
        // In plan order into the commit stage, which casts the outcome to
        // this actor.
        let job = GroupJob::new(writes.clone(), GroupReply::new(myself.clone(), id));
        self.line.queue(self.router.committer(), job);
        if behind {
            self.router.meters().pipelined.increment(1);
        }
        self.in_flight.push_back(InFlight {
            id,
            result: None,
            abandoned: false,
            writes,
            batch,
            waiters,
            pointer_waiters,
            flushed,
            sender_pointers,
        });
    }

    /// A commit reported. Results are taken in commit order: one that
    /// arrives before an earlier commit's waits in its flight.
    fn committed(
        &mut self,
        myself: &ActorRef<GroupMessage>,
        id: u64,
        result: Result<CommitOutcome, CommitFailure>,
    ) {
        let Some(flight) = self.in_flight.iter_mut().find(|f| f.id == id) else {
            warn!(group = %self.id, id, "commit result without that commit in flight");
            return;
        };
        flight.result = Some(result);
        while let Some(mut flight) = self.in_flight.pop_front_if(|f| f.result.is_some()) {
            let Some(result) = flight.result.take() else {
                continue;
            };
            if flight.abandoned {
                if let Ok(CommitOutcome::Written) = result {
                    // Its base head was never written, so the transaction's
                    // head check cannot pass: our view is not what storage holds.
                    return self.fail_and_stop(
                        myself,
                        flight,
                        CommitFailure::Stale("a batch behind an unwritten one committed".into()),
                    );
                }
                continue;
            }
            match result {
                Ok(CommitOutcome::Written) => self.apply(myself, flight),
                Ok(CommitOutcome::Duplicates(dups)) => self.requeue_after_duplicates(flight, dups),
                Err(failure) => return self.fail_and_stop(myself, flight, failure),
            }
        }
        self.maybe_commit(myself, false);
        if self.retiring
            && self.in_flight.is_empty()
            && self.pending.is_empty()
            && self.dirty.is_empty()
        {
            myself.stop(Some("retired".into()));
        }
    }

    /// Some sends of the batch had been committed before this actor
    /// started: answer them with their original outcome, put the rest back
    /// in front of the queue (nothing was written), to be planned again.
    /// The commits behind it cannot pass their head check: they are
    /// abandoned and their requests go back too, after this batch's.
    fn requeue_after_duplicates(&mut self, flight: InFlight, dups: Vec<SendRecord>) {
        let mut behind = Vec::new();
        for f in self.in_flight.iter_mut() {
            metrics::counter!("chat_group_abandoned_commits_total").increment(1);
            f.abandoned = true;
            self.dirty.extend(f.flushed.drain());
            self.pointer_waiters.append(&mut f.pointer_waiters);
            behind.append(&mut f.waiters);
        }
        for mut w in behind.into_iter().rev() {
            w.result = None;
            self.pending.push_front(w);
        }
        self.dirty.extend(flight.flushed);
        self.pointer_waiters.extend(flight.pointer_waiters);
        for w in flight.waiters.into_iter().rev() {
            let hit = match &w.op {
                GroupOp::Send(s) => dups
                    .iter()
                    .find(|(u, c, _)| *u == w.user && **c == *s.client_msg_id),
                _ => None,
            };
            match hit {
                Some(dup) => {
                    self.sends.remember(dup);
                    let reply = sent(&self.id, &dup.1, &dup.2);
                    w.answer(Ok(reply));
                }
                None => {
                    let mut w = w;
                    w.result = None;
                    self.pending.push_front(w);
                }
            }
        }
    }

    /// A commit failed: answer everyone in it and stop. Our view may be
    /// stale (fenced, or an unknown commit result), so the next request
    /// loads the group afresh; requests still queued are answered
    /// `UNAVAILABLE` as their handles drop.
    fn fail_and_stop(
        &mut self,
        myself: &ActorRef<GroupMessage>,
        flight: InFlight,
        failure: CommitFailure,
    ) {
        let err = match &failure {
            CommitFailure::Fenced => {
                info!(group = %self.id, epoch = self.epoch, "fenced by a newer owner; stopping");
                metrics::counter!("chat_group_fenced_total").increment(1);
                ChatError::Unavailable("group moved; retry".into())
            }
            CommitFailure::Stale(s) => {
                warn!(group = %self.id, reason = %s, "stale group state; stopping");
                ChatError::Unavailable("group reloading; retry".into())
            }
            CommitFailure::Storage(e) => {
                warn!(group = %self.id, error = %e, "commit failed; stopping");
                e.clone()
            }
        };
        // The commits behind this one cannot land either (their base head
        // is not written): everyone in them gets the same answer.
        let behind = std::mem::take(&mut self.in_flight);
        for f in std::iter::once(flight).chain(behind) {
            for w in f.waiters {
                w.answer(Err(err.clone()));
            }
            for r in f.pointer_waiters {
                r.fail(err.clone());
            }
        }
        self.retiring = true;
        self.router.retire(&self.id, myself);
        myself.stop(Some("commit failed".into()));
    }

    /// Applies a committed batch to the state, answers, and fans out.
    fn apply(&mut self, myself: &ActorRef<GroupMessage>, flight: InFlight) {
        let InFlight {
            writes,
            batch,
            waiters,
            pointer_waiters,
            ..
        } = flight;
        for r in pointer_waiters {
            r.ok();
        }
        if let Some(meta) = &writes.create {
            self.meta = Some(meta.clone());
            self.epoch = writes.epoch + 1;
        }
        self.head = writes.head;
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for effect in batch.effects {
            match effect {
                Effect::Added(u, m) => {
                    added.push((u.clone(), m.joined_at_seq));
                    self.receipts.join(m.delivered, m.read);
                    if let Some(old) = self.members.insert(u, m) {
                        self.receipts.leave(old.delivered, old.read);
                    }
                }
                Effect::Role(u, r) => {
                    if let Some(m) = self.members.get_mut(&u) {
                        m.role = r;
                    }
                }
                Effect::Removed(u) => {
                    if let Some(old) = self.members.remove(&u) {
                        self.receipts.leave(old.delivered, old.read);
                    }
                    self.dirty.remove(&u);
                    self.typing.remove(&u);
                    removed.push(u);
                }
                Effect::SenderRead(u, seq) => {
                    // Already written by this commit; memory catches up.
                    self.receipts.sent(seq, &u);
                    if let Some(m) = self.members.get_mut(&u) {
                        let old = (m.delivered, m.read);
                        (m.delivered, m.read) = (old.0.max(seq), old.1.max(seq));
                        self.receipts.moved(old, (m.delivered, m.read));
                    }
                }
            }
        }
        if let Some(meta) = &mut self.meta {
            meta.member_count = self.members.len() as u32;
        }
        if let Some(upto) = writes.indexed {
            self.sends.indexed(&writes.index, upto);
        }
        for send in &writes.sends {
            self.sends.committed_send(send, !writes.record_sends);
        }
        let meters = self.router.meters();
        meters.committed.increment(writes.log.len() as u64);
        meters.commit_batch.record(writes.log.len() as f64);
        // Fan out in seq order: joins before the pushes, leaves after.
        if !added.is_empty() {
            self.router.broadcast(RelayMessage::MembersAdded {
                group: self.id.clone(),
                users: added,
            });
        }
        if !batch.pushes.is_empty() {
            let pushes = batch.pushes.into_iter().map(SharedPush::new).collect();
            self.router.broadcast(RelayMessage::Deliver {
                group: self.id.clone(),
                pushes,
                except: None,
            });
        }
        if !removed.is_empty() {
            self.router.broadcast(RelayMessage::MembersRemoved {
                group: self.id.clone(),
                users: removed,
                seq: writes.head,
            });
        }
        for w in waiters {
            w.answer_planned();
        }
        if !self.dirty.is_empty() {
            self.schedule_flush(myself);
        }
        self.schedule_receipts(myself);
    }

    /// Decides which dedupe records `writes` carries: its own sends' when
    /// they are many ([`DEDUPE_DIRECT`]); those of the committed sends
    /// without one, with the watermark they bring up to the committed head
    /// (or to this batch's, when it records its own and nothing is in
    /// flight), when enough are due ([`DEDUPE_FLUSH`], [`DEDUPE_LAG`]) and
    /// no commit in flight moves the watermark already.
    fn index_dedupes(&self, writes: &mut Writes) {
        writes.record_sends = writes.sends.len() >= DEDUPE_DIRECT;
        let due = writes.record_sends
            || self.sends.unindexed_len() >= DEDUPE_FLUSH
            || self.head - self.sends.watermark() >= DEDUPE_LAG;
        if !due || self.in_flight.iter().any(|f| f.writes.indexed.is_some()) {
            return;
        }
        writes.index = self.sends.unindexed();
        let own = writes.record_sends && self.in_flight.is_empty();
        writes.indexed = Some(if own { writes.head } else { self.head });
    }
}

/// The `sent` reply of a committed send.
fn sent(group: &GroupId, cmid: &str, rec: &DedupeRecord) -> Kind {
    Kind::Sent(v1::Sent {
        group_id: group.to_string(),
        client_msg_id: cmid.to_string(),
        seq: rec.seq,
        sent_at_ms: rec.sent_at_ms,
    })
}

/// Encodes a log entry: the message without its group id and seq, which
/// the entry's key holds (~33 bytes of the ~260 of a 200-byte text
/// message). Smaller entries fill a B-tree leaf more slowly, so a group's
/// appends rebalance less often (1,000-group durable appends +3%,
/// docs/benchmarks.md, round 10). Readers put them back ([`decode_entry`]).
fn encode(msg: &mut v1::Message) -> Vec<u8> {
    let group_id = std::mem::take(&mut msg.group_id);
    let seq = std::mem::take(&mut msg.seq);
    let body = msg.encode_to_vec();
    (msg.group_id, msg.seq) = (group_id, seq);
    body
}

/// Decodes the log entry `seq` of `group` (see [`encode`]; entries
/// written before it carry the same group id and seq themselves).
pub(crate) fn decode_entry(
    group: &GroupId,
    seq: u64,
    body: &[u8],
) -> Result<v1::Message, prost::DecodeError> {
    let mut msg = v1::Message::decode(body)?;
    msg.group_id = group.to_string();
    msg.seq = seq;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_leave_out_what_their_key_holds() {
        let group = GroupId::random();
        let mut msg = v1::Message {
            group_id: group.to_string(),
            seq: 41_000,
            sender_id: "alice".into(),
            text: "hello".into(),
            sent_at_ms: 1_700_000_000_000,
            client_msg_id: "c-1".into(),
            ..Default::default()
        };
        let full = msg.encode_to_vec();
        let body = encode(&mut msg);
        assert_eq!(msg.group_id, group.to_string(), "the message is left whole");
        assert!(body.len() + group.to_string().len() < full.len());
        let back = decode_entry(&group, 41_000, &body).expect("decodes");
        assert_eq!(back, msg);
        // Entries written with both fields decode the same.
        assert_eq!(decode_entry(&group, 41_000, &full).expect("decodes"), msg);
    }
}
