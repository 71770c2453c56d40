//! A branch: its shared handle, and the single writer that sequences it.
//!
//! Every command for a branch goes through one [`Writer`] task, so `seq` assignment, dedup,
//! `device_seq` checks and state changes never race. The writer takes all queued commands at
//! once, sequences them, and hands one [`CommitItem`] to the group committer; it does not wait
//! for the flush before sequencing the next round (pipelining), and every answer is sent by the
//! committer after the flush, in command order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use branchline_protocol::http::{PushResult, ResolveRequest, ResolveResponse};
use branchline_protocol::{
    Accepted, Codec, DeviceInfo, Epoch, ErrorCode, Event, EventBody, HUB_DEVICE, Name, Publish,
    Rejected, Role, Sku, UnixMillis, now_ms,
};
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::{OnceCell, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::commit::{CommitItem, CommitSender, Reply};
use crate::dedup::DedupFilter;
use crate::health::StoreHealth;
use crate::log::{BranchKey, EventLog, LoadedBranch, Op, StoreError, StoredEvent};
use crate::metrics::Metrics;
use crate::room::{FRAME_EVENT_BYTES, LiveBatch};
use crate::state::{Applied, BranchState, Change, Policies, Refused, StateSnapshot, WriteCtx};

/// Commands a writer takes per round: one commit item carries them all.
const ROUND: usize = 512;
/// Commands queued per branch before senders wait.
const MAILBOX: usize = 4_096;
/// Devices seen within this long are listed even when offline.
const DEVICE_MEMORY_MS: i64 = 24 * 3600 * 1000;

/// What every part of the hub shares about one branch.
pub struct BranchShared {
    /// The branch.
    pub key: Arc<BranchKey>,
    /// Its log's epoch.
    pub epoch: Epoch,
    committed: AtomicU64,
    head_tx: watch::Sender<u64>,
    floor: AtomicU64,
    devices: Mutex<HashMap<Name, DeviceState>>,
    oversold: AtomicU64,
    open_conflicts: AtomicU64,
    rate: Mutex<RateWindow>,
}

#[derive(Clone, Debug)]
struct DeviceState {
    role: Role,
    sessions: u32,
    last_seen_ms: UnixMillis,
    acked_seq: Option<u64>,
    last_device_seq: u64,
}

impl DeviceState {
    fn new(role: Role) -> Self {
        Self {
            role,
            sessions: 0,
            last_seen_ms: now_ms(),
            acked_seq: None,
            last_device_seq: 0,
        }
    }
}

impl BranchShared {
    fn new(key: Arc<BranchKey>, loaded: &LoadedBranch, state: &BranchState) -> Self {
        let devices = loaded
            .devices
            .iter()
            .map(|(d, seq)| {
                let mut s = DeviceState::new(Role::Cashier);
                s.last_seen_ms = 0;
                s.last_device_seq = *seq;
                (d.clone(), s)
            })
            .collect();
        Self {
            key,
            epoch: loaded.epoch,
            committed: AtomicU64::new(loaded.head),
            head_tx: watch::Sender::new(loaded.head),
            floor: AtomicU64::new(loaded.floor),
            devices: Mutex::new(devices),
            oversold: AtomicU64::new(state.oversold_skus()),
            open_conflicts: AtomicU64::new(state.open_conflicts()),
            rate: Mutex::new(RateWindow::default()),
        }
    }

    /// The last durable seq: nothing above it may be shown to anyone.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Called by the committer after a durable write, before fan-out.
    pub fn set_committed(&self, head: u64) {
        self.committed.store(head, Ordering::SeqCst);
        self.head_tx.send_if_modified(|h| {
            let moved = *h != head;
            *h = head;
            moved
        });
    }

    /// A receiver that changes whenever the committed head moves (for long polls).
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head_tx.subscribe()
    }

    /// The retention floor.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }

    /// Moves the floor (retention does, before it deletes).
    pub fn set_floor(&self, floor: u64) {
        self.floor.fetch_max(floor, Ordering::SeqCst);
    }

    /// SKUs with negative stock.
    pub fn oversold_skus(&self) -> u64 {
        self.oversold.load(Ordering::Relaxed)
    }

    /// Conflicts waiting for an admin.
    pub fn open_conflicts(&self) -> u64 {
        self.open_conflicts.load(Ordering::Relaxed)
    }

    /// Events sequenced per second over the last minute.
    pub fn events_per_s(&self) -> f64 {
        lock(&self.rate).per_second(now_ms())
    }

    fn with_devices<T>(&self, f: impl FnOnce(&mut HashMap<Name, DeviceState>) -> T) -> T {
        f(&mut lock(&self.devices))
    }

    /// A session of `device` started following the branch; true if it is the device's first.
    pub fn session_joined(&self, device: &Name, role: Role) -> bool {
        self.with_devices(|d| {
            let s = d
                .entry(device.clone())
                .or_insert_with(|| DeviceState::new(role));
            s.role = role;
            s.sessions += 1;
            s.last_seen_ms = now_ms();
            s.sessions == 1
        })
    }

    /// A session of `device` stopped following the branch; true if it was the device's last.
    pub fn session_left(&self, device: &Name) -> bool {
        self.with_devices(|d| match d.get_mut(device) {
            Some(s) if s.sessions > 0 => {
                s.sessions -= 1;
                s.last_seen_ms = now_ms();
                s.sessions == 0
            }
            _ => false,
        })
    }

    /// The hub heard from `device`.
    pub fn touch(&self, device: &Name) {
        self.with_devices(|d| {
            if let Some(s) = d.get_mut(device) {
                s.last_seen_ms = now_ms();
            }
        });
    }

    /// `device` reports having applied up to `seq` (an `ack` frame, or a poll from `seq`).
    pub fn ack(&self, device: &Name, role: Role, seq: u64) {
        self.with_devices(|d| {
            let s = d
                .entry(device.clone())
                .or_insert_with(|| DeviceState::new(role));
            s.acked_seq = Some(s.acked_seq.map_or(seq, |a| a.max(seq)));
            s.last_seen_ms = now_ms();
        });
    }

    /// Devices' last applied `device_seq`s, once the commit that carries them is durable.
    pub(crate) fn note_device_seqs(&self, seqs: &[(Name, u64)]) {
        if seqs.is_empty() {
            return;
        }
        let now = now_ms();
        self.with_devices(|d| {
            for (device, seq) in seqs {
                let s = d
                    .entry(device.clone())
                    .or_insert_with(|| DeviceState::new(Role::Cashier));
                s.last_device_seq = *seq;
                s.last_seen_ms = now;
            }
        });
    }

    /// The last `device_seq` the hub applied from `device`.
    pub fn last_device_seq(&self, device: &Name) -> u64 {
        self.with_devices(|d| d.get(device).map_or(0, |s| s.last_device_seq))
    }

    /// One device as admins see it.
    pub fn device_info(&self, device: &Name) -> Option<DeviceInfo> {
        let head = self.committed();
        self.with_devices(|d| d.get(device).map(|s| info(device, s, head)))
    }

    /// Devices online now or seen in the last day, by name.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let head = self.committed();
        let since = now_ms() - DEVICE_MEMORY_MS;
        let mut out: Vec<DeviceInfo> = self.with_devices(|d| {
            d.iter()
                .filter(|(_, s)| s.sessions > 0 || s.last_seen_ms >= since)
                .map(|(name, s)| info(name, s, head))
                .collect()
        });
        out.sort_by(|a, b| a.device.cmp(&b.device));
        out
    }

    /// `(devices online, sessions)` following the branch.
    pub fn presence_counts(&self) -> (u32, u32) {
        self.with_devices(|d| {
            d.values()
                .filter(|s| s.sessions > 0)
                .fold((0, 0), |(n, s), st| (n + 1, s + st.sessions))
        })
    }
}

