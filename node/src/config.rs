//! The node's configuration file (TOML) and its command-line overrides.
//!
//! Every setting has a documented default except the node's name, listen
//! address and JWT secret; unknown keys are errors (a typo must not silently
//! fall back to a default). [`Config::validate`] runs before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actors::{ActorConfig, Limits, Tuning};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`.
    pub node: NodeSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[storage]`.
    #[serde(default)]
    pub storage: StorageSection,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[tuning]`.
    #[serde(default)]
    pub tuning: TuningSection,
    /// `[cluster]`: absent for a single node.
    pub cluster: Option<ClusterSection>,
}

/// `[cluster]`: how this node joins others (ractor_cluster).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The inter-node listener (`ip:port`).
    pub listen: SocketAddr,
    /// Shared secret of the cluster (ractor_cluster cookie authentication).
    pub cookie: String,
    /// Cluster addresses of other nodes to join through; any live one is enough.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Failure detector probe interval.
    #[serde(default = "default_ping_ms")]
    pub ping_interval_ms: u64,
    /// A peer that has not answered for this long is declared down.
    #[serde(default = "default_failure_ms")]
    pub failure_timeout_ms: u64,
    /// How often unreachable known nodes are dialled again.
    #[serde(default = "default_reconnect_ms")]
    pub reconnect_interval_ms: u64,
}

fn default_ping_ms() -> u64 {
    250
}
fn default_failure_ms() -> u64 {
    3_000
}
fn default_reconnect_ms() -> u64 {
    1_000
}

/// `[node]`: identity and listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Unique name of the node.
    pub name: String,
    /// HTTP + WebSocket listen address.
    pub listen: SocketAddr,
    /// Directory for the node's files (the embedded store).
    pub data_dir: PathBuf,
}

/// `[auth]`: client tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// HS256 secret of client JWTs.
    pub jwt_secret: String,
    /// Accepted clock skew on `exp`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_leeway() -> u64 {
    5
}

/// Storage engine choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// One SQLite file under `data_dir`.
    #[default]
    Embedded,
    /// A FoundationDB cluster (build with `--features fdb`).
    Foundationdb,
}

/// Durability of the embedded engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// fsync on every commit: survives power loss.
    #[default]
    Full,
    /// Survives process crashes (kill -9), not power loss.
    Normal,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Which engine.
    pub engine: Engine,
    /// Embedded: durability.
    pub sync: Sync,
    /// Embedded: the file, relative to `data_dir` unless absolute (default `chat.db`).
    pub path: Option<PathBuf>,
    /// FoundationDB: the cluster file (default: the client's default).
    #[cfg_attr(not(feature = "fdb"), allow(dead_code))]
    pub fdb_cluster_file: Option<String>,
    /// Nice value of the storage write threads (-20..=19, 0: unchanged).
    /// Raising their priority needs `CAP_SYS_NICE` or `RLIMIT_NICE`;
    /// without it the node logs a warning and runs them at the normal one.
    pub writer_nice: i32,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            engine: Engine::default(),
            sync: Sync::default(),
            path: None,
            fdb_cluster_file: None,
            // The commit writer is the embedded store's serial path; -10
            // gave 6–15% more 1,000-group appends (docs/benchmarks.md,
            // round 18).
            writer_nice: -10,
        }
    }
}

/// `[limits]`: what clients may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest client frame, bytes (larger: TOO_LARGE; over twice this: close 1009).
    pub max_frame_bytes: usize,
    /// Longest message text, bytes.
    pub max_text_bytes: usize,
    /// Requests per second per connection.
    pub rate_per_sec: u32,
    /// Request burst per connection.
    pub rate_burst: u32,
    /// Frames queued per connection before it is cut off as too slow.
    pub outbound_queue: usize,
    /// Requests of one connection in progress at once.
    pub max_in_flight: usize,
    /// Member limit of new groups.
    pub max_members: u32,
    /// Users per createGroup/addMembers/removeMembers.
    pub max_users_per_request: usize,
    /// Concurrent TCP connections.
    pub max_connections: usize,
    /// Groups up to this size get reader names in receipts.
    pub receipts_detail_limit: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let l = Limits::default();
        LimitsSection {
            max_frame_bytes: 64 * 1024,
            max_text_bytes: l.max_text_bytes,
            rate_per_sec: l.rate_per_sec,
            rate_burst: l.rate_burst,
            outbound_queue: l.outbound_queue,
            max_in_flight: l.max_in_flight,
            max_members: l.max_members,
            max_users_per_request: l.max_users_per_request,
            max_connections: 19_000,
            receipts_detail_limit: l.receipts_detail_limit,
        }
    }
}

/// `[tuning]`: internal timings, in milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuningSection {
    /// Pointer (read/delivered) write batching window.
    pub pointer_flush_ms: u64,
    /// Idle group actors stop after this long.
    pub group_idle_ms: u64,
    /// Typing indicators per user per group: at most one per this.
    pub typing_throttle_ms: u64,
    /// Timeout of internal calls.
    pub call_timeout_ms: u64,
    /// At most one receipts push per group per this interval.
    pub receipts_interval_ms: u64,
    /// A session silent for this long stops counting for its user's presence.
    pub presence_ttl_ms: u64,
    /// An online user's presence actor nobody watches passivates after this
    /// long without operations.
    pub presence_idle_ms: u64,
    /// Graceful shutdown deadline.
    pub shutdown_deadline_ms: u64,
}

