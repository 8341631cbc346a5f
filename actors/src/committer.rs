//! The commit stage: one per node, it writes the planned batches of many
//! group actors, and users' last-seen times, in one storage transaction.
//!
//! Each group actor already batches its own requests (group commit); this
//! stage batches across groups, so a node serving a thousand quiet groups
//! pays one transaction (one fsync with the embedded store) per round
//! instead of one per group. Every batch is checked on its own inside the
//! shared transaction (epoch fence, head, member limit, then no send
//! already recorded as committed): a rejected batch writes nothing (dedupe
//! records it inserted are taken back), and the others commit.
//!
//! Presence actors record a last-seen time each time a user goes offline and
//! wait for it; when many users go offline at once (a node stopping closes
//! all its clients, a peer crashes with its sessions), those writes share
//! the same few transactions instead of one commit (one fsync) each.
//!
//! Its transactions run in **rounds** on the store's write lane. A round
//! takes the jobs queued when it starts, commits them and hands all their
//! answers, in one message, to a task that sends them; while it runs, the
//! stage's task has already queued the next round behind it. So the
//! writer goes from one commit straight into the next transaction. When
//! the stage's task collected each transaction's jobs and answered them
//! itself, the writer waited for it between transactions (a tokio task
//! among busy workers): 9% of its time over 1,000 groups
//! (docs/benchmarks.md, round 25).
//!
//! Who talks to it: group actors, each through its [`InOrder`] line, and
//! presence actors, through [`Committer::last_seen`]. A round never holds
//! more than [`MAX_JOBS`] jobs or [`MAX_ENTRIES`] log entries; the queue
//! is bounded ([`QUEUE`]), so a flood of commits slows the writers down
//! instead of growing memory.
//!
//! What it must not do: let one group's rejection or duplicate undo another
//! group's writes, or reply before the transaction committed.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ractor::ActorRef;
use storage::model::Model;
use storage::{Kv, TxError, Txn};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::error::{ChatError, ChatResult};
use crate::group::{CommitFailure, CommitOutcome, GroupMessage, SendRecord, Writes};
use crate::meters::Meters;
use crate::store::Store;

/// Most jobs (group batches, last-seen writes) in one transaction.
pub const MAX_JOBS: usize = 512;
/// Most log entries in one transaction (a batch larger than this still
/// goes alone).
pub const MAX_ENTRIES: usize = 20_000;
/// Jobs waiting for the stage.
pub const QUEUE: usize = 4_096;

type Outcome = Result<CommitOutcome, CommitFailure>;

/// What one job writes (the transaction closure, which may run more than
/// once, reads it each time).
enum Work {
    /// A group's planned batch, checked first.
    Group(Arc<Writes>),
    /// A user went offline at this time (ms).
    LastSeen(String, u64),
}

/// Who waits for a job.
enum Reply {
    Group(GroupReply),
    LastSeen(oneshot::Sender<ChatResult<()>>),
}

/// A job's [`Reply`] with its answer, ready to send.
enum Answered {
    Group(GroupReply, Outcome),
    LastSeen(oneshot::Sender<ChatResult<()>>, ChatResult<()>),
}

impl Answered {
    /// Sends the answer (a caller that stopped waiting is no error).
    fn send(self) {
        match self {
            Answered::Group(reply, outcome) => reply.send(outcome),
            Answered::LastSeen(reply, result) => {
                let _ = reply.send(result);
            }
        }
    }
}

/// Tells a group actor how its batch ended, as
/// [`GroupMessage::Committed`]: one cast straight to its mailbox, instead
/// of a task per batch that waited for the answer and cast it (that task,
/// its spawn and its two channels were ~5% of the tokio workers' time over
/// 1,000 groups; docs/benchmarks.md, round 26).
///
/// Invariant: the actor hears of its batch exactly once. Dropped
/// unanswered (the stage stopped, or lost a round with its jobs), it tells
/// the actor that the stage stopped, as a dropped channel did before.
pub struct GroupReply {
    group: Option<ActorRef<GroupMessage>>,
    id: u64,
}

