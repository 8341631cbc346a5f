//! The host: one actor per node that starts, supervises and retires the
//! node's group actors, and keeps the registry the router reads.
//!
//! Who talks to it: the [`Router`] (activate a group on a miss or replace a
//! stopping one, retire an idle or failed one, stats, stop all). Group actors are
//! linked to it: when one terminates or fails, the host drops it from the
//! registry, so the next request starts a fresh one from storage.
//!
//! What it must not do: wait on storage (group actors load in their own
//! `post_start`), or let two live actors of one group sit in the registry.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{debug, info, warn};

use crate::error::ChatError;
use crate::group::{Group, GroupArgs, GroupMessage};
use crate::ids::GroupId;
use crate::router::{Registry, Router, lock};

/// Messages of the host.
#[derive(Debug)]
pub enum HostMessage {
    /// Sent once by [`Router::start`]: the router group actors are given.
    Init(Router),
    /// Return the group's actor, starting it if it is not running. With a
    /// stale actor id (a cast to it failed: it is stopping), that actor is
    /// dropped from the registry first.
    Activate(
        GroupId,
        Option<ActorId>,
        RpcReplyPort<Result<ActorRef<GroupMessage>, ChatError>>,
    ),
    /// A group actor wants to stop: drop it from the registry, then send it
    /// [`GroupMessage::Retire`].
    Retire {
        /// The group.
        group: GroupId,
        /// The actor asking (ignored if the registry holds another).
        actor: ActorId,
    },
    /// The cluster view changed: retire the group actors this node no
    /// longer owns.
    Rebalance,
    /// Retire every group actor (keep serving: the next request starts a
    /// fresh one, which loads from storage and takes a new epoch).
    RetireAll,
    /// Counts.
    Stats(RpcReplyPort<HostStats>),
    /// Retire every group actor; answer once all have stopped.
    StopAll(RpcReplyPort<()>),
}

impl ractor::Message for HostMessage {}

/// Counts reported by [`HostMessage::Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Group actors running (or stopping) on this node.
    pub groups: usize,
}

/// The host's state.
///
/// Invariants: every actor in the registry is a live child of the host and
/// is in `children`; `children` may also hold retiring actors no longer in
/// the registry, until they terminate.
pub struct HostState {
    router: Option<Router>,
    registry: Arc<Registry>,
    children: HashMap<ActorId, GroupId>,
    stop_waiters: Vec<RpcReplyPort<()>>,
    stopping: bool,
}

/// The host actor.
pub struct Host;

impl HostState {
    /// Drops `group` from the registry if `actor` is what it holds there.
    fn unregister(&mut self, group: &GroupId, actor: ActorId) -> Option<ActorRef<GroupMessage>> {
        let mut reg = lock(&self.registry);
        match reg.get(group) {
            Some(a) if a.get_id() == actor => reg.remove(group),
            _ => None,
        }
    }

    fn answer_stop_waiters(&mut self) {
        if self.stopping && self.children.is_empty() {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

impl Actor for Host {
    type Msg = HostMessage;
    type State = HostState;
    type Arguments = Arc<Registry>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        registry: Arc<Registry>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(HostState {
            router: None,
            registry,
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
            HostMessage::Init(router) => state.router = Some(router),
            HostMessage::Activate(group, stale, reply) => {
                if let Some(stale) = stale {
                    state.unregister(&group, stale);
                }
                if let Some(a) = lock(&state.registry).get(&group) {
                    let _ = reply.send(Ok(a.clone()));
                    return Ok(());
                }
                if state.stopping {
                    let _ = reply.send(Err(ChatError::Unavailable("node is stopping".into())));
                    return Ok(());
                }
                let Some(router) = state.router.clone() else {
                    let _ = reply.send(Err(ChatError::Unavailable("node is starting".into())));
                    return Ok(());
                };
                let args = GroupArgs {
                    id: group.clone(),
                    router,
                };
                match Actor::spawn_linked(None, Group, args, myself.get_cell()).await {
                    Ok((actor, _)) => {
                        state.children.insert(actor.get_id(), group.clone());
                        lock(&state.registry).insert(group, actor.clone());
                        metrics::counter!("chat_group_activations_total").increment(1);
                        let _ = reply.send(Ok(actor));
                    }
                    Err(e) => {
                        warn!(group = %group, error = %e, "group actor failed to start");
                        let _ =
                            reply.send(Err(ChatError::Unavailable(format!("group start: {e}"))));
                    }
                }
            }
            HostMessage::Retire { group, actor } => {
                if let Some(a) = state.unregister(&group, actor) {
                    debug!(group = %group, "retiring group actor");
                    let _ = a.cast(GroupMessage::Retire);
                }
            }
            HostMessage::Rebalance => {
                let Some(router) = &state.router else {
                    return Ok(());
                };
                let moving: Vec<_> = {
                    let mut reg = lock(&state.registry);
                    let gone: Vec<GroupId> = reg
                        .keys()
                        .filter(|g| !router.owns(g.as_str()))
                        .cloned()
                        .collect();
                    gone.into_iter()
                        .filter_map(|g| reg.remove(&g).map(|a| (g, a)))
                        .collect()
                };
                if !moving.is_empty() {
                    info!(
                        groups = moving.len(),
                        "handing over groups this node no longer owns"
                    );
                }
                for (_, a) in moving {
                    let _ = a.cast(GroupMessage::Retire);
                }
            }
            HostMessage::RetireAll => {
                let actors: Vec<_> = lock(&state.registry).drain().map(|(_, a)| a).collect();
                info!(groups = actors.len(), "retiring every group actor");
                for a in actors {
                    let _ = a.cast(GroupMessage::Retire);
                }
            }
            HostMessage::Stats(reply) => {
                let _ = reply.send(HostStats {
                    groups: lock(&state.registry).len(),
                });
            }
            HostMessage::StopAll(reply) => {
                state.stopping = true;
                let actors: Vec<_> = lock(&state.registry).drain().map(|(_, a)| a).collect();
                info!(groups = actors.len(), "retiring every group actor");
                for a in actors {
                    let _ = a.cast(GroupMessage::Retire);
                }
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
        if let Some(group) = state.children.remove(&cell.get_id()) {
            state.unregister(&group, cell.get_id());
            if let Some(reason) = failure {
                info!(group = %group, reason = %reason, "group actor ended");
            }
        }
        state.answer_stop_waiters();
        Ok(())
    }
}
