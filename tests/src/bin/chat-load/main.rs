//! `chat-load`: load generator and benchmark scenarios for `chat-node`.
//!
//! Speaks the real client protocol (protobuf `ClientFrame`/`ServerFrame` in
//! binary WebSocket frames, `?encoding=binary`) over real sockets, minting
//! each user's HS256 token from the node's config file. Only 127.0.0.0/8
//! targets are accepted; connections are spread over 127.0.0.2.. source
//! addresses and, given several `--addr` (a cluster), round-robin over the
//! nodes (connection i to node i mod n). Every scenario is bounded in count and time, prints its table
//! rows and writes them (plus details) as JSON (`--json`).
//!
//! Scenarios (see `docs/benchmarks.md`):
//! - `connections`: N idle authenticated sessions; connect rate, node RSS
//!   per connection (children processes when N exceeds one process' fds).
//! - `fanout`: one group of M online members, stepped send rates;
//!   deliveries/s and send-to-receive latency.
//! - `groups`: many users in groups of 5–50, all sending at a steady rate;
//!   latency per rate step and the highest rate with p99 under a bound.
//! - `durable`: acknowledged messages/s into one group or many.
//! - `report`: one table from several JSON result files.
//!
//! Layout: [`net`] (connections), [`stats`] (histograms, /proc, /metrics),
//! [`plan`] (group sizes, assignment), [`pace`] (rate pacing), [`report`]
//! (rows, table), and one module per scenario family.

mod conns;
mod durable;
mod load;
mod net;
mod pace;
mod plan;
mod report;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Most connections one load-generator process opens (hard fd limit 20,000).
const MAX_CONNS_PER_PROC: usize = 19_500;
/// Longest step / run, seconds.
const MAX_SECS: f64 = 600.0;

#[derive(Parser)]
#[command(
    name = "chat-load",
    about = "Load generator and benchmarks for chat-node"
)]
struct Cli {
    /// The node's listener (must be in 127.0.0.0/8). Several (repeated or
    /// comma-separated: the nodes of a cluster) spread the connections
    /// round-robin over the nodes: connection i goes to node i mod n, so the
    /// members of a group and the senders land on different nodes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:8080",
        global = true
    )]
    addr: Vec<SocketAddr>,
    /// The node's config file (for `[auth] jwt_secret`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The node's pid (for its CPU and RSS); several (repeated or
    /// comma-separated) for a cluster: CPU and RSS are summed.
    #[arg(long, value_delimiter = ',', global = true)]
    node_pid: Vec<u32>,
    /// Source addresses 127.0.0.2..=127.0.0.(1+N) to spread connections over.
    #[arg(long, default_value_t = 8, global = true)]
    sources: usize,
    /// Concurrent connection handshakes.
    #[arg(long, default_value_t = 256, global = true)]
    parallel: usize,
    /// Write the result rows and details here as JSON.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Scenario 1: N idle authenticated sessions.
    Connections {
        /// Total connections.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Load-generator processes to spread them over.
        #[arg(long, default_value_t = 1)]
        procs: usize,
        /// Seconds to hold them once open.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
        /// User id prefix.
        #[arg(long, default_value = "c")]
        prefix: String,
    },
    /// (internal) one child process of `connections`.
    #[command(hide = true)]
    ConnectChild {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        start: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        hold_secs: u64,
    },
    /// Scenario 2: one group of M online members, stepped send rates.
    Fanout {
        /// Members (all online).
        #[arg(long, default_value_t = 1_000)]
        members: usize,
        /// Sending members.
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Offered total message rates, one step each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "50,100,200,400")]
        rates: Vec<f64>,
        /// Seconds per step.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// Most seconds to wait for late deliveries after a step.
        #[arg(long, default_value_t = 5.0)]
        drain_secs: f64,
        /// Message text bytes.
        #[arg(long, default_value_t = 64)]
        text_len: usize,
        /// Target p99, ms (for the verdict and the best step).
        #[arg(long, default_value_t = 20.0)]
        p99_ms: f64,
        /// Target deliveries/s (0: none).
        #[arg(long, default_value_t = 0.0)]
        target_deliveries: f64,
        /// Stop stepping once a step's p99 exceeds this, ms.
        #[arg(long, default_value_t = 1_000.0)]
        stop_p99_ms: f64,
        /// Users per createGroup/addMembers request.
        #[arg(long, default_value_t = 1_000)]
        per_request: usize,
        /// User id prefix.
        #[arg(long, default_value = "f")]
        prefix: String,
    },
    /// Scenario 3: users in groups of min..=max, all sending steadily.
    Groups {
        /// Users (all online, all sending).
        #[arg(long, default_value_t = 18_000)]
        users: usize,
        #[arg(long, default_value_t = 5)]
        min: usize,
        #[arg(long, default_value_t = 50)]
        max: usize,
        /// Offered total message rates, one step each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,8000")]
        rates: Vec<f64>,
        /// Seconds per step.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// Most seconds to wait for late deliveries after a step.
        #[arg(long, default_value_t = 5.0)]
        drain_secs: f64,
        /// Driver tasks.
        #[arg(long, default_value_t = 4)]
        drivers: usize,
        /// Message text bytes.
        #[arg(long, default_value_t = 64)]
        text_len: usize,
        /// The p99 bound of "highest rate", ms.
        #[arg(long, default_value_t = 50.0)]
        p99_ms: f64,
        /// Stop stepping once a step's p99 exceeds this, ms.
        #[arg(long, default_value_t = 1_000.0)]
        stop_p99_ms: f64,
        /// Seed of the group plan.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// User id prefix.
        #[arg(long, default_value = "g")]
        prefix: String,
    },
    /// Scenario 4: acknowledged (committed) messages per second.
    Durable {
        /// Groups (1: everything into one group).
        #[arg(long, default_value_t = 1)]
        groups: usize,
        /// Sending connections.
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Sends in flight per connection.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Message text bytes.
        #[arg(long, default_value_t = 200)]
        text_len: usize,
        /// Storage label for the table, e.g. `sync=full`.
        #[arg(long, default_value = "sync=full")]
        label: String,
        /// Target acked messages/s (0: none).
        #[arg(long, default_value_t = 100_000.0)]
        target: f64,
        /// User id prefix.
        #[arg(long, default_value = "d")]
        prefix: String,
    },
    /// Prints one table from result files (and an optional TODO row).
    Report {
        /// JSON result files, in table order.
        files: Vec<PathBuf>,
        /// Extra rows `scenario|params|note` marked TODO.
        #[arg(long)]
        todo: Vec<String>,
    },
}

