//! The [`Kv`] conformance suite: the contract's semantics, written once as
//! functions over `&dyn Kv` and run against every engine that is available
//! (garage `db/test.rs` style).
//!
//! Owns no production code. Engines: the SQLite engine always (on a temp
//! file); FoundationDB with feature `fdb` when `FDB_CLUSTER_FILE` names a
//! cluster file (under a random key prefix that is cleared afterwards).
//!
//! SQLite-only tests cover what one engine instance cannot show: two
//! instances on one file, several processes on one file (the test binary
//! re-executes itself with [`CHILD_ROLE_ENV`] set to run a child writer), a
//! `kill -9` in the middle of a stream of commits, and reopening.
//!
//! What it must not do: depend on timing for correctness (only for speed),
//! or leave keys behind in a shared FoundationDB cluster.

use std::io::{BufRead, BufReader};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, TxError};
use crate::kv::{Kv, Pair, RangeOpts, TxMode, prefix_end, read, run};
use crate::sqlite::{SqliteKv, SqliteOptions, SyncMode};

/// One conformance check: gets the engine and a key prefix that no other
/// check uses; must only touch keys under that prefix.
type Check = fn(&dyn Kv, &[u8]);

/// Every check of the suite, by name.
const SUITE: &[(&str, Check)] = &[
    ("get_set_clear", get_set_clear),
    ("read_your_writes", read_your_writes),
    ("rollback_on_drop", rollback_on_drop),
    ("rollback_on_abort", rollback_on_abort),
    ("failed_txn_is_atomic", failed_txn_is_atomic),
    (
        "retry_discards_failed_attempts",
        retry_discards_failed_attempts,
    ),
    ("panic_rolls_back", panic_rolls_back),
    ("read_only_rejects_writes", read_only_rejects_writes),
    ("insert_new", insert_new),
    ("range_order_and_bounds", range_order_and_bounds),
    ("range_many_batches", range_many_batches),
    ("clear_range", clear_range),
    ("values_of_every_size", values_of_every_size),
    ("snapshot_isolation", snapshot_isolation),
    ("uncommitted_writes_invisible", uncommitted_writes_invisible),
    ("concurrent_increments", concurrent_increments),
    ("writer_reads_follow_writes", writer_reads_follow_writes),
];

/// Runs every check, each under `prefix` + its name + `\0`.
fn run_suite(kv: &dyn Kv, prefix: &[u8]) {
    let start = Instant::now();
    for (name, check) in SUITE {
        let t = Instant::now();
        let sub = [prefix, name.as_bytes(), b"\x00"].concat();
        check(kv, &sub);
        eprintln!(
            "conformance[{}] {name}: ok ({:?})",
            kv.engine(),
            t.elapsed()
        );
    }
    eprintln!(
        "conformance[{}]: {} checks passed in {:?}",
        kv.engine(),
        SUITE.len(),
        start.elapsed()
    );
}

// ---------------------------------------------------------------- helpers

/// `prefix` + `suffix`.
fn k(prefix: &[u8], suffix: &[u8]) -> Vec<u8> {
    [prefix, suffix].concat()
}

/// The end of the range of keys under `prefix` (test prefixes never are all 0xff).
fn end_of(prefix: &[u8]) -> Vec<u8> {
    prefix_end(prefix).expect("test prefix is not all 0xff")
}

/// Commits one write.
fn put(kv: &dyn Kv, key: &[u8], value: &[u8]) {
    run::<_, ()>(kv, |t| Ok(t.set(key, value)?)).expect("put");
}

/// Reads one key in its own read-only transaction.
fn get(kv: &dyn Kv, key: &[u8]) -> Option<Vec<u8>> {
    read::<_, ()>(kv, |t| Ok(t.get(key)?)).expect("get")
}

/// Reads a range in its own read-only transaction.
fn range(kv: &dyn Kv, begin: &[u8], end: &[u8], opts: RangeOpts) -> Vec<Pair> {
    read::<_, ()>(kv, |t| Ok(t.get_range(begin, end, opts)?)).expect("range")
}

/// The last key of a range, in its own read-only transaction.
fn last_key(kv: &dyn Kv, begin: &[u8], end: &[u8]) -> Option<Vec<u8>> {
    read::<_, ()>(kv, |t| Ok(t.last_key(begin, end)?)).expect("last key")
}

/// An owned value, as reads return it.
fn some(v: &[u8]) -> Option<Vec<u8>> {
    Some(v.to_vec())
}

/// A key and the last key of a range, read in a read-write transaction
/// (where the embedded engine's writer may answer from what it remembers).
fn rw_read(
    kv: &dyn Kv,
    key: &[u8],
    begin: &[u8],
    end: &[u8],
) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    run::<_, ()>(kv, |t| Ok((t.get(key)?, t.last_key(begin, end)?))).expect("read-write read")
}

/// Everything under `prefix`.
fn all(kv: &dyn Kv, prefix: &[u8]) -> Vec<Pair> {
    range(kv, prefix, &end_of(prefix), RangeOpts::forward(0))
}

fn keys(pairs: &[Pair]) -> Vec<Vec<u8>> {
    pairs.iter().map(|(key, _)| key.clone()).collect()
}

fn decode_u64(value: Option<Vec<u8>>) -> u64 {
    match value {
        None => 0,
        Some(v) => u64::from_be_bytes(v.as_slice().try_into().expect("8-byte counter")),
    }
}

/// One increment of the big-endian u64 at `key`; returns the new value.
fn increment(kv: &dyn Kv, key: &[u8]) -> u64 {
    run::<_, ()>(kv, |t| {
        let next = decode_u64(t.get(key)?) + 1;
        t.set(key, &next.to_be_bytes())?;
        Ok(next)
    })
    .expect("increment")
}

// ---------------------------------------------------------------- checks

fn get_set_clear(kv: &dyn Kv, p: &[u8]) {
    let a = k(p, b"a");
    assert_eq!(get(kv, &a), None, "missing key");
    put(kv, &a, b"1");
    assert_eq!(get(kv, &a).as_deref(), Some(&b"1"[..]));
    put(kv, &a, b"2");
    assert_eq!(get(kv, &a).as_deref(), Some(&b"2"[..]), "overwrite");

    let empty = k(p, b"empty");
    put(kv, &empty, b"");
    assert_eq!(
        get(kv, &empty),
        Some(Vec::new()),
        "empty value is not missing"
    );

    let binary = k(p, &[0x00, 0xff, 0x80, 0x00]);
    let value: Vec<u8> = (0..=255u8).collect();
    put(kv, &binary, &value);
    assert_eq!(get(kv, &binary), Some(value), "binary key and value");

    run::<_, ()>(kv, |t| Ok(t.clear(&a)?)).expect("clear");
    assert_eq!(get(kv, &a), None, "cleared");
    run::<_, ()>(kv, |t| Ok(t.clear(&k(p, b"never-written"))?)).expect("clear missing key");

    // The prefix itself (an "empty suffix" key) is a key like any other.
    put(kv, p, b"root");
    assert_eq!(get(kv, p).as_deref(), Some(&b"root"[..]));
}

