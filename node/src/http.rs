//! The HTTP listener: `/ws` (WebSocket upgrade with JWT auth), `/healthz`,
//! `/metrics`, on one port.
//!
//! Accepts TCP connections up to `max_connections` (past it, new sockets are
//! closed at once), serves HTTP/1.1 with hyper, and hands upgraded sockets to
//! [`crate::ws::serve`] with a small tokio-tungstenite read buffer.
//!
//! What it must not do: run chat logic; it authenticates and routes only.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actors::Router;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use proto::Encoding;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{Auth, AuthError};
use crate::cluster::{ClusterCommand, NodeStatus};
use crate::ws::{self, ConnLimits};

/// WebSocket read chunk per connection: small, so idle connections are cheap
/// (tungstenite keeps this much resident per connection and zero-fills it on
/// every read attempt). Most client frames (a chat message) fit in one
/// chunk; bigger ones take a few more reads and grow that connection's
/// buffer as needed.
const READ_BUFFER_BYTES: usize = 512;
/// Outgoing bytes buffered before tungstenite writes to the socket.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;
/// Most outgoing bytes tungstenite may hold for one connection: above the
/// largest reply (a history page is cut at 512 KiB of messages, which JSON
/// can make a few times larger).
const MAX_WRITE_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// What every request handler shares.
pub struct Server {
    /// Routing to actors.
    pub router: Router,
    /// Token checks.
    pub auth: Auth,
    /// Metrics exposition.
    pub metrics: PrometheusHandle,
    /// Per-connection limits.
    pub limits: ConnLimits,
    /// Set when the node stops serving (shutdown): /healthz says 503, upgrades are refused.
    pub draining: Arc<AtomicBool>,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The cluster manager (None for a single node).
    pub cluster: Option<mpsc::Sender<ClusterCommand>>,
    /// Notified when the node should shut down (after a drain).
    pub stop: Notify,
}

/// A slot of `max_connections`, held by a connection's tasks.
type Permit = Arc<OwnedSemaphorePermit>;

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Accepts connections until `shutdown` turns true. Every connection task
/// (HTTP, then WebSocket after an upgrade) runs on `tasks`, so the caller can
/// wait for them.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // The permit lives as long as the connection, upgraded or not.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("chat_connections_refused_total").increment(1);
            drop(tcp);
            continue;
        };
        let permit = Arc::new(permit);
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        server.tasks.clone().spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                let permit = permit.clone();
                async move { Ok::<_, Infallible>(route(req, server, permit).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "http connection ended with an error");
            }
        });
    }
    info!("listener stopped accepting");
}