fn info(device: &Name, s: &DeviceState, head: u64) -> DeviceInfo {
    DeviceInfo {
        device: device.clone(),
        role: s.role,
        online: s.sessions > 0,
        sessions: s.sessions,
        last_seen_ms: s.last_seen_ms,
        acked_seq: s.acked_seq,
        lag: s.acked_seq.map(|a| head.saturating_sub(a)),
        last_device_seq: s.last_device_seq,
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few field updates).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Events per second over a sliding minute, in one-second buckets.
struct RateWindow {
    buckets: [u64; 60],
    last_sec: i64,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            buckets: [0; 60],
            last_sec: now_ms() / 1000,
        }
    }
}

impl RateWindow {
    fn advance(&mut self, now_ms: UnixMillis) {
        let sec = now_ms / 1000;
        let gap = (sec - self.last_sec).clamp(0, 60);
        for i in 1..=gap {
            self.buckets[((self.last_sec + i).rem_euclid(60)) as usize] = 0;
        }
        self.last_sec = sec;
    }

    fn add(&mut self, n: u64, now_ms: UnixMillis) {
        self.advance(now_ms);
        self.buckets[(self.last_sec.rem_euclid(60)) as usize] += n;
    }

    fn per_second(&mut self, now_ms: UnixMillis) -> f64 {
        self.advance(now_ms);
        self.buckets.iter().sum::<u64>() as f64 / 60.0
    }
}

/// A handle to a branch: its shared state and its writer's mailbox.
pub struct BranchHandle {
    /// What every part of the hub shares about the branch.
    pub shared: Arc<BranchShared>,
    tx: mpsc::Sender<BranchCmd>,
    log: Arc<dyn EventLog>,
}

/// A SKU's stock movements after some seq: their sum, up to and including `until`.
#[derive(Clone, Copy, Debug)]
struct Moved {
    until: u64,
    sum: i64,
}

