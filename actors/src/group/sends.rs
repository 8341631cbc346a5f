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
//! clients choose the keys. Of its three sets, only `unindexed` must be
//! exact: a committed send without a stored record is known nowhere else,
//! so this module must never lose one. The waiting set may hold extra
//! entries (the group confirms a hit by scanning its waiters), and the
//! recent cache may forget entries (whatever it forgets is in storage or in
//! `unindexed`).

use std::collections::VecDeque;
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
/// - `unindexed` holds each committed send whose dedupe record may be
///   missing from storage, once (see `GroupState`'s invariants).
/// - `recent` holds at most one entry per key, and `recent_order` the hash
///   of each of its entries, oldest first; neither outgrows `cap`.
#[derive(Debug)]
pub struct Sends {
    /// How many recent sends are remembered (`tuning.dedupe_cache`).
    cap: usize,
    hasher: RandomState,
    waiting: HashTable<u64>,
    recent: HashTable<Known>,
    recent_order: VecDeque<u64>,
    unindexed: HashTable<Known>,
}

impl Sends {
    /// An empty index that remembers up to `cap` recent sends.
    pub fn new(cap: usize) -> Self {
        Sends {
            cap,
            hasher: RandomState::new(),
            waiting: HashTable::new(),
            recent: HashTable::new(),
            recent_order: VecDeque::new(),
            unindexed: HashTable::new(),
        }
    }

    /// The hash of a send's key, for the other calls.
    pub fn hash(&self, user: &UserId, cmid: &str) -> SendHash {
        SendHash(self.hasher.hash_one((user, cmid)))
    }

    /// The outcome of a committed send, if it is remembered: it is always
    /// remembered while its record may be missing from storage.
    pub fn committed(&self, hash: SendHash, user: &UserId, cmid: &str) -> Option<&DedupeRecord> {
        let found = |k: &Known| k.hash == hash.0 && k.is(user, cmid);
        self.recent
            .find(hash.0, found)
            .or_else(|| self.unindexed.find(hash.0, found))
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

    /// A send was committed: it is remembered as a recent send (the oldest
    /// beyond `cap` are forgotten) and, when its record is not written yet
    /// (`deferred`), as unindexed.
    pub fn committed_send(&mut self, send: &SendRecord, deferred: bool) {
        let hash = self.hash(&send.0, &send.1);
        self.remember_hashed(hash, send);
        if deferred {
            Self::put(&mut self.unindexed, hash, send);
        }
    }

    /// Remembers a committed send as a recent one, forgetting the oldest
    /// beyond `cap`.
    pub fn remember(&mut self, send: &SendRecord) {
        let hash = self.hash(&send.0, &send.1);
        self.remember_hashed(hash, send);
    }

    fn remember_hashed(&mut self, hash: SendHash, send: &SendRecord) {
        if Self::put(&mut self.recent, hash, send) {
            self.recent_order.push_back(hash.0);
        }
        while self.recent_order.len() > self.cap {
            let Some(old) = self.recent_order.pop_front() else {
                break;
            };
            // Two keys with one hash: either entry may go, the cache only
            // gets smaller; the other goes with the other copy of the hash.
            if let Ok(entry) = self.recent.find_entry(old, |k| k.hash == old) {
                entry.remove();
            }
        }
    }

    /// Records a committed send whose record is not written yet (loading
    /// reads them from the log's tail).
    pub fn defer(&mut self, send: &SendRecord) {
        let hash = self.hash(&send.0, &send.1);
        Self::put(&mut self.unindexed, hash, send);
    }

    /// Inserts or updates `send` in `table`; true if it was new.
    fn put(table: &mut HashTable<Known>, hash: SendHash, send: &SendRecord) -> bool {
        let (user, cmid, rec) = send;
        let found = |k: &Known| k.hash == hash.0 && k.is(user, cmid);
        match table.entry(hash.0, found, |k| k.hash) {
            Entry::Occupied(mut k) => {
                k.get_mut().rec = rec.clone();
                false
            }
            Entry::Vacant(v) => {
                v.insert(Known::new(hash, send));
                true
            }
        }
    }

    /// The records of `sends` are written: they are no longer unindexed.
    pub fn indexed(&mut self, sends: &[SendRecord]) {
        if sends.len() == self.unindexed.len() {
            // All of them: `unindexed` holds each key once, and every one
            // of `sends` came from it.
            self.unindexed.clear();
            return;
        }
        for (user, cmid, _) in sends {
            let hash = self.hash(user, cmid);
            if let Ok(entry) = self
                .unindexed
                .find_entry(hash.0, |k| k.hash == hash.0 && k.is(user, cmid))
            {
                entry.remove();
            }
        }
    }

    /// How many committed sends may lack their record.
    pub fn unindexed_len(&self) -> usize {
        self.unindexed.len()
    }

    /// The committed sends that may lack their record, for a batch to write.
    pub fn unindexed(&self) -> Vec<SendRecord> {
        self.unindexed
            .iter()
            .map(|k| (k.user.clone(), k.cmid.clone(), k.rec.clone()))
            .collect()
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
        assert_eq!(s.recent.len(), 1);
        assert_eq!(s.recent_order.len(), 1);
    }

    #[test]
    fn the_recent_cache_forgets_the_oldest_but_unindexed_sends_stay() {
        let mut s = Sends::new(3);
        let sends: Vec<_> = (1..=5).map(|i| send("u", &format!("c{i}"), i)).collect();
        s.committed_send(&sends[0], true);
        for x in &sends[1..] {
            s.committed_send(x, false);
        }
        assert_eq!(s.recent.len(), 3);
        // c1 left the cache but was never indexed: still known.
        assert_eq!(lookup(&s, &sends[0]), Some(1));
        // c2 left the cache and has its record: forgotten.
        assert_eq!(lookup(&s, &sends[1]), None);
        assert_eq!(lookup(&s, &sends[4]), Some(5));
        s.indexed(&s.unindexed());
        assert_eq!(s.unindexed_len(), 0);
        assert_eq!(lookup(&s, &sends[0]), None);
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
        s.indexed(&written);
        assert_eq!(s.unindexed_len(), 1);
        assert_eq!(lookup(&s, &sends[3]), Some(4));
        assert_eq!(lookup(&s, &sends[0]), None);
        // Loading defers what the log's tail holds past the watermark.
        s.defer(&sends[0]);
        assert_eq!(lookup(&s, &sends[0]), Some(1));
        s.indexed(&s.unindexed());
        assert_eq!(s.unindexed_len(), 0);
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
