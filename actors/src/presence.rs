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
//! Passivation (as virtual actors do): an online user nobody watches, with
//! no operation for `presence_idle`, hands its state (sessions and their
//! touch times, last-seen) to the host as a [`Dormant`] record of ~100
//! bytes and stops, instead of holding an actor (~12 KB) per idle user. A
//! user nobody watches who comes online starts that way: the host records
//! the first touch without starting an actor (there is nobody to tell and
//! nothing to write). The router refreshes a dormant user's touches in
//! place; any other operation, a query, or a session expiring (checked on
//! the host's tick) starts the actor from that record.
//!
//! What it must not do: keep a session or subscriber longer than the TTL
//! without a refresh, or block on storage.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// The host dropped this actor from its registry to passivate it: hand
    /// the state to the host as a [`Dormant`] record (or, if someone
    /// subscribed meanwhile, hand it over like `Retire`) and stop.
    Passivate,
    /// State of a passivated incarnation that reached the host after this
    /// one started: merge it.
    Absorb(Dormant),
}

impl ractor::Message for PresenceMessage {}

/// Arguments of a presence actor.
pub struct PresenceArgs {
    /// The user.
    pub user: UserId,
    /// The node's router.
    pub router: Router,
    /// The state a passivated incarnation left (then last-seen is not read
    /// from storage).
    pub dormant: Option<Dormant>,
}

/// What a passivated presence actor leaves behind: an online user nobody
/// watches.
///
/// Invariant: `sessions` is not empty (an offline user simply stops).
#[derive(Debug, Clone)]
pub struct Dormant {
    /// The user's sessions and when each last touched.
    sessions: Vec<(SessionAddr, Instant)>,
    /// When the user last went offline, if known (a record the host made
    /// from a first touch has not read it from storage).
    last_seen_ms: Option<u64>,
}

impl Dormant {
    /// Records that `session` touched at `at` (keeping a later touch).
    fn note(&mut self, session: SessionAddr, at: Instant) {
        match self.sessions.iter_mut().find(|(s, _)| *s == session) {
            Some((_, t)) => *t = (*t).max(at),
            None => {
                // Grown one slot at a time: nearly every user has one
                // session, and a first push would reserve four (a record
                // per idle connection: 48 bytes instead of 192).
                self.sessions.reserve_exact(1);
                self.sessions.push((session, at));
            }
        }
    }

    /// Adds `other`'s sessions (keeping the later touch of each) and
    /// last-seen.
    fn merge(&mut self, other: Dormant) {
        for (s, t) in other.sessions {
            self.note(s, t);
        }
        self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
    }

    /// Whether a session has been quiet for `ttl` (the actor must run to
    /// take the user offline or drop it).
    fn expired(&self, ttl: Duration) -> bool {
        self.sessions.iter().any(|(_, t)| t.elapsed() >= ttl)
    }

    /// The sessions (to hand them to another owner).
    pub fn into_sessions(self) -> Vec<SessionAddr> {
        self.sessions.into_iter().map(|(s, _)| s).collect()
    }
}

/// Dormant records of this node's passivated presence actors, by user:
/// inserted and taken by the host, touched in place by the router.
#[derive(Default)]
pub struct DormantPresences(Mutex<HashMap<UserId, Dormant>>);

impl DormantPresences {
    /// Locks the map (a poisoned lock only means a panic elsewhere while
    /// holding it; every update leaves the map consistent).
    fn lock(&self) -> MutexGuard<'_, HashMap<UserId, Dormant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes `session`'s touch if `user` is dormant; false if it is not
    /// (the operation must go to an actor).
    pub fn touch(&self, user: &UserId, session: &SessionAddr) -> bool {
        match self.lock().get_mut(user) {
            Some(d) => {
                d.note(session.clone(), Instant::now());
                true
            }
            None => false,
        }
    }

    /// Records a touch, making `user` dormant-online if it was unknown: a
    /// user nobody watches comes online without an actor (nobody to tell,
    /// nothing to write). Only the host calls this, so no actor of `user`
    /// can start meanwhile.
    pub fn touch_or_insert(&self, user: &UserId, session: SessionAddr) {
        self.lock()
            .entry(user.clone())
            .or_insert_with(|| Dormant {
                sessions: Vec::new(),
                last_seen_ms: None,
            })
            .note(session, Instant::now());
    }

    /// Stores a record, merged with one made meanwhile by a touch.
    pub fn insert(&self, user: UserId, dormant: Dormant) {
        match self.lock().entry(user) {
            Entry::Occupied(mut e) => e.get_mut().merge(dormant),
            Entry::Vacant(e) => {
                e.insert(dormant);
            }
        }
    }

    /// Takes `user`'s record (to start its actor from it).
    pub fn take(&self, user: &UserId) -> Option<Dormant> {
        self.lock().remove(user)
    }

    /// Takes the records of users with a session quiet for `ttl`.
    pub fn take_expired(&self, ttl: Duration) -> Vec<(UserId, Dormant)> {
        self.take_where(|_, d| d.expired(ttl))
    }

    /// Takes every record whose user fails `keep`.
    pub fn take_unless(&self, keep: impl Fn(&UserId) -> bool) -> Vec<(UserId, Dormant)> {
        self.take_where(|u, _| !keep(u))
    }