/// The movements of `sku` sequenced in `after < seq <= until`, from the log (committed
/// events only). A hole (retention trimmed past `after`) is `stale_base`.
fn movements(
    log: &dyn EventLog,
    key: &BranchKey,
    sku: &Sku,
    after: u64,
    until: u64,
) -> Result<Moved, Refused> {
    let mut moved = Moved {
        until: after,
        sum: 0,
    };
    while moved.until < until {
        let events = log
            .read_events(key, moved.until, until, 1024)
            .map_err(|e| {
                tracing::error!(error = %e, "reading the log for a count failed");
                Refused::new(ErrorCode::StorageUnavailable, "the store cannot be read")
            })?;
        if events.first().is_none_or(|e| e.seq != moved.until + 1) {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                "the log was trimmed past base_seq; count again",
            ));
        }
        for e in &events {
            moved.sum = moved.sum.saturating_add(sku_delta(&e.bytes, sku)?);
            moved.until = e.seq;
        }
    }
    Ok(moved)
}

/// What one stored event moved `sku` by.
fn sku_delta(bytes: &[u8], sku: &Sku) -> Result<i64, Refused> {
    let event: Event = Codec::MsgPack
        .decode(bytes)
        .map_err(|e| Refused::new(ErrorCode::Internal, format!("stored event unreadable: {e}")))?;
    Ok(event
        .body
        .stock_deltas()
        .into_iter()
        .filter(|(s, _)| *s == sku)
        .fold(0i64, |sum, (_, d)| sum.saturating_add(d)))
}

enum BranchCmd {
    Publish {
        publish: Box<Publish>,
        device: Name,
        offset_ms: i64,
        /// For a `stock.counted`: its SKU's movements from `base_seq` up to the head when it
        /// was submitted, read from the log before it reached the writer.
        moved: Option<Result<Moved, Refused>>,
        reply: oneshot::Sender<PushResult>,
    },
    Resolve {
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
        reply: oneshot::Sender<Result<ResolveResponse, Rejected>>,
    },
    Snapshot {
        reply: oneshot::Sender<Result<(StateSnapshot, u64), ErrorCode>>,
    },
}

/// The answer to a publish the writer could not take (it stopped: the hub is shutting down).
pub fn writer_gone(publish_id: Option<Uuid>, branch: &Name) -> PushResult {
    PushResult::Rejected(Rejected {
        event_id: publish_id,
        branch: Some(branch.clone()),
        code: ErrorCode::ShuttingDown,
        message: "the hub is shutting down".into(),
        expected_device_seq: None,
        conflict: None,
    })
}

impl BranchHandle {
    /// Queues a publish; the receiver yields its answer after the commit.
    pub async fn submit(
        &self,
        publish: Publish,
        device: Name,
        offset_ms: i64,
    ) -> oneshot::Receiver<PushResult> {
        let (reply, rx) = oneshot::channel();
        let moved = match (&publish.body, publish.base_seq) {
            // The long part of a count, reading the log since its base, happens here, off the
            // writer: the writer then adds only what was sequenced since.
            (EventBody::StockCounted(c), base_seq) => {
                let (log, key, sku) = (self.log.clone(), self.shared.key.clone(), c.sku.clone());
                let (after, until) = (base_seq.unwrap_or(0), self.shared.committed());
                Some(
                    tokio::task::spawn_blocking(move || movements(&*log, &key, &sku, after, until))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Refused::new(
                                ErrorCode::ShuttingDown,
                                "the hub is shutting down",
                            ))
                        }),
                )
            }
            _ => None,
        };
        let cmd = BranchCmd::Publish {
            publish: Box::new(publish),
            device,
            offset_ms,
            moved,
            reply,
        };
        if let Err(mpsc::error::SendError(BranchCmd::Publish { publish, reply, .. })) =
            self.tx.send(cmd).await
        {
            let _ = reply.send(writer_gone(Some(publish.event_id), &self.shared.key.branch));
        }
        rx
    }

    /// Resolves a held conflict; answers after the `conflict.resolved` event is durable.
    pub async fn resolve(
        &self,
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
    ) -> Result<ResolveResponse, Rejected> {
        let (reply, rx) = oneshot::channel();
        let gone = || Rejected {
            event_id: None,
            branch: Some(self.shared.key.branch.clone()),
            code: ErrorCode::ShuttingDown,
            message: "the hub is shutting down".into(),
            expected_device_seq: None,
            conflict: None,
        };
        if self
            .tx
            .send(BranchCmd::Resolve {
                id,
                request,
                admin,
                reply,
            })
            .await
            .is_err()
        {
            return Err(gone());
        }
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// A snapshot of the branch state and the seq it is exactly at, once that seq is durable.
    pub async fn snapshot(&self) -> Result<(StateSnapshot, u64), ErrorCode> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(BranchCmd::Snapshot { reply }).await.is_err() {
            return Err(ErrorCode::ShuttingDown);
        }
        rx.await.unwrap_or(Err(ErrorCode::ShuttingDown))
    }
}

