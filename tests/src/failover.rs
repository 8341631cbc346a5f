//! Clients that keep going while the cluster changes under them: a node is
//! killed, frozen, added or drained.
//!
//! - [`run_sender`]: sends numbered messages (message `k` has clientMsgId
//!   `{tag}-{k}`), round-robin over its groups, one at a time or in
//!   pipelined batches. Each message is retried with the *same* clientMsgId
//!   until it is
//!   acknowledged: after `UNAVAILABLE` with a backoff (20 ms doubling to
//!   500 ms), after a transport failure or a reply timeout on a new
//!   connection (to the next node of [`Endpoints`], then `sync`). A message
//!   not acknowledged within [`MESSAGE_DEADLINE`] fails the sender, as does
//!   any other error code. Every acknowledgement goes into a shared list.
//! - [`run_receiver`]: a member that reads `message` pushes, reconnects
//!   elsewhere when its node goes away (recording the `goaway` and the close
//!   code), catches up with `sync` + `history` after every (re)connect and
//!   whenever it sees a gap, and fails on a push that goes backwards on one
//!   connection or a seq whose content changes (a fork).
//! - [`verify_group`] / [`verify_receiver`]: the final checks against the
//!   group's log.
//!
//! Both tasks stop between messages once their `stop` flag is set; every
//! wait is bounded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::time::Instant;

use crate::check;
use crate::client::{Client, ClientOptions, Closed, Mode, error_code, reply_kind, send_req};
use crate::cluster::Endpoints;
use crate::v1::{self, client_frame::Kind as Req, server_frame::Kind};

/// How long one message may take to be acknowledged, retries included.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(15);

/// How long a sender waits for one reply before it tries another connection.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a (re)connection may take (a frozen node accepts TCP but never
/// upgrades).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most connection attempts of a receiver's final catch-up.
const FINAL_CONNECT_ROUNDS: usize = 20;

/// One acknowledged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The sender.
    pub user: String,
    /// The group.
    pub group_id: String,
    /// The clientMsgId (`{tag}-{k}`).
    pub client_msg_id: String,
    /// The text.
    pub text: String,
    /// The seq of the `sent` reply.
    pub seq: u64,
    /// The message's number in its sender's sequence.
    pub k: u64,
    /// The sender's batch it belonged to (a batch goes out only after the
    /// previous one was fully acknowledged).
    pub batch: u64,
}

/// Acknowledgements shared by the senders of a test.
pub type Acks = Arc<Mutex<Vec<Ack>>>;

/// How many acknowledgements `acks` holds.
pub fn ack_count(acks: &Acks) -> usize {
    acks.lock().expect("acks lock").len()
}

/// A copy of `acks`.
pub fn ack_list(acks: &Acks) -> Vec<Ack> {
    acks.lock().expect("acks lock").clone()
}

/// What a sender does.
#[derive(Debug, Clone)]
pub struct SenderSpec {
    /// The user.
    pub user: String,
    /// The groups, written round-robin.
    pub groups: Vec<String>,
    /// Prefix of the clientMsgIds.
    pub tag: String,
    /// The node index it connects to first.
    pub home: usize,
    /// Request encoding.
    pub mode: Mode,
    /// Stop after this many messages (or when `stop` is set).
    pub max_messages: u64,
    /// Messages sent at once, pipelined (1: one after the other).
    pub window: usize,
    /// Pause between two batches.
    pub pace: Duration,
}

impl SenderSpec {
    /// A JSON sender of `user` to `groups`, starting on node `home`, tag =
    /// user, no pause, at most 100,000 messages.
    pub fn new(user: &str, groups: &[String], home: usize) -> Self {
        Self {
            user: user.to_string(),
            groups: groups.to_vec(),
            tag: user.to_string(),
            home,
            mode: Mode::Json,
            max_messages: 100_000,
            window: 1,
            pace: Duration::ZERO,
        }
    }
}

