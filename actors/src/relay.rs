//! The relay: one actor per node that delivers pushes to the node's sessions.
//!
//! Fan-out is two-tier: a group actor sends one `Deliver` per commit batch to
//! the relay of each node, and the relay hands the shared, once-encoded push
//! to every local session of the group's online members. The relay also
//! keeps which local users are online in which groups, and puts each group's
//! messages back in seq order when two owners' deliveries cross (see
//! `Order`).
//!
//! Who talks to it: session actors (register, attach their groups, leave),
//! group actors (deliveries and membership changes, in commit order), the
//! node (shutdown, stats). Supervised by the node's host; if it dies the host
//! stops the node's sessions (they reconnect elsewhere).
//!
//! What it must not do: block or await anything while handling a message
//! (it only `try_send`s into bounded connection queues), or trust a stale
//! group list over a newer removal (see `LocalUser::removed`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::ids::{GroupId, SessionId, UserId};
use crate::meters::Meters;
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
    /// Timer: stop waiting for the missing seqs of `group` where something
    /// has been held for [`HOLD`] (see `Order`).
    Release(GroupId),
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

/// How long the relay holds a group's pushes that arrived ahead of a missing
/// seq before it gives up and delivers them (the clients then see a gap and
/// pull `history`, as after any lost delivery).
pub const HOLD: Duration = Duration::from_millis(200);
/// Most items held per group; one more releases the oldest at once.
const MAX_HELD: usize = 256;

/// When a group changes owner (a node joins, drains, or is declared down),
/// the old owner's last delivery and the new owner's first one come from
/// different nodes, over different links, and can reach a relay in either
/// order: a client would see seq 77 before 76. So the relay sequences each
/// group it has seen deliveries of: everything with a position in the log
/// (deliveries by their first seq, joins before the seq that added them,
/// leaves after the seq that removed them) goes out only once every seq
/// before it has, and is held until then: [`HOLD`] after the oldest held
/// item arrived (so under twice that for any one), at most [`MAX_HELD`]
/// items. A delivery of seqs already delivered is dropped.
///
/// Invariants:
/// - `last` is the highest seq delivered here (the first delivery the relay
///   sees of a group sets it: there is nothing earlier to wait for).
/// - every item of `held` waits for a seq: a join or a delivery at position
///   `p > last + 1`, a leave at `p > last`.
#[derive(Debug, Default)]
struct Order {
    last: u64,
    /// Keyed by (position, phase, arrival number): joins, then the
    /// delivery, then leaves, of one seq.
    held: BTreeMap<(u64, u8, u64), (Instant, Positioned)>,
    /// Arrival numbers for `held`'s keys.
    arrivals: u64,
    /// A [`RelayMessage::Release`] of this group is on its way.
    timer: bool,
}

/// A relay message with a place in its group's log.
#[derive(Debug)]
enum Positioned {
    /// Users joined at these seqs (position: the smallest).
    Added(Vec<(UserId, u64)>),
    /// Pushes whose messages have seqs `seqs.0..=seqs.1` (what
    /// [`message_seqs`] found in them).
    Deliver {
        seqs: (u64, u64),
        pushes: Vec<Arc<SharedPush>>,
        except: Option<UserId>,
    },
    /// Users left at `seq`.
    Removed(Vec<UserId>, u64),
}

impl Positioned {
    /// `(position, phase)`: its key in [`Order::held`] but for the arrival.
    fn place(&self) -> (u64, u8) {
        match self {
            Positioned::Added(users) => (users.iter().map(|(_, s)| *s).min().unwrap_or(0), 0),
            Positioned::Deliver { seqs, .. } => (seqs.0, 1),
            Positioned::Removed(_, seq) => (*seq, 2),
        }
    }

    /// Whether every seq it waits for has been delivered, given `last`.
    fn ready(&self, last: u64) -> bool {
        match self.place() {
            (pos, 2) => pos <= last,
            (pos, _) => pos <= last.saturating_add(1),
        }
    }

    /// The `last` that makes it ready (for giving up on the missing seqs).
    fn ready_at(&self) -> u64 {
        match self.place() {
            (pos, 2) => pos,
            (pos, _) => pos.saturating_sub(1),
        }
    }
}

