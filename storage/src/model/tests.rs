use super::*;
use crate::sqlite::{SqliteKv, SqliteOptions};
use crate::{Kv, TxError, read, run};

fn store() -> (tempfile::TempDir, SqliteKv) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = SqliteKv::open(&dir.path().join("t.db"), SqliteOptions::default()).expect("open");
    (dir, kv)
}

type R<T> = Result<T, TxError<()>>;

fn write<T>(kv: &dyn Kv, f: impl FnMut(&mut dyn Txn) -> R<T>) -> T {
    run(kv, f).expect("commit")
}

fn get<T>(kv: &dyn Kv, f: impl FnMut(&mut dyn Txn) -> R<T>) -> T {
    read(kv, f).expect("read")
}

fn new_group(kv: &dyn Kv, m: &Model, gid: &str, max: u32) {
    write(kv, |t| {
        m.put_meta(
            t,
            gid,
            &GroupMeta {
                name: "n".into(),
                max_members: max,
                ..Default::default()
            },
        )?;
        Ok(())
    });
}

fn member(seq: u64) -> MemberRecord {
    MemberRecord {
        role: role::MEMBER,
        joined_at_seq: seq,
        ..Default::default()
    }
}

#[test]
fn log_pages_in_every_direction() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    write(&kv, |t| {
        for seq in 1..=300u64 {
            m.put_log(t, "g", seq, format!("m{seq}").as_bytes())?;
        }
        // A neighbouring group must never leak into g's pages.
        m.put_log(t, "g2", 1, b"other")?;
        Ok(())
    });
    let seqs = |p: &LogPage| p.entries.iter().map(|e| e.0).collect::<Vec<_>>();
    let p = get(&kv, |t| Ok(m.log_page(t, "g", LogQuery::Latest, 3)?));
    assert_eq!(seqs(&p), vec![298, 299, 300]);
    assert!(p.has_more);
    assert_eq!(p.entries[0].1, b"m298");
    let p = get(&kv, |t| Ok(m.log_page(t, "g", LogQuery::After(255), 10)?));
    assert_eq!(seqs(&p), (256..=265).collect::<Vec<_>>());
    assert!(p.has_more);
    let p = get(&kv, |t| Ok(m.log_page(t, "g", LogQuery::After(295), 10)?));
    assert_eq!(seqs(&p), (296..=300).collect::<Vec<_>>());
    assert!(!p.has_more);
    let p = get(&kv, |t| Ok(m.log_page(t, "g", LogQuery::Before(4), 10)?));
    assert_eq!(seqs(&p), vec![1, 2, 3]);
    assert!(!p.has_more);
    let p = get(&kv, |t| Ok(m.log_page(t, "g", LogQuery::Before(100), 2)?));
    assert_eq!(seqs(&p), vec![98, 99]);
    assert!(p.has_more);
    let p = get(&kv, |t| {
        Ok(m.log_page(t, "g", LogQuery::Between(10, 14), 10)?)
    });
    assert_eq!(seqs(&p), vec![11, 12, 13]);
    let p = get(&kv, |t| Ok(m.log_page(t, "g2", LogQuery::Latest, 10)?));
    assert_eq!(seqs(&p), vec![1]);
    // The head is the last entry's seq, whatever the neighbours hold.
    assert_eq!(get(&kv, |t| Ok(m.head(t, "g")?)), 300);
    assert_eq!(get(&kv, |t| Ok(m.head(t, "g2")?)), 1);
    assert_eq!(get(&kv, |t| Ok(m.head(t, "nope")?)), 0);
    // A group's other records sort after its log ("mem", "meta", ...) or
    // before it ("dedupe", "epoch", "indexed"): none is taken for an entry.
    new_group(&kv, &m, "nope", 10);
    write(&kv, |t| {
        m.put_dedupe(t, "nope", "u", "c", &DedupeRecord::default())?;
        m.put_member(t, "nope", "u", &member(0))?;
        m.set_dedupe_indexed(t, "nope", 7)?;
        m.claim_epoch(t, "nope")?;
        Ok(())
    });
    assert_eq!(get(&kv, |t| Ok(m.head(t, "nope")?)), 0);
    // Seq order is numeric, not by the length of the number.
    write(&kv, |t| Ok(m.put_log(t, "g2", 1_000_000, b"later")?));
    assert_eq!(get(&kv, |t| Ok(m.head(t, "g2")?)), 1_000_000);
}

