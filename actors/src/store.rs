//! Async access to storage for actors: runs [`storage`] transactions on
//! threads of their own, so no actor ever blocks a runtime worker.
//!
//! Each transaction mode has a lane: [`Kv::parallelism`] threads, started
//! with the store, taking jobs from one bounded queue in arrival order.
//! - Reads and writes queue apart, so a commit never waits behind a burst
//!   of reads (10,000 sessions connecting, each reading its groups).
//! - The thread count is fixed. tokio's blocking pool, used before, grew one
//!   thread per waiting transaction: 31-119 threads after a 10,000-session
//!   connect burst, parked on the engine's four reader connections, each
//!   with its own stack and allocator caches (measured: ~0.4 KB per
//!   connection at 10,000). Gating that pool with semaphores cost more than
//!   it saved at 19,000 (measured; likely because each permit hand-off
//!   waits for a runtime worker).
//!
//! The write lane's threads may run at a raised priority
//! ([`StoreOptions::writer_nice`]). The embedded engine has one writer and
//! every commit goes through it, so it is the node's serial path: with the
//! default nice value, over 1,000 groups it spent a quarter of its time
//! runnable but waiting for a core that tokio workers held
//! (`scripts/cpu-per-msg.sh`), and at nice -10 the node acknowledged
//! 6–15% more (docs/benchmarks.md, round 18). Raising it needs `CAP_SYS_NICE` or
//! an `RLIMIT_NICE` that allows it; without either the threads run at the
//! normal priority and the store says so once.
//!
//! Who talks to it: actors (group creation and activation, the commit
//! stage, sessions' and presences' reads). What it must not do: run
//! anything but transactions on its lanes, or let a panicking transaction
//! take a lane thread down (the panic becomes an error for its caller).
//!
//! Transaction closures may run several times (conflict retries): they must
//! only touch the transaction.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use storage::model::Model;
use storage::{Kv, TxError, TxMode, Txn};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::error::{ChatError, ChatResult};

/// A transaction closure's result.
pub type TxResult<T> = Result<T, TxError<ChatError>>;

/// Transactions that may wait in one lane's queue.
pub const LANE_QUEUE: usize = 65_536;
/// How long a transaction may wait for room in a full queue before it fails
/// with [`storage::Error::Timeout`].
pub const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// One queued transaction (it answers its caller itself).
type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running one mode's transactions in arrival order.
///
/// Invariant: the threads live until every sender (every clone of the
/// [`Store`]; queued jobs hold only the engine and the model) is gone, then
/// finish the queue and exit.
struct Lane {
    jobs: mpsc::Sender<Job>,
}

impl Lane {
    /// Starts `threads` threads named `name-i`, at nice value `nice` (0:
    /// left as inherited).
    fn start(name: &str, threads: usize, nice: i32) -> Result<Lane, storage::Error> {
        let (jobs, rx) = mpsc::channel::<Job>(LANE_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let threads = threads.max(1);
        // Each thread reports whether its priority was set before it takes
        // its first job; the reports are gathered below and logged once.
        let (set_tx, set_rx) = std::sync::mpsc::sync_channel(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let set_tx = set_tx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    if nice != 0 {
                        let _ = set_tx.send(set_thread_nice(nice));
                    }
                    drop(set_tx);
                    loop {
                        // One idle thread waits in `blocking_recv`, the others
                        // on the lock. The lock is never held across a job, so
                        // a poisoned one still guards a sound receiver.
                        let job = rx
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .blocking_recv();
                        let Some(job) = job else { return };
                        // A panic drops the job's reply: its caller gets an
                        // error, and this thread goes on.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .map_err(|e| storage::Error::Engine(format!("starting a {name} thread: {e}")))?;
        }
        drop(set_tx);
        if nice != 0 {
            // Each thread's first statement sends its report, so this reads
            // one per thread (up to the first failure) and then ends.
            match set_rx.iter().find_map(Result::err) {
                None => info!(
                    lane = name,
                    threads, nice, "storage threads' nice value set"
                ),
                Some(e) => warn!(
                    lane = name,
                    nice,
                    error = %e,
                    "could not set the storage threads' priority; they run at the \
                     normal one (grant CAP_SYS_NICE or allow it with RLIMIT_NICE, e.g. \
                     systemd LimitNICE=, or set storage.writer_nice = 0)"
                ),
            }
        }
        Ok(Lane { jobs })
    }

    /// Queues `f` on the lane (waiting for room up to [`QUEUE_WAIT`]) and
    /// returns without waiting for it to run.
    async fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<(), storage::Error> {
        match tokio::time::timeout(QUEUE_WAIT, self.jobs.send(Box::new(f))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(storage::Error::Engine("storage threads stopped".into())),
            Err(_) => Err(storage::Error::Timeout(format!(
                "storage queue full for {QUEUE_WAIT:?}"
            ))),
        }
    }

    /// Runs `f` on the lane and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, storage::Error> {
        let (reply, answer) = oneshot::channel();
        self.spawn(move || {
            let _ = reply.send(f());
        })
        .await?;
        answer
            .await
            .map_err(|_| storage::Error::Engine("storage transaction panicked".into()))
    }
}

/// Sets the calling thread's nice value (Linux: a per-thread attribute,
/// so only this thread changes).
#[cfg(target_os = "linux")]
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take and return plain integers and
    // touch no memory of ours; a failure is reported through errno.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_thread_nice(_nice: i32) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "per-thread priority is set on Linux only",
    ))
}

