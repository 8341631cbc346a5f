//! Async access to storage for actors: runs [`storage`] transactions on
//! tokio's blocking pool so no actor ever blocks a runtime worker.
//!
//! At most [`Kv::parallelism`] transactions of each mode run at once; the
//! others wait here, as futures, in arrival order. Without that bound a
//! burst (10,000 sessions connecting, each reading its groups) put one
//! blocking thread per waiting transaction on the pool (up to 119 threads
//! for four reader connections, measured), each parked on the engine's
//! connection pool and each keeping its own stack and allocator caches.
//! Reads and writes wait apart, so commits never queue behind a burst of
//! reads.
//!
//! Transaction closures may run several times (conflict retries): they must
//! only touch the transaction.

use std::sync::Arc;
use std::time::Duration;

use storage::model::Model;
use storage::{Kv, TxError, TxMode, Txn};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ChatError, ChatResult};

/// A transaction closure's result.
pub type TxResult<T> = Result<T, TxError<ChatError>>;

/// How long a transaction may wait for its turn before it fails with
/// [`storage::Error::Timeout`] (the engine's own lock waits come on top).
pub const TURN_WAIT: Duration = Duration::from_secs(10);

/// The store and its chat model. Cheap to clone.
///
/// Invariant: a transaction of mode `m` runs only while holding a permit of
/// `m`'s semaphore, sized [`Kv::parallelism`]`(m)`; the permit moves into
/// the blocking task, so it is released when the transaction ends even if
/// the caller stopped waiting.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
    model: Model,
    /// Turns for read-write transactions.
    writes: Arc<Semaphore>,
    /// Turns for read-only transactions.
    reads: Arc<Semaphore>,
}

/// Key prefix of the chat keyspace.
pub const KEY_PREFIX: &[u8] = b"chat";

impl Store {
    /// Wraps an opened engine.
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        let turns = |mode| Arc::new(Semaphore::new(kv.parallelism(mode).max(1)));
        Store {
            writes: turns(TxMode::ReadWrite),
            reads: turns(TxMode::ReadOnly),
            kv,
            model: Model::new(KEY_PREFIX),
        }
    }

    /// Waits (up to [`TURN_WAIT`]) for a turn on `turns`.
    async fn turn(turns: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, storage::Error> {
        match tokio::time::timeout(TURN_WAIT, turns.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphores are never closed; an error all the same.
            Ok(Err(_)) => Err(storage::Error::Engine("storage turns closed".into())),
            Err(_) => Err(storage::Error::Timeout(format!(
                "no storage turn after {TURN_WAIT:?}"
            ))),
        }
    }

    /// The engine's name.
    pub fn engine(&self) -> &'static str {
        self.kv.engine()
    }

    /// Runs a read-write transaction on the blocking pool.
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
        let permit = Self::turn(&self.writes).await?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            storage::run(&*this.kv, |t| f(t, &this.model))
        })
        .await
        .unwrap_or_else(|e| {
            Err(TxError::Db(storage::Error::Engine(format!(
                "storage task failed: {e}"
            ))))
        })
    }

    /// Runs a read-only (snapshot) transaction on the blocking pool.
    pub async fn read<T, F>(&self, mut f: F) -> ChatResult<T>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Txn, &Model) -> TxResult<T> + Send + 'static,
    {
        let permit = Self::turn(&self.reads).await?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            storage::read(&*this.kv, |t| f(t, &this.model))
        })
        .await
        .map_err(|e| ChatError::Internal(format!("storage task: {e}")))?
        .map_err(ChatError::from)
    }
}
