//! Async access to storage for actors: runs [`storage`] transactions on
//! tokio's blocking pool so no actor ever blocks a runtime worker.
//!
//! Transaction closures may run several times (conflict retries): they must
//! only touch the transaction.

use std::sync::Arc;

use storage::model::Model;
use storage::{Kv, TxError, Txn};

use crate::error::{ChatError, ChatResult};

/// A transaction closure's result.
pub type TxResult<T> = Result<T, TxError<ChatError>>;

/// The store and its chat model. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
    model: Model,
}

/// Key prefix of the chat keyspace.
pub const KEY_PREFIX: &[u8] = b"chat";

impl Store {
    /// Wraps an opened engine.
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Store {
            kv,
            model: Model::new(KEY_PREFIX),
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
        let this = self.clone();
        tokio::task::spawn_blocking(move || storage::run(&*this.kv, |t| f(t, &this.model)))
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
        let this = self.clone();
        tokio::task::spawn_blocking(move || storage::read(&*this.kv, |t| f(t, &this.model)))
            .await
            .map_err(|e| ChatError::Internal(format!("storage task: {e}")))?
            .map_err(ChatError::from)
    }
}
