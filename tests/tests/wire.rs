//! End-to-end bad input and limits: malformed JSON and protobuf, frames with
//! no request kind, unknown fields (accepted), frames and texts over the
//! limits (TOO_LARGE; far over: close 1009), unknown groups (NOT_FOUND),
//! GROUP_FULL, RATE_LIMITED, invalid field values; after each error the same
//! connection still works. Also: which encoding the server answers in.
//!
//! Each test starts its own `chat-node` process with the limits it needs.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use prost::Message as _;
use tests::check::{self, is_error, system_kind};
use tests::client::{ClientOptions, reply_kind, send_req};
use tests::user;
use tests::v1::{self, ClientFrame, ErrorCode, client_frame::Kind as Req, server_frame::Kind};
use tests::{Client, Mode, NodeConfig, NodeProcess};

/// The error carried by `frame`, or a failure naming `what`.
fn error_of(frame: &v1::ServerFrame, what: &str) -> Result<ErrorCode> {
    match &frame.kind {
        Some(Kind::Error(e)) => Ok(ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified)),
        other => bail!("{what}: expected an error frame, got {other:?}"),
    }
}

/// Waits for the error answering a frame the server may not be able to
/// attribute to its request: the first error frame with id 0 or `id`.
/// Returns the error's id and code.
async fn next_error(cl: &mut Client, id: u64, what: &str) -> Result<(u64, ErrorCode)> {
    let f = cl
        .next_frame_matching(Duration::from_secs(10), |f| {
            (f.id == 0 || f.id == id) && matches!(f.kind, Some(Kind::Error(_)))
        })
        .await?
        .with_context(|| format!("{what}: no error frame within 10 s"))?;
    Ok((f.id, error_of(&f, what)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_invalid_and_the_connection_survives() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let a = user("alice");
    let mut cl = Client::connect(&node, &a).await?;
    let gid = cl.create_group("wire", &[]).await?;

    // Text that is not JSON: INVALID with id 0.
    cl.send_text("this is not json {").await?;
    let (_, code) = next_error(&mut cl, 0, "non-JSON text").await?;
    ensure!(code == ErrorCode::Invalid, "non-JSON text: {code:?}");
    cl.heartbeat().await?;

    // JSON of the wrong shape: INVALID with the frame's id.
    let (f, _) = cl
        .request_raw_text(7, r#"{"id": 7, "send": {"groupId": 5}}"#)
        .await?;
    ensure!(
        error_of(&f, "wrong JSON type")? == ErrorCode::Invalid,
        "wrong JSON type: {f:?}"
    );
    cl.heartbeat().await?;
    cl.send_text("[1, 2, 3]").await?; // JSON, but no object: no id to echo
    let (_, code) = next_error(&mut cl, 0, "JSON array").await?;
    ensure!(code == ErrorCode::Invalid, "JSON array: {code:?}");
    cl.heartbeat().await?;

    // No request kind: INVALID with the id, in both encodings.
    let (f, _) = cl.request_raw_text(9, r#"{"id": 9}"#).await?;
    ensure!(
        error_of(&f, "no kind (JSON)")? == ErrorCode::Invalid,
        "no kind (JSON): {f:?}"
    );
    let (f, _) = cl
        .request_raw_text(11, r#"{"id": 11, "fooBar": {}}"#)
        .await?;
    ensure!(
        error_of(&f, "unknown kind (JSON)")? == ErrorCode::Invalid,
        "unknown kind (JSON): {f:?}"
    );
    cl.send_binary(ClientFrame { id: 10, kind: None }.encode_to_vec())
        .await?;
    let f = cl.wait_reply(10).await?;
    ensure!(
        error_of(&f, "no kind (binary)")? == ErrorCode::Invalid,
        "no kind (binary): {f:?}"
    );
    cl.heartbeat().await?;

    // Bytes that are not protobuf: INVALID with id 0.
    cl.send_binary(vec![0xff; 8]).await?;
    let (_, code) = next_error(&mut cl, 0, "garbage binary").await?;
    ensure!(code == ErrorCode::Invalid, "garbage binary: {code:?}");
    let mut truncated = ClientFrame {
        id: 12,
        kind: Some(Req::Send(send_req(&gid, "t-1", "truncated frame"))),
    }
    .encode_to_vec();
    truncated.truncate(truncated.len() - 5);
    cl.send_binary(truncated).await?;
    let (_, code) = next_error(&mut cl, 0, "truncated protobuf").await?;
    ensure!(code == ErrorCode::Invalid, "truncated protobuf: {code:?}");
    cl.heartbeat().await?;

    // Unknown fields are accepted (JSON, top level and nested; protobuf).
    let (f, _) = cl
        .request_raw_text(
            13,
            r#"{"id": 13, "sync": {"future": true}, "extra": [1, {"a": null}]}"#,
        )
        .await?;
    ensure!(
        matches!(f.kind, Some(Kind::Groups(_))),
        "sync with unknown fields: {f:?}"
    );
    let raw = format!(
        r#"{{"id": 14, "send": {{"groupId": "{gid}", "clientMsgId": "u-1", "text": "unknown fields", "newThing": {{"x": 1}}}}}}"#
    );
    let (f, _) = cl.request_raw_text(14, &raw).await?;
    let seq_u1 = match f.kind {
        Some(Kind::Sent(s)) => s.seq,
        other => bail!("send with an unknown field: {other:?}"),
    };
    let mut bytes = ClientFrame {
        id: 15,
        kind: Some(Req::Heartbeat(v1::Heartbeat {})),
    }
    .encode_to_vec();
    // Field 999, varint 42: tag (999 << 3 | 0) as a varint, then the value.
    let mut tag = (999u64 << 3) as u32;
    while tag >= 0x80 {
        bytes.push((tag as u8) | 0x80);
        tag >>= 7;
    }
    bytes.push(tag as u8);
    bytes.push(42);
    cl.send_binary(bytes).await?;
    let f = cl.wait_reply(15).await?;
    ensure!(
        matches!(f.kind, Some(Kind::Ok(_))),
        "protobuf with an unknown field: {f:?}"
    );

    // snake_case names and 64-bit values as strings or numbers.
    let raw = format!(r#"{{"id": "16", "mark_read": {{"group_id": "{gid}", "seq": "{seq_u1}"}}}}"#);
    let (f, _) = cl.request_raw_text(16, &raw).await?;
    ensure!(
        matches!(f.kind, Some(Kind::Ok(_))),
        "snake_case markRead: {f:?}"
    );
    let raw =
        format!(r#"{{"id": 17, "history": {{"groupId": "{gid}", "afterSeq": "0", "limit": 5}}}}"#);
    let (f, _) = cl.request_raw_text(17, &raw).await?;
    ensure!(
        matches!(f.kind, Some(Kind::Messages(_))),
        "history with string afterSeq: {f:?}"
    );

    // Bad field values: INVALID.
    is_error(
        cl.send(&gid, "", "no client id").await,
        ErrorCode::Invalid,
        "empty clientMsgId",
    )?;
    is_error(
        cl.history(&gid, None, None, 501).await,
        ErrorCode::Invalid,
        "history limit 501",
    )?;
    is_error(
        cl.create_group("bad members", &["bad user!"]).await,
        ErrorCode::Invalid,
        "bad user id",
    )?;
    is_error(
        cl.add_members(&gid, &["spaces are bad"]).await,
        ErrorCode::Invalid,
        "bad user id in addMembers",
    )?;
    let max = cl.history(&gid, None, None, 500).await?;
    ensure!(
        max.messages.len() == 2,
        "history limit 500 on a 2-message log: {max:?}"
    );

    // Unknown groups: NOT_FOUND. Error codes are names in JSON.
    let nope = "g_does_not_exist_0000";
    let raw = format!(r#"{{"id": 18, "history": {{"groupId": "{nope}", "limit": 5}}}}"#);
    let (f, v) = cl.request_raw_text(18, &raw).await?;
    let v = v.context("JSON reply")?;
    ensure!(
        v["error"]["code"] == "NOT_FOUND" && (v["id"] == "18" || v["id"] == 18),
        "raw JSON error reply {v} ({f:?})"
    );
    is_error(
        cl.send(nope, "n-1", "anyone?").await,
        ErrorCode::NotFound,
        "send to unknown group",
    )?;
    is_error(
        cl.history(nope, None, None, 10).await,
        ErrorCode::NotFound,
        "history of unknown group",
    )?;
    is_error(
        cl.add_members(nope, &[&user("x")]).await,
        ErrorCode::NotFound,
        "addMembers to unknown group",
    )?;

    // After all that, the connection (and the log) are fine.
    let s = cl.send(&gid, "final", "still alive").await?;
    let log = cl.history_all(&gid).await?;
    check::dense(&log, 1, s.seq)?;
    ensure!(
        s.seq == 3,
        "only the two good sends were written: head {}",
        s.seq
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_and_texts_get_too_large() -> Result<()> {
    const FRAME: u64 = 4096;
    const TEXT: u64 = 1024;
    let node = NodeProcess::start(NodeConfig {
        max_frame_bytes: FRAME,
        max_text_bytes: TEXT,
        ..NodeConfig::default()
    })
    .await?;
    let a = user("alice");
    let mut cl = Client::connect(&node, &a).await?;
    let mut bin = Client::connect_binary(&node, &a).await?;
    let gid = cl.create_group("limits", &[]).await?;

    // Text exactly at the limit is fine; one byte more is TOO_LARGE.
    let ok = cl
        .send(&gid, "at-limit", &"a".repeat(TEXT as usize))
        .await?;
    ensure!(ok.seq == 2, "text at the limit: seq {}", ok.seq);
    is_error(
        cl.send(&gid, "over", &"a".repeat(TEXT as usize + 1)).await,
        ErrorCode::TooLarge,
        "text over the limit",
    )?;
    is_error(
        bin.send(&gid, "over-b", &"é".repeat(TEXT as usize)).await,
        ErrorCode::TooLarge,
        "text over the limit (bytes, binary)",
    )?;
    cl.heartbeat().await?;

    // A frame over max_frame_bytes (but under twice it): TOO_LARGE, socket open.
    let big = format!(
        r#"{{"id": 50, "send": {{"groupId": "{gid}", "clientMsgId": "big", "text": "{}"}}}}"#,
        "b".repeat(FRAME as usize + 100)
    );
    cl.send_text(big).await?;
    let (_, code) = next_error(&mut cl, 50, "text frame over max_frame_bytes").await?;
    ensure!(
        code == ErrorCode::TooLarge,
        "text frame over max_frame_bytes: {code:?}"
    );
    cl.heartbeat().await?;
    let frame = ClientFrame {
        id: 51,
        kind: Some(Req::Send(send_req(
            &gid,
            "big-b",
            &"c".repeat(FRAME as usize + 100),
        ))),
    };
    bin.send_binary(frame.encode_to_vec()).await?;
    let (_, code) = next_error(&mut bin, 51, "binary frame over max_frame_bytes").await?;
    ensure!(
        code == ErrorCode::TooLarge,
        "binary frame over max_frame_bytes: {code:?}"
    );
    bin.heartbeat().await?;
    let log = cl.history_all(&gid).await?;
    check::dense(&log, 1, 2)?; // nothing oversized was written

    // A frame far over the limit closes the socket with 1009.
    let huge = vec![0u8; (FRAME * 3) as usize];
    bin.send_binary(huge).await.ok();
    let (closed, _) = bin.wait_close(Duration::from_secs(10)).await?;
    ensure!(
        closed.code() == Some(1009),
        "frame of 3 x max_frame_bytes: {closed:?} (expected close 1009)"
    );
    // Other connections are unaffected.
    cl.heartbeat().await?;
    let s = cl.send(&gid, "after-huge", "fine").await?;
    ensure!(s.seq == 3, "seq after the huge frame {}", s.seq);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_full_adds_nobody() -> Result<()> {
    let node = NodeProcess::start(NodeConfig {
        max_members: 3,
        ..NodeConfig::default()
    })
    .await?;
    let (a, b, c, d, e) = (
        user("alice"),
        user("bob"),
        user("carol"),
        user("dave"),
        user("eve"),
    );
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect(&node, &b).await?;
    let mut cc = Client::connect(&node, &c).await?;
    let gid = ca.create_group("small", &[&b]).await?; // 2 of 3

    is_error(
        ca.add_members(&gid, &[&c, &d]).await,
        ErrorCode::GroupFull,
        "adding 2 to a group with 1 free place",
    )?;
    let s = ca.sync_group(&gid).await?.context("sync")?;
    ensure!(
        s.member_count == 2 && s.head_seq == 1,
        "after GROUP_FULL: {s:?}"
    );
    is_error(
        cc.history(&gid, None, None, 10).await,
        ErrorCode::Forbidden,
        "carol was not added",
    )?;
    ca.heartbeat().await?;

    // Exactly one of two concurrent adds into the last place wins.
    ca.set_role(&gid, &b, v1::Role::Admin).await?;
    let (dd, ee) = ([d.as_str()], [e.as_str()]);
    let (r1, r2) = tokio::join!(ca.add_members(&gid, &dd), cb.add_members(&gid, &ee));
    let wins = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    ensure!(
        wins == 1,
        "concurrent adds into one free place: {r1:?} / {r2:?}"
    );
    let loser = if r1.is_err() { r1 } else { r2 };
    is_error(loser, ErrorCode::GroupFull, "the losing concurrent add")?;
    let s = ca.sync_group(&gid).await?.context("sync")?;
    ensure!(s.member_count == 3, "members after the race: {s:?}");
    is_error(
        ca.add_members(&gid, &[&c]).await,
        ErrorCode::GroupFull,
        "adding to a full group",
    )?;
    let log = ca.history_all(&gid).await?;
    let adds: Vec<_> = log
        .iter()
        .filter(|m| system_kind(m) == Some(v1::SystemKind::MembersAdded))
        .collect();
    ensure!(
        adds.len() == 1
            && adds[0]
                .system
                .as_ref()
                .is_some_and(|s| s.user_ids.len() == 1),
        "MEMBERS_ADDED entries: {adds:?}"
    );
    // Re-adding an existing member to a full group is not an error (skipped).
    ca.add_members(&gid, &[&b]).await?;
    ca.send(&gid, "still-works", "ok").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_connection_is_rate_limited() -> Result<()> {
    const BURST: u64 = 10;
    const FLOOD: u64 = 40;
    let node = NodeProcess::start(NodeConfig {
        rate_per_sec: 5,
        rate_burst: BURST,
        ..NodeConfig::default()
    })
    .await?;
    let a = user("alice");
    let mut admin = Client::connect(&node, &a).await?;
    let gid = admin.create_group("flood", &[]).await?;
    let mut flood = Client::connect_binary(&node, &a).await?;

    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for k in 0..FLOOD {
        ids.push((
            k,
            flood
                .send_request(Req::Send(send_req(&gid, &format!("f-{k}"), "flood")))
                .await?,
        ));
    }
    let mut accepted = Vec::new();
    let mut limited = 0u64;
    for (k, id) in ids {
        match reply_kind(flood.wait_reply(id).await?) {
            Ok(Kind::Sent(s)) => accepted.push((format!("f-{k}"), s.seq)),
            Ok(other) => bail!("flood send {k}: {other:?}"),
            Err(e) => match tests::client::error_code(&e) {
                Some(ErrorCode::RateLimited) => limited += 1,
                _ => bail!("flood send {k}: {e:#}"),
            },
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed_max = BURST + (elapsed * 5.0).ceil() as u64 + 2;
    ensure!(
        limited >= 1,
        "no RATE_LIMITED among {FLOOD} requests sent at once (burst {BURST})"
    );
    ensure!(
        accepted.len() as u64 >= BURST / 2 && accepted.len() as u64 <= allowed_max,
        "accepted {} of {FLOOD} (burst {BURST}, 5/s, {elapsed:.2}s)",
        accepted.len()
    );
    // Rate-limited sends were not executed.
    let log = admin.history_all(&gid).await?;
    let written: Vec<(String, u64)> = log
        .iter()
        .skip(1)
        .map(|m| (m.client_msg_id.clone(), m.seq))
        .collect();
    ensure!(
        written == accepted,
        "log holds {written:?}, acknowledged {accepted:?}"
    );
    // The bucket refills: the same connection works again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    flood.heartbeat().await?;
    flood.send(&gid, "after", "calm").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_pushes_follow_the_client_encoding() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = Client::connect(&node, &a).await?;
    // No ?encoding=: JSON until the client sends a binary frame.
    let mut cb = Client::connect_with(
        &node,
        &b,
        ClientOptions {
            encoding_param: None,
            ..ClientOptions::new(Mode::Binary)
        },
    )
    .await?;
    cb.heartbeat().await?; // a binary request
    ensure!(
        cb.binary_frames == 1 && cb.text_frames == 0,
        "reply to a binary request was not binary"
    );
    let gid = ca.create_group("enc", &[&b]).await?;
    let s = ca.send(&gid, "a-1", "pushed in binary?").await?;
    cb.collect_messages(&gid, s.seq, Duration::from_secs(10))
        .await?;
    ensure!(
        cb.text_frames == 0,
        "pushes after a binary request came as text ({} text frames)",
        cb.text_frames
    );
    // Now a JSON request: the reply and later pushes are JSON.
    let (f, v) = cb
        .request_raw_text(77, r#"{"id": 77, "heartbeat": {}}"#)
        .await?;
    ensure!(
        matches!(f.kind, Some(Kind::Ok(_))) && v.is_some(),
        "JSON heartbeat: {f:?} (raw {v:?})"
    );
    let text_before = cb.text_frames;
    let s = ca.send(&gid, "a-2", "pushed in JSON?").await?;
    cb.collect_messages(&gid, s.seq, Duration::from_secs(10))
        .await?;
    ensure!(
        cb.text_frames == text_before + 1,
        "push after a JSON request was not JSON"
    );
    // ?encoding=binary fixes the pushes' encoding whatever the client sends;
    // a reply always uses its request's encoding.
    let mut cf = Client::connect_with(&node, &b, ClientOptions::new(Mode::Binary)).await?;
    let (f, v) = cf
        .request_raw_text(78, r#"{"id": 78, "heartbeat": {}}"#)
        .await?;
    ensure!(
        matches!(f.kind, Some(Kind::Ok(_))) && v.is_some(),
        "reply to a JSON request came as binary"
    );
    let binary_before = cf.binary_frames;
    let s = ca.send(&gid, "a-3", "binary again").await?;
    cf.collect_messages(&gid, s.seq, Duration::from_secs(10))
        .await?;
    ensure!(
        cf.text_frames == 1 && cf.binary_frames == binary_before + 1,
        "?encoding=binary client got a push as text after a JSON request"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_of_large_messages_are_delivered() -> Result<()> {
    // 200 messages at the text limit: one page of 500 would be ~3.3 MB.
    const COUNT: u64 = 200;
    let node = NodeProcess::start_default().await?;
    let text_len = node.config().max_text_bytes as usize;
    let a = user("alice");
    let mut cl = Client::connect_binary(&node, &a).await?;
    let mut json = Client::connect(&node, &a).await?;
    let gid = cl.create_group("big pages", &[]).await?;
    let text = "y".repeat(text_len);
    for chunk in (0..COUNT).collect::<Vec<_>>().chunks(20) {
        let mut ids = Vec::new();
        for &k in chunk {
            ids.push(
                cl.send_request(Req::Send(send_req(&gid, &format!("big-{k}"), &text)))
                    .await?,
            );
        }
        for id in ids {
            reply_kind(cl.wait_reply(id).await?)?;
        }
    }
    // The biggest page the protocol allows: the server may answer with fewer
    // messages and hasMore, but must answer, and the socket must stay open.
    for (who, c) in [("binary", &mut cl), ("JSON", &mut json)] {
        let page = c.history(&gid, Some(0), None, 500).await.with_context(|| {
            format!("{who} history(afterSeq 0, limit 500) of {COUNT} x {text_len} B")
        })?;
        ensure!(!page.messages.is_empty(), "{who}: empty first page");
        check::dense(&page.messages, 1, page.messages.len() as u64)?;
        let all = c.history_after(&gid, 0, 500).await?;
        check::dense(&all, 1, COUNT + 1)?;
        let newest = c.history(&gid, None, None, 500).await?;
        ensure!(
            newest.messages.last().map(|m| m.seq) == Some(COUNT + 1),
            "{who}: newest page does not end at the head"
        );
        c.heartbeat().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_never_breaks_the_node_or_the_connection() -> Result<()> {
    use rand::{Rng, SeedableRng};
    const FRAMES: usize = 400;
    let seed: u64 = rand::rng().random();
    eprintln!("garbage seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let node = NodeProcess::start_default().await?;
    let a = user("fuzz");
    let mut cl = Client::connect(&node, &a).await?;
    let gid = cl.create_group("fuzz", &[]).await?;
    let valid_bin = ClientFrame {
        id: 1_000_000,
        kind: Some(Req::Send(send_req(&gid, "fz", "fuzz me"))),
    }
    .encode_to_vec();
    let valid_json = serde_json::to_string(&ClientFrame {
        id: 1_000_001,
        kind: Some(Req::History(v1::History {
            group_id: gid.clone(),
            after_seq: Some(0),
            limit: 5,
            ..Default::default()
        })),
    })?;
    const ALPHABET: &[u8] =
        br#"{}[]":,0123456789 abcdefghijklmnopqrstuvwxyz-_.\nulltruefalseidsendgroupIdhistory"#;
    for i in 0..FRAMES {
        match rng.random_range(0..4) {
            0 => {
                let len = rng.random_range(0..200);
                let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                cl.send_binary(bytes).await?;
            }
            1 => {
                let mut bytes = valid_bin.clone();
                for _ in 0..rng.random_range(1..4) {
                    let p = rng.random_range(0..bytes.len());
                    bytes[p] ^= 1 << rng.random_range(0..8);
                }
                cl.send_binary(bytes).await?;
            }
            2 => {
                let len = rng.random_range(0..200);
                let text: String = (0..len)
                    .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                    .collect();
                cl.send_text(text).await?;
            }
            _ => {
                let mut chars: Vec<char> = valid_json.chars().collect();
                for _ in 0..rng.random_range(1..4) {
                    let p = rng.random_range(0..chars.len());
                    chars[p] = ALPHABET[rng.random_range(0..ALPHABET.len())] as char;
                }
                cl.send_text(chars.into_iter().collect::<String>()).await?;
            }
        }
        if i % 50 == 49 {
            cl.heartbeat()
                .await
                .with_context(|| format!("after {} garbage frames (seed {seed})", i + 1))?;
        }
    }
    cl.heartbeat()
        .await
        .with_context(|| format!("seed {seed}"))?;
    ensure!(
        cl.closed().is_none(),
        "connection closed: {:?}",
        cl.closed()
    );
    let r = node.http_get("/healthz").await?;
    ensure!(r.status == 200, "/healthz after garbage: {}", r.status);
    let log = cl.history_all(&gid).await?;
    let head = log.last().map(|m| m.seq).unwrap_or(0);
    check::dense(&log, 1, head)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_refused() -> Result<()> {
    const MAX: u64 = 5;
    let node = NodeProcess::start(NodeConfig {
        max_connections: MAX,
        ..NodeConfig::default()
    })
    .await?;
    let mut open = Vec::new();
    for i in 0..MAX {
        let mut cl = Client::connect(&node, &user(&format!("c{i}"))).await?;
        cl.heartbeat().await?;
        open.push(cl);
    }
    // One more: refused at upgrade, or closed before it can do anything.
    let extra = user("extra");
    match Client::connect(&node, &extra).await {
        Err(_) => {}
        Ok(mut cl) => {
            let res = cl.heartbeat().await;
            ensure!(
                res.is_err(),
                "connection {} of max_connections {MAX} works",
                MAX + 1
            );
        }
    }
    let status =
        tests::client::upgrade_status(node.addr(), &[("token", &node.token(&extra))], &[]).await;
    if let Ok(s) = status {
        ensure!(s != 101, "upgrade past max_connections got 101");
    }
    // The open ones still work; closing one makes room again.
    for cl in &mut open {
        cl.heartbeat().await?;
    }
    let first = open.remove(0);
    first.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut cl) = Client::connect(&node, &extra).await
            && cl.heartbeat().await.is_ok()
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no room 5 s after closing a connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
