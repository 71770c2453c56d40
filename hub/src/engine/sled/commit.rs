//! The group committer: many appends from every branch, one atomic write, one flush, then
//! acknowledge and release.
//!
//! Branch writers hand [`CommitItem`]s to one dedicated thread. While it writes and flushes,
//! new items queue up; the next round takes all of them at once, so the flush cost is shared
//! by every event that arrived meanwhile (and the rounds one branch's writer made meanwhile
//! are stored as one, see `keys`). Only after the write is durable does a second
//! thread, in commit order, publish each branch's new head, fan the events out to its room
//! and run the publishers' replies, while the first writes the next round. No client ever
//! sees an event a crash or a power cut could take back.
//!
//! Under `--fsync interval=D` a round is released as soon as it is written, and the
//! committer flushes at most every `D`: after a round once `D` has passed since the last
//! flush, and on the [`CommitSender::flush`] ticks the hub sends every `D`, so that the last
//! writes before a quiet spell are flushed too. Every flush runs on this one thread.
//!
//! A failed write or flush is fatal for the store: the affected publishes are answered
//! `storage_unavailable`, the failure is logged and counted, and every later write is refused
//! the same way until the hub is restarted. (After a failed fsync the state of the file is
//! unknowable; retrying it could acknowledge what is not on disk.) Reads keep working. After
//! each commit the committer also measures the free space, so that writes stop, for a while
//! only, before the disk is full (see [`crate::engine::health`]).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use branchline_protocol::{ErrorCode, Name};
use tokio::sync::mpsc;

use super::core::BranchCore;
use super::log::{EventLog, Op, StoreError};
use crate::config::FsyncMode;
use crate::engine::health::StoreHealth;
use crate::engine::{Committed, Feed, Publication};
use crate::metrics::Metrics;

/// Called once the commit that carries it is durable (`Ok`) or has failed (`Err` with the code
/// to answer).
pub type Reply = Box<dyn FnOnce(Result<(), ErrorCode>) + Send>;

/// One branch writer's contribution to a commit.
pub struct CommitItem {
    /// The branch.
    pub core: Arc<BranchCore>,
    /// What to write.
    pub ops: Vec<Op>,
    /// The branch head once these ops are written (unchanged if they add no event).
    pub head: u64,
    /// The events these ops add, ready to fan out.
    pub publication: Option<Arc<Publication>>,
    /// Answers to send after the write.
    pub replies: Vec<Reply>,
    /// Devices whose last applied `device_seq` these ops move, and to what: shown (in
    /// `welcome` and device lists) only once durable.
    pub device_seqs: Vec<(Name, u64)>,
    /// SKUs with negative stock once these ops are written.
    pub oversold: u64,
    /// Conflicts waiting for an admin once these ops are written.
    pub open_conflicts: u64,
}

/// Most ops one commit writes. Bounds the latency one round can add, and sled's cost per
/// write grows with the batch (about 7 us per write at a few thousand, 20 us at sixty
/// thousand): a committer that fell behind must not take everything queued at once.
const MAX_OPS_PER_COMMIT: usize = 4_096;
/// Items queued towards the committer before branch writers wait: backpressure, not memory.
const QUEUE: usize = 4_096;

/// What the committer is sent.
enum Msg {
    /// Something to write.
    Item(CommitItem),
    /// Under `--fsync interval`: flush what was written since the last flush.
    Flush,
}

/// The sending side, held by branch writers.
#[derive(Clone)]
pub struct CommitSender {
    tx: mpsc::Sender<Msg>,
}

impl CommitSender {
    /// Queues an item, waiting while the committer is behind.
    pub async fn send(&self, item: CommitItem) {
        if let Err(mpsc::error::SendError(Msg::Item(item))) = self.tx.send(Msg::Item(item)).await {
            // The committer is gone (shutdown): nothing will be written.
            for reply in item.replies {
                reply(Err(ErrorCode::ShuttingDown));
            }
        }
    }

    /// Asks for a flush of what was written since the last one (`--fsync interval`); skipped
    /// when the committer is busy (it flushes after its round anyway).
    pub fn flush(&self) {
        let _ = self.tx.try_send(Msg::Flush);
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
        feed: Arc<dyn Feed>,
        metrics: Arc<Metrics>,
        fsync: FsyncMode,
        health: Arc<StoreHealth>,
    ) -> std::io::Result<(Self, CommitSender)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        // A few written groups may wait for release; past that the writing thread waits.
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(RELEASE_QUEUE);
        let shared = Shared {
            log,
            metrics: metrics.clone(),
            health,
        };
        let release = std::thread::Builder::new()
            .name("branchline-release".into())
            .spawn(move || {
                for group in done_rx {
                    release_group(group, &*feed, &metrics);
                }
            })?;
        let commit = std::thread::Builder::new()
            .name("branchline-commit".into())
            .spawn(move || run(rx, &shared, fsync, &done_tx))?;
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
    health: Arc<StoreHealth>,
}

