//! Cluster membership: the ractor_cluster `NodeServer`, the seed list and
//! reconnect loop, the failure detector, draining, and the live node set the
//! router places entities on.
//!
//! What ractor_cluster gives is authenticated links and `pg` sync; what it
//! does not (DESIGN.md), this module adds:
//! - **Discovery**: dial the seeds; transitive mode dials their peers; every
//!   node says `Hello` with its cluster and HTTP addresses, so dropped links
//!   are re-dialled by name.
//! - **Failure detection**: a ping to every ready peer each
//!   `ping_interval_ms`; a peer silent for `failure_timeout_ms` is declared
//!   down and its session stopped (so `pg` forgets it), even if its TCP link
//!   looks alive (a SIGSTOPped process).
//! - **Pause detection**: if this node itself did not run for longer than the
//!   failure timeout (stopped, or starved of CPU), it does not blame its
//!   peers for the silence; and if peers then drop their links to it, they
//!   have declared it down and taken its groups: it drops its links, tells
//!   its clients to reconnect, retires its actors (storage epochs fence any
//!   late commit), then rejoins.
//! - **The view**: owners = live, non-draining nodes (this one included
//!   unless draining); peers = live nodes. Handed to [`Router::set_view`].
//!
//! Runs as one task (no locks): events from ractor_cluster, the port's
//! pongs and hellos, admin commands and timers all arrive on channels. The
//! node starts it, the NodeServer and the port on a runtime of their own
//! (one thread, `main.rs`), so client load cannot delay the failure
//! detector.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actors::Router;
use actors::cluster::PeerEvent;
use actors::outbound::SharedPush;
use actors::relay::RelayMessage;
use proto::v1::{self, envelope::Kind as Env, server_frame::Kind};
use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage, NodeSessionMessage};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::ClusterSection;

/// Close code told to clients when this node hands its work over (drain, or
/// after it was paused): reconnect, preferably to another node.
pub const CLOSE_RECONNECT: u16 = 1012;
/// Bound of the event queues into the manager.
const QUEUE: usize = 4_096;
/// Every this many pings a peer also gets a `Hello` (addresses, drain state).
const HELLO_EVERY_PINGS: u64 = 20;

/// A ractor_cluster session event.
#[derive(Debug)]
enum LinkEvent {
    Opened(NodeServerSessionInformation),
    Authenticated(NodeServerSessionInformation),
    Ready(NodeServerSessionInformation),
    Closed(NodeServerSessionInformation),
}

struct Subscription(mpsc::Sender<LinkEvent>);

impl Subscription {
    fn send(&self, e: LinkEvent) {
        if self.0.try_send(e).is_err() {
            warn!("cluster event queue full; event dropped");
        }
    }
}

impl NodeEventSubscription for Subscription {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        self.send(LinkEvent::Opened(ses));
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        self.send(LinkEvent::Closed(ses));
    }
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.send(LinkEvent::Authenticated(ses));
    }
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        self.send(LinkEvent::Ready(ses));
    }
}

/// A node as `admin status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// Its HTTP address (empty if not known yet).
    pub http_addr: String,
    /// Its cluster address.
    pub cluster_addr: String,
    /// Whether it is live (answering pings), from this node's view.
    pub live: bool,
    /// Whether it is draining.
    pub draining: bool,
}

/// Commands from the admin endpoints.
#[derive(Debug)]
pub enum ClusterCommand {
    /// Report the cluster as this node sees it.
    Status(oneshot::Sender<Vec<NodeStatus>>),
    /// Hand every group over and tell clients to go elsewhere; answers once
    /// no group actor is left here.
    Drain(oneshot::Sender<()>),
}

/// A connected peer.
struct Peer {
    session: ActorRef<NodeSessionMessage>,
    ready: bool,
    /// When it last answered (or became ready).
    last_seen: Instant,
    /// Answered at least one ping since ready.
    answered: bool,
    draining: bool,
    cluster_addr: String,
    http_addr: String,
}

/// The manager's state.
///
/// Invariants: `peers` holds the authenticated sessions by peer name (one per
/// name); a peer is live iff it is ready, has answered a ping and was seen
/// within the failure timeout; the router's view was last set from this state.
struct Manager {
    name: String,
    router: Router,
    server: ActorRef<NodeServerMessage>,
    config: ClusterSection,
    http_addr: SocketAddr,
    draining: Arc<AtomicBool>,
    peers: HashMap<String, Peer>,
    /// Cluster addresses by node name (from hellos), for re-dialling.
    known: HashMap<String, String>,
    /// Sessions opened but not yet authenticated, by actor id: a close before
    /// authentication is a refused peer (wrong cookie).
    unauthenticated: HashSet<ractor::ActorId>,
    ping_seq: u64,
    last_tick: Instant,
    /// Until when a dropped link counts as "peers declared us down" (set
    /// when this node notices it did not run past the failure timeout).
    suspect_pause_until: Option<Instant>,
    last_view: (Vec<String>, Vec<String>),
}

