//! The `Kv` contract: an ordered, transactional key-value store with
//! FoundationDB's transaction model.
//!
//! A transaction reads a consistent snapshot, sees its own writes, buffers
//! writes and commits them atomically, or fails with [`Error::Conflict`]
//! (retryable). [`run`] and [`read`] wrap a closure in a retry loop; the
//! closure may run several times, so it must have no side effects beyond the
//! transaction (do those after `run` returns).
//!
//! All calls block the calling thread. Async code calls them from threads
//! of its own (the `actors` crate runs [`Kv::parallelism`] per mode), never
//! from a runtime worker.
//!
//! Keys are compared as unsigned bytes. Engines: [`crate::sqlite`] (embedded,
//! the default) and `crate::fdb` (feature `fdb`).

use std::time::Duration;

use crate::error::{Error, TxError};

/// Whether a transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMode {
    /// Reads only; engines may serve it from a snapshot without taking locks.
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

/// A range read's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeOpts {
    /// At most this many pairs (0 = no limit).
    pub limit: usize,
    /// Newest (greatest key) first.
    pub reverse: bool,
}

impl RangeOpts {
    /// Forward, with a limit (0 = none).
    pub fn forward(limit: usize) -> Self {
        RangeOpts {
            limit,
            reverse: false,
        }
    }
    /// Reverse (greatest key first), with a limit (0 = none).
    pub fn reverse(limit: usize) -> Self {
        RangeOpts {
            limit,
            reverse: true,
        }
    }
}

/// A key-value pair from a range read.
pub type Pair = (Vec<u8>, Vec<u8>);

/// One open transaction. Dropping it without [`Txn::commit`] rolls it back.
pub trait Txn {
    /// Reads one key.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;
    /// Reads the pairs with `begin <= key < end`, in key order (or reversed),
    /// at most `opts.limit` of them.
    fn get_range(&mut self, begin: &[u8], end: &[u8], opts: RangeOpts) -> Result<Vec<Pair>, Error>;
    /// The greatest key with `begin <= key < end`, without its value (a
    /// reverse range read of one pair, as far as conflicts go). Engines that
    /// can skip reading the value override it.
    fn last_key(&mut self, begin: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let mut last = self.get_range(begin, end, RangeOpts::reverse(1))?;
        Ok(last.pop().map(|(key, _)| key))
    }
    /// Writes a key (fails in a read-only transaction).
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error>;
    /// Writes `value` at `key` only if the key holds nothing; returns
    /// `false`, writing nothing, if it does. Fails in a read-only
    /// transaction. Where the engine can, one lookup instead of a `get`
    /// and a `set`.
    fn insert_new(&mut self, key: &[u8], value: &[u8]) -> Result<bool, Error>;
    /// Deletes a key.
    fn clear(&mut self, key: &[u8]) -> Result<(), Error>;
    /// Deletes every key with `begin <= key < end`.
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), Error>;
    /// Commits atomically and durably: once this returns `Ok`, the writes
    /// survive a crash of every process.
    fn commit(self: Box<Self>) -> Result<(), Error>;
}

/// An ordered transactional key-value store.
pub trait Kv: Send + Sync + 'static {
    /// Starts a transaction.
    fn begin(&self, mode: TxMode) -> Result<Box<dyn Txn + '_>, Error>;
    /// The engine's name, for logs and metrics.
    fn engine(&self) -> &'static str;
    /// How many transactions of `mode` this process can usefully run at
    /// once (at least 1). More only wait inside the engine, each holding a
    /// blocked thread: callers should queue the rest without a thread (the
    /// `actors` crate runs this many threads per mode).
    fn parallelism(&self, mode: TxMode) -> usize;
}

/// How many times [`run`] and [`read`] retry a conflict before giving up.
pub const MAX_RETRIES: u32 = 20;
/// How many times they retry a lock timeout: the engine already waited its
/// busy deadline, so one more try is enough before telling the caller.
pub const MAX_TIMEOUT_RETRIES: u32 = 1;

/// Whether a failed attempt number `attempt` (0-based) may be retried.
fn retry(e: &Error, attempt: u32) -> bool {
    match e {
        Error::Conflict => attempt < MAX_RETRIES,
        Error::Timeout(_) => attempt < MAX_TIMEOUT_RETRIES,
        _ => false,
    }
}

/// Runs `f` in a read-write transaction and commits it, retrying on
/// retryable errors (conflicts, lock timeouts) with a short jittered backoff.
///
/// `f` may run more than once: keep side effects out of it.
pub fn run<T, E>(
    kv: &dyn Kv,
    mut f: impl FnMut(&mut dyn Txn) -> Result<T, TxError<E>>,
) -> Result<T, TxError<E>> {
    retrying(|| {
        let mut txn = kv.begin(TxMode::ReadWrite)?;
        let value = f(txn.as_mut())?;
        txn.commit()?;
        Ok(value)
    })
}

/// Runs `f` in a read-only transaction (a consistent snapshot), retrying on
/// retryable errors.
pub fn read<T, E>(
    kv: &dyn Kv,
    mut f: impl FnMut(&mut dyn Txn) -> Result<T, TxError<E>>,
) -> Result<T, TxError<E>> {
    retrying(|| {
        let mut txn = kv.begin(TxMode::ReadOnly)?;
        f(txn.as_mut())
    })
}

/// Runs `attempt` until it succeeds, fails for good, or runs out of retries.
fn retrying<T, E>(mut attempt: impl FnMut() -> Result<T, TxError<E>>) -> Result<T, TxError<E>> {
    let mut tries = 0;
    loop {
        match attempt() {
            Err(TxError::Db(e)) if retry(&e, tries) => {
                tries += 1;
                backoff(tries);
            }
            other => return other,
        }
    }
}

fn backoff(attempt: u32) {
    let base_us = 200u64 << attempt.min(8);
    let jitter = rand::random::<u64>() % base_us;
    std::thread::sleep(Duration::from_micros(base_us + jitter));
}

/// The smallest key greater than every key that starts with `prefix`
/// (the end of a prefix range). `None` when no such key exists (all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
