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
    session_with(state, u, id, 16)
}

fn session_with(state: &mut RelayState, u: &str, id: u64, capacity: usize) -> OutboundQueue {
    let (h, q) = SessionHandle::channel(capacity);
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

// ----- seq order across owners (`Order`) ---------------------------------

fn msg(seq: u64) -> Arc<SharedPush> {
    SharedPush::new(Kind::Message(proto::v1::Message {
        group_id: "g".into(),
        seq,
        ..Default::default()
    }))
}

fn delivery(seqs: std::ops::RangeInclusive<u64>) -> Positioned {
    Positioned::Deliver {
        seqs: (*seqs.start(), *seqs.end()),
        pushes: seqs.map(msg).collect(),
        except: None,
    }
}

/// The message seqs queued on `q`, in queue order.
fn seqs(q: &mut OutboundQueue) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(o) = q.try_recv() {
        let pushes: Vec<Arc<SharedPush>> = match o {
            Outbound::Push(p) => vec![p],
            Outbound::Batch(b) => b.to_vec(),
            Outbound::Reply { .. } => panic!("a reply on a push-only queue"),
        };
        out.extend(pushes.iter().filter_map(|p| message_seq(p)));
    }
    out
}

fn online(state: &mut RelayState, u: &str, id: u64) -> OutboundQueue {
    let q = session(state, u, id);
    state.attach(&user(u), &group("g"), 1);
    q
}

#[test]
fn deliveries_that_cross_come_out_in_seq_order() {
    let mut s = RelayState::default();
    let mut q = online(&mut s, "a", 1);
    let (g, now) = (group("g"), Instant::now());
    assert!(
        !s.offer(&g, delivery(1..=2), now),
        "a first delivery starts the order"
    );
    // The new owner's 4 overtakes the old owner's 3: held, a timer asked for.
    assert!(s.offer(&g, delivery(4..=5), now));
    assert_eq!(seqs(&mut q), [1, 2]);
    // A second hold while the timer is on its way asks for no other.
    assert!(!s.offer(&g, delivery(7..=7), now));
    assert!(!s.offer(&g, delivery(3..=3), now));
    assert_eq!(seqs(&mut q), [3, 4, 5]);
    // 7 still waits for 6.
    assert!(!s.offer(&g, delivery(6..=6), now));
    assert_eq!(seqs(&mut q), [6, 7]);
    // A repeat of delivered seqs is dropped, a partial one trimmed.
    s.offer(&g, delivery(5..=7), now);
    s.offer(&g, delivery(7..=8), now);
    assert_eq!(seqs(&mut q), [8]);
    assert!(!s.release(&g, now), "nothing held");
}

#[test]
fn a_missing_seq_is_given_up_after_the_hold() {
    let mut s = RelayState::default();
    let mut q = online(&mut s, "a", 1);
    let (g, t0) = (group("g"), Instant::now());
    s.offer(&g, delivery(1..=1), t0);
    assert!(s.offer(&g, delivery(3..=3), t0));
    assert!(
        s.release(&g, t0 + HOLD / 2),
        "not held long enough: still waiting"
    );
    assert_eq!(seqs(&mut q), [1]);
    assert!(!s.release(&g, t0 + HOLD));
    assert_eq!(
        seqs(&mut q),
        [3],
        "delivered with a gap (the client pulls history)"
    );
    // The lost delivery turning up late would be a reorder: dropped.
    s.offer(&g, delivery(2..=2), t0 + HOLD);
    assert_eq!(seqs(&mut q), Vec::<u64>::new());
}

#[test]
fn the_hold_counts_from_the_oldest_arrival() {
    let mut s = RelayState::default();
    let mut q = online(&mut s, "a", 1);
    let (g, t0) = (group("g"), Instant::now());
    s.offer(&g, delivery(1..=1), t0);
    // 4 waits from t0; 3 (also ahead of the missing 2) comes later but
    // sorts first.
    s.offer(&g, delivery(4..=4), t0);
    s.offer(&g, delivery(3..=3), t0 + HOLD / 2);
    assert!(!s.release(&g, t0 + HOLD), "4 has waited the hold: both go");
    assert_eq!(seqs(&mut q), [1, 3, 4]);
}

