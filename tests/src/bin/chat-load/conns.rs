//! Scenario 1: N idle authenticated sessions.
//!
//! One process holds at most ~19.9k sockets (hard `RLIMIT_NOFILE` 20,000),
//! so the parent spreads the connections over `procs` child processes
//! (`chat-load connect-child`, the same binary). The parent reads the node's
//! VmRSS before any connection and once every child reports its count,
//! then holds the connections for a while and ends the children by closing
//! their stdin (a child also gives up on its own after `hold_secs + 120`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::net::{Target, connect_many};
use crate::report::{ResultFile, Row, pct, rate, thousands, verdict_at_most};
use crate::stats::{
    CLK_TCK, MachineMeter, NodesCpu, Recorder, cpu_ticks, http_get, metric, rss_kib, rss_sum_kib,
};

/// `chat_connections` of every node of the target (`None` where the scrape
/// failed).
fn node_connections(target: &Target) -> Vec<Option<f64>> {
    target
        .addrs
        .iter()
        .map(|&a| {
            http_get(a, "/metrics")
                .ok()
                .and_then(|m| metric(&m, "chat_connections"))
        })
        .collect()
}

/// What a child reports once connected.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildReport {
    /// Connections open.
    pub connected: usize,
    /// Connections that failed.
    pub failed: usize,
    /// Seconds from the first connect to the last.
    pub secs: f64,
    /// The first failure.
    pub first_error: Option<String>,
    /// The child's RSS, KiB.
    pub rss_kib: Option<u64>,
    /// The child's CPU ticks so far.
    pub cpu_ticks: Option<u64>,
}

/// `connect-child`: opens `count` connections for users
/// `prefix<start>..`, prints one JSON [`ChildReport`] line, then holds them
/// until stdin closes (or `hold_secs + 120` s pass).
pub async fn child(
    target: &Target,
    prefix: &str,
    start: usize,
    count: usize,
    parallel: usize,
    hold_secs: u64,
) -> Result<()> {
    let rec = Arc::new(Recorder::new());
    let t0 = Instant::now();
    let (conns, failed, first_error) =
        connect_many(target, prefix, start..start + count, parallel, rec).await;
    let report = ChildReport {
        connected: conns.len(),
        failed,
        secs: t0.elapsed().as_secs_f64(),
        first_error,
        rss_kib: rss_kib(None),
        cpu_ticks: cpu_ticks(None),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    out.flush()?;
    drop(out);
    // Hold until the parent closes our stdin.
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let mut stdin = std::io::stdin().lock();
        while stdin.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            line.clear();
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(hold_secs + 120), stdin_closed).await;
    drop(conns);
    Ok(())
}

/// Scenario parameters.
pub struct Params {
    /// Total connections.
    pub count: usize,
    /// Child processes to spread them over.
    pub procs: usize,
    /// How long to hold them after all are open.
    pub hold_secs: u64,
    /// User id prefix.
    pub prefix: String,
}

