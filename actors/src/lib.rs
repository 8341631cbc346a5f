//! The actors of the chat cluster and the routing API that addresses them by id.
//!
//! Owns the group actor (single writer of a group: sequence numbers, group
//! commit, fan-out, pointers), the session actor (one per connection), the
//! relay (one per node: delivers pushes to local sessions) and the host (one
//! per node: starts and supervises group actors), plus [`Router`], the one
//! way to reach an entity without knowing where it lives.
//!
//! Who talks to it: `node` starts a [`Router`] and one [`session::Session`]
//! per accepted WebSocket, and drains each connection's [`outbound`] queue;
//! internal services use [`Router`]. It uses `storage` (through [`store`],
//! off the async runtime) and `proto` (message types).
//!
//! What it must not do: touch sockets, signals or config files (that is
//! `node`), or block an async worker.
//!
//! Layout:
//! - [`ids`]: `UserId`, `GroupId`, `SessionId`.
//! - [`error`]: `ChatError`, the request failures `node` maps to error codes.
//! - [`config`]: limits and timings.
//! - [`store`]: async storage access; [`committer`]: the node's commit
//!   stage (many groups' batches in one transaction).
//! - [`outbound`]: bounded per-connection queues, shared pushes, reply handles.
//! - [`router`], [`host`]: addressing and supervision of group actors.
//! - [`cluster`], [`placement`]: the node's port, the wire between nodes,
//!   rendezvous placement.
//! - [`request`]: a client request's target group and checked operation.
//! - [`group`] (+ `group/plan.rs`, the pure commit planner, and
//!   `group/receipts.rs`, receipt aggregation), [`session`], [`relay`],
//!   [`presence`].
//! - [`ratelimit`]: the per-connection token bucket.
#![warn(missing_docs)]

pub mod cluster;
pub mod committer;
pub mod config;
pub mod error;
pub mod group;
pub mod host;
pub mod ids;
pub mod meters;
pub mod outbound;
pub mod placement;
pub mod presence;
pub mod ratelimit;
pub mod relay;
pub mod request;
pub mod router;
pub mod session;
pub mod store;

pub use config::{ActorConfig, Limits, Tuning};
pub use error::{ChatError, ChatResult};
pub use ids::{GroupId, SessionId, UserId};
pub use router::Router;
pub use store::{Store, StoreOptions};
