//! A group's memory of its sends by `(user, clientMsgId)`: the ones still
//! waiting for a commit, the ones committed recently, and the ones committed
//! before their dedupe record was written.
//!
//! Owned by one [`super::GroupState`]. On every send the group asks it
//! whether the send is a retry, and after every commit it tells it what
//! was committed and indexed. It hashes a key once for each question and
//! allocates nothing to look one up. Before this module, the four maps keyed
//! by `(UserId, String)` cost about 15% of the tokio workers' CPU in
//! 1,000-group durable appends (docs/benchmarks.md, round 13).
//!
//! Its tables use SipHash under a random key (std's `RandomState`), because
//! clients choose the keys. The committed sends it knows are in one table,
//! `known`: the recent ones and every one whose record may be missing
//! (`unindexed`, also kept as a list in commit order, for the batch that
//! writes them). A send is looked up with one probe, and remembered with
//! one insert. Until round 26 the two were separate tables, probed one
//! after the other for every send and both written for most commits: the
//! module was then ~11% of the tokio workers' samples over 1,000 groups
//! (docs/benchmarks.md, round 26).
//!
//! Only what it knows of unindexed sends must be exact: a committed send
//! without a stored record is known nowhere else, so this module must
//! never lose one. It forgets a known send only when its seq is at or
//! below the dedupe watermark, below which every committed send
//! has its record in storage (`GroupState`'s invariants). The waiting set
//! may hold extra entries (the group confirms a hit by scanning its
//! waiters).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use storage::model::DedupeRecord;

use super::plan::SendRecord;
use crate::ids::UserId;

/// The hash of one send's key, from [`Sends::hash`]; good for this
/// [`Sends`] only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendHash(u64);

/// A committed send and its outcome, with its key's hash (tables rehash
/// from it without hashing the key again).
#[derive(Debug)]
struct Known {
    hash: u64,
    user: UserId,
    cmid: Arc<str>,
    rec: DedupeRecord,
}

impl Known {
    fn new(hash: SendHash, (user, cmid, rec): &SendRecord) -> Self {
        Known {
            hash: hash.0,
            user: user.clone(),
            cmid: cmid.clone(),
            rec: rec.clone(),
        }
    }

    fn is(&self, user: &UserId, cmid: &str) -> bool {
        *self.cmid == *cmid && self.user == *user
    }
}

/// Invariants:
/// - Every send waiting for a commit has its hash in `waiting`. The set may
///   hold others too: answered sends leave it only when it is rebuilt.
/// - `known` holds at most one entry per key, and `order` a `(hash, seq)`
///   for each entry's current outcome, in the order they were remembered
///   (and stale ones, for outcomes since replaced, which match no entry).
/// - `unindexed` holds each committed send whose dedupe record may be
///   missing from storage, once, in commit order; each is in `known`.
/// - An entry leaves `known` only through the front of `order`, once
///   `order` holds more than `cap` and the entry's seq is ≤ `watermark`. So
///   `known` outgrows `cap` by at most the sends past the watermark, which
///   the group keeps within about `DEDUPE_LAG` plus the batches in flight.
#[derive(Debug)]
pub struct Sends {
    /// How many recent sends are remembered (`tuning.dedupe_cache`).
    cap: usize,
    hasher: RandomState,
    waiting: HashTable<u64>,
    known: HashTable<Known>,
    order: VecDeque<(u64, u64)>,
    unindexed: Vec<SendRecord>,
    /// The group's stored dedupe watermark: every committed send at or
    /// below it has its record in storage.
    watermark: u64,
}

impl Sends {
    /// An empty index that remembers up to `cap` recent sends.
    pub fn new(cap: usize) -> Self {
        Sends {
            cap,
            hasher: RandomState::new(),
            waiting: HashTable::new(),
            known: HashTable::new(),
            order: VecDeque::new(),
            unindexed: Vec::new(),
            watermark: 0,
        }
    }

    /// The hash of a send's key, for the other calls.
    pub fn hash(&self, user: &UserId, cmid: &str) -> SendHash {
        SendHash(self.hasher.hash_one((user, cmid)))
    }

    /// The outcome of a committed send, if it is remembered: it is always
    /// remembered while its record may be missing from storage.
    pub fn committed(&self, hash: SendHash, user: &UserId, cmid: &str) -> Option<&DedupeRecord> {
        self.known
            .find(hash.0, |k| k.hash == hash.0 && k.is(user, cmid))
            .map(|k| &k.rec)
    }

    /// False when no send with this hash is waiting. True does not prove
    /// that one is.
    pub fn may_wait(&self, hash: SendHash) -> bool {
        self.waiting.find(hash.0, |&h| h == hash.0).is_some()
    }

    /// Records a waiting send.
    pub fn wait(&mut self, hash: SendHash) {
        if let Entry::Vacant(v) = self.waiting.entry(hash.0, |&h| h == hash.0, |&h| h) {
            v.insert(hash.0);
        }
    }

