//! Receipt aggregation of a group: counts of members per pointer value, so
//! "read by N" / "delivered to N" for any seq and the all-read seq are
//! answered without scanning members, and the bookkeeping of which receipts
//! changed and who should hear about it (coalesced pushes).
//!
//! Pure logic: the group actor owns one [`Receipts`] and calls it whenever a
//! member's pointers move, a member joins or leaves, or a message is sent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::UserId;

/// How many recent messages' senders are remembered (receipts are pushed
/// for recent messages only).
pub const RECENT: usize = 256;
/// How long a user who asked `readers` keeps receiving the group's receipts.
pub const WATCH: Duration = Duration::from_secs(60);
/// Most seqs described in one receipts push.
pub const MAX_SEQS_PER_PUSH: u64 = 50;

/// How many members have each pointer value.
///
/// Invariant: the sum of `counts` is `members`; no count is zero.
#[derive(Debug, Default, Clone)]
pub struct PointerCounts {
    counts: BTreeMap<u64, u32>,
    members: u32,
}

impl PointerCounts {
    /// A member with pointer `v` joined.
    pub fn add(&mut self, v: u64) {
        *self.counts.entry(v).or_default() += 1;
        self.members += 1;
    }

    /// A member with pointer `v` left.
    pub fn remove(&mut self, v: u64) {
        if let Some(c) = self.counts.get_mut(&v) {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&v);
            }
            self.members -= 1;
        }
    }

    /// A member's pointer moved from `from` to `to`.
    pub fn moved(&mut self, from: u64, to: u64) {
        if from != to {
            self.remove(from);
            self.add(to);
        }
    }

    /// Members whose pointer is at least `seq`. Cost: the number of distinct
    /// pointer values ≥ `seq` (at most the messages after it).
    pub fn at_least(&self, seq: u64) -> u32 {
        self.counts.range(seq..).map(|(_, c)| *c).sum()
    }

    /// The smallest pointer (the seq every member has reached); 0 without members.
    pub fn min(&self) -> u64 {
        self.counts.keys().next().copied().unwrap_or(0)
    }
}

/// The group's receipt state.
#[derive(Debug, Default)]
pub struct Receipts {
    /// Read pointers.
    pub read: PointerCounts,
    /// Delivered pointers.
    pub delivered: PointerCounts,
    /// Senders of the most recent messages, oldest first.
    senders: VecDeque<(u64, UserId)>,
    /// Seqs whose counts changed since the last push: `[lo, hi]`.
    changed: Option<(u64, u64)>,
    /// Users who asked for readers recently, until when.
    watchers: HashMap<UserId, Instant>,
}

impl Receipts {
    /// A member joined with these pointers.
    pub fn join(&mut self, delivered: u64, read: u64) {
        self.delivered.add(delivered);
        self.read.add(read);
    }

    /// A member with these pointers left.
    pub fn leave(&mut self, delivered: u64, read: u64) {
        self.delivered.remove(delivered);
        self.read.remove(read);
    }

    /// A member's pointers moved (never backwards).
    pub fn moved(&mut self, old: (u64, u64), new: (u64, u64)) {
        self.delivered.moved(old.0, new.0);
        self.read.moved(old.1, new.1);
        let lo = old.0.min(old.1) + 1;
        let hi = new.0.max(new.1);
        if hi >= lo {
            self.changed = Some(match self.changed {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
        }
    }

    /// A message was committed.
    pub fn sent(&mut self, seq: u64, sender: &UserId) {
        self.senders.push_back((seq, sender.clone()));
        while self.senders.len() > RECENT {
            self.senders.pop_front();
        }
    }

    /// `user` asked about receipts: they hear about changes for a while.
    pub fn watch(&mut self, user: &UserId, now: Instant) {
        self.watchers.insert(user.clone(), now + WATCH);
        if self.watchers.len() > 1_000 {
            self.watchers.retain(|_, until| *until > now);
        }
    }

    /// Whether a push is due.
    pub fn dirty(&self) -> bool {
        self.changed.is_some()
    }

    /// Takes the changed seqs to describe (the most recent
    /// [`MAX_SEQS_PER_PUSH`] of them, up to `head`) and who should hear:
    /// their senders and the current watchers. `None` when nothing changed.
    pub fn take_changes(&mut self, head: u64, now: Instant) -> Option<(Vec<u64>, Vec<UserId>)> {
        let (lo, hi) = self.changed.take()?;
        let hi = hi.min(head);
        if hi == 0 || lo > hi {
            return None;
        }
        let lo = lo.max(hi.saturating_sub(MAX_SEQS_PER_PUSH - 1)).max(1);
        let seqs: Vec<u64> = (lo..=hi).collect();
        self.watchers.retain(|_, until| *until > now);
        let mut to: Vec<UserId> = self
            .senders
            .iter()
            .filter(|(s, _)| *s >= lo && *s <= hi)
            .map(|(_, u)| u.clone())
            .chain(self.watchers.keys().cloned())
            .collect();
        to.sort();
        to.dedup();
        Some((seqs, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> UserId {
        UserId::parse(s).expect("valid")
    }

    #[test]
    fn counts_match_brute_force() {
        let mut pc = PointerCounts::default();
        let mut ptrs = vec![0u64; 50];
        for _ in &ptrs {
            pc.add(0);
        }
        // Deterministic pseudo-random forward moves.
        let mut x: u64 = 7;
        for _ in 0..2_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (x >> 33) as usize % ptrs.len();
            let to = ptrs[i] + (x >> 50) % 4;
            pc.moved(ptrs[i], to);
            ptrs[i] = to;
        }
        for seq in 0..=ptrs.iter().copied().max().unwrap_or(0) + 1 {
            let brute = ptrs.iter().filter(|p| **p >= seq).count() as u32;
            assert_eq!(pc.at_least(seq), brute, "seq {seq}");
        }
        assert_eq!(pc.min(), ptrs.iter().copied().min().unwrap_or(0));
        assert_eq!(pc.at_least(0), 50);
        pc.remove(ptrs[0]);
        assert_eq!(pc.at_least(0), 49);
    }

    #[test]
    fn changes_are_coalesced_and_addressed_to_senders_and_watchers() {
        let mut r = Receipts::default();
        for _ in 0..3 {
            r.join(0, 0);
        }
        r.sent(1, &u("alice"));
        r.sent(2, &u("bob"));
        r.sent(3, &u("alice"));
        assert!(!r.dirty());
        // Many moves before one push: one description.
        r.moved((0, 0), (2, 1));
        r.moved((0, 0), (3, 3));
        r.moved((2, 1), (3, 2));
        let now = Instant::now();
        r.watch(&u("carol"), now);
        let (seqs, to) = r.take_changes(3, now).expect("changes");
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(to, vec![u("alice"), u("bob"), u("carol")]);
        assert!(r.take_changes(3, now).is_none(), "taken once");
        assert_eq!(r.read.at_least(2), 2);
        assert_eq!(r.read.min(), 0);
        // Watching expires.
        r.moved((0, 0), (1, 1));
        let (_, to) = r.take_changes(3, now + WATCH * 2).expect("changes");
        assert_eq!(to, vec![u("alice")]);
    }

    #[test]
    fn only_recent_seqs_are_described() {
        let mut r = Receipts::default();
        r.join(0, 0);
        r.moved((0, 0), (1_000, 1_000));
        let (seqs, _) = r.take_changes(1_000, Instant::now()).expect("changes");
        assert_eq!(seqs.len() as u64, MAX_SEQS_PER_PUSH);
        assert_eq!(seqs.last(), Some(&1_000));
    }
}