fn read_your_writes(kv: &dyn Kv, p: &[u8]) {
    let (a, b, c) = (k(p, b"a"), k(p, b"b"), k(p, b"c"));
    put(kv, &c, b"old-c");
    let full = RangeOpts::forward(0);
    run::<_, ()>(kv, |t| {
        t.set(&a, b"1")?;
        assert_eq!(t.get(&a)?.as_deref(), Some(&b"1"[..]), "own set");
        t.set(&a, b"2")?;
        assert_eq!(t.get(&a)?.as_deref(), Some(&b"2"[..]), "own overwrite");
        t.set(&b, b"x")?;
        let seen = t.get_range(p, &end_of(p), full)?;
        assert_eq!(
            keys(&seen),
            vec![a.clone(), b.clone(), c.clone()],
            "own sets in range"
        );
        t.clear(&c)?;
        assert_eq!(t.get(&c)?, None, "own clear");
        let seen = t.get_range(p, &end_of(p), RangeOpts::reverse(0))?;
        assert_eq!(
            keys(&seen),
            vec![b.clone(), a.clone()],
            "own clear in reverse range"
        );
        t.clear_range(&a, &b)?;
        assert_eq!(t.get(&a)?, None, "own clear_range");
        assert_eq!(
            t.get_range(p, &end_of(p), full)?,
            vec![(b.clone(), b"x".to_vec())]
        );
        Ok(())
    })
    .expect("txn");
    assert_eq!(
        all(kv, p),
        vec![(b.clone(), b"x".to_vec())],
        "committed state"
    );
}

fn rollback_on_drop(kv: &dyn Kv, p: &[u8]) {
    let (base, x) = (k(p, b"base"), k(p, b"x"));
    put(kv, &base, b"kept");
    {
        let mut t = kv.begin(TxMode::ReadWrite).expect("begin");
        t.set(&x, b"lost").expect("set");
        t.clear(&base).expect("clear");
        assert_eq!(t.get(&x).expect("get").as_deref(), Some(&b"lost"[..]));
        t.clear_range(p, &end_of(p)).expect("clear_range");
        assert_eq!(t.get(&x).expect("get"), None);
        // Dropped here without commit.
    }
    assert_eq!(get(kv, &x), None, "dropped write not visible");
    assert_eq!(
        get(kv, &base).as_deref(),
        Some(&b"kept"[..]),
        "dropped clear not applied"
    );
    // The engine is usable right after (SQLite: the writer was rolled back).
    put(kv, &x, b"after");
    assert_eq!(get(kv, &x).as_deref(), Some(&b"after"[..]));
}

fn rollback_on_abort(kv: &dyn Kv, p: &[u8]) {
    let base = k(p, b"base");
    put(kv, &base, b"kept");
    let mut calls = 0;
    let result = run(kv, |t| {
        calls += 1;
        t.set(&k(p, b"x"), b"lost")?;
        t.clear(&base)?;
        Err::<(), _>(TxError::Abort("caller said no"))
    });
    assert!(
        matches!(result, Err(TxError::Abort("caller said no"))),
        "{result:?}"
    );
    assert_eq!(calls, 1, "an abort is not retried");
    assert_eq!(
        all(kv, p),
        vec![(base, b"kept".to_vec())],
        "nothing of the aborted txn"
    );
}

fn failed_txn_is_atomic(kv: &dyn Kv, p: &[u8]) {
    put(kv, &k(p, b"k1"), b"v1");
    let mut calls = 0;
    let result = run::<(), ()>(kv, |t| {
        calls += 1;
        for i in 0..10u8 {
            t.set(&k(p, &[b'n', i]), b"new")?;
        }
        t.set(&k(p, b"k1"), b"changed")?;
        t.clear(&k(p, b"k1"))?;
        Err(TxError::Db(Error::Engine("injected failure".into())))
    });
    assert!(
        matches!(result, Err(TxError::Db(Error::Engine(_)))),
        "{result:?}"
    );
    assert_eq!(calls, 1, "a non-retryable error is not retried");
    assert_eq!(
        all(kv, p),
        vec![(k(p, b"k1"), b"v1".to_vec())],
        "no partial writes"
    );
}

fn retry_discards_failed_attempts(kv: &dyn Kv, p: &[u8]) {
    let mut attempt = 0u8;
    let result = run::<u8, ()>(kv, |t| {
        attempt += 1;
        t.set(&k(p, &[b'a', attempt]), b"attempt")?;
        if attempt < 3 {
            // A retryable failure after some writes: `run` must start afresh.
            return Err(TxError::Db(Error::Conflict));
        }
        Ok(attempt)
    });
    assert_eq!(result.expect("third attempt commits"), 3);
    assert_eq!(
        keys(&all(kv, p)),
        vec![k(p, &[b'a', 3])],
        "only the committed attempt"
    );
}

fn panic_rolls_back(kv: &dyn Kv, p: &[u8]) {
    let x = k(p, b"x");
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        run::<(), ()>(kv, |t| {
            t.set(&x, b"lost")?;
            panic!("closure panics mid-transaction (expected by the test)");
        })
    }));
    assert!(outcome.is_err(), "the panic propagates");
    assert_eq!(get(kv, &x), None, "a panicking txn commits nothing");
    put(kv, &x, b"after");
    assert_eq!(
        get(kv, &x).as_deref(),
        Some(&b"after"[..]),
        "engine usable after a panic"
    );
}

fn read_only_rejects_writes(kv: &dyn Kv, p: &[u8]) {
    let x = k(p, b"x");
    put(kv, &x, b"v");
    let mut t = kv.begin(TxMode::ReadOnly).expect("begin");
    assert!(t.set(&k(p, b"y"), b"v").is_err(), "set in a read-only txn");
    assert!(t.clear(&x).is_err(), "clear in a read-only txn");
    assert!(
        t.clear_range(p, &end_of(p)).is_err(),
        "clear_range in a read-only txn"
    );
    assert_eq!(t.get(&x).expect("get").as_deref(), Some(&b"v"[..]));
    t.commit().expect("committing a read-only txn just ends it");
    assert_eq!(all(kv, p), vec![(x, b"v".to_vec())]);
}

