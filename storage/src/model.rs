//! The chat data model on top of [`Kv`](crate::Kv): keyspace and typed records.
//!
//! Owns the key layout (tuple-encoded under a configurable prefix) and the
//! encoding of the small records (group meta, member, dedupe entry). Message
//! bodies are opaque bytes here: the `actors` crate stores protobuf `Message`s.
//!
//! Who talks to it: the group actor (the single writer of a group's log,
//! members and pointers, fenced by the group's epoch), the session actor
//! (group creation, reads for `history` and `sync`).
//!
//! What it must not do: decide policy (who may do what is the actors' job) or
//! perform side effects outside the transaction it is given.
//!
//! Keyspace (all under `prefix`):
//!
//! | key | value |
//! |---|---|
//! | `(g, gid, meta)` | [`GroupMeta`] |
//! | `(g, gid, epoch)` | u64 big-endian: the current owner's epoch |
//! | `(g, gid, indexed)` | u64 big-endian: every send with a seq up to it has its dedupe record |
//! | `(g, gid, log, seq)` | message body |
//! | `(g, gid, log, last, first)` | the bodies of seqs `first..=last`, each after its length (a run) |
//! | `(g, gid, mem, uid)` | [`MemberRecord`] |
//! | `(g, gid, dedupe, uid, client_msg_id)` | [`DedupeRecord`] |
//! | `(g, gid, thread, parent_seq, seq)` | empty: thread index |
//! | `(g, gid, react, seq, emoji, uid)` | empty: one reaction |
//! | `(u, uid, groups, gid)` | [`UserGroupRecord`]: the user's group index |
//! | `(u, uid, seen)` | u64 big-endian: last-seen time (ms) |
//!
//! A commit writes its batch's entries as runs of consecutive seqs, one
//! key for up to [`LOG_RUN_BYTES`] of bodies, and an entry alone in its
//! run under its own key (decisions #38); readers take either kind.
//! A group's head (its last seq) is its last log key, not a record of its
//! own (decisions #30). Files written before hold a `(g, gid, head)`
//! record per group, which nothing reads any more.

use foundationdb_tuple::{TuplePack, pack_into, unpack};
use prost::Message as _;

use crate::error::Error;
use crate::kv::{Pair, RangeOpts, Txn, prefix_end};

/// Role values stored in [`MemberRecord::role`] (same numbers as the protocol).
pub mod role {
    /// A plain member.
    pub const MEMBER: i32 = 1;
    /// An admin: may add, remove and promote.
    pub const ADMIN: i32 = 2;
}

/// A group's descriptive record. Changed by creation and membership changes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupMeta {
    /// Display name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// User who created it.
    #[prost(string, tag = "2")]
    pub creator: String,
    /// Creation time, Unix ms.
    #[prost(uint64, tag = "3")]
    pub created_at_ms: u64,
    /// Member limit, checked in the transaction that adds members.
    #[prost(uint32, tag = "4")]
    pub max_members: u32,
    /// Current number of members.
    #[prost(uint32, tag = "5")]
    pub member_count: u32,
    /// A 1:1 chat (no members can be added).
    #[prost(bool, tag = "6")]
    pub direct: bool,
}

/// One member of a group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemberRecord {
    /// [`role::MEMBER`] or [`role::ADMIN`].
    #[prost(int32, tag = "1")]
    pub role: i32,
    /// Seq of the system message that added the member.
    #[prost(uint64, tag = "2")]
    pub joined_at_seq: u64,
    /// Highest seq the member's devices received.
    #[prost(uint64, tag = "3")]
    pub delivered_seq: u64,
    /// Highest seq the member read.
    #[prost(uint64, tag = "4")]
    pub read_seq: u64,
    /// When the member joined, Unix ms.
    #[prost(uint64, tag = "5")]
    pub joined_at_ms: u64,
}

/// The outcome of a committed send, kept to answer retries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DedupeRecord {
    /// The seq the message got.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Its commit time, Unix ms.
    #[prost(uint64, tag = "2")]
    pub sent_at_ms: u64,
}

/// An entry of a user's group index.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UserGroupRecord {
    /// Seq of the system message that added the user (see [`MemberRecord`]).
    #[prost(uint64, tag = "1")]
    pub joined_at_seq: u64,
}

