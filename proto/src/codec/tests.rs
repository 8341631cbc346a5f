use super::*;
use crate::v1::{Role, client_frame::Kind};

#[test]
fn json_request_with_u64_as_string_or_number() {
    for text in [
        r#"{"id":"7","send":{"groupId":"g1","clientMsgId":"c1","text":"hi","replyToSeq":"3"}}"#,
        r#"{"id":7,"send":{"group_id":"g1","client_msg_id":"c1","text":"hi","reply_to_seq":3}}"#,
    ] {
        let f = decode_json(text).expect("decodes");
        assert_eq!(f.id, 7);
        let Some(Kind::Send(s)) = f.kind else {
            panic!("not a send")
        };
        assert_eq!(s.group_id, "g1");
        assert_eq!(s.client_msg_id, "c1");
        assert_eq!(s.reply_to_seq, Some(3));
    }
}

#[test]
fn json_enums_by_name_and_empty_messages() {
    let f = decode_json(r#"{"id":1,"setRole":{"groupId":"g","userId":"u","role":"ADMIN"}}"#)
        .expect("decodes");
    let Some(Kind::SetRole(r)) = f.kind else {
        panic!("not setRole")
    };
    assert_eq!(r.role(), Role::Admin);
    let f = decode_json(r#"{"id":2,"sync":{}}"#).expect("decodes");
    assert!(matches!(f.kind, Some(Kind::Sync(_))));
}

#[test]
fn json_unknown_fields_are_ignored() {
    let f = decode_json(r#"{"id":3,"future":true,"typing":{"groupId":"g","x":[1]}}"#)
        .expect("unknown fields ignored");
    assert!(matches!(f.kind, Some(Kind::Typing(_))));
}

#[test]
fn malformed_json_is_an_error_with_recovered_id() {
    let (id, e) = decode_json(r#"{"id":9,"send":{"groupId":5}}"#).expect_err("bad type");
    assert_eq!(id, 9);
    assert!(matches!(e, DecodeError::Json(_)));
    let (id, _) = decode_json("{not json").expect_err("not json");
    assert_eq!(id, 0);
    let (id, e) = decode_json(r#"{"id":"4"}"#).expect_err("no kind");
    assert_eq!(id, 4);
    assert!(matches!(e, DecodeError::NoKind));
}

#[test]
fn binary_round_trip_and_garbage() {
    let frame = ClientFrame {
        id: 42,
        kind: Some(Kind::History(v1::History {
            group_id: "g".into(),
            after_seq: Some(10),
            before_seq: None,
            limit: 5,
            thread_seq: None,
        })),
    };
    let bytes = prost::Message::encode_to_vec(&frame);
    assert_eq!(decode_binary(&bytes).expect("decodes"), frame);
    let (_, e) = decode_binary(&[0xff, 0xff, 0xff, 0xff, 0xff]).expect_err("garbage");
    assert!(matches!(e, DecodeError::Protobuf(_)));
}

#[test]
fn server_frames_encode_in_both_encodings() {
    let f = reply(
        5,
        server_frame::Kind::Sent(v1::Sent {
            group_id: "g".into(),
            client_msg_id: "c".into(),
            seq: 12,
            sent_at_ms: 1_700_000_000_000,
        }),
    );
    let json = encode_json(&f);
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid json");
    assert_eq!(v["id"], "5");
    assert_eq!(v["sent"]["seq"], "12");
    assert_eq!(v["sent"]["groupId"], "g");
    let back: ServerFrame = serde_json::from_str(&json).expect("round trip");
    assert_eq!(back, f);
    let bin = encode_binary(&f);
    assert_eq!(
        <ServerFrame as prost::Message>::decode(&bin[..]).expect("decodes"),
        f
    );
    let e = encode_json(&error(0, v1::ErrorCode::TooLarge, "big"));
    assert!(e.contains(r#""code":"TOO_LARGE""#), "{e}");
}

#[test]
fn kind_names_are_the_json_keys_of_their_kinds() {
    let mut seen = std::collections::HashSet::new();
    for (i, name) in KIND_NAMES.iter().enumerate() {
        let f = decode_json(&format!(r#"{{"id":1,"{name}":{{}}}}"#)).expect("decodes");
        let kind = f.kind.expect("has a kind");
        assert_eq!(kind_index(&kind), i, "{name}");
        assert!(seen.insert(std::mem::discriminant(&kind)), "{name} twice");
    }
}
