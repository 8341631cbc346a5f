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

impl ChatError {
    /// The error as it crosses between nodes (code and message).
    pub fn to_wire(&self) -> proto::v1::Error {
        use proto::v1::ErrorCode as C;
        let (code, message) = match self {
            ChatError::Forbidden(m) => (C::Forbidden, m.clone()),
            ChatError::NotFound(m) => (C::NotFound, m.clone()),
            ChatError::Invalid(m) => (C::Invalid, m.clone()),
            ChatError::TooLarge(m) => (C::TooLarge, m.clone()),
            ChatError::RateLimited => (C::RateLimited, String::new()),
            ChatError::GroupFull {
                members,
                max_members,
            } => (C::GroupFull, format!("{members}/{max_members}")),
            ChatError::Unavailable(m) => (C::Unavailable, m.clone()),
            ChatError::Internal(m) => (C::Internal, m.clone()),
        };
        proto::v1::Error {
            code: code as i32,
            message,
        }
    }

    /// The error sent by another node with [`ChatError::to_wire`].
    pub fn from_wire(e: &proto::v1::Error) -> Self {
        use proto::v1::ErrorCode as C;
        let m = e.message.clone();
        match e.code() {
            C::Forbidden => ChatError::Forbidden(m),
            C::NotFound => ChatError::NotFound(m),
            C::Invalid => ChatError::Invalid(m),
            C::TooLarge => ChatError::TooLarge(m),
            C::RateLimited => ChatError::RateLimited,
            C::GroupFull => {
                let (a, b) = m.split_once('/').unwrap_or(("0", "0"));
                ChatError::GroupFull {
                    members: a.parse().unwrap_or(0),
                    max_members: b.parse().unwrap_or(0),
                }
            }
            C::Unavailable | C::Unauthenticated => ChatError::Unavailable(m),
            C::Internal | C::Unspecified => ChatError::Internal(m),
        }
    }
}

/// A result of a client request.
pub type ChatResult<T> = Result<T, ChatError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_nodes_unchanged() {
        let all = [
            ChatError::Forbidden("f".into()),
            ChatError::NotFound("n".into()),
            ChatError::Invalid("i".into()),
            ChatError::TooLarge("t".into()),
            ChatError::RateLimited,
            ChatError::GroupFull {
                members: 3,
                max_members: 4,
            },
            ChatError::Unavailable("u".into()),
            ChatError::Internal("x".into()),
        ];
        for e in all {
            assert_eq!(ChatError::from_wire(&e.to_wire()), e);
        }
    }
}
