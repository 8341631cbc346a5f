//! The cluster side of routing: the node's port (its one remotable actor),
//! the wire format between nodes, and the table of requests waiting for a
//! reply from another node.
//!
//! Every cross-node message is a protobuf `Envelope` (see
//! `proto/proto/chat/v1/internal.proto`) cast to the receiving node's
//! [`Port`], found as the member of the `ractor::pg` group named after the
//! node in the scope [`PORT_SCOPE`], which ractor_cluster keeps in sync
//! between connected nodes. The port decodes envelopes and hands them to
//! local actors; it never blocks.
//!
//! Who talks to it: the [`Router`] (sending envelopes, pending replies), the
//! node's cluster manager in `node` (pings, hellos, the live node set, via
//! [`PeerEvent`]s and [`Router::set_view`]).
//!
//! What it must not do: trust that a peer's envelope is well formed (a bad
//! one is logged and dropped), or send an envelope near ractor_cluster's
//! 16 MiB frame limit (deliveries are split into chunks).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::Encoding;
use proto::v1::{self, envelope::Kind as Env, server_frame::Kind};
use ractor::{Actor, ActorProcessingErr, ActorRef, BytesConvertable};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::error::{ChatError, ChatResult};
use crate::ids::{GroupId, UserId};
use crate::outbound::{ReplyTo, SharedPush};
use crate::relay::RelayMessage;
use crate::router::Router;

/// Most pushes in one delivery envelope.
pub const MAX_PUSHES_PER_ENVELOPE: usize = 64;

/// The `pg` scope of the nodes' ports: in it, each node's port is the one
/// member of a group named after the node. A scope of their own, so the
/// router lists the reachable nodes from pg's index of that scope alone
/// (`which_scoped_groups`) at every commit's broadcast, instead of
/// walking, cloning and sorting every group of every scope
/// (`which_groups`: 1.3% of the workers over 1,000 groups,
/// docs/benchmarks.md, round 28). ractor_cluster syncs every scope
/// between connected nodes.
pub const PORT_SCOPE: &str = "chat.ports";

/// An encoded [`v1::Envelope`] as it crosses the wire. Cast-only.
#[derive(Debug, Clone)]
pub struct Wire(pub Vec<u8>);

impl BytesConvertable for Wire {
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Wire(bytes)
    }
}

/// What the port reports to the node's cluster manager.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A peer answered a ping.
    Pong {
        /// The peer.
        from: String,
        /// The ping's sequence number.
        seq: u64,
    },
    /// A peer described itself.
    Hello {
        /// The peer.
        from: String,
        /// Its cluster address.
        cluster_addr: String,
        /// Whether it is draining.
        draining: bool,
        /// Addresses it knows, `name=host:port`.
        known: Vec<String>,
        /// Its HTTP address.
        http_addr: String,
    },
}

/// A request sent to another node, waiting for its reply.
struct PendingEntry {
    node: String,
    since: Instant,
    reply: ReplyTo,
}

