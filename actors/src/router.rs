//! Routing: how anything on a node reaches a group, a session's relay or the
//! host, by id, without knowing where the actor lives.
//!
//! [`Router`] is the one API callers use (sessions, internal services, the
//! node). It looks a group up in the node's registry and asks the host to
//! start it on a miss; it never hands out where an entity lives.
//!
//! What it must not do: cache actor references outside the registry (they
//! go stale when an actor stops), or block.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use prost::Message as _;
use proto::Encoding;
use proto::v1::{self, client_frame::Kind as Req, envelope::Kind as Env, server_frame::Kind};
use ractor::{Actor, ActorRef, MessagingErr, call_t};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::cluster::{PORT_SCOPE, PeerEvent, Pending, Port, Wire, relay_envelopes, result_frame};
use crate::committer::Committer;
use crate::config::ActorConfig;
use crate::error::{ChatError, ChatResult};
use crate::group::{GroupMessage, GroupOp};
use crate::host::{Entity, Host, HostMessage, HostStats, Registries};
use crate::ids::{GroupId, SessionId, UserId};
use crate::meters::Meters;
use crate::outbound::SharedPush;
use crate::outbound::{RemoteReplier, ReplyTo};
use crate::placement;
use crate::presence::{Dormant, PresenceMessage, PresenceOp, SessionAddr};
use crate::relay::{Relay, RelayArgs, RelayMessage, RelayStats};
use crate::request;
use crate::store::Store;

/// The cluster as this node sees it.
#[derive(Debug, Clone)]
struct View {
    /// Nodes that own entities (live, not draining), sorted; includes this
    /// node unless it is draining.
    owners: Arc<Vec<String>>,
    /// Connected, live peers (draining ones too): they get deliveries.
    peers: Arc<Vec<String>>,
}

struct Inner {
    node: String,
    store: Store,
    committer: Committer,
    meters: Arc<Meters>,
    config: ActorConfig,
    registries: Arc<Registries>,
    host: ActorRef<HostMessage>,
    relay: ActorRef<RelayMessage>,
    next_session: AtomicU64,
    view: RwLock<View>,
    pending: Pending,
    peer_events: Mutex<Option<mpsc::Sender<PeerEvent>>>,
}

/// Routing, storage and configuration of one node. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("node", &self.inner.node)
            .finish()
    }
}

impl Router {
    /// Starts the node's relay, host and port and returns the router.
    pub async fn start(node: &str, store: Store, config: ActorConfig) -> Result<Router, String> {
        Self::start_with(node, store, config, None).await
    }

    /// [`Router::start`], with the port actor (every envelope from other
    /// nodes, including the failure detector's pings and pongs) on
    /// `port_runtime` if given, so a busy client runtime cannot delay it.
    pub async fn start_with(
        node: &str,
        store: Store,
        config: ActorConfig,
        port_runtime: Option<tokio::runtime::Handle>,
    ) -> Result<Router, String> {
        config.validate()?;
        let tick = (config.tuning.presence_ttl / 3).max(std::time::Duration::from_millis(100));
        let meters = Arc::new(Meters::resolve());
        let args = RelayArgs {
            tick,
            meters: meters.clone(),
        };
        let (relay, _) = Actor::spawn(Some(format!("{node}.relay")), Relay, args)
            .await
            .map_err(|e| format!("starting relay: {e}"))?;
        let registries = Arc::new(Registries::default());
        let (host, _) = Actor::spawn(Some(format!("{node}.host")), Host, registries.clone())
            .await
            .map_err(|e| format!("starting host: {e}"))?;
        let router = Router {
            inner: Arc::new(Inner {
                node: node.to_string(),
                committer: Committer::start(store.clone(), meters.clone()),
                meters,
                store,
                config,
                registries,
                host: host.clone(),
                relay,
                next_session: AtomicU64::new(1),
                view: RwLock::new(View {
                    owners: Arc::new(vec![node.to_string()]),
                    peers: Arc::new(Vec::new()),
                }),
                pending: Pending::default(),
                peer_events: Mutex::new(None),
            }),
        };
        host.cast(HostMessage::Init(router.clone()))
            .map_err(|e| format!("initialising host: {e}"))?;
        let port = Actor::spawn(Some(format!("{node}.port")), Port, router.clone());
        let started = match port_runtime {
            Some(rt) => rt
                .spawn(port)
                .await
                .map_err(|e| format!("starting port: {e}"))?,
            None => port.await,
        };
        started.map_err(|e| format!("starting port: {e}"))?;
        Ok(router)
    }

