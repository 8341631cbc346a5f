//! Several real `chat-node` processes on 127.0.0.1 forming one cluster.
//!
//! Owns: the nodes ([`NodeProcess`], each with its own temp dir, data dir,
//! HTTP port and log), a free inter-node (ractor_cluster) port per node, one
//! temp dir holding the store file every node shares (`[storage] path`, an
//! absolute path), and the settings every node gets alike: JWT secret,
//! cookie, failure-detector timings.
//!
//! Node `i` (0-based) is named `node{i+1}`. Seeds are the other nodes'
//! cluster addresses ([`Seeds::Others`]) or only the first node's
//! ([`Seeds::First`]: the others are learnt through it).
//!
//! [`Cluster::start`] starts the nodes in parallel and waits until every node
//! reports every node live in `GET /admin/status`. Then tests add a node,
//! drain one (`POST /admin/drain`), `kill -9`, SIGSTOP or SIGCONT one, ask
//! who owns a group (`GET /admin/owner`), post a system message
//! (`POST /admin/system`) and read `/metrics`, all with an operator token
//! minted from the shared secret. [`Cluster::store_locks`] reads the POSIX
//! locks a node holds on the shared SQLite files (`/proc/locks`), so a test
//! can freeze a node inside or outside a store commit
//! ([`Cluster::sigstop_with_writer_lock`]). [`Cluster::check_health`] is
//! the end-of-test invariant (no panic logged, no `INTERNAL` error).
//!
//! [`Endpoints`] is the list of the nodes' HTTP addresses, shared with client
//! tasks (see [`crate::failover`]) that reconnect to another node when theirs
//! goes away; the cluster appends the address of every node it adds.
//!
//! Every wait is bounded. `Drop` sends SIGTERM to every running node at once
//! (resuming frozen ones first), then each [`NodeProcess`] waits for its
//! process; when the test panics the store dir is kept.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use tempfile::TempDir;

use crate::auth;
use crate::client::Client;
use crate::http::{self, HttpResponse};
use crate::node::{ClusterConfig, NodeConfig, NodeProcess, is_port_collision};

/// How long [`Cluster::start`] and [`Cluster::add_node`] wait for every node
/// to see every other live.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// Timeout of one admin or metrics HTTP request.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most groups [`Cluster::group_owned_by`] creates looking for one.
pub const MAX_GROUP_ATTEMPTS: usize = 64;

/// Which seeds a node is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeds {
    /// Every other node's cluster address.
    Others,
    /// The first node's only (the first node itself gets none): the others
    /// are learnt through it.
    First,
}

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes started by [`Cluster::start`].
    pub nodes: usize,
    /// Seeds of each node.
    pub seeds: Seeds,
    /// `[cluster] cookie`.
    pub cookie: String,
    /// `[cluster] ping_interval_ms`.
    pub ping_interval_ms: u64,
    /// `[cluster] failure_timeout_ms`.
    pub failure_timeout_ms: u64,
    /// `[cluster] reconnect_interval_ms`.
    pub reconnect_interval_ms: u64,
    /// Settings of every node (limits, sync, JWT secret); the name, the
    /// cluster section and the store path are set per node.
    pub node: NodeConfig,
}

impl Default for ClusterOptions {
    /// Three nodes, every other node as a seed, fast failure detection
    /// (ping 250 ms, failure timeout 1.5 s, redial every 500 ms).
    fn default() -> Self {
        Self {
            nodes: 3,
            seeds: Seeds::Others,
            cookie: crate::unique("cookie-"),
            ping_interval_ms: 250,
            failure_timeout_ms: 1500,
            reconnect_interval_ms: 500,
            node: NodeConfig::default(),
        }
    }
}

/// One node as `GET /admin/status` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Its HTTP address (empty until known).
    pub http_addr: String,
    /// Its cluster address.
    pub cluster_addr: String,
    /// Live in the answering node's view.
    pub live: bool,
    /// Draining.
    pub draining: bool,
}