impl Shared {
    /// Records a failed write or flush: nothing more is written until a restart.
    fn fail(&self, err: &StoreError, what: &str) {
        self.health.fail();
        self.metrics.store_error();
        tracing::error!(error = %err, "{what} failed; refusing writes until restart");
    }

    /// Measures the free space, so that writes stop before the disk is full.
    fn check_space(&self) {
        self.health.measured(self.log.free_bytes());
    }
}

/// Items written and flushed together, to be released.
struct Group {
    items: Vec<CommitItem>,
    ops: usize,
    started: Instant,
}

/// Publishes the heads, tells the feed and answers, in commit order.
fn release_group(group: Group, feed: &dyn Feed, metrics: &Metrics) {
    if group.ops > 0 {
        metrics.commit(group.started.elapsed(), group.ops);
    }
    for item in group.items {
        release(item, feed);
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
    mut rx: mpsc::Receiver<Msg>,
    shared: &Shared,
    fsync: FsyncMode,
    done: &std::sync::mpsc::SyncSender<Group>,
) {
    // Under `interval`: how often to flush, and whether anything was written since.
    let every = match fsync {
        FsyncMode::Always => None,
        FsyncMode::Interval(d) => Some(d),
    };
    let mut last_flush = Instant::now();
    let mut unflushed = false;
    let mut ops: Vec<Op> = Vec::new();
    while let Some(msg) = rx.blocking_recv() {
        let first = match msg {
            Msg::Item(item) => item,
            Msg::Flush => {
                if unflushed {
                    interval_flush(shared, &mut unflushed, &mut last_flush);
                }
                continue;
            }
        };
        let mut op_count = first.ops.len();
        let mut items = vec![first];
        while op_count < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(Msg::Item(item)) => {
                    op_count += item.ops.len();
                    items.push(item);
                }
                // This round flushes, or the interval check after it does.
                Ok(Msg::Flush) => {}
                Err(_) => break,
            }
        }
        for item in &mut items {
            ops.append(&mut item.ops);
        }
        let started = Instant::now();
        // After a failure nothing is released, not even a round without writes: its head
        // would include events of the failed commit that the writer still counts.
        let result = if shared.health.failed() {
            Err(None)
        } else if ops.is_empty() {
            Ok(())
        } else {
            shared
                .log
                .apply(&ops)
                .and_then(|()| match every {
                    None => shared.log.flush(),
                    Some(_) => {
                        unflushed = true;
                        Ok(())
                    }
                })
                .map_err(Some)
        };
        match result {
            Ok(()) => {
                if !ops.is_empty() {
                    shared.check_space();
                }
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
                    shared.fail(&err, "commit");
                }
                refuse(items);
            }
        }
        ops.clear();
        if every.is_some_and(|d| unflushed && last_flush.elapsed() >= d) {
            interval_flush(shared, &mut unflushed, &mut last_flush);
        }
    }
    // After a failure, nothing more is flushed: the refused rounds may still sit in sled's
    // buffers, and they were answered as not accepted.
    if !shared.health.failed() {
        if let Err(err) = shared.log.flush() {
            shared.fail(&err, "the final flush");
        }
    }
}

/// Under `--fsync interval`: flushes what was written (and acknowledged) since the last flush.
fn interval_flush(shared: &Shared, unflushed: &mut bool, last_flush: &mut Instant) {
    if shared.health.failed() {
        return;
    }
    if let Err(err) = shared.log.flush() {
        shared.fail(&err, "the interval flush");
    }
    *unflushed = false;
    *last_flush = Instant::now();
}

/// After a durable commit: publish the head first, then tell the feed (which moves the hub's
/// head and fans out), then answer. Readers that see the new head find the events in the log;
/// subscribers that join after the head moved replay them from there.
fn release(item: CommitItem, feed: &dyn Feed) {
    item.core.set_committed(item.head);
    feed.committed(Committed {
        branch: item.core.key.clone(),
        head: item.head,
        publication: item.publication,
        device_seqs: item.device_seqs,
        oversold: item.oversold,
        open_conflicts: item.open_conflicts,
    });
    for reply in item.replies {
        reply(Ok(()));
    }
}