impl GroupReply {
    /// A reply to `group` for its commit `id`.
    pub fn new(group: ActorRef<GroupMessage>, id: u64) -> Self {
        GroupReply {
            group: Some(group),
            id,
        }
    }

    /// Casts the outcome (an actor that stopped is no error).
    fn send(mut self, outcome: Outcome) {
        self.tell(|| outcome);
    }

    /// Casts the outcome unless the actor was told already (the error of
    /// a drop is built only then).
    fn tell(&mut self, outcome: impl FnOnce() -> Outcome) {
        if let Some(group) = self.group.take() {
            let _ = group.cast(GroupMessage::Committed(self.id, outcome()));
        }
    }
}

impl Drop for GroupReply {
    fn drop(&mut self) {
        self.tell(|| Err(CommitFailure::Storage(stopped())));
    }
}

/// One group's batch for the stage, with who to tell ([`InOrder::queue`]).
pub struct GroupJob(Job);

impl GroupJob {
    /// A job for `writes`; its outcome goes to `reply`.
    pub fn new(writes: Arc<Writes>, reply: GroupReply) -> Self {
        GroupJob(Job {
            work: Work::Group(writes),
            reply: Reply::Group(reply),
        })
    }
}

/// One round's answers, for the task that sends them.
type Answers = Vec<Answered>;

/// Rounds whose answers may wait for the answering task (past it, a round
/// sends its own; rounds are serial, so two are plenty).
const ANSWER_QUEUE: usize = 4;

/// One queued job and who waits for it.
struct Job {
    work: Work,
    reply: Reply,
}

fn stopped() -> ChatError {
    ChatError::Unavailable("commit stage stopped".into())
}

/// The node's commit stage. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Committer")
    }
}

impl Committer {
    /// Starts the stage on `store`.
    pub fn start(store: Store, meters: Arc<Meters>) -> Committer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx, meters));
        Committer { tx }
    }

    /// Queues one group's batch if the stage's queue has room; once it is
    /// durable (or rejected), its reply tells the group actor. Batches are
    /// committed in the order they were queued. A stopped stage answers at
    /// once (with `CommitFailure::Storage`); a full queue hands the job
    /// back, for [`Committer::submit`]. Groups go through [`InOrder`].
    fn try_submit(&self, job: GroupJob) -> Result<(), GroupJob> {
        match self.tx.try_send(job.0) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(job)) => Err(GroupJob(job)),
            // Dropping the job's reply answers that the stage stopped.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Queues one group's batch, waiting while the stage's queue is full
    /// (see [`Committer::try_submit`]).
    async fn submit(&self, job: GroupJob) {
        // Err: the stage stopped; dropping the job's reply answers so.
        let _ = self.tx.send(job.0).await;
    }

    /// Records that `user` was last seen at `ms`; resolves once durable.
    pub async fn last_seen(&self, user: String, ms: u64) -> ChatResult<()> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            work: Work::LastSeen(user, ms),
            reply: Reply::LastSeen(reply),
        };
        self.tx.send(job).await.map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// One group's line into the stage: its batches enter the stage's queue
/// in the order they were handed to [`InOrder::queue`], even while that
/// queue is full (a batch checked before the one ahead of it would find
/// the head unmoved).
///
/// Invariant: `ahead`, when set, resolves once the last batch that could
/// not be queued at once is in the stage's queue; until then every later
/// batch queues behind it, on a task of its own.
#[derive(Debug, Default)]
pub struct InOrder {
    ahead: Option<oneshot::Receiver<()>>,
}