fn check_secs(name: &str, v: f64) -> Result<()> {
    if !(v > 0.0 && v <= MAX_SECS) {
        bail!("{name} must be in (0, {MAX_SECS}] seconds");
    }
    Ok(())
}

fn check_conns(n: usize) -> Result<()> {
    if n == 0 || n > MAX_CONNS_PER_PROC {
        bail!(
            "1..={MAX_CONNS_PER_PROC} connections per process (hard open-file limit 20,000); \
             use `connections --procs` to go beyond"
        );
    }
    Ok(())
}

fn target(cli: &Cli) -> Result<net::Target> {
    let config = cli
        .config
        .as_ref()
        .context("--config (the node's config file) is required")?;
    net::Target::new(&cli.addr, net::secret_from_config(config)?, cli.sources)
}

/// The global arguments to hand down to child processes.
fn child_args(cli: &Cli) -> Vec<String> {
    let mut v = vec![
        "--addr".to_string(),
        cli.addr
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "--sources".into(),
        cli.sources.to_string(),
        "--parallel".into(),
        cli.parallel.to_string(),
    ];
    if let Some(c) = &cli.config {
        v.push("--config".into());
        v.push(c.display().to_string());
    }
    if let Some(t) = cli.threads {
        v.push("--threads".into());
        v.push(t.to_string());
    }
    v
}