/// What `GET /admin/status` answers.
#[derive(Debug, Clone, Deserialize)]
pub struct AdminStatus {
    /// The answering node.
    pub node: String,
    /// Whether it is draining.
    pub draining: bool,
    /// Group actors running on it.
    pub groups: u64,
    /// Client sessions on it.
    pub sessions: u64,
    /// Distinct users connected to it.
    pub users: u64,
    /// The cluster in its view (itself included).
    pub nodes: Vec<NodeInfo>,
}

impl AdminStatus {
    /// The names of the nodes live in this view.
    pub fn live(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|n| n.live)
            .map(|n| n.name.clone())
            .collect()
    }
}

/// The HTTP addresses of a cluster's nodes, shared with client tasks; the
/// cluster appends the nodes it adds (and updates a restarted node's).
#[derive(Debug, Clone)]
pub struct Endpoints {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    secret: String,
}

impl Endpoints {
    /// A list of `addrs` whose nodes accept tokens signed with `secret`.
    pub fn new(addrs: Vec<SocketAddr>, secret: &str) -> Self {
        Self {
            addrs: Arc::new(Mutex::new(addrs)),
            secret: secret.to_string(),
        }
    }

    /// The addresses now, in node order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.lock().expect("endpoints lock").clone()
    }

    /// Address of node `i` (wrapping around).
    pub fn addr(&self, i: usize) -> SocketAddr {
        let a = self.addrs.lock().expect("endpoints lock");
        a[i % a.len()]
    }

    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.addrs.lock().expect("endpoints lock").len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A client token for `user`.
    pub fn token(&self, user: &str) -> String {
        auth::token(&self.secret, user)
    }

    fn set(&self, i: usize, addr: SocketAddr) {
        let mut a = self.addrs.lock().expect("endpoints lock");
        if i < a.len() {
            a[i] = addr;
        } else {
            a.push(addr);
        }
    }
}

/// A POSIX lock a node holds on a file of the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLock {
    /// `chat.db`, `chat.db-wal` or `chat.db-shm`.
    pub file: String,
    /// Exclusive (`WRITE`) rather than shared.
    pub write: bool,
    /// First byte.
    pub start: u64,
    /// Last byte (`EOF` for the rest of the file).
    pub end: String,
}

impl StoreLock {
    /// Whether this is SQLite's WAL writer lock (exclusive, `-shm` byte 120).
    pub fn is_wal_writer(&self) -> bool {
        self.write && self.file.ends_with("-shm") && self.start == 120
    }
}

/// What the harness believes about a node's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Running.
    Up,
    /// Frozen by SIGSTOP.
    Stopped,
    /// Killed, drained or exited.
    Down,
}

/// A running cluster of `chat-node` processes sharing one store.
pub struct Cluster {
    /// The nodes, by index (dropped before the store dir).
    nodes: Vec<NodeProcess>,
    /// Each node's state.
    states: Vec<NodeState>,
    /// Each node's cluster address.
    cluster_addrs: Vec<SocketAddr>,
    /// The options the cluster was started with.
    options: ClusterOptions,
    /// HTTP addresses shared with client tasks.
    endpoints: Endpoints,
    /// The shared store file.
    store_path: PathBuf,
    /// The temp dir holding it; `None` once kept.
    store_dir: Option<TempDir>,
}

/// The name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("node{}", i + 1)
}

impl Cluster {
    /// Starts `options.nodes` nodes in parallel and waits until each sees
    /// all of them live. Cluster ports are probed free before the nodes bind
    /// them, so another test may take one in between: then the whole
    /// cluster starts again on fresh ports (a few times at most).
    pub async fn start(options: ClusterOptions) -> Result<Self> {
        const ATTEMPTS: usize = 3;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match Self::start_once(options.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if is_port_collision(&format!("{e:#}")) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no attempt"))
            .context(format!(
                "cluster ports kept colliding ({ATTEMPTS} attempts)"
            )))
    }

