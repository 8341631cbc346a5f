//! What a writer connection remembers of its reads between transactions:
//! short values it read and the last keys of ranges it asked for, kept in
//! step with its own writes and dropped whole when anyone else may have
//! written.
//!
//! Owned by one connection of the embedded engine ([`crate::sqlite`]),
//! which asks it before each `get` and `last_key` of a read-write
//! transaction, tells it the result of each miss and each write the
//! transaction makes, and gives it the file's change counter at each
//! `BEGIN` (`PRAGMA data_version`, which moves when another connection, in
//! this process or another, commits). Why: a commit-stage transaction over
//! 1,000 groups reads each group's fence and head, the same two keys it
//! wrote or read one transaction before, and those two B-tree descents
//! were 22% of the writer's CPU (docs/benchmarks.md, round 25).
//!
//! What it must not do: answer for a state other than the transaction's.
//! So it forgets everything when the counter moved since the last
//! transaction, and when a transaction ends without committing or one of
//! its writes fails (see [`ReadCache::forget`]); and it remembers only
//! what it read or what was written over something it read, never a guess.
//! It bounds itself: past [`ReadCache::new`]'s capacity, a table starts
//! over empty.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

/// Values longer than this are not remembered (the fences and counters
/// worth remembering are 8 bytes; records up to a few dozen).
pub const MAX_VALUE_BYTES: usize = 64;

/// The last key of one range, as last read or written.
#[derive(Debug)]
struct Last {
    /// The range's end (exclusive); its start is the map key.
    end: Vec<u8>,
    /// The greatest key in the range, `None` for an empty range.
    key: Option<Vec<u8>>,
}

/// Invariants (between calls):
/// - every entry of `values` and `lasts` is what the connection's current
///   transaction (or, between transactions, the last one it committed)
///   reads at that key or range;
/// - the ranges of `lasts` do not overlap and none is empty, so the one
///   range that may hold a key is the one with the greatest start at or
///   before it;
/// - `version` is the counter read at the start of the transaction these
///   entries belong to, `None` when the tables were just forgotten;
/// - neither table holds more than `cap` entries.
#[derive(Debug)]
pub struct ReadCache {
    cap: usize,
    version: Option<i64>,
    values: HashMap<Vec<u8>, Vec<u8>>,
    lasts: BTreeMap<Vec<u8>, Last>,
}

impl ReadCache {
    /// An empty cache of at most `cap` values and `cap` ranges.
    pub fn new(cap: usize) -> Self {
        ReadCache {
            cap: cap.max(1),
            version: None,
            values: HashMap::new(),
            lasts: BTreeMap::new(),
        }
    }

    /// A transaction began and the file's change counter reads `version`:
    /// what is remembered stays only if nobody else committed since the
    /// last transaction (the counter did not move).
    pub fn begin(&mut self, version: i64) {
        if self.version != Some(version) {
            self.clear();
            self.version = Some(version);
        }
    }

    /// Forgets everything: a transaction was rolled back, or a write
    /// failed and what the transaction holds is no longer known here.
    pub fn forget(&mut self) {
        self.clear();
        self.version = None;
    }

    fn clear(&mut self) {
        self.values.clear();
        self.lasts.clear();
    }