fn insert_new(kv: &dyn Kv, p: &[u8]) {
    let (a, b) = (k(p, b"a"), k(p, b"b"));
    put(kv, &a, b"old");
    let seen = run::<_, ()>(kv, |t| {
        let taken = t.insert_new(&a, b"new")?;
        let free = t.insert_new(&b, b"1")?;
        // Its own write holds the key now, for this transaction too.
        let again = t.insert_new(&b, b"2")?;
        let mine = t.get(&b)?;
        t.clear(&b)?;
        let after_clear = t.insert_new(&b, b"3")?;
        Ok((taken, free, again, mine, after_clear))
    })
    .expect("insert_new");
    assert_eq!(seen, (false, true, false, Some(b"1".to_vec()), true));
    assert_eq!(
        get(kv, &a).as_deref(),
        Some(&b"old"[..]),
        "a taken key keeps its value"
    );
    assert_eq!(get(kv, &b).as_deref(), Some(&b"3"[..]));

    // Rolled back with the transaction.
    let c = k(p, b"c");
    {
        let mut t = kv.begin(TxMode::ReadWrite).expect("begin");
        assert!(t.insert_new(&c, b"v").expect("insert_new"));
    }
    assert_eq!(get(kv, &c), None, "dropped transaction");

    let mut t = kv.begin(TxMode::ReadOnly).expect("begin");
    assert!(
        t.insert_new(&c, b"v").is_err(),
        "insert_new in a read-only txn"
    );
    drop(t);
    assert_eq!(get(kv, &c), None);
}

fn range_order_and_bounds(kv: &dyn Kv, p: &[u8]) {
    // Unsigned byte order: 0x00 < 0x01 < 0x7f < 0x80 < 0xff, and a key sorts
    // before its extensions.
    let suffixes: [&[u8]; 11] = [
        &[0x80],
        &[0xff, 0xff],
        &[0x00],
        &[0x01],
        &[0xff],
        &[0x00, 0x01],
        &[],
        &[0x7f],
        &[0xff, 0x00],
        &[0x00, 0x00],
        &[0xfe, 0xff],
    ];
    run::<_, ()>(kv, |t| {
        for s in suffixes {
            // Value = suffix with a marker, to check values travel with keys.
            t.set(&k(p, s), &[s, b"!"].concat())?;
        }
        Ok(())
    })
    .expect("write");
    let mut sorted: Vec<Vec<u8>> = suffixes.iter().map(|s| k(p, s)).collect();
    sorted.sort();
    let key_of = |s: &[u8]| k(p, s);
    assert_eq!(
        sorted,
        [
            &[][..],
            &[0x00],
            &[0x00, 0x00],
            &[0x00, 0x01],
            &[0x01],
            &[0x7f],
            &[0x80],
            &[0xfe, 0xff],
            &[0xff],
            &[0xff, 0x00],
            &[0xff, 0xff]
        ]
        .map(key_of),
        "test's own expectation"
    );
    let mut reversed = sorted.clone();
    reversed.reverse();
    let end = end_of(p);

    let forward = range(kv, p, &end, RangeOpts::forward(0));
    assert_eq!(keys(&forward), sorted, "forward, unsigned order");
    for (key, value) in &forward {
        assert_eq!(value, &[&key[p.len()..], b"!"].concat(), "value of {key:?}");
    }
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::reverse(0))),
        reversed,
        "reverse"
    );
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::forward(3))),
        sorted[..3],
        "limit"
    );
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::reverse(3))),
        reversed[..3],
        "reverse limit"
    );
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::forward(100))),
        sorted,
        "limit > count"
    );
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::forward(1))),
        sorted[..1],
        "limit 1"
    );

    // Begin inclusive, end exclusive, in both directions.
    let (b, e) = (key_of(&[0x01]), key_of(&[0xff]));
    let inner = [&[0x01][..], &[0x7f], &[0x80], &[0xfe, 0xff]].map(key_of);
    assert_eq!(
        keys(&range(kv, &b, &e, RangeOpts::forward(0))),
        inner,
        "[begin, end)"
    );
    let mut inner_rev = inner.to_vec();
    inner_rev.reverse();
    assert_eq!(
        keys(&range(kv, &b, &e, RangeOpts::reverse(0))),
        inner_rev,
        "reverse [begin, end)"
    );
    assert_eq!(
        keys(&range(kv, &b, &e, RangeOpts::reverse(2))),
        inner_rev[..2],
        "reverse with limit starts at the end"
    );
    // Bounds that are not keys themselves.
    let between = range(
        kv,
        &key_of(&[0x00, 0x00, 0x00]),
        &key_of(&[0x7f, 0x00]),
        RangeOpts::forward(0),
    );
    assert_eq!(
        keys(&between),
        [&[0x00, 0x01][..], &[0x01], &[0x7f]].map(key_of)
    );

    // Prefix ranges via prefix_end, including under 0xff.
    let under = |s: &[u8]| {
        let begin = key_of(s);
        keys(&range(kv, &begin, &end_of(&begin), RangeOpts::forward(0)))
    };
    assert_eq!(
        under(&[0x00]),
        [&[0x00][..], &[0x00, 0x00], &[0x00, 0x01]].map(key_of)
    );
    assert_eq!(
        under(&[0xff]),
        [&[0xff][..], &[0xff, 0x00], &[0xff, 0xff]].map(key_of)
    );
    assert_eq!(under(&[0xfe]), [key_of(&[0xfe, 0xff])]);

    // Empty and inverted ranges are empty, not errors.
    assert!(
        range(kv, &b, &b, RangeOpts::forward(0)).is_empty(),
        "begin == end"
    );
    assert!(
        range(kv, &e, &b, RangeOpts::forward(0)).is_empty(),
        "begin > end"
    );
    assert!(
        range(kv, &e, &b, RangeOpts::reverse(5)).is_empty(),
        "begin > end, reverse"
    );

    // The last key of a range: the end is exclusive, bounds need not be
    // keys, an empty or inverted range has none.
    assert_eq!(last_key(kv, p, &end), sorted.last().cloned(), "last key");
    assert_eq!(
        last_key(kv, &b, &e),
        Some(key_of(&[0xfe, 0xff])),
        "end excluded"
    );
    assert_eq!(
        last_key(kv, &key_of(&[0x00, 0x00, 0x00]), &key_of(&[0x7f, 0x00])),
        Some(key_of(&[0x7f]))
    );
    assert_eq!(last_key(kv, &b, &b), None, "empty range");
    assert_eq!(last_key(kv, &e, &b), None, "inverted range");
    // It sees the transaction's own writes and clears.
    type Seen = (Option<Vec<u8>>, Option<Vec<u8>>);
    let result = run::<(), Seen>(kv, |t| {
        t.set(&key_of(&[0xfe, 0xff, 0x01]), b"new")?;
        let after_set = t.last_key(&b, &e)?;
        t.clear_range(&key_of(&[0x80]), &e)?;
        let after_clear = t.last_key(&b, &e)?;
        Err(TxError::Abort((after_set, after_clear)))
    });
    let Err(TxError::Abort((seen_set, seen_clear))) = result else {
        panic!("the transaction should abort with what it saw: {result:?}");
    };
    assert_eq!(seen_set, Some(key_of(&[0xfe, 0xff, 0x01])), "own write");
    assert_eq!(seen_clear, Some(key_of(&[0x7f])), "own clear");
    assert_eq!(last_key(kv, &b, &e), Some(key_of(&[0xfe, 0xff])), "aborted");
}