/// Adding members would pass the group's member limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupFull {
    /// Members now.
    pub members: u32,
    /// The limit.
    pub max_members: u32,
}

/// A page of a group's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    /// `(seq, body)` in increasing seq.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// More entries exist beyond the page in the direction of the query.
    pub has_more: bool,
}

/// Which part of a log to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogQuery {
    /// The newest `limit` entries.
    Latest,
    /// The oldest `limit` entries with seq > the value.
    After(u64),
    /// The newest `limit` entries with seq < the value.
    Before(u64),
    /// Entries with `after < seq < before`, oldest first.
    Between(u64, u64),
}

/// Typed access to the chat keyspace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Model {
    prefix: Vec<u8>,
}

/// Room for a key's packed tuple beyond the prefix (see [`Model::key`]).
const KEY_CAPACITY: usize = 160;

fn be(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

impl Model {
    /// A model whose keys all start with `prefix` (e.g. `b"chat"`).
    pub fn new(prefix: &[u8]) -> Self {
        Model {
            prefix: prefix.to_vec(),
        }
    }

    /// The prefixed, packed key of `t`, built in one allocation: the
    /// capacity covers the longest keys (a dedupe key of three ids of up to
    /// ~36 bytes), so packing, which writes its tuple piece by piece, does
    /// not regrow it (it did, from empty, ~3 times a key: 4% of the commit
    /// writer's time over 1,000 groups).
    fn key<T: TuplePack>(&self, t: &T) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + KEY_CAPACITY);
        k.extend_from_slice(&self.prefix);
        pack_into(t, &mut k);
        k
    }

    /// `[begin, end)` covering every key that extends the packed tuple `t`.
    fn range<T: TuplePack>(&self, t: &T) -> (Vec<u8>, Vec<u8>) {
        let begin = self.key(t);
        // A packed tuple never ends in 0xff (strings end in 0x00, integers
        // in their last byte), so prefix_end always exists; fall back to a
        // key past everything for safety.
        let end = prefix_end(&begin).unwrap_or_else(|| vec![0xff; begin.len() + 1]);
        (begin, end)
    }

    fn suffix<'a>(&self, key: &'a [u8]) -> &'a [u8] {
        &key[self.prefix.len().min(key.len())..]
    }

    // ----- records -------------------------------------------------------

    fn get_record<M: prost::Message + Default>(
        &self,
        t: &mut dyn Txn,
        key: &[u8],
    ) -> Result<Option<M>, Error> {
        match t.get(key)? {
            None => Ok(None),
            Some(v) => M::decode(&v[..]).map(Some).map_err(|e| corrupt(key, e)),
        }
    }

    fn get_u64(&self, t: &mut dyn Txn, key: &[u8]) -> Result<u64, Error> {
        Ok(self.get_opt_u64(t, key)?.unwrap_or(0))
    }

    fn get_opt_u64(&self, t: &mut dyn Txn, key: &[u8]) -> Result<Option<u64>, Error> {
        match t.get(key)? {
            None => Ok(None),
            Some(v) => v
                .as_slice()
                .try_into()
                .map(|b| Some(u64::from_be_bytes(b)))
                .map_err(|_| corrupt(key, "not a u64")),
        }
    }

    /// The group's meta record, `None` when the group does not exist.
    pub fn meta(&self, t: &mut dyn Txn, gid: &str) -> Result<Option<GroupMeta>, Error> {
        self.get_record(t, &self.key(&("g", gid, "meta")))
    }

    /// Writes the group's meta record.
    pub fn put_meta(&self, t: &mut dyn Txn, gid: &str, meta: &GroupMeta) -> Result<(), Error> {
        t.set(&self.key(&("g", gid, "meta")), &meta.encode_to_vec())
    }

    /// The group's last sequence number: the last seq of its log's last
    /// key (0 for an empty log). Every seq is a log entry and none is ever
    /// removed, so there is no head record to keep in step (decisions #30):
    /// a commit writes its entries and nothing else moves. Reads one key,
    /// not its value. As a fence it conflicts with any commit that appends
    /// to the group.
    pub fn head(&self, t: &mut dyn Txn, gid: &str) -> Result<u64, Error> {
        let (begin, end) = self.range(&("g", gid, "log"));
        match t.last_key(&begin, &end)? {
            None => Ok(0),
            Some(k) => Ok(log_span(&begin, &k)?.1),
        }
    }

    /// The group's current owner epoch (0 before any owner claimed it).
    pub fn epoch(&self, t: &mut dyn Txn, gid: &str) -> Result<u64, Error> {
        self.get_u64(t, &self.key(&("g", gid, "epoch")))
    }

    /// Takes the next epoch for the group and returns it. Every later append
    /// by an owner holding an older epoch fails [`Model::check_epoch`].
    pub fn claim_epoch(&self, t: &mut dyn Txn, gid: &str) -> Result<u64, Error> {
        let next = self.epoch(t, gid)? + 1;
        t.set(&self.key(&("g", gid, "epoch")), &be(next))?;
        Ok(next)
    }

    /// Whether `epoch` is still the group's current epoch (the caller still owns it).
    pub fn check_epoch(&self, t: &mut dyn Txn, gid: &str, epoch: u64) -> Result<bool, Error> {
        Ok(self.epoch(t, gid)? == epoch)
    }

    // ----- log -----------------------------------------------------------
    //
    // A log key holds one entry, `(g, gid, log, seq)`, or a run of
    // consecutive entries, `(g, gid, log, last, first)` with `first < last`
    // (decisions #38). Keys of both kinds sort by their last seq, and runs
    // never overlap, so the log's keys are in seq order whatever mix a file
    // holds.

    /// Writes one log entry.
    pub fn put_log(&self, t: &mut dyn Txn, gid: &str, seq: u64, body: &[u8]) -> Result<(), Error> {
        t.set(&self.key(&("g", gid, "log", seq)), body)
    }

    /// Writes a batch of entries `(seq, body)` in increasing seq, as runs
    /// of consecutive seqs of up to [`LOG_RUN_BYTES`] each: one key for
    /// what would be several. An entry alone in its run (a batch of one,
    /// an entry too long to share, a gap in the seqs) is written as by
    /// [`Model::put_log`].
    pub fn put_log_batch(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        entries: &[(u64, Vec<u8>)],
    ) -> Result<(), Error> {
        let mut rest = entries;
        while let Some(((first, body), _)) = rest.split_first() {
            let mut bytes = run_entry_len(body);
            let mut n = 1;
            while let Some((seq, next)) = rest.get(n)
                && first.checked_add(n as u64) == Some(*seq)
            {
                let len = run_entry_len(next);
                if bytes + len > LOG_RUN_BYTES {
                    break;
                }
                bytes += len;
                n += 1;
            }
            let (run, after) = rest.split_at(n);
            rest = after;
            if n == 1 {
                self.put_log(t, gid, *first, body)?;
                continue;
            }
            let mut value = Vec::with_capacity(bytes);
            for (_, body) in run {
                prost::encoding::encode_varint(body.len() as u64, &mut value);
                value.extend_from_slice(body);
            }
            // The run holds n > 1 entries, of consecutive seqs from `first`.
            let last = run[n - 1].0;
            t.set(&self.key(&("g", gid, "log", last, *first)), &value)?;
        }
        Ok(())
    }

    /// One log entry.
    pub fn log_entry(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        seq: u64,
    ) -> Result<Option<Vec<u8>>, Error> {
        let scan = Scan {
            lo: seq,
            hi: seq.saturating_add(1),
            reverse: false,
            want: 1,
        };
        let found = self.log_scan(t, gid, scan)?;
        Ok(found.into_iter().next().map(|(_, body)| body))
    }

    /// Reads a page of the log; entries come back in increasing seq.
    pub fn log_page(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        query: LogQuery,
        limit: usize,
    ) -> Result<LogPage, Error> {
        let (lo, hi, reverse) = match query {
            LogQuery::Latest => (0, u64::MAX, true),
            LogQuery::After(s) => (s.saturating_add(1), u64::MAX, false),
            LogQuery::Before(s) => (0, s, true),
            LogQuery::Between(a, b) => (a.saturating_add(1), b, false),
        };
        // Read one more than asked to learn whether there is more.
        let scan = Scan {
            lo,
            hi,
            reverse,
            want: limit + 1,
        };
        let mut entries = self.log_scan(t, gid, scan)?;
        let has_more = entries.len() > limit;
        entries.truncate(limit);
        if reverse {
            entries.reverse();
        }
        Ok(LogPage { entries, has_more })
    }

    /// Up to `scan.want` entries with `scan.lo <= seq < scan.hi`: the
    /// lowest first, or with `scan.reverse` the highest first. A key may
    /// hold one entry or many, so it reads keys in rounds: at most 4 first,
    /// then as many as the entries still wanted need at the mean entries per
    /// key read so far (at most [`MAX_SCAN_KEYS`]). A history page takes
    /// two or three range reads, and so does a group actor's load of
    /// thousands of entries, which matters where each one is a round trip
    /// (FoundationDB).
    fn log_scan(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        scan: Scan,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        if scan.lo >= scan.hi || scan.want == 0 {
            return Ok(out);
        }
        let (log, log_end) = self.range(&("g", gid, "log"));
        let at = |seq: u64| self.key(&("g", gid, "log", seq));
        // Forward: from the first key whose last seq is >= lo. Reverse:
        // the keys whose last seq is < hi, newest first, after the one key
        // that may hold seqs on both sides of hi (the first at or past it;
        // there is none past the last seq there can be).
        let (mut begin, mut end) = if scan.reverse {
            if scan.hi < u64::MAX {
                for (k, v) in t.get_range(&at(scan.hi), &log_end, RangeOpts::forward(1))? {
                    scan.take(&log, &k, v, &mut out)?;
                }
            }
            (at(scan.lo), at(scan.hi))
        } else {
            (at(scan.lo), log_end)
        };
        let (mut step, mut keys) = (scan.want.min(4), 0);
        while out.len() < scan.want {
            let opts = RangeOpts {
                limit: step,
                reverse: scan.reverse,
            };
            let pairs = t.get_range(&begin, &end, opts)?;
            let read = pairs.len();
            keys += read;
            let mut last_key = None;
            for (k, v) in pairs {
                if !scan.take(&log, &k, v, &mut out)? {
                    return Ok(out);
                }
                last_key = Some(k);
            }
            let Some(k) = last_key.filter(|_| read == step) else {
                break;
            };
            if scan.reverse {
                end = k;
            } else {
                begin = k;
                begin.push(0);
            }
            // As many keys as the entries still wanted need at the mean
            // entries per key so far, and one more; twice as many as last
            // time while none has been taken.
            let left = scan.want - out.len();
            step = match out.len() {
                0 => step * 2,
                taken => (left * keys).div_ceil(taken) + 1,
            }
            .clamp(1, MAX_SCAN_KEYS);
        }
        Ok(out)
    }

    // ----- members -------------------------------------------------------

    /// One member record.
    pub fn member(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
    ) -> Result<Option<MemberRecord>, Error> {
        self.get_record(t, &self.key(&("g", gid, "mem", uid)))
    }

    /// Writes a member record and the user's group index entry.
    pub fn put_member(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
        rec: &MemberRecord,
    ) -> Result<(), Error> {
        t.set(&self.key(&("g", gid, "mem", uid)), &rec.encode_to_vec())?;
        let idx = UserGroupRecord {
            joined_at_seq: rec.joined_at_seq,
        };
        t.set(&self.key(&("u", uid, "groups", gid)), &idx.encode_to_vec())
    }

    /// Rewrites a member record's pointers and role only (the index entry is unchanged).
    pub fn update_member(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
        rec: &MemberRecord,
    ) -> Result<(), Error> {
        t.set(&self.key(&("g", gid, "mem", uid)), &rec.encode_to_vec())
    }

    /// Removes a member record and the user's group index entry.
    pub fn remove_member(&self, t: &mut dyn Txn, gid: &str, uid: &str) -> Result<(), Error> {
        t.clear(&self.key(&("g", gid, "mem", uid)))?;
        t.clear(&self.key(&("u", uid, "groups", gid)))
    }

    /// Adds members not yet in the group, checking the member limit in this
    /// same transaction, so concurrent joins can never exceed it. Returns the
    /// users actually added, or [`GroupFull`] (and writes nothing) when the
    /// new count would pass `meta.max_members`.
    pub fn add_members(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        new: &[(String, MemberRecord)],
    ) -> Result<Result<Vec<String>, GroupFull>, Error> {
        let Some(mut meta) = self.meta(t, gid)? else {
            return Err(Error::Corrupt {
                key: gid.to_string(),
                reason: "group has no meta record".into(),
            });
        };
        let mut fresh = Vec::with_capacity(new.len());
        for (uid, rec) in new {
            if self.member(t, gid, uid)?.is_none() && !fresh.iter().any(|(u, _)| *u == uid) {
                fresh.push((uid, rec));
            }
        }
        let count = meta.member_count as usize + fresh.len();
        if count > meta.max_members as usize {
            return Ok(Err(GroupFull {
                members: meta.member_count,
                max_members: meta.max_members,
            }));
        }
        for (uid, rec) in &fresh {
            self.put_member(t, gid, uid, rec)?;
        }
        meta.member_count = count as u32;
        self.put_meta(t, gid, &meta)?;
        Ok(Ok(fresh.into_iter().map(|(u, _)| u.clone()).collect()))
    }

    /// Removes members (those not in the group are skipped) and updates the
    /// count. Returns the users actually removed.
    pub fn remove_members(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uids: &[String],
    ) -> Result<Vec<String>, Error> {
        let mut removed = Vec::new();
        for uid in uids {
            if self.member(t, gid, uid)?.is_some() && !removed.contains(uid) {
                self.remove_member(t, gid, uid)?;
                removed.push(uid.clone());
            }
        }
        if !removed.is_empty()
            && let Some(mut meta) = self.meta(t, gid)?
        {
            meta.member_count = meta.member_count.saturating_sub(removed.len() as u32);
            self.put_meta(t, gid, &meta)?;
        }
        Ok(removed)
    }

    /// Every member of the group, in user id order.
    pub fn members(
        &self,
        t: &mut dyn Txn,
        gid: &str,
    ) -> Result<Vec<(String, MemberRecord)>, Error> {
        let (begin, end) = self.range(&("g", gid, "mem"));
        let pairs = t.get_range(&begin, &end, RangeOpts::forward(0))?;
        pairs
            .into_iter()
            .map(|(k, v)| {
                let (_, _, _, uid): (String, String, String, String) =
                    unpack(self.suffix(&k)).map_err(|e| corrupt(&k, e))?;
                let rec = MemberRecord::decode(&v[..]).map_err(|e| corrupt(&k, e))?;
                Ok((uid, rec))
            })
            .collect()
    }

    /// The user's groups with the seq at which they joined, in group id order.
    pub fn user_groups(&self, t: &mut dyn Txn, uid: &str) -> Result<Vec<(String, u64)>, Error> {
        let (begin, end) = self.range(&("u", uid, "groups"));
        let pairs = t.get_range(&begin, &end, RangeOpts::forward(0))?;
        pairs
            .into_iter()
            .map(|(k, v)| {
                let (_, _, _, gid): (String, String, String, String) =
                    unpack(self.suffix(&k)).map_err(|e| corrupt(&k, e))?;
                let rec = UserGroupRecord::decode(&v[..]).map_err(|e| corrupt(&k, e))?;
                Ok((gid, rec.joined_at_seq))
            })
            .collect()
    }

    // ----- dedupe, threads, reactions, presence ---------------------------

    /// The recorded outcome of `(uid, client_msg_id)` in the group, if any.
    pub fn dedupe(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
        client_msg_id: &str,
    ) -> Result<Option<DedupeRecord>, Error> {
        self.get_record(t, &self.dedupe_key(gid, uid, client_msg_id))
    }

    fn dedupe_key(&self, gid: &str, uid: &str, client_msg_id: &str) -> Vec<u8> {
        self.key(&("g", gid, "dedupe", uid, client_msg_id))
    }

    /// Records the outcome of a send (the group actor writes most of these
    /// in batches, behind the log: see [`Model::dedupe_indexed`]).
    pub fn put_dedupe(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
        client_msg_id: &str,
        rec: &DedupeRecord,
    ) -> Result<(), Error> {
        t.set(
            &self.dedupe_key(gid, uid, client_msg_id),
            &rec.encode_to_vec(),
        )
    }

    /// Records the outcome of a send unless `(uid, client_msg_id)` already
    /// has one; `false` (nothing written) when it has, so a retry is found
    /// by the write itself (one lookup, not a read then a write).
    pub fn insert_dedupe(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
        client_msg_id: &str,
        rec: &DedupeRecord,
    ) -> Result<bool, Error> {
        t.insert_new(
            &self.dedupe_key(gid, uid, client_msg_id),
            &rec.encode_to_vec(),
        )
    }

    /// Removes the outcome of a send (taking back an [`Self::insert_dedupe`]
    /// in the same transaction).
    pub fn clear_dedupe(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        uid: &str,
        client_msg_id: &str,
    ) -> Result<(), Error> {
        t.clear(&self.dedupe_key(gid, uid, client_msg_id))
    }

    /// The seq up to which every send of the group has its dedupe record;
    /// the sends after it are found in the log. `None` for a group written
    /// before this record existed (then every send has its record).
    pub fn dedupe_indexed(&self, t: &mut dyn Txn, gid: &str) -> Result<Option<u64>, Error> {
        self.get_opt_u64(t, &self.key(&("g", gid, "indexed")))
    }

    /// Removes the group's dedupe watermark, leaving it as a group written
    /// before the watermark existed (tests make such groups with it).
    pub fn clear_dedupe_indexed(&self, t: &mut dyn Txn, gid: &str) -> Result<(), Error> {
        t.clear(&self.key(&("g", gid, "indexed")))
    }

    /// Moves the group's dedupe watermark (see [`Model::dedupe_indexed`]).
    pub fn set_dedupe_indexed(&self, t: &mut dyn Txn, gid: &str, seq: u64) -> Result<(), Error> {
        t.set(&self.key(&("g", gid, "indexed")), &be(seq))
    }

    /// Indexes `seq` as a reply in the thread of `parent`.
    pub fn put_thread(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        parent: u64,
        seq: u64,
    ) -> Result<(), Error> {
        t.set(&self.key(&("g", gid, "thread", parent, seq)), &[])
    }

    /// Seqs of replies to `parent` with `seq > after`, oldest first, at most
    /// `limit`, and whether there are more.
    pub fn thread_seqs(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        parent: u64,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), Error> {
        let (_, end) = self.range(&("g", gid, "thread", parent));
        let begin = self.key(&("g", gid, "thread", parent, after.saturating_add(1)));
        let mut pairs = t.get_range(&begin, &end, RangeOpts::forward(limit + 1))?;
        let has_more = pairs.len() > limit;
        pairs.truncate(limit);
        let seqs = pairs
            .into_iter()
            .map(|(k, _)| {
                let (_, _, _, _, seq): (String, String, String, u64, u64) =
                    unpack(self.suffix(&k)).map_err(|e| corrupt(&k, e))?;
                Ok(seq)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((seqs, has_more))
    }

    /// Adds or removes one user's reaction; returns whether anything changed.
    pub fn set_reaction(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        seq: u64,
        emoji: &str,
        uid: &str,
        present: bool,
    ) -> Result<bool, Error> {
        let key = self.key(&("g", gid, "react", seq, emoji, uid));
        let exists = t.get(&key)?.is_some();
        match (exists, present) {
            (false, true) => t.set(&key, &[])?,
            (true, false) => t.clear(&key)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Every reaction on a message as `(emoji, user)`, grouped by emoji.
    pub fn reactions(
        &self,
        t: &mut dyn Txn,
        gid: &str,
        seq: u64,
    ) -> Result<Vec<(String, String)>, Error> {
        let (begin, end) = self.range(&("g", gid, "react", seq));
        let pairs: Vec<Pair> = t.get_range(&begin, &end, RangeOpts::forward(0))?;
        pairs
            .into_iter()
            .map(|(k, _)| {
                let (_, _, _, _, emoji, uid): (String, String, String, u64, String, String) =
                    unpack(self.suffix(&k)).map_err(|e| corrupt(&k, e))?;
                Ok((emoji, uid))
            })
            .collect()
    }

    /// The user's last-seen time (ms), 0 if never recorded.
    pub fn last_seen(&self, t: &mut dyn Txn, uid: &str) -> Result<u64, Error> {
        self.get_u64(t, &self.key(&("u", uid, "seen")))
    }

    /// Records the user's last-seen time (ms).
    pub fn set_last_seen(&self, t: &mut dyn Txn, uid: &str, ms: u64) -> Result<(), Error> {
        t.set(&self.key(&("u", uid, "seen")), &be(ms))
    }
}

/// Longest run value [`Model::put_log_batch`] writes: each entry's bytes
/// and its length prefix. It fits one SQLite table-leaf cell of a 4 KiB
/// page (at most 4,061 bytes) and is far below FoundationDB's 100 kB
/// value limit, and a lookup of one entry decodes at most this much.
pub const LOG_RUN_BYTES: usize = 3_900;

/// Most keys one range read of [`Model::log_scan`] asks for.
const MAX_SCAN_KEYS: usize = 1_024;

/// An entry's bytes in a run: its length prefix and its body.
fn run_entry_len(body: &[u8]) -> usize {
    prost::encoding::encoded_len_varint(body.len() as u64) + body.len()
}

/// `(first, last)` seqs of the log key `key`, whose group's log prefix is
/// `log`: `(seq, seq)` for an entry's key, `(first, last)` for a run's.
fn log_span(log: &[u8], key: &[u8]) -> Result<(u64, u64), Error> {
    let Some(rest) = key.strip_prefix(log) else {
        return Err(corrupt(key, "not a key of this log"));
    };
    if let Ok(seq) = unpack::<u64>(rest) {
        return Ok((seq, seq));
    }
    match unpack::<(u64, u64)>(rest) {
        Ok((last, first)) if first < last => Ok((first, last)),
        Ok(_) => Err(corrupt(key, "a run that does not end after it starts")),
        Err(e) => Err(corrupt(key, e)),
    }
}

/// What [`Model::log_scan`] reads: up to `want` entries with
/// `lo <= seq < hi`, the lowest first, or the highest with `reverse`.
#[derive(Debug, Clone, Copy)]
struct Scan {
    lo: u64,
    hi: u64,
    reverse: bool,
    want: usize,
}

impl Scan {
    /// Appends to `out` the entries of the log pair `(key, value)` that the
    /// scan wants, in its direction, until `out` has `want`; `log` is the
    /// group's log prefix. Only the entries it takes are copied (an entry's
    /// own value is moved). Returns whether a later pair in the same
    /// direction could still hold one.
    fn take(
        &self,
        log: &[u8],
        key: &[u8],
        value: Vec<u8>,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<bool, Error> {
        let (first, last) = log_span(log, key)?;
        let wanted =
            |seq: u64, out: &Vec<_>| (self.lo..self.hi).contains(&seq) && out.len() < self.want;
        if first == last {
            if wanted(first, out) {
                out.push((first, value));
            }
        } else {
            let bodies = split_run(key, &value, first, last)?;
            let mut take = |(i, body): (usize, &[u8])| {
                let seq = first + i as u64;
                if wanted(seq, out) {
                    out.push((seq, body.to_vec()));
                }
            };
            if self.reverse {
                bodies.into_iter().enumerate().rev().for_each(&mut take);
            } else {
                bodies.into_iter().enumerate().for_each(&mut take);
            }
        }
        Ok(out.len() < self.want
            && if self.reverse {
                first > self.lo
            } else {
                last < self.hi.saturating_sub(1)
            })
    }
}

/// The bodies of a run's value, for seqs `first..=last`: each after its
/// length, exactly as many as the key says.
fn split_run<'v>(
    key: &[u8],
    value: &'v [u8],
    first: u64,
    last: u64,
) -> Result<Vec<&'v [u8]>, Error> {
    let mut buf = value;
    let mut bodies = Vec::new();
    for _ in first..=last {
        let len = prost::encoding::decode_varint(&mut buf).map_err(|e| corrupt(key, e))?;
        let Some((body, rest)) = usize::try_from(len)
            .ok()
            .and_then(|n| buf.split_at_checked(n))
        else {
            return Err(corrupt(key, "a run's entry is cut short"));
        };
        bodies.push(body);
        buf = rest;
    }
    if !buf.is_empty() {
        return Err(corrupt(key, "a run holds more entries than its key says"));
    }
    Ok(bodies)
}

fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
