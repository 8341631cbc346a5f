//! Planning a commit: turns the group's pending requests into one batch of
//! writes, validated against the group's committed state.
//!
//! Pure logic apart from reading the clock: no storage, no messages. The
//! group actor calls [`plan`] when a commit may start (none in flight, or
//! only ones that change no membership), sends the batch's [`Writes`] to
//! storage and, once committed, applies its [`Effect`]s and answers its
//! [`Waiter`]s.
//!
//! A batch holds any number of sends and reactions but at most one
//! membership change (create, add, remove, role, leave), always last, so
//! every request is validated against the membership it will commit under.

use std::sync::Arc;

use proto::v1::{self, server_frame::Kind};
use storage::model::{DedupeRecord, GroupMeta, MemberRecord, role};

use super::{GroupState, Member, encode, sent};
use crate::error::{ChatError, ChatResult};
use crate::ids::UserId;
use crate::ids::now_ms;
use crate::outbound::ReplyTo;

/// Most sends in one commit.
pub const MAX_SENDS_PER_BATCH: usize = 2_000;
/// Longest reaction emoji, in bytes.
pub const MAX_EMOJI_BYTES: usize = 64;

/// A request to a group, after the session checked its shape and sizes.
#[derive(Debug, Clone)]
pub enum GroupOp {
    /// Create the group with these members besides the requester (for a
    /// 1:1 chat: find or create it).
    Create {
        /// Display name.
        name: String,
        /// Members besides the creator.
        members: Vec<UserId>,
        /// A 1:1 chat.
        direct: bool,
    },
    /// Append a message.
    Send(v1::Send),
    /// Add members (admins only).
    AddMembers(Vec<UserId>),
    /// Remove members (admins only).
    RemoveMembers(Vec<UserId>),
    /// Change a member's role (admins only).
    SetRole {
        /// Whose role.
        user: UserId,
        /// [`role::MEMBER`] or [`role::ADMIN`].
        role: i32,
    },
    /// The requester leaves.
    Leave,
    /// Move the delivered pointer.
    MarkDelivered(u64),
    /// Move the read pointer.
    MarkRead(u64),
    /// Typing indicator.
    Typing,
    /// Add or remove a reaction.
    React {
        /// The message.
        seq: u64,
        /// The emoji.
        emoji: String,
        /// Remove instead of add.
        remove: bool,
    },
    /// Who read a message.
    Readers(u64),
    /// An announcement from an internal service (no membership check).
    PostSystem {
        /// The text.
        text: String,
    },
}

impl GroupOp {
    /// Whether it may change the membership (and so ends a batch).
    pub fn changes_membership(&self) -> bool {
        matches!(
            self,
            GroupOp::Create { .. }
                | GroupOp::AddMembers(_)
                | GroupOp::RemoveMembers(_)
                | GroupOp::SetRole { .. }
                | GroupOp::Leave
        )
    }
}

/// A request waiting for its commit, with every reply handle for it (a
/// retried send attaches to the original).
#[derive(Debug)]
pub struct Waiter {
    /// The requester.
    pub user: UserId,
    /// The request.
    pub op: GroupOp,
    reply: ReplyTo,
    /// Retries of the same send that arrived while it waited.
    pub extra: Vec<ReplyTo>,
    /// The answer once committed (set by the planner).
    pub result: Option<ChatResult<Kind>>,
}

impl Waiter {
    /// A waiter for `op`.
    pub fn new(user: UserId, op: GroupOp, reply: ReplyTo) -> Self {
        Waiter {
            user,
            op,
            reply,
            extra: Vec::new(),
            result: None,
        }
    }

    /// Answers every handle with `result` (the retries with copies).
    pub fn answer(self, result: ChatResult<Kind>) {
        for r in self.extra {
            r.send(result.clone());
        }
        self.reply.send(result);
    }

    /// Answers every handle with the planned outcome.
    pub fn answer_planned(mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(ChatError::Internal(
                "planned request without an outcome".into(),
            ))
        });
        self.answer(result);
    }
}