async fn route(req: Request<Incoming>, server: Arc<Server>, permit: Permit) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            if server.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, server.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/ws") => upgrade(req, server, permit),
        (_, path) if path.starts_with("/admin/") => admin(req, server).await,
        (_, "/healthz" | "/metrics" | "/ws") => text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Reads a query parameter (no percent-decoding needed: tokens and the
/// encoding names are URL-safe).
fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = text(status, value.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// What `GET /admin/status` answers.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// This node.
    pub node: String,
    /// Whether it is draining.
    pub draining: bool,
    /// Group actors running here.
    pub groups: usize,
    /// Presence actors running here.
    pub presences: usize,
    /// Online users owned here whose presence actor is passivated.
    pub dormant_presences: usize,
    /// Client sessions here.
    pub sessions: usize,
    /// Distinct users connected here.
    pub users: usize,
    /// The cluster as this node sees it (itself included).
    pub nodes: Vec<NodeStatus>,
}

/// The operator endpoints: `GET /admin/status`, `GET /admin/owner?group=ID`
/// (the node that owns a group in this node's view), `GET
/// /admin/presence?user=ID` (a user's presence, from any node),
/// `POST /admin/drain`,
/// `POST /admin/system?group=ID` (body: the text). They need an operator
/// token (`chat-node admin ...` mints one from the config's secret).
async fn admin(req: Request<Incoming>, server: Arc<Server>) -> Response<Body> {
    if let Err(e) = token(&req).and_then(|t| server.auth.verify_admin(t)) {
        return text(
            StatusCode::UNAUTHORIZED,
            format!("operator token required: {e}\n"),
        );
    }
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/admin/status") => {
            let (host, relay) = match server.router.stats().await {
                Ok(s) => s,
                Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            };
            let nodes = match &server.cluster {
                Some(c) => {
                    let (tx, rx) = oneshot::channel();
                    let _ = c.send(ClusterCommand::Status(tx)).await;
                    rx.await.unwrap_or_default()
                }
                None => vec![NodeStatus {
                    name: server.router.node().to_string(),
                    http_addr: String::new(),
                    cluster_addr: String::new(),
                    live: true,
                    draining: server.draining.load(Ordering::Acquire),
                }],
            };
            let status = Status {
                node: server.router.node().to_string(),
                draining: server.draining.load(Ordering::Acquire),
                groups: host.groups,
                presences: host.presences,
                dormant_presences: host.dormant_presences,
                sessions: relay.sessions,
                users: relay.users,
                nodes,
            };
            json(
                StatusCode::OK,
                &serde_json::to_value(&status).unwrap_or_default(),
            )
        }
        (Method::GET, "/admin/owner") => match query_param(&req, "group") {
            Some(g) => json(
                StatusCode::OK,
                &serde_json::json!({ "group": g, "owner": server.router.owner_of(g) }),
            ),
            None => text(StatusCode::BAD_REQUEST, "group=ID required\n"),
        },
        (Method::GET, "/admin/presence") => {
            let Some(user) = query_param(&req, "user").and_then(actors::UserId::parse) else {
                return text(StatusCode::BAD_REQUEST, "user=ID required\n");
            };
            match server.router.presence_of(&user).await {
                Ok(p) => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "userId": p.user_id,
                        "status": p.status().as_str_name(),
                        "lastSeenMs": p.last_seen_ms,
                    }),
                ),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            }
        }
        (Method::POST, "/admin/drain") => {
            let s = server.clone();
            tokio::spawn(async move {
                if let Some(c) = &s.cluster {
                    let (tx, rx) = oneshot::channel();
                    if c.send(ClusterCommand::Drain(tx)).await.is_ok() {
                        let _ = rx.await;
                    }
                }
                info!("drained; leaving the cluster");
                s.stop.notify_one();
            });
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (Method::POST, "/admin/system") => {
            let Some(group) = query_param(&req, "group").and_then(actors::GroupId::parse) else {
                return text(StatusCode::BAD_REQUEST, "group=ID required\n");
            };
            let body = match http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
            };
            let Ok(text_body) = String::from_utf8(body.to_vec()) else {
                return text(StatusCode::BAD_REQUEST, "body must be UTF-8 text\n");
            };
            match server.router.post_system(&group, text_body).await {
                Ok(seq) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "groupId": group.as_str(), "seq": seq }),
                ),
                Err(e) => {
                    let code = crate::edge::error_code(&e);
                    let status = match code {
                        proto::v1::ErrorCode::NotFound => StatusCode::NOT_FOUND,
                        proto::v1::ErrorCode::Invalid | proto::v1::ErrorCode::TooLarge => {
                            StatusCode::BAD_REQUEST
                        }
                        _ => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    json(
                        status,
                        &serde_json::json!({ "code": code.as_str_name(), "message": e.to_string() }),
                    )
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "unknown admin endpoint\n"),
    }
}

fn token(req: &Request<Incoming>) -> Result<&str, AuthError> {
    if let Some(h) = req.headers().get(header::AUTHORIZATION) {
        let h = h.to_str().map_err(|_| AuthError::Missing)?;
        return h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(AuthError::Missing);
    }
    query_param(req, "token").ok_or(AuthError::Missing)
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn upgrade(req: Request<Incoming>, server: Arc<Server>, permit: Permit) -> Response<Body> {
    if server.draining.load(Ordering::Acquire) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "node is going away\n");
    }
    let user = match token(&req).and_then(|t| server.auth.verify(t)) {
        Ok(u) => u,
        Err(e) => {
            metrics::counter!("chat_auth_failures_total").increment(1);
            debug!(error = %e, "upgrade refused");
            let mut r = text(StatusCode::UNAUTHORIZED, format!("{e}\n"));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    };
    let encoding = match query_param(&req, "encoding") {
        None => None,
        Some("json") => Some(Encoding::Json),
        Some("binary") => Some(Encoding::Binary),
        Some(_) => return text(StatusCode::BAD_REQUEST, "encoding must be json or binary\n"),
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true, true, true) = (
        key,
        version_ok,
        header_has(&req, header::CONNECTION, "upgrade"),
        header_has(&req, header::UPGRADE, "websocket"),
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let limits = server.limits;
    let router = server.router.clone();
    // The upgrade future takes the request by value: the request (whose
    // header values share hyper's 8 KiB read buffer) is dropped once the
    // upgrade completes instead of living as long as the connection.
    let upgrading = hyper::upgrade::on(req);
    server.tasks.spawn(async move {
        let _permit = permit;
        let upgraded = match upgrading.await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // Frames between max_frame_bytes and twice that get TOO_LARGE from
        // the connection; past twice that tungstenite refuses them (1009).
        let hard_cap = limits.max_frame_bytes * 2;
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
            .max_message_size(Some(hard_cap))
            .max_frame_size(Some(hard_cap));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        // Split here, where `ws` lives across no await (see `ws::serve`).
        let (sink, stream) = ws.split();
        ws::serve(sink, stream, user, router, limits, encoding).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
