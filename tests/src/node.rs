//! One real `chat-node` process per test.
//!
//! Owns: a temp dir holding the node's config file (`node.toml`), its data
//! dir (`data/`) and its log file (`node.log`, stdout and stderr of every
//! start appended); the child process; the port it listens on (127.0.0.1,
//! picked free by binding port 0).
//!
//! Lifecycle: [`NodeProcess::start`] writes the config, spawns the binary and
//! polls `GET /healthz` until it answers 200 `ok` (or fails with the log
//! tail). [`NodeProcess::kill9`] is SIGKILL (a crash); [`NodeProcess::sigterm`]
//! asks for a graceful shutdown; [`NodeProcess::sigstop`] /
//! [`NodeProcess::sigcont`] freeze and resume it; [`NodeProcess::restart`] starts the binary
//! again on the same data dir (and the same port when it is still free).
//! `Drop` sends SIGTERM, waits up to [`SHUTDOWN_DEADLINE`] and then SIGKILLs;
//! when the test is panicking it prints the log tail and keeps the temp dir.
//! Set `CHAT_TEST_KEEP_DIRS=1` to keep every temp dir.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::http::{self, HttpResponse};
use crate::{SHUTDOWN_DEADLINE, STARTUP_TIMEOUT, auth};

/// How many times a start is retried on a fresh port when the port was taken
/// between picking it and the node binding it.
pub const PORT_ATTEMPTS: u32 = 5;

/// Lines of the node log printed when something fails.
pub const LOG_TAIL_LINES: usize = 80;

/// Starts each start's section of the node log (followed by the start's
/// number, binary and address).
const START_MARKER: &str = "=== harness: start #";

/// Whether a failed start's output (or error text) says its port was taken
/// between probing it free and binding it: then a fresh port will do.
pub fn is_port_collision(text: &str) -> bool {
    text.contains("in use") || text.contains("AddrInUse")
}

/// What a log holds from its last `marker` line on: the output of the last
/// start (all of it: a backtrace can push the error line out of any tail).
pub fn since_last<'a>(log: &'a str, marker: &str) -> &'a str {
    log.rfind(marker).map_or(log, |at| &log[at..])
}

/// The config the harness writes for a node (same format as
/// `cluster-config/single.toml`). Tests change the limits they exercise.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `[node] name`.
    pub name: String,
    /// `[auth] jwt_secret`.
    pub jwt_secret: String,
    /// `[storage] sync`: `"full"` or `"normal"`.
    pub sync: String,
    /// `[limits] max_frame_bytes`.
    pub max_frame_bytes: u64,
    /// `[limits] max_text_bytes`.
    pub max_text_bytes: u64,
    /// `[limits] rate_per_sec`.
    pub rate_per_sec: u64,
    /// `[limits] rate_burst`.
    pub rate_burst: u64,
    /// `[limits] outbound_queue`.
    pub outbound_queue: u64,
    /// `[limits] max_members`.
    pub max_members: u64,
    /// `[limits] max_connections`.
    pub max_connections: u64,
    /// `[storage] path`: the store file (absolute: several nodes share it);
    /// `None` keeps the default (`chat.db` in the data dir).
    pub storage_path: Option<PathBuf>,
    /// `[cluster]`; `None` runs the node alone.
    pub cluster: Option<ClusterConfig>,
    /// `[tuning]` keys and values (milliseconds), e.g.
    /// `("presence_ttl_ms", 1500)`; empty keeps the node's defaults.
    pub tuning: Vec<(&'static str, u64)>,
}

/// The `[cluster]` section of a node's config (see
/// `cluster-config/local-3node/node1.toml`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `listen`: the inter-node (ractor_cluster) address.
    pub listen: SocketAddr,
    /// `cookie`: the cluster's shared secret (at least 8 bytes).
    pub cookie: String,
    /// `seeds`: cluster addresses of nodes to join through.
    pub seeds: Vec<SocketAddr>,
    /// `ping_interval_ms`.
    pub ping_interval_ms: u64,
    /// `failure_timeout_ms`.
    pub failure_timeout_ms: u64,
    /// `reconnect_interval_ms` (`None`: the node's default).
    pub reconnect_interval_ms: Option<u64>,
}

