//! A group with two commits in storage at once (pipelined group commit)
//! keeps every guarantee of one commit at a time.
//!
//! A real router on a real SQLite file; requests go straight into the group
//! actor's mailbox, thousands at a time, so batches queue behind each other
//! in the node's commit stage. Checked against what storage holds after:
//! dense seqs in request order per sender, one log entry per acknowledged
//! send, a member added mid-stream who can send right after, sender
//! pointers that never go back, and retried sends (found by the commit,
//! with a batch already planned behind them) answered with their first
//! outcome. The metrics show that batches did queue behind each other.
//!
//! Dedupe records trail the log (see `actors::group`): retries of sends
//! whose records are not written yet are answered by a new owner from the
//! log tail it loads, the records up to the watermark are all there, and
//! the watermark stays within a bounded distance of the head.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use actors::group::{DEDUPE_FLUSH, DEDUPE_LAG, PIPELINE_MIN_REQUESTS};
use actors::{ActorConfig, ChatError, GroupId, Router, Store, UserId};
use common::{Answer, answer, ask, post, send};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use proto::v1::{self, client_frame::Kind as Req, server_frame::Kind};
use storage::model::LogQuery;
use storage::sqlite::{SqliteKv, SqliteOptions};

/// One recorder for the test binary (the tests share its counters).
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install the metrics recorder")
    })
}

