//! End-to-end resilience: a slow reader is cut off (close 4008 or reset)
//! without growing the node's memory while everyone else keeps receiving;
//! no acknowledged message is lost or duplicated across `kill -9` and
//! restart; SIGTERM is a graceful shutdown (goaway, close 1001, exit 0, data
//! kept); `/healthz` and `/metrics` answer; and the harness moves a restart
//! off a port taken meanwhile.
//!
//! Each test starts its own `chat-node` process (see `tests::node`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::check;
use tests::client::{ClientOptions, Closed, reply_kind, send_req};
use tests::user;
use tests::v1::{self, client_frame::Kind as Req, server_frame::Kind};
use tests::{Client, Mode, NodeConfig, NodeProcess};

/// Sends `count` messages of `text_len` bytes as `cl`, `window` in flight.
async fn send_many(
    cl: &mut Client,
    gid: &str,
    tag: &str,
    count: usize,
    text_len: usize,
    window: usize,
) -> Result<Vec<v1::Sent>> {
    let text = "x".repeat(text_len);
    let mut out = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(window) {
        let mut ids = Vec::new();
        for &k in chunk {
            ids.push(
                cl.send_request(Req::Send(send_req(gid, &format!("{tag}-{k}"), &text)))
                    .await?,
            );
        }
        for id in ids {
            match reply_kind(cl.wait_reply(id).await?)? {
                Kind::Sent(s) => out.push(s),
                other => bail!("send: {other:?}"),
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_cut_off_and_others_get_everything() -> Result<()> {
    const PER_SENDER: usize = 1000;
    const TEXT_LEN: usize = 4000;
    const RSS_BOUND_KIB: u64 = 512 * 1024;
    // Sends in flight per sender: bursts (a group commit's pushes plus the
    // sender's replies) stay well under the 64-frame queue, so only a client
    // that does not read is cut off.
    const WINDOW: usize = 8;
    let node = NodeProcess::start(NodeConfig {
        outbound_queue: 64,
        ..NodeConfig::default()
    })
    .await?;
    let (s1, s2, r1, r2, slow) = (user("s1"), user("s2"), user("r1"), user("r2"), user("slow"));
    let mut slow_cl = Client::connect_with(
        &node,
        &slow,
        ClientOptions {
            recv_buffer: Some(4096),
            ..ClientOptions::new(Mode::Json)
        },
    )
    .await?;
    slow_cl.sync().await?;
    let mut recv_clients = vec![
        Client::connect(&node, &r1).await?,
        Client::connect_binary(&node, &r2).await?,
    ];
    for cl in &mut recv_clients {
        cl.sync().await?;
    }
    let mut c1 = Client::connect_binary(&node, &s1).await?;
    let mut c2 = Client::connect(&node, &s2).await?;
    let gid = c1.create_group("firehose", &[&s2, &r1, &r2, &slow]).await?;
    let head = 1 + 2 * PER_SENDER as u64;
    let rss_start = node.rss_kib()?;

    let mut receivers = Vec::new();
    for mut cl in recv_clients {
        let gid = gid.clone();
        receivers.push(tokio::spawn(async move {
            let got = cl
                .collect_messages(&gid, head, Duration::from_secs(150))
                .await?;
            check::dense(&got, 1, head).with_context(|| format!("receiver {}", cl.user()))?;
            anyhow::Ok(())
        }));
    }
    let g1 = gid.clone();
    let t1 =
        tokio::spawn(
            async move { send_many(&mut c1, &g1, "s1", PER_SENDER, TEXT_LEN, WINDOW).await },
        );
    let g2 = gid.clone();
    let t2 =
        tokio::spawn(
            async move { send_many(&mut c2, &g2, "s2", PER_SENDER, TEXT_LEN, WINDOW).await },
        );

    // Watch the node's memory while the flood runs.
    let mut rss_max = rss_start;
    let deadline = Instant::now() + Duration::from_secs(150);
    while !(t1.is_finished() && t2.is_finished()) && Instant::now() < deadline {
        rss_max = rss_max.max(node.rss_kib()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (a1, a2) = (t1.await??, t2.await??);
    ensure!(a1.len() + a2.len() == 2 * PER_SENDER, "acknowledged sends");
    for r in receivers {
        r.await??;
    }
    rss_max = rss_max.max(node.rss_kib()?);
    ensure!(
        rss_max < RSS_BOUND_KIB,
        "node RSS reached {} MiB (started at {} MiB) with a slow reader",
        rss_max / 1024,
        rss_start / 1024
    );

    // The slow reader was cut off: reading now ends in a close (4008) or a
    // reset, after fewer frames than the log holds.
    let (closed, drained) = slow_cl.wait_close(Duration::from_secs(30)).await?;
    match &closed {
        Closed::Frame(4008, _) | Closed::Abrupt(_) => {}
        Closed::Frame(code, reason) => {
            bail!("slow reader closed with {code} {reason:?}, expected 4008")
        }
    }
    ensure!(
        (drained as u64) < head,
        "slow reader drained {drained} frames: it was never cut off"
    );

    // It reconnects and catches up by pull.
    let mut again = Client::connect(&node, &slow).await?;
    let s = again
        .sync_group(&gid)
        .await?
        .context("slow reader's sync")?;
    ensure!(s.head_seq == head, "head after the flood: {s:?}");
    let log = again.history_after(&gid, 0, 100).await?;
    check::dense(&log, 1, head)?;
    eprintln!(
        "slow reader: {closed:?} after {drained} frames; RSS {} -> max {} MiB",
        rss_start / 1024,
        rss_max / 1024
    );
    Ok(())
}

/// One acknowledged message: (sender, clientMsgId, seq, text).
type Ack = (String, String, u64, String);

/// Sends until the connection fails or `max` messages; records every `sent`
/// reply into `acks`. ClientMsgIds are `{tag}-{k}`. With `window > 1` sends
/// are pipelined. Returns the (clientMsgId, text) of the sends still
/// unanswered when the connection died.
async fn send_until_error(
    mut cl: Client,
    gid: String,
    tag: String,
    window: usize,
    max: usize,
    acks: Arc<Mutex<Vec<Ack>>>,
) -> Vec<(String, String)> {
    let me = cl.user().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut k = 0;
    while k < max && Instant::now() < deadline {
        let mut inflight = Vec::new();
        for _ in 0..window {
            let cmid = format!("{tag}-{k}");
            let text = format!("durable {k} from {me} ({tag})");
            k += 1;
            match cl
                .send_request(Req::Send(send_req(&gid, &cmid, &text)))
                .await
            {
                Ok(id) => inflight.push((id, cmid, text)),
                Err(_) => break,
            }
        }
        let mut pending: Vec<(String, String)> = inflight
            .iter()
            .map(|x| (x.1.clone(), x.2.clone()))
            .collect();
        for (id, cmid, text) in inflight {
            match cl.wait_reply(id).await.map(reply_kind) {
                Ok(Ok(Kind::Sent(s))) => {
                    acks.lock()
                        .expect("acks lock")
                        .push((me.clone(), cmid.clone(), s.seq, text));
                    pending.retain(|c| c.0 != cmid);
                }
                Ok(_) | Err(_) => return pending,
            }
        }
        if !pending.is_empty() {
            return pending;
        }
    }
    Vec::new()
}

/// Fails unless every acknowledged message is in `log` at its seq with its
/// sender, clientMsgId and text, and no (sender, clientMsgId) appears twice.
fn verify_acks(log: &[v1::Message], acks: &[Ack]) -> Result<()> {
    let by_seq: HashMap<u64, &v1::Message> = log.iter().map(|m| (m.seq, m)).collect();
    for (sender, cmid, seq, text) in acks {
        let m = by_seq
            .get(seq)
            .with_context(|| format!("acknowledged seq {seq} ({cmid}) lost"))?;
        ensure!(
            &m.sender_id == sender && &m.client_msg_id == cmid && &m.text == text,
            "acknowledged seq {seq} ({sender}/{cmid}) holds {m:?}"
        );
    }
    let mut seen = HashSet::new();
    for m in log.iter().filter(|m| check::system_kind(m).is_none()) {
        ensure!(
            seen.insert((m.sender_id.clone(), m.client_msg_id.clone())),
            "duplicate in the log: {m:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_message() -> Result<()> {
    const ROUNDS: usize = 2;
    const ACKS_PER_ROUND: usize = 500;
    let mut node = NodeProcess::start(NodeConfig {
        sync: "full".to_string(),
        ..NodeConfig::default()
    })
    .await?;
    let users: Vec<String> = (0..4).map(|i| user(&format!("w{i}"))).collect();
    let mut admin = Client::connect(&node, &users[0]).await?;
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let gid = admin.create_group("durable", &others).await?;
    drop(admin);

    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    for round in 0..ROUNDS {
        let target = acks.lock().expect("acks lock").len() + ACKS_PER_ROUND;
        let mut tasks = Vec::new();
        for (i, u) in users.iter().enumerate() {
            // Three sequential senders and one with 16 sends in flight.
            let (mode, window) = if i == 3 {
                (Mode::Binary, 16)
            } else {
                (Mode::Json, 1)
            };
            let cl = Client::connect_mode(&node, u, mode).await?;
            let tag = format!("{u}-r{round}");
            tasks.push(tokio::spawn(send_until_error(
                cl,
                gid.clone(),
                tag,
                window,
                100_000,
                acks.clone(),
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.lock().expect("acks lock").len() < target {
            ensure!(
                Instant::now() < deadline,
                "round {round}: too few acks in 60 s"
            );
            ensure!(
                !tasks.iter().any(|t| t.is_finished()),
                "round {round}: a sender stopped before the crash"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        node.kill9()?; // sends are in flight right now
        let mut unacked: Vec<Vec<(String, String)>> = Vec::new();
        for t in tasks {
            unacked.push(
                tokio::time::timeout(Duration::from_secs(30), t)
                    .await
                    .context("a sender did not notice the crash")??,
            );
        }
        let acked: Vec<Ack> = acks.lock().expect("acks lock").clone();
        eprintln!(
            "round {round}: kill -9 after {} acks; unacked in flight: {:?}",
            acked.len(),
            unacked.iter().map(Vec::len).collect::<Vec<_>>()
        );

        node.restart().await?;
        let mut reader = Client::connect(&node, &users[0]).await?;
        let log = reader.history_all(&gid).await?;
        let head = log.last().map(|m| m.seq).unwrap_or(0);
        check::dense(&log, 1, head).with_context(|| format!("round {round}: log after kill -9"))?;
        verify_acks(&log, &acked).with_context(|| format!("round {round}: after kill -9"))?;

        // Retries after the crash are deduplicated against what was
        // committed: acknowledged sends get their seq back, the ones in
        // flight at the crash land at most once.
        for (i, u) in users.iter().enumerate() {
            let mut cl = Client::connect(&node, u).await?;
            let mine: Vec<&Ack> = acked.iter().filter(|a| &a.0 == u).collect();
            for (sender, cmid, seq, text) in mine.iter().rev().take(3).copied() {
                let s = cl.send(&gid, cmid, text).await?;
                ensure!(
                    s.seq == *seq,
                    "retry of acknowledged {sender}/{cmid} after restart: seq {} != {seq}",
                    s.seq
                );
            }
            for (cmid, text) in &unacked[i] {
                let s = cl.send(&gid, cmid, text).await?;
                acks.lock().expect("acks lock").push((
                    u.clone(),
                    cmid.clone(),
                    s.seq,
                    text.clone(),
                ));
            }
        }
        let s = reader
            .send(&gid, &format!("after-restart-{round}"), "still writing")
            .await?;
        acks.lock().expect("acks lock").push((
            users[0].clone(),
            format!("after-restart-{round}"),
            s.seq,
            "still writing".to_string(),
        ));
        let log = reader.history_all(&gid).await?;
        check::dense(&log, 1, s.seq)
            .with_context(|| format!("round {round}: log after retries"))?;
        verify_acks(&log, &acks.lock().expect("acks lock"))
            .with_context(|| format!("round {round}: after retries"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_a_graceful_shutdown() -> Result<()> {
    let mut node = NodeProcess::start(NodeConfig {
        sync: "full".to_string(),
        ..NodeConfig::default()
    })
    .await?;
    let (a, b, w) = (user("alice"), user("bob"), user("writer"));
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect_binary(&node, &b).await?;
    cb.sync().await?;
    let gid = ca.create_group("bye", &[&b, &w]).await?;
    for i in 0..5 {
        ca.send(&gid, &format!("a-{i}"), &format!("msg {i}"))
            .await?;
    }
    cb.collect_messages(&gid, 6, Duration::from_secs(10))
        .await?;
    // Read pointers are flushed by a graceful shutdown.
    cb.mark_read(&gid, 4).await?;
    cb.mark_delivered(&gid, 6).await?;
    // A writer keeps sending while the node shuts down.
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let writer = Client::connect(&node, &w).await?;
    let wt = tokio::spawn(send_until_error(
        writer,
        gid.clone(),
        format!("{w}-w"),
        1,
        100_000,
        acks.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;

    node.sigterm()?;
    for cl in [&mut ca, &mut cb] {
        let f = cl
            .next_frame_matching(Duration::from_secs(15), |f| {
                matches!(f.kind, Some(Kind::Goaway(_)))
            })
            .await
            .with_context(|| format!("{}: reading until goaway", cl.user()))?
            .with_context(|| format!("{}: no goaway push within 15 s of SIGTERM", cl.user()))?;
        ensure!(f.id == 0, "goaway is a push, got id {}", f.id);
        let (closed, _) = cl.wait_close(Duration::from_secs(15)).await?;
        ensure!(
            closed.code() == Some(1001),
            "{}: close after goaway: {closed:?}, expected 1001",
            cl.user()
        );
    }
    let status = node.wait_exit(Duration::from_secs(20)).await?;
    ensure!(
        status.success(),
        "node exited with {status} after SIGTERM, expected 0"
    );
    tokio::time::timeout(Duration::from_secs(30), wt)
        .await
        .context("writer did not stop")??;
    let acks: Vec<Ack> = acks.lock().expect("acks lock").clone();

    node.restart().await?;
    let mut ca = Client::connect(&node, &a).await?;
    let log = ca.history_all(&gid).await?;
    let head = log.last().map(|m| m.seq).unwrap_or(0);
    check::dense(&log, 1, head)?;
    ensure!(
        head >= 6 + acks.len() as u64,
        "head {head} after {} acknowledged writer sends",
        acks.len()
    );
    for (sender, cmid, seq, text) in &acks {
        let m = &log[(*seq - 1) as usize];
        ensure!(
            &m.sender_id == sender && &m.client_msg_id == cmid && &m.text == text,
            "seq {seq}: {m:?}"
        );
    }
    let mut cb = Client::connect(&node, &b).await?;
    let sb = cb
        .sync_group(&gid)
        .await?
        .context("bob's sync after restart")?;
    ensure!(
        sb.read_seq == 4 && sb.delivered_seq >= 6 && sb.head_seq == head,
        "bob's pointers after a graceful restart: {sb:?} (read 4, delivered 6 before SIGTERM)"
    );
    let s = ca.send(&gid, "after", "back again").await?;
    ensure!(
        s.seq == head + 1,
        "first seq after restart {} (head was {head})",
        s.seq
    );
    eprintln!("graceful shutdown: writer had {} acks", acks.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_answer() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let r = node.http_get("/healthz").await?;
    ensure!(
        r.status == 200 && r.body.trim() == "ok",
        "/healthz: {} {:?}",
        r.status,
        r.body
    );
    // Some traffic, so request and message metrics exist.
    let a = user("alice");
    let mut cl = Client::connect(&node, &a).await?;
    let gid = cl.create_group("metrics", &[]).await?;
    cl.send(&gid, "m-1", "count me").await?;
    cl.history(&gid, None, None, 10).await?;
    let r = node.http_get("/metrics").await?;
    ensure!(r.status == 200, "/metrics status {}", r.status);
    let content_type = r
        .headers
        .iter()
        .find(|h| h.to_ascii_lowercase().starts_with("content-type:"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        content_type.contains("text/plain"),
        "/metrics content type {content_type:?}"
    );
    let samples: Vec<&str> = r.body.lines().filter(|l| l.starts_with("chat_")).collect();
    ensure!(
        !samples.is_empty(),
        "/metrics has no chat_ sample:\n{}",
        r.body
    );
    for l in &samples {
        let value = l.rsplit(' ').next().unwrap_or("");
        ensure!(
            value.parse::<f64>().is_ok(),
            "metric line without a number: {l:?}"
        );
    }
    let r = node.http_get("/healthz").await?;
    ensure!(r.status == 200, "/healthz after traffic: {}", r.status);
    Ok(())
}

/// The harness's own promise that the tests above lean on: a restart whose
/// port another process took meanwhile moves to a fresh port, even when the
/// node's error report carries a backtrace longer than any log tail (CI sets
/// `RUST_BACKTRACE`; a cluster test once failed on a collision that the tail
/// no longer showed). Data and the log survive the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_taken_port_moves_to_a_fresh_one() -> Result<()> {
    let mut node = NodeProcess::start_default().await?;
    let old = node.addr();
    let porter = user("porter");
    let mut cl = Client::connect(&node, &porter).await?;
    let gid = cl.create_group("ports", &[]).await?;
    let sent = send_many(&mut cl, &gid, "before", 3, 10, 3).await?;
    drop(cl);
    node.sigterm()?;
    node.wait_exit(Duration::from_secs(10)).await?;
    // Hold the old port while the node restarts on it.
    let squatter = std::net::TcpListener::bind(old).context("take the node's port")?;
    node.restart().await?;
    ensure!(node.addr() != old, "restarted on the taken port {old}");
    ensure!(
        node.log_text().contains("in use"),
        "the first restart attempt did not report the taken port"
    );
    drop(squatter);
    let mut cl = Client::connect(&node, &porter).await?;
    let log = cl.history_all(&gid).await?;
    let texts = log
        .iter()
        .filter(|m| check::system_kind(m).is_none())
        .count();
    ensure!(
        texts == sent.len(),
        "history after the move has {texts} messages, expected {}",
        sent.len()
    );
    Ok(())
}