/// Every page and lookup of a log written as runs of entries (with the
/// single entries runs cannot take: one alone in its batch, one too long to
/// share, one after a gap) matches the same log read entry by entry.
#[test]
fn runs_read_back_as_the_entries_they_hold() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    let body = |seq: u64| -> Vec<u8> {
        let len = if seq % 50 == 7 {
            LOG_RUN_BYTES
        } else {
            (seq % 13) as usize * 40
        };
        format!("m{seq}:")
            .into_bytes()
            .into_iter()
            .chain(std::iter::repeat_n(b'.', len))
            .collect()
    };
    // Batches of 1 to 40 entries; seq 150 is never written (a gap).
    let mut all = std::collections::BTreeMap::new();
    let mut seq = 1u64;
    let mut size = 1u64;
    while seq <= 300 {
        let batch: Vec<(u64, Vec<u8>)> = (seq..seq + size)
            .filter(|s| *s != 150 && *s <= 300)
            .map(|s| (s, body(s)))
            .collect();
        write(&kv, |t| Ok(m.put_log_batch(t, "g", &batch)?));
        all.extend(batch);
        seq += size;
        size = size % 40 + 7;
    }
    write(&kv, |t| {
        Ok(m.put_log_batch(t, "h", &[(1, b"x".to_vec()), (2, b"y".to_vec())])?)
    });
    let (begin, end) = m.range(&("g", "g", "log"));
    let keys = get(&kv, |t| {
        Ok(t.get_range(&begin, &end, RangeOpts::forward(0))?)
    })
    .len();
    assert!(
        keys < all.len() / 4,
        "{keys} keys for {} entries",
        all.len()
    );
    assert_eq!(get(&kv, |t| Ok(m.head(t, "g")?)), 300);
    assert_eq!(get(&kv, |t| Ok(m.head(t, "h")?)), 2);
    for s in 0..=302u64 {
        let got = get(&kv, |t| Ok(m.log_entry(t, "g", s)?));
        assert_eq!(got.as_ref(), all.get(&s), "entry {s}");
    }
    let entries = |lo: u64, hi: u64| all.range(lo..hi).map(|(s, b)| (*s, b.clone()));
    for limit in [1usize, 2, 5, 17, 51, 400] {
        // What a page of `limit` should hold, from the entries in the
        // query's direction: the first `limit`, in increasing seq, and
        // whether there are more.
        let expect = |from: Vec<(u64, Vec<u8>)>, reverse: bool| {
            let more = from.len() > limit;
            let mut page: Vec<_> = from.into_iter().take(limit).collect();
            if reverse {
                page.reverse();
            }
            (page, more)
        };
        for at in [0u64, 1, 2, 8, 9, 40, 149, 150, 151, 299, 300, 301] {
            for (query, want) in [
                (
                    LogQuery::Before(at),
                    expect(entries(0, at).rev().collect(), true),
                ),
                (
                    LogQuery::After(at),
                    expect(entries(at + 1, u64::MAX).collect(), false),
                ),
                (
                    LogQuery::Between(at, at + 30),
                    expect(entries(at + 1, at + 30).collect(), false),
                ),
            ] {
                let p = get(&kv, |t| Ok(m.log_page(t, "g", query, limit)?));
                assert_eq!((p.entries, p.has_more), want, "{query:?}, {limit}");
            }
        }
        let p = get(&kv, |t| Ok(m.log_page(t, "g", LogQuery::Latest, limit)?));
        let want = expect(entries(0, u64::MAX).rev().collect(), true);
        assert_eq!((p.entries, p.has_more), want, "latest {limit}");
    }
    let p = get(&kv, |t| Ok(m.log_page(t, "h", LogQuery::Latest, 10)?));
    assert_eq!(p.entries, vec![(1, b"x".to_vec()), (2, b"y".to_vec())]);
}

/// A transaction that counts its range reads.
struct Counting<'a> {
    inner: &'a mut dyn Txn,
    ranges: usize,
}

impl Txn for Counting<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.get(key)
    }
    fn get_range(&mut self, begin: &[u8], end: &[u8], opts: RangeOpts) -> Result<Vec<Pair>, Error> {
        self.ranges += 1;
        self.inner.get_range(begin, end, opts)
    }
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.inner.set(key, value)
    }
    fn insert_new(&mut self, key: &[u8], value: &[u8]) -> Result<bool, Error> {
        self.inner.insert_new(key, value)
    }
    fn clear(&mut self, key: &[u8]) -> Result<(), Error> {
        self.inner.clear(key)
    }
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), Error> {
        self.inner.clear_range(begin, end)
    }
    fn commit(self: Box<Self>) -> Result<(), Error> {
        Err(Error::Engine("a counting view does not commit".into()))
    }
}

