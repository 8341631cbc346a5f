//! Receipts, typing and presence end to end (issue 4: "Receipts, typing and
//! presence that hold up in 10,000-member groups"), against real `chat-node`
//! processes:
//!
//! - read/delivered pointers never move backwards (several devices, lower
//!   seqs, seqs past the head), read implies delivered, sending moves the
//!   sender's pointers, new members start at (joined seq − 1);
//! - receipt counts and reader names under concurrent `markRead` /
//!   `markDelivered` from many members equal a brute-force count, in the
//!   pushes to the senders and in `readers` replies;
//! - coalescing: a burst of 2,000 members marking read yields a bounded
//!   number of `receipts` pushes to the sender, the last one with the exact
//!   counts; non-senders get none;
//! - reader names in small groups, counts only past the detail limit;
//! - 1:1 read status (sent, delivered, read);
//! - typing: throttled per user per group, never stored, never answered;
//! - presence: two devices, a silent session expiring after the TTL, a
//!   heartbeat keeping it online, last-seen via the operator endpoint;
//! - pointers and last-seen across a clean restart (and `ok` meaning
//!   "written" across a kill -9);
//! - across three nodes ([`tests::cluster`]): a user's two devices on two
//!   nodes watched from the third, for each node holding the presence;
//!   receipts and typing between nodes.
//!
//! The harness's [`tests::NodeConfig`] has no `[tuning]` section and no
//! `receipts_detail_limit`, so the single-node tests start their own nodes
//! ([`Node`]): the same binary, a config file of their own, a temp dir,
//! SIGTERM on drop. The cluster test uses the harness's defaults.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tests::client::ClientOptions;
use tests::cluster::{Cluster, ClusterOptions};
use tests::v1::{self, client_frame::Kind as Req, server_frame::Kind};
use tests::{Client, Mode, placement, unique};
use tests::{PUSH_WAIT, user};
use tokio::time::Instant;

/// The default `[tuning] receipts_interval_ms` (the tests keep it).
const RECEIPTS_INTERVAL: Duration = Duration::from_millis(500);

/// Long enough for any coalesced receipts push to have gone out after the
/// last pointer moved (interval + pointer flush + scheduling slack).
const RECEIPTS_SETTLE: Duration = Duration::from_millis(2_000);

/// Starts each start's section of a node's log.
const START_MARKER: &str = "=== receipts_presence: start #";

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// A node with a config of this file's own
// ---------------------------------------------------------------------------

/// Config values of a [`Node`] beyond the fixed ones: `[limits]` and
/// `[tuning]` keys (later entries win).
#[derive(Debug, Clone, Default)]
struct Settings {
    limits: Vec<(&'static str, u64)>,
    tuning: Vec<(&'static str, u64)>,
}

impl Settings {
    fn limit(mut self, key: &'static str, v: u64) -> Self {
        self.limits.push((key, v));
        self
    }

    fn tuning(mut self, key: &'static str, v: u64) -> Self {
        self.tuning.push((key, v));
        self
    }
}

/// One `chat-node` process with a config written by this file.
struct Node {
    dir: Option<TempDir>,
    root: PathBuf,
    addr: SocketAddr,
    secret: String,
    settings: Settings,
    child: Option<Child>,
    bin: PathBuf,
    starts: u32,
}

impl Node {
    async fn start(settings: Settings) -> Result<Self> {
        let bin = tests::node::node_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("chat-e2e-rp-")
            .tempdir()
            .context("temp dir")?;
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join("data"))?;
        let mut node = Node {
            dir: Some(dir),
            root,
            addr: tests::node::free_addr()?,
            secret: unique("receipts-presence-secret-"),
            settings,
            child: None,
            bin,
            starts: 0,
        };
        node.spawn(false).await?;
        Ok(node)
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("node.log")
    }

    fn toml(&self) -> String {
        let mut limits: BTreeMap<&str, u64> = BTreeMap::from([
            ("rate_per_sec", 100_000),
            ("rate_burst", 100_000),
            ("max_members", 12_000),
            ("max_connections", 12_000),
        ]);
        limits.extend(self.settings.limits.iter().cloned());
        let tuning: BTreeMap<&str, u64> = self.settings.tuning.iter().cloned().collect();
        let mut t = format!(
            "[node]\nname = \"node1\"\nlisten = \"{addr}\"\ndata_dir = {data:?}\n\n\
             [auth]\njwt_secret = {secret:?}\n\n\
             [storage]\nengine = \"embedded\"\nsync = \"normal\"\n\n[limits]\n",
            addr = self.addr,
            data = self.root.join("data").display().to_string(),
            secret = self.secret,
        );
        for (k, v) in limits {
            t.push_str(&format!("{k} = {v}\n"));
        }
        t.push_str("\n[tuning]\n");
        for (k, v) in tuning {
            t.push_str(&format!("{k} = {v}\n"));
        }
        t
    }

    /// Spawns the binary (on the same port when `keep_port`, retrying on
    /// fresh ports when the port was taken) and waits for `/healthz`.
    async fn spawn(&mut self, keep_port: bool) -> Result<()> {
        let mut last = None;
        for attempt in 0..5 {
            if attempt > 0 || !keep_port {
                self.addr = tests::node::free_addr()?;
            }
            match self.spawn_once().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.stop(Duration::from_secs(5));
                    let log = self.log_text();
                    let this_start = tests::node::since_last(&log, START_MARKER);
                    if !tests::node::is_port_collision(this_start) {
                        let tail = self.log_tail(40);
                        return Err(e.context(format!(
                            "node failed to start:\n{this_start}\n--- log tail ---\n{tail}"
                        )));
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
    }

    async fn spawn_once(&mut self) -> Result<()> {
        let config = self.root.join("node.toml");
        fs::write(&config, self.toml())?;
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        use std::io::Write as _;
        writeln!(log, "{START_MARKER}{} on {} ===", self.starts, self.addr)?;
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(&self.root)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + tests::STARTUP_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("node exited during startup with {status}");
            }
            if let Ok(r) = tests::http::get(self.addr, "/healthz", Duration::from_secs(1)).await
                && r.status == 200
            {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "node not ready in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default()
    }

    fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.child.as_ref().context("node not running")?.id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?
            .success();
        ensure!(ok, "kill -{sig} {pid} failed");
        Ok(())
    }

    /// SIGTERM, wait up to `deadline`, then SIGKILL. Returns whether it
    /// exited by itself with status 0.
    fn stop(&mut self, deadline: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Ok(Some(s)) = child.try_wait() {
            return s.success();
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let end = std::time::Instant::now() + deadline;
        while std::time::Instant::now() < end {
            if let Ok(Some(s)) = child.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// A clean restart: SIGTERM, wait for exit 0, start again (same port if
    /// free, same data dir, same config).
    async fn restart(&mut self) -> Result<()> {
        self.signal("TERM")?;
        let mut child = self.child.take().context("not running")?;
        let deadline = Instant::now() + tests::SHUTDOWN_DEADLINE;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("node did not exit after SIGTERM:\n{}", self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(
            status.success(),
            "clean shutdown exited with {status}:\n{}",
            self.log_tail(40)
        );
        self.spawn(true).await
    }

    /// kill -9, then start again.
    async fn crash_and_restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        self.spawn(true).await
    }

    fn token(&self, user: &str) -> String {
        tests::auth::token(&self.secret, user)
    }

    async fn connect_mode(&self, user: &str, mode: Mode) -> Result<Client> {
        Client::connect_addr(self.addr, user, &self.token(user), ClientOptions::new(mode)).await
    }

    async fn connect(&self, user: &str) -> Result<Client> {
        self.connect_mode(user, Mode::Json).await
    }

    async fn connect_binary(&self, user: &str) -> Result<Client> {
        self.connect_mode(user, Mode::Binary).await
    }

    /// `GET /admin/presence?user=U` with an operator token.
    async fn admin_presence(&self, user: &str) -> Result<AdminPresence> {
        admin_presence(self.addr, &self.secret, user).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let clean = self.stop(tests::SHUTDOWN_DEADLINE);
        if !clean {
            eprintln!("receipts_presence: node {} did not exit cleanly", self.addr);
        }
        eprintln!(
            "---- node {} log tail ({}) ----\n{}\n---- end of node log ----",
            self.addr,
            self.log_path().display(),
            self.log_tail(30)
        );
        let keep = std::thread::panicking() || std::env::var_os("CHAT_TEST_KEEP_DIRS").is_some();
        if keep && let Some(d) = self.dir.take() {
            eprintln!("receipts_presence: kept {}", d.keep().display());
        }
    }
}

/// What `GET /admin/presence` answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdminPresence {
    user_id: String,
    status: String,
    last_seen_ms: u64,
}

async fn admin_presence(addr: SocketAddr, secret: &str, user: &str) -> Result<AdminPresence> {
    let token = tests::auth::operator_token(secret);
    let auth = format!("Bearer {token}");
    let r = tests::http::request(
        addr,
        "GET",
        &format!("/admin/presence?user={user}"),
        &[("Authorization", auth.as_str())],
        b"",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        r.status == 200,
        "GET /admin/presence?user={user}: {} {}",
        r.status,
        r.body
    );
    serde_json::from_str(&r.body).with_context(|| format!("admin presence body {:?}", r.body))
}

// ---------------------------------------------------------------------------
// Push helpers
// ---------------------------------------------------------------------------

fn receipts_of<'a>(f: &'a v1::ServerFrame, gid: &str) -> Option<&'a v1::Receipts> {
    match &f.kind {
        Some(Kind::Receipts(r)) if f.id == 0 && r.group_id == gid => Some(r),
        _ => None,
    }
}

fn into_receipts(f: v1::ServerFrame) -> v1::Receipts {
    match f.kind {
        Some(Kind::Receipts(r)) => r,
        other => panic!("not a receipts frame: {other:?}"),
    }
}

/// The next `receipts` push of `gid` within `timeout`.
async fn next_receipts(
    cl: &mut Client,
    gid: &str,
    timeout: Duration,
) -> Result<Option<v1::Receipts>> {
    Ok(cl
        .next_frame_matching(timeout, |f| receipts_of(f, gid).is_some())
        .await?
        .map(into_receipts))
}

/// Every `receipts` push of `gid` until none came for `quiet`.
async fn drain_receipts(cl: &mut Client, gid: &str, quiet: Duration) -> Result<Vec<v1::Receipts>> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        match next_receipts(cl, gid, quiet).await? {
            Some(r) => out.push(r),
            None => return Ok(out),
        }
    }
    bail!("{}: endless receipts pushes", cl.user())
}

