//! End-to-end access control and authentication: only members read or send,
//! only admins add, remove or promote, a removed member stops receiving at
//! once, leaving works (and the last admin leaving promotes someone); a
//! missing, badly signed, expired or garbage token gets HTTP 401 at upgrade,
//! and a good one works in the `Authorization` header and in `?token=`.
//!
//! Each test starts its own `chat-node` process (see `tests::node`).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::check::{self, is_error, system_events, system_kind};
use tests::client::{AuthVia, ClientOptions, upgrade_status};
use tests::v1::{self, ErrorCode, Role, SystemKind};
use tests::{Client, Mode, NodeProcess, auth, unique};
use tests::{PUSH_WAIT, user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_read_and_only_admins_manage() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b, c, d, e) = (
        user("alice"),
        user("bob"),
        user("carol"),
        user("dave"),
        user("eve"),
    );
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect_binary(&node, &b).await?;
    let mut cc = Client::connect(&node, &c).await?;
    let mut cd = Client::connect(&node, &d).await?;
    let mut ce = Client::connect_binary(&node, &e).await?;
    for cl in [&mut cb, &mut cc, &mut cd, &mut ce] {
        cl.sync().await?;
    }
    let gid = ca.create_group("acl", &[&b, &c]).await?;
    ca.send(&gid, "a-1", "members only").await?; // seq 2

    // A non-member can neither send nor read, and gets no pushes.
    is_error(
        ce.send(&gid, "e-1", "let me in").await,
        ErrorCode::Forbidden,
        "non-member send",
    )?;
    is_error(
        ce.history(&gid, None, None, 10).await,
        ErrorCode::Forbidden,
        "non-member history",
    )?;
    is_error(
        ce.mark_read(&gid, 1).await,
        ErrorCode::Forbidden,
        "non-member markRead",
    )?;
    is_error(
        ce.add_members(&gid, &[&e]).await,
        ErrorCode::Forbidden,
        "non-member adds self",
    )?;
    ensure!(
        ce.sync_group(&gid).await?.is_none(),
        "non-member sees the group in sync"
    );
    ce.expect_no_message(&gid, Duration::from_millis(200))
        .await?;

    // A plain member cannot manage the group.
    is_error(
        cb.add_members(&gid, &[&d]).await,
        ErrorCode::Forbidden,
        "member addMembers",
    )?;
    is_error(
        cb.remove_members(&gid, &[&c]).await,
        ErrorCode::Forbidden,
        "member removeMembers",
    )?;
    is_error(
        cb.set_role(&gid, &b, Role::Admin).await,
        ErrorCode::Forbidden,
        "member promotes self",
    )?;
    is_error(
        cb.set_role(&gid, &c, Role::Admin).await,
        ErrorCode::Forbidden,
        "member promotes other",
    )?;
    is_error(
        cb.set_role(&gid, &a, Role::Member).await,
        ErrorCode::Forbidden,
        "member demotes admin",
    )?;
    let log = ca.history_all(&gid).await?;
    check::dense(&log, 1, 2)?; // nothing was written by the refused requests

    // The admin promotes bob, who can then add and remove.
    ca.set_role(&gid, &b, Role::Admin).await?; // seq 3
    let sb = cb.sync_group(&gid).await?.context("bob's sync")?;
    ensure!(sb.role == Role::Admin as i32, "bob after promotion: {sb:?}");
    cb.add_members(&gid, &[&d]).await?; // seq 4
    let got = cd.collect_messages(&gid, 4, PUSH_WAIT).await?;
    ensure!(
        got.last()
            .is_some_and(|m| system_kind(m) == Some(SystemKind::MembersAdded)),
        "dave's push {got:?}"
    );
    cd.send(&gid, "d-1", "thanks").await?; // seq 5
    // Adding an existing member is skipped (no error).
    cb.add_members(&gid, &[&d]).await?; // seq 6? (may or may not log)

    // Carol (on two devices) is removed: she stops receiving at once and
    // loses access.
    let mut cc2 = Client::connect_binary(&node, &c).await?;
    cc2.sync().await?;
    cc.collect_messages(&gid, 5, PUSH_WAIT).await?;
    cb.remove_members(&gid, &[&c]).await?;
    let log = ca.history_all(&gid).await?;
    let removed_seq = log
        .iter()
        .find(|m| system_kind(m) == Some(SystemKind::MembersRemoved))
        .map(|m| m.seq)
        .context("no MEMBERS_REMOVED in the log")?;
    let after = ca.send(&gid, "a-2", "carol is gone").await?;
    ensure!(
        after.seq == removed_seq + 1,
        "seq after removal {}",
        after.seq
    );
    // Carol may see the removal itself, nothing after it, on any device.
    for cl in [&mut cc, &mut cc2] {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
        while let Some(m) = cl
            .next_message(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await?
        {
            ensure!(
                m.group_id != gid || m.seq <= removed_seq,
                "removed member got push seq {} (removed at {removed_seq}): {m:?}",
                m.seq
            );
        }
    }
    // Typing in the group does not reach her either.
    ca.send_request(v1::client_frame::Kind::Typing(v1::Typing {
        group_id: gid.clone(),
    }))
    .await?;
    let typing = cc
        .next_frame_matching(
            Duration::from_millis(500),
            |f| matches!(&f.kind, Some(v1::server_frame::Kind::Typing(t)) if t.group_id == gid),
        )
        .await?;
    ensure!(
        typing.is_none(),
        "removed member got a typing push: {typing:?}"
    );
    is_error(
        cc.send(&gid, "c-1", "still here?").await,
        ErrorCode::Forbidden,
        "removed member send",
    )?;
    is_error(
        cc.history(&gid, None, None, 10).await,
        ErrorCode::Forbidden,
        "removed member history",
    )?;
    ensure!(
        cc.sync_group(&gid).await?.is_none(),
        "removed member still has the group in sync"
    );
    // Carol's other groups still work: she is removed from this group only.
    let other = cc.create_group("carol's own", &[]).await?;
    cc.send(&other, "c-2", "mine").await?;

    // Dave leaves.
    cd.leave_group(&gid).await?;
    is_error(
        cd.send(&gid, "d-2", "bye?").await,
        ErrorCode::Forbidden,
        "send after leaving",
    )?;
    is_error(
        cd.history(&gid, None, None, 10).await,
        ErrorCode::Forbidden,
        "history after leaving",
    )?;
    ensure!(
        cd.sync_group(&gid).await?.is_none(),
        "group still in sync after leaving"
    );

    let log = ca.history_all(&gid).await?;
    let head = log.last().map(|m| m.seq).unwrap_or(0);
    check::dense(&log, 1, head)?;
    let events = system_events(&log);
    let left = events
        .iter()
        .find(|e| e.1 == SystemKind::MemberLeft)
        .context("no MEMBER_LEFT")?;
    ensure!(left.2 == d, "MEMBER_LEFT actor {:?}", left.2);
    let removed = events
        .iter()
        .find(|e| e.1 == SystemKind::MembersRemoved)
        .context("no MEMBERS_REMOVED")?;
    ensure!(
        removed.2 == b && removed.3 == vec![c.clone()],
        "MEMBERS_REMOVED {removed:?}"
    );
    let roles = events
        .iter()
        .filter(|e| e.1 == SystemKind::RoleChanged)
        .count();
    ensure!(roles == 1, "ROLE_CHANGED events: {events:?}");
    let sa = ca.sync_group(&gid).await?.context("alice's sync")?;
    ensure!(
        sa.member_count == 2,
        "members left: alice and bob; got {sa:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_admin_leaving_promotes_the_oldest_member() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    let mut ca = Client::connect(&node, &a).await?;
    let mut cb = Client::connect(&node, &b).await?;
    let gid = ca.create_group("succession", &[&b]).await?;
    ca.add_members(&gid, &[&c]).await?;
    ca.leave_group(&gid).await?;
    let sb = cb.sync_group(&gid).await?.context("bob's sync")?;
    ensure!(
        sb.role == Role::Admin as i32,
        "bob (oldest member) after the last admin left: {sb:?}"
    );
    cb.remove_members(&gid, &[&c]).await?;
    is_error(
        ca.history(&gid, None, None, 10).await,
        ErrorCode::Forbidden,
        "history after leaving",
    )?;
    Ok(())
}

/// Query parameters or headers of one upgrade attempt.
type Params = Vec<(&'static str, String)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_at_upgrade() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let secret = node.config().jwt_secret.clone();
    let u = user("mallory");
    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Params, Params)> = vec![
        ("no token", vec![], vec![]),
        (
            "bad signature (header)",
            vec![],
            vec![(
                "authorization",
                bearer(&auth::badly_signed_token(&secret, &u)),
            )],
        ),
        (
            "bad signature (query)",
            vec![("token", auth::badly_signed_token(&secret, &u))],
            vec![],
        ),
        (
            "expired (header)",
            vec![],
            vec![("authorization", bearer(&auth::expired_token(&secret, &u)))],
        ),
        (
            "expired (query)",
            vec![("token", auth::expired_token(&secret, &u))],
            vec![],
        ),
        (
            "garbage (header)",
            vec![],
            vec![("authorization", bearer("not-a-jwt"))],
        ),
        (
            "garbage (query)",
            vec![("token", "garbage.garbage.garbage".to_string())],
            vec![],
        ),
        (
            "empty bearer",
            vec![],
            vec![("authorization", "Bearer ".to_string())],
        ),
        (
            "not bearer",
            vec![],
            vec![("authorization", format!("Basic {}", node.token(&u)))],
        ),
        (
            "bad user id",
            vec![("token", auth::token(&secret, "bad user!"))],
            vec![],
        ),
        (
            "empty user id",
            vec![("token", auth::token(&secret, ""))],
            vec![],
        ),
        (
            "user id too long",
            vec![("token", auth::token(&secret, &"x".repeat(129)))],
            vec![],
        ),
    ];
    for (what, query, headers) in &cases {
        let q: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let status = upgrade_status(node.addr(), &q, &h)
            .await
            .with_context(|| what.to_string())?;
        ensure!(
            status == 401,
            "{what}: upgrade got HTTP {status}, expected 401"
        );
    }
    // The node still serves good clients.
    let mut ok = Client::connect(&node, &u).await?;
    ok.heartbeat().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_tokens_work_in_header_and_query() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let (a, b) = (user("alice"), user("bob"));
    let status = upgrade_status(node.addr(), &[("token", &node.token(&a))], &[]).await?;
    ensure!(status == 101, "?token= upgrade got HTTP {status}");
    let status = upgrade_status(
        node.addr(),
        &[],
        &[("authorization", &format!("Bearer {}", node.token(&a)))],
    )
    .await?;
    ensure!(status == 101, "Authorization upgrade got HTTP {status}");

    let mut ca = Client::connect_with(
        &node,
        &a,
        ClientOptions {
            auth: AuthVia::Header,
            ..ClientOptions::new(Mode::Json)
        },
    )
    .await?;
    let mut cb = Client::connect_with(
        &node,
        &b,
        ClientOptions {
            auth: AuthVia::Query,
            ..ClientOptions::new(Mode::Binary)
        },
    )
    .await?;
    cb.sync().await?;
    let gid = ca.create_group("auth", &[&b]).await?;
    let s = cb.send(&gid, "b-1", "via query token").await?;
    // The token's `sub` is the sender: bob's message is attributed to bob.
    let got = ca.collect_messages(&gid, s.seq, PUSH_WAIT).await?;
    ensure!(
        got.last().is_some_and(|m| m.sender_id == b),
        "sender of bob's message: {got:?}"
    );
    // A user id with every allowed character class.
    let odd = format!("Odd.User_{}@example-1", unique(""));
    let mut co = Client::connect(&node, &odd).await?;
    let g2 = co.create_group("odd", &[]).await?;
    let s = co.send(&g2, "o-1", "hi").await?;
    let log = co.history_all(&g2).await?;
    ensure!(
        log.iter().any(|m| m.seq == s.seq && m.sender_id == odd),
        "odd user's message: {log:?}"
    );
    let sync = co.sync_group(&g2).await?.context("odd user's sync")?;
    ensure!(
        sync.role == v1::Role::Admin as i32,
        "odd user's role {sync:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_node_token_prints_a_working_token() -> Result<()> {
    let node = NodeProcess::start_default().await?;
    let u = user("cli");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(node.binary())
            .arg("token")
            .arg(&u)
            .arg("--config")
            .arg(node.config_path())
            .arg("--ttl")
            .arg("600")
            .output(),
    )
    .await
    .context("chat-node token timed out")??;
    ensure!(
        out.status.success(),
        "chat-node token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    ensure!(token.split('.').count() == 3, "not a JWT: {token:?}");
    let mut cl = Client::connect_with(
        &node,
        &u,
        ClientOptions {
            token: Some(token),
            ..ClientOptions::new(Mode::Json)
        },
    )
    .await?;
    let gid = cl.create_group("cli", &[]).await?;
    let log = cl.history_all(&gid).await?;
    let created = log
        .first()
        .and_then(|m| m.system.clone())
        .context("no CREATED")?;
    ensure!(
        created.actor_id == u,
        "the CLI token's user is {:?}, expected {u}",
        created.actor_id
    );
    Ok(())
}