/// Requests of this node's sessions waiting for another node's reply.
///
/// Invariant: every entry is answered exactly once: by the reply, or with
/// `UNAVAILABLE` when its node goes down or the entry times out.
#[derive(Default)]
pub struct Pending {
    next: AtomicU64,
    map: Mutex<HashMap<u64, PendingEntry>>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PendingEntry>> {
        // A poisoned lock means a panic while inserting or removing one
        // entry; the map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `reply` as waiting on `node`; returns its token (never 0).
    pub fn insert(&self, node: &str, reply: ReplyTo) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            token,
            PendingEntry {
                node: node.to_string(),
                since: Instant::now(),
                reply,
            },
        );
        token
    }

    /// Answers the request `token` (unknown tokens are late replies: ignored).
    pub fn complete(&self, token: u64, result: ChatResult<Kind>) {
        let entry = self.lock().remove(&token);
        if let Some(e) = entry {
            e.reply.send(result);
        }
    }

    /// Answers every request waiting on `node` with `UNAVAILABLE`.
    pub fn fail_node(&self, node: &str) {
        let failed: Vec<_> = {
            let mut map = self.lock();
            let tokens: Vec<u64> = map
                .iter()
                .filter(|(_, e)| e.node == node)
                .map(|(t, _)| *t)
                .collect();
            tokens.into_iter().filter_map(|t| map.remove(&t)).collect()
        };
        for e in failed {
            e.reply.fail(ChatError::Unavailable(format!(
                "node {node} is down; retry"
            )));
        }
    }

    /// Answers every request older than `timeout` with `UNAVAILABLE`.
    pub fn expire(&self, timeout: Duration) {
        let now = Instant::now();
        let expired: Vec<_> = {
            let mut map = self.lock();
            let tokens: Vec<u64> = map
                .iter()
                .filter(|(_, e)| now.duration_since(e.since) > timeout)
                .map(|(t, _)| *t)
                .collect();
            tokens.into_iter().filter_map(|t| map.remove(&t)).collect()
        };
        for e in expired {
            e.reply.fail(ChatError::Unavailable(format!(
                "no answer from node {}; retry",
                e.node
            )));
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reply frame as a request result.
pub fn frame_result(frame: Option<v1::ServerFrame>) -> ChatResult<Kind> {
    match frame.and_then(|f| f.kind) {
        Some(Kind::Error(e)) => Err(ChatError::from_wire(&e)),
        Some(k) => Ok(k),
        None => Err(ChatError::Internal("empty reply from peer".into())),
    }
}

/// A request result as a reply frame.
pub fn result_frame(result: ChatResult<Kind>) -> v1::ServerFrame {
    let kind = match result {
        Ok(k) => k,
        Err(e) => Kind::Error(e.to_wire()),
    };
    v1::ServerFrame {
        id: 0,
        kind: Some(kind),
    }
}

/// Converts a relay message into the envelopes that carry it to a peer.
pub fn relay_envelopes(msg: &RelayMessage) -> Vec<Env> {
    match msg {
        RelayMessage::Deliver {
            group,
            pushes,
            except,
        } => pushes
            .chunks(MAX_PUSHES_PER_ENVELOPE)
            .map(|chunk| {
                Env::Deliver(v1::RelayDeliver {
                    group_id: group.to_string(),
                    pushes: chunk.iter().map(|p| p.frame().clone()).collect(),
                    except_user: except.as_ref().map(|u| u.to_string()).unwrap_or_default(),
                })
            })
            .collect(),
        RelayMessage::MembersAdded { group, users } => vec![Env::Members(v1::RelayMembers {
            group_id: group.to_string(),
            added: users.iter().map(|(u, _)| u.to_string()).collect(),
            joined_at: users.iter().map(|(_, s)| *s).collect(),
            removed: Vec::new(),
            removed_seq: 0,
        })],
        RelayMessage::MembersRemoved { group, users, seq } => {
            vec![Env::Members(v1::RelayMembers {
                group_id: group.to_string(),
                added: Vec::new(),
                joined_at: Vec::new(),
                removed: users.iter().map(|u| u.to_string()).collect(),
                removed_seq: *seq,
            })]
        }
        RelayMessage::DeliverTo { users, push } => vec![Env::DeliverTo(v1::RelayDeliverTo {
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            push: Some(push.frame().clone()),
        })],
        // Node-local control messages never cross the wire.
        RelayMessage::Register { .. }
        | RelayMessage::Unregister { .. }
        | RelayMessage::Attach { .. }
        | RelayMessage::DeliverToSessions { .. }
        | RelayMessage::CloseAll { .. }
        | RelayMessage::Stats(_)
        | RelayMessage::Tick
        | RelayMessage::Release(_) => Vec::new(),
    }
}

fn users(ids: &[String]) -> Vec<UserId> {
    ids.iter().filter_map(|u| UserId::parse(u)).collect()
}

/// The port: this node's one remotable actor.
pub struct Port;

/// Envelopes whose handling may wait (on the host starting an actor) and
/// that the port's inbox task serves in arrival order, so the port itself
/// never waits: pings and pongs queue behind whatever the port awaits, and
/// a busy host (a mass disconnect starting thousands of presence actors)
/// must not make healthy peers miss the failure timeout.
const INBOX: usize = 65_536;

/// The port's state: the node's router and its inbox task's queue.
pub struct PortState {
    router: Router,
    inbox: mpsc::Sender<(String, Env)>,
}

/// The port's inbox task: serves the envelopes that may wait, in order.
async fn serve_inbox(router: Router, mut rx: mpsc::Receiver<(String, Env)>) {
    while let Some((from, kind)) = rx.recv().await {
        let r = &router;
        match kind {
            Env::GroupRequest(req) => r.serve_remote_request(&from, req).await,
            Env::Presence(op) => r.serve_presence_op(&from, op).await,
            Env::PresenceQuery(q) => {
                let reply = ReplyTo::remote(r.replier(), from, q.token, Encoding::Binary);
                match UserId::parse(&q.user_id) {
                    Some(u) => r.query_presence(&u, reply).await,
                    None => reply.fail(ChatError::Invalid("bad user id".into())),
                }
            }
            Env::PostSystem(p) => {
                let replier = r.replier();
                let reply = ReplyTo::remote(replier, from, p.token, Encoding::Binary);
                match GroupId::parse(&p.group_id) {
                    Some(g) => r.post_system_local(&g, p.text, reply).await,
                    None => reply.fail(ChatError::Invalid("bad group id".into())),
                }
            }
            other => debug!(from = %from, kind = ?other, "not an inbox envelope; dropped"),
        }
    }
}

impl Actor for Port {
    type Msg = Wire;
    type State = PortState;
    type Arguments = Router;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        router: Router,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join_scoped(
            PORT_SCOPE.to_string(),
            router.node().to_string(),
            vec![myself.get_cell()],
        );
        let (inbox, rx) = mpsc::channel(INBOX);
        tokio::spawn(serve_inbox(router.clone(), rx));
        Ok(PortState { router, inbox })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        wire: Wire,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let env = match v1::Envelope::decode(&wire.0[..]) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "undecodable envelope from a peer; dropped");
                return Ok(());
            }
        };
        let from = env.from_node;
        let Some(kind) = env.kind else {
            debug!(from = %from, "envelope without a kind; dropped");
            return Ok(());
        };
        let r = &state.router;
        r.meters().envelopes_in.increment(1);
        match kind {
            kind @ (Env::GroupRequest(_)
            | Env::Presence(_)
            | Env::PresenceQuery(_)
            | Env::PostSystem(_)) => {
                // Waits only when INBOX envelopes are already queued.
                if state.inbox.send((from, kind)).await.is_err() {
                    warn!("port inbox task gone; envelope dropped");
                }
            }
            Env::Reply(rep) => r.pending().complete(rep.token, frame_result(rep.frame)),
            Env::Deliver(d) => {
                let Some(group) = GroupId::parse(&d.group_id) else {
                    return Ok(());
                };
                let pushes = d
                    .pushes
                    .into_iter()
                    .filter_map(|f| f.kind.map(SharedPush::new))
                    .collect();
                let except = UserId::parse(&d.except_user);
                r.local_relay(RelayMessage::Deliver {
                    group,
                    pushes,
                    except,
                });
            }
            Env::Members(m) => {
                let Some(group) = GroupId::parse(&m.group_id) else {
                    return Ok(());
                };
                if !m.added.is_empty() {
                    let added = m
                        .added
                        .iter()
                        .zip(m.joined_at.iter().chain(std::iter::repeat(&0)))
                        .filter_map(|(u, s)| Some((UserId::parse(u)?, *s)))
                        .collect();
                    r.local_relay(RelayMessage::MembersAdded {
                        group: group.clone(),
                        users: added,
                    });
                }
                if !m.removed.is_empty() {
                    r.local_relay(RelayMessage::MembersRemoved {
                        group,
                        users: users(&m.removed),
                        seq: m.removed_seq,
                    });
                }
            }
            Env::DeliverTo(d) => {
                if let Some(push) = d.push.and_then(|f| f.kind) {
                    r.local_relay(RelayMessage::DeliverTo {
                        users: users(&d.user_ids),
                        push: SharedPush::new(push),
                    });
                }
            }
            Env::Ping(p) => {
                r.send_to_node(&from, Env::Pong(v1::Pong { seq: p.seq }));
            }
            Env::Pong(p) => r.peer_event(PeerEvent::Pong { from, seq: p.seq }),
            Env::Hello(h) => r.peer_event(PeerEvent::Hello {
                from,
                cluster_addr: h.cluster_addr,
                draining: h.draining,
                known: h.known,
                http_addr: h.http_addr,
            }),
            Env::DeliverToSessions(d) => {
                if let Some(push) = d.push.and_then(|f| f.kind) {
                    r.local_relay(RelayMessage::DeliverToSessions {
                        sessions: d.sessions.into_iter().map(crate::ids::SessionId).collect(),
                        push: SharedPush::new(push),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{Outbound, SessionHandle};

    #[tokio::test]
    async fn pending_requests_are_answered_exactly_once() {
        let (h, q) = SessionHandle::channel(8);
        let p = Pending::default();
        let t1 = p.insert("b", ReplyTo::new(1, Encoding::Json, h.clone(), None));
        let _t2 = p.insert("c", ReplyTo::new(2, Encoding::Json, h.clone(), None));
        let t3 = p.insert("b", ReplyTo::new(3, Encoding::Json, h.clone(), None));
        p.complete(t1, Ok(Kind::Ok(v1::Ok {})));
        p.complete(t1, Ok(Kind::Ok(v1::Ok {}))); // late duplicate: ignored
        p.fail_node("b");
        p.expire(Duration::ZERO);
        p.complete(t3, Ok(Kind::Ok(v1::Ok {}))); // already failed: ignored
        let mut got = Vec::new();
        while let Some(Outbound::Reply { id, result, .. }) = q.try_recv() {
            got.push((id, result.is_ok()));
        }
        got.sort();
        assert_eq!(got, vec![(1, true), (2, false), (3, false)]);
        assert!(p.is_empty());
    }

    #[test]
    fn results_cross_as_frames() {
        let e = ChatError::Forbidden("no".into());
        assert_eq!(frame_result(Some(result_frame(Err(e.clone())))), Err(e));
        let ok = Kind::Ok(v1::Ok {});
        assert_eq!(frame_result(Some(result_frame(Ok(ok.clone())))), Ok(ok));
        assert!(frame_result(None).is_err());
    }
}