    fn view(&self) -> View {
        self.inner
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the cluster view (called by the node's cluster manager): the
    /// nodes that own entities and the peers that get deliveries. Group
    /// actors this node no longer owns are retired (they flush first); the
    /// requests waiting on peers that left are answered `UNAVAILABLE`.
    pub fn set_view(&self, mut owners: Vec<String>, mut peers: Vec<String>) {
        owners.sort();
        owners.dedup();
        peers.sort();
        peers.dedup();
        peers.retain(|p| p != &self.inner.node);
        let old = {
            let mut v = self.inner.view.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(
                &mut *v,
                View {
                    owners: Arc::new(owners),
                    peers: Arc::new(peers.clone()),
                },
            )
        };
        for gone in old.peers.iter().filter(|p| !peers.contains(p)) {
            self.inner.pending.fail_node(gone);
        }
        let _ = self.inner.host.cast(HostMessage::Rebalance);
    }

    /// Every node whose port is reachable now (its link is up), live in our
    /// view or not yet. Deliveries go to all of them: a node may already
    /// send us requests (it counts us live) before we count it live, and
    /// its members must not miss the pushes of what we commit meanwhile.
    pub fn connected_peers(&self) -> Vec<String> {
        let mut peers = ractor::pg::which_scoped_groups(&PORT_SCOPE.to_string());
        peers.retain(|n| *n != self.inner.node);
        peers
    }

    /// The node that owns `key` (a group or user id) in the current view.
    /// With no owner at all (a lone draining node) it is this node.
    pub fn owner_of(&self, key: &str) -> String {
        let v = self.view();
        placement::owner(key, &v.owners)
            .unwrap_or(&self.inner.node)
            .to_string()
    }

    /// Whether this node owns `key`.
    pub fn owns(&self, key: &str) -> bool {
        self.owner_of(key) == self.inner.node
    }

    /// Requests of this node waiting on peers.
    pub fn pending(&self) -> &Pending {
        &self.inner.pending
    }

    /// Where the port reports pongs and hellos (set by the cluster manager).
    pub fn set_peer_listener(&self, tx: mpsc::Sender<PeerEvent>) {
        *self
            .inner
            .peer_events
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    pub(crate) fn peer_event(&self, ev: PeerEvent) {
        let tx = self
            .inner
            .peer_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(tx) = tx {
            // A full queue drops the event: pings repeat.
            let _ = tx.try_send(ev);
        }
    }

    /// Sends an envelope to `node`'s port. Returns false when the node is
    /// not reachable (no port of it in `pg`).
    pub fn send_to_node(&self, node: &str, kind: Env) -> bool {
        let Some(cell) = ractor::pg::get_scoped_members(&PORT_SCOPE.to_string(), &node.to_string())
            .into_iter()
            .next()
        else {
            debug!(node, "no port for node");
            return false;
        };
        let env = v1::Envelope {
            from_node: self.inner.node.clone(),
            kind: Some(kind),
        };
        let port: ActorRef<Wire> = cell.into();
        self.inner.meters.envelopes_out.increment(1);
        port.cast(Wire(env.encode_to_vec())).is_ok()
    }

    pub(crate) fn local_relay(&self, msg: RelayMessage) {
        if let Err(e) = self.inner.relay.cast(msg) {
            warn!(error = %e, "relay unreachable");
        }
    }

    pub(crate) fn replier(&self) -> Arc<dyn RemoteReplier> {
        Arc::new(self.clone())
    }

    /// Routes a client request of `user` for `group` to the group's owner,
    /// wherever it is; the answer goes through `reply`.
    pub async fn route(&self, group: &GroupId, user: &UserId, req: Req, reply: ReplyTo) {
        let owner = self.owner_of(group.as_str());
        if owner == self.inner.node {
            match request::group_op(req, &self.inner.config.limits) {
                Ok(op) => {
                    let msg = GroupMessage::Request {
                        user: user.clone(),
                        op,
                        reply,
                    };
                    // On failure the message and its handle are dropped:
                    // the handle answers UNAVAILABLE.
                    if let Err(e) = self.to_group(group, msg).await {
                        debug!(group = %group, error = %e, "routing failed");
                    }
                }
                Err(e) => reply.fail(e),
            }
            return;
        }
        let typing = matches!(req, Req::Typing(_));
        let binary = reply.encoding() == Encoding::Binary;
        // Typing has no reply: nothing waits for it.
        let token = if typing {
            reply.silent();
            0
        } else {
            self.inner.pending.insert(&owner, reply)
        };
        let env = Env::GroupRequest(v1::GroupRequest {
            group_id: group.to_string(),
            user_id: user.to_string(),
            reply: Some(v1::ReplyAddress { token, binary }),
            request: Some(v1::ClientFrame {
                id: 0,
                kind: Some(req),
            }),
        });
        self.inner.meters.forwarded.increment(1);
        if !self.send_to_node(&owner, env) && token != 0 {
            self.inner.pending.complete(
                token,
                Err(ChatError::Unavailable(format!(
                    "owner {owner} unreachable; retry"
                ))),
            );
        }
    }

    /// Serves a request that another node routed here.
    pub(crate) async fn serve_remote_request(&self, from: &str, req: v1::GroupRequest) {
        let addr = req.reply.unwrap_or_default();
        let encoding = if addr.binary {
            Encoding::Binary
        } else {
            Encoding::Json
        };
        let reply = ReplyTo::remote(self.replier(), from.to_string(), addr.token, encoding);
        let (Some(group), Some(user), Some(kind)) = (
            GroupId::parse(&req.group_id),
            UserId::parse(&req.user_id),
            req.request.and_then(|r| r.kind),
        ) else {
            return reply.fail(ChatError::Invalid("malformed forwarded request".into()));
        };
        if !self.owns(group.as_str()) {
            // Views disagree for a moment (a node joined or left): the
            // client retries and reaches the new owner.
            return reply.fail(ChatError::Unavailable(format!(
                "group {group} is moving; retry"
            )));
        }
        self.route(&group, &user, kind, reply).await;
    }

    /// Posts a system announcement into a group, from any node (an internal
    /// service API). Resolves with the message's seq once committed.
    pub async fn post_system(&self, group: &GroupId, text: String) -> ChatResult<u64> {
        let (reply, rx) = ReplyTo::oneshot();
        let owner = self.owner_of(group.as_str());
        if owner == self.inner.node {
            self.post_system_local(group, text, reply).await;
        } else {
            let token = self.inner.pending.insert(&owner, reply);
            let env = Env::PostSystem(v1::PostSystem {
                group_id: group.to_string(),
                text,
                token,
            });
            if !self.send_to_node(&owner, env) {
                self.inner.pending.complete(
                    token,
                    Err(ChatError::Unavailable(format!("owner {owner} unreachable"))),
                );
            }
        }
        match self.answer(rx).await? {
            Kind::Sent(s) => Ok(s.seq),
            other => Err(ChatError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Waits for an internal caller's answer, at most the call timeout.
    async fn answer(&self, rx: oneshot::Receiver<ChatResult<Kind>>) -> ChatResult<Kind> {
        match tokio::time::timeout(self.inner.config.tuning.call_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ChatError::Unavailable("request dropped".into())),
            Err(_) => Err(ChatError::Unavailable("timed out".into())),
        }
    }

    pub(crate) async fn post_system_local(&self, group: &GroupId, text: String, reply: ReplyTo) {
        let msg = GroupMessage::Request {
            user: UserId::system(),
            op: GroupOp::PostSystem { text },
            reply,
        };
        if let Err(e) = self.to_group(group, msg).await {
            debug!(group = %group, error = %e, "routing failed");
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The node's commit stage.
    pub fn committer(&self) -> &Committer {
        &self.inner.committer
    }

    /// The node's metric handles (see [`crate::meters`]).
    pub fn meters(&self) -> &Meters {
        &self.inner.meters
    }

    /// The configuration.
    pub fn config(&self) -> &ActorConfig {
        &self.inner.config
    }

    /// This node's relay.
    pub fn relay(&self) -> &ActorRef<RelayMessage> {
        &self.inner.relay
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.inner.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// Delivers `msg` to the group's actor on this node, starting it if needed.
    pub async fn to_group(&self, group: &GroupId, msg: GroupMessage) -> ChatResult<()> {
        cast_with_restart(
            msg,
            |stale| self.group_actor(group, stale),
            format!("group {group}"),
        )
        .await
    }

    async fn group_actor(
        &self,
        group: &GroupId,
        stale: Option<ractor::ActorId>,
    ) -> ChatResult<ActorRef<GroupMessage>> {
        if stale.is_none()
            && let Some(a) = self.inner.registries.groups.get(group)
        {
            return Ok(a);
        }
        let timeout = self.inner.config.tuning.call_timeout;
        let result = call_t!(
            self.inner.host,
            HostMessage::Activate,
            timeout.as_millis() as u64,
            group.clone(),
            stale
        );
        match result {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ChatError::Unavailable(format!("host: {e}"))),
        }
    }

    async fn presence_actor(
        &self,
        user: &UserId,
        stale: Option<ractor::ActorId>,
    ) -> ChatResult<ActorRef<PresenceMessage>> {
        if stale.is_none()
            && let Some(a) = self.inner.registries.presence.get(user)
        {
            return Ok(a);
        }
        let timeout = self.inner.config.tuning.call_timeout.as_millis() as u64;
        match call_t!(
            self.inner.host,
            HostMessage::ActivatePresence,
            timeout,
            user.clone(),
            stale
        ) {
            Ok(r) => r,
            Err(e) => Err(ChatError::Unavailable(format!("host: {e}"))),
        }
    }

    /// Delivers `msg` to the user's presence actor on this node.
    async fn to_presence(&self, user: &UserId, msg: PresenceMessage) -> ChatResult<()> {
        cast_with_restart(
            msg,
            |stale| self.presence_actor(user, stale),
            format!("presence of {user}"),
        )
        .await
    }

    /// A session's presence operation on `user`, wherever the user's
    /// presence actor lives. Best effort: sessions repeat touches and
    /// subscriptions every third of the presence TTL.
    pub async fn presence_op(&self, user: &UserId, session: SessionAddr, op: PresenceOp) {
        let owner = self.owner_of(user.as_str());
        if owner == self.inner.node {
            self.local_presence_op(user, session, op).await;
            return;
        }
        let op = match op {
            PresenceOp::Touch => v1::presence_op::Op::Touch,
            PresenceOp::Leave => v1::presence_op::Op::Leave,
            PresenceOp::Subscribe => v1::presence_op::Op::Subscribe,
            PresenceOp::Unsubscribe => v1::presence_op::Op::Unsubscribe,
        };
        self.send_to_node(
            &owner,
            Env::Presence(v1::PresenceOp {
                user_id: user.to_string(),
                op: op as i32,
                session: session.1.0,
                session_node: session.0,
            }),
        );
    }

    /// A presence operation another node sent for one of its sessions.
    pub(crate) async fn serve_presence_op(&self, from: &str, op: v1::PresenceOp) {
        let Some(user) = UserId::parse(&op.user_id) else {
            return;
        };
        let kind = match op.op() {
            v1::presence_op::Op::Touch => PresenceOp::Touch,
            v1::presence_op::Op::Leave => PresenceOp::Leave,
            v1::presence_op::Op::Subscribe => PresenceOp::Subscribe,
            v1::presence_op::Op::Unsubscribe => PresenceOp::Unsubscribe,
            v1::presence_op::Op::Unspecified => return,
        };
        if !self.owns(user.as_str()) {
            return; // Views disagree for a moment; the session repeats it.
        }
        let node = if op.session_node.is_empty() {
            from.to_string()
        } else {
            op.session_node.clone()
        };
        self.local_presence_op(&user, (node, SessionId(op.session)), kind)
            .await;
    }

    /// A presence operation on a user this node owns. A touch of a user
    /// without a presence actor is recorded in its dormant record (in place
    /// here, or by the host, which creates the record); anything else goes
    /// to the actor, which the host starts from the dormant record if
    /// needed.
    async fn local_presence_op(&self, user: &UserId, session: SessionAddr, op: PresenceOp) {
        let registries = &self.inner.registries;
        if op == PresenceOp::Touch && registries.presence.get(user).is_none() {
            if !registries.dormant.touch(user, &session) {
                let touch = HostMessage::PresenceTouch {
                    user: user.clone(),
                    session,
                };
                if let Err(e) = self.inner.host.cast(touch) {
                    debug!(user = %user, error = %e, "presence touch not delivered");
                }
            }
            return;
        }
        let msg = PresenceMessage::Op { session, op };
        if let Err(e) = self.to_presence(user, msg).await {
            debug!(user = %user, error = %e, "presence op not delivered");
        }
    }

    /// A user's presence, from any node (an internal service API).
    pub async fn presence_of(&self, user: &UserId) -> ChatResult<v1::Presence> {
        let (reply, rx) = ReplyTo::oneshot();
        self.query_presence(user, reply).await;
        match self.answer(rx).await? {
            Kind::Presence(p) => Ok(p),
            other => Err(ChatError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub(crate) async fn query_presence(&self, user: &UserId, reply: ReplyTo) {
        let owner = self.owner_of(user.as_str());
        if owner == self.inner.node {
            if let Err(e) = self.to_presence(user, PresenceMessage::Query(reply)).await {
                debug!(user = %user, error = %e, "presence query not delivered");
            }
            return;
        }
        let token = self.inner.pending.insert(&owner, reply);
        let env = Env::PresenceQuery(v1::PresenceQuery {
            user_id: user.to_string(),
            token,
        });
        if !self.send_to_node(&owner, env) {
            self.inner.pending.complete(
                token,
                Err(ChatError::Unavailable(format!("owner {owner} unreachable"))),
            );
        }
    }

    /// Pushes to given sessions anywhere in the cluster (one message per node).
    pub fn deliver_to_sessions(&self, sessions: Vec<SessionAddr>, push: Arc<SharedPush>) {
        let mut by_node: HashMap<String, Vec<SessionId>> = HashMap::new();
        for (node, s) in sessions {
            by_node.entry(node).or_default().push(s);
        }
        for (node, ids) in by_node {
            if node == self.inner.node {
                self.local_relay(RelayMessage::DeliverToSessions {
                    sessions: ids,
                    push: push.clone(),
                });
            } else {
                self.send_to_node(
                    &node,
                    Env::DeliverToSessions(v1::RelayDeliverToSessions {
                        sessions: ids.into_iter().map(|s| s.0).collect(),
                        push: Some(push.frame().clone()),
                    }),
                );
            }
        }
    }

    /// A presence actor wants to stop (no sessions, no subscribers).
    pub fn retire_presence(&self, user: &UserId, actor: &ActorRef<PresenceMessage>) {
        let _ = self.inner.host.cast(HostMessage::Retire {
            entity: Entity::Presence(user.clone()),
            actor: actor.get_id(),
        });
    }

    /// A presence actor of an online user nobody watches has been idle.
    pub fn passivate_presence(&self, user: &UserId, actor: &ActorRef<PresenceMessage>) {
        let _ = self.inner.host.cast(HostMessage::Passivate {
            user: user.clone(),
            actor: actor.get_id(),
        });
    }

    /// A passivated presence actor's state, for the host to keep.
    pub fn store_dormant_presence(&self, user: &UserId, dormant: Dormant) {
        let _ = self.inner.host.cast(HostMessage::Dormant {
            user: user.clone(),
            dormant,
        });
    }

    /// Sends a message to the relay of every live node: one envelope (or a
    /// few, for large batches) per peer, whatever the number of members.
    pub fn broadcast(&self, msg: RelayMessage) {
        let peers = self.connected_peers();
        if !peers.is_empty() {
            let envs = relay_envelopes(&msg);
            for peer in peers.iter() {
                for env in &envs {
                    self.inner.meters.remote_sends.increment(1);
                    self.send_to_node(peer, env.clone());
                }
            }
        }
        self.local_relay(msg);
    }

    /// A group actor asks to stop (idle, or after a failed commit): the host
    /// drops it from the registry and sends it `Retire`.
    pub fn retire(&self, group: &GroupId, actor: &ActorRef<GroupMessage>) {
        let _ = self.inner.host.cast(HostMessage::Retire {
            entity: Entity::Group(group.clone()),
            actor: actor.get_id(),
        });
    }

    /// Retires every group actor of this node (they flush and stop; the
    /// next request reloads the group from storage under a new epoch).
    pub fn retire_all_groups(&self) {
        let _ = self.inner.host.cast(HostMessage::RetireAll);
    }

    /// Running group actors and relay counts.
    pub async fn stats(&self) -> ChatResult<(HostStats, RelayStats)> {
        let t = self.inner.config.tuning.call_timeout.as_millis() as u64;
        let host = call_t!(self.inner.host, HostMessage::Stats, t)
            .map_err(|e| ChatError::Unavailable(format!("host: {e}")))?;
        let relay = call_t!(self.inner.relay, RelayMessage::Stats, t)
            .map_err(|e| ChatError::Unavailable(format!("relay: {e}")))?;
        Ok((host, relay))
    }

    /// Retires every group actor (each flushes its pointers) and waits for
    /// them to stop, at most `deadline`.
    pub async fn stop_groups(&self, deadline: std::time::Duration) -> ChatResult<()> {
        call_t!(
            self.inner.host,
            HostMessage::StopAll,
            deadline.as_millis() as u64
        )
        .map_err(|e| ChatError::Unavailable(format!("stopping groups: {e}")))
    }
}

/// Casts `msg` to the actor `actor_for` returns. Two tries: an actor may
/// stop between the lookup and the cast; the second lookup names it stale,
/// so the host drops it and starts a fresh one.
async fn cast_with_restart<M, F, Fut>(mut msg: M, mut actor_for: F, what: String) -> ChatResult<()>
where
    M: ractor::Message,
    F: FnMut(Option<ractor::ActorId>) -> Fut,
    Fut: std::future::Future<Output = ChatResult<ActorRef<M>>>,
{
    let mut stale = None;
    for _ in 0..2 {
        let actor = actor_for(stale.take()).await?;
        match actor.cast(msg) {
            Ok(()) => return Ok(()),
            Err(MessagingErr::SendErr(back)) => {
                stale = Some(actor.get_id());
                msg = back;
            }
            Err(e) => return Err(ChatError::Internal(format!("routing: {e}"))),
        }
    }
    Err(ChatError::Unavailable(format!(
        "{what} is restarting; retry"
    )))
}

impl RemoteReplier for Router {
    fn remote_reply(&self, node: &str, token: u64, result: ChatResult<Kind>) {
        if token == 0 {
            return;
        }
        let env = Env::Reply(v1::RemoteReply {
            token,
            frame: Some(result_frame(result)),
        });
        self.send_to_node(node, env);
    }
}