    /// How many hashes the waiting set holds.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Rebuilds the waiting set from the sends that are actually waiting.
    pub fn reset_waiting<'a>(&mut self, live: impl IntoIterator<Item = (&'a UserId, &'a str)>) {
        self.waiting.clear();
        for (user, cmid) in live {
            let hash = self.hash(user, cmid);
            self.wait(hash);
        }
    }

    /// The group's stored dedupe watermark, read when it was loaded.
    pub fn set_watermark(&mut self, watermark: u64) {
        self.watermark = watermark;
    }

    /// The group's stored dedupe watermark.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// A send was committed: it is remembered (the oldest beyond `cap`
    /// whose records are stored are forgotten) and, when its record is not
    /// written yet (`deferred`), listed as unindexed.
    pub fn committed_send(&mut self, send: &SendRecord, deferred: bool) {
        let hash = self.hash(&send.0, &send.1);
        self.put(hash, send);
        if deferred {
            self.unindexed.push(send.clone());
        }
    }

    /// Remembers a send whose record is in storage (a retry of a send
    /// committed before this actor loaded the group).
    pub fn remember(&mut self, send: &SendRecord) {
        self.committed_send(send, false);
    }

    /// Records a committed send whose record is not written yet (loading
    /// reads them from the log's tail, past the watermark).
    pub fn defer(&mut self, send: &SendRecord) {
        self.committed_send(send, true);
    }

    /// Inserts `send` into `known`, or updates its outcome, then forgets
    /// what it may beyond `cap`.
    fn put(&mut self, hash: SendHash, send: &SendRecord) {
        let (user, cmid, rec) = send;
        let found = |k: &Known| k.hash == hash.0 && k.is(user, cmid);
        match self.known.entry(hash.0, found, |k| k.hash) {
            Entry::Occupied(mut k) => {
                if k.get().rec == *rec {
                    return;
                }
                k.get_mut().rec = rec.clone();
            }
            Entry::Vacant(v) => {
                v.insert(Known::new(hash, send));
            }
        }
        self.order.push_back((hash.0, rec.seq));
        self.forget_oldest();
    }

    /// Forgets the oldest entries beyond `cap`, as long as their records
    /// are stored (seq at or below the watermark); the rest wait for the
    /// watermark to pass them.
    fn forget_oldest(&mut self) {
        while self.order.len() > self.cap {
            let Some(&(hash, seq)) = self.order.front() else {
                break;
            };
            if seq > self.watermark {
                break;
            }
            self.order.pop_front();
            // (hash, seq) names one outcome of one send: a stale pair (the
            // send's outcome changed since) matches nothing.
            if let Ok(entry) = self
                .known
                .find_entry(hash, |k| k.hash == hash && k.rec.seq == seq)
            {
                entry.remove();
            }
        }
    }

    /// The records of `sends` are written and the watermark is now `upto`:
    /// they are no longer unindexed, and what the watermark passed may be
    /// forgotten.
    pub fn indexed(&mut self, sends: &[SendRecord], upto: u64) {
        let n = sends.len();
        let same = |a: &SendRecord, b: &SendRecord| a.0 == b.0 && a.1 == b.1;
        if n <= self.unindexed.len() && self.unindexed.iter().zip(sends).all(|(a, b)| same(a, b)) {
            // The batch that wrote them listed every unindexed send when it
            // was planned: the oldest ones now.
            self.unindexed.drain(..n);
        } else {
            let written: HashSet<(&UserId, &str)> =
                sends.iter().map(|(u, c, _)| (u, &**c)).collect();
            self.unindexed
                .retain(|(u, c, _)| !written.contains(&(u, &**c)));
        }
        self.watermark = upto;
        self.forget_oldest();
    }

    /// How many committed sends may lack their record.
    pub fn unindexed_len(&self) -> usize {
        self.unindexed.len()
    }

    /// The committed sends that may lack their record, for a batch to write.
    pub fn unindexed(&self) -> Vec<SendRecord> {
        self.unindexed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(user: &str, cmid: &str, seq: u64) -> SendRecord {
        let user = UserId::parse(user).expect("valid id");
        let rec = DedupeRecord {
            seq,
            sent_at_ms: 1_000 + seq,
        };
        (user, Arc::from(cmid), rec)
    }

    fn lookup(s: &Sends, (user, cmid, _): &SendRecord) -> Option<u64> {
        s.committed(s.hash(user, cmid), user, cmid).map(|r| r.seq)
    }

    #[test]
    fn committed_sends_are_found_by_user_and_id() {
        let mut s = Sends::new(10);
        let a = send("alice", "m1", 1);
        s.committed_send(&a, false);
        assert_eq!(lookup(&s, &a), Some(1));
        // The same id from someone else is another send.
        assert_eq!(lookup(&s, &send("bob", "m1", 0)), None);
        assert_eq!(lookup(&s, &send("alice", "m2", 0)), None);
        // A second commit of the key updates its outcome, not a copy.
        s.committed_send(&send("alice", "m1", 7), false);
        assert_eq!(lookup(&s, &a), Some(7));
        assert_eq!(s.known.len(), 1);
        // The same outcome again adds nothing to forget.
        s.committed_send(&send("alice", "m1", 7), false);
        assert_eq!(s.order.len(), 2);
    }

    #[test]
    fn the_oldest_are_forgotten_once_the_watermark_passes_them() {
        let mut s = Sends::new(3);
        let sends: Vec<_> = (1..=5).map(|i| send("u", &format!("c{i}"), i)).collect();
        s.committed_send(&sends[0], true);
        for x in &sends[1..] {
            // Recorded by their own batches, but past the watermark (0).
            s.committed_send(x, false);
        }
        // Nothing is forgotten above the watermark.
        assert_eq!(s.known.len(), 5);
        assert_eq!(lookup(&s, &sends[0]), Some(1));
        assert_eq!(s.unindexed_len(), 1);
        s.indexed(&s.unindexed(), 5);
        assert_eq!(s.unindexed_len(), 0);
        // Now the two oldest go, down to the cap.
        assert_eq!(s.known.len(), 3);
        assert_eq!(lookup(&s, &sends[0]), None);
        assert_eq!(lookup(&s, &sends[1]), None);
        assert_eq!(lookup(&s, &sends[2]), Some(3));
        assert_eq!(lookup(&s, &sends[4]), Some(5));
    }

    #[test]
    fn an_unindexed_send_stays_however_many_follow() {
        let mut s = Sends::new(2);
        s.set_watermark(10);
        let old: Vec<_> = (1..=3).map(|i| send("u", &format!("o{i}"), i)).collect();
        for x in &old {
            s.committed_send(x, false);
        }
        let late = send("u", "late", 11);
        s.committed_send(&late, true);
        for i in 12..=40 {
            s.committed_send(&send("v", &format!("n{i}"), i), false);
        }
        // The old ones went; the unindexed one and everything after it
        // waits for the watermark.
        assert_eq!(lookup(&s, &old[0]), None);
        assert_eq!(lookup(&s, &late), Some(11));
        assert_eq!(s.known.len(), 30);
        s.indexed(&s.unindexed(), 40);
        assert_eq!(s.known.len(), 2);
        assert_eq!(lookup(&s, &late), None);
    }

    #[test]
    fn a_replaced_outcome_is_not_forgotten_by_its_old_place_in_line() {
        let mut s = Sends::new(1);
        s.set_watermark(1);
        let first = send("u", "a", 1);
        s.committed_send(&first, false);
        // The same key committed again past the watermark, unindexed.
        let again = send("u", "a", 3);
        s.committed_send(&again, true);
        s.committed_send(&send("u", "b", 4), false);
        // (a, 1) left the line, but matched no entry: a is still known.
        assert_eq!(lookup(&s, &again), Some(3));
    }

    #[test]
    fn indexing_removes_exactly_the_written_records() {
        let mut s = Sends::new(0);
        let sends: Vec<_> = (1..=4).map(|i| send("u", &format!("c{i}"), i)).collect();
        for x in &sends[..3] {
            s.committed_send(x, true);
        }
        let written = s.unindexed();
        assert_eq!(written.len(), 3);
        // A send committed after the batch that writes them was planned.
        s.committed_send(&sends[3], true);
        s.indexed(&written, 3);
        assert_eq!(s.unindexed_len(), 1);
        assert_eq!(lookup(&s, &sends[3]), Some(4));
        assert_eq!(lookup(&s, &sends[0]), None);
        // Written out of order (not the oldest): exactly those go.
        let (a, b) = (send("u", "d5", 5), send("u", "d6", 6));
        s.committed_send(&a, true);
        s.committed_send(&b, true);
        s.indexed(std::slice::from_ref(&a), 3);
        let left: Vec<_> = s.unindexed().into_iter().map(|x| x.2.seq).collect();
        assert_eq!(left, vec![4, 6]);
        // Loading defers what the log's tail holds past the watermark.
        let tail = send("u", "t7", 7);
        s.defer(&tail);
        assert_eq!(lookup(&s, &tail), Some(7));
        s.indexed(&s.unindexed(), 7);
        assert_eq!(s.unindexed_len(), 0);
        assert_eq!(s.known.len(), 0);
    }

    #[test]
    fn the_waiting_set_is_a_superset_until_rebuilt() {
        let mut s = Sends::new(10);
        let (a, b) = (send("u", "a", 0), send("u", "b", 0));
        let (ha, hb) = (s.hash(&a.0, &a.1), s.hash(&b.0, &b.1));
        assert!(!s.may_wait(ha));
        s.wait(ha);
        s.wait(ha);
        s.wait(hb);
        assert!(s.may_wait(ha) && s.may_wait(hb));
        assert_eq!(s.waiting_len(), 2);
        s.reset_waiting([(&b.0, &*b.1)]);
        assert!(!s.may_wait(ha));
        assert!(s.may_wait(hb));
        assert_eq!(s.waiting_len(), 1);
    }

    #[test]
    fn a_hash_is_of_the_whole_key() {
        let s = Sends::new(10);
        let u = UserId::parse("ab").expect("valid id");
        let v = UserId::parse("a").expect("valid id");
        // "ab" + "c" and "a" + "bc" are different keys.
        assert_ne!(s.hash(&u, "c"), s.hash(&v, "bc"));
    }
}
