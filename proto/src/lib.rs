//! Client protocol of the chat cluster, in two encodings.
//!
//! Owns the `.proto` files under `proto/` and the Rust types prost generates
//! from them ([`v1`]), plus the one place where frames are decoded from and
//! encoded to the wire: protobuf bytes for binary WebSocket frames and the
//! canonical proto3 JSON mapping (pbjson) for text frames.
//!
//! Who talks to it: `node` decodes client frames and encodes server frames;
//! `actors` builds server frames and stores `Message` records as protobuf
//! bytes; the `tests` crate speaks the same types as a client.
//!
//! What it must not do: know about sockets, actors or storage. It depends on
//! none of the project's crates.
//!
//! Layout:
//! - [`v1`]: generated messages (`ClientFrame`, `ServerFrame`, ...).
//! - [`codec`]: decoding with typed errors, encoding, frame size limits.
#![warn(missing_docs)]

pub mod codec;

/// Generated protocol types, package `chat.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/chat.v1.serde.rs"));
}

pub use codec::{DecodeError, Encoding};
pub use v1::{ClientFrame, ServerFrame};
