//! Helpers shared by the actor tests: requests straight into a router, as
//! a session would send them.

use std::time::Duration;

use actors::outbound::ReplyTo;
use actors::{ChatError, GroupId, Router, UserId};
use proto::v1::{self, client_frame::Kind as Req, server_frame::Kind};
use tokio::sync::oneshot;

/// A request's answer, to come.
pub type Answer = oneshot::Receiver<Result<Kind, ChatError>>;

/// Queues a request (no wait for the answer).
pub async fn post(router: &Router, group: &GroupId, user: &UserId, req: Req) -> Answer {
    let (reply, rx) = ReplyTo::oneshot();
    router.route(group, user, req, reply).await;
    rx
}

/// Waits for an answer (30 s at most).
pub async fn answer(rx: Answer) -> Result<Kind, ChatError> {
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("answered in time")
        .expect("answered")
}

/// Sends a request and waits for its answer.
pub async fn ask(
    router: &Router,
    group: &GroupId,
    user: &UserId,
    req: Req,
) -> Result<Kind, ChatError> {
    answer(post(router, group, user, req).await).await
}

/// A text send with this client message id.
pub fn send(group: &GroupId, cmid: &str) -> Req {
    Req::Send(v1::Send {
        group_id: group.to_string(),
        client_msg_id: cmid.into(),
        text: format!("text of {cmid}"),
        ..Default::default()
    })
}
