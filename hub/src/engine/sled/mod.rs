//! The embedded engine: one sled store, a single writer per branch, one group committer.
//!
//! - [`log`]: the store ([`SledLog`], behind the [`EventLog`] seam tests wrap to inject
//!   faults), made durable after every flush; `keys` is its key layout.
//! - [`writer`]: a branch's single writer, driving the branch's
//!   [`Sequencer`].
//! - [`commit`]: the group committer: one atomic write and one sync for many rounds, then the
//!   feed hears of each commit and the publishers get their answers.
//! - `dedup`: the Bloom filter in front of the dedup index.
//! - [`tools`]: offline tools on a stopped hub's store.

pub mod commit;
pub mod core;
mod dedup;
pub mod log;
pub mod tools;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use branchline_protocol::http::{PushResult, ResolveRequest, ResolveResponse};
use branchline_protocol::{
    BranchKey, ConflictRecord, ConflictStatus, Epoch, ErrorCode, Name, Publish, Rejected,
    ResyncReason, UnixMillis,
};
use dashmap::DashMap;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use self::commit::{CommitSender, Committer};
use self::core::BranchCore;
use self::dedup::DedupFilter;
pub use self::log::{EventLog, SledLog, StoreError};
use self::writer::{WriterCtx, WriterHandle};
use super::health::StoreHealth;
use super::sequence::Sequencer;
use futures::FutureExt;

use super::{
    Answer, Engine, EngineError, Feed, Opened, Origin, Read, StopError, Unwritable, contiguous,
};
use crate::config::{Config, FsyncMode, RetentionConfig};
use crate::metrics::Metrics;
use crate::state::{BranchState, Policies, StateSnapshot};

/// An opened branch: its writer, and what it was when it opened.
struct Branch {
    writer: WriterHandle,
    opened: Opened,
}

/// The sled engine.
pub struct SledEngine {
    log: Arc<dyn EventLog>,
    branches: DashMap<BranchKey, Arc<OnceCell<Arc<Branch>>>>,
    /// What new writers get; taken at stop, so that no branch opens after it.
    ctx: Mutex<Option<WriterCtx>>,
    health: Arc<StoreHealth>,
    committer: Mutex<Option<Committer>>,
    feed: Arc<dyn Feed>,
    /// Writers and the interval flush ticker.
    tasks: TaskTracker,
    stopping: CancellationToken,
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(e.to_string())
    }
}

/// Runs a store call on a blocking thread: the runtime's threads never wait on the disk.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, EngineError> {
    Ok(tokio::task::spawn_blocking(call)
        .await
        .map_err(|_| EngineError::Closed)??)
}