    async fn start_once(options: ClusterOptions) -> Result<Self> {
        ensure!(options.nodes >= 1, "a cluster needs a node");
        let store_dir = tempfile::Builder::new()
            .prefix("chat-e2e-store-")
            .tempdir()
            .context("create the store dir")?;
        let store_path = store_dir.path().join("chat.db");
        let cluster_addrs = distinct_free_addrs(options.nodes)?;
        let mut cluster = Self {
            nodes: Vec::new(),
            states: Vec::new(),
            cluster_addrs: cluster_addrs.clone(),
            endpoints: Endpoints::new(Vec::new(), &options.node.jwt_secret),
            options,
            store_path,
            store_dir: Some(store_dir),
        };
        let t0 = Instant::now();
        let configs: Vec<NodeConfig> = (0..cluster.options.nodes)
            .map(|i| {
                let seeds = cluster.seeds_for(i, cluster.options.seeds);
                cluster.node_config(i, cluster_addrs[i], seeds)
            })
            .collect();
        let started = futures::future::join_all(configs.into_iter().map(NodeProcess::start)).await;
        let mut first_err = None;
        for (i, r) in started.into_iter().enumerate() {
            match r {
                Ok(n) => {
                    cluster.endpoints.set(i, n.addr());
                    cluster.nodes.push(n);
                    cluster.states.push(NodeState::Up);
                }
                Err(e) => {
                    first_err.get_or_insert(e.context(format!("starting {}", node_name(i))));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let all: Vec<usize> = (0..cluster.nodes.len()).collect();
        cluster.wait_converged(&all, CONVERGE_TIMEOUT).await?;
        eprintln!(
            "harness: cluster of {} nodes converged in {:?} (store {})",
            cluster.nodes.len(),
            t0.elapsed(),
            cluster.store_path.display()
        );
        Ok(cluster)
    }

    /// The seeds node `i` gets under `seeds` (among the first `i` nodes for
    /// nodes added later, all known nodes otherwise).
    fn seeds_for(&self, i: usize, seeds: Seeds) -> Vec<SocketAddr> {
        match seeds {
            Seeds::First if i == 0 => Vec::new(),
            Seeds::First => vec![self.cluster_addrs[0]],
            Seeds::Others => self
                .cluster_addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| *a)
                .collect(),
        }
    }

    /// The config of node `i` listening for peers on `listen`, with
    /// `seeds`: the shared settings, its name and the shared store.
    pub fn node_config(&self, i: usize, listen: SocketAddr, seeds: Vec<SocketAddr>) -> NodeConfig {
        let o = &self.options;
        NodeConfig {
            name: node_name(i),
            storage_path: Some(self.store_path.clone()),
            cluster: Some(ClusterConfig {
                listen,
                cookie: o.cookie.clone(),
                seeds,
                ping_interval_ms: o.ping_interval_ms,
                failure_timeout_ms: o.failure_timeout_ms,
                reconnect_interval_ms: Some(o.reconnect_interval_ms),
            }),
            ..o.node.clone()
        }
    }

    /// The cluster addresses of the nodes (index = node).
    pub fn cluster_addrs(&self) -> &[SocketAddr] {
        &self.cluster_addrs
    }

    /// Starts one more node (`node{n+1}`) with `seeds` (among the existing
    /// nodes) and waits until every running node sees every running node
    /// live. Returns its index.
    pub async fn add_node(&mut self, seeds: Seeds) -> Result<usize> {
        self.add_node_with(seeds, |_| {}).await
    }

    /// Like [`Cluster::add_node`], with `tweak` applied to the new node's
    /// config first (e.g. other failure-detector timings).
    pub async fn add_node_with(
        &mut self,
        seeds: Seeds,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<usize> {
        let i = self.nodes.len();
        let seeds = match seeds {
            Seeds::First => vec![self.cluster_addrs[0]],
            Seeds::Others => self.cluster_addrs[..i]
                .iter()
                .enumerate()
                .filter(|(j, _)| self.states[*j] == NodeState::Up)
                .map(|(_, a)| *a)
                .collect(),
        };
        let (addr, node) = self.start_extra(i, seeds, tweak).await?;
        self.cluster_addrs.push(addr);
        self.endpoints.set(i, node.addr());
        self.nodes.push(node);
        self.states.push(NodeState::Up);
        let up = self.up();
        self.wait_converged(&up, CONVERGE_TIMEOUT).await?;
        Ok(i)
    }

    /// Starts a process configured as node `i` with `seeds`, `tweak` applied,
    /// on a fresh cluster port (probed free before the node binds it, so
    /// another test may take it in between: then again on another, a few
    /// times at most). Returns its cluster address and the process; the
    /// caller decides whether it joins the cluster's books.
    pub async fn start_extra(
        &self,
        i: usize,
        seeds: Vec<SocketAddr>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<(SocketAddr, NodeProcess)> {
        const ATTEMPTS: usize = 3;
        let mut config = self.node_config(
            i,
            distinct_free_addrs_avoiding(1, &self.cluster_addrs)?[0],
            seeds,
        );
        tweak(&mut config);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = match config.cluster.as_ref() {
                Some(c) => c.listen,
                None => bail!("node {i}'s config has no cluster section"),
            };
            match NodeProcess::start(config.clone()).await {
                Ok(node) => return Ok((addr, node)),
                Err(e) if attempt < ATTEMPTS && is_port_collision(&format!("{e:#}")) => {
                    if let Some(c) = config.cluster.as_mut() {
                        c.listen = distinct_free_addrs_avoiding(1, &self.cluster_addrs)?[0];
                    }
                }
                Err(e) => return Err(e.context(format!("starting {}", node_name(i)))),
            }
        }
    }

    /// Number of nodes ever started (indexes stay valid after a node dies).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NodeProcess {
        &self.nodes[i]
    }

    /// Node `i`, mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut NodeProcess {
        &mut self.nodes[i]
    }

    /// The name of node `i`.
    pub fn name(&self, i: usize) -> String {
        node_name(i)
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        (0..self.nodes.len())
            .find(|i| node_name(*i) == name)
            .with_context(|| format!("no node named {name:?} in the cluster"))
    }

    /// What the harness believes about node `i`.
    pub fn state(&self, i: usize) -> NodeState {
        self.states[i]
    }

    /// The indexes of the running (not frozen, not dead) nodes.
    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.states[*i] == NodeState::Up)
            .collect()
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The failure timeout every node runs with.
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.options.failure_timeout_ms)
    }

    /// The shared store file.
    pub fn store_path(&self) -> &Path {
        &self.store_path
    }

    /// The HTTP addresses, shared with client tasks.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.clone()
    }

    /// The JWT secret of every node.
    pub fn secret(&self) -> &str {
        &self.options.node.jwt_secret
    }

    /// An operator token for the admin endpoints.
    pub fn operator_token(&self) -> String {
        auth::operator_token(self.secret())
    }

    /// Connects `user` to node `i` (JSON).
    pub async fn connect(&self, i: usize, user: &str) -> Result<Client> {
        Client::connect(&self.nodes[i], user)
            .await
            .with_context(|| format!("connect {user} to {}", node_name(i)))
    }

    /// Connects `user` to node `i` in binary mode.
    pub async fn connect_binary(&self, i: usize, user: &str) -> Result<Client> {
        Client::connect_binary(&self.nodes[i], user)
            .await
            .with_context(|| format!("connect {user} to {}", node_name(i)))
    }

    // ------------------------------------------------------------------
    // Admin endpoints
    // ------------------------------------------------------------------

    /// `method path` on node `i` with the operator token.
    pub async fn admin_request(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<HttpResponse> {
        let auth = format!("Bearer {}", self.operator_token());
        http::request(
            self.nodes[i].addr(),
            method,
            path,
            &[("Authorization", &auth)],
            body,
            ADMIN_TIMEOUT,
        )
        .await
        .with_context(|| format!("{method} {path} on {}", node_name(i)))
    }

    /// `GET /admin/status` of node `i`.
    pub async fn status(&self, i: usize) -> Result<AdminStatus> {
        let r = self.admin_request(i, "GET", "/admin/status", b"").await?;
        ensure!(
            r.status == 200,
            "GET /admin/status on {}: {} {}",
            node_name(i),
            r.status,
            r.body
        );
        serde_json::from_str(&r.body)
            .with_context(|| format!("/admin/status of {}: {}", node_name(i), r.body))
    }

    /// The owner of `group` in node `i`'s view (`GET /admin/owner`).
    pub async fn owner(&self, i: usize, group: &str) -> Result<String> {
        let r = self
            .admin_request(i, "GET", &format!("/admin/owner?group={group}"), b"")
            .await?;
        ensure!(
            r.status == 200,
            "GET /admin/owner on {}: {} {}",
            node_name(i),
            r.status,
            r.body
        );
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .with_context(|| format!("/admin/owner of {}: {}", node_name(i), r.body))?;
        ensure!(
            v["group"].as_str() == Some(group),
            "/admin/owner answered for another group: {}",
            r.body
        );
        v["owner"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("/admin/owner without an owner: {}", r.body))
    }

    /// Waits until every running node names `want` as the owner of `group`.
    pub async fn wait_owner(&self, group: &str, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            for i in self.up() {
                views.push((node_name(i), self.owner(i, group).await?));
            }
            if views.iter().all(|(_, o)| o == want) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("owner of {group} is not {want} everywhere after {timeout:?}: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the running nodes agree on an owner of `group` other
    /// than `old` (the view changes a tick after a peer stops answering);
    /// returns it.
    pub async fn wait_owner_moved(
        &self,
        group: &str,
        old: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let first = *self.up().first().context("no running node")?;
        loop {
            let o = self.owner(first, group).await?;
            if o != old {
                let left = deadline.saturating_duration_since(Instant::now());
                self.wait_owner(group, &o, left.max(Duration::from_secs(1)))
                    .await?;
                return Ok(o);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still names {old} as the owner of {group} after {timeout:?}",
                    node_name(first)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /admin/system?group=ID` on node `i` with `text` as the body.
    pub async fn post_system(&self, i: usize, group: &str, text: &str) -> Result<HttpResponse> {
        self.admin_request(
            i,
            "POST",
            &format!("/admin/system?group={group}"),
            text.as_bytes(),
        )
        .await
    }

    /// `/metrics` of node `i`.
    pub async fn metrics(&self, i: usize) -> Result<String> {
        let r = http::get(self.nodes[i].addr(), "/metrics", ADMIN_TIMEOUT)
            .await
            .with_context(|| format!("/metrics of {}", node_name(i)))?;
        ensure!(
            r.status == 200,
            "/metrics of {}: {}",
            node_name(i),
            r.status
        );
        Ok(r.body)
    }

    /// The value of the metric `name` on node `i` (summed over labels; 0
    /// when the node has not registered it yet).
    pub async fn metric(&self, i: usize, name: &str) -> Result<f64> {
        Ok(http::metric_value(&self.metrics(i).await?, name).unwrap_or(0.0))
    }

    /// Runs `chat-node admin --config <node i's config> --node <node i>
    /// ARGS...` (the operator CLI) and returns its output.
    pub async fn admin_cli(&self, i: usize, args: &[&str]) -> Result<Output> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(node.binary());
        cmd.arg("admin")
            .arg("--config")
            .arg(node.config_path())
            .arg("--node")
            .arg(node.addr().to_string())
            .args(args)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1");
        let what = format!("chat-node admin ... {}", args.join(" "));
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || cmd.output()),
        )
        .await
        .with_context(|| format!("{what} did not finish in 60 s"))?
        .context("join")?
        .with_context(|| format!("run {what}"))?;
        Ok(out)
    }

    /// Waits until each node of `members` reports exactly the nodes of
    /// `members` as live, at most `timeout`.
    pub async fn wait_converged(&self, members: &[usize], timeout: Duration) -> Result<()> {
        let want: BTreeSet<String> = members.iter().map(|i| node_name(*i)).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            let mut ok = true;
            for &i in members {
                match self.status(i).await {
                    Ok(s) => {
                        let live = s.live();
                        ok &= live == want;
                        views.push(format!("{}: {live:?}", node_name(i)));
                    }
                    Err(e) => {
                        ok = false;
                        views.push(format!("{}: {e:#}", node_name(i)));
                    }
                }
            }
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "cluster did not converge to {want:?} within {timeout:?}; views: {views:?}\n{}",
                    self.log_tails(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `n` log lines of every node, labelled.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            out.push_str(&format!(
                "---- {} ({}) ----\n{}\n",
                node_name(i),
                node.addr(),
                node.log_tail(n)
            ));
        }
        out
    }

    // ------------------------------------------------------------------
    // Faults and operations
    // ------------------------------------------------------------------

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill9()?;
        self.states[i] = NodeState::Down;
        Ok(())
    }

    /// SIGSTOP node `i`.
    pub fn sigstop(&mut self, i: usize) -> Result<()> {
        self.nodes[i].sigstop()?;
        self.states[i] = NodeState::Stopped;
        Ok(())
    }

    /// SIGCONT node `i`.
    pub fn sigcont(&mut self, i: usize) -> Result<()> {
        self.nodes[i].sigcont()?;
        self.states[i] = NodeState::Up;
        Ok(())
    }

    /// SIGSTOPs node `i` at a moment when it holds SQLite's WAL writer lock
    /// on the shared store (`holding = true`: frozen inside a commit, so no
    /// other process can commit until it resumes) or when it does not
    /// (`holding = false`). Retries SIGSTOP/SIGCONT up to `tries` times,
    /// 20 ms apart; when the wish is never met the node is frozen anyway.
    /// Returns whether the frozen node holds the writer lock.
    pub async fn sigstop_with_writer_lock(
        &mut self,
        i: usize,
        holding: bool,
        tries: usize,
    ) -> Result<bool> {
        let tries = tries.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.sigstop(i)?;
            let held = self.store_locks(i).iter().any(StoreLock::is_wal_writer);
            if held == holding || attempt >= tries {
                return Ok(held);
            }
            self.sigcont(i)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restarts node `i` (same config, data dir and, when free, port) and
    /// waits until every running node sees every running node live.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart().await?;
        self.endpoints.set(i, self.nodes[i].addr());
        self.states[i] = NodeState::Up;
        let up = self.up();
        self.wait_converged(&up, CONVERGE_TIMEOUT).await
    }

    /// `POST /admin/drain` on node `i` (202 expected); the node hands its
    /// groups over, sends its clients away and exits. Does not wait.
    pub async fn start_drain(&self, i: usize) -> Result<()> {
        let r = self.admin_request(i, "POST", "/admin/drain", b"").await?;
        ensure!(
            r.status == 202,
            "POST /admin/drain on {}: {} {}",
            node_name(i),
            r.status,
            r.body
        );
        Ok(())
    }

    /// Waits up to `timeout` for node `i` to exit (after a drain) and
    /// returns its exit status.
    pub async fn wait_exit(&mut self, i: usize, timeout: Duration) -> Result<ExitStatus> {
        let status = self.nodes[i].wait_exit(timeout).await?;
        self.states[i] = NodeState::Down;
        Ok(status)
    }

    /// Creates groups as `creator` (connected anywhere) with `members` until
    /// node `ask` names node `owner` as the owner of one, at most
    /// [`MAX_GROUP_ATTEMPTS`] times; returns that group's id.
    pub async fn group_owned_by(
        &self,
        creator: &mut Client,
        name: &str,
        members: &[&str],
        owner: usize,
        ask: usize,
    ) -> Result<String> {
        let want = node_name(owner);
        let mut seen = Vec::new();
        for _ in 0..MAX_GROUP_ATTEMPTS {
            let gid = creator.create_group(name, members).await?;
            let o = self.owner(ask, &gid).await?;
            if o == want {
                return Ok(gid);
            }
            seen.push(o);
        }
        bail!("no group owned by {want} after {MAX_GROUP_ATTEMPTS} groups (owners: {seen:?})")
    }

    /// The POSIX locks (from `/proc/locks`) node `i`'s process holds on the
    /// shared store's files, e.g. `WRITE chat.db-shm 120..120`. In WAL mode,
    /// an exclusive lock on byte 120 of `-shm` is SQLite's writer lock: while
    /// a process holds it no other process can commit.
    pub fn store_locks(&self, i: usize) -> Vec<StoreLock> {
        use std::os::unix::fs::MetadataExt;
        let Some(pid) = self.nodes[i].pid() else {
            return Vec::new();
        };
        let mut files = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("chat.db{suffix}");
            let path = self.store_path.with_file_name(&name);
            if let Ok(m) = std::fs::metadata(&path) {
                files.push((m.ino(), name));
            }
        }
        let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines() {
            // "1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 120 120"
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[4] != pid.to_string() {
                continue;
            }
            let Some(ino) = f[5].rsplit(':').next().and_then(|x| x.parse::<u64>().ok()) else {
                continue;
            };
            if let Some((_, name)) = files.iter().find(|(n, _)| *n == ino) {
                out.push(StoreLock {
                    file: name.clone(),
                    write: f[3] == "WRITE",
                    start: f[6].parse().unwrap_or(0),
                    end: f[7].to_string(),
                });
            }
        }
        out
    }

    /// The end-of-test invariants of every node: no panic in any log, no
    /// `INTERNAL` error answered by a running node. `ERROR` log lines are
    /// printed, not judged.
    pub async fn check_health(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            let log = node.log_text();
            let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
            ensure!(
                panics.is_empty(),
                "{} panicked: {:?}",
                node_name(i),
                &panics[..panics.len().min(5)]
            );
            let errors = log.lines().filter(|l| l.contains(" ERROR ")).count();
            if errors > 0 {
                eprintln!("harness: {} logged {errors} ERROR lines", node_name(i));
            }
            if self.states[i] == NodeState::Up {
                let text = self.metrics(i).await?;
                let internal =
                    http::metric_value_with(&text, "chat_errors_total", "code=\"INTERNAL\"")
                        .unwrap_or(0.0);
                ensure!(
                    internal == 0.0,
                    "{} answered {internal} INTERNAL errors",
                    node_name(i)
                );
            }
        }
        Ok(())
    }

    /// Waits until `pred` holds for the log text of node `i`, at most
    /// `timeout`.
    pub async fn wait_log(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.nodes[i].log_text()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}'s log shows no {what} within {timeout:?}; tail:\n{}",
                    node_name(i),
                    self.nodes[i].log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop every node at once; each NodeProcess then waits for its own.
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if self.states[i] == NodeState::Stopped {
                let _ = node.sigcont();
            }
            if self.states[i] != NodeState::Down {
                let _ = node.sigterm();
            }
        }
        self.nodes.clear();
        let keep = std::thread::panicking() || std::env::var_os("CHAT_TEST_KEEP_DIRS").is_some();
        if keep && let Some(dir) = self.store_dir.take() {
            eprintln!("harness: kept store dir {}", dir.keep().display());
        }
    }
}

/// `n` distinct free ports of 127.0.0.1.
pub fn distinct_free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    distinct_free_addrs_avoiding(n, &[])
}

/// `n` distinct free ports of 127.0.0.1, none of them in `avoid`. The
/// listeners are held until all are picked, so the ports differ.
pub fn distinct_free_addrs_avoiding(n: usize, avoid: &[SocketAddr]) -> Result<Vec<SocketAddr>> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    // Each iteration either keeps a port or holds one to avoid: bounded.
    for _ in 0..(n + avoid.len() + 16) {
        if out.len() == n {
            break;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let a = l.local_addr()?;
        if !avoid.contains(&a) {
            out.push(a);
        }
        held.push(l);
    }
    ensure!(out.len() == n, "could not pick {n} free ports");
    Ok(out)
}

/// Polls `f` every 100 ms until it returns `Ok(true)`, at most `timeout`;
/// the error names `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("{what}: not within {timeout:?} (last error: {e:#})"),
                None => bail!("{what}: not within {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
