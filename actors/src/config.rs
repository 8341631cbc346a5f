//! Settings the actors run with: client-facing limits and internal timings.
//!
//! Built by `node` from its config file; checked once by [`ActorConfig::validate`]
//! before any actor starts.

use std::time::Duration;

/// Limits on what one request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest message text, in bytes.
    pub max_text_bytes: usize,
    /// Member limit given to new groups.
    pub max_members: u32,
    /// Most user ids in one `createGroup` / `addMembers` / `removeMembers`.
    pub max_users_per_request: usize,
    /// Most mentions in one message.
    pub max_mentions: usize,
    /// Most attachments in one message.
    pub max_attachments: usize,
    /// Longest group name, in bytes.
    pub max_name_bytes: usize,
    /// Largest `history` page.
    pub max_history: usize,
    /// Frames queued for one connection before it is cut off as too slow.
    pub outbound_queue: usize,
    /// Requests of one connection being processed at once; the connection
    /// stops reading its socket past this.
    pub max_in_flight: usize,
    /// Groups up to this many members get reader names in receipts; larger
    /// ones get counts only.
    pub receipts_detail_limit: usize,
    /// Requests per second per connection (average).
    pub rate_per_sec: u32,
    /// Requests per connection in a burst.
    pub rate_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text_bytes: 16 * 1024,
            max_members: 100_000,
            max_users_per_request: 1_000,
            max_mentions: 50,
            max_attachments: 10,
            max_name_bytes: 256,
            max_history: 500,
            outbound_queue: 4_096,
            max_in_flight: 64,
            receipts_detail_limit: 100,
            rate_per_sec: 100,
            rate_burst: 200,
        }
    }
}

/// Internal timings.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How long read/delivered pointer updates wait to be written together.
    pub pointer_flush: Duration,
    /// A group actor with no traffic for this long stops (after flushing).
    pub group_idle: Duration,
    /// At most one typing indicator per user per group per this interval.
    pub typing_throttle: Duration,
    /// Timeout of every actor call.
    pub call_timeout: Duration,
    /// At most one receipts push per group per this interval.
    pub receipts_interval: Duration,
    /// A session that shows no sign of life for this long stops counting
    /// for its user's presence.
    pub presence_ttl: Duration,
    /// A presence actor of an online user nobody watches passivates after
    /// this long without operations (its state stays with the host).
    pub presence_idle: Duration,
    /// Recent `clientMsgId`s a group actor remembers (older retries are
    /// answered from storage).
    pub dedupe_cache: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            pointer_flush: Duration::from_millis(200),
            group_idle: Duration::from_secs(300),
            typing_throttle: Duration::from_secs(3),
            call_timeout: Duration::from_secs(10),
            receipts_interval: Duration::from_millis(500),
            presence_ttl: Duration::from_secs(60),
            presence_idle: Duration::from_secs(10),
            dedupe_cache: 4_096,
        }
    }
}

/// Everything the actors are configured with.
#[derive(Debug, Clone, Default)]
pub struct ActorConfig {
    /// Client-facing limits.
    pub limits: Limits,
    /// Internal timings.
    pub tuning: Tuning,
}

impl ActorConfig {
    /// Refuses settings the actors cannot honour.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.max_members < 2 {
            return Err("max_members must be at least 2".into());
        }
        if l.outbound_queue < 16 {
            return Err("outbound_queue must be at least 16".into());
        }
        if l.max_in_flight == 0 || l.max_in_flight > l.outbound_queue {
            return Err("max_in_flight must be in 1..=outbound_queue".into());
        }
        if l.max_history == 0 || l.max_text_bytes == 0 {
            return Err("max_history and max_text_bytes must be positive".into());
        }
        let t = &self.tuning;
        if t.pointer_flush.is_zero() || t.call_timeout.is_zero() {
            return Err("pointer_flush and call_timeout must be positive".into());
        }
        if t.group_idle < t.pointer_flush * 2 {
            return Err("group_idle must be at least twice pointer_flush".into());
        }
        Ok(())
    }
}