/// Waits for a `receipts` push of `gid` for which `pred` holds; pushes that
/// do not match are skipped (and returned in the error).
async fn wait_receipts(
    cl: &mut Client,
    gid: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&v1::Receipts) -> bool,
) -> Result<v1::Receipts> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_receipts(cl, gid, left).await? {
            Some(r) if pred(&r) => return Ok(r),
            Some(r) => seen.push(r),
            None => bail!(
                "{}: no receipts push with {what} within {timeout:?}; got {seen:?}",
                cl.user()
            ),
        }
    }
}

fn seq_receipt(r: &v1::Receipts, seq: u64) -> Option<&v1::SeqReceipt> {
    r.seqs.iter().find(|s| s.seq == seq)
}

async fn readers(cl: &mut Client, gid: &str, seq: u64) -> Result<v1::ReadersReply> {
    match cl
        .call(Req::Readers(v1::Readers {
            group_id: gid.to_string(),
            seq,
        }))
        .await?
    {
        Kind::Readers(r) => Ok(r),
        other => bail!("readers: unexpected reply {other:?}"),
    }
}

/// Sends a mark without waiting for its reply.
async fn send_mark(cl: &mut Client, gid: &str, seq: u64, read: bool) -> Result<u64> {
    let group_id = gid.to_string();
    let kind = if read {
        Req::MarkRead(v1::MarkRead { group_id, seq })
    } else {
        Req::MarkDelivered(v1::MarkDelivered { group_id, seq })
    };
    cl.send_request(kind).await
}

async fn subscribe(cl: &mut Client, users: &[&str]) -> Result<()> {
    cl.call_ok(Req::SubscribePresence(v1::SubscribePresence {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
    }))
    .await
}

fn presence_of<'a>(f: &'a v1::ServerFrame, user: &str) -> Option<&'a v1::Presence> {
    match &f.kind {
        Some(Kind::Presence(p)) if f.id == 0 && p.user_id == user => Some(p),
        _ => None,
    }
}

fn status(p: &v1::Presence) -> v1::PresenceStatus {
    v1::PresenceStatus::try_from(p.status).unwrap_or(v1::PresenceStatus::Unspecified)
}

/// The next `presence` push about `user` within `timeout`.
async fn next_presence(
    cl: &mut Client,
    user: &str,
    timeout: Duration,
) -> Result<Option<v1::Presence>> {
    Ok(cl
        .next_frame_matching(timeout, |f| presence_of(f, user).is_some())
        .await?
        .and_then(|f| match f.kind {
            Some(Kind::Presence(p)) => Some(p),
            _ => None,
        }))
}

async fn expect_presence(
    cl: &mut Client,
    user: &str,
    want: v1::PresenceStatus,
    timeout: Duration,
    what: &str,
) -> Result<v1::Presence> {
    let p = next_presence(cl, user, timeout)
        .await?
        .with_context(|| format!("{what}: no presence push about {user} within {timeout:?}"))?;
    ensure!(
        status(&p) == want,
        "{what}: expected {want:?} for {user}, got {p:?}"
    );
    Ok(p)
}

async fn expect_no_presence(cl: &mut Client, user: &str, wait: Duration, what: &str) -> Result<()> {
    if let Some(p) = next_presence(cl, user, wait).await? {
        bail!("{what}: unexpected presence push {p:?}");
    }
    Ok(())
}

/// Waits `total` while `cl` sends a heartbeat every `every` (so its session
/// stays active); frames that arrive meanwhile stay in its inbox.
async fn heartbeat_for(cl: &mut Client, total: Duration, every: Duration) -> Result<()> {
    let end = Instant::now() + total;
    while Instant::now() < end {
        cl.heartbeat().await?;
        let left = end.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(every)).await;
    }
    Ok(())
}

fn typing_req(gid: &str) -> Req {
    Req::Typing(v1::Typing {
        group_id: gid.to_string(),
    })
}

fn is_typing_from(f: &v1::ServerFrame, gid: &str, from: &str) -> bool {
    matches!(&f.kind, Some(Kind::Typing(t)) if f.id == 0 && t.group_id == gid && t.user_id == from)
}

