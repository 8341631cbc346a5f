//! End-to-end test harness of the chat cluster.
//!
//! Owns: starting real `chat-node` processes (each in its own temp dir, with
//! its own config file, data dir and log file, on a free port of 127.0.0.1),
//! and a real WebSocket client that speaks the client protocol of
//! `docs/protocol.md` in both encodings (JSON text frames and protobuf binary
//! frames).
//!
//! Who talks to it: the end-to-end tests in `tests/tests/*.rs`. Each test
//! starts its own node (or its own cluster of nodes with their own store),
//! so tests run in parallel without sharing state.
//!
//! What it must not do: reach any address but 127.0.0.1, wait without a
//! timeout, or loop without a bound. It knows the server only through its
//! command line, its config file format, HTTP and the WebSocket protocol; it
//! depends on no server crate (only on `proto` for the message types).
//!
//! Which binary: the env var `CHAT_NODE_BIN` if set, else
//! `<target dir>/debug/chat-node` of this workspace (run
//! `cargo build -p node --bin chat-node` first; `scripts/test.sh` does).
//!
//! Layout:
//! - [`node`]: [`NodeProcess`] (start, readiness, kill -9, restart, SIGTERM
//!   on drop) and [`NodeConfig`] (the TOML config the harness writes).
//! - [`client`]: [`Client`], a WebSocket client with request/reply matching,
//!   a push buffer and typed helpers (`create_group`, `send`, `history`, ...).
//! - [`auth`]: JWT minting (valid, expired, badly signed; operator tokens).
//! - [`http`]: a tiny HTTP/1.1 client for `/healthz`, `/metrics` and the
//!   operator's `/admin/...` endpoints; Prometheus sample lookup.
//! - [`check`]: assertions shared by tests (dense seqs, system messages).
//! - [`cluster`]: [`Cluster`], several nodes sharing one store and joined
//!   with ractor_cluster (start and wait until all see all live, add a node,
//!   drain, kill -9, SIGSTOP/SIGCONT, admin status/owner/system, metrics).
//! - [`failover`]: senders that retry with the same clientMsgId and
//!   receivers that reconnect and catch up while nodes come and go, and the
//!   final checks of a group's log against what they saw.
//! - [`placement`]: a copy of the server's rendezvous placement, to pick
//!   groups that will move when a node joins (always checked against the
//!   server's `/admin/owner`).
#![warn(missing_docs)]

pub mod auth;
pub mod check;
pub mod client;
pub mod cluster;
pub mod failover;
pub mod http;
pub mod node;
pub mod placement;

pub use client::{Client, ClientOptions, Mode, ServerError};
pub use cluster::{Cluster, ClusterOptions, Seeds};
pub use node::{ClusterConfig, NodeConfig, NodeProcess};
pub use proto::v1;

use std::time::Duration;

/// Default timeout of one request/reply round trip.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the harness waits for a node to answer `/healthz` after start.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `Drop` waits for a node to exit after SIGTERM before SIGKILL.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

/// How long a test waits for an expected push.
pub const PUSH_WAIT: Duration = Duration::from_secs(10);

/// A fresh user id starting with `name` (tests never share users).
pub fn user(name: &str) -> String {
    unique(&format!("{name}-"))
}

/// A unique-enough suffix for names in one test run (user ids, message ids).
pub fn unique(prefix: &str) -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{prefix}{n:016x}")
}
