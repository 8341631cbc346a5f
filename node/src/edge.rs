//! The edge: the one place where internal outcomes become wire frames.
//!
//! Maps [`ChatError`] and frame decode errors to protocol error codes, and
//! encodes outbound items in a connection's encoding.

use actors::ChatError;
use actors::outbound::{Outbound, SharedPush};
use proto::Encoding;
use proto::codec::{self, DecodeError};
use proto::v1::{ErrorCode, ServerFrame};
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

/// The protocol error code of a request failure.
pub fn error_code(e: &ChatError) -> ErrorCode {
    match e {
        ChatError::Forbidden(_) => ErrorCode::Forbidden,
        ChatError::NotFound(_) => ErrorCode::NotFound,
        ChatError::Invalid(_) => ErrorCode::Invalid,
        ChatError::TooLarge(_) => ErrorCode::TooLarge,
        ChatError::RateLimited => ErrorCode::RateLimited,
        ChatError::GroupFull { .. } => ErrorCode::GroupFull,
        ChatError::Unavailable(_) => ErrorCode::Unavailable,
        ChatError::Internal(_) => ErrorCode::Internal,
    }
}

/// The error frame answering request `id` with `e`.
pub fn error_frame(id: u64, e: &ChatError) -> ServerFrame {
    let code = error_code(e);
    metrics::counter!("chat_errors_total", "code" => code.as_str_name()).increment(1);
    if code == ErrorCode::Internal {
        tracing::error!(request = id, error = %e, "internal error");
    }
    codec::error(id, code, e.to_string())
}

/// A decode failure as a request failure.
pub fn decode_error(e: &DecodeError) -> ChatError {
    ChatError::Invalid(e.to_string())
}

fn encode(frame: &ServerFrame, enc: Encoding) -> Message {
    match enc {
        Encoding::Json => Message::Text(Utf8Bytes::from(codec::encode_json(frame))),
        Encoding::Binary => Message::Binary(Bytes::from(codec::encode_binary(frame))),
    }
}

/// The WebSocket message of one shared push in `encoding`.
pub fn push_message(p: &SharedPush, encoding: Encoding) -> Message {
    match encoding {
        Encoding::Binary => Message::Binary(p.binary().clone()),
        // SharedPush::json is produced by serde_json, always UTF-8; the
        // fallback re-encodes rather than panicking.
        Encoding::Json => match Utf8Bytes::try_from(p.json().clone()) {
            Ok(text) => Message::Text(text),
            Err(_) => encode(p.frame(), Encoding::Json),
        },
    }
}

/// The WebSocket message for a reply or single push (batches are expanded
/// by the caller with [`push_message`]); pushes use `push_encoding`.
pub fn to_message(item: Outbound, push_encoding: Encoding) -> Message {
    match item {
        Outbound::Reply {
            id,
            encoding,
            result,
        } => {
            let frame = match *result {
                Ok(kind) => codec::reply(id, kind),
                Err(e) => error_frame(id, &e),
            };
            encode(&frame, encoding)
        }
        Outbound::Push(p) => push_message(&p, push_encoding),
        Outbound::Batch(b) => match b.first() {
            Some(p) => push_message(p, push_encoding),
            None => Message::Ping(Bytes::new()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_code() {
        let cases = [
            (ChatError::Forbidden(String::new()), ErrorCode::Forbidden),
            (ChatError::NotFound(String::new()), ErrorCode::NotFound),
            (ChatError::Invalid(String::new()), ErrorCode::Invalid),
            (ChatError::TooLarge(String::new()), ErrorCode::TooLarge),
            (ChatError::RateLimited, ErrorCode::RateLimited),
            (
                ChatError::GroupFull {
                    members: 1,
                    max_members: 1,
                },
                ErrorCode::GroupFull,
            ),
            (
                ChatError::Unavailable(String::new()),
                ErrorCode::Unavailable,
            ),
            (ChatError::Internal(String::new()), ErrorCode::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(error_code(&e), code);
        }
    }

    #[test]
    fn replies_use_the_request_encoding() {
        let item = Outbound::Reply {
            id: 3,
            encoding: Encoding::Binary,
            result: Box::new(Err(ChatError::RateLimited)),
        };
        let Message::Binary(b) = to_message(item, Encoding::Json) else {
            panic!("binary reply expected")
        };
        let f = <ServerFrame as prost::Message>::decode(&b[..]).expect("decodes");
        assert_eq!(f.id, 3);
    }
}
