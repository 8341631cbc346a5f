//! The host: one actor per node that starts, supervises and retires the
//! node's entity actors (groups and presences), and keeps the registries the
//! router reads.
//!
//! Who talks to it: the [`Router`] (activate an entity on a miss or replace
//! a stopping one, retire an idle or failed one, passivate an idle presence
//! and keep its [`Dormant`] record, rebalance after a view change, stats,
//! stop all). Entity actors are linked to it: when one
//! terminates or fails, the host drops it from its registry, so the next
//! request starts a fresh one (a group reloads from storage).
//!
//! What it must not do: wait on storage (entities load in their own
//! `post_start`), or let two live actors of one entity sit in a registry.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{debug, info, warn};

use crate::error::ChatError;
use crate::group::{Group, GroupArgs, GroupMessage};
use crate::ids::{GroupId, UserId};
use crate::presence::{
    self, Dormant, DormantPresences, Presence, PresenceArgs, PresenceMessage, PresenceOp,
    SessionAddr,
};
use crate::router::Router;

/// Running entity actors of one kind, by id: written by the host only, read
/// by every router clone.
pub struct Registry<K, M>(Mutex<HashMap<K, ActorRef<M>>>);

impl<K: Eq + Hash + Clone, M> Registry<K, M> {
    /// Locks the map. A poisoned lock only means a panic elsewhere while
    /// holding it; the map itself is always consistent (single inserts and
    /// removes).
    pub fn lock(&self) -> MutexGuard<'_, HashMap<K, ActorRef<M>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running actor of `key`.
    pub fn get(&self, key: &K) -> Option<ActorRef<M>> {
        self.lock().get(key).cloned()
    }

    /// Drops `key` if `actor` is what the registry holds for it.
    fn unregister(&self, key: &K, actor: ActorId) -> Option<ActorRef<M>> {
        let mut reg = self.lock();
        match reg.get(key) {
            Some(a) if a.get_id() == actor => reg.remove(key),
            _ => None,
        }
    }

    /// Removes and returns every entry whose key fails `keep`.
    fn take_unless(&self, keep: impl Fn(&K) -> bool) -> Vec<ActorRef<M>> {
        let mut reg = self.lock();
        let gone: Vec<K> = reg.keys().filter(|k| !keep(k)).cloned().collect();
        gone.into_iter().filter_map(|k| reg.remove(&k)).collect()
    }
}

impl<K, M> Default for Registry<K, M> {
    fn default() -> Self {
        Registry(Mutex::new(HashMap::new()))
    }
}

/// The node's registries.
#[derive(Default)]
pub struct Registries {
    /// Group actors.
    pub groups: Registry<GroupId, GroupMessage>,
    /// Presence actors.
    pub presence: Registry<UserId, PresenceMessage>,
    /// Passivated presence actors' state (a user is in at most one of
    /// `presence` and `dormant`, except while an actor passivates).
    pub dormant: DormantPresences,
}

/// An entity the host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A group.
    Group(GroupId),
    /// A user's presence.
    Presence(UserId),
}

/// Messages of the host.
#[derive(Debug)]
pub enum HostMessage {
    /// Sent once by [`Router::start`]: the router entity actors are given.
    Init(Router),
    /// Return the group's actor, starting it if it is not running. With a
    /// stale actor id (a cast to it failed: it is stopping), that actor is
    /// dropped from the registry first.
    Activate(
        GroupId,
        Option<ActorId>,
        RpcReplyPort<Result<ActorRef<GroupMessage>, ChatError>>,
    ),
    /// The same for a user's presence actor.
    ActivatePresence(
        UserId,
        Option<ActorId>,
        RpcReplyPort<Result<ActorRef<PresenceMessage>, ChatError>>,
    ),
    /// An entity actor wants to stop: drop it from its registry, then send
    /// it its `Retire` message.
    Retire {
        /// The entity.
        entity: Entity,
        /// The actor asking (ignored if the registry holds another).
        actor: ActorId,
    },
    /// A presence actor (online, unwatched, idle) wants to passivate: drop
    /// it from the registry, then send it `Passivate`.
    Passivate {
        /// Its user.
        user: UserId,
        /// The actor asking (ignored if the registry holds another).
        actor: ActorId,
    },
    /// A session's touch of a user with no presence actor and no dormant
    /// record here: pass it to the actor if one started meanwhile, else
    /// record it (the user becomes dormant-online without an actor).
    PresenceTouch {
        /// The user.
        user: UserId,
        /// The session.
        session: SessionAddr,
    },
    /// A passivated presence actor's state: keep it (or give it to the
    /// actor that started meanwhile, or to the user's new owner).
    Dormant {
        /// The user.
        user: UserId,
        /// The state.
        dormant: Dormant,
    },
    /// The cluster view changed: retire the entity actors this node no
    /// longer owns.
    Rebalance,
    /// Retire every entity actor (keep serving: the next request starts a
    /// fresh one, which loads from storage and takes a new epoch).
    RetireAll,
    /// Timer: tick every presence actor (one node-wide timer) and wake
    /// dormant users with a quiet session.
    Tick,
    /// Counts.
    Stats(RpcReplyPort<HostStats>),
    /// Retire every entity actor and refuse new ones; answer once all have
    /// stopped.
    StopAll(RpcReplyPort<()>),
}

