//! The FoundationDB engine (cargo feature `fdb`): the [`Kv`] contract on a
//! FoundationDB cluster, for multi-machine deployments.
//!
//! Owns this process's FoundationDB client: the network thread (booted once
//! per process, on the first [`FdbKv::open`]) and the database handles.
//!
//! Who talks to it: `node` opens it ([`FdbKv::open`]) and, as the last step of
//! its shutdown, calls [`stop_network`]; everything else goes through the
//! [`Kv`]/[`Txn`] traits (`run`/`read`), from blocking threads.
//!
//! How it maps the contract: our [`Txn`] calls block, so each one runs the
//! client's future with `futures::executor::block_on`; FoundationDB's own
//! network thread completes it, so no async runtime is involved (but never
//! call these from an async runtime's worker thread). Read-only transactions
//! use snapshot reads and are never committed. A retryable failure (e.g.
//! `not_committed` 1020, `transaction_too_old` 1007, and also
//! `commit_unknown_result` 1021, as FoundationDB's own retry loop does)
//! becomes [`Error::Conflict`], so [`crate::run`] retries it: a transaction
//! that might run twice after an unknown commit result must be idempotent
//! (the data model's dedupe records make `send` so). `transaction_timed_out`
//! (1031) becomes [`Error::Timeout`]; every transaction has a
//! [`TRANSACTION_TIMEOUT`], so an unreachable cluster is an error, not a hang.
//!
//! The network guard: `foundationdb` requires the guard returned by booting
//! to be dropped before the process exits (stopping and joining the network
//! thread). It lives in a process-wide static here (booted lazily, exactly
//! once); [`stop_network`] drops it. After that the network cannot be started
//! again in this process (a FoundationDB rule), and every `open`/`begin`
//! fails with [`Error::Engine`]. A process that aborts or is killed need not
//! stop it.
//!
//! What it must not do: retry inside a call (the caller's `run` loop does),
//! or let a transaction outlive [`stop_network`] (its futures would never
//! complete).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{DatabaseOption, StreamingMode};
use foundationdb::{Database, FdbError, RangeOption, Transaction};
use futures::executor::block_on;

use crate::error::Error;
use crate::kv::{Kv, Pair, RangeOpts, TxMode, Txn};

/// FoundationDB's largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 10_000;
/// FoundationDB's largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Every transaction fails with [`Error::Timeout`] after this long (set as
/// the database's default transaction timeout).
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Transactions of each mode a process runs at once. Each holds a thread
/// (the `actors` store starts this many per mode) that mostly waits on the
/// client library's futures: at ~1-2 ms a read, 16 reads at once serve
/// ~8-16k reads/s per node, and writes go through one commit stage.
pub const FDB_PARALLELISM: usize = 16;

/// FoundationDB error codes this module treats specially.
mod code {
    /// The transaction ran past its timeout option.
    pub const TRANSACTION_TIMED_OUT: i32 = 1031;
    /// The transaction's writes exceed 10 MB.
    pub const TRANSACTION_TOO_LARGE: i32 = 2101;
    /// A key exceeds [`super::MAX_KEY_BYTES`].
    pub const KEY_TOO_LARGE: i32 = 2102;
    /// A value exceeds [`super::MAX_VALUE_BYTES`].
    pub const VALUE_TOO_LARGE: i32 = 2103;
}

/// The process's FoundationDB network, from first `open` to [`stop_network`].
enum Network {
    /// Not booted yet.
    NotStarted,
    /// Booted; dropping the guard stops and joins the network thread.
    Running(NetworkAutoStop),
    /// Stopped, or failed to start: cannot be (re)started in this process.
    Unavailable(String),
}

/// The process-wide network guard (see the module docs).
static NETWORK: Mutex<Network> = Mutex::new(Network::NotStarted);
/// Set once the network is stopped, so `begin` fails fast instead of
/// creating a transaction whose futures would never complete.
static NETWORK_STOPPED: AtomicBool = AtomicBool::new(false);

