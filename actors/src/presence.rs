//! The presence actor: one per user who is online or watched, placed on the
//! node that owns the user id (rendezvous hashing, like groups).
//!
//! It aggregates the user's sessions (several devices, on any nodes): the
//! user is online while at least one session has touched it within the TTL.
//! Sessions touch on connect and while their client is active; a session
//! that goes quiet (no frames, no heartbeats) for a TTL is dropped, and so
//! are the sessions of a node that died. When the user goes offline the
//! last-seen time is written to storage. Subscribers (sessions that asked
//! with `subscribePresence`) get a `presence` push on every change, and the
//! current state when they subscribe: lazy fan-out, nothing is broadcast to
//! people who merely share a group.
//!
//! Supervised by the node's host, which starts it on the first operation
//! and drops it from its registry when it stops (no sessions and no
//! subscribers left). If it dies, the sessions' periodic touches and
//! re-subscriptions rebuild it within a third of the TTL.
//!
//! What it must not do: keep a session or subscriber longer than the TTL
//! without a refresh, or block on storage.

use std::collections::HashMap;
use std::time::Instant;

use proto::v1::{self, server_frame::Kind};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, warn};

use crate::error::ChatResult;
use crate::ids::{SessionId, UserId, now_ms};
use crate::outbound::{ReplyTo, SharedPush};
use crate::router::Router;

/// A session anywhere in the cluster: its node and its id there.
pub type SessionAddr = (String, SessionId);

/// What a session does to a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceOp {
    /// The session is connected and active.
    Touch,
    /// The session closed.
    Leave,
    /// The session wants this user's presence pushes.
    Subscribe,
    /// It no longer does.
    Unsubscribe,
}

/// Messages of a presence actor.
#[derive(Debug)]
pub enum PresenceMessage {
    /// A session's operation.
    Op {
        /// The session.
        session: SessionAddr,
        /// What it does.
        op: PresenceOp,
    },
    /// An internal service asks for the user's presence.
    Query(ReplyTo),
    /// Timer (sent by the host to every presence actor, a quarter of the
    /// TTL): expire quiet sessions and subscribers, stop when unused.
    Tick,
    /// The host dropped this actor from its registry: stop.
    Retire,
}

impl ractor::Message for PresenceMessage {}

/// Arguments of a presence actor.
pub struct PresenceArgs {
    /// The user.
    pub user: UserId,
    /// The node's router.
    pub router: Router,
}

/// The presence actor's state.
///
/// Invariants: the user is online iff `sessions` is not empty; every entry
/// of `sessions` and `subscribers` was refreshed within the TTL (checked on
/// each tick); `last_seen_ms` is the last time the user went offline (0 if
/// unknown).
pub struct PresenceState {
    user: UserId,
    router: Router,
    /// The user's sessions and when each last touched.
    sessions: HashMap<SessionAddr, Instant>,
    /// Sessions watching this user and when each last subscribed.
    subscribers: HashMap<SessionAddr, Instant>,
    last_seen_ms: u64,
    retiring: bool,
}

/// The presence actor.
pub struct Presence;

impl PresenceState {
    fn online(&self) -> bool {
        !self.sessions.is_empty()
    }

    fn frame(&self) -> Kind {
        Kind::Presence(v1::Presence {
            user_id: self.user.to_string(),
            status: if self.online() {
                v1::PresenceStatus::Online as i32
            } else {
                v1::PresenceStatus::Offline as i32
            },
            last_seen_ms: if self.online() {
                now_ms()
            } else {
                self.last_seen_ms
            },
        })
    }

    /// Pushes the current state to `to`.
    fn push(&self, to: Vec<SessionAddr>) {
        if to.is_empty() {
            return;
        }
        metrics::counter!("chat_presence_pushes_total").increment(to.len() as u64);
        self.router
            .deliver_to_sessions(to, SharedPush::new(self.frame()));
    }

    /// Reacts to a possible change of status: records last-seen (awaited,
    /// so a stopping node does not drop it) and tells the subscribers.
    async fn changed(&mut self, was_online: bool) {
        if was_online == self.online() {
            return;
        }
        if !self.online() {
            self.last_seen_ms = now_ms();
            let (user, ms) = (self.user.to_string(), self.last_seen_ms);
            let written = self
                .router
                .store()
                .write(move |t, m| Ok(m.set_last_seen(t, &user, ms)?))
                .await;
            if let Err(e) = written {
                warn!(user = %self.user, error = %e, "writing last-seen failed");
            }
        }
        debug!(user = %self.user, online = self.online(), "presence changed");
        self.push(self.subscribers.keys().cloned().collect());
    }

    async fn expire(&mut self) {
        let ttl = self.router.config().tuning.presence_ttl;
        let was = self.online();
        self.sessions.retain(|_, t| t.elapsed() < ttl);
        self.subscribers.retain(|_, t| t.elapsed() < ttl);
        self.changed(was).await;
    }
}

impl Actor for Presence {
    type Msg = PresenceMessage;
    type State = PresenceState;
    type Arguments = PresenceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: PresenceArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(PresenceState {
            user: args.user,
            router: args.router,
            sessions: HashMap::new(),
            subscribers: HashMap::new(),
            last_seen_ms: 0,
            retiring: false,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let user = state.user.to_string();
        let seen: ChatResult<u64> = state
            .router
            .store()
            .read(move |t, m| Ok(m.last_seen(t, &user)?))
            .await;
        state.last_seen_ms = seen.unwrap_or(0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PresenceMessage::Op { session, op } => {
                let was = state.online();
                match op {
                    PresenceOp::Touch => {
                        state.sessions.insert(session, Instant::now());
                    }
                    PresenceOp::Leave => {
                        state.sessions.remove(&session);
                    }
                    PresenceOp::Subscribe => {
                        let new = state.subscribers.insert(session.clone(), Instant::now());
                        if new.is_none() {
                            state.push(vec![session]);
                        }
                    }
                    PresenceOp::Unsubscribe => {
                        state.subscribers.remove(&session);
                    }
                }
                state.changed(was).await;
            }
            PresenceMessage::Query(reply) => reply.send(Ok(state.frame())),
            PresenceMessage::Tick => {
                state.expire().await;
                if !state.retiring && state.sessions.is_empty() && state.subscribers.is_empty() {
                    state.retiring = true;
                    state.router.retire_presence(&state.user, &myself);
                }
            }
            PresenceMessage::Retire => {
                // Ops that arrived after we asked to stop must not be lost:
                // hand what we hold to the next owner (a fresh actor here,
                // or another node after a view change).
                let router = state.router.clone();
                let user = state.user.clone();
                let sessions: Vec<_> = state.sessions.keys().cloned().collect();
                let subscribers: Vec<_> = state.subscribers.keys().cloned().collect();
                if !sessions.is_empty() || !subscribers.is_empty() {
                    tokio::spawn(async move {
                        for s in sessions {
                            router.presence_op(&user, s, PresenceOp::Touch).await;
                        }
                        for s in subscribers {
                            router.presence_op(&user, s, PresenceOp::Subscribe).await;
                        }
                    });
                }
                myself.stop(Some("retired".into()));
            }
        }
        Ok(())
    }
}
