//! Scenario 4: acknowledged (committed) messages per second.
//!
//! `senders` connections keep `window` sends each in flight (closed loop: a
//! new send for every `sent` reply) for `secs`, into one group or spread
//! round-robin over `groups` groups. `sent` is the server's word that the
//! message is committed (with `storage.sync = "full"`: fsynced). The node's
//! `/metrics` before and after give the commit batch sizes
//! (`chat_commit_batch_messages`), a cross-check of the count
//! (`chat_messages_committed_total`), and in the JSON the commit stage's
//! transactions: groups in each, time, and the part of it spent waiting
//! for the storage writer (`chat_commit_wait_seconds`).
//!
//! Each group has one offline member besides its creator, and senders are
//! their groups' only online members, so fan-out costs one push per message.
//! In the single-group case all senders are members of the one group, so
//! each message is pushed to every sender.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use proto::v1::{self, client_frame::Kind as Req, server_frame::Kind as Rep};
use serde_json::json;
use tokio::time::Instant;

use crate::net::{Conn, Target, connect_many};
use crate::plan::user_id;
use crate::report::{ResultFile, Row, pct, rate, thousands, verdict_at_least};
use crate::stats::{
    CpuMeter, MAX_LATENCY_US, MachineMeter, NodesCpu, Recorder, Summary, delta_between, http_get,
    mean_between, now_nanos, summary_quantiles, tag,
};

/// Parameters.
pub struct Params {
    /// Groups to spread over (1: all into one group).
    pub groups: usize,
    /// Sending connections.
    pub senders: usize,
    /// Sends in flight per connection.
    pub window: usize,
    /// Seconds of sending.
    pub secs: f64,
    /// Message text length.
    pub text_len: usize,
    /// Label of the storage mode (for the table), e.g. `sync=full`.
    pub label: String,
    /// Concurrent handshakes.
    pub parallel: usize,
    /// Target acknowledged messages/s.
    pub target: f64,
    /// User id prefix.
    pub prefix: String,
}

struct Out {
    conn: Conn,
    acked_in_window: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    hist: Histogram<u64>,
    unanswered: u64,
}

async fn sender(
    mut conn: Conn,
    groups: Vec<String>,
    window: usize,
    end: Instant,
    text_len: usize,
) -> Result<Out> {
    let mut hist = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let mut in_flight: HashMap<u64, Instant> = HashMap::with_capacity(window * 2);
    let mut acked_in_window = 0;
    let mut acked = 0;
    let mut errors = BTreeMap::new();
    let mut n = 0u64;
    let grace = end + Duration::from_secs(15);
    loop {
        let now = Instant::now();
        let sending = now < end;
        if sending && in_flight.len() < window {
            while in_flight.len() < window {
                let g = &groups[n as usize % groups.len()];
                n += 1;
                let id = conn
                    .feed(Req::Send(v1::Send {
                        group_id: g.clone(),
                        client_msg_id: format!("d{n}"),
                        text: tag(0, now_nanos(), text_len),
                        ..Default::default()
                    }))
                    .await?;
                in_flight.insert(id, Instant::now());
            }
            conn.flush().await?;
        }
        if in_flight.is_empty() && !sending {
            break;
        }
        let until = if sending { end } else { grace };
        let frame = match tokio::time::timeout_at(until, conn.replies.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => bail!("{}: connection closed", conn.user),
            Err(_) if sending => continue,
            Err(_) => break, // grace over: count the rest as unanswered
        };
        // This reply and every one already here (up to a window's worth)
        // are counted before the window is refilled: one flush for all
        // their successors, not one each (the node then reads them in
        // fewer, larger segments too).
        let mut next = Some(frame);
        let mut taken = 0;
        while let Some(frame) = next.take() {
            taken += 1;
            if taken < window {
                next = conn.replies.try_recv().ok();
            }
            let Some(t) = in_flight.remove(&frame.id) else {
                continue;
            };
            match frame.kind {
                Some(Rep::Sent(_)) => {
                    acked += 1;
                    let at = Instant::now();
                    if at <= end {
                        acked_in_window += 1;
                    }
                    hist.saturating_record(((at - t).as_micros() as u64).max(1));
                }
                Some(Rep::Error(e)) => *errors.entry(format!("{:?}", e.code())).or_default() += 1,
                _ => *errors.entry("unexpected reply".to_string()).or_default() += 1,
            }
        }
    }
    Ok(Out {
        conn,
        acked_in_window,
        acked,
        errors,
        hist,
        unanswered: in_flight.len() as u64,
    })
}