impl ractor::Message for HostMessage {}

/// Counts reported by [`HostMessage::Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Group actors running on this node.
    pub groups: usize,
    /// Presence actors running on this node.
    pub presences: usize,
    /// Online users whose presence actor is passivated.
    pub dormant_presences: usize,
}

/// The host's state.
///
/// Invariants: every actor in a registry is a live child of the host and is
/// in `children`; `children` may also hold retiring actors no longer in a
/// registry, until they terminate.
pub struct HostState {
    router: Option<Router>,
    registries: Arc<Registries>,
    children: HashMap<ActorId, Entity>,
    stop_waiters: Vec<RpcReplyPort<()>>,
    stopping: bool,
}

/// The host actor.
pub struct Host;

fn retire_groups(actors: Vec<ActorRef<GroupMessage>>) {
    for a in actors {
        let _ = a.cast(GroupMessage::Retire);
    }
}

fn retire_presences(actors: Vec<ActorRef<PresenceMessage>>) {
    for a in actors {
        let _ = a.cast(PresenceMessage::Retire);
    }
}

/// Hands dormant users' sessions to whichever node owns each user now (the
/// router starts actors there, or here again).
fn hand_over_dormant(router: &Router, records: Vec<(UserId, Dormant)>) {
    let users = records
        .into_iter()
        .map(|(u, d)| (u, d.into_sessions(), Vec::new()))
        .collect();
    presence::hand_over(router, users);
}