fn range_many_batches(kv: &dyn Kv, p: &[u8]) {
    // Enough data that FoundationDB returns it in several batches.
    const N: u16 = 600;
    let value = vec![0xa5u8; 512];
    run::<_, ()>(kv, |t| {
        for i in 0..N {
            t.set(&k(p, &i.to_be_bytes()), &value)?;
        }
        Ok(())
    })
    .expect("write");
    let expected: Vec<Vec<u8>> = (0..N).map(|i| k(p, &i.to_be_bytes())).collect();
    let end = end_of(p);
    let forward = range(kv, p, &end, RangeOpts::forward(0));
    assert_eq!(keys(&forward), expected, "all, in order");
    assert!(forward.iter().all(|(_, v)| *v == value), "values");
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::forward(450))),
        expected[..450]
    );
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(keys(&range(kv, p, &end, RangeOpts::reverse(0))), reversed);
    assert_eq!(
        keys(&range(kv, p, &end, RangeOpts::reverse(333))),
        reversed[..333]
    );
    // A range starting in the middle.
    let mid = k(p, &300u16.to_be_bytes());
    assert_eq!(
        keys(&range(kv, &mid, &end, RangeOpts::forward(0))),
        expected[300..]
    );
    assert_eq!(
        keys(&range(kv, p, &mid, RangeOpts::reverse(10))),
        reversed[300..310],
        "reverse from an exclusive end"
    );
}

fn clear_range(kv: &dyn Kv, p: &[u8]) {
    run::<_, ()>(kv, |t| {
        for c in b'a'..=b'j' {
            t.set(&k(p, &[c]), &[c])?;
        }
        t.set(&k(p, b"c\x00"), b"c0")?;
        Ok(())
    })
    .expect("write");
    run::<_, ()>(kv, |t| Ok(t.clear_range(&k(p, b"c"), &k(p, b"f"))?)).expect("clear c..f");
    let left: Vec<Vec<u8>> = [b"a", b"b", b"f", b"g", b"h", b"i", b"j"]
        .iter()
        .map(|s| k(p, *s))
        .collect();
    assert_eq!(
        keys(&all(kv, p)),
        left,
        "begin inclusive (c, c\\0 gone), end exclusive (f kept)"
    );
    // Empty and inverted ranges clear nothing.
    run::<_, ()>(kv, |t| {
        t.clear_range(&k(p, b"g"), &k(p, b"g"))?;
        t.clear_range(&k(p, b"j"), &k(p, b"a"))?;
        Ok(())
    })
    .expect("no-op clears");
    assert_eq!(keys(&all(kv, p)), left);
    // A prefix range clears exactly the prefix.
    let sibling = end_of(p);
    put(kv, &sibling, b"outside");
    run::<_, ()>(kv, |t| Ok(t.clear_range(p, &end_of(p))?)).expect("clear all");
    assert!(all(kv, p).is_empty(), "prefix cleared");
    assert_eq!(
        get(kv, &sibling).as_deref(),
        Some(&b"outside"[..]),
        "end is exclusive"
    );
    run::<_, ()>(kv, |t| Ok(t.clear(&sibling)?)).expect("cleanup");
}

/// Value lengths around the sizes engines treat differently: SQLite keeps
/// values of 128 bytes or more out of its key tree, and spills to overflow
/// pages what does not fit in a cell (4 KiB pages: ~1 KB in the key tree,
/// ~4 KB in the table of long values); FoundationDB allows
/// values up to 100,000 bytes (the largest here stays under that).
const VALUE_SIZES: &[usize] = &[0, 1, 127, 128, 129, 1_000, 4_100, 90_000];

/// A value of `len` bytes that also says which `round` wrote it.
fn sized_value(len: usize, round: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round))
        .collect()
}

fn values_of_every_size(kv: &dyn Kv, p: &[u8]) {
    let key = |i: usize| k(p, &[b'v', i as u8]);
    // Round 0 writes each size; rounds 1 and 2 overwrite every key with the
    // sizes shifted by one, so each key goes from short to long and back.
    for round in 0..3u8 {
        let n = VALUE_SIZES.len();
        let want: Vec<Pair> = (0..n)
            .map(|i| {
                let len = VALUE_SIZES[(i + usize::from(round)) % n];
                (key(i), sized_value(len, round))
            })
            .collect();
        run::<_, ()>(kv, |t| {
            for (key, value) in &want {
                t.set(key, value)?;
            }
            Ok(())
        })
        .expect("write");
        for (key, value) in &want {
            assert_eq!(get(kv, key).as_ref(), Some(value), "round {round}");
        }
        assert_eq!(all(kv, p), want, "forward range, round {round}");
        let mut reversed = want.clone();
        reversed.reverse();
        let end = end_of(p);
        assert_eq!(
            range(kv, p, &end, RangeOpts::reverse(0)),
            reversed,
            "reverse range, round {round}"
        );
        assert_eq!(
            last_key(kv, p, &end),
            reversed.first().map(|(key, _)| key.clone()),
            "last key, round {round}"
        );
    }

    // insert_new of a long value: refused on a taken key (which keeps its
    // value), accepted on a free one; rolled back with its transaction.
    let long = sized_value(1_000, 9);
    let before = get(kv, &key(0));
    let (taken, free) = run::<_, ()>(kv, |t| {
        Ok((
            t.insert_new(&key(0), &long)?,
            t.insert_new(&k(p, b"new"), &long)?,
        ))
    })
    .expect("insert_new");
    assert_eq!((taken, free), (false, true));
    assert_eq!(get(kv, &key(0)), before, "a taken key keeps its value");
    assert_eq!(get(kv, &k(p, b"new")), Some(long.clone()));
    {
        let mut t = kv.begin(TxMode::ReadWrite).expect("begin");
        t.set(&key(1), &long).expect("set");
        t.set(&k(p, b"dropped"), &long).expect("set");
    }
    assert_ne!(get(kv, &key(1)), Some(long.clone()), "rolled back");
    assert_eq!(get(kv, &k(p, b"dropped")), None, "rolled back");

    // Clearing one key, then the rest by range.
    run::<_, ()>(kv, |t| Ok(t.clear(&key(2))?)).expect("clear");
    assert_eq!(get(kv, &key(2)), None);
    run::<_, ()>(kv, |t| Ok(t.clear_range(p, &end_of(p))?)).expect("clear range");
    assert!(all(kv, p).is_empty(), "prefix cleared");
}