/// Runs scenario 4.
pub async fn run(target: &Target, node_pids: &[u32], p: &Params) -> Result<ResultFile> {
    let rec = Arc::new(Recorder::new());
    let (mut conns, failed, err) =
        connect_many(target, &p.prefix, 0..p.senders, p.parallel, rec.clone()).await;
    if failed > 0 {
        bail!("{failed} connections failed: {err:?}");
    }
    // Groups: one shared by every sender, or `groups` spread over senders.
    let t1 = std::time::Instant::now();
    let mut per_sender: Vec<Vec<String>> = vec![Vec::new(); conns.len()];
    if p.groups <= 1 {
        let others: Vec<String> = conns.iter().skip(1).map(|c| c.user.clone()).collect();
        let gid = match conns[0]
            .request(
                Req::CreateGroup(v1::CreateGroup {
                    name: "durable-1".into(),
                    members: others,
                }),
                Duration::from_secs(60),
            )
            .await?
        {
            Rep::GroupCreated(g) => g.group_id,
            other => bail!("createGroup: unexpected {other:?}"),
        };
        for v in &mut per_sender {
            v.push(gid.clone());
        }
    } else {
        let handles: Vec<_> = conns
            .drain(..)
            .enumerate()
            .map(|(si, mut c)| {
                let n_senders = p.senders;
                let n_groups = p.groups;
                let prefix = p.prefix.clone();
                tokio::spawn(async move {
                    let mut gids = Vec::new();
                    for g in (si..n_groups).step_by(n_senders) {
                        let r = c
                            .request(
                                Req::CreateGroup(v1::CreateGroup {
                                    name: format!("durable-{g}"),
                                    members: vec![user_id(&format!("{prefix}x"), g)],
                                }),
                                Duration::from_secs(60),
                            )
                            .await?;
                        match r {
                            Rep::GroupCreated(x) => gids.push(x.group_id),
                            other => bail!("createGroup: unexpected {other:?}"),
                        }
                    }
                    Ok((c, gids))
                })
            })
            .collect();
        for (si, h) in handles.into_iter().enumerate() {
            let (c, gids) = h.await.context("setup task")??;
            conns.push(c);
            per_sender[si] = gids;
        }
    }
    let setup_secs = t1.elapsed().as_secs_f64();
    let n_groups: usize = if p.groups <= 1 { 1 } else { p.groups };
    eprintln!("durable: {n_groups} group(s) ready in {setup_secs:.1}s");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before = http_get(target.addr(), "/metrics").context("scraping /metrics")?;
    let node_cpu = NodesCpu::start(node_pids);
    let self_cpu = CpuMeter::start(None);
    let machine = MachineMeter::start();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(p.secs);
    let handles: Vec<_> = conns
        .into_iter()
        .zip(per_sender)
        .map(|(c, g)| tokio::spawn(sender(c, g, p.window, end, p.text_len)))
        .collect();
    let mut outs = Vec::new();
    for h in handles {
        outs.push(h.await.context("sender task")??);
    }
    let node_cpu = node_cpu.percent();
    let self_cpu = self_cpu.percent();
    let machine = machine.usage();
    let after = http_get(target.addr(), "/metrics").context("scraping /metrics")?;
    let acked_in_window: u64 = outs.iter().map(|o| o.acked_in_window).sum();
    let acked: u64 = outs.iter().map(|o| o.acked).sum();
    let unanswered: u64 = outs.iter().map(|o| o.unanswered).sum();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    for o in &outs {
        for (k, v) in &o.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        hist.add(&o.hist)?;
    }
    let ack = Summary::of(&hist);
    let msgs_per_sec = acked_in_window as f64 / p.secs;
    let d = |name| delta_between(&before, &after, name);
    let committed = d("chat_messages_committed_total");
    let batch_count = d("chat_commit_batch_messages_count");
    let mean = |name| mean_between(&before, &after, name);
    let mean_batch = mean("chat_commit_batch_messages");
    // What one commit-stage transaction held and took, and how much of
    // that it waited for the storage writer before it began.
    let mean_txn_groups = mean("chat_commit_groups_per_txn");
    let mean_txn_ms = mean("chat_commit_txn_seconds").map(|s| s * 1e3);
    let mean_wait_ms = mean("chat_commit_wait_seconds").map(|s| s * 1e3);
    let quantiles = summary_quantiles(&after, "chat_commit_batch_messages");
    let q = |name: &str| {
        quantiles
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| format!("{v:.0}"))
            .unwrap_or("?".into())
    };
    for o in outs {
        o.conn.close().await;
    }
    let row = Row {
        scenario: "4. durable append".into(),
        params: format!(
            "{}, {} group(s), {} senders × {} in flight, {} s",
            p.label,
            thousands(n_groups as u64),
            p.senders,
            p.window,
            p.secs
        ),
        result: format!(
            "{} acked; commits of {} msgs mean (p50 {}, p99 {}, max {})",
            rate(msgs_per_sec),
            mean_batch.map_or("?".into(), |m| format!("{m:.1}")),
            q("0.5"),
            q("0.99"),
            q("1")
        ),
        latency_ms: format!("ack: {}", ack.ms_cell()),
        node_cpu: pct(node_cpu),
        loadgen_cpu: pct(self_cpu),
        machine_steal: machine.map(|m| m.steal_percent),
        target: if p.target > 0.0 {
            format!("≥ {} acked", rate(p.target))
        } else {
            "-".into()
        },
        verdict: if p.target > 0.0 {
            verdict_at_least(msgs_per_sec, p.target)
        } else {
            "-".into()
        },
    };
    Ok(ResultFile {
        rows: vec![row],
        details: json!({
            "scenario": "durable",
            "label": p.label,
            "groups": n_groups,
            "senders": p.senders,
            "window": p.window,
            "secs": p.secs,
            "group_setup_secs": setup_secs,
            "acked_in_window": acked_in_window,
            "acked_total": acked,
            "unanswered": unanswered,
            "errors": errors,
            "acked_per_sec": msgs_per_sec,
            "ack_latency": ack,
            "push_latency": Summary::of(&rec.merged(0)),
            "committed_delta": committed,
            "commit_batches_delta": batch_count,
            "mean_commit_batch": mean_batch,
            "commit_txns_delta": d("chat_commit_txn_seconds_count"),
            "mean_groups_per_txn": mean_txn_groups,
            "mean_commit_txn_ms": mean_txn_ms,
            "mean_commit_wait_ms": mean_wait_ms,
            "commit_batch_quantiles_since_start": quantiles,
            "node_cpu_percent": node_cpu,
            "loadgen_cpu_percent": self_cpu,
            "machine": machine,
            "closes": rec.closes(),
        }),
    })
}
