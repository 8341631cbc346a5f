//! The session actor: one per WebSocket connection, on the node that
//! accepted it.
//!
//! It holds the authenticated user (checked once, at upgrade, by `node`),
//! registers the connection with the node's relay so pushes reach it,
//! checks each request's rate, and routes it: group requests to the group's
//! actor wherever it lives (by id, through the [`Router`]), reads
//! (`history`, `sync`) straight to storage on a task of their own. Replies
//! go through each request's [`ReplyTo`] into the connection's bounded
//! outbound queue, so a slow client never blocks an actor.
//!
//! Spawned by the connection task in `node`, which owns the socket, decodes
//! frames and stops this actor when the socket closes. If the actor dies,
//! the connection closes (the client reconnects and syncs).
//!
//! What it must not do: touch the socket, keep per-user state beyond the
//! connection, or wait on storage inside `handle`.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use proto::v1::{self, client_frame::Kind as Req, server_frame::Kind};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::TxError;
use storage::model::{LogQuery, role};
use tracing::debug;

use crate::error::{ChatError, ChatResult};
use crate::group::decode_entry;
use crate::ids::{GroupId, SessionId, UserId};
use crate::outbound::{ReplyTo, SessionHandle};
use crate::presence::{PresenceOp, SessionAddr};
use crate::ratelimit::TokenBucket;
use crate::relay::RelayMessage;
use crate::request::{self, Target};
use crate::router::Router;
use crate::store::Store;