impl SledEngine {
    /// Opens (or creates) the store in the configured data directory and starts the engine.
    /// Needs a Tokio runtime.
    pub fn open(
        config: &Config,
        feed: Arc<dyn Feed>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.data_dir)?;
        let log = SledLog::open(&config.data_dir, config.store_cache_bytes)?;
        Self::with_log(Arc::new(log), config, feed, metrics)
    }

    /// The engine over an already opened store (tests wrap the store to inject faults).
    pub fn with_log(
        log: Arc<dyn EventLog>,
        config: &Config,
        feed: Arc<dyn Feed>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let health = Arc::new(StoreHealth::new(config.min_free_space.as_u64()));
        health.note_free(log.free_bytes()?);
        if let Err(why) = health.writable() {
            tracing::warn!("{why}: serving reads only until there is room");
        }
        let reset = log.begin_run(config.fsync == FsyncMode::Always)?;
        if reset > 0 {
            tracing::warn!(
                branches = reset,
                "the last run acknowledged before flushing (--fsync interval) and did not stop \
                 cleanly: every branch has a new epoch, and clients resync from a snapshot"
            );
        }
        let (committer, sender) = Committer::start(
            log.clone(),
            feed.clone(),
            metrics,
            config.fsync,
            health.clone(),
        )?;
        let tasks = TaskTracker::new();
        let stopping = CancellationToken::new();
        if let FsyncMode::Interval(every) = config.fsync {
            tracing::warn!(
                interval = %humantime::format_duration(every),
                "fsync is by interval: a crash may lose up to one interval of acknowledged events"
            );
            tasks.spawn(flush_ticker(sender.clone(), every, stopping.clone()));
        }
        let ctx = WriterCtx {
            log: log.clone(),
            committer: sender,
            policies: Policies::from(&config.conflicts),
            health: health.clone(),
            tracker: tasks.clone(),
        };
        Ok(Self {
            log,
            branches: DashMap::new(),
            ctx: Mutex::new(Some(ctx)),
            health,
            committer: Mutex::new(Some(committer)),
            feed,
            tasks,
            stopping,
        })
    }

    /// The branch, opened (its log made, its writer started) on first use.
    async fn branch(&self, key: &BranchKey) -> Result<Arc<Branch>, EngineError> {
        // The common case is a branch already open: no await at all.
        if let Some(branch) = self.branches.get(key).and_then(|cell| cell.get().cloned()) {
            return Ok(branch);
        }
        // Opening is rare; boxing it keeps every caller's future small.
        Box::pin(self.open_branch(key)).await
    }

    async fn open_branch(&self, key: &BranchKey) -> Result<Arc<Branch>, EngineError> {
        let cell = self.branches.entry(key.clone()).or_default().clone();
        let branch = cell
            .get_or_try_init(|| async {
                let ctx = lock(&self.ctx).clone().ok_or(EngineError::Closed)?;
                let (log, k) = (ctx.log.clone(), key.clone());
                let (mut loaded, known) = blocking(move || {
                    let loaded = log.open_branch(&k)?;
                    let mut ids = Vec::new();
                    log.dedup_ids(&k, &mut |id| ids.push(id))?;
                    let mut known = DedupFilter::with_capacity(ids.len());
                    for id in &ids {
                        known.insert(id);
                    }
                    Ok((loaded, known))
                })
                .await?;
                let key = Arc::new(key.clone());
                let state = BranchState::load(
                    std::mem::take(&mut loaded.products),
                    std::mem::take(&mut loaded.stock),
                    std::mem::take(&mut loaded.open_conflicts),
                );
                let opened = Opened {
                    epoch: loaded.epoch,
                    head: loaded.head,
                    floor: loaded.floor,
                    devices: loaded
                        .devices
                        .iter()
                        .map(|(d, seq)| (d.clone(), *seq))
                        .collect(),
                    oversold: state.oversold_skus(),
                    open_conflicts: state.open_conflicts(),
                };
                let core = Arc::new(BranchCore::new(
                    key.clone(),
                    loaded.epoch,
                    loaded.head,
                    loaded.floor,
                ));
                let sequencer = Sequencer::new(
                    key,
                    loaded.epoch,
                    loaded.head,
                    loaded.head_time_ms,
                    loaded.devices,
                    state,
                    ctx.policies,
                );
                let writer = writer::spawn(core, sequencer, known, ctx);
                Ok::<_, EngineError>(Arc::new(Branch { writer, opened }))
            })
            .await?;
        Ok(branch.clone())
    }

    /// The cores of the branches opened so far, by key.
    fn cores(&self) -> HashMap<BranchKey, Arc<BranchCore>> {
        self.branches
            .iter()
            .filter_map(|e| {
                e.value()
                    .get()
                    .map(|b| (e.key().clone(), b.writer.core.clone()))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Engine for SledEngine {
    async fn open(&self, branch: &BranchKey) -> Result<Opened, EngineError> {
        Ok(self.branch(branch).await?.opened.clone())
    }

    async fn publish(&self, branch: &BranchKey, publish: Publish, origin: Origin) -> Answer {
        match self.branch(branch).await {
            Ok(b) => b.writer.publish(publish, origin).await,
            Err(e) => {
                let refused =
                    Rejected::of(publish.event_id, publish.branch, e.code(), e.to_string());
                futures::future::ready(PushResult::Rejected(refused)).boxed()
            }
        }
    }

    async fn resolve(
        &self,
        branch: &BranchKey,
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
    ) -> Result<ResolveResponse, Rejected> {
        match self.branch(branch).await {
            Ok(b) => b.writer.resolve(id, request, admin).await,
            Err(e) => Err(Rejected::bare(e.code(), e.to_string())),
        }
    }

    async fn snapshot(&self, branch: &BranchKey) -> Result<(StateSnapshot, u64), ErrorCode> {
        match self.branch(branch).await {
            Ok(b) => b.writer.snapshot().await,
            Err(e) => Err(e.code()),
        }
    }

    async fn read(
        &self,
        branch: &BranchKey,
        epoch: Epoch,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Read, EngineError> {
        let core = self.branch(branch).await?.writer.core.clone();
        if epoch != core.epoch {
            return Ok(Read::Resync(ResyncReason::EpochMismatch));
        }
        let until = until.min(core.committed());
        if after > until {
            return Ok(Read::Resync(ResyncReason::AheadOfHead));
        }
        if after < core.floor() {
            return Ok(Read::Resync(ResyncReason::BelowFloor));
        }
        if after == until || limit == 0 {
            return Ok(Read::Events(Vec::new()));
        }
        let (log, key) = (self.log.clone(), branch.clone());
        let events = blocking(move || log.read_events(&key, after, until, limit)).await?;
        if events.is_empty() || !contiguous(after, &events) {
            // Events the head says exist are not in the log: retention trimmed them after the
            // floor was checked.
            return Ok(Read::Resync(ResyncReason::BelowFloor));
        }
        Ok(Read::Events(events))
    }

    async fn conflicts(
        &self,
        branch: &BranchKey,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, EngineError> {
        let (log, key) = (self.log.clone(), branch.clone());
        blocking(move || log.conflicts(&key, status, limit)).await
    }

    async fn retain(
        &self,
        retention: &RetentionConfig,
        now: UnixMillis,
        dedup: bool,
    ) -> Result<(), EngineError> {
        let (log, feed, cores) = (self.log.clone(), self.feed.clone(), self.cores());
        let retention = retention.clone();
        blocking(move || retain(&*log, &*feed, &cores, &retention, now, dedup)).await
    }

    fn writable(&self) -> Result<(), Unwritable> {
        self.health.writable()
    }

    fn check_space(&self) {
        self.health.measured(self.log.free_bytes());
    }

    async fn stop(&self, deadline: tokio::time::Instant) -> Result<(), StopError> {
        let mut unfinished = Vec::new();
        // No branch opens from now on; the writers finish their queues and stop, dropping
        // their senders, and the committer then ends after a last flush.
        lock(&self.ctx).take();
        self.branches.clear();
        self.stopping.cancel();
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("branch writers still busy after the shutdown grace");
            unfinished.push("branch writers");
        }
        let committer = lock(&self.committer).take();
        if let Some(committer) = committer {
            let join = tokio::task::spawn_blocking(move || committer.join());
            if tokio::time::timeout_at(deadline, join).await.is_err() {
                tracing::warn!("the committer did not finish within the shutdown grace");
                unfinished.push("the committer");
            }
        }
        // A store that failed, or whose committer may still write, is left marked as not
        // stopped cleanly. The last flush gets what is left of the grace: on a disk that
        // cannot take it, it is abandoned (its thread left behind) rather than waited for.
        if !self.health.failed() {
            let (log, clean) = (self.log.clone(), unfinished.is_empty());
            let last = tokio::task::spawn_blocking(move || {
                log.flush()?;
                if clean { log.end_run() } else { Ok(()) }
            });
            match tokio::time::timeout_at(deadline, last).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %e, "the final flush failed");
                    unfinished.push("the final flush (failed)");
                }
                Ok(Err(_)) => unfinished.push("the final flush (panicked)"),
                Err(_) => {
                    tracing::error!("the final flush did not finish within the shutdown grace");
                    unfinished.push("the final flush");
                }
            }
        }
        if !unfinished.is_empty() {
            Err(StopError::Unfinished(unfinished))
        } else if self.health.failed() {
            Err(StopError::Failed)
        } else {
            Ok(())
        }
    }
}

/// One retention pass over every branch of the store (see [`Engine::retain`]).
fn retain(
    log: &dyn EventLog,
    feed: &dyn Feed,
    cores: &HashMap<BranchKey, Arc<BranchCore>>,
    retention: &RetentionConfig,
    now: UnixMillis,
    dedup: bool,
) -> Result<(), StoreError> {
    let age = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let mut result = Ok(());
    for key in log.branches()? {
        let core = cores.get(&key);
        let pass = || -> Result<(), StoreError> {
            let (head, floor) = match core {
                Some(c) => (c.committed(), c.floor()),
                None => log.position(&key)?,
            };
            let by_count = head.saturating_sub(retention.max_events);
            let by_age = log
                .last_seq_before(&key, now.saturating_sub(age(retention.max_age)))?
                .unwrap_or(0);
            let new_floor = by_count.max(by_age).min(head).max(floor);
            if new_floor > floor {
                // The floor moves before anything is deleted: a reader that finds a hole
                // below it resyncs rather than serving a partial page.
                if let Some(c) = core {
                    c.raise_floor(new_floor);
                }
                feed.trimmed(&key, new_floor);
                let removed = log.trim(&key, new_floor)?;
                tracing::info!(branch = %key, floor = new_floor, removed, "retention trimmed the log");
            }
            if dedup {
                let cutoff = now.saturating_sub(age(retention.dedup_window));
                log.expire_dedup(&key, cutoff, new_floor)?;
            }
            Ok(())
        };
        // One branch's failure does not stop the pass for the others.
        if let Err(e) = pass() {
            tracing::error!(branch = %key, error = %e, "retention failed for a branch");
            result = Err(e);
        }
    }
    result
}

/// Under `--fsync interval`: asks the committer for a flush every interval, so that the last
/// writes before a quiet spell are flushed too. Ends (dropping its sender) at stop.
async fn flush_ticker(sender: CommitSender, every: Duration, stopping: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tick.tick() => sender.flush(),
        }
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
