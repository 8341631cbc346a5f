//! The last-seen writer: one per node, it writes users' last-seen times in
//! batches, one storage transaction for everything queued meanwhile.
//!
//! Presence actors record a last-seen time each time a user goes offline and
//! wait for it (so a stopping node does not drop it). When many users go
//! offline at once (a node shutting down closes all its clients, a peer
//! crashes with its sessions), one transaction per user would queue
//! thousands of commits behind the store's single writer, each with its own
//! fsync; batched, they take a few.
//!
//! Who talks to it: presence actors, through [`LastSeenWriter::write`]. Its
//! queue is bounded ([`QUEUE`]) and one transaction holds at most
//! [`MAX_BATCH`] users.
//!
//! What it must not do: answer before the transaction committed.

use tokio::sync::{mpsc, oneshot};

use crate::error::{ChatError, ChatResult};
use crate::store::Store;

/// Most users written in one transaction.
pub const MAX_BATCH: usize = 4_096;
/// Writes waiting for the writer.
pub const QUEUE: usize = 16_384;

struct Job {
    user: String,
    ms: u64,
    reply: oneshot::Sender<ChatResult<()>>,
}

/// The node's last-seen writer. Cheap to clone.
#[derive(Clone)]
pub struct LastSeenWriter {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for LastSeenWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastSeenWriter")
    }
}

impl LastSeenWriter {
    /// Starts the writer on `store`.
    pub fn start(store: Store) -> LastSeenWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        LastSeenWriter { tx }
    }

    /// Records that `user` was last seen at `ms`; resolves once durable.
    pub async fn write(&self, user: String, ms: u64) -> ChatResult<()> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ChatError::Unavailable("last-seen writer stopped".into());
        self.tx
            .send(Job { user, ms, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            let Ok(job) = rx.try_recv() else { break };
            jobs.push(job);
        }
        let writes: Vec<(String, u64)> = jobs.iter().map(|j| (j.user.clone(), j.ms)).collect();
        metrics::histogram!("chat_last_seen_per_txn").record(writes.len() as f64);
        let result = store
            .write(move |t, m| {
                for (user, ms) in &writes {
                    m.set_last_seen(t, user, *ms)?;
                }
                Ok(())
            })
            .await;
        for job in jobs {
            let _ = job.reply.send(result.clone());
        }
    }
}