#[test]
fn joins_and_leaves_wait_for_their_seq() {
    let mut s = RelayState::default();
    let mut qa = online(&mut s, "a", 1);
    let mut qb = session(&mut s, "b", 2);
    let (g, now) = (group("g"), Instant::now());
    s.offer(&g, delivery(1..=1), now);
    // b joins at 3 (the new owner's join and its system message overtake
    // the old owner's 2): b must get 3 and not 2.
    s.offer(&g, Positioned::Added(vec![(user("b"), 3)]), now);
    s.offer(&g, delivery(3..=3), now);
    // a leaves at 4, then 5 is sent: a must get 4 and not 5.
    s.offer(&g, Positioned::Removed(vec![user("a")], 4), now);
    s.offer(&g, delivery(5..=5), now);
    assert_eq!(seqs(&mut qa), [1]);
    s.offer(&g, delivery(2..=2), now);
    assert_eq!(seqs(&mut qa), [2, 3]);
    assert_eq!(seqs(&mut qb), [3]);
    s.offer(&g, delivery(4..=4), now);
    assert_eq!(seqs(&mut qa), [4]);
    assert_eq!(seqs(&mut qb), [4, 5]);
}

#[test]
fn past_the_bound_the_oldest_held_item_goes_out() {
    let mut s = RelayState::default();
    let mut q = session_with(&mut s, "a", 1, 2 * MAX_HELD);
    s.attach(&user("a"), &group("g"), 1);
    let (g, now) = (group("g"), Instant::now());
    s.offer(&g, delivery(1..=1), now);
    let last = 2 + MAX_HELD as u64;
    // 3..=last wait for 2; one more than the bound lets them all go.
    for seq in 3..=last {
        s.offer(&g, delivery(seq..=seq), now);
    }
    assert_eq!(seqs(&mut q), [1]);
    s.offer(&g, delivery(last + 1..=last + 1), now);
    assert_eq!(seqs(&mut q), (3..=last + 1).collect::<Vec<_>>());
}

#[test]
fn orders_of_groups_without_local_members_are_pruned() {
    let mut s = RelayState::default();
    let _q = online(&mut s, "a", 1);
    let (g, now) = (group("g"), Instant::now());
    s.offer(&g, delivery(1..=1), now);
    s.prune_orders();
    assert!(s.orders.contains_key(&g), "a member is online");
    s.unregister(&user("a"), SessionId(1));
    s.prune_orders();
    assert!(s.orders.is_empty());
}

/// Stands in for a session actor: the relay only ticks it.
struct Inert;

impl Actor for Inert {
    type Msg = SessionMessage;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<SessionMessage>,
        _: (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// The relay actor's own timer gives up on a missing seq: nothing else
/// has to arrive for held pushes to go out.
#[tokio::test]
async fn the_relay_actor_releases_held_pushes_by_itself() {
    let args = RelayArgs {
        tick: Duration::from_secs(3600),
        meters: Default::default(),
    };
    let (relay, relay_task) = Actor::spawn(None, Relay, args).await.expect("relay");
    let (session_actor, session_task) = Actor::spawn(None, Inert, ()).await.expect("session");
    let (handle, mut q) = SessionHandle::channel(16);
    let cast = |m: RelayMessage| relay.cast(m).expect("relay alive");
    cast(RelayMessage::Register {
        user: user("a"),
        session: SessionId(1),
        handle,
        actor: session_actor.clone(),
    });
    cast(RelayMessage::Attach {
        user: user("a"),
        groups: vec![(group("g"), 1)],
    });
    let deliver = |seq: u64| RelayMessage::Deliver {
        group: group("g"),
        pushes: vec![msg(seq)],
        except: None,
    };
    cast(deliver(1));
    cast(deliver(3));
    // A call answers after every cast before it was handled.
    let stats = |relay: &ActorRef<RelayMessage>| {
        let relay = relay.clone();
        async move { ractor::call_t!(relay, RelayMessage::Stats, 1000).expect("stats") }
    };
    assert_eq!(stats(&relay).await.groups, 1);
    assert_eq!(seqs(&mut q), [1], "3 waits for 2");
    // Bounded: the release is due HOLD after the hold began.
    let deadline = Instant::now() + 5 * HOLD;
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(HOLD / 4).await;
        stats(&relay).await;
        got = seqs(&mut q);
    }
    assert_eq!(got, [3]);
    relay.stop(None);
    session_actor.stop(None);
    let _ = relay_task.await;
    let _ = session_task.await;
}