/// Messages of a session actor.
#[derive(Debug)]
pub enum SessionMessage {
    /// A decoded client request, answered through `reply`.
    Request {
        /// The request.
        kind: Req,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// Timer (a third of the presence TTL, sent by the relay to every
    /// session): refresh the user's presence while the client is active,
    /// and the session's presence subscriptions.
    PresenceTick,
}

impl ractor::Message for SessionMessage {}

/// Arguments of a session actor.
pub struct SessionArgs {
    /// The authenticated user.
    pub user: UserId,
    /// The connection's outbound queue.
    pub handle: SessionHandle,
    /// This node's router.
    pub router: Router,
}

/// The session's state.
///
/// Invariants: while the actor runs, the relay holds this session under
/// `(user, id)` (registered in `pre_start`, unregistered in `post_stop`);
/// the user's presence counts this session while the client sent a frame
/// within the presence TTL; `subscriptions` are the users whose presence
/// this session watches (renewed on every presence tick, dropped on stop).
pub struct SessionState {
    user: UserId,
    id: SessionId,
    router: Router,
    limiter: TokenBucket,
    last_active: Instant,
    subscriptions: HashSet<UserId>,
}

/// Most users one session may watch with `subscribePresence`.
pub const MAX_PRESENCE_SUBSCRIPTIONS: usize = 1_000;

/// The session actor.
pub struct Session;

impl Actor for Session {
    type Msg = SessionMessage;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let id = args.router.next_session_id();
        let l = &args.router.config().limits;
        let limiter = TokenBucket::new(l.rate_per_sec, l.rate_burst, Instant::now());
        // Register first, then read the group list: a membership change
        // committed in between reaches the relay after the registration, and
        // the relay's removal marks beat a stale list (see relay.rs).
        args.router.relay().cast(RelayMessage::Register {
            user: args.user.clone(),
            session: id,
            handle: args.handle.clone(),
            actor: myself.clone(),
        })?;
        let uid = args.user.to_string();
        let groups = args
            .router
            .store()
            .read(move |t, m| Ok(m.user_groups(t, &uid)?))
            .await;
        let groups = match groups {
            Ok(g) => g,
            Err(e) => {
                let _ = args.router.relay().cast(RelayMessage::Unregister {
                    user: args.user.clone(),
                    session: id,
                });
                return Err(format!("loading groups of {}: {e}", args.user).into());
            }
        };
        let groups = groups
            .into_iter()
            .filter_map(|(g, seq)| Some((GroupId::parse(&g)?, seq)))
            .collect();
        args.router.relay().cast(RelayMessage::Attach {
            user: args.user.clone(),
            groups,
        })?;
        metrics::gauge!("chat_sessions").increment(1.0);
        debug!(user = %args.user, session = %id, "session started");
        let addr = (args.router.node().to_string(), id);
        args.router
            .presence_op(&args.user, addr, PresenceOp::Touch)
            .await;
        Ok(SessionState {
            user: args.user,
            id,
            router: args.router,
            limiter,
            last_active: Instant::now(),
            subscriptions: HashSet::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.router.relay().cast(RelayMessage::Unregister {
            user: state.user.clone(),
            session: state.id,
        });
        let addr = state.addr();
        state
            .router
            .presence_op(&state.user, addr.clone(), PresenceOp::Leave)
            .await;
        for u in std::mem::take(&mut state.subscriptions) {
            state
                .router
                .presence_op(&u, addr.clone(), PresenceOp::Unsubscribe)
                .await;
        }
        metrics::gauge!("chat_sessions").decrement(1.0);
        debug!(user = %state.user, session = %state.id, "session ended");
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (kind, reply) = match message {
            SessionMessage::Request { kind, reply } => (kind, reply),
            SessionMessage::PresenceTick => {
                // Boxed, like `request` below: ractor keeps the handler's
                // future inside the actor's task for its whole life, so an
                // inline future would cost every idle session its size.
                Box::pin(state.presence_tick()).await;
                return Ok(());
            }
        };
        state.last_active = Instant::now();
        if !state.limiter.try_take(Instant::now()) {
            metrics::counter!("chat_requests_rate_limited_total").increment(1);
            reply.fail(ChatError::RateLimited);
            return Ok(());
        }
        state.router.meters().requests(&kind).increment(1);
        Box::pin(state.request(kind, reply)).await;
        Ok(())
    }
}

/// Most reactions listed per emoji in `history`.
pub const MAX_REACTION_USERS: usize = 20;
/// Most bytes of stored messages in one `history` reply: a longer page is
/// cut (at least one message is always returned) and says `hasMore`.
pub const MAX_HISTORY_REPLY_BYTES: usize = 512 * 1024;

/// Cuts a page (increasing seq) to [`MAX_HISTORY_REPLY_BYTES`], keeping its
/// newest end (`keep_newest`, for pages read backwards) or its oldest end.
/// Returns whether anything was cut.
fn cut_to_bytes(entries: &mut Vec<(u64, Vec<u8>)>, keep_newest: bool) -> bool {
    let mut total = 0;
    let mut keep = 0;
    let sizes: Vec<usize> = if keep_newest {
        entries.iter().rev().map(|(_, b)| b.len()).collect()
    } else {
        entries.iter().map(|(_, b)| b.len()).collect()
    };
    for size in sizes {
        if keep > 0 && total + size > MAX_HISTORY_REPLY_BYTES {
            break;
        }
        total += size;
        keep += 1;
    }
    let cut = keep < entries.len();
    if cut {
        if keep_newest {
            entries.drain(..entries.len() - keep);
        } else {
            entries.truncate(keep);
        }
    }
    cut
}

impl SessionState {
    fn addr(&self) -> SessionAddr {
        (self.router.node().to_string(), self.id)
    }

    async fn presence_tick(&mut self) {
        let addr = self.addr();
        // A quiet client stops counting as online; its subscriptions last
        // as long as its session.
        if self.last_active.elapsed() < self.router.config().tuning.presence_ttl {
            self.router
                .presence_op(&self.user, addr.clone(), PresenceOp::Touch)
                .await;
        }
        for u in &self.subscriptions {
            self.router
                .presence_op(u, addr.clone(), PresenceOp::Subscribe)
                .await;
        }
    }