fn snapshot_isolation(kv: &dyn Kv, p: &[u8]) {
    let (a, b) = (k(p, b"a"), k(p, b"b"));
    put(kv, &a, b"v1");
    let mut snap = kv.begin(TxMode::ReadOnly).expect("begin");
    assert_eq!(
        snap.get(&a).expect("get").as_deref(),
        Some(&b"v1"[..]),
        "first read"
    );
    // Committed by another transaction after the snapshot's first read.
    run::<_, ()>(kv, |t| {
        t.set(&a, b"v2")?;
        t.set(&b, b"new")?;
        Ok(())
    })
    .expect("concurrent write");
    assert_eq!(
        snap.get(&a).expect("get").as_deref(),
        Some(&b"v1"[..]),
        "still the snapshot"
    );
    assert_eq!(snap.get(&b).expect("get"), None, "later insert not seen");
    let seen = snap
        .get_range(p, &end_of(p), RangeOpts::forward(0))
        .expect("range");
    assert_eq!(
        seen,
        vec![(a.clone(), b"v1".to_vec())],
        "range reads the same snapshot"
    );
    drop(snap);
    assert_eq!(
        get(kv, &a).as_deref(),
        Some(&b"v2"[..]),
        "a new txn sees the write"
    );
    assert_eq!(get(kv, &b).as_deref(), Some(&b"new"[..]));
}

fn uncommitted_writes_invisible(kv: &dyn Kv, p: &[u8]) {
    let x = k(p, b"x");
    let mut writer = kv.begin(TxMode::ReadWrite).expect("begin rw");
    writer.set(&x, b"pending").expect("set");
    assert_eq!(get(kv, &x), None, "not visible before commit");
    writer.commit().expect("commit");
    assert_eq!(
        get(kv, &x).as_deref(),
        Some(&b"pending"[..]),
        "visible after commit"
    );
}

fn concurrent_increments(kv: &dyn Kv, p: &[u8]) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 25;
    let counter = k(p, b"counter");
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..PER_THREAD {
                    increment(kv, &counter);
                }
            });
        }
    });
    assert_eq!(
        decode_u64(get(kv, &counter)),
        THREADS * PER_THREAD,
        "no lost updates"
    );
}

// ---------------------------------------------------------------- engine runs

/// Reads in read-write transactions see every write before them: the
/// transaction's own (set, insert, clear, range clear), earlier commits,
/// and nothing of a transaction rolled back or aborted. (The embedded
/// engine's writer remembers what it read between transactions: this is
/// the contract it must keep.)
fn writer_reads_follow_writes(kv: &dyn Kv, p: &[u8]) {
    let key = k(p, b"fence");
    let (begin, end) = (k(p, b"log/"), k(p, b"log0"));
    let log = |n: u8| k(p, &[b'l', b'o', b'g', b'/', n]);
    assert_eq!(rw_read(kv, &key, &begin, &end), (None, None));
    put(kv, &key, b"1");
    put(kv, &log(1), b"x");
    assert_eq!(rw_read(kv, &key, &begin, &end), (some(b"1"), Some(log(1))));
    // Committed writes, read again in the next transaction.
    run::<_, ()>(kv, |t| {
        t.set(&key, b"2")?;
        t.set(&log(3), b"z")?;
        // Below the last key: the last key stays.
        t.set(&log(2), b"y")?;
        Ok(())
    })
    .expect("write");
    assert_eq!(rw_read(kv, &key, &begin, &end), (some(b"2"), Some(log(3))));
    // Rolled back by a drop and by an abort: as if never written.
    {
        let mut t = kv.begin(TxMode::ReadWrite).expect("begin");
        assert_eq!(t.get(&key).expect("get"), some(b"2"));
        t.set(&key, b"dropped").expect("set");
        t.set(&log(9), b"dropped").expect("set");
        assert_eq!(t.get(&key).expect("get"), some(b"dropped"));
        assert_eq!(t.last_key(&begin, &end).expect("last"), Some(log(9)));
    }
    let aborted = run::<(), &str>(kv, |t| {
        t.set(&key, b"aborted")?;
        t.clear(&log(3))?;
        assert_eq!(t.last_key(&begin, &end)?, Some(log(2)));
        Err(TxError::Abort("no"))
    });
    assert!(matches!(aborted, Err(TxError::Abort("no"))));
    assert_eq!(rw_read(kv, &key, &begin, &end), (some(b"2"), Some(log(3))));
    // Inserts, clears and range clears, seen inside the transaction and
    // after it.
    run::<_, ()>(kv, |t| {
        assert!(!t.insert_new(&key, b"taken")?);
        assert!(t.insert_new(&log(4), b"w")?);
        assert_eq!(t.last_key(&begin, &end)?, Some(log(4)));
        t.clear(&log(4))?;
        assert_eq!(t.last_key(&begin, &end)?, Some(log(3)));
        t.clear_range(&log(3), &end)?;
        assert_eq!(t.last_key(&begin, &end)?, Some(log(2)));
        Ok(())
    })
    .expect("write");
    assert_eq!(rw_read(kv, &key, &begin, &end), (some(b"2"), Some(log(2))));
    run::<_, ()>(kv, |t| {
        t.clear(&key)?;
        Ok(t.clear_range(&begin, &end)?)
    })
    .expect("clear");
    assert_eq!(rw_read(kv, &key, &begin, &end), (None, None));
    assert_eq!(get(kv, &key), None);
}

