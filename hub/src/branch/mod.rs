//! A branch as the hub's sessions and HTTP handlers see it: one handle, one set of rules.
//!
//! A [`Branch`] is a cheap, shared handle (the model: mini-redis's `Db`): its state is private
//! and only its methods touch it. WebSocket sessions and the HTTP API call the same methods —
//! [`publish`](Branch::publish), [`resume`](Branch::resume), [`read`](Branch::read),
//! [`status`](Branch::status), [`devices`](Branch::devices), [`conflicts`](Branch::conflicts),
//! [`resolve`](Branch::resolve), [`snapshot`](Branch::snapshot) — so each rule is written once.
//!
//! The head, the counts and the rate are written by one party only, the engine's feed, after
//! each commit ([`Branches`] is that feed's side): nothing anyone reads here is ahead of what
//! is durable. Presence (sessions, acks) is written by the sessions and polls themselves.

mod presence;
pub mod snapshots;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use branchline_protocol::http::{BranchStatus, ResolveRequest, ResolveResponse};
use branchline_protocol::{
    BranchKey, ConflictRecord, ConflictStatus, DeviceInfo, Epoch, ErrorCode, Name, Position,
    Publish, Rejected, ResyncReason, ResyncRequired, Role, now_ms,
};
use dashmap::DashMap;
use tokio::sync::{OnceCell, watch};
use uuid::Uuid;

use self::presence::{Presence, RateWindow};
use crate::engine::{Answer, Committed, Engine, EngineError, Origin, Read, StoredEvent};
use crate::state::StateSnapshot;

/// Where a follower resuming from a position starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// Deliver every event after this seq (the head: live at once; below it: replay first).
    After(u64),
    /// The position cannot be served: the follower must take a snapshot.
    Resync(ResyncRequired),
}

/// The answer to a read of committed events.
#[derive(Debug)]
pub enum Page {
    /// The events after the position, in order and without gaps.
    Events(Vec<StoredEvent>),
    /// The position cannot be served.
    Resync(ResyncRequired),
}

/// What the feed writes after each commit.
struct Counts {
    oversold: u64,
    open_conflicts: u64,
    rate: RateWindow,
}

/// One branch, shared by every session and request that uses it.
pub struct Branch {
    key: Arc<BranchKey>,
    epoch: Epoch,
    engine: Arc<dyn Engine>,
    head: AtomicU64,
    head_tx: watch::Sender<u64>,
    floor: AtomicU64,
    presence: Mutex<Presence>,
    counts: Mutex<Counts>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few field updates).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Branch {
    /// The branch.
    pub fn key(&self) -> &Arc<BranchKey> {
        &self.key
    }

    /// Its log's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The last durable seq: nothing above it may be shown to anyone.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
    }

    /// The retention floor.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }

    /// A receiver that changes whenever the head moves (for long polls).
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head_tx.subscribe()
    }

    /// Queues `publish` from `origin` behind those queued before it; the answer resolves once
    /// the outcome is durable.
    pub async fn publish(&self, publish: Publish, origin: Origin) -> Answer {
        self.engine.publish(&self.key, publish, origin).await
    }

    /// How a follower resuming from `from` (`None`: from the head) is brought up to date, and
    /// the head that was decided against: the rule for sessions and polls alike (PROTOCOL.md
    /// §8).
    pub fn resume(&self, from: Option<Position>) -> (u64, Resume) {
        let (head, floor) = (self.head(), self.floor());
        let reason = match from {
            None => return (head, Resume::After(head)),
            Some(p) if p.epoch != self.epoch => ResyncReason::EpochMismatch,
            Some(p) if p.seq > head => ResyncReason::AheadOfHead,
            Some(p) if p.seq < floor => ResyncReason::BelowFloor,
            Some(p) => return (head, Resume::After(p.seq)),
        };
        (head, Resume::Resync(self.resync(reason, head)))
    }

    /// The `resync_required` for `reason`, with the branch at `head`.
    pub fn resync(&self, reason: ResyncReason, head: u64) -> ResyncRequired {
        ResyncRequired {
            branch: self.key.branch.clone(),
            reason,
            epoch: self.epoch,
            head,
            floor: self.floor(),
        }
    }

    /// Committed events after `after`, up to `until` (a head the caller saw), at most `limit`.
    pub async fn read(&self, after: u64, until: u64, limit: usize) -> Result<Page, EngineError> {
        Ok(
            match self
                .engine
                .read(&self.key, self.epoch, after, until, limit)
                .await?
            {
                Read::Events(events) => Page::Events(events),
                Read::Resync(reason) => Page::Resync(self.resync(reason, until)),
            },
        )
    }

    /// The branch as admins see it.
    pub fn status(&self) -> BranchStatus {
        let (devices_online, sessions) = lock(&self.presence).counts();
        let mut counts = lock(&self.counts);
        BranchStatus {
            tenant: self.key.tenant.clone(),
            branch: self.key.branch.clone(),
            epoch: self.epoch,
            head: self.head(),
            floor: self.floor(),
            events_per_s: counts.rate.per_second(now_ms()),
            devices_online,
            sessions,
            oversold_skus: counts.oversold,
            open_conflicts: counts.open_conflicts,
        }
    }

    /// Devices online now or seen in the last day, by name.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        lock(&self.presence).devices(self.head())
    }

    /// One device as admins see it.
    pub fn device_info(&self, device: &Name) -> Option<DeviceInfo> {
        lock(&self.presence).device_info(device, self.head())
    }

    /// The last `device_seq` the hub applied from `device`.
    pub fn last_device_seq(&self, device: &Name) -> u64 {
        lock(&self.presence).last_device_seq(device)
    }

    /// A session of `device` started following the branch; true if it is the device's first.
    pub fn session_joined(&self, device: &Name, role: Role) -> bool {
        lock(&self.presence).session_joined(device, role)
    }

    /// A session of `device` stopped following the branch; true if it was the device's last.
    pub fn session_left(&self, device: &Name) -> bool {
        lock(&self.presence).session_left(device)
    }

    /// The hub heard from `device`.
    pub fn touch(&self, device: &Name) {
        lock(&self.presence).touch(device);
    }

    /// `device` reports having applied up to `seq` (an `ack` frame, or a poll from `seq`).
    pub fn ack(&self, device: &Name, role: Role, seq: u64) {
        lock(&self.presence).ack(device, role, seq);
    }

    /// Conflict records, newest first, filtered by status.
    pub async fn conflicts(
        &self,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, EngineError> {
        self.engine.conflicts(&self.key, status, limit).await
    }

    /// Resolves a held conflict; answers once the `conflict.resolved` event is durable.
    pub async fn resolve(
        &self,
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
    ) -> Result<ResolveResponse, Rejected> {
        self.engine.resolve(&self.key, id, request, admin).await
    }

    /// The branch state and the seq it is exactly at, once that seq is durable.
    pub async fn snapshot(&self) -> Result<(StateSnapshot, u64), ErrorCode> {
        self.engine.snapshot(&self.key).await
    }

    /// A commit is durable: the feed's write, in commit order.
    fn committed(&self, commit: &Committed) {
        if !commit.device_seqs.is_empty() {
            lock(&self.presence).note_device_seqs(&commit.device_seqs);
        }
        {
            let mut counts = lock(&self.counts);
            counts.oversold = commit.oversold;
            counts.open_conflicts = commit.open_conflicts;
            if let Some(p) = &commit.publication {
                counts.rate.add(p.events.len() as u64, now_ms());
            }
        }
        self.head.store(commit.head, Ordering::SeqCst);
        self.head_tx.send_if_modified(|h| {
            let moved = *h != commit.head;
            *h = commit.head;
            moved
        });
    }
}