impl InOrder {
    /// Queues `job`: straight from the caller while the stage's queue has
    /// room and no earlier batch is still waiting for room (no task, no
    /// channel: the common case); else by a task that waits for the batch
    /// before it, then for room.
    pub fn queue(&mut self, committer: &Committer, job: GroupJob) {
        let mut ahead = self.ahead.take();
        if let Some(rx) = &mut ahead
            && !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
        {
            // Ok or Closed: that task ended (it queued, or the stage is gone).
            ahead = None;
        }
        let job = match ahead {
            None => match committer.try_submit(job) {
                Ok(()) => return,
                Err(job) => job,
            },
            Some(_) => job,
        };
        // Cloned only here: every group of the node shares the stage's sender.
        let committer = committer.clone();
        let (queued, queued_rx) = oneshot::channel::<()>();
        self.ahead = Some(queued_rx);
        tokio::spawn(async move {
            if let Some(ahead) = ahead {
                let _ = ahead.await;
            }
            committer.submit(job).await;
            let _ = queued.send(());
        });
    }
}

impl Work {
    /// Log entries it writes (the transaction's size bound).
    fn entries(&self) -> usize {
        match self {
            Work::Group(w) => w.log.len(),
            Work::LastSeen(..) => 0,
        }
    }
}

/// The stage's queue: the stage's task waits on it while no round is
/// queued; a round takes its jobs from it when it starts.
type Queue = Arc<Mutex<mpsc::Receiver<Job>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across a panic site of its own: a poisoned lock still
    // guards a sound value.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The stage's task: keeps one round queued on the write lane behind the
/// one running, while there is work.
///
/// Invariant: at most one round is queued and not yet started, and a round
/// is queued only when the one before it has taken its jobs; so rounds take
/// jobs in queue order, and the lane goes from one round's commit straight
/// into the next round, without waiting for this task.
async fn run(store: Store, rx: mpsc::Receiver<Job>, meters: Arc<Meters>) {
    let queue: Queue = Arc::new(Mutex::new(rx));
    // Waking hundreds of callers is a tokio task's work, not the writer's:
    // a round hands its answers over in one message.
    let (answers, mut to_answer) = mpsc::channel::<Answers>(ANSWER_QUEUE);
    tokio::spawn(async move {
        while let Some(round) = to_answer.recv().await {
            round.into_iter().for_each(Answered::send);
        }
    });
    // Rounds run one at a time even on an engine with several write
    // threads: a group's next batch is checked against the head its batch
    // ahead of it wrote.
    let serial = Arc::new(Mutex::new(()));
    loop {
        // Idle: no round queued. The lock is held only while polling.
        let Some(first) = poll_fn(|cx| lock(&queue).poll_recv(cx)).await else {
            return;
        };
        let mut carry = Some(first);
        loop {
            let (started, taken) = oneshot::channel();
            let (queue, serial, meters) = (queue.clone(), serial.clone(), meters.clone());
            let answers = answers.clone();
            let first = carry.take();
            let queued = store
                .spawn_on_write_lane(move |kv, model| {
                    let stage = Stage {
                        queue: &queue,
                        serial: &serial,
                        answers: &answers,
                        meters: &meters,
                    };
                    round(kv, model, first, stage, started)
                })
                .await;
            if let Err(e) = queued {
                // The round was dropped with the job it carried, whose
                // caller gets an error; the next job tries again.
                warn!(error = %e, "commit round not queued");
                break;
            }
            match taken.await {
                // It took jobs: queue the next round behind it.
                Ok(n) if n > 0 => continue,
                // It found none (or panicked before taking any): idle.
                _ => break,
            }
        }
    }
}

/// What a round shares with the stage.
struct Stage<'a> {
    queue: &'a Mutex<mpsc::Receiver<Job>>,
    serial: &'a Mutex<()>,
    answers: &'a mpsc::Sender<Answers>,
    meters: &'a Meters,
}