/// Starts the NodeServer and the manager. Returns the command channel.
pub async fn start(
    name: String,
    config: ClusterSection,
    router: Router,
    http_addr: SocketAddr,
    draining: Arc<AtomicBool>,
) -> anyhow::Result<mpsc::Sender<ClusterCommand>> {
    // ractor_cluster's listener fails inside an actor (a panic in the log)
    // when its address is taken; check first and fail with a plain error.
    drop(
        std::net::TcpListener::bind(config.listen)
            .map_err(|e| anyhow::anyhow!("cluster listen address {}: {e}", config.listen))?,
    );
    let server = NodeServer::new(
        config.listen.port(),
        config.cookie.clone(),
        name.to_string(),
        config.listen.ip().to_string(),
        None,
        Some(NodeConnectionMode::Transitive),
    )
    .with_listen_addr(config.listen.ip());
    let (server, _) = Actor::spawn(Some(format!("{name}.cluster")), server, ())
        .await
        .map_err(|e| anyhow::anyhow!("starting the cluster listener: {e}"))?;
    let (link_tx, link_rx) = mpsc::channel(QUEUE);
    server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "chat.membership".into(),
            subscription: Box::new(Subscription(link_tx)),
        })
        .map_err(|e| anyhow::anyhow!("subscribing to cluster events: {e}"))?;
    let (peer_tx, peer_rx) = mpsc::channel(QUEUE);
    router.set_peer_listener(peer_tx);
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    info!(node = name, cluster_listen = %config.listen, seeds = ?config.seeds, "cluster listener up");
    let manager = Manager {
        name: name.to_string(),
        router,
        server,
        config,
        http_addr,
        draining,
        peers: HashMap::new(),
        known: HashMap::new(),
        unauthenticated: HashSet::new(),
        ping_seq: 0,
        last_tick: Instant::now(),
        suspect_pause_until: None,
        last_view: (Vec::new(), Vec::new()),
    };
    tokio::spawn(manager.run(link_rx, peer_rx, cmd_rx));
    Ok(cmd_tx)
}

/// The peer's node name: ractor_cluster calls nodes `name@host`, and node
/// names cannot contain `@` (checked in the config).
fn peer_name(ses: &NodeServerSessionInformation) -> Option<String> {
    ses.peer_name
        .as_ref()
        .map(|n| match n.name.rsplit_once('@') {
            Some((name, _host)) => name.to_string(),
            None => n.name.clone(),
        })
}

impl Manager {
    async fn run(
        mut self,
        mut links: mpsc::Receiver<LinkEvent>,
        mut peer_events: mpsc::Receiver<PeerEvent>,
        mut commands: mpsc::Receiver<ClusterCommand>,
    ) {
        let mut ping = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial =
            tokio::time::interval(Duration::from_millis(self.config.reconnect_interval_ms));
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_waiters: Vec<oneshot::Sender<()>> = Vec::new();
        self.publish_view();
        loop {
            tokio::select! {
                Some(e) = links.recv() => self.on_link(e),
                Some(e) = peer_events.recv() => self.on_peer(e),
                Some(c) = commands.recv() => match c {
                    ClusterCommand::Status(tx) => { let _ = tx.send(self.status()); }
                    ClusterCommand::Drain(tx) => {
                        self.start_drain();
                        drain_waiters.push(tx);
                    }
                },
                _ = ping.tick() => {
                    self.tick();
                    if !drain_waiters.is_empty() && self.drained().await {
                        info!("drain complete: no group actor left on this node");
                        for w in drain_waiters.drain(..) {
                            let _ = w.send(());
                        }
                    }
                }
                _ = redial.tick() => self.redial(),
                else => break,
            }
        }
    }

    fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.config.failure_timeout_ms)
    }

    fn on_link(&mut self, e: LinkEvent) {
        match e {
            LinkEvent::Opened(ses) => {
                debug!(peer_addr = %ses.peer_addr, "cluster link opened");
                self.unauthenticated.insert(ses.actor.get_id());
            }
            LinkEvent::Authenticated(ses) => {
                self.unauthenticated.remove(&ses.actor.get_id());
                let Some(name) = peer_name(&ses) else { return };
                info!(peer = %name, peer_addr = %ses.peer_addr, "cluster link authenticated");
                let cluster_addr = ses
                    .peer_name
                    .as_ref()
                    .map(|n| n.connection_string.clone())
                    .unwrap_or_default();
                if !cluster_addr.is_empty() {
                    self.known.insert(name.clone(), cluster_addr.clone());
                }
                self.peers.insert(
                    name,
                    Peer {
                        session: ses.actor.clone(),
                        ready: false,
                        last_seen: Instant::now(),
                        answered: false,
                        draining: false,
                        cluster_addr,
                        http_addr: String::new(),
                    },
                );
            }
            LinkEvent::Ready(ses) => {
                let Some(name) = peer_name(&ses) else { return };
                if let Some(p) = self.peers.get_mut(&name) {
                    if p.session.get_id() != ses.actor.get_id() {
                        p.session = ses.actor.clone();
                    }
                    p.ready = true;
                    p.last_seen = Instant::now();
                }
                info!(peer = %name, "cluster link ready");
                self.hello(&name);
            }
            LinkEvent::Closed(ses) => {
                if self.unauthenticated.remove(&ses.actor.get_id()) {
                    warn!(
                        peer_addr = %ses.peer_addr,
                        "cluster peer refused: link closed before authentication (a wrong cookie, a duplicate of a simultaneous dial, or a peer that stalled mid-handshake)"
                    );
                    metrics::counter!("chat_cluster_refused_total").increment(1);
                    return;
                }
                let Some(name) = peer_name(&ses) else { return };
                let ours = self
                    .peers
                    .get(&name)
                    .is_some_and(|p| p.session.get_id() == ses.actor.get_id());
                if ours {
                    warn!(peer = %name, "cluster link closed");
                    self.peers.remove(&name);
                    // A peer dropping us right after we stalled past the
                    // failure timeout has declared us down and taken our
                    // groups. (The tick may not have run yet after a resume:
                    // a stale last tick is the same evidence.)
                    let stalled = self.last_tick.elapsed() > self.failure_timeout()
                        || self.suspect_pause_until.is_some_and(|t| Instant::now() < t);
                    if stalled {
                        self.suspect_pause_until = None;
                        self.recover_from_pause();
                    }
                    self.publish_view();
                }
            }
        }
    }

    fn on_peer(&mut self, e: PeerEvent) {
        match e {
            PeerEvent::Pong { from, .. } => {
                if let Some(p) = self.peers.get_mut(&from) {
                    p.last_seen = Instant::now();
                    if !p.answered {
                        p.answered = true;
                        info!(peer = %from, "peer is live");
                        self.publish_view();
                    }
                }
            }
            PeerEvent::Hello {
                from,
                cluster_addr,
                draining,
                known,
                http_addr,
            } => {
                if !cluster_addr.is_empty() {
                    self.known.insert(from.clone(), cluster_addr.clone());
                }
                for k in known {
                    if let Some((n, a)) = k.split_once('=')
                        && n != self.name
                    {
                        self.known
                            .entry(n.to_string())
                            .or_insert_with(|| a.to_string());
                    }
                }
                if let Some(p) = self.peers.get_mut(&from) {
                    p.http_addr = http_addr;
                    if !cluster_addr.is_empty() {
                        p.cluster_addr = cluster_addr;
                    }
                    if p.draining != draining {
                        p.draining = draining;
                        info!(peer = %from, draining, "peer drain state");
                        self.publish_view();
                    }
                }
            }
        }
    }

    fn hello(&self, to: &str) {
        let known = self.known.iter().map(|(n, a)| format!("{n}={a}")).collect();
        self.router.send_to_node(
            to,
            Env::Hello(v1::Hello {
                cluster_addr: self.config.listen.to_string(),
                draining: self.draining.load(Ordering::Acquire),
                known,
                http_addr: self.http_addr.to_string(),
            }),
        );
    }

    fn live(&self, p: &Peer) -> bool {
        p.ready && p.answered && p.last_seen.elapsed() < self.failure_timeout()
    }

    /// Recomputes the view and hands it to the router if it changed.
    fn publish_view(&mut self) {
        let mut owners = Vec::new();
        let mut peers = Vec::new();
        if !self.draining.load(Ordering::Acquire) {
            owners.push(self.name.clone());
        }
        for (name, p) in &self.peers {
            if self.live(p) {
                peers.push(name.clone());
                if !p.draining {
                    owners.push(name.clone());
                }
            }
        }
        owners.sort();
        peers.sort();
        if (owners.clone(), peers.clone()) != self.last_view {
            info!(owners = ?owners, peers = ?peers, "cluster view");
            metrics::gauge!("chat_cluster_live_nodes").set((peers.len() + 1) as f64);
            self.last_view = (owners.clone(), peers.clone());
            self.router.set_view(owners, peers);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let gap = now.duration_since(self.last_tick);
        self.last_tick = now;
        if gap > self.failure_timeout() {
            // We did not run for a while (paused, or starved of CPU). Peers'
            // silence in that time is ours, not theirs: give them a fresh
            // timeout. Whether they declared *us* down shows in the links
            // they drop now (see `on_link`).
            warn!(
                stalled_ms = gap.as_millis() as u64,
                "this node did not run past the failure timeout"
            );
            self.suspect_pause_until = Some(now + self.failure_timeout() * 2);
            for p in self.peers.values_mut() {
                p.last_seen = now;
            }
        }
        // Declare silent peers down and cut their links.
        let timeout = self.failure_timeout();
        let dead: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.ready && p.last_seen.elapsed() >= timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for name in dead {
            if let Some(p) = self.peers.remove(&name) {
                warn!(peer = %name, silent_ms = p.last_seen.elapsed().as_millis() as u64, "peer declared down");
                metrics::counter!("chat_cluster_peers_declared_down_total").increment(1);
                p.session.stop(Some("failure detector: peer silent".into()));
            }
        }
        self.publish_view();
        // Requests a peer never answered (it may have lost them) end here.
        self.router
            .pending()
            .expire(self.router.config().tuning.call_timeout);
        self.ping_seq += 1;
        let names: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.ready)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.router
                .send_to_node(&n, Env::Ping(v1::Ping { seq: self.ping_seq }));
            if self.ping_seq.is_multiple_of(HELLO_EVERY_PINGS) {
                self.hello(&n);
            }
        }
    }

    /// This process did not run for `gap`: peers declared it down and took
    /// its groups. Drop every link, send clients away, retire the group
    /// actors, and rejoin from scratch.
    fn recover_from_pause(&mut self) {
        warn!("peers declared this node down while it was paused; rejoining");
        metrics::counter!("chat_cluster_pauses_total").increment(1);
        for (_, p) in self.peers.drain() {
            p.session.stop(Some("rejoining after a pause".into()));
        }
        let goaway = SharedPush::new(Kind::Goaway(v1::Goaway {
            reason: "node was unavailable; reconnect".into(),
        }));
        let _ = self.router.relay().cast(RelayMessage::CloseAll {
            push: Some(goaway),
            code: CLOSE_RECONNECT,
        });
        self.router.retire_all_groups();
        self.publish_view();
    }

    fn redial(&mut self) {
        let connected: HashSet<&str> = self
            .peers
            .values()
            .map(|p| p.cluster_addr.as_str())
            .collect();
        let own = self.config.listen.to_string();
        let mut targets: Vec<String> = self
            .known
            .iter()
            .filter(|(n, _)| !self.peers.contains_key(*n))
            .map(|(_, a)| a.clone())
            .collect();
        for s in &self.config.seeds {
            if !targets.contains(s) {
                targets.push(s.clone());
            }
        }
        targets.retain(|a| *a != own && !connected.contains(a.as_str()));
        for addr in targets {
            let server = self.server.clone();
            tokio::spawn(async move {
                let dial = ractor_cluster::client_connect(&server, addr.as_str());
                match tokio::time::timeout(Duration::from_secs(2), dial).await {
                    Ok(Ok(())) => debug!(addr = %addr, "dialled peer"),
                    Ok(Err(e)) => debug!(addr = %addr, error = %e, "peer not reachable"),
                    Err(_) => debug!(addr = %addr, "dialling peer timed out"),
                }
            });
        }
    }

    fn start_drain(&mut self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        info!("draining: handing every group over");
        let names: Vec<String> = self.peers.keys().cloned().collect();
        for n in names {
            self.hello(&n);
        }
        self.publish_view();
    }

    async fn drained(&self) -> bool {
        match self.router.stats().await {
            Ok((host, _)) => host.groups == 0,
            Err(_) => false,
        }
    }

    fn status(&self) -> Vec<NodeStatus> {
        let mut out = vec![NodeStatus {
            name: self.name.clone(),
            http_addr: self.http_addr.to_string(),
            cluster_addr: self.config.listen.to_string(),
            live: true,
            draining: self.draining.load(Ordering::Acquire),
        }];
        for (name, p) in &self.peers {
            out.push(NodeStatus {
                name: name.clone(),
                http_addr: p.http_addr.clone(),
                cluster_addr: p.cluster_addr.clone(),
                live: self.live(p),
                draining: p.draining,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