/// What every writer needs from the hub.
#[derive(Clone)]
pub struct WriterCtx {
    /// The store.
    pub log: Arc<dyn EventLog>,
    /// Where commits go.
    pub committer: CommitSender,
    /// Conflict policies.
    pub policies: Policies,
    /// Whether the store takes writes.
    pub health: Arc<StoreHealth>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tracks writer tasks for shutdown.
    pub tracker: TaskTracker,
}

/// Every branch the hub has opened, each with its writer.
pub struct Branches {
    map: DashMap<BranchKey, Arc<OnceCell<Arc<BranchHandle>>>>,
    ctx: Mutex<Option<WriterCtx>>,
}

impl Branches {
    /// An empty registry whose writers use `ctx`.
    pub fn new(ctx: WriterCtx) -> Self {
        Self {
            map: DashMap::new(),
            ctx: Mutex::new(Some(ctx)),
        }
    }

    /// The branch, opened (and its log created) on first use.
    pub async fn get(&self, key: &BranchKey) -> Result<Arc<BranchHandle>, BranchError> {
        // The common case is a branch already open: no await at all.
        if let Some(handle) = self.map.get(key).and_then(|cell| cell.get().cloned()) {
            return Ok(handle);
        }
        // Opening is rare; boxing it keeps every caller's future (and so every session task)
        // small.
        Box::pin(self.open(key)).await
    }

    async fn open(&self, key: &BranchKey) -> Result<Arc<BranchHandle>, BranchError> {
        let cell = self.map.entry(key.clone()).or_default().clone();
        let handle = cell
            .get_or_try_init(|| async {
                let ctx = lock(&self.ctx).clone().ok_or(BranchError::Closed)?;
                let log = ctx.log.clone();
                let k = key.clone();
                let (loaded, known) = tokio::task::spawn_blocking(move || {
                    let loaded = log.open_branch(&k)?;
                    let mut ids = Vec::new();
                    log.dedup_ids(&k, &mut |id| ids.push(id))?;
                    let mut known = DedupFilter::with_capacity(ids.len());
                    for id in &ids {
                        known.insert(id);
                    }
                    Ok::<_, StoreError>((loaded, known))
                })
                .await
                .map_err(|_| BranchError::Closed)??;
                Ok::<_, BranchError>(Arc::new(spawn_writer(
                    Arc::new(key.clone()),
                    loaded,
                    known,
                    ctx,
                )))
            })
            .await?;
        Ok(handle.clone())
    }

    /// The branches opened so far.
    pub fn opened(&self) -> Vec<Arc<BranchHandle>> {
        self.map
            .iter()
            .filter_map(|e| e.value().get().cloned())
            .collect()
    }

    /// Drops every handle and refuses new ones, so that writers finish their queues and stop.
    pub fn close(&self) {
        lock(&self.ctx).take();
        self.map.clear();
    }
}

/// Why a branch could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hub is shutting down.
    #[error("the hub is shutting down")]
    Closed,
}

impl BranchError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            BranchError::Store(_) => ErrorCode::StorageUnavailable,
            BranchError::Closed => ErrorCode::ShuttingDown,
        }
    }
}

fn spawn_writer(
    key: Arc<BranchKey>,
    mut loaded: LoadedBranch,
    known: DedupFilter,
    ctx: WriterCtx,
) -> BranchHandle {
    let tracker = ctx.tracker.clone();
    let log = ctx.log.clone();
    let state = BranchState::load(
        std::mem::take(&mut loaded.products),
        std::mem::take(&mut loaded.stock),
        std::mem::take(&mut loaded.open_conflicts),
    );
    let shared = Arc::new(BranchShared::new(key, &loaded, &state));
    let (tx, rx) = mpsc::channel(MAILBOX);
    let writer = Writer {
        shared: shared.clone(),
        head: loaded.head,
        last_server_time: loaded.head_time_ms,
        devices: loaded.devices,
        state,
        uncommitted: VecDeque::new(),
        uncommitted_ids: HashMap::new(),
        known,
        hash_buf: Vec::new(),
        poisoned: false,
        ctx,
    };
    tracker.spawn(writer.run(rx));
    BranchHandle { shared, tx, log }
}

/// An event sequenced but perhaps not yet durable.
struct Pending {
    seq: u64,
    event_id: Uuid,
    bytes: bytes::Bytes,
}