    /// Entries remembered (values and ranges).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.values.len() + self.lasts.len()
    }

    /// The remembered value at `key`, if any (a miss says nothing).
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.values.get(key).map(Vec::as_slice)
    }

    /// Remembers what a read of `key` found (only short values that exist).
    pub fn got(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Some(value) = value.filter(|v| v.len() <= MAX_VALUE_BYTES) else {
            return;
        };
        if self.values.len() >= self.cap {
            self.values.clear();
        }
        self.values.insert(key.to_vec(), value.to_vec());
    }

    /// The remembered last key of `[begin, end)`: `Some(None)` for a range
    /// known empty, `None` when that range is not remembered.
    pub fn last_key(&self, begin: &[u8], end: &[u8]) -> Option<Option<&[u8]>> {
        self.lasts
            .get(begin)
            .filter(|last| last.end == end)
            .map(|last| last.key.as_deref())
    }

    /// Remembers what a read of the last key of `[begin, end)` found,
    /// unless the range is empty or overlaps another remembered one.
    pub fn got_last_key(&mut self, begin: &[u8], end: &[u8], key: Option<&[u8]>) {
        if begin >= end {
            return;
        }
        // Of the ranges that start before `end`, the last one reaches
        // furthest (they do not overlap): only it can overlap this one.
        if let Some((start, last)) = self.before(end)
            && last.end.as_slice() > begin
            && (start != begin || last.end != end)
        {
            return;
        }
        if self.lasts.len() >= self.cap {
            self.lasts.clear();
        }
        let last = Last {
            end: end.to_vec(),
            key: key.map(<[u8]>::to_vec),
        };
        self.lasts.insert(begin.to_vec(), last);
    }

    /// The transaction wrote `value` at `key`.
    pub fn wrote(&mut self, key: &[u8], value: &[u8]) {
        if let Some(held) = self.values.get_mut(key) {
            if value.len() <= MAX_VALUE_BYTES {
                held.clear();
                held.extend_from_slice(value);
            } else {
                self.values.remove(key);
            }
        }
        if let Some(last) = self.holding(key)
            && last.key.as_deref().is_none_or(|k| k < key)
        {
            last.key = Some(key.to_vec());
        }
    }

    /// The transaction deleted `key`.
    pub fn cleared(&mut self, key: &[u8]) {
        self.values.remove(key);
        // Deleting a range's last key leaves its new last key unknown. (A
        // range's last key lies inside it, so matching it is enough.)
        if let Some((start, last)) = self.before_or_at(key)
            && last.key.as_deref() == Some(key)
        {
            let start = start.to_vec();
            self.lasts.remove(&start);
        }
    }

    /// The transaction deleted every key in `[begin, end)`.
    pub fn cleared_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin >= end {
            return;
        }
        self.values
            .retain(|k, _| k.as_slice() < begin || k.as_slice() >= end);
        // The ranges that start before `end`, from the last one back, while
        // they reach past `begin` (their ends fall as their starts do).
        let overlapping: Vec<Vec<u8>> = self
            .lasts
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(end)))
            .rev()
            .take_while(|(_, last)| last.end.as_slice() > begin)
            .map(|(start, _)| start.clone())
            .collect();
        for start in overlapping {
            self.lasts.remove(&start);
        }
    }

    /// The remembered range with the greatest start below `end`.
    fn before(&self, end: &[u8]) -> Option<(&[u8], &Last)> {
        self.lasts
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(end)))
            .next_back()
            .map(|(k, v)| (k.as_slice(), v))
    }

    /// The remembered range with the greatest start at or below `key`.
    fn before_or_at(&self, key: &[u8]) -> Option<(&[u8], &Last)> {
        self.lasts
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(k, v)| (k.as_slice(), v))
    }

    /// The remembered range that holds `key`, if any.
    fn holding(&mut self, key: &[u8]) -> Option<&mut Last> {
        self.lasts
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, last)| last)
            .filter(|last| key < last.end.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_writes_and_clears() {
        let mut c = ReadCache::new(8);
        c.begin(1);
        assert_eq!(c.get(b"a"), None);
        c.got(b"a", Some(b"1"));
        c.got(b"missing", None);
        c.got(b"long", Some(&[0u8; MAX_VALUE_BYTES + 1]));
        assert_eq!(c.get(b"a"), Some(&b"1"[..]));
        assert_eq!(c.len(), 1, "misses and long values are not kept");
        c.wrote(b"a", b"2");
        assert_eq!(c.get(b"a"), Some(&b"2"[..]));
        c.wrote(b"b", b"x");
        assert_eq!(c.get(b"b"), None, "a write alone is not remembered");
        c.wrote(b"a", &[1u8; MAX_VALUE_BYTES + 1]);
        assert_eq!(c.get(b"a"), None, "overwritten by a long value");
        c.got(b"a", Some(b"3"));
        c.cleared(b"a");
        assert_eq!(c.get(b"a"), None);
    }

    #[test]
    fn a_moved_counter_or_a_rollback_forgets() {
        let mut c = ReadCache::new(8);
        c.begin(1);
        c.got(b"a", Some(b"1"));
        c.got_last_key(b"r", b"s", Some(b"r1"));
        c.begin(1);
        assert_eq!(c.get(b"a"), Some(&b"1"[..]), "nobody else wrote");
        c.begin(2);
        assert_eq!(c.get(b"a"), None);
        assert_eq!(c.last_key(b"r", b"s"), None);
        c.got(b"a", Some(b"1"));
        c.forget();
        assert_eq!(c.len(), 0);
        c.begin(2);
        assert_eq!(c.get(b"a"), None, "forgotten stays forgotten");
    }

    #[test]
    fn last_keys_follow_writes_and_clears() {
        let mut c = ReadCache::new(8);
        c.begin(1);
        c.got_last_key(b"g1/", b"g10", Some(b"g1/5"));
        c.got_last_key(b"g2/", b"g20", None);
        assert_eq!(c.last_key(b"g1/", b"g10"), Some(Some(&b"g1/5"[..])));
        assert_eq!(c.last_key(b"g1/", b"g1z"), None, "another end");
        assert_eq!(c.last_key(b"g2/", b"g20"), Some(None));
        // Writes inside a range raise its last key; below it, they do not.
        c.wrote(b"g1/7", b"");
        c.wrote(b"g1/6", b"");
        c.wrote(b"g2/1", b"");
        c.wrote(b"g3", b"");
        assert_eq!(c.last_key(b"g1/", b"g10"), Some(Some(&b"g1/7"[..])));
        assert_eq!(c.last_key(b"g2/", b"g20"), Some(Some(&b"g2/1"[..])));
        // Clearing a key below the last one keeps the range; the last one
        // drops it.
        c.cleared(b"g1/6");
        assert_eq!(c.last_key(b"g1/", b"g10"), Some(Some(&b"g1/7"[..])));
        c.cleared(b"g1/7");
        assert_eq!(c.last_key(b"g1/", b"g10"), None);
        // A range clear drops every range it touches.
        c.got_last_key(b"g1/", b"g10", Some(b"g1/5"));
        c.got(b"g1/5", Some(b"v"));
        c.got(b"g3", Some(b"v"));
        c.cleared_range(b"g1/4", b"g2/0");
        assert_eq!(c.last_key(b"g1/", b"g10"), None);
        assert_eq!(c.last_key(b"g2/", b"g20"), None);
        assert_eq!(c.get(b"g1/5"), None);
        assert_eq!(c.get(b"g3"), Some(&b"v"[..]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_not_kept() {
        let mut c = ReadCache::new(8);
        c.begin(1);
        c.got_last_key(b"b", b"d", Some(b"c"));
        c.got_last_key(b"a", b"c", Some(b"b"));
        c.got_last_key(b"c", b"e", Some(b"c"));
        c.got_last_key(b"a", b"z", Some(b"c"));
        c.got_last_key(b"x", b"x", None);
        assert_eq!(c.len(), 1);
        // The same range again replaces it; a neighbour is fine.
        c.got_last_key(b"b", b"d", Some(b"b"));
        c.got_last_key(b"d", b"e", None);
        assert_eq!(c.last_key(b"b", b"d"), Some(Some(&b"b"[..])));
        assert_eq!(c.last_key(b"d", b"e"), Some(None));
        c.wrote(b"d", b"");
        assert_eq!(c.last_key(b"b", b"d"), Some(Some(&b"b"[..])));
        assert_eq!(c.last_key(b"d", b"e"), Some(Some(&b"d"[..])));
    }

    #[test]
    fn full_tables_start_over() {
        let mut c = ReadCache::new(2);
        c.begin(1);
        for k in [b"a", b"b", b"c"] {
            c.got(k, Some(b"v"));
            c.got_last_key(k, &[k[0] + 1], None);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(b"c"), Some(&b"v"[..]));
        assert_eq!(c.last_key(b"c", b"d"), Some(None));
    }
}