/// Boots the network if this is the first call in the process.
fn ensure_network() -> Result<(), Error> {
    // Nothing panics while this lock is held, except a bug inside the
    // client's boot; the state is still meaningful then.
    let mut network = NETWORK.lock().unwrap_or_else(PoisonError::into_inner);
    match &*network {
        Network::Running(_) => Ok(()),
        Network::Unavailable(why) => Err(Error::Engine(format!(
            "FoundationDB network unavailable in this process: {why}"
        ))),
        Network::NotStarted => {
            // `build` selects the API version; it panics if called twice in
            // a process, which the state machine above rules out (this is
            // the only caller, under the lock, and only from NotStarted).
            let booted = FdbApiBuilder::default().build().and_then(|builder| {
                // SAFETY: the guard must be dropped before the process exits
                // (not needed if it aborts). It is kept in `NETWORK` and
                // dropped by `stop_network`, which `node` calls at the end of
                // its shutdown; see the module docs.
                unsafe { builder.boot() }
            });
            match booted {
                Ok(guard) => {
                    *network = Network::Running(guard);
                    tracing::info!("FoundationDB network started");
                    Ok(())
                }
                Err(e) => {
                    let why = format!("boot failed: {}", describe(e));
                    *network = Network::Unavailable(why.clone());
                    Err(Error::Engine(why))
                }
            }
        }
    }
}

/// Stops this process's FoundationDB network and joins its thread, if it was
/// started. Call it once, after every [`FdbKv`] transaction has ended (the
/// last step of a graceful shutdown). Afterwards `open` and `begin` fail.
/// Calling it again, or without a started network, does nothing.
pub fn stop_network() {
    NETWORK_STOPPED.store(true, Ordering::Release);
    let previous = {
        let mut network = NETWORK.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(
            &mut *network,
            Network::Unavailable("network stopped".into()),
        )
    };
    if let Network::Running(guard) = previous {
        // Outside the lock: joining waits for the network thread.
        drop(guard);
        tracing::info!("FoundationDB network stopped");
    }
}

/// The FoundationDB engine.
pub struct FdbKv {
    /// The cluster handle (thread-safe; transactions are created from it).
    db: Database,
}

impl std::fmt::Debug for FdbKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbKv").finish_non_exhaustive()
    }
}

impl FdbKv {
    /// Connects to the cluster named by `cluster_file` (or FoundationDB's
    /// default cluster file), booting the process's network on first use.
    /// Does not wait for the cluster: an unreachable cluster shows up as
    /// [`Error::Timeout`] on the first transaction.
    pub fn open(cluster_file: Option<&str>) -> Result<FdbKv, Error> {
        if cluster_file.is_some_and(|path| path.contains('\0')) {
            return Err(Error::Engine(
                "cluster file path contains a NUL byte".into(),
            ));
        }
        ensure_network()?;
        let db = Database::new(cluster_file).map_err(map_error)?;
        let timeout_ms = i32::try_from(TRANSACTION_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
        db.set_option(DatabaseOption::TransactionTimeout(timeout_ms))
            .map_err(map_error)?;
        tracing::info!(
            cluster_file = cluster_file.unwrap_or("(default)"),
            "FoundationDB opened"
        );
        Ok(FdbKv { db })
    }
}

impl Kv for FdbKv {
    fn begin(&self, mode: TxMode) -> Result<Box<dyn Txn + '_>, Error> {
        if NETWORK_STOPPED.load(Ordering::Acquire) {
            return Err(Error::Engine("FoundationDB network stopped".into()));
        }
        let trx = self.db.create_trx().map_err(map_error)?;
        Ok(Box::new(FdbTxn {
            trx,
            mode,
            written: 0,
        }))
    }

    fn engine(&self) -> &'static str {
        "foundationdb"
    }

    /// [`FDB_PARALLELISM`] of each mode: a transaction's thread mostly
    /// waits for the network, and the client bounds nothing itself.
    fn parallelism(&self, _mode: TxMode) -> usize {
        FDB_PARALLELISM
    }
}

/// One FoundationDB transaction. Dropping it without commit discards it.
struct FdbTxn {
    /// The client transaction (read-your-writes on).
    trx: Transaction,
    /// Read-only transactions use snapshot reads and refuse writes.
    mode: TxMode,
    /// Bytes of keys and values written so far, for [`Error::TooLarge`].
    written: usize,
}