/// The seqs of the message pushes in `pushes` (smallest, largest), if any.
fn message_seqs(pushes: &[Arc<SharedPush>]) -> Option<(u64, u64)> {
    pushes
        .iter()
        .filter_map(|p| message_seq(p))
        .fold(None, |acc, s| match acc {
            None => Some((s, s)),
            Some((lo, hi)) => Some((lo.min(s), hi.max(s))),
        })
}

fn message_seq(p: &SharedPush) -> Option<u64> {
    match &p.frame().kind {
        Some(proto::v1::server_frame::Kind::Message(m)) => Some(m.seq),
        _ => None,
    }
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
/// - `orders` has an entry for each group that had local members when a
///   delivery came; entries of groups without local members and with
///   nothing held are dropped on the next tick.
#[derive(Debug, Default)]
pub struct RelayState {
    users: HashMap<UserId, LocalUser>,
    groups: HashMap<GroupId, HashSet<UserId>>,
    /// Every local session by id (the same handles as in `users`) and its actor.
    sessions: HashMap<SessionId, (SessionHandle, Option<ActorRef<SessionMessage>>)>,
    /// Each group's seq order (see [`Order`]).
    orders: HashMap<GroupId, Order>,
    /// The node's metric handles.
    meters: Arc<Meters>,
}

impl RelayState {
    /// Takes a relay message with a place in `group`'s log: applies it now
    /// if nothing it follows is missing (and then whatever held it
    /// unblocks), else holds it. Returns `true` when it started a hold (the
    /// caller schedules a [`RelayMessage::Release`]).
    fn offer(&mut self, group: &GroupId, item: Positioned, now: Instant) -> bool {
        let Some(order) = self.orders.get_mut(group) else {
            // Not sequenced yet: a first delivery starts the order if there
            // is anyone here to deliver to.
            if let Positioned::Deliver { seqs, .. } = &item
                && self.groups.contains_key(group)
            {
                // `apply` moves it to the delivery's last seq.
                let last = seqs.0.saturating_sub(1);
                self.orders.insert(
                    group.clone(),
                    Order {
                        last,
                        ..Order::default()
                    },
                );
            }
            self.apply(group, item);
            return false;
        };
        if item.ready(order.last) {
            self.apply(group, item);
            self.drain(group, now, false);
            return false;
        }
        let (pos, phase) = item.place();
        order.arrivals += 1;
        order.held.insert((pos, phase, order.arrivals), (now, item));
        metrics::counter!("chat_relay_held_total").increment(1);
        let arm = !order.timer;
        order.timer = true;
        if order.held.len() > MAX_HELD {
            self.drain(group, now, true);
        }
        arm
    }

    /// A [`RelayMessage::Release`] came: gives up on what has waited
    /// [`HOLD`]. Returns whether to send another (something is still held).
    fn release(&mut self, group: &GroupId, now: Instant) -> bool {
        let still_held = self.drain(group, now, false);
        if let Some(order) = self.orders.get_mut(group) {
            order.timer = still_held;
        }
        still_held
    }

    /// Applies the held items of `group` that are ready; with `force`,
    /// first gives up on the seqs that the oldest held item waits for.
    /// Returns whether anything is still held.
    fn drain(&mut self, group: &GroupId, now: Instant, mut force: bool) -> bool {
        loop {
            let Some(order) = self.orders.get_mut(group) else {
                return false;
            };
            let Some((_, (_, item))) = order.held.first_key_value() else {
                return false;
            };
            if !item.ready(order.last) {
                // Held items are in log order, not arrival order: what
                // waited longest may sit behind a younger one.
                let oldest = order.held.values().map(|(t, _)| *t).min();
                let waited = oldest.is_some_and(|t| now.saturating_duration_since(t) >= HOLD);
                if !(force || waited) {
                    return true;
                }
                metrics::counter!("chat_relay_gaps_total").increment(1);
                let at = item.ready_at();
                order.last = order.last.max(at);
                force = false;
            }
            let Some((_, (_, item))) = order.held.pop_first() else {
                return false;
            };
            self.apply(group, item);
        }
    }

    /// Does what a positioned message says, dropping the pushes of seqs
    /// already delivered.
    fn apply(&mut self, group: &GroupId, item: Positioned) {
        match item {
            Positioned::Added(users) => {
                for (u, joined) in users {
                    self.attach(&u, group, joined);
                }
            }
            Positioned::Removed(users, seq) => {
                for u in users {
                    self.detach(&u, group, seq);
                }
            }
            Positioned::Deliver {
                seqs: (_, hi),
                mut pushes,
                except,
            } => {
                if let Some(order) = self.orders.get_mut(group) {
                    let last = order.last;
                    let before = pushes.len();
                    pushes.retain(|p| message_seq(p).is_none_or(|s| s > last));
                    if pushes.len() < before {
                        metrics::counter!("chat_relay_late_dropped_total")
                            .increment((before - pushes.len()) as u64);
                    }
                    // Were `hi` trimmed, it would be <= last: no change then.
                    order.last = order.last.max(hi);
                }
                self.deliver(group, &pushes, except.as_ref());
            }
        }
    }

    /// Queues `pushes` (one slot per session) for every local member of
    /// `group` but `except`.
    fn deliver(&self, group: &GroupId, pushes: &[Arc<SharedPush>], except: Option<&UserId>) {
        let Some(members) = self.groups.get(group) else {
            return;
        };
        let Some(first) = pushes.first() else {
            return;
        };
        let batch: Option<Arc<[Arc<SharedPush>]>> = (pushes.len() > 1).then(|| Arc::from(pushes));
        let clone = || match &batch {
            Some(b) => Outbound::Batch(b.clone()),
            None => Outbound::Push(first.clone()),
        };
        let mut delivered = 0u64;
        for u in members {
            if except == Some(u) {
                continue;
            }
            delivered += (self.send_to_user(u, clone) * pushes.len()) as u64;
        }
        self.meters.deliveries.increment(delivered);
    }

    /// Drops the orders of groups with no local members and nothing held.
    fn prune_orders(&mut self) {
        let groups = &self.groups;
        self.orders
            .retain(|g, o| !o.held.is_empty() || groups.contains_key(g));
    }

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
#[derive(Debug, Clone)]
pub struct RelayArgs {
    /// The tick period.
    pub tick: std::time::Duration,
    /// The node's metric handles.
    pub meters: Arc<Meters>,
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
        Ok(RelayState {
            meters: args.meters,
            ..RelayState::default()
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
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
                let hold = state.offer(&group, Positioned::Added(users), Instant::now());
                schedule_release(&myself, group, hold);
            }
            RelayMessage::MembersRemoved { group, users, seq } => {
                let hold = state.offer(&group, Positioned::Removed(users, seq), Instant::now());
                schedule_release(&myself, group, hold);
            }
            RelayMessage::Deliver {
                group,
                pushes,
                except,
            } => match message_seqs(&pushes) {
                // Typing, receipts, reactions: no place in the log.
                None => state.deliver(&group, &pushes, except.as_ref()),
                Some(seqs) => {
                    let item = Positioned::Deliver {
                        seqs,
                        pushes,
                        except,
                    };
                    let hold = state.offer(&group, item, Instant::now());
                    schedule_release(&myself, group, hold);
                }
            },
            RelayMessage::DeliverTo { users, push } => {
                let mut delivered = 0u64;
                for u in &users {
                    delivered += state.push_to_user(u, &push) as u64;
                }
                state.meters.deliveries.increment(delivered);
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
                state.meters.deliveries.increment(delivered);
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
            RelayMessage::Release(group) => {
                let again = state.release(&group, Instant::now());
                schedule_release(&myself, group, again);
            }
            RelayMessage::Tick => {
                state.prune_orders();
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

/// Sends the relay a [`RelayMessage::Release`] of `group` in [`HOLD`] when
/// `needed`.
fn schedule_release(myself: &ActorRef<RelayMessage>, group: GroupId, needed: bool) {
    if needed {
        myself.send_after(HOLD, move || RelayMessage::Release(group));
    }
}

#[cfg(test)]
mod tests;