#[test]
fn prefix_end_cases() {
    assert_eq!(prefix_end(b"abc"), Some(b"abd".to_vec()));
    assert_eq!(prefix_end(&[0x01, 0xff]), Some(vec![0x02]));
    assert_eq!(prefix_end(&[0x00]), Some(vec![0x01]));
    assert_eq!(prefix_end(&[0x61, 0xff, 0xff]), Some(vec![0x62]));
    assert_eq!(prefix_end(&[0xfe]), Some(vec![0xff]));
    assert_eq!(prefix_end(&[0xff]), None);
    assert_eq!(prefix_end(&[0xff, 0xff]), None);
    assert_eq!(prefix_end(b""), None);
    // Every extension of the prefix sorts below the end, the end above it.
    let prefix = [0x10, 0xff];
    let end = prefix_end(&prefix).expect("end");
    for ext in [&[][..], &[0x00], &[0xff, 0xff, 0xff]] {
        assert!([&prefix[..], ext].concat() < end);
    }
}

fn temp_db() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kv.db");
    (dir, path)
}

#[test]
fn sqlite_conformance() {
    let (_dir, path) = temp_db();
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
    assert_eq!(kv.engine(), "sqlite");
    run_suite(&kv, b"");
}

#[test]
fn sqlite_conformance_normal_sync_one_reader() {
    let (_dir, path) = temp_db();
    let opts = SqliteOptions {
        sync: SyncMode::Normal,
        readers: 1,
    };
    let kv = SqliteKv::open(&path, opts).expect("open");
    run_suite(&kv, b"conformance\x00");
}

#[test]
fn sqlite_reopen_keeps_commits() {
    let (_dir, path) = temp_db();
    {
        let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
        put(&kv, b"k", b"v");
        // An uncommitted write at drop time must not survive.
        let mut t = kv.begin(TxMode::ReadWrite).expect("begin");
        t.set(b"uncommitted", b"x").expect("set");
        drop(t);
    }
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(get(&kv, b"k").as_deref(), Some(&b"v"[..]));
    assert_eq!(get(&kv, b"uncommitted"), None);
}

/// Commits do not checkpoint (no auto-checkpoint in the writer's COMMIT):
/// the background checkpointer copies the WAL into the database file soon
/// after, while the store stays open, and every commit stays readable.
#[test]
fn sqlite_checkpoints_in_the_background() {
    let (_dir, path) = temp_db();
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
    let db_len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let before = db_len();
    let value = vec![7u8; 4_000];
    for i in 0..300u32 {
        let mut t = kv.begin(TxMode::ReadWrite).expect("begin");
        let key = [&b"c"[..], &i.to_be_bytes()].concat();
        t.set(&key, &value).expect("set");
        t.commit().expect("commit");
    }
    // ~1.2 MB of pages went to the WAL; the checkpointer (every 100 ms)
    // moves them into the database file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while db_len() < before + 1_000_000 {
        assert!(
            Instant::now() < deadline,
            "database file still {} bytes (was {before}): no background checkpoint",
            db_len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(all(&kv, b"c").len(), 300);
}

/// The rows of `kv_values` (long values, kept out of the key tree) that no
/// key points at, and the keys that point at no row: both must be none.
fn sqlite_value_orphans(path: &Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(path).expect("open");
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).expect(sql);
    (
        count(
            "SELECT count(*) FROM kv_values v WHERE NOT EXISTS \
             (SELECT 1 FROM kv WHERE typeof(kv.value) = 'integer' AND kv.value = v.id)",
        ),
        count(
            "SELECT count(*) FROM kv WHERE typeof(kv.value) = 'integer' AND NOT EXISTS \
             (SELECT 1 FROM kv_values v WHERE v.id = kv.value)",
        ),
    )
}

/// Every overwrite, clear and range clear of a long value also deletes its
/// `kv_values` row: after the suite's checks of every value size (which end
/// with all their keys cleared) and a set of long values overwritten by
/// short ones and back, nothing is left over and nothing is missing.
#[test]
fn sqlite_long_values_leave_no_orphans() {
    let (_dir, path) = temp_db();
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
    values_of_every_size(&kv, b"sizes\x00");
    for round in 0..4u8 {
        run::<_, ()>(&kv, |t| {
            for i in 0..50u8 {
                let len = if (i + round) % 2 == 0 { 300 } else { 10 };
                t.set(&[b'o', i], &sized_value(len, round))?;
            }
            Ok(())
        })
        .expect("write");
    }
    let count_rows = |table: &str| -> i64 {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    };
    assert_eq!(count_rows("kv_values"), 25, "one row per long value");
    assert_eq!(sqlite_value_orphans(&path), (0, 0));
    run::<_, ()>(&kv, |t| Ok(t.clear_range(b"o", b"p")?)).expect("clear");
    assert_eq!(count_rows("kv_values"), 0, "cleared with their keys");
    assert_eq!(sqlite_value_orphans(&path), (0, 0));
}

/// A file written before long values moved out of the key tree (a `kv`
/// table only, every value inline) opens, reads as before, and takes long
/// values from then on.
#[test]
fn sqlite_opens_a_file_of_the_older_schema() {
    let (_dir, path) = temp_db();
    let long = sized_value(500, 1);
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;\
             CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
        )
        .expect("old schema");
        conn.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2), (?3, ?4)",
            rusqlite::params![&b"old-long"[..], &long, &b"old-short"[..], &b"s"[..]],
        )
        .expect("old rows");
    }
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
    assert_eq!(get(&kv, b"old-long"), Some(long.clone()));
    assert_eq!(get(&kv, b"old-short").as_deref(), Some(&b"s"[..]));
    put(&kv, b"new-long", &long);
    put(&kv, b"old-long", &sized_value(700, 2));
    assert_eq!(get(&kv, b"new-long"), Some(long));
    assert_eq!(get(&kv, b"old-long"), Some(sized_value(700, 2)));
    assert_eq!(sqlite_value_orphans(&path), (0, 0));
}

#[test]
fn sqlite_concurrent_open_of_a_new_file() {
    let (_dir, path) = temp_db();
    std::thread::scope(|s| {
        for i in 0..4u8 {
            let path = &path;
            s.spawn(move || {
                let kv = SqliteKv::open(path, SqliteOptions::default()).expect("open");
                put(&kv, &[b'k', i], b"v");
            });
        }
    });
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
    assert_eq!(all(&kv, b"k").len(), 4);
}

