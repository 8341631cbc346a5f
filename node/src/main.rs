//! `chat-node`: the chat server binary.
//!
//! Owns the process: command line, config file, logging, metrics, the
//! storage engine, the HTTP/WebSocket listener and the shutdown sequence.
//! Everything chat-specific lives in the `actors` crate; this crate only
//! wires it to sockets and signals.
//!
//! Subcommands:
//! - `run --config FILE [--listen ADDR] [--data-dir DIR]`: serve.
//! - `token USER --config FILE [--ttl SECS]`: print a client JWT.
//!
//! Shutdown (SIGTERM or SIGINT), in this order, each step logged: stop
//! accepting and report 503 on /healthz; send every client `goaway` and close
//! its socket with 1001; wait for connections to end; retire every group
//! actor (flushing pointers); close storage. Stragglers get a deadline.
#![warn(missing_docs)]

mod admin;
mod auth;
mod cluster;
mod config;
mod edge;
mod http;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actors::outbound::{CLOSE_GOING_AWAY, SharedPush};
use actors::relay::RelayMessage;
use actors::{Router, Store, StoreOptions, UserId};
use anyhow::Context;
use clap::{Parser, Subcommand};
use proto::v1::{self, server_frame::Kind};
use storage::Kv;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::auth::Auth;
use crate::config::{Config, Engine};

/// The chat server.
#[derive(Parser, Debug)]
#[command(name = "chat-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node.
    Run {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override `node.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override `node.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print a client token (JWT) for USER, signed with the config's secret.
    Token {
        /// The user id (the token's `sub`); ignored with `--admin`.
        user: String,
        /// Print an operator token for the /admin endpoints instead.
        #[arg(long)]
        admin: bool,
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Lifetime in seconds (negative: already expired, for tests).
        #[arg(long, default_value_t = 86_400, allow_negative_numbers = true)]
        ttl: i64,
    },
    /// Operate a running cluster (talks to a node's admin endpoints).
    Admin {
        /// The config file (TOML): its secret signs the operator token.
        #[arg(long)]
        config: PathBuf,
        /// Any live node's HTTP address (default: the config's `node.listen`).
        #[arg(long)]
        node: Option<String>,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
}

/// jemalloc instead of glibc's malloc (decisions #23). Buffers are allocated
/// on one thread and freed on another all the time here (a frame read by a
/// connection's task is committed on the storage thread and freed by a
/// group actor), and glibc's arenas then contend on their locks (seen in
/// `perf` as futex wake-ups under `malloc`/`realloc`). Measured on this
/// machine, interleaved: durable appends +25% into one group, +9-28% over
/// 1,000 groups; idle connections 9.5-10.3 KB each instead of 9.4 KB
/// (size-class rounding, thread caches); fan-out unchanged
/// (docs/benchmarks.md, round 6).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            user,
            admin,
            config,
            ttl,
        } => {
            let config = Config::load(&config)?;
            let auth = Auth::new(&config.auth.jwt_secret, config.auth.leeway_secs);
            if admin {
                println!("{}", auth.mint_admin(ttl)?);
                return Ok(());
            }
            let user =
                UserId::parse(&user).context("user ids are 1-128 characters of [A-Za-z0-9._@-]")?;
            println!("{}", auth.mint(&user, ttl)?);
            Ok(())
        }
        Command::Admin {
            config,
            node,
            command,
        } => {
            let config = Config::load(&config)?;
            let auth = Auth::new(&config.auth.jwt_secret, config.auth.leeway_secs);
            let token = auth.mint_admin(300)?;
            let node = node.unwrap_or_else(|| config.node.listen.to_string());
            admin::run(&node, &token, command)
        }
        Command::Run {
            config,
            listen,
            data_dir,
        } => {
            let mut config = Config::load(&config)?;
            if let Some(l) = listen {
                config.node.listen = l;
            }
            if let Some(d) = data_dir {
                config.node.data_dir = d;
            }
            config.validate()?;
            init_logging();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("chat-node")
                .build()?;
            runtime.block_on(run(config))
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn open_storage(config: &Config) -> anyhow::Result<Arc<dyn Kv>> {
    match config.storage.engine {
        Engine::Embedded => {
            std::fs::create_dir_all(&config.node.data_dir)
                .with_context(|| format!("creating {}", config.node.data_dir.display()))?;
            let opts = storage::sqlite::SqliteOptions {
                sync: match config.storage.sync {
                    config::Sync::Full => storage::sqlite::SyncMode::Full,
                    config::Sync::Normal => storage::sqlite::SyncMode::Normal,
                },
                ..Default::default()
            };
            let path = config.db_path();
            let kv = storage::sqlite::SqliteKv::open(&path, opts)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok(Arc::new(kv))
        }
        #[cfg(feature = "fdb")]
        Engine::Foundationdb => {
            let kv = storage::fdb::FdbKv::open(config.storage.fdb_cluster_file.as_deref())
                .context("opening FoundationDB")?;
            Ok(Arc::new(kv))
        }
        #[cfg(not(feature = "fdb"))]
        Engine::Foundationdb => {
            anyhow::bail!(
                "storage.engine = \"foundationdb\" needs a build with `--features fdb` (see README)"
            )
        }
    }
}

/// Declares the node's metrics so /metrics lists them from the start.
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("chat_connections", "Open WebSocket connections.");
    describe_gauge!("chat_sessions", "Running session actors.");
    describe_counter!("chat_frames_in_total", "Client frames received.");
    describe_counter!("chat_frames_out_total", "Frames written to clients.");
    describe_counter!("chat_requests_total", "Requests by kind.");
    describe_counter!("chat_errors_total", "Error frames by code.");
    describe_counter!("chat_messages_committed_total", "Log entries committed.");
    describe_histogram!(
        "chat_commit_batch_messages",
        Unit::Count,
        "Log entries per group commit."
    );
    describe_histogram!(
        "chat_commit_txn_seconds",
        Unit::Seconds,
        "Time of one commit-stage transaction, fsync included."
    );
    describe_histogram!(
        "chat_commit_wait_seconds",
        Unit::Seconds,
        "Time a commit-stage transaction waited before its first statement: the storage \
         write lane's queue and the engine's write lock (another process's writer, a \
         checkpoint that restarts the WAL)."
    );
    describe_counter!(
        "chat_group_pipelined_commits_total",
        "Group commits planned while another of the group's was in storage."
    );
    describe_counter!(
        "chat_group_abandoned_commits_total",
        "Pipelined group commits dropped because the batch ahead held retried sends (replanned)."
    );
    describe_counter!(
        "chat_relay_deliveries_total",
        "Pushes queued to local sessions."
    );
    describe_counter!(
        "chat_slow_consumers_total",
        "Connections cut off for not reading."
    );
    describe_counter!("chat_group_activations_total", "Group actors started.");
    metrics::gauge!("chat_connections").set(0.0);
    metrics::gauge!("chat_sessions").set(0.0);
    metrics::counter!("chat_messages_committed_total").absolute(0);
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
    }
}

