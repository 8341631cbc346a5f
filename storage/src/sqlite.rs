//! The embedded engine: the [`Kv`] contract on one SQLite file in WAL mode.
//!
//! Owns the database file's schema (every key in
//! `kv(key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID`, whose BLOBs
//! compare with `memcmp`, the contract's unsigned byte order; values of 128
//! bytes or more in the rowid table `kv_values`, see `SCHEMA`), its
//! pragmas and this process's connections to it.
//!
//! Who talks to it: `node` opens it ([`SqliteKv::open`]); everything else goes
//! through the [`Kv`]/[`Txn`] traits (`run`/`read`), from blocking threads.
//!
//! Several processes may open the same file at once (the local multi-node
//! cluster does); SQLite's file locks keep them consistent:
//! - Read-write transactions use this process's single writer connection
//!   (taken by one transaction at a time) and `BEGIN IMMEDIATE`, so writers
//!   of every process are serialized: no lost updates, serializable.
//! - Read-only transactions use a small pool of reader connections and
//!   `BEGIN DEFERRED`: in WAL mode they read the snapshot fixed by their first
//!   read and never block writers.
//! - Waiting for another process's lock uses a busy handler that sleeps a
//!   short, growing, jittered time and gives up after [`BUSY_DEADLINE`] with
//!   [`Error::Timeout`] (retryable). SQLite's default busy timeout sleeps in
//!   long steps and starves writers under contention (measured here).
//! - Durability: `synchronous=FULL` (the default) makes an acknowledged commit
//!   survive `kill -9` and power loss; `NORMAL` survives `kill -9` only.
//! - Checkpoints (copying WAL pages back into the database file) run on a
//!   background thread of this process with its own connection, not inside
//!   the writer's `COMMIT` (SQLite's default auto-checkpoint): they cost the
//!   writer ~15% of its time in a many-group append profile. `PASSIVE`
//!   checkpoints never block; if the WAL still grows past
//!   `WAL_RESTART_PAGES` (a writer that never pauses), a `RESTART`
//!   checkpoint waits for the writer once and lets the WAL start over.
//! - The bundled SQLite is compiled without its process-wide allocation
//!   locks (one shared page cache behind a mutex, memory statistics): see
//!   `.cargo/config.toml` and docs/decisions.md #34. Each connection has
//!   its own page cache, sized by `cache_size`.
//!
//! What it must not do: hold a connection inside a transaction after the
//! [`Txn`] is gone (dropping a transaction, even while unwinding from a
//! panic, rolls it back and returns the connection), or keep any state that
//! is not the file's. The one thing it keeps besides connections is the
//! writer's memory of its reads (`readcache`), which is checked against
//! the file's change counter at every `BEGIN` (docs/decisions.md #40).

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Statement, params};

use crate::error::Error;
use crate::kv::{Kv, Pair, RangeOpts, TxMode, Txn};
use crate::readcache::ReadCache;

/// How long a transaction waits for a lock (another process's writer, or
/// this process's writer connection) before failing with [`Error::Timeout`].
pub const BUSY_DEADLINE: Duration = Duration::from_secs(10);

