//! Identifiers: newtypes for users, groups and sessions, and their rules.
//!
//! User ids come from the JWT `sub`; group ids are minted here (random for
//! groups, derived from the pair for 1:1 chats). Validation lives here so the
//! edge (`node`) and the actors agree on what an id may contain.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Longest user or group id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses an id: 1 to 128 bytes of `[A-Za-z0-9._@-]`.
            pub fn parse(s: &str) -> Option<Self> {
                valid_id(s).then(|| $name(Arc::from(s)))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.0)
            }
        }
    };
}

string_id!(
    /// A user, as named by the `sub` claim of their token.
    UserId
);
string_id!(
    /// A chat group (including 1:1 chats).
    GroupId
);

impl UserId {
    /// The author of system announcements posted by internal services.
    pub fn system() -> Self {
        UserId(Arc::from("system"))
    }
}

impl GroupId {
    /// A fresh random id for a new group: `g_` and 26 hex digits.
    pub fn random() -> Self {
        let bits: u128 = rand::random();
        GroupId(Arc::from(format!("g_{:026x}", bits >> 24)))
    }

    /// The id of the 1:1 chat between two users: the same whichever side
    /// asks, and never equal to a random group's id (`d_` prefix).
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = Sha256::new();
        h.update(lo.as_str().as_bytes());
        h.update([0u8]);
        h.update(hi.as_str().as_bytes());
        let digest = h.finalize();
        GroupId(Arc::from(format!("d_{}", hex::encode(&digest[..16]))))
    }

    /// Whether this id names a 1:1 chat.
    pub fn is_direct(&self) -> bool {
        self.0.starts_with("d_")
    }
}

/// The wall clock in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A WebSocket session, unique within its node's lifetime.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(UserId::parse("alice").is_some());
        assert!(UserId::parse("a.b_c@d-e9").is_some());
        assert!(UserId::parse("").is_none());
        assert!(UserId::parse("has space").is_none());
        assert!(UserId::parse("ünï").is_none());
        assert!(UserId::parse(&"x".repeat(129)).is_none());
        assert!(UserId::parse(&"x".repeat(128)).is_some());
    }

    #[test]
    fn direct_ids_are_symmetric_and_distinct() {
        let a = UserId::parse("alice").expect("valid");
        let b = UserId::parse("bob").expect("valid");
        let c = UserId::parse("carol").expect("valid");
        assert_eq!(GroupId::direct(&a, &b), GroupId::direct(&b, &a));
        assert_ne!(GroupId::direct(&a, &b), GroupId::direct(&a, &c));
        assert!(GroupId::direct(&a, &b).is_direct());
        let g = GroupId::random();
        assert!(!g.is_direct());
        assert!(GroupId::parse(g.as_str()).is_some());
        assert_ne!(g, GroupId::random());
    }
}