/// A send's dedupe record with its key: `(user, clientMsgId, outcome)`.
/// The user stays a [`UserId`] all the way to storage, which takes its
/// `&str`: no string is formatted or parsed back per send.
/// The id is shared (`Arc<str>`) by the batch, the group's memory of its
/// sends and the dedupe records to write later: one copy per send.
pub type SendRecord = (UserId, Arc<str>, DedupeRecord);

/// What the commit transaction writes. Shared with the blocking task.
#[derive(Debug, Default)]
pub struct Writes {
    /// The group id.
    pub group: String,
    /// The epoch this actor holds; the transaction checks it.
    pub epoch: u64,
    /// Head before the batch; the transaction checks it.
    pub base_head: u64,
    /// Head after the batch.
    pub head: u64,
    /// Creating the group: take the first epoch, write `meta`.
    pub create: Option<GroupMeta>,
    /// Dirty pointers (written first).
    pub pointers: Vec<(UserId, MemberRecord)>,
    /// New members (limit checked in the transaction).
    pub adds: Vec<(String, MemberRecord)>,
    /// Removed members.
    pub removes: Vec<String>,
    /// Rewritten member records (role changes).
    pub updates: Vec<(String, MemberRecord)>,
    /// Log entries.
    pub log: Vec<(u64, Vec<u8>)>,
    /// The batch's sends: `(user, clientMsgId, outcome)`. The transaction
    /// checks that none has a dedupe record (a retry of a send committed
    /// before this actor loaded the group, older than the log tail it
    /// read). Their records are written with this batch when
    /// `record_sends`, else later, in a later batch's `index`.
    pub sends: Vec<SendRecord>,
    /// Write the records of `sends` now (inserted where none exists, which
    /// is also the check), instead of reading them now and writing later.
    pub record_sends: bool,
    /// Dedupe records of sends already committed, written now.
    pub index: Vec<SendRecord>,
    /// The new dedupe watermark ([`storage::model::Model::dedupe_indexed`]),
    /// when `index` brings it up to date.
    pub indexed: Option<u64>,
    /// Thread index entries `(parent, seq)`.
    pub threads: Vec<(u64, u64)>,
    /// Reactions `(seq, emoji, user, present)`.
    pub reactions: Vec<(u64, String, String, bool)>,
}

/// A change to the actor's state once the batch is committed.
#[derive(Debug, Clone)]
pub enum Effect {
    /// A member joined.
    Added(UserId, Member),
    /// A member's role changed.
    Role(UserId, i32),
    /// A member left or was removed.
    Removed(UserId),
    /// The sender of `seq` has read up to it.
    SenderRead(UserId, u64),
}

/// A planned commit.
#[derive(Debug, Default)]
pub struct Batch {
    /// What to write.
    pub writes: Writes,
    /// What changes in memory after the commit.
    pub effects: Vec<Effect>,
    /// Pushes to fan out after the commit, in order.
    pub pushes: Vec<Kind>,
}

impl Batch {
    /// Whether the batch writes nothing (pointers aside).
    pub fn is_empty(&self) -> bool {
        self.writes.create.is_none()
            && self.writes.log.is_empty()
            && self.writes.reactions.is_empty()
            && self.writes.updates.is_empty()
    }

    /// Freezes the writes for the transaction.
    pub fn shared_writes(&mut self) -> Arc<Writes> {
        Arc::new(std::mem::take(&mut self.writes))
    }
}

fn system(
    kind: v1::SystemKind,
    actor: &UserId,
    users: &[UserId],
    role: i32,
    name: &str,
) -> v1::SystemEvent {
    v1::SystemEvent {
        kind: kind as i32,
        actor_id: actor.to_string(),
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        role,
        name: name.to_string(),
    }
}

struct Planner<'a> {
    s: &'a GroupState,
    b: Batch,
    now: u64,
}