/// One round, on the write lane: takes what is queued (within the bounds),
/// says how many it took, commits them in one transaction and has each
/// answered.
fn round(
    kv: &dyn Kv,
    model: &Model,
    carry: Option<Job>,
    stage: Stage<'_>,
    taken: oneshot::Sender<usize>,
) {
    let Stage {
        queue,
        serial,
        answers,
        meters,
    } = stage;
    let _serial = lock(serial);
    let started = Instant::now();
    let mut jobs: Vec<Job> = carry.into_iter().collect();
    let mut entries: usize = jobs.iter().map(|j| j.work.entries()).sum();
    {
        let mut queue = lock(queue);
        while jobs.len() < MAX_JOBS && entries < MAX_ENTRIES {
            let Ok(job) = queue.try_recv() else { break };
            entries += job.work.entries();
            jobs.push(job);
        }
    }
    let _ = taken.send(jobs.len());
    if jobs.is_empty() {
        return;
    }
    meters.txn_groups.record(
        jobs.iter()
            .filter(|j| matches!(j.work, Work::Group(_)))
            .count() as f64,
    );
    meters.txn_entries.record(entries as f64);
    // When the first attempt's statements began: after the engine's
    // BEGIN, which with SQLite takes the write lock.
    let mut began = None;
    // One outcome per group batch, in job order.
    let result = storage::run(kv, |t| {
        let began = *began.get_or_insert_with(Instant::now);
        let mut outcomes = Vec::new();
        for job in &jobs {
            match &job.work {
                Work::Group(w) => outcomes.push(commit_one(t, model, w)?),
                Work::LastSeen(user, ms) => model.set_last_seen(t, user, *ms)?,
            }
        }
        Ok::<_, TxError<()>>((outcomes, began))
    });
    meters.txn_seconds.record(started.elapsed().as_secs_f64());
    let round: Answers = match result {
        Ok((outcomes, began)) => {
            meters.txn_wait.record((began - started).as_secs_f64());
            let mut outcomes = outcomes.into_iter();
            jobs.into_iter()
                .filter_map(|job| {
                    Some(match job.reply {
                        // One outcome per group job, in job order.
                        Reply::Group(reply) => Answered::Group(reply, outcomes.next()?),
                        Reply::LastSeen(reply) => Answered::LastSeen(reply, Ok(())),
                    })
                })
                .collect()
        }
        Err(e) => {
            let err = match e {
                TxError::Db(e) => ChatError::from(e),
                TxError::Abort(()) => ChatError::Internal("commit aborted".into()),
            };
            warn!(error = %err, jobs = jobs.len(), "commit transaction failed");
            jobs.into_iter()
                .map(|job| match job.reply {
                    Reply::Group(reply) => {
                        Answered::Group(reply, Err(CommitFailure::Storage(err.clone())))
                    }
                    Reply::LastSeen(reply) => Answered::LastSeen(reply, Err(err.clone())),
                })
                .collect()
        }
    };
    if let Err(mpsc::error::TrySendError::Full(round) | mpsc::error::TrySendError::Closed(round)) =
        answers.try_send(round)
    {
        round.into_iter().for_each(Answered::send);
    }
}

/// Checks one group's batch and, if it passes, writes it. A pure function
/// of the batch and the transaction, so the whole transaction can be retried.
fn commit_one(t: &mut dyn Txn, m: &Model, w: &Writes) -> Result<Outcome, TxError<()>> {
    if let Err(rejected) = check(t, m, w)? {
        return Ok(Err(rejected));
    }
    let dups = if w.record_sends {
        insert_dedupes(t, m, w)?
    } else {
        recorded_sends(t, m, w)?
    };
    if let Some(dups) = dups {
        return Ok(Ok(CommitOutcome::Duplicates(dups)));
    }
    write(t, m, w)?;
    Ok(Ok(CommitOutcome::Written))
}

type Dups = Vec<SendRecord>;

/// For a batch that leaves its sends' records for later: its sends that
/// already have a dedupe record, i.e. retries of sends committed before the
/// group actor loaded the group, older than the log tail it read (newer
/// ones it answers itself). Reads only: a send's own record is written
/// later, with others, when the actor moves the group's dedupe watermark
/// (see [`Writes::index`]). In the transaction, not on the store's read
/// lane before it: that hop made every batch wait longer, and clients
/// that wait for their acks sent less (1,000 groups 28.9, 29.1k/s against
/// 31.8, 30.5k/s for the build before deferred records, where the reads
/// in the transaction gave +10%; docs/benchmarks.md, round 10).
fn recorded_sends(t: &mut dyn Txn, m: &Model, w: &Writes) -> Result<Option<Dups>, storage::Error> {
    let dups = records_of(t, m, &w.group, &w.sends)?;
    Ok((!dups.is_empty()).then_some(dups))
}

