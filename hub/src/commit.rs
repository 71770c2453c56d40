//! The group committer: many appends from every branch, one atomic write, one flush, then
//! acknowledge and release.
//!
//! Branch writers hand [`CommitItem`]s to one dedicated thread. While it writes and flushes,
//! new items queue up; the next round takes all of them at once, so the flush cost is shared
//! by every event that arrived meanwhile (and the rounds one branch's writer made meanwhile
//! are stored as one, see [`crate::log`]). Only after the write is durable does a second
//! thread, in commit order, publish each branch's new head, fan the events out to its room
//! and run the publishers' replies, while the first writes the next round. No client ever
//! sees an event a crash could take back.
//!
//! A failed write or flush is fatal for the store: the affected publishes are answered
//! `storage_unavailable`, the failure is logged and counted, and every later write is refused
//! the same way until the hub is restarted. (After a failed fsync the state of the file is
//! unknowable; retrying it could acknowledge what is not on disk.) Reads keep working.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use branchline_protocol::{ErrorCode, Name};
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
    /// Devices whose last applied `device_seq` these ops move, and to what: shown (in
    /// `welcome` and device lists) only once durable.
    pub device_seqs: Vec<(Name, u64)>,
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

/// The committer: the thread that writes and flushes, and the one that releases.
pub struct Committer {
    threads: Vec<JoinHandle<()>>,
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
        // A few written groups may wait for release; past that the writing thread waits.
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(RELEASE_QUEUE);
        let shared = Shared {
            log,
            metrics: metrics.clone(),
            failed,
        };
        let release = std::thread::Builder::new()
            .name("branchline-release".into())
            .spawn(move || {
                for group in done_rx {
                    release_group(group, &rooms, &metrics);
                }
            })?;
        let commit = std::thread::Builder::new()
            .name("branchline-commit".into())
            .spawn(move || run(rx, &shared, durable, &done_tx))?;
        Ok((
            Self {
                threads: vec![commit, release],
            },
            CommitSender { tx },
        ))
    }

    /// Waits for the threads to finish (after every sender is dropped).
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a committer thread panicked");
            }
        }
    }
}

/// Written groups waiting for the release thread.
const RELEASE_QUEUE: usize = 4;

struct Shared {
    log: Arc<dyn EventLog>,
    metrics: Arc<Metrics>,
    failed: Arc<AtomicBool>,
}

/// Items written and flushed together, to be released.
struct Group {
    items: Vec<CommitItem>,
    ops: usize,
    started: Instant,
}

/// Publishes the heads, fans out and answers, in commit order.
fn release_group(group: Group, rooms: &Rooms, metrics: &Metrics) {
    if group.ops > 0 {
        metrics.commit(group.started.elapsed(), group.ops);
    }
    for item in group.items {
        release(item, rooms);
    }
}

fn refuse(items: Vec<CommitItem>) {
    for item in items {
        for reply in item.replies {
            reply(Err(ErrorCode::StorageUnavailable));
        }
    }
}

/// Takes everything queued (up to [`MAX_OPS_PER_COMMIT`]), applies it as one atomic batch,
/// flushes, and hands it to the release thread; meanwhile new items queue up for the next
/// round, and the release thread fans the previous one out.
///
/// Writing and flushing stay on this one thread on purpose: sled 0.34 guards every write
/// batch and every flush with one process-wide lock, so a second thread would not overlap
/// them, and a flush racing a batch on another thread is a known source of sled deadlocks.
fn run(
    mut rx: mpsc::Receiver<CommitItem>,
    shared: &Shared,
    durable: bool,
    done: &std::sync::mpsc::SyncSender<Group>,
) {
    let mut ops: Vec<Op> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut op_count = first.ops.len();
        let mut items = vec![first];
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
        let result = if shared.failed.load(Ordering::Acquire) {
            Err(None)
        } else if ops.is_empty() {
            Ok(())
        } else {
            shared
                .log
                .apply(&ops)
                .and_then(|()| if durable { shared.log.flush() } else { Ok(()) })
                .map_err(Some)
        };
        match result {
            Ok(()) => {
                let group = Group {
                    items,
                    ops: ops.len(),
                    started,
                };
                if let Err(std::sync::mpsc::SendError(group)) = done.send(group) {
                    // The release thread is gone (it panicked): nothing can be answered.
                    refuse(group.items);
                }
            }
            Err(err) => {
                if let Some(err) = err {
                    shared.failed.store(true, Ordering::Release);
                    shared.metrics.store_error();
                    tracing::error!(error = %err, "commit failed; refusing writes until restart");
                }
                refuse(items);
            }
        }
        ops.clear();
    }
    // After a failure, nothing more is flushed: the refused rounds may still sit in sled's
    // buffers, and they were answered as not accepted.
    if !shared.failed.load(Ordering::Acquire) {
        if let Err(err) = shared.log.flush() {
            tracing::error!(error = %err, "final flush failed");
        }
    }
}

/// After a durable commit: publish the head first, then fan out, then answer. Readers that
/// see the new head find the events in the log; subscribers that join after the head moved
/// replay them from there.
fn release(item: CommitItem, rooms: &Rooms) {
    item.branch.note_device_seqs(&item.device_seqs);
    item.branch.set_committed(item.head);
    if let Some(live) = &item.live {
        rooms.deliver(&item.branch.key, live);
    }
    for reply in item.replies {
        reply(Ok(()));
    }
}
