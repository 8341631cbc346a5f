use super::*;
use crate::outbound::OutboundQueue;
use proto::v1::server_frame::Kind;

fn user(s: &str) -> UserId {
    UserId::parse(s).expect("valid id")
}
fn group(s: &str) -> GroupId {
    GroupId::parse(s).expect("valid id")
}

fn session(state: &mut RelayState, u: &str, id: u64) -> OutboundQueue {
    let (h, q) = SessionHandle::channel(16);
    state.sessions.insert(SessionId(id), (h.clone(), None));
    state
        .users
        .entry(user(u))
        .or_default()
        .sessions
        .push((SessionId(id), h));
    q
}

fn pushes(q: &mut OutboundQueue) -> usize {
    let mut n = 0;
    while let Some(o) = q.try_recv() {
        assert!(matches!(o, Outbound::Push(_)));
        n += 1;
    }
    n
}

fn deliver(state: &RelayState, g: &str) {
    let p = SharedPush::new(Kind::Ok(proto::v1::Ok {}));
    for u in state.groups.get(&group(g)).into_iter().flatten() {
        state.push_to_user(u, &p);
    }
}

#[test]
fn stale_group_list_cannot_undo_a_removal() {
    let mut s = RelayState::default();
    let mut q = session(&mut s, "a", 1);
    // Removed at seq 10 while the session's list (joined at 3) was in flight.
    s.detach(&user("a"), &group("g"), 10);
    s.attach(&user("a"), &group("g"), 3);
    deliver(&s, "g");
    assert_eq!(pushes(&mut q), 0);
    // Re-added later (joined at 12): attached again.
    s.attach(&user("a"), &group("g"), 12);
    deliver(&s, "g");
    assert_eq!(pushes(&mut q), 1);
}

#[test]
fn every_device_receives_and_last_close_cleans_up() {
    let mut s = RelayState::default();
    let mut q1 = session(&mut s, "a", 1);
    let mut q2 = session(&mut s, "a", 2);
    s.attach(&user("a"), &group("g"), 1);
    deliver(&s, "g");
    assert_eq!((pushes(&mut q1), pushes(&mut q2)), (1, 1));
    s.unregister(&user("a"), SessionId(1));
    deliver(&s, "g");
    assert_eq!((pushes(&mut q1), pushes(&mut q2)), (0, 1));
    s.unregister(&user("a"), SessionId(2));
    assert!(s.users.is_empty());
    assert!(s.groups.is_empty(), "no empty group entries are kept");
}

#[test]
fn attach_ignores_users_without_sessions() {
    let mut s = RelayState::default();
    s.attach(&user("ghost"), &group("g"), 1);
    assert!(s.groups.is_empty());
}