/// First sleep of the busy handler, in microseconds.
const BUSY_SLEEP_MIN_US: u64 = 100;
/// Growth of the busy handler's sleep per retry, in microseconds.
const BUSY_SLEEP_STEP_US: u64 = 50;
/// Longest sleep of the busy handler, in microseconds (before jitter).
const BUSY_SLEEP_MAX_US: u64 = 2_000;
/// After a checkpoint, the WAL file is truncated to at most this size:
/// above what [`WAL_RESTART_PAGES`] lets it reach, so a busy writer
/// overwrites a WAL file of its full size instead of growing it again
/// after every restart (growing writes cost more here: ~2.5 against ~1.6
/// µs a 4 KiB frame). Measured with the restart at 64 Ki pages, against a
/// limit of 64 MiB: 1,000-group durable appends +5% (83.1, 82.7k against
/// 79.5, 78.3k/s committed; docs/benchmarks.md, round 25).
const JOURNAL_SIZE_LIMIT_BYTES: u64 = 320 * 1024 * 1024;
/// Prepared statements kept per connection (we use fewer than this).
const STATEMENT_CACHE_CAPACITY: usize = 32;
/// Page cache of each reader connection, in KiB (SQLite's default is 2 MiB).
const CACHE_SIZE_KIB: u64 = 8 * 1024;
/// Page cache of the writer connection, in KiB. The checkpointer's connection
/// opens the same way and gets it too, but a checkpoint copies WAL frames and
/// fills only a few pages: the size is a ceiling, not an allocation.
///
/// Larger than a reader's: one commit-stage transaction over many groups
/// dirties a few pages per group, and a cache smaller than that working set
/// re-reads pages on every transaction (1,000-group durable appends:
/// 24.1-24.8k/s with 8 MiB, 26.3-28.0k/s with 64 MiB; 16 MiB already reads
/// ~1 page more per message, 24 MiB no more than 64).
///
/// But not larger than that: SQLite scans the whole page cache at the end of
/// almost every write transaction. A B-tree rebalance gives a page the
/// temporary number of the lock page (1 GiB / page size + 1) while it sorts
/// page numbers, which raises the cache's highest page number past the end
/// of any file under 1 GiB, and the commit's truncation of the cache back to
/// the file's size then walks every cached page (`pcache1TruncateUnsafe`).
/// One-group durable appends: 5.9% of the node's CPU samples in that scan
/// with 64 MiB, 2.4% with 24 MiB (docs/benchmarks.md, round 8).
const WRITER_CACHE_SIZE_KIB: u64 = 24 * 1024;
/// Most values, and most ranges' last keys, that the writer connection
/// remembers between transactions ([`ReadCache`]). A group that commits
/// takes about two values (its fence, and what loading it read: its meta,
/// its dedupe watermark) and one range (its log, for the head): 3,000
/// entries over 1,000 groups. Past this, a table starts over; ~5 MB when
/// full.
const WRITER_READ_CACHE_ENTRIES: usize = 32 * 1024;
/// How often the background checkpointer runs.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// WAL size (in pages) past which the checkpointer uses `RESTART` (waits
/// for the writer, then the WAL starts over) instead of `PASSIVE`.
///
/// A `RESTART` holds the writer off while it copies what the `PASSIVE`
/// passes left and syncs the database file: tens of ms, the writer's
/// only long lock waits. A writer appending over 1,000 groups writes
/// ~230 MB of WAL a second, so at 16 Ki pages (64 MiB) that came every
/// ~0.3 s, 7% of its time asleep in the busy handler; at 64 Ki pages
/// (256 MiB) it comes four times less often: committed messages +5 to
/// +8% (three pairs), and +4, +14% with [`JOURNAL_SIZE_LIMIT_BYTES`]
/// raised too (two pairs; docs/benchmarks.md, round 25), for a WAL file
/// of up to ~256 MiB.
const WAL_RESTART_PAGES: i64 = 64 * 1024;

/// Values at least this long are kept out of the `kv` tree, in `kv_values`
/// (see [`SCHEMA`]). Shorter ones (counters, heads, member and dedupe
/// records: under 64 bytes) stay inline, where an overwrite costs one leaf.
const SEPARATE_MIN_BYTES: usize = 128;

