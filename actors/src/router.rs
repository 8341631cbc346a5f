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
use std::sync::{Arc, Mutex, MutexGuard};

use ractor::{Actor, ActorRef, MessagingErr, call_t};
use tracing::warn;

use crate::config::ActorConfig;
use crate::error::{ChatError, ChatResult};
use crate::group::GroupMessage;
use crate::host::{Host, HostMessage, HostStats};
use crate::ids::{GroupId, SessionId};
use crate::relay::{Relay, RelayMessage, RelayStats};
use crate::store::Store;

/// The registry of running group actors on this node: written by the host
/// only, read by every router clone.
pub type Registry = Mutex<HashMap<GroupId, ActorRef<GroupMessage>>>;

struct Inner {
    node: String,
    store: Store,
    config: ActorConfig,
    registry: Arc<Registry>,
    host: ActorRef<HostMessage>,
    relay: ActorRef<RelayMessage>,
    next_session: AtomicU64,
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

/// Locks the registry. A poisoned lock only means a panic elsewhere while
/// holding it; the map itself is always consistent (single inserts/removes).
pub(crate) fn lock(
    registry: &Registry,
) -> MutexGuard<'_, HashMap<GroupId, ActorRef<GroupMessage>>> {
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// Starts the node's relay and host and returns the router.
    pub async fn start(node: &str, store: Store, config: ActorConfig) -> Result<Router, String> {
        config.validate()?;
        let (relay, _) = Actor::spawn(Some(format!("{node}.relay")), Relay, ())
            .await
            .map_err(|e| format!("starting relay: {e}"))?;
        let registry = Arc::new(Registry::default());
        let (host, _) = Actor::spawn(Some(format!("{node}.host")), Host, registry.clone())
            .await
            .map_err(|e| format!("starting host: {e}"))?;
        let router = Router {
            inner: Arc::new(Inner {
                node: node.to_string(),
                store,
                config,
                registry,
                host: host.clone(),
                relay,
                next_session: AtomicU64::new(1),
            }),
        };
        host.cast(HostMessage::Init(router.clone()))
            .map_err(|e| format!("initialising host: {e}"))?;
        Ok(router)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
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

    /// Delivers `msg` to the group's actor, starting it if needed.
    pub async fn to_group(&self, group: &GroupId, msg: GroupMessage) -> ChatResult<()> {
        let mut msg = msg;
        // Two tries: an actor may stop between the lookup and the cast; then
        // the host has (or will have) dropped it and starts a fresh one.
        for _ in 0..2 {
            let actor = self.group_actor(group).await?;
            match actor.cast(msg) {
                Ok(()) => return Ok(()),
                Err(MessagingErr::SendErr(back)) => {
                    self.forget(group, &actor);
                    msg = back;
                }
                Err(e) => return Err(ChatError::Internal(format!("routing: {e}"))),
            }
        }
        Err(ChatError::Unavailable(format!(
            "group {group} is restarting; retry"
        )))
    }

    async fn group_actor(&self, group: &GroupId) -> ChatResult<ActorRef<GroupMessage>> {
        if let Some(a) = lock(&self.inner.registry).get(group) {
            return Ok(a.clone());
        }
        let timeout = self.inner.config.tuning.call_timeout;
        let result = call_t!(
            self.inner.host,
            HostMessage::Activate,
            timeout.as_millis() as u64,
            group.clone()
        );
        match result {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ChatError::Unavailable(format!("host: {e}"))),
        }
    }

    fn forget(&self, group: &GroupId, actor: &ActorRef<GroupMessage>) {
        let _ = self.inner.host.cast(HostMessage::Forget {
            group: group.clone(),
            actor: actor.get_id(),
        });
    }

    /// Sends a message to the relay of every node (today: this node's).
    pub fn broadcast(&self, msg: RelayMessage) {
        if let Err(e) = self.inner.relay.cast(msg) {
            warn!(error = %e, "relay unreachable");
        }
    }

    /// A group actor asks to stop (idle, or after a failed commit): the host
    /// drops it from the registry and sends it `Retire`.
    pub fn retire(&self, group: &GroupId, actor: &ActorRef<GroupMessage>) {
        let _ = self.inner.host.cast(HostMessage::Retire {
            group: group.clone(),
            actor: actor.get_id(),
        });
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
