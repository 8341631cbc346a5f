//! The relay: one actor per node that delivers pushes to the node's sessions.
//!
//! Fan-out is two-tier: a group actor sends one `Deliver` per commit batch to
//! the relay of each node, and the relay hands the shared, once-encoded push
//! to every local session of the group's online members. The relay also
//! keeps which local users are online in which groups.
//!
//! Who talks to it: session actors (register, attach their groups, leave),
//! group actors (deliveries and membership changes, in commit order), the
//! node (shutdown, stats). Supervised by the node's host; if it dies the host
//! stops the node's sessions (they reconnect elsewhere).
//!
//! What it must not do: block or await anything while handling a message
//! (it only `try_send`s into bounded connection queues), or trust a stale
//! group list over a newer removal (see `LocalUser::removed`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::ids::{GroupId, SessionId, UserId};
use crate::outbound::{Outbound, SessionHandle, SharedPush};
use crate::session::SessionMessage;

/// Messages of the relay.
#[derive(Debug)]
pub enum RelayMessage {
    /// A session of `user` opened on this node. Sent before the session
    /// loads the user's groups, so no membership change can slip between.
    Register {
        /// The user.
        user: UserId,
        /// The session.
        session: SessionId,
        /// Its outbound queue.
        handle: SessionHandle,
        /// Its actor (ticked for presence refreshes).
        actor: ActorRef<SessionMessage>,
    },
    /// A session closed.
    Unregister {
        /// The user.
        user: UserId,
        /// The session.
        session: SessionId,
    },
    /// The groups `user` belonged to when its session read them from
    /// storage, each with the seq at which the user joined.
    Attach {
        /// The user.
        user: UserId,
        /// `(group, joined_at_seq)`.
        groups: Vec<(GroupId, u64)>,
    },
    /// Users joined `group` (sent by its group actor after the commit, before
    /// the delivery of the system message).
    MembersAdded {
        /// The group.
        group: GroupId,
        /// `(user, joined_at_seq)`.
        users: Vec<(UserId, u64)>,
    },
    /// Users left `group` at `seq` (sent after the delivery of the system
    /// message, before any later delivery).
    MembersRemoved {
        /// The group.
        group: GroupId,
        /// Who left.
        users: Vec<UserId>,
        /// The seq of the system message that removed them.
        seq: u64,
    },
    /// Pushes for every local online member of `group`, in order.
    Deliver {
        /// The group.
        group: GroupId,
        /// What to push.
        pushes: Vec<Arc<SharedPush>>,
        /// A user not to push to (e.g. the typist).
        except: Option<UserId>,
    },
    /// A push for every local session of the given users.
    DeliverTo {
        /// Recipients.
        users: Vec<UserId>,
        /// What to push.
        push: Arc<SharedPush>,
    },
    /// A push for given local sessions.
    DeliverToSessions {
        /// Recipients.
        sessions: Vec<SessionId>,
        /// What to push.
        push: Arc<SharedPush>,
    },
    /// Pushes `push` to every local session and closes them with `code`.
    CloseAll {
        /// A last push (e.g. goaway).
        push: Option<Arc<SharedPush>>,
        /// The close code.
        code: u16,
    },
    /// How many users and sessions are online here.
    Stats(RpcReplyPort<RelayStats>),
    /// Timer: tick every session (one node-wide timer instead of one per
    /// session).
    Tick,
}

impl ractor::Message for RelayMessage {}

/// Counts reported by [`RelayMessage::Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Users with at least one session here.
    pub users: usize,
    /// Sessions here.
    pub sessions: usize,
    /// Groups with at least one local online member.
    pub groups: usize,
}

/// A user with at least one session on this node.
#[derive(Debug, Default)]
pub struct LocalUser {
    /// The user's sessions here (several devices).
    sessions: Vec<(SessionId, SessionHandle)>,
    /// Groups the user receives pushes of.
    groups: HashSet<GroupId>,
    /// Groups the user was removed from while online here, with the seq of
    /// the removal. A group list read from storage before the removal (its
    /// `joined_at_seq` is older) must not re-attach the user.
    removed: HashMap<GroupId, u64>,
}

/// The relay's state.
///
/// Invariants:
/// - `users` holds exactly the users with at least one open session here.
/// - `u ∈ groups[g]` ⇔ `users[u]` exists and `g ∈ users[u].groups`; no entry
///   of `groups` is empty.
/// - `sessions` holds exactly the sessions listed in `users`.
#[derive(Debug, Default)]
pub struct RelayState {
    users: HashMap<UserId, LocalUser>,
    groups: HashMap<GroupId, HashSet<UserId>>,
    /// Every local session by id (the same handles as in `users`) and its actor.
    sessions: HashMap<SessionId, (SessionHandle, Option<ActorRef<SessionMessage>>)>,
}

impl RelayState {
    fn attach(&mut self, user: &UserId, group: &GroupId, joined_at_seq: u64) {
        let Some(local) = self.users.get_mut(user) else {
            return;
        };
        if let Some(&removed_at) = local.removed.get(group) {
            if joined_at_seq <= removed_at {
                return;
            }
            local.removed.remove(group);
        }
        local.groups.insert(group.clone());
        self.groups
            .entry(group.clone())
            .or_default()
            .insert(user.clone());
    }