/// The schema, created when a file is opened (and added to older files).
///
/// `kv` holds every key, in the contract's order. A value shorter than
/// [`SEPARATE_MIN_BYTES`] is stored in `kv.value` as a BLOB; a longer one as
/// a row of `kv_values` (a rowid table), and `kv.value` then holds that
/// row's id as an INTEGER. (The column has BLOB affinity, so SQLite keeps
/// each value's type as bound; values from callers are always bound as
/// BLOBs, so the two never mix up.)
///
/// Why: `kv` is an index B-tree, and every group's log grows in its middle.
/// An index B-tree balances an overflowing leaf with its neighbours, and
/// with ~270-byte cells (a 44-byte key and its entry) a leaf overflows every
/// few log entries. With an 8-byte id a leaf holds ~5 times as many cells,
/// and the entries themselves go to the right edge of `kv_values`, whose new
/// rows take the next rowid: SQLite adds a page there without rebalancing.
///
/// Invariant: `kv_values` holds exactly the rows that some `kv.value` points
/// at. The four writes below keep it: a write over a long value, a clear and
/// a range clear delete the rows they unlink. (Triggers would keep it too,
/// but an `UPDATE` trigger makes every upsert open a statement journal:
/// measured, a copy of each page it touches.)
const SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_values (id INTEGER PRIMARY KEY, value BLOB NOT NULL);";
/// A stored value as the caller wrote it: inline, or from `kv_values`.
macro_rules! stored_value {
    () => {
        "CASE typeof(kv.value) WHEN 'integer' \
         THEN (SELECT v.value FROM kv_values v WHERE v.id = kv.value) \
         ELSE kv.value END"
    };
}
const SQL_GET: &str = concat!("SELECT ", stored_value!(), " FROM kv WHERE key = ?1");
const SQL_EXISTS: &str = "SELECT 1 FROM kv WHERE key = ?1";
const SQL_RANGE_FORWARD: &str = concat!(
    "SELECT key, ",
    stored_value!(),
    " FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key ASC LIMIT ?3"
);
const SQL_RANGE_REVERSE: &str = concat!(
    "SELECT key, ",
    stored_value!(),
    " FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key DESC LIMIT ?3"
);
/// Keys only: the value (perhaps a `kv_values` row) is never read.
const SQL_LAST_KEY: &str =
    "SELECT key FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key DESC LIMIT 1";
/// Inserts, or overwrites an inline value; changes nothing (0 rows) when the
/// key holds a long value, whose row must go first ([`SQL_UNLINK`]).
const SQL_SET: &str = "INSERT INTO kv (key, value) VALUES (?1, ?2) \
    ON CONFLICT (key) DO UPDATE SET value = excluded.value \
    WHERE typeof(kv.value) <> 'integer'";
const SQL_UPDATE: &str = "UPDATE kv SET value = ?2 WHERE key = ?1";
const SQL_INSERT_NEW: &str =
    "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING";
const SQL_PUT_VALUE: &str = "INSERT INTO kv_values (value) VALUES (?1)";
/// Deletes the `kv_values` row of the long value at a key, if it has one.
const SQL_UNLINK: &str = "DELETE FROM kv_values WHERE id = \
    (SELECT value FROM kv WHERE key = ?1 AND typeof(value) = 'integer')";
/// Deletes the `kv_values` rows of the long values in a range of keys.
const SQL_UNLINK_RANGE: &str = "DELETE FROM kv_values WHERE id IN \
    (SELECT value FROM kv WHERE key >= ?1 AND key < ?2 AND typeof(value) = 'integer')";
const SQL_CLEAR: &str = "DELETE FROM kv WHERE key = ?1";
const SQL_CLEAR_RANGE: &str = "DELETE FROM kv WHERE key >= ?1 AND key < ?2";

/// When a commit is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// `synchronous=FULL`: the WAL is fsynced on every commit; an acknowledged
    /// commit survives `kill -9` and power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL`: fsync only at checkpoints; an acknowledged commit
    /// survives `kill -9` of every process, but not power loss.
    Normal,
}

impl SyncMode {
    fn pragma_value(self) -> &'static str {
        match self {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        }
    }
}

/// How to open a [`SqliteKv`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Durability of a commit.
    pub sync: SyncMode,
    /// Reader connections for read-only transactions (at least 1 is used).
    /// This many read-only transactions may be open at once in this process;
    /// one more waits for a free connection (up to [`BUSY_DEADLINE`]).
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            sync: SyncMode::Full,
            readers: 4,
        }
    }
}

/// The embedded engine: one SQLite file, shared safely by several processes.
///
/// Invariant: every connection in `writer` or `readers` is outside any
/// transaction (autocommit); a transaction takes its connection out of the
/// pool and puts it back, rolled back if it did not commit, when dropped.
pub struct SqliteKv {
    /// The database file, for logs.
    path: PathBuf,
    /// The one writer connection of this process (a pool of one), so
    /// read-write transactions in this process queue here rather than in
    /// SQLite's busy handler.
    writer: Pool,
    /// Connections for read-only transactions (`query_only`).
    readers: Pool,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: std_mpsc::Sender<()>,
}