/// What a sender went through.
#[derive(Debug, Clone, Default)]
pub struct SenderReport {
    /// The user.
    pub user: String,
    /// Messages acknowledged.
    pub acked: u64,
    /// `UNAVAILABLE` answers (each followed by a retry).
    pub unavailable: u64,
    /// Connections lost or abandoned (each followed by a reconnect).
    pub reconnects: u64,
    /// The node addresses it was connected to, in order.
    pub connections: Vec<SocketAddr>,
    /// How its connections ended, when they ended with a close frame or a
    /// failure (for `goaway` checks).
    pub closes: Vec<String>,
    /// The longest time one batch took to be fully acknowledged.
    pub slowest: Duration,
}

/// A connection that remembers where it goes.
struct Conn {
    client: Client,
    addr: SocketAddr,
    idx: usize,
}

/// Connects `user` to the first node that accepts, starting at node index
/// `start` and going round the endpoints once. Returns the connection after
/// a successful `sync`.
async fn connect_round(
    endpoints: &Endpoints,
    user: &str,
    mode: Mode,
    start: usize,
) -> Result<Conn> {
    let n = endpoints.len();
    let mut errors = Vec::new();
    for j in 0..n {
        let idx = (start + j) % n;
        let addr = endpoints.addr(idx);
        let opts = ClientOptions {
            connect_timeout: CONNECT_TIMEOUT,
            ..ClientOptions::new(mode)
        };
        let attempt = async {
            let mut cl = Client::connect_addr(addr, user, &endpoints.token(user), opts).await?;
            match tokio::time::timeout(REPLY_TIMEOUT, cl.sync()).await {
                Ok(Ok(_)) => Ok(cl),
                Ok(Err(e)) => Err(e.context("sync after connect")),
                Err(_) => bail!("sync after connect timed out"),
            }
        };
        match attempt.await {
            Ok(client) => return Ok(Conn { client, addr, idx }),
            Err(e) => errors.push(format!("{addr}: {e:#}")),
        }
    }
    bail!("{user}: no node accepted a connection: {errors:?}")
}

/// Describes how `cl`'s connection ended (or that it is still open).
fn close_text(cl: &Client, why: &str) -> String {
    match cl.closed() {
        Some(c) => format!("{why}: {c:?}"),
        None => format!("{why}: (still open)"),
    }
}

/// One message of a sender, until it is acknowledged.
struct Pending {
    k: u64,
    gid: String,
    cmid: String,
    text: String,
}

/// What became of one attempt at a batch.
enum Attempt {
    /// Every reply arrived (acknowledged or `UNAVAILABLE`).
    Answered,
    /// The connection failed or a reply did not come in time.
    Lost(String),
}

