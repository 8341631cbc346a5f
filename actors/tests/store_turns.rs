//! The store's lanes: at most `Kv::parallelism` transactions of each mode
//! run at once, the rest wait in order, and reads and writes wait apart (a
//! write queued behind a burst of reads would finish after nearly all of
//! them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actors::Store;
use storage::sqlite::{SqliteKv, SqliteOptions};
use storage::{Kv, TxMode};

/// Reads in the burst; each holds its transaction for [`READ_HOLD`].
const READS: usize = 64;
const READ_HOLD: Duration = Duration::from_millis(20);

#[test]
fn reads_are_bounded_and_writes_do_not_wait_behind_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = Arc::new(
        SqliteKv::open(&dir.path().join("chat.db"), SqliteOptions::default()).expect("open"),
    );
    let readers = kv.parallelism(TxMode::ReadOnly);
    let writers = kv.parallelism(TxMode::ReadWrite);
    assert_eq!((readers, writers), (SqliteOptions::default().readers, 1));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Store::new(kv).expect("store");

    runtime.block_on(async move {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let reads_done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..READS {
            let (store, running, most, done) = (
                store.clone(),
                running.clone(),
                most.clone(),
                reads_done.clone(),
            );
            tasks.push(tokio::spawn(async move {
                store
                    .read(move |_t, _m| {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(READ_HOLD);
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
                    .expect("read");
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        // Let the burst queue up, then write.
        tokio::time::sleep(READ_HOLD).await;
        store
            .write(|t, _m| {
                t.set(b"turns/written", b"1")?;
                Ok(())
            })
            .await
            .expect("write");
        let reads_before_write = reads_done.load(Ordering::SeqCst);
        for task in tasks {
            task.await.expect("read task");
        }
        assert_eq!(reads_done.load(Ordering::SeqCst), READS);
        assert!(
            most.load(Ordering::SeqCst) <= readers,
            "{} reads ran at once on {readers} reader connections",
            most.load(Ordering::SeqCst)
        );
        // The burst takes READS / readers * READ_HOLD (320 ms); a write in
        // the same queue would come after nearly all of it.
        assert!(
            reads_before_write < READS / 2,
            "the write finished after {reads_before_write} of {READS} reads"
        );
        let value = store
            .read(|t, _m| Ok(t.get(b"turns/written")?))
            .await
            .expect("read back");
        assert_eq!(value.as_deref(), Some(&b"1"[..]));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_transaction_is_an_error_and_its_lane_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = Arc::new(
        SqliteKv::open(&dir.path().join("chat.db"), SqliteOptions::default()).expect("open"),
    );
    let readers = kv.parallelism(TxMode::ReadOnly);
    let store = Store::new(kv).expect("store");
    // More panics than the lanes have threads: a lost thread would leave
    // the last reads below waiting forever.
    for _ in 0..readers + 1 {
        let err = store
            .read(|_t, _m| -> actors::store::TxResult<()> { panic!("a bug in a read") })
            .await
            .expect_err("a panic is an error");
        assert!(err.to_string().contains("panicked"), "{err}");
        let err = store
            .write(|_t, _m| -> actors::store::TxResult<()> { panic!("a bug in a write") })
            .await
            .expect_err("a panic is an error");
        assert!(err.to_string().contains("panicked"), "{err}");
    }
    store
        .write(|t, _m| Ok(t.set(b"lane/after", b"ok")?))
        .await
        .expect("write after the panics");
    let value = store
        .read(|t, _m| Ok(t.get(b"lane/after")?))
        .await
        .expect("read after the panics");
    assert_eq!(value.as_deref(), Some(&b"ok"[..]));
}