impl fmt::Debug for SqliteKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteKv")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteKv {
    /// Opens (creating if needed) the database at `path`, switches it to WAL
    /// mode and creates the schema. Safe to call from several processes on
    /// the same file at once. The parent directory must exist.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<SqliteKv, Error> {
        let writer = open_connection(path, opts.sync, false)?;
        create_schema(&writer)?;
        let writer = Conn::writer(Prepared::open(writer)?);
        let readers = (0..opts.readers.max(1))
            .map(|_| {
                Ok(Conn::reader(Prepared::open(open_connection(
                    path, opts.sync, true,
                )?)?))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        tracing::debug!(
            path = %path.display(),
            sync = ?opts.sync,
            readers = readers.len(),
            "sqlite store opened"
        );
        let checkpointer = start_checkpointer(open_connection(path, opts.sync, false)?)?;
        Ok(SqliteKv {
            path: path.to_path_buf(),
            writer: Pool::new("writer", vec![writer]),
            readers: Pool::new("reader", readers),
            _checkpointer: checkpointer,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Kv for SqliteKv {
    fn begin(&self, mode: TxMode) -> Result<Box<dyn Txn + '_>, Error> {
        let pool = match mode {
            TxMode::ReadWrite => &self.writer,
            TxMode::ReadOnly => &self.readers,
        };
        // Built before BEGIN so that the connection goes back to the pool
        // whatever happens next.
        let mut txn = SqliteTxn {
            pool,
            conn: Some(pool.take()?),
            mode,
            committed: false,
        };
        txn.with(|conn, st| {
            ensure_autocommit(conn)?;
            match mode {
                TxMode::ReadWrite => st.begin_write.execute([])?,
                TxMode::ReadOnly => st.begin_read.execute([])?,
            };
            Ok(())
        })?;
        if mode == TxMode::ReadWrite
            && let Some(Conn {
                prepared,
                cache: Some(cache),
            }) = txn.conn.as_mut()
        {
            // Read inside the write lock: no other connection can commit
            // until this transaction ends.
            let version = prepared.with_dependent_mut(|_, st| {
                st.data_version.query_row([], |r| r.get::<_, i64>(0))
            })?;
            cache.begin(version);
        }
        Ok(Box::new(txn))
    }

    fn engine(&self) -> &'static str {
        "sqlite"
    }

    /// The connections of each pool: one writer, `readers` readers.
    fn parallelism(&self, mode: TxMode) -> usize {
        match mode {
            TxMode::ReadWrite => self.writer.size,
            TxMode::ReadOnly => self.readers.size,
        }
    }
}

/// Declares [`Statements`], one field per statement with its SQL, and the
/// function that prepares them all.
macro_rules! statements {
    ($($field:ident = $sql:expr;)*) => {
        /// The statements of every transaction, prepared once per
        /// connection. (rusqlite's `prepare_cached` copies the SQL text into
        /// a new key and hashes it twice on every call: ~5% of the commit
        /// writer's time over 1,000 groups.) Every call binds all of a
        /// statement's parameters, and rusqlite resets a statement when a
        /// call ends, so none stays active between calls (a `COMMIT` would
        /// fail if one did).
        struct Statements<'c> {
            $($field: Statement<'c>,)*
        }

        impl<'c> Statements<'c> {
            /// Prepares them all (the schema must exist: [`create_schema`]).
            fn prepare(conn: &'c Connection) -> rusqlite::Result<Statements<'c>> {
                Ok(Statements {
                    $($field: conn.prepare($sql)?,)*
                })
            }
        }
    };
}

statements! {
    get = SQL_GET;
    exists = SQL_EXISTS;
    range_forward = SQL_RANGE_FORWARD;
    range_reverse = SQL_RANGE_REVERSE;
    last_key = SQL_LAST_KEY;
    set = SQL_SET;
    update = SQL_UPDATE;
    insert_new = SQL_INSERT_NEW;
    put_value = SQL_PUT_VALUE;
    unlink = SQL_UNLINK;
    unlink_range = SQL_UNLINK_RANGE;
    clear = SQL_CLEAR;
    clear_range = SQL_CLEAR_RANGE;
    begin_read = "BEGIN DEFERRED";
    begin_write = "BEGIN IMMEDIATE";
    data_version = "PRAGMA data_version";
    commit = "COMMIT";
}

self_cell::self_cell!(
    /// A connection with its [`Statements`] (which borrow it: they are
    /// finalized before it closes).
    struct Prepared {
        owner: Connection,
        #[covariant]
        dependent: Statements,
    }
);

// SAFETY: a `Prepared` is a connection bundled with the only statements
// that borrow it, so moving it moves all of them together, and they are
// used only through `&mut Prepared` (one thread at a time: a `Pool` hands
// each out to one transaction). That is what SQLite's multi-thread mode
// (`SQLITE_OPEN_NO_MUTEX`, on a library built thread-safe, as rusqlite's
// bundled one is) asks: no connection, nor any statement of it, used by two
// threads at once. Neither type is `Send` by itself only because a lone
// `Statement` could stay behind while its `Connection` (which is `Send`)
// moves away, and a `&Connection` could be shared.
unsafe impl Send for Prepared {}

impl Prepared {
    fn open(conn: Connection) -> Result<Prepared, Error> {
        Ok(Prepared::try_new(conn, |conn| Statements::prepare(conn))?)
    }
}

/// A pooled connection: its statements and, for the writer, what it
/// remembers of its reads between transactions.
struct Conn {
    prepared: Prepared,
    /// `Some` for the writer connection only: read-only transactions read
    /// snapshots of their own, and are not the serial path.
    cache: Option<ReadCache>,
}

impl Conn {
    fn reader(prepared: Prepared) -> Conn {
        Conn {
            prepared,
            cache: None,
        }
    }

    fn writer(prepared: Prepared) -> Conn {
        Conn {
            prepared,
            cache: Some(ReadCache::new(WRITER_READ_CACHE_ENTRIES)),
        }
    }
}

/// One open transaction on a connection taken from `pool`.
///
/// Invariant: in a read-write transaction, the connection's cache holds
/// only what this transaction reads (see [`ReadCache`]): each write tells
/// it, a failed write makes it forget, and so does an end without a
/// commit.
struct SqliteTxn<'a> {
    /// Where the connection goes back when the transaction ends.
    pool: &'a Pool,
    /// `Some` from `begin` until drop.
    conn: Option<Conn>,
    /// Whether writes are allowed.
    mode: TxMode,
    /// Set once `COMMIT` succeeded.
    committed: bool,
}

impl SqliteTxn<'_> {
    /// Runs `f` on the connection and its statements.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&Connection, &mut Statements<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        // `conn` is only taken in `drop`, so this cannot fail; an error
        // rather than a panic all the same.
        self.conn
            .as_mut()
            .ok_or_else(|| Error::Engine("sqlite transaction already finished".into()))?
            .prepared
            .with_dependent_mut(|conn, st| f(conn, st))
    }

    /// The connection's read cache, in a read-write transaction.
    fn cache(&mut self) -> Option<&mut ReadCache> {
        match self.mode {
            TxMode::ReadWrite => self.conn.as_mut()?.cache.as_mut(),
            TxMode::ReadOnly => None,
        }
    }

    /// Tells the cache what a write did, or makes it forget everything if
    /// the write failed (SQLite may have rolled back part of it, or the
    /// whole transaction).
    fn wrote<T>(
        &mut self,
        result: Result<T, Error>,
        tell: impl FnOnce(&mut ReadCache, &T),
    ) -> Result<T, Error> {
        if let Some(cache) = self.cache() {
            match &result {
                Ok(done) => tell(cache, done),
                Err(_) => cache.forget(),
            }
        }
        result
    }

    /// [`Self::with`], for writes.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&Connection, &mut Statements<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        match self.mode {
            TxMode::ReadWrite => self.with(f),
            TxMode::ReadOnly => Err(Error::Engine("read-only transaction".into())),
        }
    }
}