/// How many typing pushes from `from` in `gid` reach `cl` within `wait`.
async fn count_typing(cl: &mut Client, gid: &str, from: &str, wait: Duration) -> Result<usize> {
    let deadline = Instant::now() + wait;
    let mut n = 0;
    for _ in 0..10_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match cl
            .next_frame_matching(left, |f| is_typing_from(f, gid, from))
            .await?
        {
            Some(_) => n += 1,
            None => break,
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Brute-force receipts model
// ---------------------------------------------------------------------------

/// Every member's pointers as the test drove them.
#[derive(Debug, Clone, Default)]
struct Model {
    /// user → (delivered, read).
    ptrs: BTreeMap<String, (u64, u64)>,
    head: u64,
}

impl Model {
    fn join(&mut self, user: &str, joined_seq: u64) {
        let p = joined_seq.saturating_sub(1);
        self.ptrs.insert(user.to_string(), (p, p));
    }

    fn mark(&mut self, user: &str, seq: u64, read: bool) {
        let seq = seq.min(self.head);
        let p = self.ptrs.get_mut(user).expect("member");
        p.0 = p.0.max(seq);
        if read {
            p.1 = p.1.max(seq);
        }
    }

    fn sent(&mut self, user: &str, seq: u64) {
        self.head = self.head.max(seq);
        self.mark(user, seq, true);
    }

    fn read_by(&self, seq: u64) -> u32 {
        self.ptrs.values().filter(|p| p.1 >= seq).count() as u32
    }

    fn delivered_to(&self, seq: u64) -> u32 {
        self.ptrs.values().filter(|p| p.0 >= seq).count() as u32
    }

    /// Reader ids of `seq`, sorted.
    fn readers(&self, seq: u64) -> Vec<String> {
        self.ptrs
            .iter()
            .filter(|(_, p)| p.1 >= seq)
            .map(|(u, _)| u.clone())
            .collect()
    }

    fn all_read(&self) -> u64 {
        self.ptrs.values().map(|p| p.1).min().unwrap_or(0)
    }

    fn all_delivered(&self) -> u64 {
        self.ptrs.values().map(|p| p.0).min().unwrap_or(0)
    }
}

/// Checks `sync` of `cl` for `gid` against the model.
async fn check_sync(cl: &mut Client, gid: &str, model: &Model, what: &str) -> Result<()> {
    let g = cl
        .sync_group(gid)
        .await?
        .with_context(|| format!("{what}: {} does not list {gid}", cl.user()))?;
    let (d, r) = model.ptrs[cl.user()];
    ensure!(
        g.head_seq == model.head
            && g.read_seq == r
            && g.delivered_seq == d
            && g.unread == model.head - r,
        "{what}: sync of {} says head {} read {} delivered {} unread {}; expected head {} read {r} delivered {d} unread {}",
        cl.user(),
        g.head_seq,
        g.read_seq,
        g.delivered_seq,
        g.unread,
        model.head,
        model.head - r
    );
    Ok(())
}

/// [`check_sync`], retried for up to a second: a sender's own pointer move
/// is written with the next pointer flush, not with the message (see
/// `a_sender_has_read_its_message_once_it_is_sent`).
async fn check_sync_soon(cl: &mut Client, gid: &str, model: &Model, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match check_sync(cl, gid, model, what).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Checks one seq's description (push or `readers` reply) against the model.
/// `readers` agrees with the model (counts and names) for every seq.
async fn check_all_readers(cl: &mut Client, gid: &str, model: &Model, what: &str) -> Result<()> {
    for seq in 1..=model.head {
        let r = readers(cl, gid, seq).await?;
        check_seq(
            what,
            seq,
            r.read_by,
            r.delivered_to,
            &r.readers,
            model,
            true,
        )?;
    }
    Ok(())
}

fn check_seq(
    what: &str,
    seq: u64,
    read_by: u32,
    delivered_to: u32,
    names: &[String],
    model: &Model,
    detail: bool,
) -> Result<()> {
    let want_names = if detail {
        model.readers(seq)
    } else {
        Vec::new()
    };
    ensure!(
        read_by == model.read_by(seq) && delivered_to == model.delivered_to(seq),
        "{what}: seq {seq}: readBy {read_by} deliveredTo {delivered_to}, brute force readBy {} deliveredTo {}",
        model.read_by(seq),
        model.delivered_to(seq)
    );
    let mut got = names.to_vec();
    got.sort();
    ensure!(
        got == want_names,
        "{what}: seq {seq}: readers {got:?}, brute force {want_names:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Pointers
// ---------------------------------------------------------------------------

/// Pointers only move forward whatever is asked, from one device or two;
/// seqs past the head are clamped; read implies delivered; a sender's
/// pointers move to its message; a new member starts at (joined seq − 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointers_never_move_backwards() -> Result<()> {
    let node = Node::start(Settings::default()).await?;
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    let mut ca = node.connect(&a).await?;
    let mut cb1 = node.connect(&b).await?;
    let mut cb2 = node.connect_binary(&b).await?; // bob's second device
    let gid = ca.create_group("pointers", &[&b]).await?;
    let mut model = Model {
        head: 1,
        ..Model::default()
    };
    model.join(&a, 1);
    model.join(&b, 1);
    check_sync(&mut ca, &gid, &model, "after create").await?;
    check_sync(&mut cb1, &gid, &model, "after create").await?;
    for i in 0..10 {
        let s = ca.send(&gid, &format!("a-{i}"), &format!("m{i}")).await?;
        model.sent(&a, s.seq);
    }
    ensure!(model.head == 11, "head {}", model.head);
    check_sync_soon(&mut ca, &gid, &model, "sender after sending").await?;

    // A random walk of marks from both devices, some backwards, some past
    // the head; sync after each equals the running maximum.
    let seed: u64 = rand::random();
    eprintln!("pointers_never_move_backwards: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for step in 0..40 {
        let seq = rng.random_range(0..=model.head + 3);
        let read = rng.random_bool(0.5);
        let cl = if rng.random_bool(0.5) {
            &mut cb1
        } else {
            &mut cb2
        };
        if read {
            cl.mark_read(&gid, seq).await?;
        } else {
            cl.mark_delivered(&gid, seq).await?;
        }
        model.mark(&b, seq, read);
        let what = format!(
            "step {step}: mark{} {seq}",
            if read { "Read" } else { "Delivered" }
        );
        check_sync(&mut cb1, &gid, &model, &what).await?;
    }

    // Both devices at once, pipelined: the result is the maximum.
    for _ in 0..5 {
        let hi = model.head;
        let id1 = cb1
            .send_request(Req::MarkRead(v1::MarkRead {
                group_id: gid.clone(),
                seq: hi,
            }))
            .await?;
        let id2 = cb2
            .send_request(Req::MarkRead(v1::MarkRead {
                group_id: gid.clone(),
                seq: 1,
            }))
            .await?;
        for (cl, id) in [(&mut cb1, id1), (&mut cb2, id2)] {
            tests::client::reply_kind(cl.wait_reply(id).await?)?;
        }
        model.mark(&b, hi, true);
        check_sync(&mut cb2, &gid, &model, "two devices at once").await?;
        let s = ca.send(&gid, &unique("a-"), "more").await?;
        model.sent(&a, s.seq);
    }

    // Past the head: clamped, and later messages are unread.
    cb1.mark_read(&gid, u64::MAX).await?;
    model.mark(&b, u64::MAX, true);
    check_sync(&mut cb1, &gid, &model, "markRead u64::MAX").await?;
    let s = ca.send(&gid, "after-max", "unread now").await?;
    model.sent(&a, s.seq);
    check_sync(&mut cb1, &gid, &model, "a message after the clamp").await?;
    ensure!(
        cb1.sync_group(&gid).await?.map(|g| g.unread) == Some(1),
        "the message after a clamped markRead must be unread"
    );

    // A new member starts at (joined seq − 1); its later sends move its
    // pointers to them.
    ca.add_members(&gid, &[&c]).await?;
    model.head += 1; // MEMBERS_ADDED
    model.join(&c, model.head);
    let mut cc = node.connect(&c).await?;
    check_sync(&mut cc, &gid, &model, "new member").await?;
    cc.mark_read(&gid, 1).await?; // lower than its start: no-op
    check_sync(&mut cc, &gid, &model, "new member marks an old seq").await?;
    let s = cc.send(&gid, "c-1", "hello").await?;
    model.sent(&c, s.seq);
    check_sync_soon(&mut cc, &gid, &model, "new member sent").await?;
    check_sync(&mut cb2, &gid, &model, "bob at the end").await?;
    check_sync_soon(&mut ca, &gid, &model, "alice at the end").await?;

    // readers agrees with the model for every seq.
    check_all_readers(&mut ca, &gid, &model, "readers").await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Receipts
// ---------------------------------------------------------------------------

/// Members of one group.
const CONCURRENT_MEMBERS: usize = 40;
/// Of which this many send messages.
const CONCURRENT_SENDERS: usize = 4;

/// Many members move their pointers at once (reads and deliveries, some
/// backwards, one member from two devices): `sync`, `readers` and the
/// coalesced pushes to the senders all equal a brute-force count; per-seq
/// counts in the successive pushes never decrease; members who neither sent
/// nor asked get no receipts; a `readers` caller becomes a watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_marks_match_a_brute_force_count() -> Result<()> {
    let node = Node::start(Settings::default()).await?;
    let users: Vec<String> = (0..CONCURRENT_MEMBERS)
        .map(|i| user(&format!("m{i:02}")))
        .collect();
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let mode = if i % 2 == 0 { Mode::Binary } else { Mode::Json };
        clients.push(node.connect_mode(u, mode).await?);
    }
    // A second device of member 5.
    let twin = node.connect_binary(&users[5]).await?;
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let gid = clients[0].create_group("concurrent", &others).await?;
    let mut model = Model {
        head: 1,
        ..Model::default()
    };
    for u in &users {
        model.join(u, 1);
    }
    // Senders 0..CONCURRENT_SENDERS write 3 messages each, in turn.
    let mut sent_by: BTreeMap<u64, String> = BTreeMap::new();
    for round in 0..3 {
        for (i, cl) in clients.iter_mut().enumerate().take(CONCURRENT_SENDERS) {
            let s = cl.send(&gid, &format!("s{i}-{round}"), "read me").await?;
            model.sent(&users[i], s.seq);
            sent_by.insert(s.seq, users[i].clone());
        }
    }
    let head = model.head;
    ensure!(head == 1 + 3 * CONCURRENT_SENDERS as u64, "head {head}");

    // Every member (and the twin) runs a random sequence of marks at once.
    let seed: u64 = rand::random();
    eprintln!("concurrent_marks_match_a_brute_force_count: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plans: Vec<Vec<(u64, bool)>> = Vec::new();
    for _ in 0..=clients.len() {
        let n = rng.random_range(2..=6);
        plans.push(
            (0..n)
                .map(|_| (rng.random_range(0..=head + 2), rng.random_bool(0.6)))
                .collect(),
        );
    }
    for (i, plan) in plans.iter().enumerate() {
        let u = if i < users.len() {
            &users[i]
        } else {
            &users[5]
        };
        for (seq, read) in plan {
            model.mark(u, *seq, *read);
        }
    }
    let mut all: Vec<Client> = clients;
    all.push(twin);
    let tasks: Vec<_> = all
        .into_iter()
        .zip(plans)
        .map(|(mut cl, plan)| {
            let gid = gid.clone();
            tokio::spawn(async move {
                for (seq, read) in plan {
                    if read {
                        cl.mark_read(&gid, seq).await?;
                    } else {
                        cl.mark_delivered(&gid, seq).await?;
                    }
                }
                anyhow::Ok(cl)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await??);
    }
    let twin = all.pop().context("twin")?;
    let mut clients = all;
    drop(twin);

    // sync of every member equals the model.
    for cl in clients.iter_mut() {
        check_sync_soon(cl, &gid, &model, "after the concurrent marks").await?;
    }

    // The pushes each sender got: counts never decrease from one push to
    // the next, and the last description of each of its messages is exact.
    for (i, cl) in clients.iter_mut().enumerate().take(CONCURRENT_SENDERS) {
        let pushes = drain_receipts(cl, &gid, RECEIPTS_SETTLE).await?;
        let mine: Vec<u64> = sent_by
            .iter()
            .filter(|(_, u)| **u == users[i])
            .map(|(s, _)| *s)
            .collect();
        let mut last: HashMap<u64, (u32, u32)> = HashMap::new();
        let (mut all_read, mut all_delivered) = (0, 0);
        for p in &pushes {
            ensure!(
                p.all_read_seq >= all_read && p.all_delivered_seq >= all_delivered,
                "{}: allReadSeq/allDeliveredSeq went back: {pushes:?}",
                users[i]
            );
            (all_read, all_delivered) = (p.all_read_seq, p.all_delivered_seq);
            ensure!(
                p.all_read_seq <= p.all_delivered_seq,
                "allReadSeq past allDeliveredSeq: {p:?}"
            );
            for s in &p.seqs {
                ensure!(s.read_by <= s.delivered_to, "readBy > deliveredTo: {p:?}");
                let prev = last.insert(s.seq, (s.read_by, s.delivered_to));
                if let Some((r, d)) = prev {
                    ensure!(
                        s.read_by >= r && s.delivered_to >= d,
                        "{}: counts of seq {} went back ({r},{d}) -> ({},{}): {pushes:?}",
                        users[i],
                        s.seq,
                        s.read_by,
                        s.delivered_to
                    );
                }
            }
        }
        ensure!(
            all_read <= model.all_read() && all_delivered <= model.all_delivered(),
            "pushed allReadSeq {all_read} / allDeliveredSeq {all_delivered} beyond the brute force {} / {}",
            model.all_read(),
            model.all_delivered()
        );
        for seq in &mine {
            let p = pushes
                .iter()
                .rev()
                .find(|p| seq_receipt(p, *seq).is_some())
                .with_context(|| {
                    format!(
                        "{} sent seq {seq} but no receipts push described it: {pushes:?}",
                        users[i]
                    )
                })?;
            let s = seq_receipt(p, *seq).expect("found");
            check_seq(
                &format!("last push to {}", users[i]),
                *seq,
                s.read_by,
                s.delivered_to,
                &s.readers,
                &model,
                true,
            )?;
        }
    }
    // Members who neither sent nor asked for readers got no receipts.
    for cl in clients.iter_mut().skip(CONCURRENT_SENDERS).take(8) {
        if let Some(r) = next_receipts(cl, &gid, Duration::from_millis(50)).await? {
            bail!(
                "{} (not a sender, not a watcher) got receipts {r:?}",
                cl.user()
            );
        }
    }

    // readers for every seq, asked by a member who sent nothing.
    let watcher = CONCURRENT_MEMBERS - 1;
    for seq in 1..=head {
        let r = readers(&mut clients[watcher], &gid, seq).await?;
        ensure!(r.group_id == gid && r.seq == seq, "readers reply {r:?}");
        check_seq(
            "readers",
            seq,
            r.read_by,
            r.delivered_to,
            &r.readers,
            &model,
            true,
        )?;
    }
    // Now a watcher: when everyone reads everything it hears about it,
    // with allReadSeq = head and everyone listed.
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut cl| {
            let gid = gid.clone();
            tokio::spawn(async move {
                cl.mark_read(&gid, head).await?;
                anyhow::Ok(cl)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await??);
    }
    for u in &users {
        model.mark(u, head, true);
    }
    let last = wait_receipts(
        &mut clients[watcher],
        &gid,
        PUSH_WAIT,
        "everyone read the head",
        |r| r.all_read_seq == head,
    )
    .await?;
    ensure!(last.all_delivered_seq == head, "final push {last:?}");
    let s = seq_receipt(&last, head).context("final push lacks the head")?;
    check_seq(
        "watcher's final push",
        head,
        s.read_by,
        s.delivered_to,
        &s.readers,
        &model,
        true,
    )?;
    ensure!(
        s.read_by as usize == CONCURRENT_MEMBERS,
        "readBy {} != {CONCURRENT_MEMBERS}",
        s.read_by
    );
    Ok(())
}

/// Members of the burst group besides the sender (`RP_BURST_MEMBERS`
/// overrides it).
const BURST_MEMBERS: usize = 2_000;

fn burst_members() -> usize {
    std::env::var("RP_BURST_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BURST_MEMBERS)
}

/// 2,000 members, each on a connection of its own, mark the sender's message
/// read in one burst: the sender gets at most (window / receipts interval) + 2
/// `receipts` pushes over the burst, counts only (the group is past the
/// detail limit), never decreasing, the last one exact (readBy = every
/// member); the members get none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_reads_is_coalesced() -> Result<()> {
    let n = burst_members();
    let node = Node::start(Settings::default()).await?;
    let sender = user("sender");
    let tag = unique("");
    let members: Vec<String> = (0..n).map(|i| format!("b{i:04}-{}", &tag[..8])).collect();
    let mut cs = node.connect_binary(&sender).await?;
    // createGroup and addMembers take at most 1,000 users each.
    let mut chunks = members.chunks(999);
    let first: Vec<&str> = chunks
        .next()
        .context("members")?
        .iter()
        .map(String::as_str)
        .collect();
    let gid = cs.create_group("burst", &first).await?;
    for chunk in chunks {
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        cs.add_members(&gid, &ids).await?;
    }
    let msg = cs.send(&gid, "the-one", "please read").await?;
    let seq = msg.seq;
    let g = cs
        .sync_group(&gid)
        .await?
        .context("sender lacks the group")?;
    ensure!(
        g.member_count as usize == n + 1 && g.head_seq == seq,
        "group summary {g:?}"
    );
    // Before the burst: readBy 1 (the sender), deliveredTo 1.
    let r = readers(&mut cs, &gid, seq).await?;
    ensure!(
        r.read_by == 1 && r.delivered_to == 1 && r.readers.is_empty(),
        "before the burst: {r:?} (no names past the detail limit)"
    );
    // The readers call made the sender a watcher too; let what is pending
    // go out.
    drain_receipts(&mut cs, &gid, Duration::from_millis(800)).await?;

    // Connect every member (bounded concurrency).
    let t_connect = Instant::now();
    let node_ref = &node;
    let mut clients: Vec<Client> = futures::stream::iter(members.iter())
        .map(|u| async move { node_ref.connect_binary(u).await })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    eprintln!(
        "a_burst_of_reads_is_coalesced: {n} connections in {:?}",
        t_connect.elapsed()
    );

    // The sender reads its socket on its own task, stamping each push.
    let gid2 = gid.clone();
    let reader = tokio::spawn(async move {
        let mut got: Vec<(Instant, v1::Receipts)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match next_receipts(&mut cs, &gid2, Duration::from_millis(200)).await? {
                Some(r) => {
                    let done = seq_receipt(&r, seq).is_some_and(|s| s.read_by as usize == n + 1);
                    got.push((Instant::now(), r));
                    if done {
                        // Anything after the exact count would be extra.
                        let extra = drain_receipts(&mut cs, &gid2, RECEIPTS_SETTLE).await?;
                        for r in extra {
                            got.push((Instant::now(), r));
                        }
                        return anyhow::Ok((cs, got));
                    }
                }
                None => continue,
            }
        }
        bail!("the sender never saw readBy {} ; pushes: {got:?}", n + 1)
    });

    // The burst.
    let t0 = Instant::now();
    let gid3 = gid.clone();
    let results: Vec<Result<()>> = futures::stream::iter(clients.iter_mut())
        .map(|cl| {
            let gid = gid3.clone();
            async move { cl.mark_read(&gid, seq).await }
        })
        .buffer_unordered(n)
        .collect()
        .await;
    let burst = t0.elapsed();
    for r in results {
        r?;
    }
    let (mut cs, pushes) = reader.await??;
    let last_at = pushes
        .last()
        .map(|(t, _)| *t)
        .context("no receipts push at all")?;
    let window = last_at.saturating_duration_since(t0);
    let bound = (window.as_millis() / RECEIPTS_INTERVAL.as_millis()) as usize + 2;
    eprintln!(
        "a_burst_of_reads_is_coalesced: {n} markRead acknowledged in {burst:?}; {} receipts \
         pushes to the sender over {window:?} (bound {bound})",
        pushes.len()
    );
    ensure!(
        pushes.len() <= bound,
        "{} receipts pushes over {window:?} with a {RECEIPTS_INTERVAL:?} interval (bound {bound})",
        pushes.len()
    );
    let mut prev = (0, 0);
    for (_, p) in &pushes {
        let s = seq_receipt(p, seq).with_context(|| format!("push without seq {seq}: {p:?}"))?;
        ensure!(
            s.readers.is_empty(),
            "reader names in a group of {}: {p:?}",
            n + 1
        );
        ensure!(
            s.read_by >= prev.0 && s.delivered_to >= prev.1 && s.read_by <= s.delivered_to,
            "counts went back or readBy > deliveredTo: {prev:?} then {s:?}"
        );
        prev = (s.read_by, s.delivered_to);
    }
    let (_, last) = pushes.last().expect("non-empty");
    let s = seq_receipt(last, seq).expect("checked");
    ensure!(
        s.read_by as usize == n + 1 && s.delivered_to as usize == n + 1,
        "final push {s:?}, expected readBy = deliveredTo = {}",
        n + 1
    );
    ensure!(
        last.all_read_seq == seq && last.all_delivered_seq == seq,
        "final push allReadSeq {} allDeliveredSeq {} (expected {seq})",
        last.all_read_seq,
        last.all_delivered_seq
    );
    let r = readers(&mut cs, &gid, seq).await?;
    ensure!(
        r.read_by as usize == n + 1 && r.delivered_to as usize == n + 1 && r.readers.is_empty(),
        "readers after the burst: {r:?}"
    );

    // Members (not senders, not watchers) got no receipts; their pointers
    // were written.
    let step = (n / 25).max(1);
    for cl in clients.iter_mut().step_by(step) {
        if let Some(r) = next_receipts(cl, &gid, Duration::from_millis(20)).await? {
            bail!("member {} got receipts {r:?}", cl.user());
        }
        let g = cl
            .sync_group(&gid)
            .await?
            .context("member lacks the group")?;
        ensure!(
            g.read_seq == seq && g.delivered_seq == seq && g.unread == 0,
            "member {} after the burst: {g:?}",
            cl.user()
        );
    }
    Ok(())
}

/// `receipts` pushes and `readers` replies name the readers in groups of at
/// most `receipts_detail_limit` members and give counts only above it: with
/// the default limit (100: groups of 100 and 101) and a configured one (5:
/// groups of 5 and 6). Also: `readers` errors, and a `readers` caller
/// becomes a watcher while a silent member gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_names_up_to_the_detail_limit_counts_above() -> Result<()> {
    let default_node = Node::start(Settings::default()).await?;
    let small_node = Node::start(Settings::default().limit("receipts_detail_limit", 5)).await?;
    for (node, limit) in [(&default_node, 100usize), (&small_node, 5)] {
        for size in [limit, limit + 1] {
            let what = format!("limit {limit}, group of {size}");
            let a = user("author");
            let readers_ids: Vec<String> = (0..2).map(|i| user(&format!("r{i}"))).collect();
            let watcher = user("watcher");
            let silent = user("silent");
            let mut members: Vec<String> = readers_ids.clone();
            members.push(watcher.clone());
            members.push(silent.clone());
            while members.len() < size - 1 {
                members.push(user("idle"));
            }
            let mut ca = node.connect(&a).await?;
            let ids: Vec<&str> = members.iter().map(String::as_str).collect();
            let gid = ca.create_group("detail", &ids).await?;
            let mut model = Model {
                head: 1,
                ..Model::default()
            };
            model.join(&a, 1);
            for m in &members {
                model.join(m, 1);
            }
            let mut cw = node.connect(&watcher).await?;
            let mut cq = node.connect_binary(&silent).await?;
            let s = ca.send(&gid, "m1", "hello").await?;
            model.sent(&a, s.seq);
            let detail = size <= limit;

            // Errors first.
            for bad in [0, s.seq + 1] {
                tests::check::is_error(
                    readers(&mut cw, &gid, bad).await,
                    v1::ErrorCode::NotFound,
                    &format!("{what}: readers of seq {bad}"),
                )?;
            }
            let mut outsider = node.connect(&user("outsider")).await?;
            tests::check::is_error(
                readers(&mut outsider, &gid, s.seq).await,
                v1::ErrorCode::Forbidden,
                &format!("{what}: readers asked by a non-member"),
            )?;
            // The watcher asks once (now it hears about changes).
            let r = readers(&mut cw, &gid, s.seq).await?;
            check_seq(
                &what,
                s.seq,
                r.read_by,
                r.delivered_to,
                &r.readers,
                &model,
                detail,
            )?;

            for (i, rid) in readers_ids.iter().enumerate() {
                let mut cr = node.connect(rid).await?;
                if i == 0 {
                    cr.mark_delivered(&gid, s.seq).await?;
                    model.mark(rid, s.seq, false);
                } else {
                    cr.mark_read(&gid, s.seq).await?;
                    model.mark(rid, s.seq, true);
                }
            }
            let want = (model.read_by(s.seq), model.delivered_to(s.seq));
            for cl in [&mut ca, &mut cw] {
                let p = wait_receipts(cl, &gid, PUSH_WAIT, "the final counts", |p| {
                    seq_receipt(p, s.seq).is_some_and(|x| (x.read_by, x.delivered_to) == want)
                })
                .await
                .with_context(|| format!("{what}: push to {}", cl.user()))?;
                let x = seq_receipt(&p, s.seq).expect("matched");
                check_seq(
                    &format!("{what}: push to {}", cl.user()),
                    s.seq,
                    x.read_by,
                    x.delivered_to,
                    &x.readers,
                    &model,
                    detail,
                )?;
                ensure!(
                    p.all_read_seq == 0,
                    "{what}: allReadSeq {} with idle members",
                    p.all_read_seq
                );
            }
            let r = readers(&mut ca, &gid, s.seq).await?;
            check_seq(
                &what,
                s.seq,
                r.read_by,
                r.delivered_to,
                &r.readers,
                &model,
                detail,
            )?;
            if let Some(p) = next_receipts(&mut cq, &gid, Duration::from_millis(300)).await? {
                bail!("{what}: a member who neither sent nor asked got receipts {p:?}");
            }
        }
    }
    Ok(())
}

/// A 1:1 chat: the sender sees sent (the reply), delivered (deliveredTo 2)
/// and read (readBy 2, the peer named), by pushes and by `readers`; the
/// reader gets no receipts for a message it did not send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_shows_sent_delivered_read() -> Result<()> {
    let node = Node::start(Settings::default()).await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect_binary(&b).await?;
    let gid = ca.open_direct(&b).await?;
    ensure!(cb.open_direct(&a).await? == gid, "openDirect ids differ");
    let sent = ca.send(&gid, "hi-1", "hi bob").await?;
    let seq = sent.seq;
    ensure!(sent.group_id == gid && seq >= 1, "sent {sent:?}");
    let both = {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    };

    // Sent: only the sender has it.
    let r = readers(&mut ca, &gid, seq).await?;
    ensure!(
        r.delivered_to == 1 && r.read_by == 1 && r.readers == vec![a.clone()],
        "just sent: {r:?}"
    );
    // Delivered.
    cb.collect_messages(&gid, seq, PUSH_WAIT).await?;
    cb.mark_delivered(&gid, seq).await?;
    let p = wait_receipts(&mut ca, &gid, PUSH_WAIT, "deliveredTo 2", |p| {
        seq_receipt(p, seq).is_some_and(|s| s.delivered_to == 2)
    })
    .await?;
    let s = seq_receipt(&p, seq).expect("matched");
    ensure!(
        s.read_by == 1 && s.readers == vec![a.clone()] && p.all_delivered_seq == seq,
        "delivered, not read: {p:?}"
    );
    // Read.
    cb.mark_read(&gid, seq).await?;
    let p = wait_receipts(&mut ca, &gid, PUSH_WAIT, "readBy 2", |p| {
        seq_receipt(p, seq).is_some_and(|s| s.read_by == 2)
    })
    .await?;
    let s = seq_receipt(&p, seq).expect("matched");
    ensure!(
        s.delivered_to == 2 && s.readers == both && p.all_read_seq == seq,
        "read: {p:?}"
    );
    let r = readers(&mut ca, &gid, seq).await?;
    ensure!(
        r.read_by == 2 && r.delivered_to == 2 && r.readers == both,
        "readers {r:?}"
    );
    ensure!(
        cb.sync_group(&gid).await?.map(|g| (g.unread, g.direct)) == Some((0, true)),
        "bob's summary after reading"
    );
    if let Some(p) = next_receipts(&mut cb, &gid, Duration::from_millis(200)).await? {
        bail!("the reader got receipts for a message it did not send: {p:?}");
    }

    // And the other way round.
    let back = cb.send(&gid, "hi-2", "hi alice").await?;
    ca.collect_messages(&gid, back.seq, PUSH_WAIT).await?;
    ca.mark_read(&gid, back.seq).await?;
    let p = wait_receipts(&mut cb, &gid, PUSH_WAIT, "alice read bob's reply", |p| {
        seq_receipt(p, back.seq).is_some_and(|s| s.read_by == 2)
    })
    .await?;
    ensure!(
        seq_receipt(&p, back.seq).is_some_and(|s| s.readers == both),
        "push {p:?}"
    );
    Ok(())
}

/// Sending moves the sender's pointers to its message; `sync` right after
/// the `sent` reply must not list the sender's own message as unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_has_read_its_message_once_it_is_sent() -> Result<()> {
    let node = Node::start(Settings::default()).await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = node.connect(&a).await?;
    let gid = ca.create_group("own", &[&b]).await?;
    for i in 0..3 {
        let s = ca.send(&gid, &format!("own-{i}"), "mine").await?;
        let g = ca.sync_group(&gid).await?.context("group")?;
        ensure!(
            g.read_seq == s.seq && g.delivered_seq == s.seq && g.unread == 0,
            "sync right after `sent` seq {}: readSeq {} deliveredSeq {} unread {} \
             (the sender's pointers lag until the next pointer flush)",
            s.seq,
            g.read_seq,
            g.delivered_seq,
            g.unread
        );
    }
    Ok(())
}

/// `GET /admin/status` of a single node: the counter `key` (e.g. how many
/// group actors run).
async fn status_count(node: &Node, key: &str) -> Result<u64> {
    let token = tests::auth::operator_token(&node.secret);
    let auth = format!("Bearer {token}");
    let r = tests::http::request(
        node.addr,
        "GET",
        "/admin/status",
        &[("Authorization", auth.as_str())],
        b"",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(r.status == 200, "/admin/status: {} {}", r.status, r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    v[key].as_u64().with_context(|| format!("no {key} in {v}"))
}

/// The sender of a message hears that it was read even when the group's
/// actor went idle (and was stopped) between the send and the read, as
/// happens to any message read more than `group_idle_ms` after the group's
/// last activity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_the_sender_after_the_group_actor_idled() -> Result<()> {
    let node = Node::start(Settings::default().tuning("group_idle_ms", 600)).await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect(&b).await?;
    let gid = ca.create_group("idle", &[&b]).await?;
    let s = ca.send(&gid, "m1", "read me later").await?;
    drain_receipts(&mut ca, &gid, Duration::from_millis(700)).await?;
    // Wait until no group actor runs (bounded).
    let deadline = Instant::now() + Duration::from_secs(8);
    while status_count(&node, "groups").await? > 0 {
        ensure!(Instant::now() < deadline, "the group actor never went idle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cb.mark_read(&gid, s.seq).await?;
    let r = readers(&mut cb, &gid, s.seq).await?;
    ensure!(r.read_by == 2, "readers after the read: {r:?}");
    let p = next_receipts(&mut ca, &gid, Duration::from_secs(3)).await?;
    let p = p.with_context(|| {
        format!(
            "bob read seq {} (readers says readBy {}) but its sender got no receipts push: \
             the reloaded group actor no longer knows who sent it",
            s.seq, r.read_by
        )
    })?;
    ensure!(
        seq_receipt(&p, s.seq).is_some_and(|x| x.read_by == 2),
        "push {p:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Typing
// ---------------------------------------------------------------------------

/// Typing throttle used by the typing test.
const TYPING_THROTTLE: Duration = Duration::from_millis(1_000);

/// `typing` is forwarded to the other online members at most once per user
/// per group per throttle interval (per user and per group independently),
/// never to the typist, never answered, and never stored: history, head and
/// unread counts show no trace, and a member who connects later gets
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_throttled_and_never_stored() -> Result<()> {
    let node = Node::start(
        Settings::default().tuning("typing_throttle_ms", TYPING_THROTTLE.as_millis() as u64),
    )
    .await?;
    let (a, b, c, d) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect_binary(&b).await?;
    let mut cc = node.connect(&c).await?;
    let g1 = ca.create_group("typing-1", &[&b, &c, &d]).await?;
    let g2 = ca.create_group("typing-2", &[&b]).await?;
    let s = ca.send(&g1, "m1", "before typing").await?;
    cb.collect_messages(&g1, s.seq, PUSH_WAIT).await?;
    cc.collect_messages(&g1, s.seq, PUSH_WAIT).await?;
    let before = ca.history_all(&g1).await?;
    let sync_before = cb.sync_group(&g1).await?.context("g1")?;

    // A burst of typing from alice in g1 (well inside one throttle
    // interval), bob typing in g1 too, and alice once in g2.
    let t0 = Instant::now();
    let mut typing_ids = Vec::new();
    for _ in 0..10 {
        typing_ids.push(ca.send_request(typing_req(&g1)).await?);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    cb.send_request(typing_req(&g1)).await?;
    typing_ids.push(ca.send_request(typing_req(&g2)).await?);
    let burst = t0.elapsed();
    ensure!(
        burst < TYPING_THROTTLE / 2,
        "the burst took {burst:?}: too slow a machine for this test"
    );
    let window = TYPING_THROTTLE
        .saturating_sub(t0.elapsed())
        .saturating_sub(Duration::from_millis(100));
    let (bob_from_a, carol_from_a, carol_from_b, alice_from_b) = (
        count_typing(&mut cb, &g1, &a, window).await?,
        count_typing(&mut cc, &g1, &a, Duration::from_millis(50)).await?,
        count_typing(&mut cc, &g1, &b, Duration::from_millis(50)).await?,
        count_typing(&mut ca, &g1, &b, Duration::from_millis(50)).await?,
    );
    ensure!(
        (bob_from_a, carol_from_a, carol_from_b, alice_from_b) == (1, 1, 1, 1),
        "typing pushes within one throttle interval: bob saw alice {bob_from_a}×, carol saw \
         alice {carol_from_a}×, carol saw bob {carol_from_b}×, alice saw bob {alice_from_b}× \
         (each must be exactly 1)"
    );
    ensure!(
        count_typing(&mut cb, &g2, &a, Duration::from_millis(100)).await? == 1,
        "alice's typing in a second group is throttled separately"
    );
    ensure!(
        count_typing(&mut ca, &g1, &a, Duration::from_millis(50)).await? == 0,
        "the typist got its own typing"
    );
    // No reply to any typing frame.
    ca.heartbeat().await?;
    ensure!(
        !ca.inbox().iter().any(|f| typing_ids.contains(&f.id)),
        "a typing request got a reply"
    );

    // After the interval, one more indicator goes through.
    let wait = (t0 + TYPING_THROTTLE + Duration::from_millis(300))
        .saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    ca.send_request(typing_req(&g1)).await?;
    ca.send_request(typing_req(&g1)).await?;
    ensure!(
        count_typing(&mut cb, &g1, &a, Duration::from_millis(600)).await? == 1,
        "after the throttle interval exactly one more typing push"
    );

    // Nothing stored: same history, same head, nothing unread, no message
    // pushes; a member connecting later gets no typing.
    ensure!(
        ca.history_all(&g1).await? == before,
        "typing changed the history"
    );
    let sync_after = cb.sync_group(&g1).await?.context("g1")?;
    ensure!(
        sync_after.head_seq == sync_before.head_seq && sync_after.unread == sync_before.unread,
        "typing moved head/unread: {sync_before:?} -> {sync_after:?}"
    );
    cb.expect_no_message(&g1, Duration::from_millis(100))
        .await?;
    let mut cd = node.connect(&d).await?;
    let g = cd.sync_group(&g1).await?.context("dave's g1")?;
    ensure!(
        g.head_seq == s.seq,
        "dave sees head {} (typing stored?)",
        g.head_seq
    );
    if let Some(f) = cd
        .next_frame_matching(Duration::from_millis(300), |f| {
            matches!(f.kind, Some(Kind::Typing(_)))
        })
        .await?
    {
        bail!("a member who connected after the typing got {f:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------

/// A user with two devices is ONLINE while either is connected and OFFLINE
/// (with lastSeenMs stored) once both left; subscribers get `ok`, then the
/// current state, then changes only; users who did not subscribe (even
/// sharing a group) get nothing; the operator endpoint agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_last_of_two_devices() -> Result<()> {
    use v1::PresenceStatus::{Offline, Online};
    let node = Node::start(Settings::default()).await?;
    let (u, s, t, z) = (user("u"), user("sub"), user("peer"), user("never"));
    let mut cs = node.connect(&s).await?;
    subscribe(&mut cs, &[&u, &z]).await?;
    ensure!(
        !cs.inbox()
            .iter()
            .any(|f| matches!(f.kind, Some(Kind::Presence(_)))),
        "a presence push came before the subscribePresence reply: {:?}",
        cs.inbox()
    );
    let p = expect_presence(&mut cs, &u, Offline, PUSH_WAIT, "initial state").await?;
    ensure!(
        p.last_seen_ms == 0,
        "never-seen user with lastSeenMs {}",
        p.last_seen_ms
    );
    expect_presence(&mut cs, &z, Offline, PUSH_WAIT, "initial state").await?;

    let mut d1 = node.connect(&u).await?;
    d1.sync().await?;
    expect_presence(&mut cs, &u, Online, PUSH_WAIT, "first device connected").await?;
    let mut ct = node.connect(&t).await?;
    d1.create_group("shared", &[&t]).await?;
    let mut d2 = node.connect_binary(&u).await?;
    d2.sync().await?;
    expect_no_presence(
        &mut cs,
        &u,
        Duration::from_millis(500),
        "second device connected",
    )
    .await?;
    let a = node.admin_presence(&u).await?;
    ensure!(
        a.user_id == u && a.status == "ONLINE",
        "admin presence {a:?}"
    );

    d1.close().await;
    expect_no_presence(
        &mut cs,
        &u,
        Duration::from_millis(800),
        "one of two devices left",
    )
    .await?;
    ensure!(
        node.admin_presence(&u).await?.status == "ONLINE",
        "ONLINE with one device left"
    );

    let t_close = wall_ms();
    d2.close().await;
    let p = expect_presence(&mut cs, &u, Offline, PUSH_WAIT, "both devices left").await?;
    let t_push = wall_ms();
    ensure!(
        p.last_seen_ms + 50 >= t_close && p.last_seen_ms <= t_push + 50,
        "lastSeenMs {} outside [{t_close}, {t_push}]",
        p.last_seen_ms
    );
    let a = node.admin_presence(&u).await?;
    ensure!(
        a.status == "OFFLINE" && a.last_seen_ms == p.last_seen_ms,
        "admin presence {a:?} vs push {p:?}"
    );

    // Back again, and away again: lastSeenMs moves on.
    let d3 = node.connect(&u).await?;
    expect_presence(&mut cs, &u, Online, PUSH_WAIT, "reconnected").await?;
    d3.close().await;
    let p2 = expect_presence(&mut cs, &u, Offline, PUSH_WAIT, "left again").await?;
    ensure!(
        p2.last_seen_ms >= p.last_seen_ms,
        "lastSeenMs went back: {p:?} then {p2:?}"
    );

    // No further pushes about z (no change) and none at all to t.
    expect_no_presence(&mut cs, &z, Duration::from_millis(100), "z never changed").await?;
    if let Some(f) = ct
        .next_frame_matching(Duration::from_millis(200), |f| {
            matches!(f.kind, Some(Kind::Presence(_)))
        })
        .await?
    {
        bail!("a user who did not subscribe got {f:?}");
    }
    Ok(())
}

/// Presence TTL of the expiry tests.
const PRESENCE_TTL: Duration = Duration::from_millis(1_500);

/// A connected client that sends nothing goes OFFLINE after the presence
/// TTL (not before), while one that heartbeats stays ONLINE; a heartbeat
/// brings the silent one back ONLINE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_expires_and_heartbeats_keep_one_alive() -> Result<()> {
    use v1::PresenceStatus::{Offline, Online};
    let node =
        Node::start(Settings::default().tuning("presence_ttl_ms", PRESENCE_TTL.as_millis() as u64))
            .await?;
    let (q, h, s) = (user("quiet"), user("heart"), user("sub"));
    let t_q = Instant::now();
    let mut cq = node.connect(&q).await?;
    let mut ch = node.connect(&h).await?;
    let mut cs = node.connect(&s).await?;
    // A reply means the session is up (and counted); the upgrade alone
    // does not.
    cq.sync().await?;
    ch.sync().await?;
    subscribe(&mut cs, &[&q, &h]).await?;
    expect_presence(&mut cs, &q, Online, PUSH_WAIT, "quiet, just connected").await?;
    expect_presence(&mut cs, &h, Online, PUSH_WAIT, "heart, just connected").await?;

    // The subscriber and `heart` heartbeat; `quiet` sends nothing.
    let deadline = t_q + PRESENCE_TTL * 4;
    let offline = loop {
        ensure!(
            Instant::now() < deadline,
            "a silent session still ONLINE {:?} after connecting (TTL {PRESENCE_TTL:?})",
            t_q.elapsed()
        );
        cs.heartbeat().await?;
        ch.heartbeat().await?;
        if let Some(p) = next_presence(&mut cs, &q, Duration::from_millis(250)).await? {
            ensure!(status(&p) == Offline, "quiet: unexpected {p:?}");
            break p;
        }
    };
    let after = t_q.elapsed();
    ensure!(
        after + Duration::from_millis(100) >= PRESENCE_TTL,
        "a silent session went OFFLINE {after:?} after connecting, before the TTL {PRESENCE_TTL:?}"
    );
    ensure!(
        offline.last_seen_ms > 0 && offline.last_seen_ms <= wall_ms(),
        "lastSeenMs {offline:?}"
    );
    // The silent client is still connected.
    ensure!(
        cq.next_push(Duration::from_millis(10)).await.is_ok() && cq.closed().is_none(),
        "the silent client was disconnected: {:?}",
        cq.closed()
    );
    let a = node.admin_presence(&q).await?;
    ensure!(
        a.status == "OFFLINE" && a.last_seen_ms == offline.last_seen_ms,
        "admin {a:?} vs push {offline:?}"
    );

    // Keep going a full TTL more: `heart` never goes OFFLINE.
    heartbeat_for(
        &mut ch,
        PRESENCE_TTL + Duration::from_millis(300),
        Duration::from_millis(300),
    )
    .await?;
    cs.heartbeat().await?;
    expect_no_presence(&mut cs, &h, Duration::from_millis(10), "heart heartbeats").await?;

    // One heartbeat and the silent user is back.
    cq.heartbeat().await?;
    let t_back = Instant::now();
    let back = loop {
        ensure!(
            t_back.elapsed() < PRESENCE_TTL * 2,
            "no ONLINE push {:?} after the silent client's heartbeat",
            t_back.elapsed()
        );
        cs.heartbeat().await?;
        ch.heartbeat().await?;
        if let Some(p) = next_presence(&mut cs, &q, Duration::from_millis(200)).await? {
            break p;
        }
    };
    ensure!(status(&back) == Online, "after the heartbeat: {back:?}");
    ensure!(
        node.admin_presence(&q).await?.status == "ONLINE",
        "admin after heartbeat"
    );
    expect_no_presence(&mut cs, &h, Duration::from_millis(10), "heart heartbeats").await?;
    Ok(())
}

/// A subscription lasts as long as the subscriber's session: a subscriber
/// that is connected but sends nothing for longer than the presence TTL
/// still hears about the users it watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_subscriber_keeps_its_subscription() -> Result<()> {
    use v1::PresenceStatus::{Offline, Online};
    let node =
        Node::start(Settings::default().tuning("presence_ttl_ms", PRESENCE_TTL.as_millis() as u64))
            .await?;
    let (h, s) = (user("heart"), user("quietsub"));
    let mut ch = node.connect(&h).await?;
    ch.sync().await?;
    let mut cs = node.connect(&s).await?;
    subscribe(&mut cs, &[&h]).await?;
    expect_presence(&mut cs, &h, Online, PUSH_WAIT, "initial").await?;
    // The watched user stays active; the subscriber says nothing.
    heartbeat_for(
        &mut ch,
        PRESENCE_TTL * 2 + Duration::from_millis(500),
        Duration::from_millis(300),
    )
    .await?;
    ch.close().await;
    expect_presence(
        &mut cs,
        &h,
        Offline,
        Duration::from_secs(3),
        "watched user left while the subscriber was quiet",
    )
    .await?;
    Ok(())
}

/// `(presence actors, dormant users)` of a single node.
async fn presence_counts(node: &Node) -> Result<(u64, u64)> {
    Ok((
        status_count(node, "presences").await?,
        status_count(node, "dormant_presences").await?,
    ))
}

/// Idle online users nobody watches cost no presence actor: their actors
/// passivate into dormant records, which keep them online while their
/// clients are active, take a silent one offline after the TTL, and wake
/// for a subscriber, who then sees the user leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_presence_actors_passivate_and_wake() -> Result<()> {
    use v1::PresenceStatus::{Offline, Online};
    let node = Node::start(
        Settings::default()
            .tuning("presence_ttl_ms", PRESENCE_TTL.as_millis() as u64)
            .tuning("presence_idle_ms", 300),
    )
    .await?;
    let (a, b, s) = (user("active"), user("silent"), user("watcher"));
    let t_b = Instant::now();
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect(&b).await?;
    ca.sync().await?;
    cb.sync().await?;

    // Both actors passivate (nobody watches; no operation for 300 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (actors, dormant) = presence_counts(&node).await?;
        if actors == 0 && dormant == 2 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "presence actors {actors}, dormant {dormant}: expected 0 and 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `active` heartbeats while dormant; `silent` sends nothing and is
    // woken and taken offline by the host's tick once its last touch is a
    // TTL old (sessions touch while their client was active within a TTL,
    // so that is between one and two TTLs after its last frame).
    let deadline = t_b + PRESENCE_TTL * 4;
    let pb = loop {
        heartbeat_for(
            &mut ca,
            Duration::from_millis(300),
            Duration::from_millis(300),
        )
        .await?;
        let pb = node.admin_presence(&b).await?;
        if pb.status == "OFFLINE" {
            break pb;
        }
        ensure!(
            Instant::now() < deadline,
            "a silent dormant user still {pb:?} {:?} after its last frame",
            t_b.elapsed()
        );
    };
    ensure!(
        t_b.elapsed() >= PRESENCE_TTL && pb.last_seen_ms > 0 && pb.last_seen_ms <= wall_ms(),
        "a silent dormant user: {pb:?} after {:?}",
        t_b.elapsed()
    );
    let pa = node.admin_presence(&a).await?;
    ensure!(pa.status == "ONLINE", "an active dormant user: {pa:?}");
    ensure!(
        cb.next_push(Duration::from_millis(10)).await.is_ok() && cb.closed().is_none(),
        "the silent client was disconnected: {:?}",
        cb.closed()
    );

    // Let `active` passivate again, then watch it: the actor wakes with
    // its sessions, answers ONLINE, and reports the departure.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        ca.heartbeat().await?;
        let (_, dormant) = presence_counts(&node).await?;
        if dormant >= 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "`active` never passivated again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut cs = node.connect(&s).await?;
    subscribe(&mut cs, &[&a]).await?;
    expect_presence(&mut cs, &a, Online, PUSH_WAIT, "dormant user watched").await?;
    ca.close().await;
    let gone = expect_presence(&mut cs, &a, Offline, Duration::from_secs(3), "left").await?;
    ensure!(gone.last_seen_ms > 0, "lastSeenMs {gone:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------

/// Pointers survive a clean restart, including marks accepted but not yet
/// flushed when SIGTERM came (shutdown flushes them); an `ok` pointer
/// survives kill -9; last-seen survives too; and pointers still never move
/// backwards afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointers_and_last_seen_survive_restarts() -> Result<()> {
    let mut node = Node::start(Settings::default().tuning("pointer_flush_ms", 1_500)).await?;
    let (a, b, c, d) = (user("alice"), user("bob"), user("carol"), user("dave"));
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect_binary(&b).await?;
    let mut cc = node.connect(&c).await?;
    let gid = ca.create_group("restart", &[&b, &c]).await?;
    let mut model = Model {
        head: 1,
        ..Model::default()
    };
    for u in [&a, &b, &c] {
        model.join(u, 1);
    }
    for i in 0..6 {
        let s = ca.send(&gid, &format!("m{i}"), "persist me").await?;
        model.sent(&a, s.seq);
    }
    // dave was online once: his last-seen is stored.
    let cd = node.connect(&d).await?;
    cd.close().await;
    let seen = {
        let deadline = Instant::now() + PUSH_WAIT;
        loop {
            let p = node.admin_presence(&d).await?;
            if p.status == "OFFLINE" && p.last_seen_ms > 0 {
                break p;
            }
            ensure!(Instant::now() < deadline, "dave never OFFLINE: {p:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Phase 1: `ok` means written: kill -9 right after.
    cb.mark_read(&gid, 3).await?;
    model.mark(&b, 3, true);
    cc.mark_delivered(&gid, 5).await?;
    model.mark(&c, 5, false);
    node.crash_and_restart().await?;
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect_binary(&b).await?;
    let mut cc = node.connect(&c).await?;
    for cl in [&mut ca, &mut cb, &mut cc] {
        check_sync(cl, &gid, &model, "after kill -9").await?;
    }

    // Phase 2: marks accepted but not flushed yet (flush every 1.5 s) when
    // SIGTERM comes.
    send_mark(&mut cb, &gid, 6, true).await?;
    send_mark(&mut cc, &gid, 4, true).await?;
    send_mark(&mut cc, &gid, 7, false).await?;
    model.mark(&b, 6, true);
    model.mark(&c, 4, true);
    model.mark(&c, 7, false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.restart().await?;
    let mut ca = node.connect(&a).await?;
    let mut cb = node.connect_binary(&b).await?;
    let mut cc = node.connect(&c).await?;
    for cl in [&mut ca, &mut cb, &mut cc] {
        check_sync(cl, &gid, &model, "after a clean restart with pending marks").await?;
    }
    check_all_readers(&mut ca, &gid, &model, "readers after restarts").await?;
    // Still forward only.
    cb.mark_read(&gid, 2).await?;
    cc.mark_delivered(&gid, 1).await?;
    check_sync(&mut cb, &gid, &model, "lower marks after the restart").await?;
    check_sync(&mut cc, &gid, &model, "lower marks after the restart").await?;
    let p = node.admin_presence(&d).await?;
    ensure!(
        p.status == "OFFLINE" && p.last_seen_ms == seen.last_seen_ms,
        "dave's presence after two restarts: {p:?}, before: {seen:?}"
    );
    let mut cs = node.connect(&user("sub")).await?;
    subscribe(&mut cs, &[&d]).await?;
    let pushed = expect_presence(
        &mut cs,
        &d,
        v1::PresenceStatus::Offline,
        PUSH_WAIT,
        "after restarts",
    )
    .await?;
    ensure!(
        pushed.last_seen_ms == seen.last_seen_ms,
        "pushed {pushed:?}, before {seen:?}"
    );
    Ok(())
}

/// `ok` to a mark means the pointer is written, also when the mark does not
/// move the in-memory pointer because an earlier, larger mark (from another
/// device) is still waiting for its flush: after kill -9 the pointer must be
/// at least what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_mark_survives_kill9_even_when_it_moved_nothing() -> Result<()> {
    let mut node = Node::start(Settings::default().tuning("pointer_flush_ms", 3_000)).await?;
    let (a, b) = (user("alice"), user("bob"));
    let mut ca = node.connect(&a).await?;
    let gid = ca.create_group("ack", &[&b]).await?;
    for i in 0..5 {
        ca.send(&gid, &format!("m{i}"), "x").await?;
    }
    let mut b1 = node.connect(&b).await?;
    let mut b2 = node.connect_binary(&b).await?;
    send_mark(&mut b1, &gid, 6, true).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    b2.mark_read(&gid, 4).await?; // acknowledged
    let acked_after = t.elapsed();
    node.crash_and_restart().await?;
    let mut b3 = node.connect(&b).await?;
    let g = b3.sync_group(&gid).await?.context("group")?;
    ensure!(
        g.read_seq >= 4,
        "markRead 4 was acknowledged (after {acked_after:?}, while markRead 6 from another \
         device waited for its flush) but after kill -9 readSeq is {}",
        g.read_seq
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Across nodes
// ---------------------------------------------------------------------------

/// A user id whose presence actor lives on `node` (same placement as
/// groups, by user id), checked against the server's own answer.
async fn user_owned_by(cluster: &Cluster, name: &str, node: usize) -> Result<String> {
    let names: Vec<String> = (0..cluster.len()).map(tests::cluster::node_name).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for _ in 0..256 {
        let u = user(name);
        if placement::owner(&u, &refs) == Some(refs[node]) {
            let server = cluster.owner(0, &u).await?;
            ensure!(
                server == names[node],
                "tests/src/placement.rs predicts {} for {u} but the server says {server}",
                names[node]
            );
            return Ok(u);
        }
    }
    bail!("no user id owned by {} in 256 tries", names[node])
}

/// Three nodes: a user with two devices on two nodes, watched from the
/// third, is ONLINE while either device is connected and OFFLINE (with the
/// same lastSeenMs on every node's operator endpoint) only once both left,
/// whichever node holds the user's presence. Receipts and typing cross
/// nodes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_receipts_and_typing_across_nodes() -> Result<()> {
    use v1::PresenceStatus::{Offline, Online};
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let admin = |i: usize, u: String| {
        let addr = cluster.node(i).addr();
        let secret = cluster.secret().to_string();
        async move { admin_presence(addr, &secret, &u).await }
    };
    let s = user("watcher");
    let mut cs = cluster.connect(2, &s).await?;
    for owner in [2usize, 0, 1] {
        let what = format!("presence owned by node{}", owner + 1);
        let u = user_owned_by(&cluster, "roamer", owner).await?;
        subscribe(&mut cs, &[&u]).await?;
        expect_presence(&mut cs, &u, Offline, PUSH_WAIT, &format!("{what}: initial")).await?;
        let mut d1 = cluster.connect(0, &u).await?;
        d1.sync().await?;
        expect_presence(
            &mut cs,
            &u,
            Online,
            PUSH_WAIT,
            &format!("{what}: device on node1"),
        )
        .await?;
        let mut d2 = cluster.connect_binary(1, &u).await?;
        d2.sync().await?;
        expect_no_presence(
            &mut cs,
            &u,
            Duration::from_millis(500),
            &format!("{what}: device on node2"),
        )
        .await?;
        d1.close().await;
        expect_no_presence(
            &mut cs,
            &u,
            Duration::from_millis(800),
            &format!("{what}: node1 device left"),
        )
        .await?;
        for i in 0..3 {
            let a = admin(i, u.clone()).await?;
            ensure!(
                a.status == "ONLINE",
                "{what}: node{} says {a:?} with one device left",
                i + 1
            );
        }
        let t_close = wall_ms();
        d2.close().await;
        let p = expect_presence(
            &mut cs,
            &u,
            Offline,
            PUSH_WAIT,
            &format!("{what}: both left"),
        )
        .await?;
        ensure!(
            p.last_seen_ms + 50 >= t_close && p.last_seen_ms <= wall_ms() + 50,
            "{what}: lastSeenMs {} (closed at {t_close})",
            p.last_seen_ms
        );
        for i in 0..3 {
            let a = admin(i, u.clone()).await?;
            ensure!(
                a.status == "OFFLINE" && a.last_seen_ms == p.last_seen_ms,
                "{what}: node{} says {a:?}, push said {p:?}",
                i + 1
            );
        }
    }

    // Receipts and typing: author on node1, readers on node2 and node3.
    let (a, b, c) = (user("author"), user("reader2"), user("reader3"));
    let mut ca = cluster.connect(0, &a).await?;
    let mut cb = cluster.connect_binary(1, &b).await?;
    let mut cc = cluster.connect(2, &c).await?;
    let gid = ca.create_group("across", &[&b, &c]).await?;
    let sent = ca.send(&gid, "x-1", "read me from afar").await?;
    cb.collect_messages(&gid, sent.seq, PUSH_WAIT).await?;
    cc.collect_messages(&gid, sent.seq, PUSH_WAIT).await?;
    cb.mark_read(&gid, sent.seq).await?;
    cc.mark_delivered(&gid, sent.seq).await?;
    let p = wait_receipts(&mut ca, &gid, PUSH_WAIT, "readBy 2, deliveredTo 3", |p| {
        seq_receipt(p, sent.seq).is_some_and(|x| x.read_by == 2 && x.delivered_to == 3)
    })
    .await?;
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    ensure!(
        seq_receipt(&p, sent.seq).is_some_and(|x| x.readers == want),
        "receipts across nodes {p:?}"
    );
    let r = readers(&mut cc, &gid, sent.seq).await?;
    ensure!(
        r.read_by == 2 && r.delivered_to == 3 && r.readers == want,
        "readers {r:?}"
    );
    for _ in 0..5 {
        cb.send_request(typing_req(&gid)).await?;
    }
    ensure!(
        count_typing(&mut ca, &gid, &b, Duration::from_millis(1_500)).await? == 1
            && count_typing(&mut cc, &gid, &b, Duration::from_millis(100)).await? == 1,
        "typing across nodes: expected exactly one push on node1 and node3"
    );
    Ok(())
}

/// A user whose presence `node` owns in `node`'s own view of the cluster
/// (which may exclude nodes that died).
async fn user_owned_in_view(cluster: &Cluster, name: &str, node: usize) -> Result<String> {
    let want = tests::cluster::node_name(node);
    for _ in 0..256 {
        let u = user(name);
        if cluster.owner(node, &u).await? == want {
            return Ok(u);
        }
    }
    bail!("no user id owned by {want} in 256 tries")
}

/// Waits until every pushed presence of `user` so far ends in `want` and the
/// operator endpoint of node `via` agrees, within `within`.
async fn settle_presence(
    cluster: &Cluster,
    watcher: &mut Client,
    via: usize,
    user: &str,
    want: v1::PresenceStatus,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(p) = next_presence(watcher, user, Duration::from_millis(200)).await? {
            last = Some(status(&p));
        }
        let admin = admin_presence(cluster.node(via).addr(), cluster.secret(), user).await?;
        if last == Some(want) && admin.status == want.as_str_name() {
            return Ok(());
        }
    }
    bail!("{user}: last push {last:?}, wanted {want:?} within {within:?}")
}

/// Presence through node crashes (TTL 1.5 s): when the node holding a user's
/// presence dies, the sessions' refreshes rebuild it on the new owner and
/// the watcher sees the user ONLINE again within the TTL; when the node
/// holding a user's only session dies, the user goes OFFLINE within the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_survives_node_crashes() -> Result<()> {
    use v1::PresenceStatus::{Offline, Online};
    const TTL_MS: u64 = 1_500;
    let within = Duration::from_millis(TTL_MS * 2 + 3_000);
    let mut options = ClusterOptions::default();
    options.node.tuning = vec![("presence_ttl_ms", TTL_MS)];
    let mut cluster = Cluster::start(options).await?;
    let w = user("watcher");
    let mut watcher = cluster.connect(2, &w).await?;

    // 1. The presence owner (node1) dies; the user's device is on node2.
    let v = user_owned_by(&cluster, "owned-by-node1", 0).await?;
    subscribe(&mut watcher, &[&v]).await?;
    expect_presence(&mut watcher, &v, Offline, PUSH_WAIT, "initial").await?;
    let mut device = cluster.connect(1, &v).await?;
    device.sync().await?;
    expect_presence(&mut watcher, &v, Online, PUSH_WAIT, "device on node2").await?;
    cluster.kill9(0)?;
    // The device stays active while the owner moves.
    let beat = async {
        let until = Instant::now() + within;
        while Instant::now() < until {
            device.heartbeat().await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<_, anyhow::Error>(())
    };
    let settle = settle_presence(&cluster, &mut watcher, 2, &v, Online, within);
    let (beat, settled) = tokio::join!(beat, settle);
    beat?;
    settled.context("after the presence owner died")?;

    // 2. The node of a user's only session (node2) dies; its presence lives
    // on node3, which survives.
    let u = user_owned_in_view(&cluster, "session-on-node2", 2).await?;
    subscribe(&mut watcher, &[&u]).await?;
    expect_presence(&mut watcher, &u, Offline, PUSH_WAIT, "initial").await?;
    let mut only = cluster.connect(1, &u).await?;
    only.sync().await?;
    expect_presence(&mut watcher, &u, Online, PUSH_WAIT, "session on node2").await?;
    let t_kill = Instant::now();
    cluster.kill9(1)?;
    expect_presence(&mut watcher, &u, Offline, within, "after its node died").await?;
    ensure!(
        t_kill.elapsed() <= within,
        "OFFLINE only after {:?}",
        t_kill.elapsed()
    );
    drop(only);
    drop(device);
    Ok(())
}
