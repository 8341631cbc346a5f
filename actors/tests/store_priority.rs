//! The store's write lane runs at the nice value it is given, and only that
//! lane: the readers keep the process's priority. A positive value (a lower
//! priority) is what any process may set, so this runs without privileges;
//! raising it (a negative value) is the same call.

#![cfg(target_os = "linux")]

use std::sync::Arc;

use actors::{Store, StoreOptions};
use storage::sqlite::{SqliteKv, SqliteOptions};

/// The calling thread's nice value, from `/proc/thread-self/stat` (field
/// 19; the fields after the command name's closing parenthesis start at 3).
fn thread_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("reading stat");
    let after_comm = &stat[stat.rfind(')').expect("comm's closing parenthesis") + 2..];
    after_comm
        .split(' ')
        .nth(19 - 3)
        .expect("the nice field")
        .parse()
        .expect("a number")
}

/// A store on a fresh file (kept while the directory lives) and a runtime
/// to drive it.
fn store(opts: StoreOptions) -> (tempfile::TempDir, Store, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = Arc::new(
        SqliteKv::open(&dir.path().join("chat.db"), SqliteOptions::default()).expect("open"),
    );
    let store = Store::with_options(kv, opts).expect("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (dir, store, runtime)
}

#[test]
fn the_write_lane_runs_at_its_nice_value_and_readers_do_not() {
    let base = thread_nice();
    // Lower than the process's (always allowed), and within -20..=19.
    let nice = (base + 5).min(19);
    assert_ne!(nice, base, "the test process already runs at nice 19");
    let (_dir, store, runtime) = store(StoreOptions { writer_nice: nice });
    let (writer, reader) = runtime.block_on(async {
        let writer = store
            .write(|_t, _m| Ok(thread_nice()))
            .await
            .expect("write");
        let reader = store.read(|_t, _m| Ok(thread_nice())).await.expect("read");
        (writer, reader)
    });
    assert_eq!(writer, nice, "the write lane's thread");
    assert_eq!(
        reader, base,
        "a read lane's thread keeps the process's value"
    );
}

#[test]
fn by_default_the_write_lane_keeps_the_process_priority() {
    let base = thread_nice();
    let (_dir, store, runtime) = store(StoreOptions::default());
    let writer = runtime
        .block_on(store.write(|_t, _m| Ok(thread_nice())))
        .expect("write");
    assert_eq!(writer, base);
}