/// The stored dedupe records of `sends` that have one, with their sends.
fn records_of<'a>(
    t: &mut dyn Txn,
    m: &Model,
    gid: &str,
    sends: impl IntoIterator<Item = &'a SendRecord>,
) -> Result<Dups, storage::Error> {
    let mut dups = Vec::new();
    for (u, c, _) in sends {
        if let Some(rec) = m.dedupe(t, gid, u.as_str(), c)? {
            dups.push((u.clone(), c.clone(), rec));
        }
    }
    Ok(dups)
}

/// A batch that records its own sends ([`Writes::record_sends`]) writes a
/// dedupe record per send first, each inserted only where none exists, so
/// finding a retried send costs no read of its own.
/// If some send was committed before (a retry after this actor started),
/// takes back the records it inserted (none existed before: the batch
/// writes nothing) and returns the earlier outcomes.
fn insert_dedupes(t: &mut dyn Txn, m: &Model, w: &Writes) -> Result<Option<Dups>, storage::Error> {
    let gid = w.group.as_str();
    let mut inserted = Vec::with_capacity(w.sends.len());
    for (u, c, rec) in &w.sends {
        inserted.push(m.insert_dedupe(t, gid, u.as_str(), c, rec)?);
    }
    if inserted.iter().all(|&i| i) {
        return Ok(None);
    }
    let mut refused = Vec::new();
    for (send, inserted) in w.sends.iter().zip(inserted) {
        if inserted {
            m.clear_dedupe(t, gid, send.0.as_str(), &send.1)?;
        } else {
            refused.push(send);
        }
    }
    Ok(Some(records_of(t, m, gid, refused)?))
}

/// Reads only: the fence, the head, a concurrent creation, and the member
/// limit (retried sends are found by [`recorded_sends`]).
fn check(
    t: &mut dyn Txn,
    m: &Model,
    w: &Writes,
) -> Result<Result<(), CommitFailure>, storage::Error> {
    let gid = w.group.as_str();
    if m.epoch(t, gid)? != w.epoch {
        return Ok(Err(CommitFailure::Fenced));
    }
    if m.head(t, gid)? != w.base_head {
        return Ok(Err(CommitFailure::Stale("head moved".into())));
    }
    if w.create.is_some() && m.meta(t, gid)?.is_some() {
        return Ok(Err(CommitFailure::Stale(
            "group created concurrently".into(),
        )));
    }
    if !w.adds.is_empty() {
        // The meta (member count, limit) is read only when members join.
        let meta = match &w.create {
            Some(new) => Some(new.clone()),
            None => m.meta(t, gid)?,
        };
        let Some(meta) = meta else {
            return Ok(Err(CommitFailure::Stale("group has no meta".into())));
        };
        let mut absent = 0u32;
        for (u, _) in &w.adds {
            if m.member(t, gid, u)?.is_none() {
                absent += 1;
            }
        }
        if meta.member_count + absent > meta.max_members {
            return Ok(Err(CommitFailure::Stale("member limit disagrees".into())));
        }
    }
    Ok(Ok(()))
}