impl Planner<'_> {
    fn next_seq(&self) -> u64 {
        self.b.writes.head + 1
    }

    fn append(&mut self, mut msg: v1::Message) -> u64 {
        let seq = msg.seq;
        self.b.writes.log.push((seq, encode(&mut msg)));
        self.b.writes.head = seq;
        self.b.pushes.push(Kind::Message(msg));
        seq
    }

    fn append_system(&mut self, ev: v1::SystemEvent) -> u64 {
        let seq = self.next_seq();
        self.append(v1::Message {
            group_id: self.s.id.to_string(),
            seq,
            sent_at_ms: self.now,
            system: Some(ev),
            ..Default::default()
        })
    }

    fn admin(&self, user: &UserId) -> ChatResult<()> {
        match self.s.members.get(user) {
            Some(m) if m.is_admin() => Ok(()),
            Some(_) => Err(ChatError::Forbidden("only admins can do this".into())),
            None => Err(ChatError::Forbidden(format!(
                "not a member of {}",
                self.s.id
            ))),
        }
    }

    fn not_direct(&self) -> ChatResult<()> {
        if self.s.meta.as_ref().is_some_and(|m| m.direct) {
            return Err(ChatError::Invalid(
                "a 1:1 chat's membership is fixed".into(),
            ));
        }
        Ok(())
    }

    /// If removing `gone` leaves members but no admin, promotes the member
    /// who joined first.
    fn keep_an_admin(&mut self, gone: &[UserId]) {
        let remaining = self.s.members.iter().filter(|(u, _)| !gone.contains(u));
        if remaining.clone().any(|(_, m)| m.is_admin()) {
            return;
        }
        if let Some((u, m)) = remaining.min_by_key(|(u, m)| (m.joined_at_seq, (*u).clone())) {
            let mut rec = m.record();
            rec.role = role::ADMIN;
            self.b.writes.updates.push((u.to_string(), rec));
            self.b.effects.push(Effect::Role(u.clone(), role::ADMIN));
        }
    }

    fn member_record(&self, seq: u64, role: i32) -> Member {
        Member {
            role,
            joined_at_seq: seq,
            joined_at_ms: self.now,
            delivered: seq.saturating_sub(1),
            read: seq.saturating_sub(1),
        }
    }

    /// Plans one request; `Ok(true)` when it changed membership (ends the batch).
    fn op(&mut self, user: &UserId, op: &GroupOp) -> ChatResult<(Kind, bool)> {
        let ok = Kind::Ok(v1::Ok {});
        let gid = self.s.id.to_string();
        match op {
            GroupOp::Create {
                name,
                members,
                direct,
            } => {
                if self.s.exists() {
                    return match (direct, self.s.members.contains_key(user)) {
                        (true, true) => Ok((
                            Kind::GroupCreated(v1::GroupCreated { group_id: gid }),
                            false,
                        )),
                        (true, false) => {
                            Err(ChatError::Forbidden("not a member of this chat".into()))
                        }
                        (false, _) => {
                            Err(ChatError::Unavailable("group id collision; retry".into()))
                        }
                    };
                }
                let mut all = vec![user.clone()];
                for m in members {
                    if !all.contains(m) {
                        all.push(m.clone());
                    }
                }
                let max = self.s.router.config().limits.max_members;
                if all.len() > max as usize {
                    return Err(ChatError::GroupFull {
                        members: 0,
                        max_members: max,
                    });
                }
                self.b.writes.create = Some(GroupMeta {
                    name: name.clone(),
                    creator: user.to_string(),
                    created_at_ms: self.now,
                    max_members: max,
                    member_count: 0,
                    direct: *direct,
                });
                let seq = self.append_system(system(v1::SystemKind::Created, user, &all, 0, name));
                for (i, u) in all.iter().enumerate() {
                    let r = if i == 0 && !direct {
                        role::ADMIN
                    } else {
                        role::MEMBER
                    };
                    let m = self.member_record(seq, r);
                    self.b.writes.adds.push((u.to_string(), m.record()));
                    self.b.effects.push(Effect::Added(u.clone(), m));
                }
                Ok((Kind::GroupCreated(v1::GroupCreated { group_id: gid }), true))
            }
            GroupOp::Send(s) => {
                if !self.s.members.contains_key(user) {
                    return Err(ChatError::Forbidden(format!("not a member of {gid}")));
                }
                if let Some(parent) = s.reply_to_seq
                    && (parent == 0 || parent > self.b.writes.head)
                {
                    return Err(ChatError::NotFound(format!("message {parent} to reply to")));
                }
                let seq = self.next_seq();
                let rec = DedupeRecord {
                    seq,
                    sent_at_ms: self.now,
                };
                self.append(v1::Message {
                    group_id: gid.clone(),
                    seq,
                    sender_id: user.to_string(),
                    text: s.text.clone(),
                    sent_at_ms: self.now,
                    reply_to_seq: s.reply_to_seq,
                    mentions: s.mentions.clone(),
                    attachments: s.attachments.clone(),
                    system: None,
                    client_msg_id: s.client_msg_id.clone(),
                    reactions: Vec::new(),
                });
                if let Some(parent) = s.reply_to_seq {
                    self.b.writes.threads.push((parent, seq));
                }
                self.b.writes.sends.push((
                    user.clone(),
                    Arc::from(s.client_msg_id.as_str()),
                    rec.clone(),
                ));
                self.b.effects.push(Effect::SenderRead(user.clone(), seq));
                Ok((sent(&self.s.id, &s.client_msg_id, &rec), false))
            }
            GroupOp::AddMembers(users) => {
                self.not_direct()?;
                self.admin(user)?;
                let mut new: Vec<UserId> = Vec::new();
                for u in users {
                    if !self.s.members.contains_key(u) && !new.contains(u) {
                        new.push(u.clone());
                    }
                }
                if new.is_empty() {
                    return Ok((ok, false));
                }
                let max = self.s.meta.as_ref().map_or(0, |m| m.max_members);
                if self.s.members.len() + new.len() > max as usize {
                    return Err(ChatError::GroupFull {
                        members: self.s.members.len() as u32,
                        max_members: max,
                    });
                }
                let seq =
                    self.append_system(system(v1::SystemKind::MembersAdded, user, &new, 0, ""));
                for u in new {
                    let m = self.member_record(seq, role::MEMBER);
                    self.b.writes.adds.push((u.to_string(), m.record()));
                    self.b.effects.push(Effect::Added(u, m));
                }
                Ok((ok, true))
            }
            GroupOp::RemoveMembers(users) => {
                self.not_direct()?;
                self.admin(user)?;
                let mut gone: Vec<UserId> = Vec::new();
                for u in users {
                    if self.s.members.contains_key(u) && !gone.contains(u) {
                        gone.push(u.clone());
                    }
                }
                if gone.is_empty() {
                    return Ok((ok, false));
                }
                self.append_system(system(v1::SystemKind::MembersRemoved, user, &gone, 0, ""));
                self.keep_an_admin(&gone);
                for u in gone {
                    self.b.writes.removes.push(u.to_string());
                    self.b.effects.push(Effect::Removed(u));
                }
                Ok((ok, true))
            }
            GroupOp::SetRole {
                user: target,
                role: r,
            } => {
                self.not_direct()?;
                self.admin(user)?;
                if *r != role::MEMBER && *r != role::ADMIN {
                    return Err(ChatError::Invalid("role must be MEMBER or ADMIN".into()));
                }
                let Some(m) = self.s.members.get(target) else {
                    return Err(ChatError::NotFound(format!("{target} is not a member")));
                };
                if m.role == *r {
                    return Ok((ok, false));
                }
                if *r == role::MEMBER
                    && !self
                        .s
                        .members
                        .iter()
                        .any(|(u, m)| u != target && m.is_admin())
                {
                    return Err(ChatError::Invalid(
                        "a group keeps at least one admin".into(),
                    ));
                }
                self.append_system(system(
                    v1::SystemKind::RoleChanged,
                    user,
                    std::slice::from_ref(target),
                    *r,
                    "",
                ));
                let mut rec = m.record();
                rec.role = *r;
                self.b.writes.updates.push((target.to_string(), rec));
                self.b.effects.push(Effect::Role(target.clone(), *r));
                Ok((ok, true))
            }
            GroupOp::Leave => {
                self.not_direct()?;
                if !self.s.members.contains_key(user) {
                    return Err(ChatError::Forbidden(format!("not a member of {gid}")));
                }
                self.append_system(system(v1::SystemKind::MemberLeft, user, &[], 0, ""));
                let gone = [user.clone()];
                self.keep_an_admin(&gone);
                self.b.writes.removes.push(user.to_string());
                self.b.effects.push(Effect::Removed(user.clone()));
                Ok((ok, true))
            }
            GroupOp::React { seq, emoji, remove } => {
                if !self.s.members.contains_key(user) {
                    return Err(ChatError::Forbidden(format!("not a member of {gid}")));
                }
                if *seq == 0 || *seq > self.b.writes.head {
                    return Err(ChatError::NotFound(format!("message {seq}")));
                }
                if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
                    return Err(ChatError::Invalid(format!(
                        "emoji must be 1 to {MAX_EMOJI_BYTES} bytes"
                    )));
                }
                self.b
                    .writes
                    .reactions
                    .push((*seq, emoji.clone(), user.to_string(), !remove));
                self.b.pushes.push(Kind::Reaction(v1::Reaction {
                    group_id: gid,
                    seq: *seq,
                    user_id: user.to_string(),
                    emoji: emoji.clone(),
                    removed: *remove,
                }));
                Ok((ok, false))
            }
            GroupOp::PostSystem { text } => {
                let seq = self.next_seq();
                let mut ev = system(v1::SystemKind::Announcement, user, &[], 0, "");
                ev.actor_id = user.to_string();
                self.append(v1::Message {
                    group_id: gid,
                    seq,
                    text: text.clone(),
                    sent_at_ms: self.now,
                    system: Some(ev),
                    ..Default::default()
                });
                let rec = DedupeRecord {
                    seq,
                    sent_at_ms: self.now,
                };
                Ok((sent(&self.s.id, "", &rec), false))
            }
            GroupOp::MarkDelivered(_)
            | GroupOp::MarkRead(_)
            | GroupOp::Typing
            | GroupOp::Readers(_) => Err(ChatError::Internal("request needs no commit".into())),
        }
    }
}

