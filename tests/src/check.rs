//! Assertions shared by the end-to-end tests: dense sequence numbers, system
//! messages, error codes. They return `anyhow` errors with enough context to
//! debug a failure from the test output alone.

use anyhow::{Result, bail};

use crate::client::error_code;
use crate::v1;

/// The seqs of `msgs`, in order.
pub fn seqs(msgs: &[v1::Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

/// Fails unless the seqs of `msgs` are exactly `first..=last`, in order.
pub fn dense(msgs: &[v1::Message], first: u64, last: u64) -> Result<()> {
    let got = seqs(msgs);
    let want: Vec<u64> = (first..=last).collect();
    if got != want {
        bail!(
            "expected seqs {first}..={last} in order ({} of them), got {} seqs: {}",
            want.len(),
            got.len(),
            summarize(&got)
        );
    }
    Ok(())
}

/// Fails unless the seqs of `msgs` strictly increase by exactly one.
pub fn no_gaps(msgs: &[v1::Message]) -> Result<()> {
    for w in msgs.windows(2) {
        if w[1].seq != w[0].seq + 1 {
            bail!(
                "gap or reorder: seq {} followed by {} (all: {})",
                w[0].seq,
                w[1].seq,
                summarize(&seqs(msgs))
            );
        }
    }
    Ok(())
}

/// A short rendering of a long seq list (first and last few, and the breaks).
pub fn summarize(seqs: &[u64]) -> String {
    if seqs.len() <= 24 {
        return format!("{seqs:?}");
    }
    let breaks: Vec<String> = seqs
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .take(10)
        .map(|w| format!("{}->{}", w[0], w[1]))
        .collect();
    format!(
        "{:?} .. {:?} (breaks: {breaks:?})",
        &seqs[..8],
        &seqs[seqs.len() - 8..]
    )
}

/// The system kind of `m`, if it is a system message.
pub fn system_kind(m: &v1::Message) -> Option<v1::SystemKind> {
    m.system
        .as_ref()
        .map(|s| v1::SystemKind::try_from(s.kind).unwrap_or(v1::SystemKind::Unspecified))
        .filter(|k| *k != v1::SystemKind::Unspecified)
}

/// The system messages of `msgs` as (seq, kind, actor, userIds).
pub fn system_events(msgs: &[v1::Message]) -> Vec<(u64, v1::SystemKind, String, Vec<String>)> {
    msgs.iter()
        .filter_map(|m| {
            let kind = system_kind(m)?;
            let s = m.system.as_ref()?;
            Some((m.seq, kind, s.actor_id.clone(), s.user_ids.clone()))
        })
        .collect()
}

/// Fails unless `res` is a server error with `code`.
pub fn is_error<T: std::fmt::Debug>(res: Result<T>, code: v1::ErrorCode, what: &str) -> Result<()> {
    match res {
        Ok(v) => bail!("{what}: expected {code:?}, got success {v:?}"),
        Err(e) => match error_code(&e) {
            Some(c) if c == code => Ok(()),
            Some(c) => bail!("{what}: expected {code:?}, got {c:?} ({e:#})"),
            None => bail!("{what}: expected {code:?}, got a transport failure: {e:#}"),
        },
    }
}

/// Fields a `message` push and its history entry must agree on.
pub fn same_message(a: &v1::Message, b: &v1::Message) -> Result<()> {
    anyhow::ensure!(
        a.group_id == b.group_id
            && a.seq == b.seq
            && a.sender_id == b.sender_id
            && a.text == b.text
            && a.sent_at_ms == b.sent_at_ms
            && a.client_msg_id == b.client_msg_id
            && a.reply_to_seq == b.reply_to_seq
            && a.mentions == b.mentions
            && a.attachments == b.attachments
            && a.system == b.system,
        "push and history differ:\n push    {a:?}\n history {b:?}"
    );
    Ok(())
}