/// Writes a checked batch.
fn write(t: &mut dyn Txn, m: &Model, w: &Writes) -> Result<(), storage::Error> {
    let gid = w.group.as_str();
    if let Some(meta) = &w.create {
        m.claim_epoch(t, gid)?;
        m.put_meta(t, gid, meta)?;
        // A new group's sends are found in its log until their records
        // are written (a group without the watermark has them all).
        m.set_dedupe_indexed(t, gid, 0)?;
    }
    for (u, rec) in &w.pointers {
        m.update_member(t, gid, u.as_str(), rec)?;
    }
    // The limit was checked above in this transaction; add_members checks
    // it again and cannot refuse now.
    if !w.adds.is_empty() && m.add_members(t, gid, &w.adds)?.is_err() {
        return Err(storage::Error::Engine(format!(
            "member limit of {gid} changed inside one transaction"
        )));
    }
    if !w.removes.is_empty() {
        m.remove_members(t, gid, &w.removes)?;
    }
    for (u, rec) in &w.updates {
        m.update_member(t, gid, u, rec)?;
    }
    m.put_log_batch(t, gid, &w.log)?;
    for (parent, seq) in &w.threads {
        m.put_thread(t, gid, *parent, *seq)?;
    }
    for (seq, emoji, u, present) in &w.reactions {
        m.set_reaction(t, gid, *seq, emoji, u, *present)?;
    }
    for (u, c, rec) in &w.index {
        m.put_dedupe(t, gid, u.as_str(), c, rec)?;
    }
    if let Some(upto) = w.indexed {
        m.set_dedupe_indexed(t, gid, upto)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! [`InOrder`]'s slow path: the stage's queue full, later batches
    //! queued by tasks, in order. A stage of one slot stands in for the
    //! node's 4,096, and the test reads the stage's queue itself.

    use super::*;

    /// A stage whose queue holds `slots` jobs, and that queue's far end.
    fn stage(slots: usize) -> (Committer, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(slots);
        (Committer { tx }, rx)
    }

    /// Job `id` of a group that no actor answers.
    fn job(id: u64) -> GroupJob {
        let reply = GroupReply { group: None, id };
        GroupJob::new(Arc::new(Writes::default()), reply)
    }

    /// The id of a job taken from the stage's queue.
    async fn next_id(rx: &mut mpsc::Receiver<Job>) -> u64 {
        let job = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("a queued job within 5 s")
            .expect("the stage's queue open");
        match job.reply {
            Reply::Group(r) => r.id,
            Reply::LastSeen(_) => panic!("a last-seen job in a group's line"),
        }
    }

    #[tokio::test]
    async fn a_full_queue_keeps_the_order() {
        let (committer, mut rx) = stage(1);
        let mut line = InOrder::default();
        // 0 takes the one slot; 1..6 wait for room, each behind the last.
        for id in 0..6 {
            line.queue(&committer, job(id));
        }
        assert!(line.ahead.is_some(), "later batches are waiting");
        for id in 0..6 {
            assert_eq!(next_id(&mut rx).await, id);
        }
        // The line is drained: the next batch goes straight in.
        tokio::task::yield_now().await;
        line.queue(&committer, job(6));
        assert!(line.ahead.is_none(), "queued without a task");
        assert_eq!(next_id(&mut rx).await, 6);
    }

    #[tokio::test]
    async fn room_does_not_let_a_later_batch_pass() {
        let (committer, mut rx) = stage(1);
        let mut line = InOrder::default();
        line.queue(&committer, job(0));
        line.queue(&committer, job(1));
        // A slot frees before 1's task has run (one thread, no yield):
        // 2 must still go behind 1, not into the free slot.
        assert_eq!(next_id(&mut rx).await, 0);
        line.queue(&committer, job(2));
        assert_eq!(next_id(&mut rx).await, 1);
        assert_eq!(next_id(&mut rx).await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_stage_reading_alongside_sees_plan_order() {
        const JOBS: u64 = 2_000;
        let (committer, mut rx) = stage(4);
        let reader = tokio::spawn(async move {
            let mut seen = Vec::with_capacity(JOBS as usize);
            for i in 0..JOBS {
                seen.push(next_id(&mut rx).await);
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            seen
        });
        let mut line = InOrder::default();
        for id in 0..JOBS {
            line.queue(&committer, job(id));
            if id % 13 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let seen = reader.await.expect("the reader finished");
        assert_eq!(seen, (0..JOBS).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_stopped_stage_drops_the_jobs() {
        let (committer, rx) = stage(1);
        drop(rx);
        let mut line = InOrder::default();
        // Closed: each job (and its reply, which tells the actor the stage
        // stopped) is dropped at once, without a task.
        for id in 0..3 {
            line.queue(&committer, job(id));
            assert!(line.ahead.is_none());
        }
    }
}