impl Txn for SqliteTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if let Some(value) = self.cache().and_then(|c| c.get(key)) {
            return Ok(Some(value.to_vec()));
        }
        let found: Option<Vec<u8>> =
            self.with(|_, st| Ok(st.get.query_row([key], |row| row.get(0)).optional()?))?;
        if let Some(cache) = self.cache() {
            cache.got(key, found.as_deref());
        }
        Ok(found)
    }

    fn get_range(&mut self, begin: &[u8], end: &[u8], opts: RangeOpts) -> Result<Vec<Pair>, Error> {
        // SQLite: a negative LIMIT means no limit.
        let limit = match opts.limit {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        };
        self.with(|_, st| {
            let stmt = if opts.reverse {
                &mut st.range_reverse
            } else {
                &mut st.range_forward
            };
            let rows = stmt.query_map(params![begin, end, limit], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
            Ok(rows.collect::<Result<Vec<Pair>, _>>()?)
        })
    }

    fn last_key(&mut self, begin: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if let Some(last) = self.cache().and_then(|c| c.last_key(begin, end)) {
            return Ok(last.map(<[u8]>::to_vec));
        }
        let found: Option<Vec<u8>> = self.with(|_, st| {
            Ok(st
                .last_key
                .query_row([begin, end], |row| row.get(0))
                .optional()?)
        })?;
        if let Some(cache) = self.cache() {
            cache.got_last_key(begin, end, found.as_deref());
        }
        Ok(found)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let result = self.write(|conn, st| {
            let stored = store_value(conn, st, value)?;
            if st.set.execute(params![key, stored])? == 0 {
                // The key holds a long value: drop its row, then overwrite.
                st.unlink.execute([key])?;
                st.update.execute(params![key, stored])?;
            }
            Ok(())
        });
        self.wrote(result, |cache, ()| cache.wrote(key, value))
    }

    fn insert_new(&mut self, key: &[u8], value: &[u8]) -> Result<bool, Error> {
        let result = self.write(|conn, st| {
            if value.len() >= SEPARATE_MIN_BYTES {
                // Look first, so that a taken key costs no `kv_values` row.
                let taken = st.exists.query_row([key], |_| Ok(())).optional()?.is_some();
                if taken {
                    return Ok(false);
                }
            }
            // One B-tree descent: the row count says whether the key was free.
            let stored = store_value(conn, st, value)?;
            Ok(st.insert_new.execute(params![key, stored])? == 1)
        });
        self.wrote(result, |cache, &inserted| {
            if inserted {
                cache.wrote(key, value);
            }
        })
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), Error> {
        let result = self.write(|_, st| {
            st.unlink.execute([key])?;
            st.clear.execute([key])?;
            Ok(())
        });
        self.wrote(result, |cache, ()| cache.cleared(key))
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), Error> {
        let result = self.write(|_, st| {
            st.unlink_range.execute([begin, end])?;
            st.clear_range.execute([begin, end])?;
            Ok(())
        });
        self.wrote(result, |cache, ()| cache.cleared_range(begin, end))
    }

    fn commit(mut self: Box<Self>) -> Result<(), Error> {
        // A read-only transaction has nothing to commit; COMMIT just ends it.
        // On failure the connection is still in the transaction and `drop`
        // rolls it back.
        self.with(|_, st| {
            st.commit.execute([])?;
            Ok(())
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for SqliteTxn<'_> {
    fn drop(&mut self) {
        if !self.committed
            && let Some(cache) = self.cache()
        {
            // Rolled back (below, or by SQLite after an error): what the
            // transaction read and wrote is not the file's any more.
            cache.forget();
        }
        if let Some(pooled) = self.conn.take() {
            let conn = pooled.prepared.borrow_owner();
            if !conn.is_autocommit() {
                // Not committed: roll back. If even that fails, the next
                // `begin` on this connection tries again (`ensure_autocommit`).
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    tracing::warn!(error = %e, "sqlite rollback failed");
                }
            }
            self.pool.put(pooled);
        }
    }
}

/// What goes into `kv.value` for `value`: the value itself, or, if it is
/// long enough to be kept out of the `kv` tree ([`SCHEMA`]), the id of the
/// new `kv_values` row that now holds it.
fn store_value<'v>(
    conn: &Connection,
    st: &mut Statements<'_>,
    value: &'v [u8],
) -> Result<Stored<'v>, Error> {
    if value.len() < SEPARATE_MIN_BYTES {
        return Ok(Stored::Inline(value));
    }
    st.put_value.execute([value])?;
    Ok(Stored::Separate(conn.last_insert_rowid()))
}

