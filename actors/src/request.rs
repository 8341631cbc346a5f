//! Client requests for groups: which group a request is for, and the checked
//! [`GroupOp`] it becomes.
//!
//! The session decides the target group (on the node the client is on); the
//! group's owner (possibly another node) turns the request into a
//! [`GroupOp`], checking shapes and sizes against its limits. Pure logic.

use proto::v1::{self, client_frame::Kind as Req};
use storage::model::role;

use crate::config::Limits;
use crate::error::{ChatError, ChatResult};
use crate::group::GroupOp;
use crate::ids::{GroupId, UserId};

/// Longest `clientMsgId`, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;
/// Longest attachment URL, in bytes.
pub const MAX_URL_BYTES: usize = 2_048;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// To this group's actor.
    Group(GroupId),
    /// Served by the session itself (reads, heartbeat, presence).
    Session,
}

fn group_id(s: &str) -> ChatResult<GroupId> {
    GroupId::parse(s).ok_or_else(|| ChatError::Invalid(format!("bad group id {s:?}")))
}

fn user_id(s: &str) -> ChatResult<UserId> {
    UserId::parse(s).ok_or_else(|| ChatError::Invalid(format!("bad user id {s:?}")))
}

/// Where `user`'s request goes. A new group gets a fresh random id; a 1:1
/// chat the id derived from the pair.
pub fn target(user: &UserId, req: &Req) -> ChatResult<Target> {
    Ok(Target::Group(match req {
        Req::CreateGroup(_) => GroupId::random(),
        Req::OpenDirect(o) => {
            let peer = user_id(&o.user_id)?;
            if &peer == user {
                return Err(ChatError::Invalid("a 1:1 chat needs another user".into()));
            }
            GroupId::direct(user, &peer)
        }
        Req::AddMembers(r) => group_id(&r.group_id)?,
        Req::RemoveMembers(r) => group_id(&r.group_id)?,
        Req::SetRole(r) => group_id(&r.group_id)?,
        Req::LeaveGroup(r) => group_id(&r.group_id)?,
        Req::Send(r) => group_id(&r.group_id)?,
        Req::MarkDelivered(r) => group_id(&r.group_id)?,
        Req::MarkRead(r) => group_id(&r.group_id)?,
        Req::Typing(r) => group_id(&r.group_id)?,
        Req::React(r) => group_id(&r.group_id)?,
        Req::Readers(r) => group_id(&r.group_id)?,
        Req::History(_) | Req::Sync(_) | Req::SubscribePresence(_) | Req::Heartbeat(_) => {
            return Ok(Target::Session);
        }
    }))
}

fn users(ids: &[String], limits: &Limits) -> ChatResult<Vec<UserId>> {
    if ids.len() > limits.max_users_per_request {
        return Err(ChatError::TooLarge(format!(
            "at most {} users per request",
            limits.max_users_per_request
        )));
    }
    ids.iter().map(|s| user_id(s)).collect()
}

fn check_send(s: &v1::Send, l: &Limits) -> ChatResult<()> {
    if s.client_msg_id.is_empty() || s.client_msg_id.len() > MAX_CLIENT_MSG_ID_BYTES {
        return Err(ChatError::Invalid(format!(
            "clientMsgId must be 1 to {MAX_CLIENT_MSG_ID_BYTES} bytes"
        )));
    }
    if s.text.len() > l.max_text_bytes {
        return Err(ChatError::TooLarge(format!(
            "text is {} bytes; the limit is {}",
            s.text.len(),
            l.max_text_bytes
        )));
    }
    if s.text.is_empty() && s.attachments.is_empty() {
        return Err(ChatError::Invalid(
            "a message needs text or attachments".into(),
        ));
    }
    if s.mentions.len() > l.max_mentions || s.attachments.len() > l.max_attachments {
        return Err(ChatError::TooLarge(format!(
            "at most {} mentions and {} attachments",
            l.max_mentions, l.max_attachments
        )));
    }
    for m in &s.mentions {
        user_id(m)?;
    }
    for a in &s.attachments {
        if a.url.is_empty()
            || a.url.len() > MAX_URL_BYTES
            || a.name.len() > 1024
            || a.mime_type.len() > 255
        {
            return Err(ChatError::Invalid(
                "attachment url, name or type out of bounds".into(),
            ));
        }
    }
    Ok(())
}

