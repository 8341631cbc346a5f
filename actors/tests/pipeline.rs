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

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use actors::group::PIPELINE_MIN_REQUESTS;
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

async fn router(name: &str, store: &Store) -> Router {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_sends_ahead_of_a_pipelined_commit() {
    metrics();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let first = router("pipe-first", &store).await;
    let alice = user("alice");
    let group = create(&first, &alice, &["bob"]).await;
    let mut original = Vec::new();
    for i in 0..300 {
        let rx = post(&first, &group, &alice, send(&group, &format!("old-{i}"))).await;
        original.push(rx);
    }
    let mut original_seqs = Vec::new();
    for rx in original {
        original_seqs.push(seq_of(answer(rx).await));
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