    fn take_where(&self, take: impl Fn(&UserId, &Dormant) -> bool) -> Vec<(UserId, Dormant)> {
        let mut map = self.lock();
        let gone: Vec<UserId> = map
            .iter()
            .filter(|(u, d)| take(u, d))
            .map(|(u, _)| u.clone())
            .collect();
        gone.into_iter()
            .filter_map(|u| map.remove(&u).map(|d| (u, d)))
            .collect()
    }

    /// Dormant users.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hands users' sessions and subscribers (`(user, sessions, subscribers)`)
/// to whichever actor owns each user now, here or on another node, by
/// repeating the touches and subscriptions through the router (in a task:
/// the caller may be the host, which starting those actors needs).
pub fn hand_over(router: &Router, users: Vec<(UserId, Vec<SessionAddr>, Vec<SessionAddr>)>) {
    if users
        .iter()
        .all(|(_, sessions, subs)| sessions.is_empty() && subs.is_empty())
    {
        return;
    }
    let router = router.clone();
    tokio::spawn(async move {
        for (user, sessions, subscribers) in users {
            for s in sessions {
                router.presence_op(&user, s, PresenceOp::Touch).await;
            }
            for s in subscribers {
                router.presence_op(&user, s, PresenceOp::Subscribe).await;
            }
        }
    });
}

/// The presence actor's state.
///
/// Invariants: the user is online iff `sessions` is not empty; every entry
/// of `sessions` and `subscribers` was refreshed within the TTL (checked on
/// each tick); `last_seen_ms` is the last time the user went offline (0 if
/// unknown); once `retiring`, the actor has asked the host to retire or
/// passivate it and asks nothing more.
pub struct PresenceState {
    user: UserId,
    router: Router,
    /// The user's sessions and when each last touched.
    sessions: HashMap<SessionAddr, Instant>,
    /// Sessions watching this user and when each last subscribed.
    subscribers: HashMap<SessionAddr, Instant>,
    last_seen_ms: u64,
    /// When the last operation or query arrived (passivation clock).
    last_op: Instant,
    /// Whether `last_seen_ms` came with the state (no storage read needed).
    seen_known: bool,
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
            let written = self
                .router
                .committer()
                .last_seen(self.user.to_string(), self.last_seen_ms)
                .await;
            if let Err(e) = written {
                warn!(user = %self.user, error = %e, "writing last-seen failed");
            }
        }
        debug!(user = %self.user, online = self.online(), "presence changed");
        self.push(self.subscribers.keys().cloned().collect());
    }

    /// Hands the sessions and subscriptions to whichever actor owns the
    /// user next (a fresh one here, or another node after a view change).
    fn hand_over(&self) {
        let sessions = self.sessions.keys().cloned().collect();
        let subscribers = self.subscribers.keys().cloned().collect();
        hand_over(
            &self.router,
            vec![(self.user.clone(), sessions, subscribers)],
        );
    }

    /// Merges a passivated incarnation's state.
    fn absorb(&mut self, d: Dormant) {
        for (s, t) in d.sessions {
            let e = self.sessions.entry(s).or_insert(t);
            *e = (*e).max(t);
        }
        self.last_seen_ms = self.last_seen_ms.max(d.last_seen_ms.unwrap_or(0));
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
        let mut state = PresenceState {
            user: args.user,
            router: args.router,
            sessions: HashMap::new(),
            subscribers: HashMap::new(),
            last_seen_ms: 0,
            last_op: Instant::now(),
            seen_known: false,
            retiring: false,
        };
        if let Some(d) = args.dormant {
            state.seen_known = d.last_seen_ms.is_some();
            state.absorb(d);
        }
        Ok(state)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.seen_known {
            return Ok(());
        }
        let user = state.user.to_string();
        let seen: ChatResult<u64> = state
            .router
            .store()
            .read(move |t, m| Ok(m.last_seen(t, &user)?))
            .await;
        // A passivated incarnation's state may have been absorbed meanwhile.
        state.last_seen_ms = state.last_seen_ms.max(seen.unwrap_or(0));
        state.seen_known = true;
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
                state.last_op = Instant::now();
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
            PresenceMessage::Query(reply) => {
                state.last_op = Instant::now();
                reply.send(Ok(state.frame()));
            }
            PresenceMessage::Tick => {
                state.expire().await;
                if state.retiring || !state.subscribers.is_empty() {
                    return Ok(());
                }
                if state.sessions.is_empty() {
                    state.retiring = true;
                    state.router.retire_presence(&state.user, &myself);
                } else if state.last_op.elapsed() >= state.router.config().tuning.presence_idle {
                    state.retiring = true;
                    state.router.passivate_presence(&state.user, &myself);
                }
            }
            PresenceMessage::Retire => {
                // Ops that arrived after we asked to stop must not be lost:
                // hand what we hold to the next owner (a fresh actor here,
                // or another node after a view change).
                state.hand_over();
                myself.stop(Some("retired".into()));
            }
            PresenceMessage::Passivate => {
                // Ops that arrived after we asked are in the state; a
                // subscriber among them keeps the user active elsewhere.
                if state.subscribers.is_empty() && state.online() {
                    let dormant = Dormant {
                        sessions: state.sessions.drain().collect(),
                        last_seen_ms: state.seen_known.then_some(state.last_seen_ms),
                    };
                    state.router.store_dormant_presence(&state.user, dormant);
                } else {
                    state.hand_over();
                }
                myself.stop(Some("retired".into()));
            }
            PresenceMessage::Absorb(d) => {
                let was = state.online();
                state.absorb(d);
                state.changed(was).await;
            }
        }
        Ok(())
    }
}