/// The checked group operation of a group request (see [`target`]).
pub fn group_op(req: Req, limits: &Limits) -> ChatResult<GroupOp> {
    Ok(match req {
        Req::CreateGroup(c) => {
            if c.name.len() > limits.max_name_bytes {
                return Err(ChatError::TooLarge("group name".into()));
            }
            GroupOp::Create {
                name: c.name,
                members: users(&c.members, limits)?,
                direct: false,
            }
        }
        Req::OpenDirect(o) => GroupOp::Create {
            name: String::new(),
            members: vec![user_id(&o.user_id)?],
            direct: true,
        },
        Req::AddMembers(a) => GroupOp::AddMembers(users(&a.user_ids, limits)?),
        Req::RemoveMembers(r) => GroupOp::RemoveMembers(users(&r.user_ids, limits)?),
        Req::SetRole(r) => {
            let user = user_id(&r.user_id)?;
            let role = match r.role() {
                v1::Role::Admin => role::ADMIN,
                v1::Role::Member => role::MEMBER,
                v1::Role::Unspecified => {
                    return Err(ChatError::Invalid("role must be MEMBER or ADMIN".into()));
                }
            };
            GroupOp::SetRole { user, role }
        }
        Req::LeaveGroup(_) => GroupOp::Leave,
        Req::Send(s) => {
            check_send(&s, limits)?;
            GroupOp::Send(s)
        }
        Req::MarkDelivered(m) => GroupOp::MarkDelivered(m.seq),
        Req::MarkRead(m) => GroupOp::MarkRead(m.seq),
        Req::Typing(_) => GroupOp::Typing,
        Req::React(r) => GroupOp::React {
            seq: r.seq,
            emoji: r.emoji,
            remove: r.remove,
        },
        Req::Readers(r) => GroupOp::Readers(r.seq),
        Req::History(_) | Req::Sync(_) | Req::SubscribePresence(_) | Req::Heartbeat(_) => {
            return Err(ChatError::Internal("not a group request".into()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::parse("alice").expect("valid")
    }

    fn send(text: &str, cmid: &str) -> Req {
        Req::Send(v1::Send {
            group_id: "g_1".into(),
            client_msg_id: cmid.into(),
            text: text.into(),
            ..Default::default()
        })
    }

    #[test]
    fn targets() {
        let t = target(&alice(), &send("x", "c")).expect("valid");
        assert_eq!(t, Target::Group(GroupId::parse("g_1").expect("valid")));
        let bad = Req::Send(v1::Send {
            group_id: "no spaces".into(),
            ..Default::default()
        });
        assert!(matches!(target(&alice(), &bad), Err(ChatError::Invalid(_))));
        let me = Req::OpenDirect(v1::OpenDirect {
            user_id: "alice".into(),
        });
        assert!(target(&alice(), &me).is_err());
        assert_eq!(
            target(&alice(), &Req::Sync(v1::Sync {})).expect("valid"),
            Target::Session
        );
    }

    #[test]
    fn send_checks() {
        let l = Limits {
            max_text_bytes: 10,
            ..Limits::default()
        };
        assert!(group_op(send("short", "c1"), &l).is_ok());
        assert!(matches!(
            group_op(send("far too long text", "c1"), &l),
            Err(ChatError::TooLarge(_))
        ));
        assert!(matches!(
            group_op(send("x", ""), &l),
            Err(ChatError::Invalid(_))
        ));
        assert!(matches!(
            group_op(send("", "c"), &l),
            Err(ChatError::Invalid(_))
        ));
        let many = Req::AddMembers(v1::AddMembers {
            group_id: "g".into(),
            user_ids: vec!["u".into(); l.max_users_per_request + 1],
        });
        assert!(matches!(group_op(many, &l), Err(ChatError::TooLarge(_))));
    }
}