/// The single writer of one branch.
struct Writer {
    shared: Arc<BranchShared>,
    ctx: WriterCtx,
    /// The last sequenced seq (≥ the committed head).
    head: u64,
    last_server_time: UnixMillis,
    devices: HashMap<Name, u64>,
    state: BranchState,
    uncommitted: VecDeque<Pending>,
    uncommitted_ids: HashMap<Uuid, (u64, u64)>,
    /// Which event ids the branch may have accepted: most new ids skip the store lookup.
    known: DedupFilter,
    hash_buf: Vec<u8>,
    /// Set if sequencing failed after the state changed: memory may no longer match the
    /// log, so nothing more is sequenced until a restart reloads it.
    poisoned: bool,
}

/// What a publish's content is, for idempotency: everything but the envelope's transport
/// fields (`device_seq` may legitimately change when a device renumbers its outbox).
#[derive(Serialize)]
struct Content<'a> {
    body: &'a EventBody,
    client_time_ms: UnixMillis,
    base_seq: Option<u64>,
    base_version: Option<u64>,
}

/// A round's work in progress.
struct Round {
    item: CommitItem,
    events: Vec<StoredEvent>,
    /// Each event's id and content hash (its dedup entry), in the order of `events`.
    ids: Vec<(Uuid, u64)>,
    /// Bytes of the events' encodings.
    bytes: usize,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<BranchCmd>) {
        let mut cmds = Vec::with_capacity(ROUND);
        while rx.recv_many(&mut cmds, ROUND).await > 0 {
            self.forget_committed();
            let mut round = self.round(cmds.len());
            for cmd in cmds.drain(..) {
                self.handle(cmd, &mut round);
                // A round is one live frame for every follower: it ends once its events
                // fill one (clients read frames of up to a few MiB).
                if round.bytes >= FRAME_EVENT_BYTES {
                    let full = std::mem::replace(&mut round, self.round(ROUND));
                    self.finish(full).await;
                }
            }
            self.finish(round).await;
        }
    }

    fn round(&self, commands: usize) -> Round {
        Round {
            item: CommitItem {
                branch: self.shared.clone(),
                ops: Vec::new(),
                head: self.head,
                live: None,
                replies: Vec::with_capacity(commands),
                device_seqs: Vec::new(),
            },
            events: Vec::new(),
            ids: Vec::new(),
            bytes: 0,
        }
    }

    /// Hands a round to the committer.
    async fn finish(&mut self, round: Round) {
        let Round {
            mut item,
            events,
            ids,
            ..
        } = round;
        item.head = self.head;
        if !events.is_empty() {
            // The round's events, dedup entries, head and device counters go to the store as
            // a few values (see `log`); the state ops are already in `item.ops`.
            item.ops.push(Op::Round {
                branch: self.shared.key.clone(),
                events: events.clone(),
                ids,
                head: self.head,
                devices: self
                    .devices
                    .iter()
                    .map(|(d, seq)| (d.clone(), *seq))
                    .collect(),
            });
            let now = now_ms();
            lock(&self.shared.rate).add(events.len() as u64, now);
            item.live = Some(Arc::new(LiveBatch::new(
                self.shared.key.clone(),
                self.shared.epoch,
                events,
            )));
        }
        self.shared
            .oversold
            .store(self.state.oversold_skus(), Ordering::Relaxed);
        self.shared
            .open_conflicts
            .store(self.state.open_conflicts(), Ordering::Relaxed);
        self.ctx.committer.send(item).await;
    }

    fn forget_committed(&mut self) {
        let committed = self.shared.committed();
        while self.uncommitted.front().is_some_and(|p| p.seq <= committed) {
            if let Some(p) = self.uncommitted.pop_front() {
                self.uncommitted_ids.remove(&p.event_id);
            }
        }
    }

    fn handle(&mut self, cmd: BranchCmd, round: &mut Round) {
        match cmd {
            BranchCmd::Publish {
                publish,
                device,
                offset_ms,
                moved,
                reply,
            } => {
                let result = self.publish(*publish, &device, offset_ms, moved, round);
                round
                    .item
                    .replies
                    .push(answer(reply, result, |code, result| match result {
                        PushResult::Rejected(r) => PushResult::Rejected(Rejected {
                            code,
                            message: code_message(code),
                            expected_device_seq: None,
                            conflict: None,
                            ..r
                        }),
                        PushResult::Accepted(a) => PushResult::Rejected(Rejected {
                            event_id: Some(a.event_id),
                            branch: Some(a.branch),
                            code,
                            message: code_message(code),
                            expected_device_seq: None,
                            conflict: None,
                        }),
                    }));
            }
            BranchCmd::Resolve {
                id,
                request,
                admin,
                reply,
            } => {
                let result = self.resolve(&id, &request, &admin, round);
                round.item.replies.push(answer(reply, result, |code, _| {
                    Err(Rejected {
                        event_id: None,
                        branch: None,
                        code,
                        message: code_message(code),
                        expected_device_seq: None,
                        conflict: None,
                    })
                }));
            }
            BranchCmd::Snapshot { reply } => {
                // Answered after the commit that makes `head` durable: a snapshot never shows
                // an effect a crash could take back.
                let result = if self.ctx.health.failed() {
                    Err(ErrorCode::StorageUnavailable)
                } else {
                    Ok((self.state.snapshot(), self.head))
                };
                round
                    .item
                    .replies
                    .push(answer(reply, result, |code, _| Err(code)));
            }
        }
    }

    fn rejected(
        &self,
        publish: &Publish,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> PushResult {
        PushResult::Rejected(Rejected {
            event_id: Some(publish.event_id),
            branch: Some(publish.branch.clone()),
            code,
            message: message.into(),
            expected_device_seq: None,
            conflict: None,
        })
    }

    fn accepted(&self, event_id: Uuid, seq: u64, duplicate: bool) -> PushResult {
        PushResult::Accepted(Accepted {
            event_id,
            branch: self.shared.key.branch.clone(),
            epoch: self.shared.epoch,
            seq,
            duplicate,
        })
    }

    fn content_hash(&mut self, publish: &Publish) -> Result<u64, ErrorCode> {
        self.hash_buf.clear();
        let content = Content {
            body: &publish.body,
            client_time_ms: publish.client_time_ms,
            base_seq: publish.base_seq,
            base_version: publish.base_version,
        };
        Codec::MsgPack
            .encode_into(&content, &mut self.hash_buf)
            .map_err(|_| ErrorCode::InvalidEvent)?;
        Ok(xxhash_rust::xxh3::xxh3_64(&self.hash_buf))
    }

    fn known(&self, event_id: &Uuid) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(found) = self.uncommitted_ids.get(event_id) {
            return Ok(Some(*found));
        }
        if !self.known.may_contain(event_id) {
            return Ok(None);
        }
        Ok(self
            .ctx
            .log
            .dedup(&self.shared.key, event_id)?
            .map(|d| (d.seq, d.hash)))
    }

    fn server_time(&mut self) -> UnixMillis {
        // Server times never go backwards within a branch: retention by age relies on it.
        self.last_server_time = now_ms().max(self.last_server_time);
        self.last_server_time
    }

    /// Sequences one publish (PROTOCOL.md §7).
    fn publish(
        &mut self,
        publish: Publish,
        device: &Name,
        offset_ms: i64,
        moved: Option<Result<Moved, Refused>>,
        round: &mut Round,
    ) -> PushResult {
        if self.ctx.health.failed() {
            return self.rejected(
                &publish,
                ErrorCode::StorageUnavailable,
                code_message(ErrorCode::StorageUnavailable),
            );
        }
        if self.poisoned {
            return self.rejected(&publish, ErrorCode::Internal, POISONED);
        }
        if publish.event_id.get_version_num() != 7 {
            return self.rejected(
                &publish,
                ErrorCode::InvalidEvent,
                "event_id must be a UUID version 7",
            );
        }
        if publish.device_seq == 0 {
            return self.rejected(&publish, ErrorCode::InvalidEvent, "device_seq starts at 1");
        }
        if let Err(e) = publish
            .body
            .validate(publish.base_seq, publish.base_version)
        {
            return self.rejected(&publish, ErrorCode::InvalidEvent, e.0);
        }
        let hash = match self.content_hash(&publish) {
            Ok(h) => h,
            Err(code) => return self.rejected(&publish, code, "the event cannot be encoded"),
        };
        match self.known(&publish.event_id) {
            Ok(Some((seq, known_hash))) if known_hash == hash => {
                return self.accepted(publish.event_id, seq, true);
            }
            Ok(Some((seq, _))) => {
                return self.rejected(
                    &publish,
                    ErrorCode::IdempotencyMismatch,
                    format!(
                        "event {} was accepted at seq {seq} with other content",
                        publish.event_id
                    ),
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "dedup lookup failed");
                return self.rejected(
                    &publish,
                    ErrorCode::StorageUnavailable,
                    "the store cannot be read",
                );
            }
        }
        // A retry of an accepted event is answered above, whatever the disk; a new one is
        // refused while the store cannot take writes (low on space: for a while).
        if let Err(why) = self.ctx.health.writable() {
            return self.rejected(&publish, why.code(), why.to_string());
        }
        let last = self.devices.get(device).copied().unwrap_or(0);
        let expected = last + 1;
        if publish.device_seq != expected {
            let (code, why) = if publish.device_seq > expected {
                (ErrorCode::OutOfOrder, "skips ahead")
            } else {
                (ErrorCode::DeviceSeqReused, "was already used")
            };
            return PushResult::Rejected(Rejected {
                event_id: Some(publish.event_id),
                branch: Some(publish.branch.clone()),
                code,
                message: format!(
                    "device_seq {} {why}; expected {expected}",
                    publish.device_seq
                ),
                expected_device_seq: Some(expected),
                conflict: None,
            });
        }
        let seq = self.head + 1;
        let now = self.server_time();
        let moved = match (&publish.body, moved) {
            (EventBody::StockCounted(c), Some(pre)) => Some(
                pre.and_then(|pre| self.moved_since(&c.sku, publish.base_seq.unwrap_or(0), pre)),
            ),
            _ => None,
        };
        let ctx = WriteCtx {
            branch: &self.shared.key.branch,
            device,
            event_id: publish.event_id,
            seq,
            now_ms: now,
            // A device clock still ahead of the hub's after correction cannot make a write
            // newer than its arrival (it would win every `newest_wins` comparison).
            write_time_ms: publish.client_time_ms.saturating_add(offset_ms).min(now),
            base_version: publish.base_version.unwrap_or(0),
        };
        let applied = self
            .state
            .apply(&publish.body, &ctx, self.ctx.policies, |_| {
                moved.unwrap_or(Ok(0))
            });
        let applied = match applied {
            Ok(applied) => applied,
            Err(refused) => return self.refuse(&publish, refused, round),
        };
        let event_id = publish.event_id;
        let device_seq = publish.device_seq;
        let event = Event {
            branch: self.shared.key.branch.clone(),
            epoch: self.shared.epoch,
            seq,
            event_id,
            device: device.clone(),
            device_seq,
            client_time_ms: publish.client_time_ms,
            server_time_ms: now,
            base_seq: publish.base_seq,
            base_version: publish.base_version,
            body: publish.body,
            effect: applied.effect.clone(),
        };
        if let Err(code) = self.append(&event, applied, hash, round) {
            return PushResult::Rejected(Rejected {
                event_id: Some(event_id),
                branch: Some(self.shared.key.branch.clone()),
                code,
                message: code_message(code),
                expected_device_seq: None,
                conflict: None,
            });
        }
        self.devices.insert(device.clone(), device_seq);
        let seqs = &mut round.item.device_seqs;
        match seqs.iter_mut().find(|(d, _)| d == device) {
            Some(entry) => entry.1 = device_seq,
            None => seqs.push((device.clone(), device_seq)),
        }
        self.accepted(event_id, seq, false)
    }

    /// Adds a sequenced event and its state changes to the round. The state has already
    /// changed: if anything here fails, the branch is poisoned (see [`Writer::poisoned`]).
    fn append(
        &mut self,
        event: &Event,
        applied: Applied,
        hash: u64,
        round: &mut Round,
    ) -> Result<(), ErrorCode> {
        // Everything that can fail happens before the round changes.
        let encoded = Codec::MsgPack
            .encode(event)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot encode an event");
                ErrorCode::Internal
            })
            .and_then(|bytes| Ok((bytes, changes_ops(&self.shared.key, applied.changes)?)));
        let (bytes, ops) = match encoded {
            Ok(done) => done,
            Err(code) => {
                tracing::error!(branch = %self.shared.key, "{POISONED}");
                self.poisoned = true;
                return Err(code);
            }
        };
        round.item.ops.extend(ops);
        round.ids.push((event.event_id, hash));
        self.head = event.seq;
        self.uncommitted_ids
            .insert(event.event_id, (event.seq, hash));
        self.known.insert(&event.event_id);
        self.uncommitted.push_back(Pending {
            seq: event.seq,
            event_id: event.event_id,
            bytes: bytes.clone(),
        });
        round.bytes += bytes.len();
        round.events.push(StoredEvent {
            seq: event.seq,
            server_time_ms: event.server_time_ms,
            bytes,
        });
        Ok(())
    }

    fn refuse(&mut self, publish: &Publish, refused: Refused, round: &mut Round) -> PushResult {
        if let Some(record) = refused.record {
            // The conflict is recorded although the event is refused.
            match changes_ops(&self.shared.key, vec![Change::Conflict(record)]) {
                Ok(ops) => round.item.ops.extend(ops),
                Err(code) => return self.rejected(publish, code, code_message(code)),
            }
        }
        PushResult::Rejected(Rejected {
            event_id: Some(publish.event_id),
            branch: Some(publish.branch.clone()),
            code: refused.code,
            message: refused.message,
            expected_device_seq: None,
            conflict: refused.conflict,
        })
    }

    /// The sum of `sku`'s movements sequenced after `base_seq`, for a count: `pre` (read
    /// from the log when the count was submitted) and what was sequenced since.
    fn moved_since(&self, sku: &Sku, base_seq: u64, pre: Moved) -> Result<i64, Refused> {
        let floor = self.shared.floor();
        if base_seq > self.head {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                format!("base_seq {base_seq} is past the head {}", self.head),
            ));
        }
        if base_seq < floor {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                format!(
                    "base_seq {base_seq} is below the floor {floor}: the movements since are trimmed; count again"
                ),
            ));
        }
        let committed = self.shared.committed();
        let since = movements(&*self.ctx.log, &self.shared.key, sku, pre.until, committed)?;
        let mut sum = pre.sum.saturating_add(since.sum);
        for p in self
            .uncommitted
            .iter()
            .filter(|p| p.seq > committed.max(pre.until))
        {
            sum = sum.saturating_add(sku_delta(&p.bytes, sku)?);
        }
        Ok(sum)
    }

    fn resolve(
        &mut self,
        id: &Uuid,
        request: &ResolveRequest,
        admin: &Name,
        round: &mut Round,
    ) -> Result<ResolveResponse, Rejected> {
        let fail = |code: ErrorCode, message: String| Rejected {
            event_id: None,
            branch: None,
            code,
            message,
            expected_device_seq: None,
            conflict: None,
        };
        if let Err(why) = self.ctx.health.writable() {
            return Err(fail(why.code(), why.to_string()));
        }
        if self.poisoned {
            return Err(fail(ErrorCode::Internal, POISONED.into()));
        }
        let seq = self.head + 1;
        let now = self.server_time();
        let (applied, body) = match self.state.resolve(
            id,
            request.resolution,
            request.fields.as_ref(),
            admin,
            now,
            seq,
        ) {
            Ok(done) => done,
            Err(refused) if refused.code == ErrorCode::NotFound => {
                // Every open conflict is in memory, so a recorded one that is not there has
                // been resolved, perhaps by a resolution not yet durable (whose record still
                // says open).
                return Err(match self.ctx.log.conflict(&self.shared.key, id) {
                    Ok(Some(_)) => fail(
                        ErrorCode::ConflictAlreadyResolved,
                        format!("conflict {id} was already resolved"),
                    ),
                    Ok(None) => fail(ErrorCode::NotFound, refused.message),
                    Err(e) => {
                        tracing::error!(error = %e, "reading a conflict failed");
                        fail(
                            ErrorCode::StorageUnavailable,
                            "the store cannot be read".into(),
                        )
                    }
                });
            }
            Err(refused) => return Err(fail(refused.code, refused.message)),
        };
        let record = applied.changes.iter().rev().find_map(|c| match c {
            Change::Conflict(r) => Some((**r).clone()),
            _ => None,
        });
        let hub = Name::new(HUB_DEVICE).map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        let event = Event {
            branch: self.shared.key.branch.clone(),
            epoch: self.shared.epoch,
            seq,
            event_id: Uuid::now_v7(),
            device: hub,
            device_seq: 0,
            client_time_ms: now,
            server_time_ms: now,
            base_seq: None,
            base_version: None,
            body: EventBody::ConflictResolved(body),
            effect: applied.effect.clone(),
        };
        self.append(&event, applied, 0, round)
            .map_err(|code| fail(code, code_message(code)))?;
        let conflict =
            record.ok_or_else(|| fail(ErrorCode::Internal, "resolution lost its record".into()))?;
        Ok(ResolveResponse {
            conflict,
            epoch: self.shared.epoch,
            seq,
        })
    }
}