/// Long reads of runs take a few range reads, not one per few keys: the
/// number of keys each asks for follows the entries per key read so far.
#[test]
fn long_log_reads_take_a_few_range_reads() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    // Runs of ~35 entries (100-byte bodies), and a group of single entries.
    let batch = |from: u64| -> Vec<(u64, Vec<u8>)> {
        (from..from + 500).map(|s| (s, vec![b'x'; 100])).collect()
    };
    write(&kv, |t| {
        for from in (1..10_000).step_by(500) {
            m.put_log_batch(t, "runs", &batch(from))?;
        }
        for s in 1..=5_000 {
            m.put_log(t, "single", s, b"y")?;
        }
        Ok(())
    });
    for (gid, query, limit, most) in [
        ("runs", LogQuery::Latest, 4_512, 3),
        ("runs", LogQuery::After(0), 4_512, 3),
        ("runs", LogQuery::Before(9_000), 50, 3),
        ("runs", LogQuery::Latest, 1, 1),
        ("single", LogQuery::Latest, 4_512, 7),
        ("single", LogQuery::After(10), 50, 3),
    ] {
        let (page, ranges) = get(&kv, |t| {
            let mut c = Counting {
                inner: t,
                ranges: 0,
            };
            let page = m.log_page(&mut c, gid, query, limit)?;
            Ok((page, c.ranges))
        });
        assert_eq!(page.entries.len(), limit, "{gid} {query:?}");
        assert!(
            ranges <= most,
            "{gid} {query:?} {limit}: {ranges} range reads"
        );
    }
}

/// A run whose value holds fewer or more entries than its key says, or a
/// key that does not end after it starts, is an error, not a panic.
#[test]
fn broken_runs_are_errors() {
    for (key, value) in [
        (("g", "a", "log", 5u64, 3u64), vec![1, b'x', 1, b'y']),
        (("g", "b", "log", 5, 4), vec![1, b'x', 1, b'y', 0]),
        (("g", "c", "log", 5, 4), vec![9, b'x']),
        (("g", "d", "log", 4, 4), vec![1, b'x']),
    ] {
        let (_d, kv) = store();
        let m = Model::new(b"t");
        write(&kv, |t| Ok(t.set(&m.key(&key), &value)?));
        let gid = key.1;
        let page = read(&kv, |t| -> R<_> {
            Ok(m.log_page(t, gid, LogQuery::Latest, 10)?)
        });
        assert!(
            matches!(page, Err(TxError::Db(Error::Corrupt { .. }))),
            "{key:?}: {page:?}"
        );
    }
}

#[test]
fn epochs_fence_older_owners() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    let e1 = write(&kv, |t| Ok(m.claim_epoch(t, "g")?));
    let e2 = write(&kv, |t| Ok(m.claim_epoch(t, "g")?));
    assert_eq!((e1, e2), (1, 2));
    assert!(!get(&kv, |t| Ok(m.check_epoch(t, "g", e1)?)));
    assert!(get(&kv, |t| Ok(m.check_epoch(t, "g", e2)?)));
}

#[test]
fn members_limit_and_user_index() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    new_group(&kv, &m, "g", 3);
    let added = write(&kv, |t| {
        Ok(m.add_members(
            t,
            "g",
            &[
                ("a".into(), member(1)),
                ("b".into(), member(1)),
                ("a".into(), member(1)),
            ],
        )?)
    });
    assert_eq!(added, Ok(vec!["a".to_string(), "b".to_string()]));
    // Two more would make 4 > 3: refused, nothing written.
    let full = write(&kv, |t| {
        Ok(m.add_members(t, "g", &[("c".into(), member(2)), ("d".into(), member(2))])?)
    });
    assert_eq!(
        full,
        Err(GroupFull {
            members: 2,
            max_members: 3
        })
    );
    assert!(get(&kv, |t| Ok(m.member(t, "g", "c")?)).is_none());
    // An existing member does not count again.
    let ok = write(&kv, |t| {
        Ok(m.add_members(t, "g", &[("a".into(), member(3)), ("c".into(), member(3))])?)
    });
    assert_eq!(ok, Ok(vec!["c".to_string()]));
    let members = get(&kv, |t| Ok(m.members(t, "g")?));
    assert_eq!(
        members.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(
        get(&kv, |t| Ok(m.meta(t, "g")?)).map(|x| x.member_count),
        Some(3)
    );
    assert_eq!(
        get(&kv, |t| Ok(m.user_groups(t, "c")?)),
        vec![("g".to_string(), 3)]
    );
    let removed = write(&kv, |t| {
        Ok(m.remove_members(t, "g", &["b".into(), "zz".into()])?)
    });
    assert_eq!(removed, vec!["b".to_string()]);
    assert!(get(&kv, |t| Ok(m.user_groups(t, "b")?)).is_empty());
    assert_eq!(
        get(&kv, |t| Ok(m.meta(t, "g")?)).map(|x| x.member_count),
        Some(2)
    );
}

