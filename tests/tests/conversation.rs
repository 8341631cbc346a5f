//! End-to-end conversations: several users (JSON and binary clients mixed)
//! create a group, talk, read history, sync unread counts and mark messages
//! read; many senders write to one group at once and every receiver sees one
//! dense order; retried sends are deduplicated; 1:1 chats; offline catch-up
//! by `sync` + `history`.
//!
//! Each test starts its own `chat-node` process (see `tests::node`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tests::check::{self, system_events, system_kind};
use tests::client::send_req;
use tests::v1::{self, SystemKind};
use tests::{Client, Mode, NodeProcess};
use tests::{PUSH_WAIT, check::same_message, user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_among_four_users() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b, c, d) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let mut ca = Client::connect(&node, &a).await?; // JSON
    let mut cb = Client::connect_binary(&node, &b).await?; // binary
    let mut cc = Client::connect(&node, &c).await?; // JSON
    let mut cd = Client::connect_binary(&node, &d).await?; // binary
    for cl in [&mut ca, &mut cb, &mut cc, &mut cd] {
        cl.sync().await?; // the session is fully up
    }

    // createGroup: seq 1 is CREATED, pushed to every (online) member.
    let gid = ca.create_group("team", &[&b, &c]).await?;
    ensure!(!gid.is_empty(), "empty group id");
    for cl in [&mut ca, &mut cb, &mut cc] {
        let got = cl.collect_messages(&gid, 1, PUSH_WAIT).await?;
        let m = &got[0];
        ensure!(
            m.seq == 1,
            "{}: first push of a new group has seq {}",
            cl.user(),
            m.seq
        );
        ensure!(
            system_kind(m) == Some(SystemKind::Created),
            "{}: seq 1 is not CREATED: {m:?}",
            cl.user()
        );
        let s = m.system.as_ref().expect("system");
        ensure!(s.actor_id == a, "CREATED actor {:?} != creator", s.actor_id);
        ensure!(s.name == "team", "CREATED name {:?}", s.name);
        ensure!(
            s.user_ids.contains(&b) && s.user_ids.contains(&c),
            "CREATED userIds {:?} lack the initial members",
            s.user_ids
        );
        ensure!(
            m.text.is_empty() && m.sender_id.is_empty(),
            "system message with text/sender: {m:?}"
        );
    }

    // alice (JSON) says hello, mentioning bob.
    let mut hello = send_req(&gid, "a-1", "hello team");
    hello.mentions = vec![b.clone()];
    let sent = ca.send_msg(hello).await?;
    ensure!(sent.seq == 2, "first message got seq {}", sent.seq);
    ensure!(
        sent.group_id == gid && sent.client_msg_id == "a-1",
        "sent: {sent:?}"
    );
    ensure!(
        sent.sent_at_ms > 1_600_000_000_000,
        "sentAtMs {} is not Unix ms",
        sent.sent_at_ms
    );
    let mut pushes: HashMap<String, Vec<v1::Message>> = HashMap::new();
    for cl in [&mut ca, &mut cb, &mut cc] {
        let got = cl.collect_messages(&gid, 2, PUSH_WAIT).await?;
        let m = got.last().expect("non-empty");
        ensure!(
            got.len() == 1 && m.seq == 2,
            "{}: pushes {:?}",
            cl.user(),
            check::seqs(&got)
        );
        ensure!(m.sender_id == a, "senderId {:?}", m.sender_id);
        ensure!(m.text == "hello team", "text {:?}", m.text);
        ensure!(
            m.client_msg_id == "a-1",
            "clientMsgId {:?}",
            m.client_msg_id
        );
        ensure!(
            m.sent_at_ms == sent.sent_at_ms,
            "push sentAtMs != sent reply"
        );
        ensure!(m.mentions == vec![b.clone()], "mentions {:?}", m.mentions);
        ensure!(
            m.system.is_none() || system_kind(m).is_none(),
            "user message marked system"
        );
        pushes
            .entry(cl.user().to_string())
            .or_default()
            .push(m.clone());
    }

    // bob (binary) replies with an attachment.
    let mut reply = send_req(&gid, "b-1", "hi alice, see attached");
    reply.reply_to_seq = Some(2);
    reply.attachments = vec![v1::Attachment {
        url: "https://files.example/x.png".to_string(),
        mime_type: "image/png".to_string(),
        size: 1234,
        name: "x.png".to_string(),
    }];
    let sent_b = cb.send_msg(reply.clone()).await?;
    ensure!(sent_b.seq == 3, "bob's reply got seq {}", sent_b.seq);
    for cl in [&mut ca, &mut cb, &mut cc] {
        let got = cl.collect_messages(&gid, 3, PUSH_WAIT).await?;
        let m = got.last().expect("non-empty");
        ensure!(
            got.len() == 1 && m.seq == 3,
            "{}: pushes {:?}",
            cl.user(),
            check::seqs(&got)
        );
        ensure!(
            m.sender_id == b && m.reply_to_seq == Some(2),
            "reply push {m:?}"
        );
        ensure!(
            m.attachments == reply.attachments,
            "attachments {:?}",
            m.attachments
        );
    }

    // carol sends hand-written JSON (the documented wire format) and reads
    // the raw JSON reply: u64 fields are JSON strings, the id is echoed.
    let raw = format!(
        r#"{{"id": 900, "send": {{"groupId": "{gid}", "clientMsgId": "c-raw-1", "text": "raw hi"}}}}"#
    );
    let (frame, value) = cc.request_raw_text(900, &raw).await?;
    let value = value.context("JSON client got a binary reply")?;
    ensure!(frame.id == 900, "reply id {}", frame.id);
    ensure!(
        value["sent"]["seq"] == serde_json::json!("4"),
        "raw JSON reply: seq should be the string \"4\": {value}"
    );
    ensure!(
        value["sent"]["clientMsgId"] == "c-raw-1",
        "raw reply {value}"
    );
    ensure!(
        value["sent"]["groupId"] == serde_json::json!(gid),
        "raw reply {value}"
    );
    // 64-bit integers are accepted as numbers too, snake_case as well.
    let raw = format!(
        r#"{{"id": "901", "history": {{"group_id": "{gid}", "afterSeq": 1, "limit": 10}}}}"#
    );
    let (frame, value) = cc.request_raw_text(901, &raw).await?;
    let value = value.context("JSON client got a binary reply")?;
    let msgs = match frame.kind {
        Some(v1::server_frame::Kind::Messages(m)) => m,
        other => bail!("history with numeric afterSeq: {other:?} ({value})"),
    };
    check::dense(&msgs.messages, 2, 4)?;
    // Stored entries leave out their group id and seq; history puts them back.
    ensure!(
        msgs.messages.iter().all(|m| m.group_id == gid),
        "history messages without their group id: {:?}",
        msgs.messages
    );
    ensure!(
        value["messages"]["messages"][0]["seq"] == "2",
        "raw history JSON {value}"
    );
    for cl in [&mut ca, &mut cb, &mut cc] {
        let got = cl.collect_messages(&gid, 4, PUSH_WAIT).await?;
        let m = got.last().expect("non-empty");
        ensure!(
            m.seq == 4 && m.text == "raw hi" && m.sender_id == c,
            "push {m:?}"
        );
    }

    // A thread: only replies to seq 2 (bob's message, seq 3).
    let thread = match ca
        .call(v1::client_frame::Kind::History(v1::History {
            group_id: gid.clone(),
            thread_seq: Some(2),
            limit: 50,
            ..Default::default()
        }))
        .await?
    {
        v1::server_frame::Kind::Messages(m) => m.messages,
        other => bail!("thread history: {other:?}"),
    };
    ensure!(
        check::seqs(&thread) == vec![3],
        "thread of seq 2 should be [3], got {:?}",
        check::seqs(&thread)
    );

    // Encodings: the binary client got only binary frames, JSON clients text.
    ensure!(
        cb.text_frames == 0 && cb.binary_frames > 0,
        "bob (binary) got {} text frames",
        cb.text_frames
    );
    ensure!(
        cd.text_frames == 0,
        "dave (binary) got {} text frames",
        cd.text_frames
    );
    ensure!(
        ca.binary_frames == 0 && ca.text_frames > 0,
        "alice (JSON) got {} binary frames",
        ca.binary_frames
    );

    // sync, unread and markRead (only alice writes in this phase).
    cb.mark_read(&gid, 4).await?;
    let s = cb
        .sync_group(&gid)
        .await?
        .context("bob's sync lacks the group")?;
    ensure!(
        s.head_seq == 4 && s.read_seq == 4 && s.unread == 0,
        "bob after markRead(4): {s:?}"
    );
    ensure!(
        s.name == "team" && s.member_count == 3 && !s.direct,
        "bob's summary {s:?}"
    );
    ensure!(s.role == v1::Role::Member as i32, "bob's role {:?}", s.role);
    let sa = ca
        .sync_group(&gid)
        .await?
        .context("alice's sync lacks the group")?;
    ensure!(
        sa.role == v1::Role::Admin as i32,
        "creator's role {:?}",
        sa.role
    );
    for i in 0..3 {
        ca.send(&gid, &format!("a-{}", i + 2), &format!("alice {i}"))
            .await?;
    }
    for cl in [&mut ca, &mut cb] {
        let got = cl.collect_messages(&gid, 7, PUSH_WAIT).await?;
        check::dense(&got, 5, 7).with_context(|| format!("{}'s pushes", cl.user()))?;
    }
    let s = cb.sync_group(&gid).await?.context("sync")?;
    ensure!(
        s.head_seq == 7 && s.read_seq == 4 && s.unread == 3,
        "bob with 3 unread: {s:?}"
    );
    cb.mark_read(&gid, 6).await?;
    let s = cb.sync_group(&gid).await?.context("sync")?;
    ensure!(
        s.read_seq == 6 && s.unread == 1,
        "bob after markRead(6): {s:?}"
    );
    cb.mark_read(&gid, 5).await?; // pointers only move forward
    let s = cb.sync_group(&gid).await?.context("sync")?;
    ensure!(s.read_seq == 6, "markRead went backwards: {s:?}");
    cb.mark_read(&gid, 1000).await?; // clamped to the head
    let s = cb.sync_group(&gid).await?.context("sync")?;
    ensure!(
        s.read_seq == 7 && s.unread == 0,
        "markRead past head not clamped: {s:?}"
    );
    cb.mark_delivered(&gid, 7).await?;
    let s = cb.sync_group(&gid).await?.context("sync")?;
    ensure!(s.delivered_seq == 7, "markDelivered(7): {s:?}");
    let carol_before = cc.collect_messages(&gid, 7, PUSH_WAIT).await?;
    check::dense(&carol_before, 5, 7)?;

    // Membership changes are system messages in the same order for everyone.
    ca.add_members(&gid, &[&d]).await?; // seq 8
    let got = cd.collect_messages(&gid, 8, PUSH_WAIT).await?;
    let m = got.last().expect("non-empty");
    ensure!(
        m.seq == 8 && system_kind(m) == Some(SystemKind::MembersAdded),
        "dave's first push after being added: {m:?}"
    );
    let sd = cd.send(&gid, "d-1", "hi, dave here").await?.seq; // seq 9
    ensure!(sd == 9, "dave's message got seq {sd}");
    ca.set_role(&gid, &b, v1::Role::Admin).await?; // seq 10
    cb.remove_members(&gid, &[&c]).await?; // seq 11 (bob is admin now)
    cd.leave_group(&gid).await?; // seq 12
    let head = 12;
    for cl in [&mut ca, &mut cb] {
        let got = cl.collect_messages(&gid, head, PUSH_WAIT).await?;
        ensure!(
            got.first().map(|m| m.seq) == Some(8),
            "{}: {:?}",
            cl.user(),
            check::seqs(&got)
        );
        check::dense(&got, 8, head)?;
    }

    let log = ca.history_all(&gid).await?;
    check::dense(&log, 1, head)?;
    let events = system_events(&log);
    let kinds: Vec<(u64, SystemKind)> = events.iter().map(|e| (e.0, e.1)).collect();
    ensure!(
        kinds
            == vec![
                (1, SystemKind::Created),
                (8, SystemKind::MembersAdded),
                (10, SystemKind::RoleChanged),
                (11, SystemKind::MembersRemoved),
                (12, SystemKind::MemberLeft),
            ],
        "system messages in the log: {events:?}"
    );
    ensure!(
        events[1].2 == a && events[1].3 == vec![d.clone()],
        "MEMBERS_ADDED {:?}",
        events[1]
    );
    ensure!(
        events[2].2 == a && events[2].3 == vec![b.clone()],
        "ROLE_CHANGED {:?}",
        events[2]
    );
    let role = log[9].system.as_ref().map(|s| s.role);
    ensure!(
        role == Some(v1::Role::Admin as i32),
        "ROLE_CHANGED role {role:?}"
    );
    ensure!(
        events[3].2 == b && events[3].3 == vec![c.clone()],
        "MEMBERS_REMOVED {:?}",
        events[3]
    );
    ensure!(events[4].2 == d, "MEMBER_LEFT actor {:?}", events[4].2);
    // History agrees with the pushes seen earlier.
    for (u, ms) in &pushes {
        for m in ms {
            same_message(m, &log[(m.seq - 1) as usize]).with_context(|| format!("user {u}"))?;
        }
    }
    for m in &carol_before {
        same_message(m, &log[(m.seq - 1) as usize])?;
    }
    ensure!(
        log[2].reply_to_seq == Some(2) && log[2].attachments.len() == 1,
        "log[3] {:?}",
        log[2]
    );
    let sb = cb.sync_group(&gid).await?.context("sync")?;
    ensure!(
        sb.role == v1::Role::Admin as i32 && sb.member_count == 2,
        "bob at the end: {sb:?}"
    );
    Ok(())
}