/// Why a poisoned branch refuses writes.
const POISONED: &str = "sequencing failed after the branch state changed; the branch refuses writes until the hub restarts";

/// Turns state changes into store ops.
fn changes_ops(branch: &Arc<BranchKey>, changes: Vec<Change>) -> Result<Vec<Op>, ErrorCode> {
    fn encode<T: Serialize>(value: &T) -> Result<bytes::Bytes, ErrorCode> {
        Codec::MsgPack.encode(value).map_err(|e| {
            tracing::error!(error = %e, "cannot encode branch state");
            ErrorCode::Internal
        })
    }
    let mut ops = Vec::with_capacity(changes.len());
    for change in changes {
        ops.push(match change {
            Change::Stock(sku, on_hand) => Op::Stock {
                branch: branch.clone(),
                sku,
                on_hand,
            },
            Change::Product(sku, state) => Op::Product {
                branch: branch.clone(),
                sku,
                state: encode(&*state)?,
            },
            Change::Conflict(record) => Op::Conflict {
                branch: branch.clone(),
                id: record.id,
                record: encode(&*record)?,
            },
        });
    }
    Ok(ops)
}

fn code_message(code: ErrorCode) -> String {
    match code {
        ErrorCode::StorageUnavailable => {
            "the hub cannot write to its store; nothing was accepted".into()
        }
        ErrorCode::ShuttingDown => "the hub is shutting down".into(),
        other => other.as_str().replace('_', " "),
    }
}

/// A reply that sends `result` after a durable commit, or what `on_failure` makes of it when
/// the commit failed.
fn answer<T: Send + 'static>(
    reply: oneshot::Sender<T>,
    result: T,
    on_failure: impl FnOnce(ErrorCode, T) -> T + Send + 'static,
) -> Reply {
    Box::new(move |commit: Result<(), ErrorCode>| {
        let out = match commit {
            Ok(()) => result,
            Err(code) => on_failure(code, result),
        };
        let _ = reply.send(out);
    })
}
