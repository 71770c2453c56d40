//! The group committer: many appends from every branch, one atomic write, one flush, then
//! acknowledge and release.
//!
//! Branch writers hand [`CommitItem`]s to the applier thread, which writes everything queued
//! as one atomic sled batch and passes the group on to the flusher thread. While the flusher
//! waits for the disk, the applier writes the next group, and new items queue up behind it;
//! the next flush takes every group applied meanwhile, so its cost is shared by all their
//! events and the disk's latency overlaps the CPU work. Only after the flush does the
//! flusher publish each branch's new head, fan the events out to its room and run the
//! publishers' replies, in order. No client ever sees an event a crash could take back.
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

/// The committer: an applier thread and, when commits are durable, a flusher thread.
pub struct Committer {
    threads: Vec<JoinHandle<()>>,
}

impl Committer {
    /// Starts the committer. It runs until every [`CommitSender`] is dropped, then flushes
    /// once more and exits.
    pub fn start(
        log: Arc<dyn EventLog>,
        rooms: Arc<Rooms>,
        metrics: Arc<Metrics>,
        durable: bool,
        failed: Arc<AtomicBool>,
    ) -> std::io::Result<(Self, CommitSender)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Shared {
            log,
            rooms,
            metrics,
            failed,
        };
        let mut threads = Vec::new();
        let flusher = if durable {
            // Two applied groups in flight at most: while one flushes, the applier fills the
            // next; past that it waits, and the groups grow instead.
            let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel(2);
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("branchline-flush".into())
                    .spawn(move || flush(&flush_rx, &s))?,
            );
            Some(flush_tx)
        } else {
            None
        };
        threads.push(
            std::thread::Builder::new()
                .name("branchline-commit".into())
                .spawn(move || apply(rx, &shared, flusher))?,
        );
        Ok((Self { threads }, CommitSender { tx }))
    }

    /// Waits for the threads to finish (after every sender is dropped).
    pub fn join(self) {
        for thread in self.threads.into_iter().rev() {
            if thread.join().is_err() {
                tracing::error!("a committer thread panicked");
            }
        }
    }
}

#[derive(Clone)]
struct Shared {
    log: Arc<dyn EventLog>,
    rooms: Arc<Rooms>,
    metrics: Arc<Metrics>,
    failed: Arc<AtomicBool>,
}

impl Shared {
    fn fail(&self, err: &crate::log::StoreError) {
        self.failed.store(true, Ordering::Release);
        self.metrics.store_error();
        tracing::error!(error = %err, "commit failed; refusing writes until restart");
    }
}

/// Items written together, waiting for their flush.
struct Group {
    items: Vec<CommitItem>,
    ops: usize,
    started: Instant,
}

fn refuse(items: Vec<CommitItem>) {
    for item in items {
        for reply in item.replies {
            reply(Err(ErrorCode::StorageUnavailable));
        }
    }
}

/// The applier: takes everything queued (up to [`MAX_OPS_PER_COMMIT`]), applies it as one
/// atomic batch, and hands the group to the flusher (or, without fsync, releases it).
fn apply(
    mut rx: mpsc::Receiver<CommitItem>,
    shared: &Shared,
    flusher: Option<std::sync::mpsc::SyncSender<Group>>,
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
        if shared.failed.load(Ordering::Acquire) {
            refuse(items);
        } else if let Err(err) = shared.log.apply(&ops) {
            shared.fail(&err);
            refuse(items);
        } else {
            let group = Group {
                items,
                ops: ops.len(),
                started,
            };
            match &flusher {
                Some(flusher) => {
                    if let Err(std::sync::mpsc::SendError(group)) = flusher.send(group) {
                        // The flusher is gone (it panicked): nothing can be made durable.
                        refuse(group.items);
                    }
                }
                None => release_group(group, shared),
            }
        }
        ops.clear();
    }
    match flusher {
        // Dropping the sender lets the flusher finish its last groups and exit.
        Some(flusher) => drop(flusher),
        None if !shared.failed.load(Ordering::Acquire) => {
            if let Err(err) = shared.log.flush() {
                tracing::error!(error = %err, "final flush failed");
            }
        }
        None => {}
    }
}

/// The flusher: one flush for every group applied since the last one started, then releases
/// them in order. A group is released only after a flush that began after it was applied.
fn flush(rx: &std::sync::mpsc::Receiver<Group>, shared: &Shared) {
    let mut groups = Vec::new();
    while let Ok(first) = rx.recv() {
        groups.push(first);
        groups.extend(rx.try_iter());
        // After a failure (here or in the applier), nothing more is flushed: refused rounds
        // may still sit in sled's buffers, and they were answered as not accepted.
        let result = if shared.failed.load(Ordering::Acquire) {
            Err(None)
        } else {
            shared.log.flush().map_err(Some)
        };
        match result {
            Ok(()) => {
                for group in groups.drain(..) {
                    release_group(group, shared);
                }
            }
            Err(err) => {
                if let Some(err) = err {
                    shared.fail(&err);
                }
                for group in groups.drain(..) {
                    refuse(group.items);
                }
            }
        }
    }
}

fn release_group(group: Group, shared: &Shared) {
    if group.ops > 0 {
        shared.metrics.commit(group.started.elapsed(), group.ops);
    }
    for item in group.items {
        release(item, &shared.rooms);
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