#[test]
fn dedupe_threads_reactions_and_last_seen() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    let first = DedupeRecord {
        seq: 5,
        sent_at_ms: 9,
    };
    let retry = DedupeRecord {
        seq: 6,
        sent_at_ms: 10,
    };
    assert_eq!(get(&kv, |t| Ok(m.dedupe_indexed(t, "g")?)), None);
    let inserted = write(&kv, |t| {
        Ok((
            m.insert_dedupe(t, "g", "u", "c1", &first)?,
            // The same send again, in the same transaction: refused.
            m.insert_dedupe(t, "g", "u", "c1", &retry)?,
            m.insert_dedupe(t, "g", "u", "taken-back", &retry)?,
        ))
    });
    assert_eq!(inserted, (true, false, true));
    write(&kv, |t| {
        // A committed record refuses a retry too, and keeps its outcome.
        assert!(!m.insert_dedupe(t, "g", "u", "c1", &retry)?);
        m.clear_dedupe(t, "g", "u", "taken-back")?;
        m.put_dedupe(t, "g", "u", "c2", &retry)?;
        m.set_dedupe_indexed(t, "g", 5)?;
        m.set_dedupe_indexed(t, "g2", 0)?;
        for s in [11, 12, 15] {
            m.put_thread(t, "g", 10, s)?;
        }
        m.put_thread(t, "g", 100, 101)?;
        m.set_last_seen(t, "u", 77)?;
        Ok(())
    });
    let hit = get(&kv, |t| Ok(m.dedupe(t, "g", "u", "c1")?));
    assert_eq!(hit.map(|d| (d.seq, d.sent_at_ms)), Some((5, 9)));
    assert!(get(&kv, |t| Ok(m.dedupe(t, "g", "other", "c1")?)).is_none());
    assert!(get(&kv, |t| Ok(m.dedupe(t, "g", "u", "taken-back")?)).is_none());
    let put = get(&kv, |t| Ok(m.dedupe(t, "g", "u", "c2")?));
    assert_eq!(put.map(|d| d.seq), Some(6));
    assert_eq!(get(&kv, |t| Ok(m.dedupe_indexed(t, "g")?)), Some(5));
    assert_eq!(get(&kv, |t| Ok(m.dedupe_indexed(t, "g2")?)), Some(0));
    assert_eq!(
        get(&kv, |t| Ok(m.thread_seqs(t, "g", 10, 0, 2)?)),
        (vec![11, 12], true)
    );
    assert_eq!(
        get(&kv, |t| Ok(m.thread_seqs(t, "g", 10, 12, 5)?)),
        (vec![15], false)
    );
    assert!(write(&kv, |t| Ok(
        m.set_reaction(t, "g", 3, "👍", "u", true)?
    )));
    assert!(!write(&kv, |t| Ok(
        m.set_reaction(t, "g", 3, "👍", "u", true)?
    )));
    assert!(write(&kv, |t| Ok(
        m.set_reaction(t, "g", 3, "🎉", "v", true)?
    )));
    let r = get(&kv, |t| Ok(m.reactions(t, "g", 3)?));
    assert_eq!(r.len(), 2);
    assert!(write(&kv, |t| Ok(
        m.set_reaction(t, "g", 3, "👍", "u", false)?
    )));
    assert_eq!(get(&kv, |t| Ok(m.reactions(t, "g", 3)?)).len(), 1);
    assert_eq!(get(&kv, |t| Ok(m.last_seen(t, "u")?)), 77);
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    let (_d, kv) = store();
    let m = Model::new(b"t");
    write(&kv, |t| {
        // A log key whose seq is not an integer.
        t.set(&m.key(&("g", "g", "log", "abc")), b"x")?;
        t.set(&m.key(&("g", "g", "meta")), &[0xff, 0xff, 0xff])?;
        Ok(())
    });
    let head = read(&kv, |t| -> R<u64> { Ok(m.head(t, "g")?) });
    assert!(matches!(head, Err(TxError::Db(Error::Corrupt { .. }))));
    let meta = read(&kv, |t| -> R<_> { Ok(m.meta(t, "g")?) });
    assert!(matches!(meta, Err(TxError::Db(Error::Corrupt { .. }))));
}