/// A single-threaded runtime on a thread of its own, for cluster
/// membership; it lives as long as the process.
fn cluster_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("cluster")
        .build()
        .context("building the cluster runtime")?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .context("starting the cluster thread")?;
    Ok(handle)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_metrics();
    let kv = open_storage(&config)?;
    let store = Store::with_options(
        kv,
        StoreOptions {
            writer_nice: config.storage.writer_nice,
        },
    )
    .context("starting the storage threads")?;
    info!(node = %config.node.name, engine = store.engine(), "storage open");
    // In a cluster, membership (ractor_cluster's links, the port, the
    // failure detector) runs on its own thread: a storm of client
    // handshakes on the main runtime must not delay pings past the failure
    // timeout and get healthy peers declared down.
    let cluster_rt = config.cluster.is_some().then(cluster_runtime).transpose()?;
    let router = Router::start_with(
        &config.node.name,
        store,
        config.actor_config(),
        cluster_rt.clone(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .with_context(|| format!("binding {}", config.node.listen))?;
    let draining = Arc::new(AtomicBool::new(false));
    let cluster = match (config.cluster.clone(), cluster_rt) {
        (Some(c), Some(rt)) => {
            let start = cluster::start(
                config.node.name.clone(),
                c,
                router.clone(),
                listener.local_addr()?,
                draining.clone(),
            );
            Some(rt.spawn(start).await.context("starting the cluster")??)
        }
        _ => None,
    };
    let server = Arc::new(http::Server {
        router: router.clone(),
        auth: Auth::new(&config.auth.jwt_secret, config.auth.leeway_secs),
        metrics,
        limits: ws::ConnLimits {
            max_frame_bytes: config.limits.max_frame_bytes,
            outbound_queue: config.limits.outbound_queue,
            max_in_flight: config.limits.max_in_flight,
        },
        draining,
        tasks: tokio_util::task::TaskTracker::new(),
        cluster,
        stop: tokio::sync::Notify::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let accept = tokio::spawn(http::serve(
        listener,
        server.clone(),
        config.limits.max_connections,
        stop_rx,
    ));
    info!(node = %config.node.name, listen = %config.node.listen, "serving");

    tokio::select! {
        _ = shutdown_signal() => {}
        _ = server.stop.notified() => info!("shutting down after drain"),
    }
    let deadline = Duration::from_millis(config.tuning.shutdown_deadline_ms);

    info!("step 1/4: stop accepting");
    server.draining.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = accept.await;

    info!("step 2/4: goaway to every client");
    let goaway = SharedPush::new(Kind::Goaway(v1::Goaway {
        reason: "server shutting down; reconnect".into(),
    }));
    let _ = router.relay().cast(RelayMessage::CloseAll {
        push: Some(goaway),
        code: CLOSE_GOING_AWAY,
    });
    server.tasks.close();
    if tokio::time::timeout(deadline, server.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            left = server.tasks.len(),
            "connections still open at the deadline"
        );
    }

    info!("step 3/4: retire group actors (flush pointers)");
    if let Err(e) = router.stop_groups(deadline).await {
        warn!(error = %e, "group actors did not all stop in time");
    }

    info!("step 4/4: leave the cluster, close storage");
    drop(router);
    #[cfg(feature = "fdb")]
    if config.storage.engine == Engine::Foundationdb {
        storage::fdb::stop_network();
    }
    info!("stopped");
    Ok(())
}