    fn detach(&mut self, user: &UserId, group: &GroupId, seq: u64) {
        let Some(local) = self.users.get_mut(user) else {
            return;
        };
        local.groups.remove(group);
        let at = local.removed.entry(group.clone()).or_default();
        *at = (*at).max(seq);
        self.unlink(user, group);
    }

    /// Removes `user` from `groups[group]`, dropping the entry when empty.
    fn unlink(&mut self, user: &UserId, group: &GroupId) {
        if let Some(set) = self.groups.get_mut(group) {
            set.remove(user);
            if set.is_empty() {
                self.groups.remove(group);
            }
        }
    }

    fn unregister(&mut self, user: &UserId, session: SessionId) {
        self.sessions.remove(&session);
        let Some(local) = self.users.get_mut(user) else {
            return;
        };
        local.sessions.retain(|(s, _)| *s != session);
        if local.sessions.is_empty()
            && let Some(local) = self.users.remove(user)
        {
            for g in &local.groups {
                self.unlink(user, g);
            }
        }
    }

    fn push_to_user(&self, user: &UserId, push: &Arc<SharedPush>) -> usize {
        self.send_to_user(user, || Outbound::Push(push.clone()))
    }

    /// Queues `item()` on every session of `user`; returns how many took it.
    fn send_to_user(&self, user: &UserId, item: impl Fn() -> Outbound) -> usize {
        let Some(local) = self.users.get(user) else {
            return 0;
        };
        local
            .sessions
            .iter()
            .filter(|(_, h)| h.push(item()))
            .count()
    }
}

/// The relay actor.
#[derive(Debug, Default)]
pub struct Relay;

/// How often the relay ticks its sessions (a third of the presence TTL).
#[derive(Debug, Clone, Copy)]
pub struct RelayArgs {
    /// The tick period.
    pub tick: std::time::Duration,
}

impl Actor for Relay {
    type Msg = RelayMessage;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RelayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.tick, || RelayMessage::Tick);
        Ok(RelayState::default())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RelayMessage::Register {
                user,
                session,
                handle,
                actor,
            } => {
                state
                    .sessions
                    .insert(session, (handle.clone(), Some(actor)));
                let sessions = &mut state.users.entry(user).or_default().sessions;
                // One slot at a time (a user has a device or two; a first
                // push would reserve four, per idle connection).
                sessions.reserve_exact(1);
                sessions.push((session, handle));
            }
            RelayMessage::Unregister { user, session } => state.unregister(&user, session),
            RelayMessage::Attach { user, groups } => {
                for (g, joined) in groups {
                    state.attach(&user, &g, joined);
                }
            }
            RelayMessage::MembersAdded { group, users } => {
                for (u, joined) in users {
                    state.attach(&u, &group, joined);
                }
            }
            RelayMessage::MembersRemoved { group, users, seq } => {
                for u in users {
                    state.detach(&u, &group, seq);
                }
            }
            RelayMessage::Deliver {
                group,
                pushes,
                except,
            } => {
                let Some(members) = state.groups.get(&group) else {
                    return Ok(());
                };
                let Some(first) = pushes.first().cloned() else {
                    return Ok(());
                };
                // One queue slot per session for the whole batch.
                let batch: Option<Arc<[Arc<SharedPush>]>> =
                    (pushes.len() > 1).then(|| Arc::from(pushes.as_slice()));
                let clone = || match &batch {
                    Some(b) => Outbound::Batch(b.clone()),
                    None => Outbound::Push(first.clone()),
                };
                let mut delivered = 0u64;
                for u in members {
                    if except.as_ref() == Some(u) {
                        continue;
                    }
                    delivered += (state.send_to_user(u, clone) * pushes.len()) as u64;
                }
                metrics::counter!("chat_relay_deliveries_total").increment(delivered);
            }
            RelayMessage::DeliverTo { users, push } => {
                let mut delivered = 0u64;
                for u in &users {
                    delivered += state.push_to_user(u, &push) as u64;
                }
                metrics::counter!("chat_relay_deliveries_total").increment(delivered);
            }
            RelayMessage::DeliverToSessions { sessions, push } => {
                let mut delivered = 0u64;
                for s in sessions {
                    if let Some((h, _)) = state.sessions.get(&s)
                        && h.push(Outbound::Push(push.clone()))
                    {
                        delivered += 1;
                    }
                }
                metrics::counter!("chat_relay_deliveries_total").increment(delivered);
            }
            RelayMessage::CloseAll { push, code } => {
                for local in state.users.values() {
                    for (_, h) in &local.sessions {
                        if let Some(p) = &push {
                            h.push(Outbound::Push(p.clone()));
                        }
                        h.close(code);
                    }
                }
            }
            RelayMessage::Tick => {
                for (_, actor) in state.sessions.values() {
                    if let Some(a) = actor {
                        let _ = a.cast(SessionMessage::PresenceTick);
                    }
                }
            }
            RelayMessage::Stats(reply) => {
                let stats = RelayStats {
                    users: state.users.len(),
                    sessions: state.users.values().map(|u| u.sessions.len()).sum(),
                    groups: state.groups.len(),
                };
                let _ = reply.send(stats);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