/// Two instances of the engine on one new file (to SQLite, two processes'
/// connections), with the directory that holds it.
fn two_instances() -> (tempfile::TempDir, SqliteKv, SqliteKv) {
    let (dir, path) = temp_db();
    let one = SqliteKv::open(&path, SqliteOptions::default()).expect("open one");
    let two = SqliteKv::open(&path, SqliteOptions::default()).expect("open two");
    (dir, one, two)
}

#[test]
fn sqlite_two_instances_on_one_file() {
    let (_dir, one, two) = two_instances();

    put(&one, b"a", b"from one");
    assert_eq!(
        get(&two, b"a").as_deref(),
        Some(&b"from one"[..]),
        "visible across instances"
    );

    // Snapshot isolation across instances.
    let mut snap = two.begin(TxMode::ReadOnly).expect("begin");
    assert_eq!(
        snap.get(b"a").expect("get").as_deref(),
        Some(&b"from one"[..])
    );
    put(&one, b"a", b"newer");
    assert_eq!(
        snap.get(b"a").expect("get").as_deref(),
        Some(&b"from one"[..])
    );
    drop(snap);

    // Each instance's writer blocks the other's (BEGIN IMMEDIATE), so
    // interleaved increments lose nothing.
    const PER_THREAD: u64 = 25;
    std::thread::scope(|s| {
        for kv in [&one, &two, &one, &two] {
            s.spawn(move || {
                for _ in 0..PER_THREAD {
                    increment(kv, b"counter");
                }
            });
        }
    });
    assert_eq!(decode_u64(get(&one, b"counter")), 4 * PER_THREAD);
    assert_eq!(decode_u64(get(&two, b"counter")), 4 * PER_THREAD);

    // An open write transaction in one instance makes the other's writer
    // wait (not fail) until it ends.
    let mut holder = one.begin(TxMode::ReadWrite).expect("begin");
    holder.set(b"held", b"1").expect("set");
    let waited = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let start = Instant::now();
            put(&two, b"after", b"1");
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        holder.commit().expect("commit");
        waiter.join().expect("waiter")
    });
    assert!(
        waited >= Duration::from_millis(90),
        "the second writer waited ({waited:?})"
    );
    assert_eq!(get(&two, b"held").as_deref(), Some(&b"1"[..]));
    assert_eq!(get(&one, b"after").as_deref(), Some(&b"1"[..]));
}

/// The writer remembers what its transactions read only while nobody
/// else commits: another instance's commits (another process, as far as
/// SQLite can tell) are read afresh, whether they changed a value, added a
/// last key or removed one.
#[test]
fn sqlite_writer_reads_see_other_instances() {
    let (_dir, one, two) = two_instances();
    put(&one, b"e", b"1");
    put(&one, b"log/1", b"x");
    let read_one = || rw_read(&one, b"e", b"log/", b"log0");
    assert_eq!(read_one(), (some(b"1"), some(b"log/1")));
    assert_eq!(read_one(), (some(b"1"), some(b"log/1")), "unchanged");
    put(&two, b"e", b"2");
    put(&two, b"log/2", b"y");
    assert_eq!(read_one(), (some(b"2"), some(b"log/2")));
    run::<_, ()>(&two, |t| {
        t.clear(b"log/2")?;
        Ok(t.clear(b"e")?)
    })
    .expect("clear");
    assert_eq!(read_one(), (None, some(b"log/1")));
    // And the other way round, after `one`'s own commit.
    run::<_, ()>(&one, |t| Ok(t.set(b"log/3", b"z")?)).expect("write");
    assert_eq!(
        rw_read(&two, b"e", b"log/", b"log0"),
        (None, some(b"log/3"))
    );
    put(&two, b"e", b"3");
    assert_eq!(read_one(), (some(b"3"), some(b"log/3")));
}

#[test]
fn sqlite_lock_wait_ends_in_timeout() {
    let (_dir, one, two) = two_instances();
    crate::sqlite::set_busy_deadline_for_this_thread(Duration::from_millis(200));
    let mut holder = one.begin(TxMode::ReadWrite).expect("begin");
    holder.set(b"held", b"1").expect("set");

    // Another instance (process): SQLite's busy handler gives up.
    let start = Instant::now();
    let err = two
        .begin(TxMode::ReadWrite)
        .err()
        .expect("write lock is held");
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() >= Duration::from_millis(190),
        "{:?}",
        start.elapsed()
    );
    // The same instance: waiting for the writer connection gives up too,
    // instead of deadlocking.
    let err = one.begin(TxMode::ReadWrite).err().expect("writer is taken");
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    // Readers are not blocked by a writer.
    assert_eq!(get(&two, b"held"), None);

    holder.commit().expect("commit");
    crate::sqlite::set_busy_deadline_for_this_thread(crate::sqlite::BUSY_DEADLINE);
    put(&two, b"after", b"1");
    assert_eq!(get(&two, b"held").as_deref(), Some(&b"1"[..]));
}

// ---------------------------------------------------------------- child processes

/// Set in a child process of a multi-process test to its role
/// ([`ROLE_INCREMENT`] or [`ROLE_STREAM`]).
const CHILD_ROLE_ENV: &str = "STORAGE_CONFORMANCE_CHILD_ROLE";
/// The database file a child process opens.
const CHILD_DB_ENV: &str = "STORAGE_CONFORMANCE_CHILD_DB";
/// How many increments a child does.
const CHILD_COUNT_ENV: &str = "STORAGE_CONFORMANCE_CHILD_COUNT";
/// Child role: do `count` increments of `counter`, then exit.
const ROLE_INCREMENT: &str = "increment";
/// Child role: commit `log/<n>` and the counter `n` in one transaction, print
/// `ACKED=<n>` after each commit, until killed (or `count` commits).
const ROLE_STREAM: &str = "stream";
/// The child test's full name, for `--exact`.
const CHILD_TEST: &str = "conformance::sqlite_child_process";

