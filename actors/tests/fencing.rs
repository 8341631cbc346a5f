//! Two nodes that both believe they own a group can never both commit.
//!
//! Two routers ("node a" and "node b") run in this process on one SQLite
//! file, each with a view in which it alone owns everything, so both start
//! an actor for the same group. The second one to start takes a newer epoch;
//! the first one's next commit must fail (UNAVAILABLE) and the log must show
//! one history with dense seqs and no fork.

mod common;

use std::sync::Arc;
use std::time::Duration;

use actors::{ActorConfig, ChatError, GroupId, Router, Store, UserId};
use common::{ask, send};
use proto::v1::{self, client_frame::Kind as Req, server_frame::Kind};
use storage::model::LogQuery;
use storage::sqlite::{SqliteKv, SqliteOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_cannot_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = Arc::new(
        SqliteKv::open(&dir.path().join("chat.db"), SqliteOptions::default()).expect("open"),
    );
    let store = Store::new(kv.clone()).expect("store");
    let a = Router::start("fence-a", store.clone(), ActorConfig::default())
        .await
        .expect("node a");
    let b = Router::start("fence-b", store.clone(), ActorConfig::default())
        .await
        .expect("node b");
    let alice = UserId::parse("alice").expect("valid");

    // Node a creates the group and appends under its epoch.
    let created = ask(
        &a,
        &GroupId::random(),
        &alice,
        Req::CreateGroup(v1::CreateGroup {
            name: "fenced".into(),
            members: vec!["bob".into()],
        }),
    )
    .await
    .expect("created");
    let Kind::GroupCreated(c) = created else {
        panic!("unexpected {created:?}")
    };
    let group = GroupId::parse(&c.group_id).expect("valid id");
    assert!(matches!(
        ask(&a, &group, &alice, send(&group, "a1")).await,
        Ok(Kind::Sent(_))
    ));

    // Node b also believes it owns the group: it loads it, taking a newer epoch.
    let Ok(Kind::Sent(b1)) = ask(&b, &group, &alice, send(&group, "b1")).await else {
        panic!("node b could not append")
    };
    assert_eq!(b1.seq, 3);

    // Node a's actor is still running with the old epoch: its commit fails.
    let stale = ask(&a, &group, &alice, send(&group, "a2")).await;
    assert!(
        matches!(stale, Err(ChatError::Unavailable(_))),
        "stale owner committed: {stale:?}"
    );

    // Retried as a client would (the fenced actor may still be stopping),
    // a2 goes through a fresh load on node a (yet another epoch), and now
    // node b is the stale one.
    let mut a2 = None;
    for _ in 0..50 {
        match ask(&a, &group, &alice, send(&group, "a2")).await {
            Ok(Kind::Sent(s)) => {
                a2 = Some(s);
                break;
            }
            Err(ChatError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("retry on node a: {other:?}"),
        }
    }
    let a2 = a2.expect("a2 committed after retries");
    assert_eq!(a2.seq, 4);
    let stale_b = ask(&b, &group, &alice, send(&group, "b2")).await;
    assert!(
        matches!(stale_b, Err(ChatError::Unavailable(_))),
        "stale owner committed: {stale_b:?}"
    );

    // One history: dense seqs, each acknowledged message exactly once.
    let gid = group.to_string();
    let page = store
        .read(move |t, m| Ok(m.log_page(t, &gid, LogQuery::After(0), 100)?))
        .await
        .expect("read");
    let seqs: Vec<u64> = page.entries.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let texts: Vec<String> = page
        .entries
        .iter()
        .map(|(_, body)| {
            <v1::Message as prost::Message>::decode(&body[..])
                .expect("decodes")
                .client_msg_id
        })
        .collect();
    assert_eq!(texts, vec!["", "a1", "b1", "a2"]);
}