/// Prints the table and writes the JSON. A run with `--threads` says so in
/// every row's parameters and in the details (`loadgen_threads`), since
/// the load generator's share of the cores moves the latencies
/// (docs/benchmarks.md, round 18).
fn emit(cli: &Cli, mut file: report::ResultFile) -> Result<()> {
    if let Some(t) = cli.threads {
        for row in &mut file.rows {
            row.params
                .push_str(&format!("; load generator {t} threads"));
        }
        if let Some(details) = file.details.as_object_mut() {
            details.insert("loadgen_threads".into(), t.into());
        }
    }
    println!("{}", report::table(&file.rows));
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&file)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::Report { files, todo } = &cli.cmd {
        let mut rows = Vec::new();
        for f in files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let r: report::ResultFile =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))?;
            rows.extend(r.rows);
        }
        for t in todo {
            let mut parts = t.splitn(3, '|');
            rows.push(report::Row {
                scenario: parts.next().unwrap_or("").into(),
                params: parts.next().unwrap_or("").into(),
                result: parts.next().unwrap_or("").into(),
                latency_ms: "-".into(),
                node_cpu: "-".into(),
                loadgen_cpu: "-".into(),
                target: "-".into(),
                verdict: "TODO".into(),
                machine_steal: None,
            });
        }
        print!("{}", report::table(&rows));
        return Ok(());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = rt.build()?;
    let target = target(&cli)?;
    match &cli.cmd {
        Cmd::Connections {
            count,
            procs,
            hold_secs,
            prefix,
        } => {
            check_secs("--hold-secs", *hold_secs as f64)?;
            let procs = (*procs).max(1);
            check_conns(count.div_ceil(procs))?;
            let p = conns::Params {
                count: *count,
                procs,
                hold_secs: *hold_secs,
                prefix: prefix.clone(),
            };
            let file = conns::run(&target, &cli.node_pid, &p, &child_args(&cli))?;
            emit(&cli, file)
        }
        Cmd::ConnectChild {
            prefix,
            start,
            count,
            hold_secs,
        } => {
            check_conns(*count)?;
            rt.block_on(conns::child(
                &target,
                prefix,
                *start,
                *count,
                cli.parallel,
                *hold_secs,
            ))
        }
        Cmd::Fanout {
            members,
            senders,
            rates,
            step_secs,
            drain_secs,
            text_len,
            p99_ms,
            target_deliveries,
            stop_p99_ms,
            per_request,
            prefix,
        } => {
            check_conns(*members)?;
            check_secs("--step-secs", *step_secs)?;
            check_secs("--drain-secs", *drain_secs)?;
            if *members < 2 || *senders == 0 || *per_request == 0 {
                bail!("need at least 2 members, 1 sender and 1 user per request");
            }
            let steps = load::Steps {
                rates: rates.clone(),
                step_secs: *step_secs,
                drain_secs: *drain_secs,
                text_len: *text_len,
                stop_p99_ms: *stop_p99_ms,
            };
            let p = load::FanoutParams {
                members: *members,
                senders: *senders,
                per_request: *per_request,
                parallel: cli.parallel,
                target_deliveries: *target_deliveries,
                target_p99_ms: *p99_ms,
                prefix: prefix.clone(),
            };
            let file = rt.block_on(load::fanout(&target, &cli.node_pid, &p, &steps))?;
            emit(&cli, file)
        }
        Cmd::Groups {
            users,
            min,
            max,
            rates,
            step_secs,
            drain_secs,
            drivers,
            text_len,
            p99_ms,
            stop_p99_ms,
            seed,
            prefix,
        } => {
            check_conns(*users)?;
            check_secs("--step-secs", *step_secs)?;
            check_secs("--drain-secs", *drain_secs)?;
            if *min < 2 || min > max || *users < *min {
                bail!("need 2 <= min <= max and users >= min");
            }
            let steps = load::Steps {
                rates: rates.clone(),
                step_secs: *step_secs,
                drain_secs: *drain_secs,
                text_len: *text_len,
                stop_p99_ms: *stop_p99_ms,
            };
            let p = load::GroupsParams {
                users: *users,
                min: *min,
                max: *max,
                drivers: (*drivers).max(1),
                parallel: cli.parallel,
                p99_ms: *p99_ms,
                seed: *seed,
                prefix: prefix.clone(),
            };
            let file = rt.block_on(load::groups(&target, &cli.node_pid, &p, &steps))?;
            emit(&cli, file)
        }
        Cmd::Durable {
            groups,
            senders,
            window,
            secs,
            text_len,
            label,
            target: goal,
            prefix,
        } => {
            check_conns(*senders)?;
            check_secs("--secs", *secs)?;
            if cli.addr.len() > 1 {
                bail!("durable reads one node's commit metrics: give a single --addr");
            }
            if *groups > 100_000 || *window == 0 || *window > 65_536 {
                bail!("groups at most 100,000; window in 1..=65,536");
            }
            let p = durable::Params {
                groups: *groups,
                senders: *senders,
                window: *window,
                secs: *secs,
                text_len: *text_len,
                label: label.clone(),
                parallel: cli.parallel,
                target: *goal,
                prefix: prefix.clone(),
            };
            let file = rt.block_on(durable::run(&target, &cli.node_pid, &p))?;
            emit(&cli, file)
        }
        Cmd::Report { .. } => unreachable!("handled above"),
    }
}
