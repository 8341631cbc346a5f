//! The actors crate's error type: what a request can fail with.
//!
//! These are domain outcomes, sent back to the client through its reply; the
//! `node` crate maps each variant to a protocol error code in one function.
//! Bugs that supervision should see are `ActorProcessingErr`s instead.

/// Why a client request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The user may not do this (not a member, not an admin).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such group or message.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is malformed or a value is out of range.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A field or the frame is over a limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The connection sends faster than its rate limit.
    #[error("rate limited")]
    RateLimited,
    /// Adding members would pass the group's member limit.
    #[error("group full: {members} of {max_members} members")]
    GroupFull {
        /// Members now.
        members: u32,
        /// The limit.
        max_members: u32,
    },
    /// Temporarily unable (storage timeout, group moving, shutting down); retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<storage::Error> for ChatError {
    fn from(e: storage::Error) -> Self {
        match e {
            storage::Error::Conflict | storage::Error::Timeout(_) => {
                ChatError::Unavailable(format!("storage busy: {e}"))
            }
            storage::Error::TooLarge(n) => ChatError::TooLarge(format!("record of {n} bytes")),
            storage::Error::Corrupt { .. } | storage::Error::Engine(_) => {
                ChatError::Internal(format!("storage: {e}"))
            }
        }
    }
}

impl From<storage::TxError<ChatError>> for ChatError {
    fn from(e: storage::TxError<ChatError>) -> Self {
        match e {
            storage::TxError::Abort(e) => e,
            storage::TxError::Db(e) => e.into(),
        }
    }
}

/// A result of a client request.
pub type ChatResult<T> = Result<T, ChatError>;