/// How the store runs its lanes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreOptions {
    /// Nice value of the write lane's threads (-20..=19; 0 leaves them at
    /// the process's). Negative values need `CAP_SYS_NICE` or a permitting
    /// `RLIMIT_NICE`; see the module docs.
    pub writer_nice: i32,
}

/// The store and its chat model. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
    model: Model,
    /// Read-write transactions.
    writes: Arc<Lane>,
    /// Read-only transactions.
    reads: Arc<Lane>,
}

/// Key prefix of the chat keyspace.
pub const KEY_PREFIX: &[u8] = b"chat";

impl Store {
    /// Wraps an opened engine and starts its lanes' threads, all at the
    /// process's priority.
    pub fn new(kv: Arc<dyn Kv>) -> Result<Self, storage::Error> {
        Self::with_options(kv, StoreOptions::default())
    }

    /// Wraps an opened engine and starts its lanes' threads as `opts` says.
    pub fn with_options(kv: Arc<dyn Kv>, opts: StoreOptions) -> Result<Self, storage::Error> {
        let lane = |name, mode, nice| Lane::start(name, kv.parallelism(mode), nice).map(Arc::new);
        Ok(Store {
            writes: lane("store-write", TxMode::ReadWrite, opts.writer_nice)?,
            reads: lane("store-read", TxMode::ReadOnly, 0)?,
            kv,
            model: Model::new(KEY_PREFIX),
        })
    }

    /// The engine's name.
    pub fn engine(&self) -> &'static str {
        self.kv.engine()
    }

    /// Runs a read-write transaction on the write lane.
    pub async fn write<T, F>(&self, f: F) -> ChatResult<T>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Txn, &Model) -> TxResult<T> + Send + 'static,
    {
        self.write_with(f).await.map_err(ChatError::from)
    }

    /// Runs a read-write transaction whose closure aborts with its own error
    /// type `E`.
    pub async fn write_with<T, E, F>(&self, mut f: F) -> Result<T, TxError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnMut(&mut dyn Txn, &Model) -> Result<T, TxError<E>> + Send + 'static,
    {
        let (kv, model) = (self.kv.clone(), self.model.clone());
        self.writes
            .run(move || storage::run(&*kv, |t| f(t, &model)))
            .await?
    }

    /// Queues `f` on the write lane, to run there with the engine and the
    /// model, and returns once it is queued (not run). For the commit
    /// stage, whose rounds run transactions themselves and answer their
    /// callers from the lane (see [`crate::committer`]).
    pub(crate) async fn spawn_on_write_lane<F>(&self, f: F) -> Result<(), storage::Error>
    where
        F: FnOnce(&dyn Kv, &Model) + Send + 'static,
    {
        let (kv, model) = (self.kv.clone(), self.model.clone());
        self.writes.spawn(move || f(&*kv, &model)).await
    }

    /// Runs a read-only (snapshot) transaction on the read lane.
    pub async fn read<T, F>(&self, mut f: F) -> ChatResult<T>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Txn, &Model) -> TxResult<T> + Send + 'static,
    {
        let (kv, model) = (self.kv.clone(), self.model.clone());
        self.reads
            .run(move || storage::read(&*kv, |t| f(t, &model)))
            .await?
            .map_err(ChatError::from)
    }
}