/// The body of a child process; a no-op pass when run as a normal test.
#[test]
fn sqlite_child_process() {
    let Ok(role) = std::env::var(CHILD_ROLE_ENV) else {
        return;
    };
    let path = std::env::var(CHILD_DB_ENV).expect("db path");
    let count: u64 = std::env::var(CHILD_COUNT_ENV)
        .expect("count")
        .parse()
        .expect("count is a number");
    let kv = SqliteKv::open(Path::new(&path), SqliteOptions::default()).expect("child open");
    match role.as_str() {
        ROLE_INCREMENT => {
            for _ in 0..count {
                increment(&kv, b"counter");
            }
        }
        ROLE_STREAM => {
            for _ in 0..count {
                let n = run::<_, ()>(&kv, |t| {
                    let n = decode_u64(t.get(b"counter")?) + 1;
                    t.set(b"counter", &n.to_be_bytes())?;
                    t.set(&stream_log_key(n), &n.to_be_bytes())?;
                    Ok(n)
                })
                .expect("stream commit");
                // Printed (line-buffered) only after the commit returned.
                println!("ACKED={n}");
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

fn stream_log_key(n: u64) -> Vec<u8> {
    k(b"log/", &n.to_be_bytes())
}

/// Starts this test binary as a child running [`sqlite_child_process`].
fn spawn_child(role: &str, path: &Path, count: u64) -> std::process::Child {
    let exe = std::env::current_exe().expect("current exe");
    Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE_ENV, role)
        .env(CHILD_DB_ENV, path)
        .env(CHILD_COUNT_ENV, count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child")
}

fn wait_ok(child: std::process::Child) {
    let out = child.wait_with_output().expect("wait child");
    assert!(
        out.status.success(),
        "child failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 passed"),
        "the child ran its test: {stdout}"
    );
}

#[test]
fn sqlite_multi_process_increments() {
    const PER_PROCESS: u64 = 200;
    let (_dir, path) = temp_db();
    let start = Instant::now();
    // Children start before the file exists: creation races too.
    let children = [
        spawn_child(ROLE_INCREMENT, &path, PER_PROCESS),
        spawn_child(ROLE_INCREMENT, &path, PER_PROCESS),
    ];
    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("open");
    for _ in 0..PER_PROCESS {
        increment(&kv, b"counter");
    }
    for child in children {
        wait_ok(child);
    }
    eprintln!(
        "3 processes x {PER_PROCESS} increments in {:?}",
        start.elapsed()
    );
    assert_eq!(
        decode_u64(get(&kv, b"counter")),
        3 * PER_PROCESS,
        "no lost updates across processes"
    );
}

#[test]
fn sqlite_survives_kill_9_mid_stream() {
    const KILL_AFTER_ACKS: u64 = 30;
    const CHILD_BOUND: u64 = 100_000;
    let (_dir, path) = temp_db();
    let mut child = spawn_child(ROLE_STREAM, &path, CHILD_BOUND);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut last_acked = 0u64;
    let mut killed = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child stdout");
        // libtest may print "test <name> ... " on the same line first.
        if let Some(n) = line.split("ACKED=").nth(1) {
            let n: u64 = n.trim().parse().expect("ack number");
            assert_eq!(n, last_acked + 1, "acks are consecutive");
            last_acked = n;
        }
        if !killed && last_acked >= KILL_AFTER_ACKS {
            child.kill().expect("SIGKILL the child");
            killed = true;
        }
        // Keep reading: acks printed before the kill are still in the pipe.
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        killed,
        "child ended before {KILL_AFTER_ACKS} acks: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let kv = SqliteKv::open(&path, SqliteOptions::default()).expect("reopen after kill");
    let counter = decode_u64(get(&kv, b"counter"));
    eprintln!("killed after ack {last_acked}; counter after reopen: {counter}");
    // The commit in flight at the kill may or may not have landed; every
    // acknowledged one has.
    assert!(
        counter == last_acked || counter == last_acked + 1,
        "counter {counter}, last acked {last_acked}"
    );
    let log = all(&kv, b"log/");
    let expected: Vec<Vec<u8>> = (1..=counter).map(stream_log_key).collect();
    assert_eq!(keys(&log), expected, "every committed log entry, no gaps");
    put(&kv, b"writable", b"after crash");
}

// ---------------------------------------------------------------- FoundationDB

/// Owns the FoundationDB engine for the test: clears the test's key prefix
/// and stops the network when dropped, even if a check panicked.
#[cfg(feature = "fdb")]
struct FdbFixture {
    kv: Option<crate::fdb::FdbKv>,
    prefix: Vec<u8>,
}

#[cfg(feature = "fdb")]
impl Drop for FdbFixture {
    fn drop(&mut self) {
        if let Some(kv) = self.kv.take() {
            let end = end_of(&self.prefix);
            if let Err(e) = run::<_, ()>(&kv, |t| Ok(t.clear_range(&self.prefix, &end)?)) {
                eprintln!("fdb conformance: cleanup of the test prefix failed: {e:?}");
            }
        }
        crate::fdb::stop_network();
    }
}

#[cfg(feature = "fdb")]
#[test]
fn fdb_conformance() {
    let Ok(cluster_file) = std::env::var("FDB_CLUSTER_FILE") else {
        eprintln!("fdb_conformance skipped: FDB_CLUSTER_FILE not set");
        return;
    };
    let kv = crate::fdb::FdbKv::open(Some(&cluster_file)).expect("open FoundationDB");
    assert_eq!(kv.engine(), "foundationdb");
    // Unique per run, so runs on a shared cluster never see each other.
    let prefix = format!("storage-conformance-{:016x}\x00", rand::random::<u64>()).into_bytes();
    let fixture = FdbFixture {
        kv: Some(kv),
        prefix,
    };
    let kv = fixture.kv.as_ref().expect("set above");
    run_suite(kv, &fixture.prefix);
    assert!(
        !all(kv, &fixture.prefix).is_empty(),
        "the suite wrote under its prefix"
    );
    drop(fixture);
}

/// The bundled SQLite is built with `.cargo/config.toml`'s
/// `LIBSQLITE3_FLAGS`: no unified page cache behind one global mutex
/// (`SQLITE_ENABLE_MEMORY_MANAGEMENT`, rusqlite's default) and no memory
/// statistics (a global mutex on every allocation). A build that lost
/// those flags (say, from outside the workspace) still works, only slower
/// on the commit writer; this says so instead of letting it pass unseen.
#[test]
fn sqlite_is_built_without_global_allocation_locks() {
    let conn = rusqlite::Connection::open_in_memory().expect("open");
    let used = |opt: &str| -> bool {
        conn.query_row("SELECT sqlite_compileoption_used(?1)", [opt], |r| r.get(0))
            .expect(opt)
    };
    assert!(
        !used("ENABLE_MEMORY_MANAGEMENT"),
        "SQLite built with ENABLE_MEMORY_MANAGEMENT: was LIBSQLITE3_FLAGS from .cargo/config.toml applied?"
    );
    assert!(
        used("DEFAULT_MEMSTATUS=0"),
        "SQLite built with memory statistics on: was LIBSQLITE3_FLAGS from .cargo/config.toml applied?"
    );
}
