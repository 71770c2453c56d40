//! The group committer: many appends from every branch, one atomic write, one flush, then
//! acknowledge and release.
//!
//! Branch writers hand [`CommitItem`]s to one dedicated thread. While it flushes, new items
//! queue up; the next round takes all of them at once, so the flush cost is shared by every
//! event that arrived meanwhile. Only after the write is durable does the thread publish each
//! branch's new head, fan the events out to its room and run the publishers' replies. No
//! client ever sees an event a crash could take back.
//!
//! A failed write or flush is fatal for the store: the affected publishes are answered
//! `storage_unavailable`, the failure is logged and counted, and every later write is refused
//! the same way until the hub is restarted. (After a failed fsync the state of the file is
//! unknowable; retrying it could acknowledge what is not on disk.) Reads keep working.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use branchline_protocol::ErrorCode;
use tokio::sync::mpsc;

use crate::branch::BranchShared;
use crate::log::{EventLog, Op};
use crate::metrics::Metrics;
use crate::room::{LiveBatch, Rooms};

/// Called once the commit that carries it is durable (`Ok`) or has failed (`Err` with the code
/// to answer).
pub type Reply = Box<dyn FnOnce(Result<(), ErrorCode>) + Send>;

/// One branch writer's contribution to a commit.
pub struct CommitItem {
    /// The branch.
    pub branch: Arc<BranchShared>,
    /// What to write.
    pub ops: Vec<Op>,
    /// The branch head once these ops are written (unchanged if they add no event).
    pub head: u64,
    /// The events these ops add, ready to fan out.
    pub live: Option<Arc<LiveBatch>>,
    /// Answers to send after the write.
    pub replies: Vec<Reply>,
}

/// Most ops one commit writes. Bounds the latency one round can add, and sled's cost per
/// write grows with the batch (about 7 us per write at a few thousand, 20 us at sixty
/// thousand): a committer that fell behind must not take everything queued at once.
const MAX_OPS_PER_COMMIT: usize = 4_096;
/// Items queued towards the committer before branch writers wait: backpressure, not memory.
const QUEUE: usize = 4_096;

/// The sending side, held by branch writers.
#[derive(Clone)]
pub struct CommitSender {
    tx: mpsc::Sender<CommitItem>,
}

impl CommitSender {
    /// Queues an item, waiting while the committer is behind.
    pub async fn send(&self, item: CommitItem) {
        if let Err(mpsc::error::SendError(item)) = self.tx.send(item).await {
            // The committer is gone (shutdown): nothing will be written.
            for reply in item.replies {
                reply(Err(ErrorCode::ShuttingDown));
            }
        }
    }
}

/// The committer thread.
pub struct Committer {
    handle: JoinHandle<()>,
}

impl Committer {
    /// Starts the committer thread. It runs until every [`CommitSender`] is dropped, then
    /// flushes once more and exits.
    pub fn start(
        log: Arc<dyn EventLog>,
        rooms: Arc<Rooms>,
        metrics: Arc<Metrics>,
        durable: bool,
        failed: Arc<AtomicBool>,
    ) -> std::io::Result<(Self, CommitSender)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("branchline-commit".into())
            .spawn(move || run(rx, &*log, &rooms, &metrics, durable, &failed))?;
        Ok((Self { handle }, CommitSender { tx }))
    }

    /// Waits for the thread to finish (after every sender is dropped).
    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("the committer thread panicked");
        }
    }
}

fn run(
    mut rx: mpsc::Receiver<CommitItem>,
    log: &dyn EventLog,
    rooms: &Rooms,
    metrics: &Metrics,
    durable: bool,
    failed: &AtomicBool,
) {
    let mut items: Vec<CommitItem> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut op_count = first.ops.len();
        items.push(first);
        while op_count < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(item) => {
                    op_count += item.ops.len();
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        for item in &mut items {
            ops.append(&mut item.ops);
        }
        let started = Instant::now();
        // After a failure nothing is released, not even a round without writes: its head
        // would include events of the failed commit that the writer still counts.
        let result = if failed.load(Ordering::Acquire) {
            Err(None)
        } else if ops.is_empty() {
            Ok(())
        } else {
            log.apply(&ops)
                .and_then(|()| if durable { log.flush() } else { Ok(()) })
                .map_err(Some)
        };
        match result {
            Ok(()) => {
                if !ops.is_empty() {
                    metrics.commit(started.elapsed(), ops.len());
                }
                for item in items.drain(..) {
                    release(item, rooms);
                }
            }
            Err(err) => {
                if let Some(err) = err {
                    failed.store(true, Ordering::Release);
                    metrics.store_error();
                    tracing::error!(error = %err, "commit failed; refusing writes until restart");
                }
                for item in items.drain(..) {
                    for reply in item.replies {
                        reply(Err(ErrorCode::StorageUnavailable));
                    }
                }
            }
        }
        ops.clear();
    }
    if let Err(err) = log.flush() {
        tracing::error!(error = %err, "final flush failed");
    }
}

/// After a durable commit: publish the head first, then fan out, then answer. Readers that
/// see the new head find the events in the log; subscribers that join after the head moved
/// replay them from there.
fn release(item: CommitItem, rooms: &Rooms) {
    item.branch.set_committed(item.head);
    if let Some(live) = &item.live {
        rooms.deliver(&item.branch.key, live);
    }
    for reply in item.replies {
        reply(Ok(()));
    }
}