/// The content of a `kv.value` cell, bound as a BLOB or an INTEGER.
enum Stored<'v> {
    Inline(&'v [u8]),
    Separate(i64),
}

impl rusqlite::ToSql for Stored<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Stored::Inline(value) => value.to_sql(),
            Stored::Separate(id) => id.to_sql(),
        }
    }
}

/// A fixed set of connections that transactions take and give back.
struct Pool {
    /// For error messages.
    name: &'static str,
    /// How many connections it holds (idle or taken).
    size: usize,
    /// Connections not in use, all in autocommit mode.
    idle: Mutex<Vec<Conn>>,
    /// Signalled when a connection is put back.
    returned: Condvar,
}

impl Pool {
    fn new(name: &'static str, conns: Vec<Conn>) -> Pool {
        Pool {
            name,
            size: conns.len(),
            idle: Mutex::new(conns),
            returned: Condvar::new(),
        }
    }

    /// Takes an idle connection, waiting up to [`BUSY_DEADLINE`] for one.
    /// (Waiting forever would turn a thread that opens a second read-write
    /// transaction while holding one into a silent deadlock.)
    fn take(&self) -> Result<Conn, Error> {
        let start = Instant::now();
        // The lock is never held across user code or a panic site, so a
        // poisoned lock still guards a consistent Vec.
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(conn) = idle.pop() {
                return Ok(conn);
            }
            let deadline = busy_deadline();
            let Some(left) = deadline.checked_sub(start.elapsed()) else {
                return Err(Error::Timeout(format!(
                    "no free sqlite {} connection after {deadline:?}",
                    self.name
                )));
            };
            idle = self
                .returned
                .wait_timeout(idle, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn put(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
        self.returned.notify_one();
    }
}

/// Starts the thread that checkpoints the WAL every [`CHECKPOINT_INTERVAL`]
/// on `conn`, until the returned sender is dropped.
fn start_checkpointer(conn: Connection) -> Result<std_mpsc::Sender<()>, Error> {
    let (stop, stopped) = std_mpsc::channel::<()>();
    thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            while let Err(std_mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_INTERVAL)
            {
                checkpoint(&conn);
            }
        })
        .map_err(|e| Error::Engine(format!("starting the checkpointer: {e}")))?;
    Ok(stop)
}