const SENDERS: usize = 4;
const PER_SENDER: usize = 100;
const RECEIVERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_get_one_dense_order() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let senders: Vec<String> = (0..SENDERS).map(|i| user(&format!("s{i}"))).collect();
    let receivers: Vec<String> = (0..RECEIVERS).map(|i| user(&format!("r{i}"))).collect();
    let mut rclients = Vec::new();
    for (i, r) in receivers.iter().enumerate() {
        let mode = if i % 2 == 0 { Mode::Json } else { Mode::Binary };
        let mut cl = Client::connect_mode(&node, r, mode).await?;
        cl.sync().await?;
        rclients.push(cl);
    }
    let mut creator = Client::connect(&node, &senders[0]).await?;
    let others: Vec<&str> = senders[1..]
        .iter()
        .chain(receivers.iter())
        .map(String::as_str)
        .collect();
    let gid = creator.create_group("busy", &others).await?;
    let head = 1 + (SENDERS * PER_SENDER) as u64;

    let mut recv_tasks = Vec::new();
    for mut cl in rclients {
        let gid = gid.clone();
        recv_tasks.push(tokio::spawn(async move {
            let got = cl
                .collect_messages(&gid, head, Duration::from_secs(90))
                .await?;
            anyhow::Ok((cl.user().to_string(), got))
        }));
    }
    let mut send_tasks = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        let mode = if i % 2 == 0 { Mode::Binary } else { Mode::Json };
        let mut cl = Client::connect_mode(&node, s, mode).await?;
        let gid = gid.clone();
        send_tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            if i % 2 == 0 {
                // Sequential sends: each sender's seqs increase.
                for k in 0..PER_SENDER {
                    let cmid = format!("s{i}-{k}");
                    let sent = cl.send(&gid, &cmid, &format!("from s{i} #{k}")).await?;
                    acks.push((cmid, sent.seq));
                }
            } else {
                // Pipelined sends, 10 in flight (exercises group commit).
                for chunk in (0..PER_SENDER).collect::<Vec<_>>().chunks(10) {
                    let mut ids = Vec::new();
                    for &k in chunk {
                        let cmid = format!("s{i}-{k}");
                        let id = cl
                            .send_request(v1::client_frame::Kind::Send(send_req(
                                &gid,
                                &cmid,
                                &format!("from s{i} #{k}"),
                            )))
                            .await?;
                        ids.push((id, cmid));
                    }
                    for (id, cmid) in ids {
                        let reply = cl.wait_reply(id).await?;
                        match tests::client::reply_kind(reply)? {
                            v1::server_frame::Kind::Sent(s) => acks.push((cmid, s.seq)),
                            other => bail!("pipelined send: {other:?}"),
                        }
                    }
                }
            }
            anyhow::Ok((i, acks))
        }));
    }
    let mut all_acks: BTreeMap<u64, String> = BTreeMap::new();
    for t in send_tasks {
        let (i, acks) = t.await??;
        if i % 2 == 0 {
            ensure!(
                acks.windows(2).all(|w| w[0].1 < w[1].1),
                "sequential sender s{i} got non-increasing seqs"
            );
        }
        for (cmid, seq) in acks {
            if let Some(prev) = all_acks.insert(seq, cmid.clone()) {
                bail!("seq {seq} acknowledged twice: {prev} and {cmid}");
            }
        }
    }
    ensure!(
        all_acks.keys().copied().eq(2..=head),
        "acknowledged seqs are not 2..={head}: {}",
        check::summarize(&all_acks.keys().copied().collect::<Vec<_>>())
    );
    let log = creator.history_all(&gid).await?;
    check::dense(&log, 1, head)?;
    for m in &log[1..] {
        ensure!(
            all_acks.get(&m.seq) == Some(&m.client_msg_id),
            "log seq {} has {}",
            m.seq,
            m.client_msg_id
        );
    }
    for t in recv_tasks {
        let (u, got) = t.await??;
        check::dense(&got, 1, head).with_context(|| format!("receiver {u}"))?;
        for (m, h) in got.iter().zip(&log) {
            same_message(m, h).with_context(|| format!("receiver {u}"))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_sends_are_deduplicated() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect_binary(&node, &b).await?;
    cb.sync().await?;
    let gid = ca.create_group("dedupe", &[&b]).await?;

    // Sequential retry.
    let first = ca.send(&gid, "x1", "once").await?;
    let again = ca.send(&gid, "x1", "once").await?;
    ensure!(
        again.seq == first.seq,
        "retry got seq {} != {}",
        again.seq,
        first.seq
    );
    ensure!(
        again.sent_at_ms == first.sent_at_ms,
        "retry changed sentAtMs"
    );

    // Pipelined duplicates on one connection.
    let req = || v1::client_frame::Kind::Send(send_req(&gid, "x2", "pipelined"));
    let id1 = ca.send_request(req()).await?;
    let id2 = ca.send_request(req()).await?;
    let r1 = tests::client::reply_kind(ca.wait_reply(id1).await?)?;
    let r2 = tests::client::reply_kind(ca.wait_reply(id2).await?)?;
    let (s1, s2) = match (r1, r2) {
        (v1::server_frame::Kind::Sent(x), v1::server_frame::Kind::Sent(y)) => (x, y),
        other => bail!("pipelined duplicate sends: {other:?}"),
    };
    ensure!(
        s1.seq == s2.seq,
        "pipelined duplicates got seqs {} and {}",
        s1.seq,
        s2.seq
    );

    // Concurrent duplicates from two devices of the same user.
    let mut a2 = Client::connect_binary(&node, &a).await?;
    let (r1, r2) = tokio::join!(
        ca.send(&gid, "x3", "two devices"),
        a2.send(&gid, "x3", "two devices")
    );
    let (r1, r2) = (r1?, r2?);
    ensure!(
        r1.seq == r2.seq,
        "concurrent duplicates got seqs {} and {}",
        r1.seq,
        r2.seq
    );

    // A burst of concurrent duplicates from five connections.
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(Client::connect(&node, &a).await?);
    }
    let mut tasks = Vec::new();
    for mut cl in conns {
        let gid = gid.clone();
        tasks.push(tokio::spawn(async move {
            cl.send(&gid, "x4", "burst").await.map(|s| s.seq)
        }));
    }
    let mut burst_seqs = HashSet::new();
    for t in tasks {
        burst_seqs.insert(t.await??);
    }
    ensure!(
        burst_seqs.len() == 1,
        "a burst of duplicates got seqs {burst_seqs:?}"
    );

    // After reconnecting.
    drop(ca);
    let mut ca = Client::connect(&node, &a).await?;
    let after = ca.send(&gid, "x1", "once").await?;
    ensure!(
        after.seq == first.seq,
        "retry after reconnect got seq {} != {}",
        after.seq,
        first.seq
    );
    ensure!(
        after.sent_at_ms == first.sent_at_ms,
        "retry after reconnect changed sentAtMs"
    );

    // The key is per sender: bob's "x1" is a different message.
    let bob_x1 = cb.send(&gid, "x1", "bob's own x1").await?;
    ensure!(
        bob_x1.seq != first.seq,
        "bob's x1 was deduplicated against alice's"
    );

    let log = ca.history_all(&gid).await?;
    let head = log.last().map(|m| m.seq).unwrap_or(0);
    check::dense(&log, 1, head)?;
    ensure!(
        head == 6,
        "log should hold CREATED + x1 + x2 + x3 + x4 + bob's x1, head {head}"
    );
    let mut count: HashMap<(String, String), usize> = HashMap::new();
    for m in &log[1..] {
        *count
            .entry((m.sender_id.clone(), m.client_msg_id.clone()))
            .or_default() += 1;
    }
    ensure!(
        count.values().all(|&n| n == 1),
        "duplicates in the log: {count:?}"
    );
    // bob saw each message once.
    let got = cb.collect_messages(&gid, head, PUSH_WAIT).await?;
    check::dense(&got, 1, head)?;
    cb.expect_no_message(&gid, Duration::from_millis(300))
        .await?;

    // Three devices retry the same 100 sends at once, pipelined: duplicates
    // land in the same group commit and still get one seq each.
    const RETRIED: usize = 100;
    let mut tasks = Vec::new();
    for dev in 0..3 {
        let mut cl =
            Client::connect_mode(&node, &a, if dev == 1 { Mode::Binary } else { Mode::Json })
                .await?;
        let gid = gid.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for chunk in (0..RETRIED).collect::<Vec<_>>().chunks(20) {
                let mut ids = Vec::new();
                for &k in chunk {
                    let req = send_req(&gid, &format!("r-{k}"), &format!("retried {k}"));
                    ids.push(cl.send_request(v1::client_frame::Kind::Send(req)).await?);
                }
                for id in ids {
                    match tests::client::reply_kind(cl.wait_reply(id).await?)? {
                        v1::server_frame::Kind::Sent(s) => seqs.push(s.seq),
                        other => bail!("retried send: {other:?}"),
                    }
                }
            }
            anyhow::Ok(seqs)
        }));
    }
    let mut per_device = Vec::new();
    for t in tasks {
        per_device.push(t.await??);
    }
    ensure!(
        per_device.iter().all(|s| s == &per_device[0]),
        "devices got different seqs for the same clientMsgIds"
    );
    let log = ca.history_all(&gid).await?;
    check::dense(&log, 1, head + RETRIED as u64)?;
    let got = cb
        .collect_messages(&gid, head + RETRIED as u64, PUSH_WAIT)
        .await?;
    check::dense(&got, head + 1, head + RETRIED as u64)?;
    for (m, k) in log[head as usize..].iter().zip(0..) {
        ensure!(
            m.client_msg_id == format!("r-{k}"),
            "seq {}: {}",
            m.seq,
            m.client_msg_id
        );
    }
    cb.expect_no_message(&gid, Duration::from_millis(300))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_added_or_removed_mid_stream_see_a_dense_range() -> Result<()> {
    const COUNT: usize = 300;
    let node = NodeProcess::start_default().await?;
    let (a, b, c, d) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let mut admin = Client::connect(&node, &a).await?;
    let mut cc = Client::connect(&node, &c).await?;
    let mut cd = Client::connect_binary(&node, &d).await?;
    cc.sync().await?;
    cd.sync().await?;
    let gid = admin.create_group("churn", &[&b, &c]).await?;
    // bob streams messages while alice adds dave and removes carol.
    let mut cb = Client::connect_binary(&node, &b).await?;
    let g = gid.clone();
    let stream = tokio::spawn(async move {
        for k in 0..COUNT {
            cb.send(&g, &format!("s-{k}"), &format!("stream {k}"))
                .await?;
        }
        anyhow::Ok(())
    });
    // Let the stream run a little, then change membership while it runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = admin.sync_group(&gid).await?.context("sync")?;
        if s.head_seq >= 50 {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "stream too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    admin.add_members(&gid, &[&d]).await?;
    admin.remove_members(&gid, &[&c]).await?;
    stream.await??;
    let log = admin.history_all(&gid).await?;
    let head = 3 + COUNT as u64; // CREATED, MEMBERS_ADDED, MEMBERS_REMOVED
    check::dense(&log, 1, head)?;
    let added = log
        .iter()
        .find(|m| system_kind(m) == Some(SystemKind::MembersAdded))
        .map(|m| m.seq)
        .context("no MEMBERS_ADDED")?;
    let removed = log
        .iter()
        .find(|m| system_kind(m) == Some(SystemKind::MembersRemoved))
        .map(|m| m.seq)
        .context("no MEMBERS_REMOVED")?;
    ensure!(
        added < head && removed < head,
        "membership changes were not mid-stream"
    );

    // dave: every entry from his MEMBERS_ADDED on, dense, nothing before.
    let got = cd.collect_messages(&gid, head, PUSH_WAIT).await?;
    check::dense(&got, added, head).context("pushes of a member added mid-stream")?;
    // carol: everything up to her removal (she may see the removal itself),
    // dense, nothing after.
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Some(m) = cc
        .next_message(end.saturating_duration_since(tokio::time::Instant::now()))
        .await?
    {
        if m.group_id == gid {
            got.push(m);
        }
    }
    let last = got.last().map(|m| m.seq).unwrap_or(0);
    ensure!(
        last == removed || last == removed - 1,
        "removed member's last push is seq {last}, removal at {removed}"
    );
    check::dense(&got, 1, last).context("pushes of a member removed mid-stream")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_direct_gives_one_group_per_pair() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect_binary(&node, &b).await?;
    let mut cc = Client::connect(&node, &c).await?;
    cb.sync().await?;

    let g1 = ca.open_direct(&b).await?;
    let g2 = cb.open_direct(&a).await?;
    ensure!(g1 == g2, "openDirect from each side: {g1} != {g2}");
    ensure!(
        ca.open_direct(&b).await? == g1,
        "second openDirect gave a new id"
    );
    let g3 = ca.open_direct(&c).await?;
    ensure!(g3 != g1, "a different pair got the same group");

    let s = ca.send(&g1, "a-1", "psst").await?;
    let got = cb.collect_messages(&g1, s.seq, PUSH_WAIT).await?;
    let m = got.last().expect("non-empty");
    ensure!(m.text == "psst" && m.sender_id == a, "bob got {m:?}");
    let s = cb.send(&g1, "b-1", "what").await?;
    let got = ca.collect_messages(&g1, s.seq, PUSH_WAIT).await?;
    let m = got.last().expect("non-empty");
    ensure!(m.text == "what" && m.sender_id == b, "alice got {m:?}");

    for cl in [&mut ca, &mut cb] {
        let g = cl
            .sync_group(&g1)
            .await?
            .context("direct chat missing from sync")?;
        ensure!(g.direct, "{}: direct flag not set: {g:?}", cl.user());
        ensure!(
            g.member_count == 2,
            "{}: member count {}",
            cl.user(),
            g.member_count
        );
        ensure!(
            g.role == v1::Role::Member as i32,
            "{}: role {:?} (both are MEMBERs)",
            cl.user(),
            g.role
        );
    }
    // Members cannot be added to a 1:1 chat.
    let res = ca.add_members(&g1, &[&c]).await;
    ensure!(res.is_err(), "addMembers to a 1:1 chat succeeded");
    check::is_error(
        cc.history(&g1, None, None, 10).await,
        v1::ErrorCode::Forbidden,
        "carol reading alice and bob's 1:1 chat",
    )?;
    let log = cb.history_all(&g1).await?;
    let texts: Vec<&str> = log
        .iter()
        .filter(|m| system_kind(m).is_none())
        .map(|m| m.text.as_str())
        .collect();
    ensure!(texts == vec!["psst", "what"], "1:1 log texts {texts:?}");

    // Still the same id after reconnecting.
    drop(cb);
    let mut cb = Client::connect(&node, &b).await?;
    ensure!(
        cb.open_direct(&a).await? == g1,
        "openDirect after reconnect gave a new id"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_user_catches_up_with_sync_and_history() -> Result<()> {
    const MISSED: u64 = 120;
    let node = NodeProcess::start_default().await?;
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    let mut ca = Client::connect_binary(&node, &a).await?;
    let mut cc = Client::connect(&node, &c).await?;
    let gid = ca.create_group("catch-up", &[&b, &c]).await?;
    for i in 0..3 {
        ca.send(&gid, &format!("before-{i}"), "before").await?;
    }
    let h0 = 4;
    cc.collect_messages(&gid, h0, PUSH_WAIT).await?;
    cc.mark_read(&gid, h0).await?;
    cc.close().await;

    // alice writes while carol is offline (pipelined in windows of 20).
    let mut sent = Vec::new();
    for chunk in (0..MISSED).collect::<Vec<_>>().chunks(20) {
        let mut ids = Vec::new();
        for &k in chunk {
            let id = ca
                .send_request(v1::client_frame::Kind::Send(send_req(
                    &gid,
                    &format!("m-{k}"),
                    &format!("missed {k}"),
                )))
                .await?;
            ids.push(id);
        }
        for id in ids {
            match tests::client::reply_kind(ca.wait_reply(id).await?)? {
                v1::server_frame::Kind::Sent(s) => sent.push(s),
                other => bail!("send: {other:?}"),
            }
        }
    }
    let head = h0 + MISSED;
    ensure!(
        sent.iter().map(|s| s.seq).max() == Some(head),
        "head after sends"
    );

    let mut cc = Client::connect(&node, &c).await?;
    // Nothing was queued for carol while she was offline.
    cc.expect_no_message(&gid, Duration::from_millis(300))
        .await?;
    let s = cc
        .sync_group(&gid)
        .await?
        .context("carol's sync lacks the group")?;
    ensure!(
        s.head_seq == head && s.read_seq == h0 && s.unread == MISSED,
        "carol's summary after {MISSED} missed messages: {s:?}"
    );

    // history(afterSeq = readSeq) in pages of 50: 50 + 50 + 20.
    let mut got = Vec::new();
    let mut after = s.read_seq;
    let mut pages = Vec::new();
    for _ in 0..10 {
        let page = cc.history(&gid, Some(after), None, 50).await?;
        pages.push((page.messages.len(), page.has_more));
        after = page.messages.last().map(|m| m.seq).unwrap_or(after);
        got.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    ensure!(
        pages == vec![(50, true), (50, true), (20, false)],
        "pages (len, hasMore): {pages:?}"
    );
    check::dense(&got, h0 + 1, head)?;
    for (m, k) in got.iter().zip(0..) {
        ensure!(
            m.text == format!("missed {k}") && m.client_msg_id == format!("m-{k}"),
            "missed #{k}: {m:?}"
        );
        ensure!(m.sender_id == a, "missed #{k} sender {:?}", m.sender_id);
    }

    // Paging backwards: the newest `limit`, then beforeSeq.
    let newest = cc.history(&gid, None, None, 50).await?;
    check::dense(&newest.messages, head - 49, head)?;
    ensure!(newest.has_more, "newest 50 of {head}: hasMore false");
    let older = cc.history(&gid, None, Some(head - 49), 50).await?;
    check::dense(&older.messages, head - 99, head - 50)?;
    ensure!(older.has_more, "beforeSeq page: hasMore false");
    let oldest = cc.history(&gid, None, Some(head - 99), 50).await?;
    check::dense(&oldest.messages, 1, head - 100)?;
    ensure!(!oldest.has_more, "first page: hasMore true");
    let default_limit = cc.history(&gid, Some(0), None, 0).await?;
    ensure!(
        default_limit.messages.len() == 50,
        "limit 0 means 50, got {}",
        default_limit.messages.len()
    );

    cc.mark_read(&gid, head).await?;
    let s = cc.sync_group(&gid).await?.context("sync")?;
    ensure!(
        s.unread == 0 && s.read_seq == head,
        "after markRead(head): {s:?}"
    );

    // bob was never online: he sees everything as unread.
    let mut cb = Client::connect(&node, &b).await?;
    let s = cb
        .sync_group(&gid)
        .await?
        .context("bob's sync lacks the group")?;
    ensure!(
        s.head_seq == head && s.read_seq == 0,
        "bob, never online: {s:?}"
    );
    let all = cb.history_after(&gid, s.read_seq, 37).await?;
    check::dense(&all, 1, head)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_text_round_trips_in_both_encodings() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect_binary(&node, &b).await?;
    cb.sync().await?;
    let gid = ca.create_group("ünïcødé 群组 🚀", &[&b]).await?;
    let texts = [
        "héllo wörld",
        "日本語のテキスト",
        "emoji 👩‍👩‍👧‍👦 and \"quotes\" and \\ backslash",
        "new\nline\ttab",
        "\u{0}nul",
    ];
    for (i, t) in texts.iter().enumerate() {
        let cl = if i % 2 == 0 { &mut ca } else { &mut cb };
        cl.send(&gid, &format!("u-{i}"), t).await?;
    }
    let head = 1 + texts.len() as u64;
    let pushed = cb.collect_messages(&gid, head, PUSH_WAIT).await?;
    check::dense(&pushed, 1, head)?;
    for (log, cl) in [
        (ca.history_all(&gid).await?, "JSON"),
        (cb.history_all(&gid).await?, "binary"),
    ] {
        check::dense(&log, 1, head)?;
        for (m, t) in log[1..].iter().zip(texts) {
            ensure!(m.text == t, "{cl} history: {:?} != {t:?}", m.text);
        }
    }
    for (m, t) in pushed[1..].iter().zip(texts) {
        ensure!(m.text == t, "push: {:?} != {t:?}", m.text);
    }
    let s = ca.sync_group(&gid).await?.context("sync")?;
    ensure!(s.name == "ünïcødé 群组 🚀", "group name {:?}", s.name);
    Ok(())
}

/// The message `seq` as history returns it, and its reaction counts by emoji.
async fn reactions_on(
    cl: &mut Client,
    gid: &str,
    seq: u64,
) -> Result<(v1::Message, Vec<(String, u32)>)> {
    let h = cl.history(gid, Some(seq - 1), None, 1).await?;
    let m = h.messages.into_iter().next().context("history page")?;
    let counts = m
        .reactions
        .iter()
        .map(|r| (r.emoji.clone(), r.count))
        .collect();
    Ok((m, counts))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reactions_and_readers() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect_binary(&node, &b).await?;
    let mut cc = Client::connect(&node, &c).await?;
    cb.sync().await?;
    let gid = ca.create_group("ephemeral", &[&b]).await?;
    let s = ca.send(&gid, "a-1", "react to me").await?;
    cb.collect_messages(&gid, s.seq, PUSH_WAIT).await?;

    // typing: no reply; other members get a typing push.
    let typing_id = ca
        .send_request(v1::client_frame::Kind::Typing(v1::Typing {
            group_id: gid.clone(),
        }))
        .await?;
    let push = cb
        .next_frame_matching(PUSH_WAIT, |f| {
            matches!(f.kind, Some(v1::server_frame::Kind::Typing(_)))
        })
        .await?
        .context("bob got no typing push")?;
    match push.kind {
        Some(v1::server_frame::Kind::Typing(t)) => {
            ensure!(t.group_id == gid && t.user_id == a, "typing push {t:?}")
        }
        _ => unreachable!(),
    }
    ca.heartbeat().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ca.heartbeat().await?;
    ensure!(
        !ca.inbox().iter().any(|f| f.id == typing_id),
        "typing got a reply (it must get none)"
    );
    // A non-member's typing is not shown to members.
    cc.send_request(v1::client_frame::Kind::Typing(v1::Typing {
        group_id: gid.clone(),
    }))
    .await?;
    cc.heartbeat().await?;
    let leaked = cb
        .next_frame_matching(
            Duration::from_millis(300),
            |f| matches!(&f.kind, Some(v1::server_frame::Kind::Typing(t)) if t.user_id == c),
        )
        .await?;
    ensure!(
        leaked.is_none(),
        "a non-member's typing reached a member: {leaked:?}"
    );

    // react: ok, a reaction push, and counts in history.
    let react = |user_remove: bool| {
        v1::client_frame::Kind::React(v1::React {
            group_id: gid.clone(),
            seq: s.seq,
            emoji: "👍".to_string(),
            remove: user_remove,
        })
    };
    cb.call_ok(react(false)).await?;
    let push = ca
        .next_frame_matching(PUSH_WAIT, |f| {
            matches!(f.kind, Some(v1::server_frame::Kind::Reaction(_)))
        })
        .await?
        .context("alice got no reaction push")?;
    match push.kind {
        Some(v1::server_frame::Kind::Reaction(r)) => ensure!(
            r.group_id == gid && r.seq == s.seq && r.user_id == b && r.emoji == "👍" && !r.removed,
            "reaction push {r:?}"
        ),
        _ => unreachable!(),
    }
    ca.call_ok(react(false)).await?;
    let (m, counts) = reactions_on(&mut ca, &gid, s.seq).await?;
    ensure!(
        counts == vec![("👍".to_string(), 2)],
        "reactions after two: {:?}",
        m.reactions
    );
    ensure!(
        m.reactions[0].user_ids.contains(&a) && m.reactions[0].user_ids.contains(&b),
        "reaction user ids {:?}",
        m.reactions[0].user_ids
    );
    cb.call_ok(react(true)).await?;
    let (m, counts) = reactions_on(&mut ca, &gid, s.seq).await?;
    ensure!(
        counts == vec![("👍".to_string(), 1)],
        "reactions after a removal: {:?}",
        m.reactions
    );
    check::is_error(
        ca.call_ok(v1::client_frame::Kind::React(v1::React {
            group_id: gid.clone(),
            seq: 9999,
            emoji: "👍".to_string(),
            remove: false,
        }))
        .await,
        v1::ErrorCode::NotFound,
        "react to an unknown seq",
    )?;
    check::is_error(
        cc.call_ok(react(false)).await,
        v1::ErrorCode::Forbidden,
        "non-member reacts",
    )?;

    // readers: who read a message.
    cb.mark_read(&gid, s.seq).await?;
    let readers = match ca
        .call(v1::client_frame::Kind::Readers(v1::Readers {
            group_id: gid.clone(),
            seq: s.seq,
        }))
        .await?
    {
        v1::server_frame::Kind::Readers(r) => r,
        other => bail!("readers: {other:?}"),
    };
    ensure!(
        readers.group_id == gid && readers.seq == s.seq,
        "readers reply {readers:?}"
    );
    ensure!(
        readers.read_by >= 1 && readers.readers.contains(&b),
        "bob read seq {} but readers says {readers:?}",
        s.seq
    );
    check::is_error(
        cc.call(v1::client_frame::Kind::Readers(v1::Readers {
            group_id: gid.clone(),
            seq: s.seq,
        }))
        .await,
        v1::ErrorCode::Forbidden,
        "non-member asks for readers",
    )?;
    Ok(())
}