/// Runs a sender until `stop` is set or `spec.max_messages` are
/// acknowledged; see the module docs. Messages go out in batches of
/// `spec.window` (pipelined on one connection); a batch is retried, same
/// clientMsgIds, until all of it is acknowledged, and the next batch starts
/// only then. Fails when a batch cannot be acknowledged within
/// [`MESSAGE_DEADLINE`] or a send gets an error other than `UNAVAILABLE`.
pub async fn run_sender(
    spec: SenderSpec,
    endpoints: Endpoints,
    acks: Acks,
    stop: Arc<AtomicBool>,
) -> Result<SenderReport> {
    ensure!(!spec.groups.is_empty(), "a sender needs a group");
    ensure!(spec.window >= 1, "a sender's window is at least 1");
    let mut report = SenderReport {
        user: spec.user.clone(),
        ..SenderReport::default()
    };
    let mut conn: Option<Conn> = None;
    let mut next_idx = spec.home;
    let mut k: u64 = 0;
    let mut batch: u64 = 0;
    while k < spec.max_messages && !stop.load(Ordering::Acquire) {
        let end = (k + spec.window as u64).min(spec.max_messages);
        let mut pending: Vec<Pending> = (k..end)
            .map(|k| Pending {
                k,
                gid: spec.groups[(k as usize) % spec.groups.len()].clone(),
                cmid: format!("{}-{k}", spec.tag),
                text: format!("{} says {k}", spec.tag),
            })
            .collect();
        let started = Instant::now();
        let deadline = started + MESSAGE_DEADLINE;
        let mut backoff = Duration::from_millis(20);
        let mut last_problem = String::from("none");
        while !pending.is_empty() {
            if Instant::now() >= deadline {
                let ids: Vec<&str> = pending.iter().map(|p| p.cmid.as_str()).collect();
                bail!(
                    "{}: messages {ids:?} not acknowledged within {MESSAGE_DEADLINE:?} \
                     (last problem: {last_problem}; report so far: {report:?})",
                    spec.user
                );
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect_round(&endpoints, &spec.user, spec.mode, next_idx).await {
                    Ok(c) => {
                        report.connections.push(c.addr);
                        next_idx = c.idx;
                        conn.insert(c)
                    }
                    Err(e) => {
                        last_problem = format!("{e:#}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            // Send the whole pending batch, then read the replies in order.
            let mut attempt = Attempt::Answered;
            let mut ids = Vec::with_capacity(pending.len());
            for p in &pending {
                match c
                    .client
                    .send_request(Req::Send(send_req(&p.gid, &p.cmid, &p.text)))
                    .await
                {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        attempt = Attempt::Lost(format!("{e:#}"));
                        break;
                    }
                }
            }
            let mut done = vec![false; pending.len()];
            let mut unavailable = false;
            if matches!(attempt, Attempt::Answered) {
                for (j, id) in ids.iter().enumerate() {
                    let p = &pending[j];
                    let reply = match c.client.wait_reply_timeout(*id, REPLY_TIMEOUT).await {
                        Ok(frame) => reply_kind(frame),
                        Err(e) => {
                            attempt = Attempt::Lost(format!("{e:#}"));
                            break;
                        }
                    };
                    match reply {
                        Ok(Kind::Sent(s)) => {
                            ensure!(
                                s.group_id == p.gid && s.client_msg_id == p.cmid && s.seq > 0,
                                "{}: sent reply for {} to {} does not match: {s:?}",
                                spec.user,
                                p.cmid,
                                p.gid
                            );
                            acks.lock().expect("acks lock").push(Ack {
                                user: spec.user.clone(),
                                group_id: p.gid.clone(),
                                client_msg_id: p.cmid.clone(),
                                text: p.text.clone(),
                                seq: s.seq,
                                k: p.k,
                                batch,
                            });
                            report.acked += 1;
                            done[j] = true;
                        }
                        Ok(other) => {
                            bail!("{}: send {}: unexpected reply {other:?}", spec.user, p.cmid)
                        }
                        Err(e) if error_code(&e) == Some(v1::ErrorCode::Unavailable) => {
                            report.unavailable += 1;
                            last_problem = format!("{e:#}");
                            unavailable = true;
                        }
                        Err(e) => bail!(
                            "{}: send {} to {} via {}: unexpected error: {e:#}",
                            spec.user,
                            p.cmid,
                            p.gid,
                            c.addr
                        ),
                    }
                }
            }
            let mut j = 0;
            pending.retain(|_| {
                j += 1;
                !done[j - 1]
            });
            c.client.discard_pushes();
            if let Attempt::Lost(why) = attempt {
                // Transport failure or no reply in time: another connection,
                // preferably to the next node; the rest is sent again.
                report.reconnects += 1;
                report
                    .closes
                    .push(close_text(&c.client, &format!("{}", c.addr)));
                last_problem = why;
                next_idx = c.idx + 1;
                conn = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else if unavailable {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        report.slowest = report.slowest.max(started.elapsed());
        k = end;
        batch += 1;
        if !spec.pace.is_zero() {
            tokio::time::sleep(spec.pace).await;
        }
    }
    if let Some(c) = conn {
        c.client.close().await;
    }
    Ok(report)
}

/// One message as a receiver has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Sender (empty for system messages).
    pub sender_id: String,
    /// clientMsgId.
    pub client_msg_id: String,
    /// Text.
    pub text: String,
    /// System kind, if a system message.
    pub system: Option<v1::SystemKind>,
}

impl Seen {
    fn of(m: &v1::Message) -> Self {
        Self {
            sender_id: m.sender_id.clone(),
            client_msg_id: m.client_msg_id.clone(),
            text: m.text.clone(),
            system: check::system_kind(m),
        }
    }
}

/// What a receiver does.
#[derive(Debug, Clone)]
pub struct ReceiverSpec {
    /// The user (a member of every group).
    pub user: String,
    /// The groups it follows.
    pub groups: Vec<String>,
    /// The node index it connects to first.
    pub home: usize,
    /// Request encoding (pushes follow it).
    pub mode: Mode,
}

impl ReceiverSpec {
    /// A binary receiver of `user` following `groups`, starting on `home`.
    pub fn new(user: &str, groups: &[String], home: usize) -> Self {
        Self {
            user: user.to_string(),
            groups: groups.to_vec(),
            home,
            mode: Mode::Binary,
        }
    }
}

/// How one of a receiver's connections ended.
#[derive(Debug, Clone)]
pub struct ConnEnd {
    /// The node it was connected to.
    pub addr: SocketAddr,
    /// Whether a `goaway` push came first.
    pub goaway: bool,
    /// How it closed (`None`: it was still open but failed otherwise).
    pub closed: Option<Closed>,
}

/// What a receiver saw.
#[derive(Debug, Clone, Default)]
pub struct ReceiverReport {
    /// The user.
    pub user: String,
    /// Per group, every seq it has (pushed or pulled) and its content.
    pub seen: BTreeMap<String, BTreeMap<u64, Seen>>,
    /// `message` pushes received (of its groups).
    pub pushes: u64,
    /// Messages pulled with `history` (after a reconnect or a gap).
    pub pulled: u64,
    /// Gaps in the push stream that it filled from `history`.
    pub gaps: u64,
    /// The gaps: (group, last contiguous seq, seq of the push after it).
    pub gap_list: Vec<(String, u64, u64)>,
    /// Its connections that ended, in order.
    pub ends: Vec<ConnEnd>,
    /// The node addresses it was connected to, in order.
    pub connections: Vec<SocketAddr>,
}

/// A receiver's state.
struct Rx {
    spec: ReceiverSpec,
    report: ReceiverReport,
    /// Per group: the highest seq up to which it has everything.
    contiguous: HashMap<String, u64>,
}

impl Rx {
    fn record(&mut self, m: &v1::Message) -> Result<()> {
        let seen = Seen::of(m);
        let map = self.report.seen.entry(m.group_id.clone()).or_default();
        if let Some(prev) = map.get(&m.seq) {
            ensure!(
                *prev == seen,
                "{}: seq {} of {} changed content (a fork?): first {prev:?}, now {seen:?}",
                self.spec.user,
                m.seq,
                m.group_id
            );
            return Ok(());
        }
        map.insert(m.seq, seen);
        let c = self.contiguous.entry(m.group_id.clone()).or_insert(0);
        while map.contains_key(&(*c + 1)) {
            *c += 1;
        }
        Ok(())
    }

    /// Pulls `history` after the contiguous prefix of every group.
    async fn catch_up(&mut self, cl: &mut Client) -> Result<()> {
        for gid in self.spec.groups.clone() {
            let after = self.contiguous.get(&gid).copied().unwrap_or(0);
            let msgs = cl.history_after(&gid, after, 200).await?;
            self.report.pulled += msgs.len() as u64;
            for m in &msgs {
                self.record(m)?;
            }
        }
        Ok(())
    }

    /// A `message` push on a connection whose last push of each group is in
    /// `last`. Returns whether it revealed a gap (the caller pulls history).
    fn on_push(&mut self, m: v1::Message, last: &mut HashMap<String, u64>) -> Result<bool> {
        if !self.spec.groups.contains(&m.group_id) {
            return Ok(false);
        }
        self.report.pushes += 1;
        let prev = last.get(&m.group_id).copied().unwrap_or(0);
        ensure!(
            m.seq > prev,
            "{}: push of seq {} of {} after seq {prev} on the same connection (reorder or duplicate)",
            self.spec.user,
            m.seq,
            m.group_id
        );
        last.insert(m.group_id.clone(), m.seq);
        let contiguous = self.contiguous.get(&m.group_id).copied().unwrap_or(0);
        self.record(&m)?;
        if m.seq > contiguous + 1 {
            self.report.gaps += 1;
            self.report
                .gap_list
                .push((m.group_id.clone(), contiguous, m.seq));
            return Ok(true);
        }
        Ok(false)
    }
}

/// Runs a receiver until `stop` is set, then catches up one last time (on a
/// new connection if needed); see the module docs.
pub async fn run_receiver(
    spec: ReceiverSpec,
    endpoints: Endpoints,
    stop: Arc<AtomicBool>,
) -> Result<ReceiverReport> {
    let mut rx = Rx {
        report: ReceiverReport {
            user: spec.user.clone(),
            ..ReceiverReport::default()
        },
        contiguous: HashMap::new(),
        spec,
    };
    let user = rx.spec.user.clone();
    let mut next_idx = rx.spec.home;
    let mut conn: Option<Conn> = None;
    let mut last_push: HashMap<String, u64> = HashMap::new();
    let mut catch_up_due = false;
    let mut final_rounds = 0;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                if stopping {
                    final_rounds += 1;
                    ensure!(
                        final_rounds <= FINAL_CONNECT_ROUNDS,
                        "{user}: could not reconnect for the final catch-up"
                    );
                }
                match connect_round(&endpoints, &user, rx.spec.mode, next_idx).await {
                    Ok(c) => {
                        rx.report.connections.push(c.addr);
                        next_idx = c.idx;
                        last_push.clear();
                        // The protocol's reconnect: sync (done), then history.
                        catch_up_due = true;
                        conn.insert(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        if catch_up_due || stopping {
            match rx.catch_up(&mut c.client).await {
                Ok(()) => {
                    catch_up_due = false;
                    if stopping {
                        // Everything sent is committed and now pulled.
                        if let Some(c) = conn.take() {
                            c.client.close().await;
                        }
                        return Ok(rx.report);
                    }
                }
                Err(e) if is_unavailable(&e) => {
                    // The group is moving: try again shortly.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stopping {
                        final_rounds += 1;
                        ensure!(
                            final_rounds <= FINAL_CONNECT_ROUNDS,
                            "{user}: final catch-up still UNAVAILABLE: {e:#}"
                        );
                    }
                    continue;
                }
                Err(e) if error_code(&e).is_some() => {
                    return Err(e.context(format!("{user}: catch-up")));
                }
                Err(_) => {
                    // Lost the connection (or no answer): start over elsewhere.
                    rx.report.ends.push(ConnEnd {
                        addr: c.addr,
                        goaway: false,
                        closed: c.client.closed().cloned(),
                    });
                    next_idx = c.idx + 1;
                    conn = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        match c.client.next_push(Duration::from_millis(200)).await {
            Ok(None) => {}
            Ok(Some(f)) => match f.kind {
                Some(Kind::Message(m)) => {
                    // A gap: pull what is missing (the protocol's rule).
                    let gap = rx.on_push(m, &mut last_push)?;
                    catch_up_due |= gap;
                }
                Some(Kind::Goaway(_)) => {
                    let closed = c
                        .client
                        .wait_close(Duration::from_secs(10))
                        .await
                        .ok()
                        .map(|(cl, _)| cl);
                    rx.report.ends.push(ConnEnd {
                        addr: c.addr,
                        goaway: true,
                        closed,
                    });
                    next_idx = c.idx + 1;
                    conn = None;
                }
                _ => {}
            },
            Err(_) => {
                rx.report.ends.push(ConnEnd {
                    addr: c.addr,
                    goaway: false,
                    closed: c.client.closed().cloned(),
                });
                next_idx = c.idx + 1;
                conn = None;
            }
        }
    }
}

fn is_unavailable(e: &anyhow::Error) -> bool {
    error_code(e) == Some(v1::ErrorCode::Unavailable)
}

/// Checks the log of one group against the acknowledgements of its
/// senders: seqs dense from 1; every acknowledged message at its seq with
/// its sender, clientMsgId and text; no (sender, clientMsgId) twice; each
/// sender's messages in the order it sent them; and no user message that
/// was never acknowledged (every sender retried until acknowledged).
pub fn verify_group(log: &[v1::Message], gid: &str, acks: &[Ack]) -> Result<()> {
    let head = log.last().map(|m| m.seq).unwrap_or(0);
    check::dense(log, 1, head).with_context(|| format!("log of {gid}"))?;
    let mine: Vec<&Ack> = acks.iter().filter(|a| a.group_id == gid).collect();
    for a in &mine {
        let m = log.get((a.seq - 1) as usize).with_context(|| {
            format!(
                "{gid}: acknowledged seq {} ({}) lost",
                a.seq, a.client_msg_id
            )
        })?;
        ensure!(
            m.sender_id == a.user && m.client_msg_id == a.client_msg_id && m.text == a.text,
            "{gid}: acknowledged seq {} ({}/{}) holds {m:?}",
            a.seq,
            a.user,
            a.client_msg_id
        );
    }
    let mut seen = HashSet::new();
    for m in log.iter().filter(|m| check::system_kind(m).is_none()) {
        ensure!(
            seen.insert((m.sender_id.clone(), m.client_msg_id.clone())),
            "{gid}: the log holds {}/{} twice (second at seq {})",
            m.sender_id,
            m.client_msg_id,
            m.seq
        );
    }
    let acked: HashSet<(&str, &str)> = mine
        .iter()
        .map(|a| (a.user.as_str(), a.client_msg_id.as_str()))
        .collect();
    let senders: HashSet<&str> = mine.iter().map(|a| a.user.as_str()).collect();
    for m in log.iter().filter(|m| check::system_kind(m).is_none()) {
        if senders.contains(m.sender_id.as_str()) {
            ensure!(
                acked.contains(&(m.sender_id.as_str(), m.client_msg_id.as_str())),
                "{gid}: seq {} ({}/{}) is in the log but was never acknowledged",
                m.seq,
                m.sender_id,
                m.client_msg_id
            );
        }
    }
    let mut by_sender: BTreeMap<&str, Vec<&Ack>> = BTreeMap::new();
    for a in &mine {
        by_sender.entry(a.user.as_str()).or_default().push(a);
    }
    for (user, mut list) in by_sender {
        list.sort_by_key(|a| a.k);
        // Batches go out one after the other: every message of a later
        // batch has a higher seq (within a pipelined batch, retries after
        // UNAVAILABLE may reorder).
        for w in list.windows(2) {
            ensure!(
                w[0].batch == w[1].batch || w[0].seq < w[1].seq,
                "{gid}: {user}'s message {} got seq {} but the later {} got {} (order not kept)",
                w[0].k,
                w[0].seq,
                w[1].k,
                w[1].seq
            );
        }
    }
    Ok(())
}

/// Checks that a receiver has exactly the log of `gid` (every seq, same
/// content).
pub fn verify_receiver(report: &ReceiverReport, gid: &str, log: &[v1::Message]) -> Result<()> {
    let empty = BTreeMap::new();
    let seen = report.seen.get(gid).unwrap_or(&empty);
    for m in log {
        let s = seen.get(&m.seq).with_context(|| {
            format!(
                "{}: never got seq {} of {gid} (has {} seqs)",
                report.user,
                m.seq,
                seen.len()
            )
        })?;
        ensure!(
            *s == Seen::of(m),
            "{}: seq {} of {gid} differs from the log: had {s:?}, log {m:?}",
            report.user,
            m.seq
        );
    }
    let head = log.last().map(|m| m.seq).unwrap_or(0);
    if let Some((&max, _)) = seen.iter().next_back() {
        ensure!(
            max <= head,
            "{}: has seq {max} of {gid} beyond the log's head {head}",
            report.user
        );
    }
    Ok(())
}

/// Senders and receivers running in the background of a test.
pub struct Traffic {
    stop_senders: Arc<AtomicBool>,
    stop_receivers: Arc<AtomicBool>,
    acks: Acks,
    senders: Vec<tokio::task::JoinHandle<Result<SenderReport>>>,
    receivers: Vec<tokio::task::JoinHandle<Result<ReceiverReport>>>,
}

/// How long [`Traffic::finish`] waits for each task after the stop.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

impl Traffic {
    /// Spawns `senders` and `receivers` against `endpoints`.
    pub fn start(
        endpoints: &Endpoints,
        senders: Vec<SenderSpec>,
        receivers: Vec<ReceiverSpec>,
    ) -> Self {
        let stop_senders = Arc::new(AtomicBool::new(false));
        let stop_receivers = Arc::new(AtomicBool::new(false));
        let acks: Acks = Arc::default();
        let senders = senders
            .into_iter()
            .map(|s| {
                tokio::spawn(run_sender(
                    s,
                    endpoints.clone(),
                    acks.clone(),
                    stop_senders.clone(),
                ))
            })
            .collect();
        let receivers = receivers
            .into_iter()
            .map(|r| tokio::spawn(run_receiver(r, endpoints.clone(), stop_receivers.clone())))
            .collect();
        Self {
            stop_senders,
            stop_receivers,
            acks,
            senders,
            receivers,
        }
    }

    /// The acknowledgements so far.
    pub fn acks(&self) -> &Acks {
        &self.acks
    }

    /// How many messages were acknowledged so far.
    pub fn acked(&self) -> usize {
        ack_count(&self.acks)
    }

    /// Waits until `n` messages in total are acknowledged, at most
    /// `timeout`; fails at once when a task has stopped (it failed).
    pub async fn wait_acks(&mut self, n: usize, timeout: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.acked() >= n {
                return Ok(());
            }
            if let Some(pos) = self.senders.iter().position(|t| t.is_finished()) {
                let t = self.senders.remove(pos);
                let r = t.await.context("sender task panicked")?;
                bail!("{what}: a sender stopped early: {:?}", r.map(|r| r.user));
            }
            if let Some(pos) = self.receivers.iter().position(|t| t.is_finished()) {
                let t = self.receivers.remove(pos);
                let r = t.await.context("receiver task panicked")?;
                bail!("{what}: a receiver stopped early: {:?}", r.map(|r| r.user));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what}: {} acknowledged messages after {timeout:?}, waiting for {n}",
                    self.acked()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every task and returns their reports and every
    /// acknowledgement. Senders stop first; once they are done, receivers
    /// catch up one last time and stop.
    pub async fn finish(self) -> Result<(Vec<SenderReport>, Vec<ReceiverReport>, Vec<Ack>)> {
        self.stop_senders.store(true, Ordering::Release);
        let mut sent = Vec::new();
        for t in self.senders {
            sent.push(
                tokio::time::timeout(FINISH_TIMEOUT, t)
                    .await
                    .context("a sender did not stop")?
                    .context("sender task panicked")??,
            );
        }
        self.stop_receivers.store(true, Ordering::Release);
        let mut received = Vec::new();
        for t in self.receivers {
            received.push(
                tokio::time::timeout(FINISH_TIMEOUT, t)
                    .await
                    .context("a receiver did not stop")?
                    .context("receiver task panicked")??,
            );
        }
        let acks = ack_list(&self.acks);
        Ok((sent, received, acks))
    }
}