/// One checkpoint round: `PASSIVE`, then `RESTART` if the WAL is still
/// too long. Failures are logged and retried next round (a checkpoint is
/// an optimisation of reads and of the WAL's size, never needed for
/// durability).
fn checkpoint(conn: &Connection) {
    // The pragma's row is (busy, WAL pages, pages checkpointed).
    let run = |mode: &str| -> rusqlite::Result<i64> {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            r.get::<_, i64>(1)
        })
    };
    match run("PASSIVE") {
        Ok(log) if log > WAL_RESTART_PAGES => {
            if let Err(e) = run("RESTART") {
                tracing::debug!(error = %e, wal_pages = log, "sqlite restart checkpoint failed");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "sqlite checkpoint failed"),
    }
}

/// Opens one connection with the busy handler and pragmas set.
fn open_connection(path: &Path, sync: SyncMode, reader: bool) -> Result<Connection, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::Engine(format!("open {}: {e}", path.display())))?;
    // First, so that everything below waits for other processes fairly.
    conn.busy_handler(Some(busy_wait))?;
    // Persistent in the file; switching needs an exclusive lock, which a
    // concurrent opener may hold for a moment.
    let mode: String = retry_busy(|| conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Engine(format!(
            "{}: cannot switch to WAL mode (journal_mode is {mode})",
            path.display()
        )));
    }
    let cache_kib = if reader {
        CACHE_SIZE_KIB
    } else {
        WRITER_CACHE_SIZE_KIB
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous={};\
         PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES};\
         PRAGMA cache_size=-{cache_kib};\
         PRAGMA wal_autocheckpoint=0;",
        sync.pragma_value()
    ))?;
    if reader {
        conn.execute_batch("PRAGMA query_only=ON")?;
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(conn)
}

