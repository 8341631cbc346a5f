//! Decoding client frames and encoding server frames in both wire encodings.
//!
//! Binary frames are protobuf; text frames are proto3 JSON. Unknown fields are
//! ignored in both (newer clients keep working with older servers); a frame
//! with no request kind is a decode error, reported to the client as INVALID.

use prost::Message as _;

use crate::v1::{self, ClientFrame, ServerFrame, client_frame, server_frame};

/// The encoding a frame arrived in; replies use the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Protobuf bytes in a binary WebSocket frame.
    Binary,
    /// Canonical proto3 JSON in a text WebSocket frame.
    Json,
}

/// Why a client frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid protobuf `ClientFrame`.
    #[error("malformed protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// The text is not valid JSON for a `ClientFrame`.
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The frame parsed but names no request (or one this server does not know).
    #[error("frame has no known request kind")]
    NoKind,
}

/// Decodes a binary (protobuf) client frame. On error, the request id is 0:
/// a malformed protobuf message has no trustworthy fields.
pub fn decode_binary(bytes: &[u8]) -> Result<ClientFrame, (u64, DecodeError)> {
    let frame = ClientFrame::decode(bytes).map_err(|e| (0, e.into()))?;
    check_kind(frame)
}

/// Decodes a text (JSON) client frame. On error, the request id is recovered
/// when the text is a JSON object with a numeric `id`, so the client can match
/// the error to its request.
pub fn decode_json(text: &str) -> Result<ClientFrame, (u64, DecodeError)> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => check_kind(frame),
        Err(e) => Err((json_request_id(text), e.into())),
    }
}

fn json_request_id(text: &str) -> u64 {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) else {
        return 0;
    };
    match map.get("id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(serde_json::Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn check_kind(frame: ClientFrame) -> Result<ClientFrame, (u64, DecodeError)> {
    if frame.kind.is_none() {
        return Err((frame.id, DecodeError::NoKind));
    }
    Ok(frame)
}

/// Encodes a server frame as protobuf bytes.
pub fn encode_binary(frame: &ServerFrame) -> Vec<u8> {
    frame.encode_to_vec()
}

/// Encodes a server frame as JSON text.
pub fn encode_json(frame: &ServerFrame) -> String {
    // Serializing generated pbjson types into a String cannot fail: they hold
    // only strings, numbers, enums and nested messages, no maps with
    // non-string keys.
    serde_json::to_string(frame)
        .unwrap_or_else(|e| format!(r#"{{"error":{{"code":"INTERNAL","message":"encode: {e}"}}}}"#))
}

/// A reply frame.
pub fn reply(id: u64, kind: server_frame::Kind) -> ServerFrame {
    ServerFrame {
        id,
        kind: Some(kind),
    }
}

/// A push frame (no request id).
pub fn push(kind: server_frame::Kind) -> ServerFrame {
    reply(0, kind)
}

/// An error frame answering request `id` (0 for errors not tied to a request).
pub fn error(id: u64, code: v1::ErrorCode, message: impl Into<String>) -> ServerFrame {
    reply(
        id,
        server_frame::Kind::Error(v1::Error {
            code: code as i32,
            message: message.into(),
        }),
    )
}

/// The short names of the request kinds (their JSON keys), for metrics labels, in
/// [`kind_index`] order.
pub const KIND_NAMES: [&str; 16] = [
    "createGroup",
    "addMembers",
    "removeMembers",
    "setRole",
    "leaveGroup",
    "openDirect",
    "send",
    "history",
    "sync",
    "markDelivered",
    "markRead",
    "typing",
    "subscribePresence",
    "react",
    "readers",
    "heartbeat",
];

/// A request kind's position in [`KIND_NAMES`] (for per-kind tables such as
/// cached metric handles).
pub fn kind_index(kind: &client_frame::Kind) -> usize {
    use client_frame::Kind::*;
    match kind {
        CreateGroup(_) => 0,
        AddMembers(_) => 1,
        RemoveMembers(_) => 2,
        SetRole(_) => 3,
        LeaveGroup(_) => 4,
        OpenDirect(_) => 5,
        Send(_) => 6,
        History(_) => 7,
        Sync(_) => 8,
        MarkDelivered(_) => 9,
        MarkRead(_) => 10,
        Typing(_) => 11,
        SubscribePresence(_) => 12,
        React(_) => 13,
        Readers(_) => 14,
        Heartbeat(_) => 15,
    }
}

#[cfg(test)]
mod tests;