/// Runs scenario 1; `args` are the global arguments to pass to children.
pub fn run(
    target: &Target,
    node_pids: &[u32],
    p: &Params,
    child_args: &[String],
) -> Result<ResultFile> {
    let procs = p.procs.max(1);
    let rss_before = rss_sum_kib(node_pids);
    let node_cpu = NodesCpu::start(node_pids);
    let machine = MachineMeter::start();
    let t0 = Instant::now();
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..procs {
        let start = p.count * i / procs;
        let end = p.count * (i + 1) / procs;
        let mut cmd = Command::new(&exe);
        cmd.args(child_args)
            .arg("connect-child")
            .args(["--prefix", &p.prefix])
            .args(["--start", &start.to_string()])
            .args(["--count", &(end - start).to_string()])
            .args(["--hold-secs", &p.hold_secs.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        children.push(cmd.spawn().context("spawning a connect child")?);
    }
    // Each child prints one line once connected (bounded by its own
    // 30 s per-connection timeout; the wait here is bounded by that).
    let mut reports = Vec::new();
    for c in &mut children {
        let out = c.stdout.take().ok_or_else(|| anyhow!("no child stdout"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let r: ChildReport =
            serde_json::from_str(line.trim()).with_context(|| format!("child report {line:?}"))?;
        reports.push(r);
    }
    let all_open = t0.elapsed().as_secs_f64();
    // Let the node settle (session actors, relay registration), then measure.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_sum_kib(node_pids);
    let each_rss: Vec<Option<u64>> = node_pids.iter().map(|&p| rss_kib(Some(p))).collect();
    let each_conns = node_connections(target);
    let node_conns = each_conns.iter().copied().sum::<Option<f64>>();
    let node_cpu_pct = node_cpu.percent();
    let machine = machine.usage();
    let connected: usize = reports.iter().map(|r| r.connected).sum();
    let failed: usize = reports.iter().map(|r| r.failed).sum();
    let connect_secs = reports.iter().map(|r| r.secs).fold(0.0, f64::max);
    let gen_ticks: u64 = reports.iter().filter_map(|r| r.cpu_ticks).sum();
    let gen_cpu = (gen_ticks as f64 / CLK_TCK) / connect_secs.max(1e-3) * 100.0;
    let gen_rss: u64 = reports.iter().filter_map(|r| r.rss_kib).sum();
    let per_conn = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some((a.saturating_sub(b)) as f64 * 1024.0 / connected as f64 / 1000.0)
        }
        _ => None,
    };
    let per_conn_kb = per_conn(rss_after);
    let gen_per_conn_kb = gen_rss as f64 * 1024.0 / connected.max(1) as f64 / 1000.0;
    std::thread::sleep(Duration::from_secs(p.hold_secs));
    // Still all there after the hold, and how much memory once settled?
    let rss_after_hold = rss_sum_kib(node_pids);
    let per_conn_hold_kb = per_conn(rss_after_hold);
    // The verdict takes the larger: what holding N connections costs.
    let worst_kb = match (per_conn_kb, per_conn_hold_kb) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let each_conns_after_hold = node_connections(target);
    let node_conns_after_hold = each_conns_after_hold.iter().copied().sum::<Option<f64>>();
    for mut c in children {
        drop(c.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let rate_v = connected as f64 / connect_secs.max(1e-3);
    let mut result = format!(
        "{} open ({} failed) at {}; node +{} per conn once open, +{} after the hold",
        thousands(connected as u64),
        failed,
        rate(rate_v).replace("/s", " conn/s"),
        per_conn_kb.map_or("?".into(), |k| format!("{k:.1} KB")),
        per_conn_hold_kb.map_or("?".into(), |k| format!("{k:.1} KB"))
    );
    if let Some(n) = node_conns {
        result.push_str(&format!("; node reports {n:.0} conns"));
    }
    let row = Row {
        scenario: target.scenario("1. idle connections"),
        params: format!(
            "N={} over {procs} load-gen proc(s), {} source addrs, hold {} s{}",
            thousands(p.count as u64),
            target.sources.len(),
            p.hold_secs,
            target.spread()
        ),
        result,
        latency_ms: "-".into(),
        node_cpu: pct(node_cpu_pct),
        loadgen_cpu: format!("{gen_cpu:.0}% (connect phase)"),
        machine_steal: machine.map(|m| m.steal_percent),
        target: "≤ 10 KB node RSS/conn".into(),
        verdict: match worst_kb {
            Some(k) if failed == 0 => verdict_at_most(k, 10.0),
            Some(k) => format!("{} ({failed} connections failed)", verdict_at_most(k, 10.0)),
            None => "- (no node pid)".into(),
        },
    };
    Ok(ResultFile {
        rows: vec![row],
        details: json!({
            "scenario": "connections",
            "count": p.count,
            "procs": procs,
            "connected": connected,
            "failed": failed,
            "first_errors": reports.iter().filter_map(|r| r.first_error.clone()).collect::<Vec<_>>(),
            "connect_secs": connect_secs,
            "all_open_secs": all_open,
            "connect_rate_per_sec": rate_v,
            "node_rss_before_kib": rss_before,
            "node_rss_after_kib": rss_after,
            "node_bytes_per_conn": per_conn_kb.map(|k| k * 1000.0),
            "node_rss_after_hold_kib": rss_after_hold,
            "node_bytes_per_conn_after_hold": per_conn_hold_kb.map(|k| k * 1000.0),
            "nodes": target.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "node_rss_after_kib_each": each_rss,
            "node_connections_each": each_conns,
            "node_connections_after_hold_each": each_conns_after_hold,
            "node_connections_metric": node_conns,
            "node_connections_after_hold": node_conns_after_hold,
            "node_cpu_percent": node_cpu_pct,
            "machine": machine,
            "loadgen_rss_kib": gen_rss,
            "loadgen_bytes_per_conn": gen_per_conn_kb * 1000.0,
            "loadgen_cpu_percent_connect": gen_cpu,
        }),
    })
}