    async fn subscribe(&mut self, ids: &[String], reply: ReplyTo) {
        let limits = &self.router.config().limits;
        if ids.len() > limits.max_users_per_request
            || self.subscriptions.len() + ids.len() > MAX_PRESENCE_SUBSCRIPTIONS
        {
            return reply.fail(ChatError::TooLarge(format!(
                "a session watches at most {MAX_PRESENCE_SUBSCRIPTIONS} users"
            )));
        }
        let mut users = Vec::with_capacity(ids.len());
        for id in ids {
            match UserId::parse(id) {
                Some(u) => users.push(u),
                None => return reply.fail(ChatError::Invalid(format!("bad user id {id:?}"))),
            }
        }
        // The reply goes first; each presence actor then pushes its state.
        reply.ok();
        let addr = self.addr();
        for u in users {
            if self.subscriptions.insert(u.clone()) {
                self.router
                    .presence_op(&u, addr.clone(), PresenceOp::Subscribe)
                    .await;
            }
        }
    }

    async fn request(&mut self, kind: Req, reply: ReplyTo) {
        let target = match request::target(&self.user, &kind) {
            Ok(t) => t,
            Err(e) => return reply.fail(e),
        };
        if let Target::Group(group) = target {
            return self.router.route(&group, &self.user, kind, reply).await;
        }
        match kind {
            Req::History(h) => {
                let group = match GroupId::parse(&h.group_id) {
                    Some(g) => g,
                    None => {
                        return reply
                            .fail(ChatError::Invalid(format!("bad group id {:?}", h.group_id)));
                    }
                };
                let max = self.router.config().limits.max_history;
                let limit = match h.limit {
                    0 => 50.min(max),
                    n if n as usize <= max => n as usize,
                    _ => {
                        return reply.fail(ChatError::Invalid(format!("limit must be 1 to {max}")));
                    }
                };
                let store = self.router.store().clone();
                let user = self.user.clone();
                tokio::spawn(async move {
                    reply.send(history(&store, &user, &group, &h, limit).await);
                });
            }
            Req::Sync(_) => {
                let store = self.router.store().clone();
                let user = self.user.clone();
                tokio::spawn(async move {
                    reply.send(sync(&store, &user).await);
                });
            }
            Req::SubscribePresence(p) => self.subscribe(&p.user_ids, reply).await,
            Req::Heartbeat(_) => reply.ok(),
            // request::target sends every other kind to a group.
            _ => reply.fail(ChatError::Internal("unroutable request".into())),
        }
    }
}

/// Reads a page of a group's history for a member.
async fn history(
    store: &Store,
    user: &UserId,
    group: &GroupId,
    h: &v1::History,
    limit: usize,
) -> ChatResult<Kind> {
    let (gid, uid) = (group.to_string(), user.to_string());
    let (after, before, thread) = (h.after_seq, h.before_seq, h.thread_seq);
    let (entries, has_more, reactions) = store
        .read(move |t, m| {
            if m.meta(t, &gid)?.is_none() {
                return Err(TxError::Abort(ChatError::NotFound(format!("group {gid}"))));
            }
            if m.member(t, &gid, &uid)?.is_none() {
                return Err(TxError::Abort(ChatError::Forbidden(format!(
                    "not a member of {gid}"
                ))));
            }
            let (mut entries, has_more) = match thread {
                Some(parent) => {
                    let (seqs, more) = m.thread_seqs(t, &gid, parent, after.unwrap_or(0), limit)?;
                    let mut entries = Vec::with_capacity(seqs.len());
                    for s in seqs {
                        if let Some(body) = m.log_entry(t, &gid, s)? {
                            entries.push((s, body));
                        }
                    }
                    (entries, more)
                }
                None => {
                    let q = match (after, before) {
                        (None, None) => LogQuery::Latest,
                        (Some(a), None) => LogQuery::After(a),
                        (None, Some(b)) => LogQuery::Before(b),
                        (Some(a), Some(b)) => LogQuery::Between(a, b),
                    };
                    let page = m.log_page(t, &gid, q, limit)?;
                    (page.entries, page.has_more)
                }
            };
            let backwards = thread.is_none() && after.is_none();
            let has_more = cut_to_bytes(&mut entries, backwards) || has_more;
            let mut reactions = Vec::with_capacity(entries.len());
            for (s, _) in &entries {
                reactions.push(m.reactions(t, &gid, *s)?);
            }
            Ok((entries, has_more, reactions))
        })
        .await?;
    let mut messages = Vec::with_capacity(entries.len());
    for ((seq, body), reacts) in entries.into_iter().zip(reactions) {
        let mut msg = decode_entry(group, seq, &body)
            .map_err(|e| ChatError::Internal(format!("log entry {seq}: {e}")))?;
        msg.reactions = count_reactions(reacts);
        messages.push(msg);
    }
    Ok(Kind::Messages(v1::Messages {
        group_id: group.to_string(),
        messages,
        has_more,
    }))
}

fn count_reactions(reacts: Vec<(String, String)>) -> Vec<v1::ReactionCount> {
    let mut by_emoji: Vec<v1::ReactionCount> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (emoji, user) in reacts {
        let i = *index.entry(emoji.clone()).or_insert_with(|| {
            by_emoji.push(v1::ReactionCount {
                emoji,
                count: 0,
                user_ids: Vec::new(),
            });
            by_emoji.len() - 1
        });
        let rc = &mut by_emoji[i];
        rc.count += 1;
        if rc.user_ids.len() < MAX_REACTION_USERS {
            rc.user_ids.push(user);
        }
    }
    by_emoji
}

/// Lists the user's groups with their pointers.
async fn sync(store: &Store, user: &UserId) -> ChatResult<Kind> {
    let uid = user.to_string();
    let groups = store
        .read(move |t, m| {
            let mut out = Vec::new();
            for (gid, _) in m.user_groups(t, &uid)? {
                let (Some(meta), Some(mem)) = (m.meta(t, &gid)?, m.member(t, &gid, &uid)?) else {
                    continue;
                };
                let head = m.head(t, &gid)?;
                out.push(v1::GroupSummary {
                    group_id: gid,
                    name: meta.name,
                    head_seq: head,
                    read_seq: mem.read_seq,
                    unread: head.saturating_sub(mem.read_seq),
                    role: if mem.role == role::ADMIN {
                        v1::Role::Admin as i32
                    } else {
                        v1::Role::Member as i32
                    },
                    delivered_seq: mem.delivered_seq,
                    direct: meta.direct,
                    member_count: meta.member_count,
                });
            }
            Ok(out)
        })
        .await?;
    Ok(Kind::Groups(v1::Groups { groups }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_pages_are_cut_by_bytes() {
        let big = MAX_HISTORY_REPLY_BYTES / 3;
        let page = || (1..=5u64).map(|s| (s, vec![0u8; big])).collect::<Vec<_>>();
        let mut forward = page();
        assert!(cut_to_bytes(&mut forward, false));
        assert_eq!(
            forward.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let mut backward = page();
        assert!(cut_to_bytes(&mut backward, true));
        assert_eq!(
            backward.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let mut huge = vec![(1, vec![0u8; MAX_HISTORY_REPLY_BYTES * 2])];
        assert!(!cut_to_bytes(&mut huge, false), "one message always fits");
        assert_eq!(huge.len(), 1);
    }

    #[test]
    fn reactions_are_counted_per_emoji() {
        let r = count_reactions(vec![
            ("👍".into(), "a".into()),
            ("🎉".into(), "a".into()),
            ("👍".into(), "b".into()),
        ]);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].emoji.as_str(), r[0].count), ("👍", 2));
        assert_eq!(r[0].user_ids, vec!["a", "b"]);
        assert_eq!((r[1].emoji.as_str(), r[1].count), ("🎉", 1));
    }
}