/// Takes requests from `state.pending` into a batch: every request up to and
/// including the first membership change, at most [`MAX_SENDS_PER_BATCH`]
/// sends. Requests that fail validation are answered at once.
///
/// `base_head` is the head the batch starts from: the committed head, or
/// the head the commits in flight leave. `behind` (commits are in flight)
/// stops the batch before a membership change instead: that one is planned
/// once the commits before it have landed, against their member records.
pub fn plan(state: &mut GroupState, base_head: u64, behind: bool) -> (Batch, Vec<Waiter>) {
    let mut pending = std::mem::take(&mut state.pending);
    let mut waiters = Vec::new();
    let mut planner = Planner {
        s: state,
        b: Batch::default(),
        now: now_ms(),
    };
    planner.b.writes.group = planner.s.id.to_string();
    planner.b.writes.epoch = planner.s.epoch;
    planner.b.writes.base_head = base_head;
    planner.b.writes.head = base_head;
    let mut sends = 0;
    while let Some(mut w) = pending.pop_front() {
        if behind && w.op.changes_membership() {
            pending.push_front(w);
            break;
        }
        if matches!(w.op, GroupOp::Send(_)) {
            if sends == MAX_SENDS_PER_BATCH {
                pending.push_front(w);
                break;
            }
            sends += 1;
        }
        if !planner.s.exists() && !matches!(w.op, GroupOp::Create { .. }) {
            let e = ChatError::NotFound(format!("group {}", planner.s.id));
            w.answer(Err(e.clone()));
            continue;
        }
        match planner.op(&w.user.clone(), &w.op) {
            Ok((kind, membership)) => {
                w.result = Some(Ok(kind));
                waiters.push(w);
                if membership {
                    break;
                }
            }
            Err(e) => w.answer(Err(e)),
        }
    }
    let batch = planner.b;
    state.pending = pending;
    (batch, waiters)
}