impl FdbTxn {
    /// Snapshot reads for read-only transactions: same consistent read
    /// version, no read conflict ranges (they never commit anyway).
    fn snapshot(&self) -> bool {
        self.mode == TxMode::ReadOnly
    }

    fn check_writable(&self) -> Result<(), Error> {
        match self.mode {
            TxMode::ReadWrite => Ok(()),
            TxMode::ReadOnly => Err(Error::Engine("read-only transaction".into())),
        }
    }
}

impl Txn for FdbTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let value = block_on(self.trx.get(key, self.snapshot())).map_err(map_error)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn get_range(&mut self, begin: &[u8], end: &[u8], opts: RangeOpts) -> Result<Vec<Pair>, Error> {
        if begin >= end {
            // FoundationDB rejects an inverted range; the contract says empty.
            return Ok(Vec::new());
        }
        let snapshot = self.snapshot();
        let mut range = RangeOption::from((begin, end));
        range.limit = (opts.limit > 0).then_some(opts.limit);
        range.reverse = opts.reverse;
        // We collect the whole (limited) range before returning.
        range.mode = StreamingMode::WantAll;
        let mut pairs = Vec::new();
        let mut iteration = 1;
        loop {
            let batch =
                block_on(self.trx.get_range(&range, iteration, snapshot)).map_err(map_error)?;
            pairs.extend(
                batch
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            );
            // `next_range` is None at the end of the range or of the limit.
            match range.next_range(&batch) {
                Some(next) => range = next,
                None => break,
            }
            iteration += 1;
        }
        if opts.limit > 0 {
            pairs.truncate(opts.limit);
        }
        Ok(pairs)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.check_writable()?;
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::TooLarge(key.len()));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::TooLarge(value.len()));
        }
        self.written = self.written.saturating_add(key.len() + value.len());
        self.trx.set(key, value);
        Ok(())
    }

    fn insert_new(&mut self, key: &[u8], value: &[u8]) -> Result<bool, Error> {
        // FoundationDB has no insert-if-absent: a read (which adds the key
        // to the read conflict set) then a write, refused up front in a
        // read-only transaction like every other write.
        self.check_writable()?;
        if self.get(key)?.is_some() {
            return Ok(false);
        }
        self.set(key, value)?;
        Ok(true)
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), Error> {
        self.check_writable()?;
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::TooLarge(key.len()));
        }
        self.written = self.written.saturating_add(key.len());
        self.trx.clear(key);
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), Error> {
        self.check_writable()?;
        if begin >= end {
            // FoundationDB rejects an inverted range; the contract says no-op.
            return Ok(());
        }
        self.written = self.written.saturating_add(begin.len() + end.len());
        self.trx.clear_range(begin, end);
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), Error> {
        if self.mode == TxMode::ReadOnly {
            // Nothing to commit; dropping the transaction ends it.
            return Ok(());
        }
        let this = *self;
        let written = this.written;
        match block_on(this.trx.commit()) {
            Ok(_committed) => Ok(()),
            Err(e) => {
                let err: FdbError = *e;
                Err(match err.code() {
                    code::TRANSACTION_TOO_LARGE => Error::TooLarge(written),
                    _ => map_error(err),
                })
            }
        }
    }
}

/// Maps a client error to the contract's error: retryable errors become
/// [`Error::Conflict`] (so `run` retries), a transaction timeout
/// [`Error::Timeout`], size limits [`Error::TooLarge`], the rest
/// [`Error::Engine`].
fn map_error(e: FdbError) -> Error {
    match e.code() {
        code::TRANSACTION_TIMED_OUT => Error::Timeout(describe(e)),
        code::KEY_TOO_LARGE => Error::TooLarge(MAX_KEY_BYTES + 1),
        code::VALUE_TOO_LARGE => Error::TooLarge(MAX_VALUE_BYTES + 1),
        _ if e.is_retryable() => Error::Conflict,
        _ => Error::Engine(describe(e)),
    }
}

fn describe(e: FdbError) -> String {
    format!("FoundationDB error {}: {}", e.code(), e)
}