impl ClusterConfig {
    /// The TOML text of this section.
    fn to_toml(&self) -> String {
        let seeds: Vec<String> = self.seeds.iter().map(|a| format!("\"{a}\"")).collect();
        let mut t = format!(
            "\n[cluster]\nlisten = \"{listen}\"\ncookie = {cookie:?}\nseeds = [{seeds}]\n\
             ping_interval_ms = {ping}\nfailure_timeout_ms = {failure}\n",
            listen = self.listen,
            cookie = self.cookie,
            seeds = seeds.join(", "),
            ping = self.ping_interval_ms,
            failure = self.failure_timeout_ms,
        );
        if let Some(r) = self.reconnect_interval_ms {
            t.push_str(&format!("reconnect_interval_ms = {r}\n"));
        }
        t
    }
}

impl Default for NodeConfig {
    /// Generous limits (tests that exercise a limit lower it), `sync = "normal"`
    /// for speed (durability tests use `"full"`), a random JWT secret.
    fn default() -> Self {
        Self {
            name: "node1".to_string(),
            jwt_secret: crate::unique("test-secret-"),
            sync: "normal".to_string(),
            max_frame_bytes: 65536,
            max_text_bytes: 16384,
            rate_per_sec: 100_000,
            rate_burst: 100_000,
            outbound_queue: 4096,
            max_members: 1000,
            max_connections: 1000,
            storage_path: None,
            cluster: None,
            tuning: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// The TOML text of this config for a node listening on `listen` with its
    /// data in `data_dir`.
    pub fn to_toml(&self, listen: SocketAddr, data_dir: &Path) -> String {
        let storage_path = match &self.storage_path {
            Some(p) => format!("path = {:?}\n", p.display().to_string()),
            None => String::new(),
        };
        let mut cluster = self
            .cluster
            .as_ref()
            .map(ClusterConfig::to_toml)
            .unwrap_or_default();
        if !self.tuning.is_empty() {
            cluster.push_str("\n[tuning]\n");
            for (k, v) in &self.tuning {
                cluster.push_str(&format!("{k} = {v}\n"));
            }
        }
        format!(
            r#"# Written by the tests harness (tests/src/node.rs).
[node]
name = {name:?}
listen = "{listen}"
data_dir = {data_dir:?}

[auth]
jwt_secret = {secret:?}

[storage]
engine = "embedded"
sync = {sync:?}
{storage_path}
[limits]
max_frame_bytes = {max_frame_bytes}
max_text_bytes = {max_text_bytes}
rate_per_sec = {rate_per_sec}
rate_burst = {rate_burst}
outbound_queue = {outbound_queue}
max_members = {max_members}
max_connections = {max_connections}
{cluster}"#,
            name = self.name,
            data_dir = data_dir.display().to_string(),
            secret = self.jwt_secret,
            sync = self.sync,
            max_frame_bytes = self.max_frame_bytes,
            max_text_bytes = self.max_text_bytes,
            rate_per_sec = self.rate_per_sec,
            rate_burst = self.rate_burst,
            outbound_queue = self.outbound_queue,
            max_members = self.max_members,
            max_connections = self.max_connections,
        )
    }
}

/// The `chat-node` binary: `CHAT_NODE_BIN` if set, else
/// `<target>/debug/chat-node` of this workspace. Fails with instructions when
/// it does not exist.
pub fn node_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHAT_NODE_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "CHAT_NODE_BIN={} does not exist; run `cargo build -p node --bin chat-node`",
                p.display()
            );
        }
        return Ok(p);
    }
    let root = workspace_root();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => {
            let t = PathBuf::from(t);
            if t.is_absolute() { t } else { root.join(t) }
        }
        None => root.join("target"),
    };
    let p = target.join("debug").join("chat-node");
    if !p.is_file() {
        bail!(
            "{} not found: run `cargo build -p node --bin chat-node` first \
             (scripts/test.sh does), or set CHAT_NODE_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A free port on 127.0.0.1 right now (bind port 0, read it, drop).
pub fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A running (or stopped, between [`NodeProcess::kill9`] and
/// [`NodeProcess::restart`]) `chat-node` process and its files.
pub struct NodeProcess {
    /// The config written at start (tests read the secret and limits).
    config: NodeConfig,
    /// The temp dir; `None` once kept on purpose.
    dir: Option<TempDir>,
    /// Path of the temp dir (stays valid while `dir` is held or kept).
    root: PathBuf,
    /// `root/node.toml`.
    config_path: PathBuf,
    /// `root/data`.
    data_dir: PathBuf,
    /// `root/node.log`.
    log_path: PathBuf,
    /// Where the node listens.
    addr: SocketAddr,
    /// The child process while it runs (or until it is reaped).
    child: Option<Child>,
    /// The binary.
    bin: PathBuf,
    /// How many times the binary was started (log markers).
    starts: u32,
    /// Set between [`NodeProcess::sigstop`] and [`NodeProcess::sigcont`].
    stopped: bool,
}

impl NodeProcess {
    /// Starts a node with `config` and waits until `/healthz` answers.
    pub async fn start(config: NodeConfig) -> Result<Self> {
        let bin = node_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("chat-e2e-")
            .tempdir()
            .context("create temp dir")?;
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        fs::create_dir_all(&data_dir)?;
        let mut node = Self {
            config,
            config_path: root.join("node.toml"),
            log_path: root.join("node.log"),
            data_dir,
            root,
            dir: Some(dir),
            addr: free_addr()?,
            child: None,
            bin,
            starts: 0,
            stopped: false,
        };
        node.start_on_some_port(false).await?;
        Ok(node)
    }

    /// Starts a node with the default config.
    pub async fn start_default() -> Result<Self> {
        Self::start(NodeConfig::default()).await
    }

    /// Tries the current port first when `keep_port`, else a fresh one; on a
    /// start failure that looks like a port collision, retries on fresh ports.
    async fn start_on_some_port(&mut self, keep_port: bool) -> Result<()> {
        let mut last_err = None;
        for attempt in 0..PORT_ATTEMPTS {
            if attempt > 0 || !keep_port {
                self.addr = free_addr()?;
            }
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if !is_port_collision(&self.last_start_output()) {
                        return Err(e.context(format!(
                            "node failed to start; log {}:\n{}",
                            self.log_path.display(),
                            self.start_failure_excerpt()
                        )));
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no start attempt"))
            .context(format!(
                "node failed to start on {PORT_ATTEMPTS} ports; log:\n{}",
                self.start_failure_excerpt()
            )))
    }

    /// What the node wrote since the harness last started it.
    fn last_start_output(&self) -> String {
        since_last(&self.log_text(), START_MARKER).to_string()
    }

    /// The last start's `Error:` report (its cause chain, up to the
    /// backtrace), then the log's tail: what a reader of a failed test needs,
    /// even when a long backtrace fills the tail.
    fn start_failure_excerpt(&self) -> String {
        let output = self.last_start_output();
        let report: Vec<&str> = output
            .lines()
            .skip_while(|l| !l.starts_with("Error:"))
            .take_while(|l| !l.contains("backtrace"))
            .take(20)
            .collect();
        format!(
            "{}\n--- log tail ---\n{}",
            report.join("\n"),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        fs::write(
            &self.config_path,
            self.config.to_toml(self.addr, &self.data_dir),
        )
        .context("write node config")?;
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("open node log")?;
        writeln!(
            log,
            "{START_MARKER}{} of {} on {} ===",
            self.starts,
            self.bin.display(),
            self.addr
        )?;
        let log_err: File = log.try_clone()?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // Plain text in the log file (tracing-subscriber honours NO_COLOR).
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready(STARTUP_TIMEOUT).await
    }

    /// Polls `/healthz` until 200 `ok`, the process exits, or `timeout`.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("node exited during startup with {status}");
            }
            if let Ok(r) = http::get(self.addr, "/healthz", Duration::from_secs(1)).await
                && r.status == 200
                && r.body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("node not ready after {timeout:?} (GET /healthz never answered 200 ok)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => Ok(c.try_wait()?),
        }
    }

    /// The config this node was started with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Where the node listens (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The node's data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node's config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The `chat-node` binary this node runs.
    pub fn binary(&self) -> &Path {
        &self.bin
    }

    /// The node's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A valid token for `user`, signed with this node's secret.
    pub fn token(&self, user: &str) -> String {
        auth::token(&self.config.jwt_secret, user)
    }

    /// GET `path` on the node's HTTP port.
    pub async fn http_get(&self, path: &str) -> Result<HttpResponse> {
        http::get(self.addr, path, Duration::from_secs(10)).await
    }

    /// The node's resident memory in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().context("node not running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS line")?;
        let kib = line
            .split_whitespace()
            .nth(1)
            .context("VmRSS value")?
            .parse()?;
        Ok(kib)
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL (a crash, as `kill -9`), then reap the process.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // Child::kill sends SIGKILL on Unix.
            c.kill().ok();
            c.wait().context("wait for killed node")?;
        }
        self.stopped = false;
        Ok(())
    }

    /// SIGSTOP: the process is frozen (its sockets stay open) until
    /// [`NodeProcess::sigcont`]; `Drop` resumes it before stopping it.
    pub fn sigstop(&mut self) -> Result<()> {
        let pid = self.pid().context("node not running")?;
        signal(pid, "STOP")?;
        self.stopped = true;
        // The signal is delivered asynchronously: wait until every thread
        // is stopped, so what the caller observes next (e.g. the locks the
        // process holds) cannot change any more.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !all_threads_stopped(pid) {
            if Instant::now() >= deadline {
                bail!("node {pid} not stopped 2 s after SIGSTOP");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGCONT: resumes a process frozen by [`NodeProcess::sigstop`].
    pub fn sigcont(&mut self) -> Result<()> {
        let pid = self.pid().context("node not running")?;
        signal(pid, "CONT")?;
        self.stopped = false;
        Ok(())
    }

    /// Whether the process is still running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None)) && self.child.is_some()
    }

    /// The whole log of the node (every start), as text.
    pub fn log_text(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default()
    }

    /// Sends SIGTERM (graceful shutdown); does not wait.
    pub fn sigterm(&self) -> Result<()> {
        let pid = self.pid().context("node not running")?;
        signal(pid, "TERM")
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "node still running {timeout:?} after the wait began; log tail:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the binary again on the same data dir, on the same port if it is
    /// still free (else a fresh one), and waits until ready. A still-running
    /// process is stopped gracefully first.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.sigterm()?;
            if self.wait_exit(SHUTDOWN_DEADLINE).await.is_err() {
                self.kill9()?;
            }
        }
        self.start_on_some_port(true).await
    }

    /// Stops the process: SIGTERM, wait up to `deadline`, then SIGKILL.
    /// Returns the exit status when the process exited by itself.
    fn stop_blocking(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if self.stopped {
            // A frozen process handles no SIGTERM.
            let _ = signal(child.id(), "CONT");
            self.stopped = false;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = signal(child.id(), "TERM");
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "harness: node {} did not exit {deadline:?} after SIGTERM; sending SIGKILL",
            self.addr
        );
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

/// Whether every thread of `pid` is stopped (state `T` or `t` in
/// `/proc/PID/task/TID/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // "TID (comm) STATE ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    })
}

/// Sends `kill -SIG pid` (no libc dependency needed).
fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed: {status}");
    }
    Ok(())
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let status = self.stop_blocking(SHUTDOWN_DEADLINE);
        let panicking = std::thread::panicking();
        if let Some(s) = status
            && !s.success()
        {
            eprintln!(
                "harness: node {} exited with {s} after SIGTERM (expected 0)",
                self.addr
            );
        }
        let keep = panicking || std::env::var_os("CHAT_TEST_KEEP_DIRS").is_some();
        // Printed always: the test harness shows it only for failed tests
        // (a test that returns `Err` is not panicking while its node drops).
        eprintln!(
            "---- node {} {} log tail ({}; CHAT_TEST_KEEP_DIRS=1 keeps it) ----\n{}\n---- end of node log ----",
            self.config.name,
            self.addr,
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES)
        );
        if keep && let Some(dir) = self.dir.take() {
            let path = dir.keep();
            eprintln!("harness: kept node dir {}", path.display());
        }
    }
}

#[cfg(test)]
mod tests;
