//! The storage crate's one error type.
//!
//! Engine failures are kept apart from "the caller aborted" (see
//! [`crate::TxError`]), so a retry loop never retries a caller's decision.

/// An error from a storage engine or the data model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transaction conflicted with a concurrent one; running it again may succeed.
    #[error("transaction conflict")]
    Conflict,
    /// The store did not answer in time (e.g. another process held the write lock too long).
    #[error("storage timeout: {0}")]
    Timeout(String),
    /// A value in the store could not be decoded.
    #[error("corrupt record at {key}: {reason}")]
    Corrupt {
        /// Printable form of the key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A write was larger than the engine accepts.
    #[error("value too large: {0} bytes")]
    TooLarge(usize),
    /// Any other engine failure (I/O, SQLite, FoundationDB).
    #[error("storage engine: {0}")]
    Engine(String),
}

impl Error {
    /// Whether running the same transaction again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Conflict | Error::Timeout(_))
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => Error::Timeout(e.to_string()),
            _ => Error::Engine(e.to_string()),
        }
    }
}

/// The outcome of a failed transaction closure: the caller's own decision to
/// abort, or a storage failure.
#[derive(Debug, thiserror::Error)]
pub enum TxError<E> {
    /// The closure returned `Err(TxError::Abort(e))`: nothing was committed.
    #[error("aborted")]
    Abort(E),
    /// The engine failed (after retries, for retryable errors).
    #[error(transparent)]
    Db(#[from] Error),
}