fn counter(name: &str) -> u64 {
    metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn seq_of(k: Result<Kind, ChatError>) -> u64 {
    match k {
        Ok(Kind::Sent(s)) => s.seq,
        other => panic!("expected sent, got {other:?}"),
    }
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

/// A router on `store`, started after the recorder: it resolves its metric
/// handles when it starts (`actors::meters`), and handles resolved before
/// any recorder is installed count nothing.
async fn router(name: &str, store: &Store) -> Router {
    metrics();
    Router::start(name, store.clone(), ActorConfig::default())
        .await
        .expect("router")
}

async fn create(router: &Router, owner: &UserId, members: &[&str]) -> GroupId {
    let req = Req::CreateGroup(v1::CreateGroup {
        name: "pipelined".into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    });
    match ask(router, &GroupId::random(), owner, req).await {
        Ok(Kind::GroupCreated(c)) => GroupId::parse(&c.group_id).expect("valid id"),
        other => panic!("create: {other:?}"),
    }
}

/// The group's whole log: `(seq, message)`.
async fn log(store: &Store, group: &GroupId) -> Vec<(u64, v1::Message)> {
    let gid = group.to_string();
    let page = store
        .read(move |t, m| Ok(m.log_page(t, &gid, LogQuery::After(0), 100_000)?))
        .await
        .expect("read the log");
    page.entries
        .into_iter()
        .map(|(s, b)| {
            (
                s,
                <v1::Message as prost::Message>::decode(&b[..]).expect("decodes"),
            )
        })
        .collect()
}

/// The group's dedupe watermark (every group created or loaded has one).
async fn watermark(store: &Store, group: &GroupId) -> u64 {
    let gid = group.to_string();
    store
        .read(move |t, m| Ok(m.dedupe_indexed(t, &gid)?))
        .await
        .expect("read the watermark")
        .expect("the group has a watermark")
}

fn open(dir: &tempfile::TempDir) -> Store {
    let kv = SqliteKv::open(&dir.path().join("chat.db"), SqliteOptions::default()).expect("open");
    Store::new(Arc::new(kv)).expect("store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commits_keep_order_membership_and_pointers() {
    metrics();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let node = router("pipe-a", &store).await;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let group = create(&node, &alice, &["bob"]).await;
    let pipelined_before = counter("chat_group_pipelined_commits_total");
    let waits_before = counter("chat_commit_wait_seconds_count");

    // 4,000 sends queued at once. Bob's come first: one batch of one send
    // (planned at once), one of the next PIPELINE_MIN_REQUESTS planned
    // behind it. Then a receipt of his: his pointer moves in memory while
    // both are in storage, and is written by a later batch that holds no
    // send of his and must not write it below his last send. Then alice's
    // sends; carol is added in the middle of them and sends right after her
    // addition was queued.
    const N: usize = 4_000;
    const BOB: usize = 1 + PIPELINE_MIN_REQUESTS;
    let mut sends: Vec<(UserId, String, Answer)> = Vec::new();
    let mut add = None;
    let mut carol_send = None;
    let mut receipt = None;
    for i in 0..N {
        let who = if i < BOB { &bob } else { &alice };
        let cmid = format!("{who}-{i}");
        let rx = post(&node, &group, who, send(&group, &cmid)).await;
        sends.push((who.clone(), cmid, rx));
        if i == BOB - 1 {
            let req = Req::MarkDelivered(v1::MarkDelivered {
                group_id: group.to_string(),
                seq: 1,
            });
            receipt = Some(post(&node, &group, &bob, req).await);
        }
        if i == BOB + (N - BOB) / 2 {
            let req = Req::AddMembers(v1::AddMembers {
                group_id: group.to_string(),
                user_ids: vec!["carol".into()],
            });
            add = Some(post(&node, &group, &alice, req).await);
            carol_send = Some(post(&node, &group, &carol, send(&group, "carol-0")).await);
        }
    }
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut last: HashMap<UserId, u64> = HashMap::new();
    for (who, cmid, rx) in sends {
        let seq = seq_of(answer(rx).await);
        let prev = last.insert(who.clone(), seq).unwrap_or(0);
        assert!(seq > prev, "{who}'s sends out of order: {seq} after {prev}");
        acked.insert(cmid, seq);
    }
    assert!(matches!(
        answer(add.expect("queued")).await,
        Ok(Kind::Ok(_))
    ));
    assert!(matches!(
        answer(receipt.expect("queued")).await,
        Ok(Kind::Ok(_))
    ));
    let carol_seq = seq_of(answer(carol_send.expect("queued")).await);
    acked.insert("carol-0".into(), carol_seq);

    // Storage: seq 1 created the group, one system message added carol,
    // and every acknowledged send is there once, at its seq.
    let entries = log(&store, &group).await;
    let seqs: Vec<u64> = entries.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=(N as u64 + 3)).collect::<Vec<_>>(), "dense seqs");
    let mut added_at = 0;
    for (seq, msg) in &entries {
        if msg.client_msg_id.is_empty() {
            if msg.system.as_ref().is_some_and(|e| e.user_ids == ["carol"]) {
                added_at = *seq;
            }
            continue;
        }
        assert_eq!(
            acked.get(&msg.client_msg_id),
            Some(seq),
            "{}",
            msg.client_msg_id
        );
    }
    assert_eq!(acked.len(), N + 1);
    assert!(
        added_at > 0 && carol_seq > added_at,
        "carol sent after her addition"
    );

    // Sender pointers were written with the sends, and none went back.
    let gid = group.to_string();
    let records = store
        .read(move |t, m| {
            Ok((
                m.member(t, &gid, "alice")?,
                m.member(t, &gid, "bob")?,
                m.member(t, &gid, "carol")?,
            ))
        })
        .await
        .expect("read members");
    for (who, rec) in [(&alice, records.0), (&bob, records.1), (&carol, records.2)] {
        let rec = rec.expect("a member");
        assert_eq!(
            rec.read_seq,
            last.get(who).copied().unwrap_or(carol_seq),
            "{who}"
        );
    }
    assert!(
        counter("chat_group_pipelined_commits_total") > pipelined_before,
        "no batch was planned behind another: the test did not test pipelining"
    );
    // Every committed transaction says how long it waited for the writer
    // (the tests of this binary share the recorder: only growth is ours).
    assert!(counter("chat_commit_wait_seconds_count") > waits_before);
    assert!(
        counter("chat_commit_wait_seconds_count") <= counter("chat_commit_txn_seconds_count"),
        "a wait without its transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_sends_ahead_of_a_pipelined_commit() {
    metrics();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let first = router("pipe-first", &store).await;
    let alice = user("alice");
    let group = create(&first, &alice, &["bob"]).await;
    // Three waves, so that later batches write the dedupe records of
    // earlier ones (DEDUPE_FLUSH is 128): the retries of sends up to the
    // watermark are found by the commit, the rest in the log tail that the
    // new owner loads.
    let mut original_seqs = Vec::new();
    for wave in 0..3 {
        let mut original = Vec::new();
        for i in wave * 100..(wave + 1) * 100 {
            let rx = post(&first, &group, &alice, send(&group, &format!("old-{i}"))).await;
            original.push(rx);
        }
        for rx in original {
            original_seqs.push(seq_of(answer(rx).await));
        }
    }
    let indexed = watermark(&store, &group).await;
    assert!(
        indexed >= original_seqs[0] && indexed < *original_seqs.last().expect("sent"),
        "some records are written, not all (watermark {indexed})"
    );
    let gid = group.to_string();
    let records = store
        .read(move |t, m| {
            let mut records = Vec::new();
            for i in 0..300 {
                records.push(m.dedupe(t, &gid, "alice", &format!("old-{i}"))?);
            }
            Ok(records)
        })
        .await
        .expect("read the records");
    for (rec, seq) in records.iter().zip(&original_seqs) {
        if *seq <= indexed {
            assert_eq!(
                rec.as_ref().map(|r| r.seq),
                Some(*seq),
                "recorded up to the watermark"
            );
        }
    }

    // A new owner (a fresh actor, its memory of recent sends empty) gets
    // every old send again, then new ones, all queued at once: the retries
    // are found by the commit, while batches already wait behind them.
    let second = router("pipe-second", &store).await;
    let abandoned_before = counter("chat_group_abandoned_commits_total");
    let mut retries = Vec::new();
    let mut fresh = Vec::new();
    for i in 0..300 {
        retries.push(post(&second, &group, &alice, send(&group, &format!("old-{i}"))).await);
    }
    for i in 0..2_000 {
        fresh.push(post(&second, &group, &alice, send(&group, &format!("new-{i}"))).await);
    }
    for (rx, seq) in retries.into_iter().zip(&original_seqs) {
        assert_eq!(seq_of(answer(rx).await), *seq, "a retry gets its first seq");
    }
    let mut prev = *original_seqs.last().expect("sent");
    for rx in fresh {
        let seq = seq_of(answer(rx).await);
        assert_eq!(seq, prev + 1, "new sends follow in order, no gap");
        prev = seq;
    }
    let entries = log(&store, &group).await;
    assert_eq!(entries.len() as u64, prev, "one entry per seq");
    assert_eq!(entries.last().map(|(s, _)| *s), Some(prev));
    assert!(
        counter("chat_group_abandoned_commits_total") > abandoned_before,
        "no batch waited behind one with retries: the test did not test that path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_sends_recorded_only_in_the_log_get_their_first_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let first = router("tail-first", &store).await;
    let alice = user("alice");
    let group = create(&first, &alice, &["bob"]).await;
    let mut seqs = Vec::new();
    for i in 0..50 {
        seqs.push(seq_of(
            ask(&first, &group, &alice, send(&group, &format!("t-{i}"))).await,
        ));
    }
    // Fewer than DEDUPE_FLUSH sends: no record is written yet, only the log.
    assert_eq!(watermark(&store, &group).await, 0);
    let gid = group.to_string();
    let recorded = store
        .read(move |t, m| Ok(m.dedupe(t, &gid, "alice", "t-0")?))
        .await
        .expect("read");
    assert!(
        recorded.is_none(),
        "the test needs a send without its record"
    );

    // A new owner (nothing in memory) answers every retry from the log tail
    // it loaded, and writes nothing for them.
    let second = router("tail-second", &store).await;
    for (i, seq) in seqs.iter().enumerate() {
        let again = ask(&second, &group, &alice, send(&group, &format!("t-{i}"))).await;
        assert_eq!(seq_of(again), *seq, "retry {i}");
    }
    let next = seq_of(ask(&second, &group, &alice, send(&group, "t-new")).await);
    let last = *seqs.last().expect("sent");
    assert_eq!(next, last + 1, "no seq was taken by a retry");
    assert_eq!(log(&store, &group).await.len() as u64, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedupe_watermark_trails_the_head_by_a_bounded_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let node = router("trail", &store).await;
    let alice = user("alice");
    let group = create(&node, &alice, &["bob"]).await;
    // Sends in waves of 40 (each wave about one batch, too small to record
    // its own sends), then announcements only: those take seqs without
    // dedupe records, and still move it.
    let mut first_seq = 0;
    for wave in 0..20 {
        let mut rxs = Vec::new();
        for i in 0..40 {
            let cmid = format!("w{wave}-{i}");
            rxs.push(post(&node, &group, &alice, send(&group, &cmid)).await);
        }
        for rx in rxs {
            let seq = seq_of(answer(rx).await);
            first_seq = if first_seq == 0 { seq } else { first_seq };
        }
    }
    let head = log(&store, &group).await.len() as u64;
    let indexed = watermark(&store, &group).await;
    assert!(
        head - indexed < (DEDUPE_FLUSH + 2 * 40) as u64,
        "head {head}, watermark {indexed}"
    );
    for i in 0..(DEDUPE_LAG + 100) {
        node.post_system(&group, format!("notice {i}"))
            .await
            .expect("announce");
    }
    let head = log(&store, &group).await.len() as u64;
    let indexed = watermark(&store, &group).await;
    assert!(
        head - indexed <= DEDUPE_LAG + 1,
        "head {head}, watermark {indexed}"
    );
    assert!(
        indexed > 20 * 40,
        "announcements moved it (watermark {indexed})"
    );

    // A new owner gets a retry of the first send alone (a batch of one,
    // which reads the written records instead of inserting its own).
    let second = router("trail-second", &store).await;
    let again = ask(&second, &group, &alice, send(&group, "w0-0")).await;
    assert_eq!(seq_of(again), first_seq, "found in the written records");
    assert_eq!(
        log(&store, &group).await.len() as u64,
        head,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_from_before_the_watermark_gets_one_when_it_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let first = router("old-first", &store).await;
    let alice = user("alice");
    let group = create(&first, &alice, &["bob"]).await;
    // As if written by a build that recorded every send in its own batch.
    let gid = group.to_string();
    store
        .write(move |t, m| Ok(m.clear_dedupe_indexed(t, &gid)?))
        .await
        .expect("clear the watermark");

    // A new owner loads it, then defers its sends' records.
    let second = router("old-second", &store).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(seq_of(
            ask(&second, &group, &alice, send(&group, &format!("o-{i}"))).await,
        ));
    }
    assert_eq!(
        watermark(&store, &group).await,
        1,
        "set to the head at loading"
    );

    // The next owner finds those sends in the log tail past it.
    let third = router("old-third", &store).await;
    for (i, seq) in seqs.iter().enumerate() {
        let again = ask(&third, &group, &alice, send(&group, &format!("o-{i}"))).await;
        assert_eq!(seq_of(again), *seq, "retry {i}");
    }
    assert_eq!(log(&store, &group).await.len(), 6, "nothing written twice");
}

/// The group forgets answered sends by rebuilding its set of waiting ones
/// from its queue once the set holds 1,024 more than are queued. The send
/// that triggers the rebuild is not queued yet: a retry of it, while it
/// waits, must still be attached to it, not appended a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_the_send_that_rebuilds_the_waiting_set_is_not_a_second_send() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let router = router("pipe-rebuild", &store).await;
    let alice = user("alice");
    let group = create(&router, &alice, &["bob"]).await;
    // 1,024 answered sends: the set holds them all, nothing is queued.
    let mut first = Vec::new();
    for i in 0..1_024 {
        first.push(post(&router, &group, &alice, send(&group, &format!("m-{i}"))).await);
    }
    let mut last = 0;
    for rx in first {
        last = seq_of(answer(rx).await);
    }
    // The next send outgrows the set; its retry is right behind it in the
    // mailbox, before its commit can report.
    let once = post(&router, &group, &alice, send(&group, "trigger")).await;
    let again = post(&router, &group, &alice, send(&group, "trigger")).await;
    let seq = seq_of(answer(once).await);
    assert_eq!(seq, last + 1);
    assert_eq!(
        seq_of(answer(again).await),
        seq,
        "the retry gets the same seq"
    );
    let next = seq_of(ask(&router, &group, &alice, send(&group, "after")).await);
    assert_eq!(next, seq + 1, "the retry took no seq");
    let entries = log(&store, &group).await;
    let triggers = entries
        .iter()
        .filter(|(_, m)| m.client_msg_id == "trigger")
        .count();
    assert_eq!(triggers, 1, "one log entry for the send and its retry");
}