impl Default for TuningSection {
    fn default() -> Self {
        let t = Tuning::default();
        TuningSection {
            pointer_flush_ms: t.pointer_flush.as_millis() as u64,
            group_idle_ms: t.group_idle.as_millis() as u64,
            typing_throttle_ms: t.typing_throttle.as_millis() as u64,
            call_timeout_ms: t.call_timeout.as_millis() as u64,
            receipts_interval_ms: t.receipts_interval.as_millis() as u64,
            presence_ttl_ms: t.presence_ttl.as_millis() as u64,
            presence_idle_ms: t.presence_idle.as_millis() as u64,
            shutdown_deadline_ms: 8_000,
        }
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: &str| Err(ConfigError::Invalid(s.to_string()));
        if actors::UserId::parse(&self.node.name).is_none() || self.node.name.contains('@') {
            return bad("node.name must be 1-128 characters of [A-Za-z0-9._-]");
        }
        if self.auth.jwt_secret.len() < 16 {
            return bad("auth.jwt_secret must be at least 16 bytes");
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 || l.max_frame_bytes > 16 * 1024 * 1024 {
            return bad("limits.max_frame_bytes must be in 1 KiB..=16 MiB");
        }
        if l.max_text_bytes >= l.max_frame_bytes {
            return bad("limits.max_text_bytes must be below limits.max_frame_bytes");
        }
        if l.max_connections == 0 {
            return bad("limits.max_connections must be positive");
        }
        if !(-20..=19).contains(&self.storage.writer_nice) {
            return bad("storage.writer_nice must be in -20..=19");
        }
        self.actor_config().validate().map_err(ConfigError::Invalid)
    }

    /// The embedded store's file.
    pub fn db_path(&self) -> PathBuf {
        let p = self
            .storage
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from("chat.db"));
        if p.is_absolute() {
            p
        } else {
            self.node.data_dir.join(p)
        }
    }

    /// The actors' view of the settings.
    pub fn actor_config(&self) -> ActorConfig {
        let l = &self.limits;
        let t = &self.tuning;
        ActorConfig {
            limits: Limits {
                max_text_bytes: l.max_text_bytes,
                max_members: l.max_members,
                max_users_per_request: l.max_users_per_request,
                outbound_queue: l.outbound_queue,
                max_in_flight: l.max_in_flight,
                receipts_detail_limit: l.receipts_detail_limit,
                rate_per_sec: l.rate_per_sec,
                rate_burst: l.rate_burst,
                ..Limits::default()
            },
            tuning: Tuning {
                pointer_flush: Duration::from_millis(t.pointer_flush_ms),
                group_idle: Duration::from_millis(t.group_idle_ms),
                typing_throttle: Duration::from_millis(t.typing_throttle_ms),
                call_timeout: Duration::from_millis(t.call_timeout_ms),
                receipts_interval: Duration::from_millis(t.receipts_interval_ms),
                presence_ttl: Duration::from_millis(t.presence_ttl_ms),
                presence_idle: Duration::from_millis(t.presence_idle_ms),
                ..Tuning::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_single_node_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config/single.toml");
        let c = Config::load(&path).expect("loads");
        c.validate().expect("valid");
        assert_eq!(c.storage.engine, Engine::Embedded);
        assert_eq!(c.db_path(), PathBuf::from("run/single/chat.db"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let base = "[node]\nname='n'\nlisten='127.0.0.1:1'\ndata_dir='d'\n[auth]\njwt_secret='0123456789abcdef'\n";
        let c: Config = toml::from_str(base).expect("minimal config");
        c.validate().expect("defaults are valid");
        assert!(toml::from_str::<Config>(&format!("{base}[limits]\nmax_frame_byte=5\n")).is_err());
        let short: Config =
            toml::from_str(&base.replace("0123456789abcdef", "short")).expect("parses");
        assert!(short.validate().is_err());
        let tiny: Config =
            toml::from_str(&format!("{base}[limits]\noutbound_queue=1\n")).expect("parses");
        assert!(tiny.validate().is_err());
    }

    #[test]
    fn writer_nice_defaults_to_raised_and_must_be_a_nice_value() {
        let base = "[node]\nname='n'\nlisten='127.0.0.1:1'\ndata_dir='d'\n[auth]\njwt_secret='0123456789abcdef'\n";
        let c: Config = toml::from_str(base).expect("minimal config");
        assert_eq!(c.storage.writer_nice, -10, "no [storage] table");
        let with: Config =
            toml::from_str(&format!("{base}[storage]\nsync='normal'\n")).expect("parses");
        assert_eq!(
            with.storage.writer_nice, -10,
            "a [storage] table without the key"
        );
        for (v, ok) in [
            (-20, true),
            (0, true),
            (19, true),
            (-21, false),
            (20, false),
        ] {
            let c: Config =
                toml::from_str(&format!("{base}[storage]\nwriter_nice={v}\n")).expect("parses");
            assert_eq!(c.validate().is_ok(), ok, "writer_nice = {v}");
        }
    }
}