impl HostState {
    fn answer_stop_waiters(&mut self) {
        if self.stopping && self.children.is_empty() {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Retires every entity actor. Dormant users are handed over again
    /// (`keep_dormant == false`: the node is stopping, they are dropped).
    fn retire_all(&mut self, keep_dormant: bool) -> usize {
        let groups = self.registries.groups.take_unless(|_| false);
        let presences = self.registries.presence.take_unless(|_| false);
        let dormant = self.registries.dormant.take_unless(|_| false);
        let n = groups.len() + presences.len();
        retire_groups(groups);
        retire_presences(presences);
        if keep_dormant && let Some(router) = &self.router {
            hand_over_dormant(router, dormant);
        }
        n
    }

    /// Starts an entity actor (linked to the host) and registers it.
    async fn spawn_group(
        &mut self,
        myself: &ActorRef<HostMessage>,
        group: GroupId,
    ) -> Result<ActorRef<GroupMessage>, ChatError> {
        let router = self.ready()?;
        let args = GroupArgs {
            id: group.clone(),
            router,
        };
        let (actor, _) = Actor::spawn_linked(None, Group, args, myself.get_cell())
            .await
            .map_err(|e| ChatError::Unavailable(format!("group start: {e}")))?;
        self.children
            .insert(actor.get_id(), Entity::Group(group.clone()));
        self.registries.groups.lock().insert(group, actor.clone());
        metrics::counter!("chat_group_activations_total").increment(1);
        Ok(actor)
    }

    async fn spawn_presence(
        &mut self,
        myself: &ActorRef<HostMessage>,
        user: UserId,
        dormant: Option<Dormant>,
    ) -> Result<ActorRef<PresenceMessage>, ChatError> {
        let router = self.ready()?;
        let args = PresenceArgs {
            user: user.clone(),
            router,
            dormant,
        };
        let (actor, _) = Actor::spawn_linked(None, Presence, args, myself.get_cell())
            .await
            .map_err(|e| ChatError::Unavailable(format!("presence start: {e}")))?;
        self.children
            .insert(actor.get_id(), Entity::Presence(user.clone()));
        self.registries.presence.lock().insert(user, actor.clone());
        Ok(actor)
    }

    fn ready(&self) -> Result<Router, ChatError> {
        if self.stopping {
            return Err(ChatError::Unavailable("node is stopping".into()));
        }
        self.router
            .clone()
            .ok_or_else(|| ChatError::Unavailable("node is starting".into()))
    }
}

impl Actor for Host {
    type Msg = HostMessage;
    type State = HostState;
    type Arguments = Arc<Registries>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        registries: Arc<Registries>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(HostState {
            router: None,
            registries,
            children: HashMap::new(),
            stop_waiters: Vec::new(),
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            HostMessage::Init(router) => {
                let t = &router.config().tuning;
                let period = (t.presence_ttl / 4)
                    .min(t.presence_idle / 2)
                    .max(std::time::Duration::from_millis(100));
                myself.send_interval(period, || HostMessage::Tick);
                state.router = Some(router);
            }
            HostMessage::Tick => {
                for a in state.registries.presence.lock().values() {
                    let _ = a.cast(PresenceMessage::Tick);
                }
                let Some(router) = state.router.clone() else {
                    return Ok(());
                };
                // A quiet session of a dormant user: its actor decides.
                let ttl = router.config().tuning.presence_ttl;
                for (user, d) in state.registries.dormant.take_expired(ttl) {
                    match state.spawn_presence(&myself, user.clone(), Some(d)).await {
                        Ok(a) => {
                            let _ = a.cast(PresenceMessage::Tick);
                        }
                        Err(e) => debug!(user = %user, error = %e, "presence not woken"),
                    }
                }
            }
            HostMessage::Activate(group, stale, reply) => {
                if let Some(stale) = stale {
                    state.registries.groups.unregister(&group, stale);
                }
                let result = match state.registries.groups.get(&group) {
                    Some(a) => Ok(a),
                    None => state.spawn_group(&myself, group.clone()).await,
                };
                if let Err(e) = &result {
                    warn!(group = %group, error = %e, "group actor not started");
                }
                let _ = reply.send(result);
            }
            HostMessage::ActivatePresence(user, stale, reply) => {
                if let Some(stale) = stale {
                    state.registries.presence.unregister(&user, stale);
                }
                let result = match state.registries.presence.get(&user) {
                    Some(a) => Ok(a),
                    None => {
                        let dormant = state.registries.dormant.take(&user);
                        state.spawn_presence(&myself, user, dormant).await
                    }
                };
                let _ = reply.send(result);
            }
            HostMessage::Retire { entity, actor } => match entity {
                Entity::Group(g) => {
                    if let Some(a) = state.registries.groups.unregister(&g, actor) {
                        debug!(group = %g, "retiring group actor");
                        let _ = a.cast(GroupMessage::Retire);
                    }
                }
                Entity::Presence(u) => {
                    if let Some(a) = state.registries.presence.unregister(&u, actor) {
                        let _ = a.cast(PresenceMessage::Retire);
                    }
                }
            },
            HostMessage::Passivate { user, actor } => {
                if let Some(a) = state.registries.presence.unregister(&user, actor) {
                    let _ = a.cast(PresenceMessage::Passivate);
                }
            }
            HostMessage::PresenceTouch { user, session } => {
                if let Some(a) = state.registries.presence.get(&user) {
                    let op = PresenceOp::Touch;
                    let _ = a.cast(PresenceMessage::Op { session, op });
                } else if !state.stopping {
                    state.registries.dormant.touch_or_insert(&user, session);
                }
            }
            HostMessage::Dormant { user, dormant } => {
                let Some(router) = state.router.clone() else {
                    return Ok(());
                };
                if state.stopping {
                    // Sessions are closing with the node.
                } else if let Some(a) = state.registries.presence.get(&user) {
                    let _ = a.cast(PresenceMessage::Absorb(dormant));
                } else if router.owns(user.as_str()) {
                    metrics::counter!("chat_presence_passivations_total").increment(1);
                    state.registries.dormant.insert(user, dormant);
                } else {
                    hand_over_dormant(&router, vec![(user, dormant)]);
                }
            }
            HostMessage::Rebalance => {
                let Some(router) = &state.router else {
                    return Ok(());
                };
                let groups = state
                    .registries
                    .groups
                    .take_unless(|g| router.owns(g.as_str()));
                let presences = state
                    .registries
                    .presence
                    .take_unless(|u| router.owns(u.as_str()));
                if !groups.is_empty() || !presences.is_empty() {
                    info!(
                        groups = groups.len(),
                        presences = presences.len(),
                        "handing over entities this node no longer owns"
                    );
                }
                retire_groups(groups);
                retire_presences(presences);
                let dormant = state
                    .registries
                    .dormant
                    .take_unless(|u| router.owns(u.as_str()));
                hand_over_dormant(router, dormant);
            }
            HostMessage::RetireAll => {
                let n = state.retire_all(true);
                info!(actors = n, "retiring every entity actor");
            }
            HostMessage::Stats(reply) => {
                let _ = reply.send(HostStats {
                    groups: state.registries.groups.lock().len(),
                    presences: state.registries.presence.lock().len(),
                    dormant_presences: state.registries.dormant.len(),
                });
            }
            HostMessage::StopAll(reply) => {
                state.stopping = true;
                let n = state.retire_all(false);
                info!(actors = n, "stopping every entity actor");
                state.stop_waiters.push(reply);
                state.answer_stop_waiters();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.filter(|r| r != "retired"))
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if let Some(entity) = state.children.remove(&id) {
            match &entity {
                Entity::Group(g) => {
                    state.registries.groups.unregister(g, id);
                }
                Entity::Presence(u) => {
                    state.registries.presence.unregister(u, id);
                }
            }
            if let Some(reason) = failure {
                info!(entity = ?entity, reason = %reason, "entity actor ended");
            }
        }
        state.answer_stop_waiters();
        Ok(())
    }
}
