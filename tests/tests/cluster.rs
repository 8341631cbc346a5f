//! End-to-end tests of a cluster: real `chat-node` processes on 127.0.0.1
//! joined with ractor_cluster and sharing one store file (see
//! `tests::cluster`).
//!
//! - users on different nodes chat in a group owned by a third node (both
//!   directions) and 1:1; an internal service posts an announcement through
//!   a node that neither owns the group nor hosts its members;
//! - two-tier fan-out: a 1,000-member group spread over 3 nodes costs its
//!   group actor one send per peer node per message, not one per member;
//! - a 4th node joins and a node is drained while clients keep sending (no
//!   acknowledged message lost, order kept, no push missed, the drained
//!   node's clients go elsewhere);
//! - SIGKILL of the owner of a busy group while senders retry with the same
//!   clientMsgIds (twice, with restarts);
//! - SIGSTOP of an owner past the failure timeout, takeover, SIGCONT: once
//!   frozen between two store commits, once frozen inside one (holding the
//!   shared SQLite file's writer lock);
//! - a node with the wrong cookie is refused.
//!
//! Each test starts its own cluster (3 nodes, failure timeout 1.5 s) and
//! ends with [`Cluster::check_health`] (no panic, no `INTERNAL` error).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::check::{self, system_kind};
use tests::cluster::{Cluster, ClusterOptions, Endpoints, Seeds, wait_until};
use tests::failover::{
    Ack, ReceiverReport, ReceiverSpec, SenderReport, SenderSpec, Traffic, verify_group,
    verify_receiver,
};
use tests::v1::{SystemKind, server_frame::Kind};
use tests::{Client, Mode, placement, unique};
use tests::{PUSH_WAIT, check::same_message, user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_chat_through_a_third_node() -> Result<()> {
    // Every node is seeded with node1 only: node2 and node3 find each other
    // through it.
    let cluster = Cluster::start(ClusterOptions {
        seeds: Seeds::First,
        ..ClusterOptions::default()
    })
    .await?;
    for i in 0..3 {
        let live = cluster.metric(i, "chat_cluster_live_nodes").await?;
        ensure!(
            live == 3.0,
            "{}: chat_cluster_live_nodes = {live}",
            cluster.name(i)
        );
        let s = cluster.status(i).await?;
        ensure!(
            s.node == cluster.name(i),
            "status of {}: {s:?}",
            cluster.name(i)
        );
        ensure!(
            s.nodes.len() == 3 && s.live().len() == 3,
            "{} lists {:?}",
            cluster.name(i),
            s.nodes
        );
        for n in &s.nodes {
            let j = cluster.index_of(&n.name)?;
            ensure!(
                n.http_addr == cluster.node(j).addr().to_string()
                    && n.cluster_addr == cluster.cluster_addrs()[j].to_string()
                    && !n.draining,
                "{} describes {} as {n:?}",
                cluster.name(i),
                n.name
            );
        }
    }

    let (a, b) = (user("alice"), user("bob"));
    let mut ca = cluster.connect(0, &a).await?; // JSON on node1
    let mut cb = cluster.connect_binary(1, &b).await?; // binary on node2
    ca.sync().await?;
    cb.sync().await?;

    // A group owned by node3, where neither member is connected.
    let gid = cluster
        .group_owned_by(&mut ca, "third-node", &[&b], 2, 0)
        .await?;
    cluster
        .wait_owner(&gid, "node3", Duration::from_secs(5))
        .await?;
    let committed_before = cluster.metric(2, "chat_messages_committed_total").await?;
    // Both directions, interleaved.
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(
            ca.send(&gid, &format!("a-{i}"), &format!("alice {i}"))
                .await?,
        );
        acks.push(
            cb.send(&gid, &format!("b-{i}"), &format!("bob {i}"))
                .await?,
        );
    }
    let seqs: Vec<u64> = acks.iter().map(|s| s.seq).collect();
    ensure!(
        seqs == (2..=11).collect::<Vec<_>>(),
        "seqs of alternating senders: {seqs:?}"
    );
    let log = ca.history_all(&gid).await?;
    check::dense(&log, 1, 11)?;
    for cl in [&mut ca, &mut cb] {
        let got = cl.collect_messages(&gid, 11, PUSH_WAIT).await?;
        check::dense(&got, 1, 11).with_context(|| format!("{}'s pushes", cl.user()))?;
        for (p, h) in got.iter().zip(&log) {
            same_message(p, h)?;
        }
    }
    // The group actor runs on node3: it committed the messages.
    let committed = cluster.metric(2, "chat_messages_committed_total").await? - committed_before;
    ensure!(
        committed >= 10.0,
        "node3 (the owner) committed {committed} entries for 10 sends"
    );
    ensure!(
        cluster.status(2).await?.groups >= 1,
        "node3 runs no group actor"
    );

    // 1:1 across nodes: the same id from both sides, both directions.
    let d1 = ca.open_direct(&b).await?;
    let d2 = cb.open_direct(&a).await?;
    ensure!(d1 == d2, "openDirect ids differ: {d1} vs {d2}");
    let s1 = ca.send(&d1, "dm-a", "hi bob, from node1").await?;
    let s2 = cb.send(&d1, "dm-b", "hi alice, from node2").await?;
    ensure!(
        s2.seq == s1.seq + 1,
        "direct seqs {} then {}",
        s1.seq,
        s2.seq
    );
    for cl in [&mut ca, &mut cb] {
        let got = cl.collect_messages(&d1, s2.seq, PUSH_WAIT).await?;
        let texts: Vec<&str> = got
            .iter()
            .filter(|m| m.seq >= s1.seq)
            .map(|m| m.text.as_str())
            .collect();
        ensure!(
            texts == ["hi bob, from node1", "hi alice, from node2"],
            "{}: direct pushes {texts:?}",
            cl.user()
        );
    }

    // The internal-service API from node3, which hosts no client and does
    // not own the group.
    ensure!(
        cluster.status(2).await?.sessions == 0,
        "node3 hosts sessions"
    );
    // A group owned by node1, its members on node1 and node2.
    let announce_gid = cluster
        .group_owned_by(&mut ca, "announce", &[&b], 0, 0)
        .await?;
    ensure!(
        cluster.owner(2, &announce_gid).await? == "node1",
        "node3 disagrees on the owner of {announce_gid}"
    );
    let head = ca
        .sync_group(&announce_gid)
        .await?
        .context("alice's sync lacks the announcement group")?
        .head_seq;
    let text = format!("maintenance at noon ({})", unique(""));
    let r = cluster.post_system(2, &announce_gid, &text).await?;
    ensure!(
        r.status == 200,
        "POST /admin/system: {} {}",
        r.status,
        r.body
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).context("JSON answer")?;
    ensure!(
        v["groupId"].as_str() == Some(announce_gid.as_str()),
        "answer {v}"
    );
    let seq = v["seq"]
        .as_u64()
        .or_else(|| v["seq"].as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("no seq in {v}"))?;
    ensure!(seq == head + 1, "announcement seq {seq} after head {head}");
    for cl in [&mut ca, &mut cb] {
        let got = cl.collect_messages(&announce_gid, seq, PUSH_WAIT).await?;
        let m = got.last().context("no push")?;
        ensure!(
            m.seq == seq && system_kind(m) == Some(SystemKind::Announcement) && m.text == text,
            "{}: announcement push {m:?}",
            cl.user()
        );
    }
    // The operator CLI does the same through node3.
    let cli_text = "second announcement, via the CLI";
    let out = cluster
        .admin_cli(2, &["post-system", &announce_gid, cli_text])
        .await?;
    ensure!(
        out.status.success(),
        "chat-node admin post-system: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got = cb
        .collect_messages(&announce_gid, seq + 1, PUSH_WAIT)
        .await?;
    let m = got.last().context("no push")?;
    ensure!(
        system_kind(m) == Some(SystemKind::Announcement) && m.text == cli_text,
        "CLI announcement push {m:?}"
    );
    // Without an operator token: 401; an unknown group: 404.
    let r = tests::http::request(
        cluster.node(2).addr(),
        "POST",
        &format!("/admin/system?group={announce_gid}"),
        &[],
        b"no token",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        r.status == 401,
        "POST /admin/system without a token: {}",
        r.status
    );
    let r = tests::http::request(
        cluster.node(2).addr(),
        "POST",
        &format!("/admin/system?group={announce_gid}"),
        &[(
            "Authorization",
            &format!("Bearer {}", cluster.node(2).token(&a)),
        )],
        b"user token",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        r.status == 401,
        "POST /admin/system with a user's token: {}",
        r.status
    );
    let unknown = format!("g_{:026x}", 0x1234_5678_9abc_def0_u128);
    let r = cluster.post_system(2, &unknown, "nobody").await?;
    ensure!(
        r.status == 404,
        "POST /admin/system for an unknown group: {} {}",
        r.status,
        r.body
    );
    cluster.check_health().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tier_fanout_sends_once_per_node_not_per_member() -> Result<()> {
    const MEMBERS: usize = 1000;
    const MESSAGES: u64 = 20;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let users: Vec<String> = (0..MEMBERS).map(|i| user(&format!("m{i}"))).collect();
    // Every member online, spread evenly over the three nodes.
    let t0 = Instant::now();
    let mut clients: Vec<Client> = Vec::with_capacity(MEMBERS);
    for (c, us) in users.chunks(50).enumerate() {
        let base = c * 50;
        let batch = us.iter().enumerate().map(|(j, u)| {
            let node = cluster.node((base + j) % 3);
            async move {
                let mut cl = Client::connect_binary(node, u).await?;
                cl.sync().await?;
                anyhow::Ok(cl)
            }
        });
        for cl in futures::future::join_all(batch).await {
            clients.push(cl?);
        }
    }
    eprintln!("{MEMBERS} members connected in {:?}", t0.elapsed());
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let gid = clients[0].create_group("everyone", &others).await?;
    let owner = cluster.index_of(&cluster.owner(0, &gid).await?)?;
    // Every member gets CREATED (so its fan-out is over before we count).
    for cl in &mut clients {
        let got = cl.collect_messages(&gid, 1, PUSH_WAIT).await?;
        ensure!(
            system_kind(&got[0]) == Some(SystemKind::Created),
            "{}: first push {:?}",
            cl.user(),
            got[0]
        );
    }
    let remote_before = cluster
        .metric(owner, "chat_fanout_remote_sends_total")
        .await?;
    let mut relay_before = Vec::new();
    for i in 0..3 {
        relay_before.push(cluster.metric(i, "chat_relay_deliveries_total").await?);
    }
    let t_send = Instant::now();
    for k in 0..MESSAGES {
        clients[0]
            .send(&gid, &format!("fan-{k}"), &format!("to all {k}"))
            .await?;
    }
    let sending = t_send.elapsed();
    let head = 1 + MESSAGES;
    for cl in &mut clients {
        let got = cl.collect_messages(&gid, head, PUSH_WAIT).await?;
        check::dense(&got, 2, head).with_context(|| format!("{}'s pushes", cl.user()))?;
    }
    let remote = cluster
        .metric(owner, "chat_fanout_remote_sends_total")
        .await?
        - remote_before;
    let per_message = remote / MESSAGES as f64;
    let mut relayed = Vec::new();
    for (i, before) in relay_before.iter().enumerate() {
        relayed.push(cluster.metric(i, "chat_relay_deliveries_total").await? - before);
    }
    eprintln!(
        "fan-out of {MESSAGES} messages to {MEMBERS} members in {sending:?}: owner {} made \
         {remote} remote sends ({per_message:.2} per message); relay deliveries per node {relayed:?}",
        cluster.name(owner)
    );
    // Besides one delivery per peer per message, the owner may send a few
    // other envelopes to each peer meanwhile: membership notices, and the
    // coalesced receipts push (at most one per receipts interval, 500 ms).
    let peers = 2.0;
    let slack = peers * (2.0 + (sending.as_secs_f64() / 0.5).ceil());
    ensure!(
        remote <= peers * MESSAGES as f64 + slack,
        "owner {} made {remote} cross-node sends for {MESSAGES} messages to {MEMBERS} members \
         ({per_message:.2} per message; at most {peers} expected)",
        cluster.name(owner)
    );
    ensure!(
        remote >= 1.0,
        "no cross-node send at all: is the counter there?"
    );
    // Each node's relay delivered every message to its own third of members.
    for (i, r) in relayed.iter().enumerate() {
        let local = (0..MEMBERS).filter(|j| j % 3 == i).count() as f64;
        ensure!(
            *r >= local * MESSAGES as f64,
            "{}: relay delivered {r} pushes, expected at least {local} members x {MESSAGES}",
            cluster.name(i)
        );
    }
    cluster.check_health().await?;
    Ok(())
}

/// Reads the final log of every group through node `via` (as `reader`, a
/// member of all) and checks it against the acknowledgements and what every
/// receiver saw.
async fn verify_logs(
    cluster: &Cluster,
    via: usize,
    reader: &str,
    groups: &[String],
    acks: &[Ack],
    receivers: &[ReceiverReport],
) -> Result<Vec<u64>> {
    let mut cl = cluster.connect(via, reader).await?;
    let mut heads = Vec::new();
    for gid in groups {
        let log = cl.history_all(gid).await?;
        verify_group(&log, gid, acks)?;
        for r in receivers {
            verify_receiver(r, gid, &log)?;
        }
        heads.push(log.last().map(|m| m.seq).unwrap_or(0));
    }
    Ok(heads)
}

/// A one-line summary of what the senders and receivers went through.
fn traffic_summary(senders: &[SenderReport], receivers: &[ReceiverReport]) -> String {
    let s: Vec<String> = senders
        .iter()
        .map(|s| {
            format!(
                "{}: {} acked, {} unavailable, {} reconnects, slowest {:?}",
                &s.user[..s.user.find('-').unwrap_or(s.user.len())],
                s.acked,
                s.unavailable,
                s.reconnects,
                s.slowest
            )
        })
        .collect();
    let r: Vec<String> = receivers
        .iter()
        .map(|r| {
            format!(
                "{}: {} pushes, {} pulled, {} gaps {:?}, {} connections",
                &r.user[..r.user.find('-').unwrap_or(r.user.len())],
                r.pushes,
                r.pulled,
                r.gaps,
                r.gap_list,
                r.connections.len()
            )
        })
        .collect();
    format!("senders [{}]; receivers [{}]", s.join("; "), r.join("; "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_busy_groups_owner_loses_no_acknowledged_message() -> Result<()> {
    const STEP: usize = 300;
    const ROUNDS: usize = 2;
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let (s1, s2, s3, r1, r3) = (user("s1"), user("s2"), user("s3"), user("r1"), user("r3"));
    let mut admin = cluster.connect(0, &s1).await?;
    let gid = cluster
        .group_owned_by(&mut admin, "busy", &[&s2, &s3, &r1, &r3], 2, 0)
        .await?;
    drop(admin);
    let groups = vec![gid.clone()];
    let endpoints = cluster.endpoints();
    let mut traffic = Traffic::start(
        &endpoints,
        vec![
            SenderSpec::new(&s1, &groups, 0),
            // 16 sends in flight: group commits are in progress at the kill.
            SenderSpec {
                window: 16,
                ..SenderSpec::new(&s2, &groups, 1)
            },
            // Connected to the victim: it must reconnect elsewhere.
            SenderSpec {
                mode: Mode::Binary,
                window: 4,
                ..SenderSpec::new(&s3, &groups, 2)
            },
        ],
        vec![
            ReceiverSpec::new(&r1, &groups, 0),
            ReceiverSpec::new(&r3, &groups, 2),
        ],
    );
    traffic
        .wait_acks(STEP, Duration::from_secs(30), "before the first kill")
        .await?;

    // Twice: kill -9 the owner mid-stream, let another node take over,
    // then bring the node back on the same store; it rejoins and wins its
    // group back (a new epoch each time).
    for round in 1..=ROUNDS {
        cluster.kill9(2)?; // sends are in flight right now
        let at_kill = traffic.acked();
        let t_kill = Instant::now();
        traffic
            .wait_acks(
                at_kill + STEP,
                Duration::from_secs(30),
                &format!("after kill {round}"),
            )
            .await?;
        eprintln!(
            "kill {round}: -9 of node3 after {at_kill} acks; {STEP} more within {:?}",
            t_kill.elapsed()
        );
        cluster
            .wait_converged(&[0, 1], Duration::from_secs(10))
            .await?;
        let new_owner = cluster
            .wait_owner_moved(&gid, "node3", Duration::from_secs(5))
            .await?;
        for i in [0, 1] {
            let live = cluster.metric(i, "chat_cluster_live_nodes").await?;
            ensure!(
                live == 2.0,
                "{}: {live} live nodes after kill {round}",
                cluster.name(i)
            );
        }
        cluster.restart(2).await?;
        cluster
            .wait_owner(&gid, "node3", Duration::from_secs(10))
            .await?;
        let at_restart = traffic.acked();
        traffic
            .wait_acks(
                at_restart + STEP,
                Duration::from_secs(30),
                &format!("after restart {round}"),
            )
            .await?;
        eprintln!("kill {round}: {new_owner} took over; node3 back and owner again");
    }

    let (senders, receivers, acks) = traffic.finish().await?;
    eprintln!("{}", traffic_summary(&senders, &receivers));
    let heads = verify_logs(&cluster, 1, &r1, &groups, &acks, &receivers).await?;
    ensure!(
        heads[0] == 1 + acks.len() as u64,
        "head {} for {} acknowledged messages",
        heads[0],
        acks.len()
    );
    ensure!(
        senders[2].connections.len() >= 2,
        "the sender on node3 never reconnected: {:?}",
        senders[2]
    );
    ensure!(
        receivers[1].connections.len() >= 2 && !receivers[1].ends.is_empty(),
        "the receiver on node3 never reconnected: {:?}",
        receivers[1].connections
    );
    cluster.check_health().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_an_owner_past_the_failure_timeout_forks_nothing() -> Result<()> {
    // Frozen between two store commits (see the next test for the other case).
    owner_frozen_past_the_failure_timeout(false).await
}

/// Frozen while it holds SQLite's writer lock on the shared store file: the
/// embedded engine cannot let another process commit until the lock holder
/// resumes or dies (documented in docs/cluster.md; FoundationDB has no such
/// lock). What must still hold: the others declare it down and move the
/// group, nothing acknowledged is lost, the log does not fork, and traffic
/// resumes once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_an_owner_inside_a_store_commit_loses_and_forks_nothing() -> Result<()> {
    owner_frozen_past_the_failure_timeout(true).await
}

/// SIGSTOP of a busy group's owner (node3) for three failure timeouts while
/// senders keep going: the others declare it down and one of them takes the
/// group over; SIGCONT: node3 sends its clients away (goaway, 1012), rejoins
/// and owns the group again; no acknowledged message lost, no fork.
/// `inside_a_commit`: freeze node3 at a moment when it holds the shared
/// store's writer lock (else at a moment when it does not).
async fn owner_frozen_past_the_failure_timeout(inside_a_commit: bool) -> Result<()> {
    const STEP: usize = 100;
    /// SIGSTOP/SIGCONT attempts to catch node3 in the wanted state.
    const FREEZE_TRIES: usize = 300;
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let (s1, s2, s3, r1, r2, w3) = (
        user("s1"),
        user("s2"),
        user("s3"),
        user("r1"),
        user("r2"),
        user("w3"),
    );
    let mut admin = cluster.connect(0, &s1).await?;
    let gid = cluster
        .group_owned_by(&mut admin, "stalled", &[&s2, &s3, &r1, &r2], 2, 0)
        .await?;
    drop(admin);
    // A client idle on node3 (in no group, so nothing queues up for it), to
    // see how node3 sends its clients away after the pause.
    let mut watcher = cluster.connect(2, &w3).await?;
    watcher.sync().await?;
    let groups = vec![gid.clone()];
    let endpoints = cluster.endpoints();
    let mut traffic = spread_traffic(&endpoints, &groups, [&s1, &s2, &s3], [&r1, &r2]);
    traffic
        .wait_acks(STEP, Duration::from_secs(30), "before the stop")
        .await?;

    let held = cluster
        .sigstop_with_writer_lock(2, inside_a_commit, FREEZE_TRIES)
        .await?;
    let t_stop = Instant::now();
    let at_stop = traffic.acked();
    let frozen_how = if held {
        format!(
            "node3 is frozen holding SQLite's WAL writer lock on the shared store {} \
             (its locks: {:?}), so no other process can commit until it resumes",
            cluster.store_path().display(),
            cluster.store_locks(2)
        )
    } else {
        "node3 is frozen between commits (it holds no writer lock)".to_string()
    };
    eprintln!("{frozen_how}");
    // The others declare node3 down after the failure timeout and one of
    // them takes the group over (new epoch) while node3 is frozen.
    cluster
        .wait_converged(&[0, 1], cluster.failure_timeout() + Duration::from_secs(5))
        .await?;
    let new_owner = cluster
        .wait_owner_moved(&gid, "node3", Duration::from_secs(5))
        .await?;
    let declared_after = t_stop.elapsed();
    if !held {
        traffic
            .wait_acks(
                at_stop + STEP,
                Duration::from_secs(20),
                "while node3 is frozen",
            )
            .await
            .with_context(|| format!("{new_owner} took the group over, but {frozen_how}"))?;
    }
    // Frozen for well over the failure timeout.
    let frozen_for = cluster.failure_timeout() * 3;
    if let Some(rest) = frozen_for.checked_sub(t_stop.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let during_stop = traffic.acked() - at_stop;
    let frozen = t_stop.elapsed();
    cluster.sigcont(2)?;
    eprintln!(
        "node3 frozen for {frozen:?}; declared down after {declared_after:?}; \
         {during_stop} acks meanwhile through {new_owner}"
    );

    // node3 notices its pause: goaway, close 1012, and it rejoins.
    let f = watcher
        .next_frame_matching(Duration::from_secs(15), |f| {
            matches!(f.kind, Some(Kind::Goaway(_)))
        })
        .await
        .context("watcher on node3: reading until goaway")?
        .context("watcher on node3: no goaway within 15 s of SIGCONT")?;
    ensure!(f.id == 0, "goaway is a push, got id {}", f.id);
    let (closed, _) = watcher.wait_close(Duration::from_secs(10)).await?;
    ensure!(
        closed.code() == Some(1012),
        "watcher on node3 closed with {closed:?}, expected 1012"
    );
    cluster
        .wait_converged(&[0, 1, 2], Duration::from_secs(20))
        .await?;
    cluster
        .wait_owner(&gid, "node3", Duration::from_secs(10))
        .await?;
    let pauses = cluster.metric(2, "chat_cluster_pauses_total").await?;
    ensure!(pauses >= 1.0, "node3 counted {pauses} pauses");
    let declared = cluster
        .metric(0, "chat_cluster_peers_declared_down_total")
        .await?
        + cluster
            .metric(1, "chat_cluster_peers_declared_down_total")
            .await?;
    ensure!(declared >= 1.0, "no node declared node3 down");
    let at_resume = traffic.acked();
    traffic
        .wait_acks(at_resume + STEP, Duration::from_secs(30), "after SIGCONT")
        .await?;

    let (senders, receivers, acks) = traffic.finish().await?;
    eprintln!("{}", traffic_summary(&senders, &receivers));
    let heads = verify_logs(&cluster, 2, &r1, &groups, &acks, &receivers).await?;
    ensure!(
        heads[0] == 1 + acks.len() as u64,
        "head {} for {} acknowledged messages",
        heads[0],
        acks.len()
    );
    cluster.check_health().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_another_drains_while_clients_send() -> Result<()> {
    const STEP: usize = 100;
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let (s1, s2, s3, r1, r2) = (user("s1"), user("s2"), user("s3"), user("r1"), user("r2"));
    let members = [s2.as_str(), s3.as_str(), r1.as_str(), r2.as_str()];
    let mut admin = cluster.connect(0, &s1).await?;
    // Groups chosen by the placement rule: one moves to node4 when it
    // joins, one leaves node2 when it drains, one stays where it is.
    let four = ["node1", "node2", "node3", "node4"];
    let three_after = ["node1", "node3", "node4"];
    let (mut joins, mut drains, mut stays) = (None, None, None);
    for _ in 0..64 {
        if joins.is_some() && drains.is_some() && stays.is_some() {
            break;
        }
        let gid = admin.create_group("moving", &members).await?;
        let o4 = placement::owner(&gid, &four).context("owner")?;
        let o3 = placement::owner(&gid, &four[..3]).context("owner")?;
        let after = placement::owner(&gid, &three_after).context("owner")?;
        let actual = cluster.owner(0, &gid).await?;
        ensure!(
            actual == o3,
            "tests/src/placement.rs predicts {o3} for {gid}, the server says {actual}: \
             keep the copy in step with actors/src/placement.rs"
        );
        if o4 == "node4" && o3 != "node2" {
            joins.get_or_insert(gid);
        } else if o4 == "node2" {
            drains.get_or_insert(gid);
        } else if o4 == o3 && o4 == after {
            stays.get_or_insert(gid);
        }
    }
    let (Some(joins), Some(drains), Some(stays)) = (joins, drains, stays) else {
        bail!("could not find the three kinds of group in 64 tries");
    };
    drop(admin);
    let groups = vec![joins.clone(), drains.clone(), stays.clone()];
    let endpoints = cluster.endpoints();
    // s2 is connected to node2, the node that will be drained.
    let mut traffic = spread_traffic(&endpoints, &groups, [&s1, &s2, &s3], [&r1, &r2]);
    traffic
        .wait_acks(STEP, Duration::from_secs(30), "before the join")
        .await?;

    // A 4th node joins (seeded with the others) and takes its groups. It
    // probes its peers every second (the others every 250 ms), so for a
    // while the others count it live and send it its groups' requests
    // before it counts them live: deliveries must not depend on that.
    let t_join = Instant::now();
    let n4 = cluster
        .add_node_with(Seeds::Others, |c| {
            if let Some(c) = c.cluster.as_mut() {
                c.ping_interval_ms = 1000;
                c.failure_timeout_ms = 3000;
            }
        })
        .await?;
    ensure!(n4 == 3, "the new node has index {n4}");
    cluster
        .wait_owner(&joins, "node4", Duration::from_secs(10))
        .await?;
    eprintln!("node4 joined and owns {joins} after {:?}", t_join.elapsed());
    let at_join = traffic.acked();
    traffic
        .wait_acks(at_join + STEP, Duration::from_secs(30), "after the join")
        .await?;

    // node2 drains: hands its groups over, sends its clients away, exits 0.
    let t_drain = Instant::now();
    cluster.start_drain(1).await?;
    let status = cluster.wait_exit(1, Duration::from_secs(30)).await?;
    ensure!(status.success(), "drained node2 exited with {status}");
    eprintln!("node2 drained and exited after {:?}", t_drain.elapsed());
    cluster
        .wait_converged(&[0, 2, 3], Duration::from_secs(10))
        .await?;
    let new_owner = placement::owner(&drains, &three_after).context("owner")?;
    cluster
        .wait_owner(&drains, new_owner, Duration::from_secs(10))
        .await?;
    let at_drain = traffic.acked();
    traffic
        .wait_acks(at_drain + STEP, Duration::from_secs(30), "after the drain")
        .await?;

    let (senders, receivers, acks) = traffic.finish().await?;
    eprintln!("{}", traffic_summary(&senders, &receivers));
    let heads = verify_logs(&cluster, 3, &r1, &groups, &acks, &receivers).await?;
    let total: u64 = heads.iter().sum();
    ensure!(
        total == 3 + acks.len() as u64,
        "heads {heads:?} for {} acknowledged messages",
        acks.len()
    );
    // The drained node's clients were sent away (goaway, 1001) and went on
    // elsewhere.
    let node2 = cluster.node(1).addr();
    let r2_end = receivers[1]
        .ends
        .iter()
        .find(|e| e.addr == node2)
        .with_context(|| format!("r2's connection to node2 never ended: {:?}", receivers[1]))?;
    ensure!(
        r2_end.goaway && r2_end.closed.as_ref().and_then(|c| c.code()) == Some(1001),
        "r2 left node2 with {r2_end:?}, expected goaway + close 1001"
    );
    for (what, conns) in [
        ("s2", &senders[1].connections),
        ("r2", &receivers[1].connections),
    ] {
        ensure!(
            conns.first() == Some(&node2)
                && conns.len() >= 2
                && conns[1..].iter().all(|a| *a != node2),
            "{what} did not move from node2 to another node: {conns:?}"
        );
    }
    let s2_after = acks.iter().filter(|a| a.user == s2).count() as u64;
    ensure!(
        s2_after == senders[1].acked && senders[1].acked > 0,
        "s2's acks {s2_after} vs report {:?}",
        senders[1]
    );
    cluster.check_health().await?;
    // Nothing crashed: every online member got every message as a push
    // (guarantee 3: no gaps), whichever node owned the group at the time.
    for r in &receivers {
        ensure!(
            r.gaps == 0,
            "{} (online throughout, or reconnected after the drain) saw gaps in its pushes \
             during a graceful join/drain: {:?} (group that moved to node4: {joins}; \
             group that left node2: {drains}). Messages committed in the gap were never \
             pushed to this member's node.",
            r.user,
            r.gap_list
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cookie_is_refused() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let seeds = cluster.cluster_addrs().to_vec();
    let (_, intruder) = cluster
        .start_extra(3, seeds, |config| {
            if let Some(c) = config.cluster.as_mut() {
                c.cookie = format!("{}-but-wrong", c.cookie);
            }
        })
        .await?;
    let refused = |log: &str| {
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("cluster peer refused"))
    };
    // The refused node logs it...
    wait_until(
        "the intruder logs its refusal",
        Duration::from_secs(10),
        || {
            let log = intruder.log_text();
            async move { Ok(refused(&log)) }
        },
    )
    .await?;
    // ... and so do the refusing nodes, with ractor_cluster's own line.
    wait_until(
        "a cluster node logs the refusal",
        Duration::from_secs(10),
        || {
            let logs: Vec<String> = (0..3).map(|i| cluster.node(i).log_text()).collect();
            async move { Ok(logs.iter().any(|l| refused(l))) }
        },
    )
    .await?;
    let mut all_logs = intruder.log_text();
    for i in 0..3 {
        all_logs.push_str(&cluster.node(i).log_text());
    }
    ensure!(
        all_logs.contains("authentication failure"),
        "no ractor_cluster `authentication failure` line in any log"
    );
    let mut refusals = 0.0;
    for i in 0..3 {
        refusals += cluster.metric(i, "chat_cluster_refused_total").await?;
    }
    ensure!(
        refusals >= 1.0,
        "chat_cluster_refused_total is 0 on every node"
    );
    // Over several redial rounds, no node ever lists the intruder.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < deadline {
        for i in 0..3 {
            let s = cluster.status(i).await?;
            ensure!(
                s.nodes.iter().all(|n| n.name != "node4"),
                "{} lists the intruder: {s:?}",
                cluster.name(i)
            );
            ensure!(
                s.live().len() == 3,
                "{} lost a peer: {s:?}",
                cluster.name(i)
            );
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(rounds >= 3, "only {rounds} status rounds in 3 s");
    let token = format!("Bearer {}", cluster.operator_token());
    let r = tests::http::request(
        intruder.addr(),
        "GET",
        "/admin/status",
        &[("Authorization", &token)],
        b"",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        r.status == 200,
        "intruder's status: {} {}",
        r.status,
        r.body
    );
    let s: tests::cluster::AdminStatus = serde_json::from_str(&r.body)?;
    ensure!(s.live().len() == 1, "the intruder sees peers live: {s:?}");
    // The operator CLI agrees.
    let out = cluster.admin_cli(0, &["status"]).await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "chat-node admin status failed: {text}"
    );
    for name in ["node1", "node2", "node3"] {
        ensure!(text.contains(name), "admin status lacks {name}:\n{text}");
    }
    ensure!(
        !text.contains("node4"),
        "admin status lists the intruder:\n{text}"
    );
    cluster.check_health().await?;
    Ok(())
}

/// Traffic on `groups` spread over the first three nodes: sender i on node
/// i (the second one speaks binary), receiver i on node i.
fn spread_traffic(
    endpoints: &Endpoints,
    groups: &[String],
    senders: [&str; 3],
    receivers: [&str; 2],
) -> Traffic {
    let groups = groups.to_vec();
    Traffic::start(
        endpoints,
        vec![
            SenderSpec::new(senders[0], &groups, 0),
            SenderSpec {
                mode: Mode::Binary,
                ..SenderSpec::new(senders[1], &groups, 1)
            },
            SenderSpec::new(senders[2], &groups, 2),
        ],
        vec![
            ReceiverSpec::new(receivers[0], &groups, 0),
            ReceiverSpec::new(receivers[1], &groups, 1),
        ],
    )
}
