//! Durable state of the chat cluster.
//!
//! Owns the [`Kv`] contract (an ordered transactional key-value store with
//! FoundationDB's transaction model), its engines, and the chat data model on
//! top of it (group logs, membership, pointers, dedupe, user indexes).
//!
//! Who talks to it: `actors` (group and session actors, from blocking threads)
//! and `node` (opening the configured engine). It depends on none of the
//! project's crates; message bodies are opaque bytes here (the `actors` crate
//! encodes them as protobuf).
//!
//! Layout:
//! - [`kv`]: the `Kv`/`Txn` traits, `run`/`read` retry loops.
//! - [`sqlite`]: the embedded engine (one SQLite file in WAL mode, shared safely
//!   by several processes on one machine, durable on commit).
//! - `fdb` (feature `fdb`): the FoundationDB engine.
//! - [`model`]: the chat keyspace and typed records.
//! - `readcache`: what the embedded engine's writer remembers of its reads
//!   between transactions.
//! - [`error`]: the crate's error type.
#![warn(missing_docs)]

pub mod error;
#[cfg(feature = "fdb")]
pub mod fdb;
pub mod kv;
pub mod model;
mod readcache;
pub mod sqlite;

#[cfg(test)]
mod conformance;

pub use error::{Error, TxError};
pub use kv::{Kv, Pair, RangeOpts, TxMode, Txn, prefix_end, read, run};
