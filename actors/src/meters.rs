//! The metric handles of the actors' hot paths, looked up once.
//!
//! `metrics::counter!("name")` finds its counter in the recorder's registry
//! at every call: it hashes the key, takes a read lock and compares names
//! (labels too), about 1% of the node's CPU in 1,000-group durable appends
//! (docs/benchmarks.md, round 21). The router resolves these handles when
//! it starts and every actor shares them; rare events (fencing, gaps,
//! activations) still use the macros.
//!
//! A handle resolved before a recorder is installed records nothing, for
//! good: the node installs its recorder before it starts the router, and a
//! test that reads metrics must install its own before starting one.
//!
//! Who talks to it: the router builds it; the relay, the commit stage,
//! group and session actors and the cluster port record through it. It
//! must not hold anything but handles.

use metrics::{Counter, Histogram, counter, histogram};
use proto::codec::{KIND_NAMES, kind_index};
use proto::v1::client_frame;

/// The shared handles (see the module doc).
pub struct Meters {
    /// `chat_requests_total{kind}`, in [`KIND_NAMES`] order.
    requests: [Counter; KIND_NAMES.len()],
    /// `chat_messages_committed_total`.
    pub committed: Counter,
    /// `chat_commit_batch_messages`.
    pub commit_batch: Histogram,
    /// `chat_group_pipelined_commits_total`.
    pub pipelined: Counter,
    /// `chat_receipt_pushes_total`.
    pub receipt_pushes: Counter,
    /// `chat_relay_deliveries_total`.
    pub deliveries: Counter,
    /// `chat_commit_groups_per_txn`.
    pub txn_groups: Histogram,
    /// `chat_commit_entries_per_txn`.
    pub txn_entries: Histogram,
    /// `chat_commit_txn_seconds`: a commit round on the writer, from
    /// taking its jobs to its commit.
    pub txn_seconds: Histogram,
    /// `chat_commit_wait_seconds`: the part of a round before its first
    /// statement (the engine's `BEGIN`, which waits for its write lock).
    pub txn_wait: Histogram,
    /// `chat_cluster_envelopes_out_total`.
    pub envelopes_out: Counter,
    /// `chat_cluster_envelopes_in_total`.
    pub envelopes_in: Counter,
    /// `chat_cluster_forwarded_requests_total`.
    pub forwarded: Counter,
    /// `chat_fanout_remote_sends_total`.
    pub remote_sends: Counter,
}

impl Meters {
    /// Looks every handle up in the installed recorder (if none is
    /// installed, the handles record nothing).
    pub fn resolve() -> Meters {
        Meters {
            requests: KIND_NAMES.map(|kind| counter!("chat_requests_total", "kind" => kind)),
            committed: counter!("chat_messages_committed_total"),
            commit_batch: histogram!("chat_commit_batch_messages"),
            pipelined: counter!("chat_group_pipelined_commits_total"),
            receipt_pushes: counter!("chat_receipt_pushes_total"),
            deliveries: counter!("chat_relay_deliveries_total"),
            txn_groups: histogram!("chat_commit_groups_per_txn"),
            txn_entries: histogram!("chat_commit_entries_per_txn"),
            txn_seconds: histogram!("chat_commit_txn_seconds"),
            txn_wait: histogram!("chat_commit_wait_seconds"),
            envelopes_out: counter!("chat_cluster_envelopes_out_total"),
            envelopes_in: counter!("chat_cluster_envelopes_in_total"),
            forwarded: counter!("chat_cluster_forwarded_requests_total"),
            remote_sends: counter!("chat_fanout_remote_sends_total"),
        }
    }

    /// `chat_requests_total` for requests of `kind`.
    pub fn requests(&self, kind: &client_frame::Kind) -> &Counter {
        &self.requests[kind_index(kind)]
    }
}

impl Default for Meters {
    /// [`Meters::resolve`]: the installed recorder's handles.
    fn default() -> Meters {
        Meters::resolve()
    }
}

impl std::fmt::Debug for Meters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Meters")
    }
}