/// Creates the table if missing, inside `BEGIN IMMEDIATE` so that concurrent
/// openers (other processes) serialize on it.
fn create_schema(conn: &Connection) -> Result<(), Error> {
    retry_busy(|| {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = conn
            .execute_batch(SCHEMA)
            .and_then(|()| conn.execute_batch("COMMIT"));
        if result.is_err() && !conn.is_autocommit() {
            // Best effort; the error that matters is `result`.
            let _ = conn.execute_batch("ROLLBACK");
        }
        result
    })?;
    Ok(())
}

/// Rolls back a transaction left open on `conn` (only possible if an earlier
/// rollback failed).
fn ensure_autocommit(conn: &Connection) -> Result<(), Error> {
    if !conn.is_autocommit() {
        tracing::warn!("sqlite connection was left in a transaction; rolling back");
        conn.execute_batch("ROLLBACK")?;
    }
    Ok(())
}

/// Runs `f` again while it fails with SQLITE_BUSY/LOCKED, up to
/// [`BUSY_DEADLINE`], for the few statements that SQLite may fail with BUSY
/// without calling the busy handler (journal mode changes, opening).
fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let start = Instant::now();
    let mut attempt: u64 = 0;
    loop {
        match f() {
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && start.elapsed() < busy_deadline() =>
            {
                attempt += 1;
                thread::sleep(busy_sleep(attempt));
            }
            other => return other,
        }
    }
}

thread_local! {
    /// When the busy event that the busy handler is waiting on began. The
    /// handler runs on the thread that called SQLite, one event at a time.
    static BUSY_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// This thread's lock deadline: [`BUSY_DEADLINE`] except in tests that
    /// shorten it to see a timeout quickly.
    static BUSY_LIMIT: Cell<Duration> = const { Cell::new(BUSY_DEADLINE) };
}

/// How long this thread waits for a lock (see [`BUSY_DEADLINE`]).
fn busy_deadline() -> Duration {
    BUSY_LIMIT.with(Cell::get)
}

/// Shortens (or restores) the lock deadline of the calling thread only.
#[cfg(test)]
pub(crate) fn set_busy_deadline_for_this_thread(deadline: Duration) {
    BUSY_LIMIT.with(|limit| limit.set(deadline));
}

/// SQLite's busy handler: `count` is how many times it was already called
/// for this lock. Sleeps a short, growing, jittered time and returns `true`
/// (try again) until [`BUSY_DEADLINE`] has passed since the first call, then
/// `false` (SQLite returns SQLITE_BUSY, mapped to [`Error::Timeout`]).
fn busy_wait(count: i32) -> bool {
    let now = Instant::now();
    let since = BUSY_SINCE.with(|since| match since.get() {
        Some(t) if count > 0 => t,
        _ => {
            since.set(Some(now));
            now
        }
    });
    if now.duration_since(since) >= busy_deadline() {
        return false;
    }
    thread::sleep(busy_sleep(u64::try_from(count).unwrap_or(0)));
    true
}

/// The busy sleep after `attempt` earlier tries: 100 µs growing by 50 µs per
/// try up to 2 ms, plus up to 50% jitter so that waiting processes do not
/// wake in lockstep.
fn busy_sleep(attempt: u64) -> Duration {
    let base = BUSY_SLEEP_MIN_US
        .saturating_add(BUSY_SLEEP_STEP_US.saturating_mul(attempt))
        .min(BUSY_SLEEP_MAX_US);
    let jitter = rand::random::<u64>() % (base / 2 + 1);
    Duration::from_micros(base + jitter)
}