/// Every branch the hub has opened.
pub struct Branches {
    map: DashMap<BranchKey, Arc<OnceCell<Arc<Branch>>>>,
    engine: OnceCell<Arc<dyn Engine>>,
}

impl Default for Branches {
    fn default() -> Self {
        Self {
            map: DashMap::new(),
            engine: OnceCell::new(),
        }
    }
}

impl Branches {
    /// Opens branches through `engine` from now on (set once, when the engine is built: the
    /// engine needs this registry as its feed first).
    pub fn attach(&self, engine: Arc<dyn Engine>) {
        let _ = self.engine.set(engine);
    }

    /// The branch, opened (and its log made) on first use.
    pub async fn get(&self, key: &BranchKey) -> Result<Arc<Branch>, EngineError> {
        // The common case is a branch already open: no await at all.
        if let Some(branch) = self.map.get(key).and_then(|cell| cell.get().cloned()) {
            return Ok(branch);
        }
        // Opening is rare; boxing it keeps every caller's future (and so every session task)
        // small.
        Box::pin(self.open(key)).await
    }

    async fn open(&self, key: &BranchKey) -> Result<Arc<Branch>, EngineError> {
        let engine = self.engine.get().cloned().ok_or(EngineError::Closed)?;
        let cell = self.map.entry(key.clone()).or_default().clone();
        let branch = cell
            .get_or_try_init(|| async {
                let opened = engine.open(key).await?;
                Ok::<_, EngineError>(Arc::new(Branch {
                    key: Arc::new(key.clone()),
                    epoch: opened.epoch,
                    engine: engine.clone(),
                    head: AtomicU64::new(opened.head),
                    head_tx: watch::Sender::new(opened.head),
                    floor: AtomicU64::new(opened.floor),
                    presence: Mutex::new(Presence::from_log(&opened.devices)),
                    counts: Mutex::new(Counts {
                        oversold: opened.oversold,
                        open_conflicts: opened.open_conflicts,
                        rate: RateWindow::default(),
                    }),
                }))
            })
            .await?;
        Ok(branch.clone())
    }

    fn opened(&self, key: &BranchKey) -> Option<Arc<Branch>> {
        self.map.get(key).and_then(|cell| cell.get().cloned())
    }
}

/// The registry's side of the engine's feed: heads, counts and floors.
impl Branches {
    /// Applies a commit to its branch, if opened.
    pub fn committed(&self, commit: &Committed) {
        if let Some(branch) = self.opened(&commit.branch) {
            branch.committed(commit);
        }
    }

    /// Retention moved a branch's floor.
    pub fn trimmed(&self, key: &BranchKey, floor: u64) {
        if let Some(branch) = self.opened(key) {
            branch.floor.fetch_max(floor, Ordering::SeqCst);
        }
    }
}
