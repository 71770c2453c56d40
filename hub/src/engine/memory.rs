//! An engine that keeps everything in memory, for tests: the second implementation of
//! [`Engine`], which proves that sessions, rooms and HTTP depend on the boundary alone (no
//! sled type crosses it). It applies the same [`Sequencer`] rules; "durable" here means
//! "recorded", and a commit is each publish on its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use branchline_protocol::http::{ResolveRequest, ResolveResponse};
use branchline_protocol::{
    BranchKey, ConflictRecord, ConflictStatus, Epoch, ErrorCode, Name, Publish, Rejected,
    ResyncReason, Sku, UnixMillis,
};
use futures::FutureExt;
use uuid::Uuid;

use super::sequence::{Lookups, Outcome, Sequenced, Sequencer, sku_delta};
use super::{
    Answer, Committed, Engine, EngineError, Feed, Opened, Origin, Publication, Read, StopError,
    StoredEvent, Unwritable,
};
use crate::config::RetentionConfig;
use crate::state::{BranchState, Change, Policies, Refused, StateSnapshot};

/// One branch's log, all in memory.
struct Log {
    key: Arc<BranchKey>,
    epoch: Epoch,
    seq: Sequencer,
    events: Vec<StoredEvent>,
    floor: u64,
    dedup: HashMap<Uuid, (u64, u64)>,
    conflicts: BTreeMap<Uuid, ConflictRecord>,
}

impl Log {
    /// Events after `after`, up to `until`, at most `limit`.
    fn range(&self, after: u64, until: u64, limit: usize) -> Vec<StoredEvent> {
        self.events
            .iter()
            .filter(|e| e.seq > after && e.seq <= until)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Stores what the sequencer decided and tells the feed.
    fn commit(&mut self, sequenced: Sequenced, feed: &dyn Feed) {
        let Sequenced {
            stored,
            event_id,
            hash,
            changes,
            device_seq,
        } = sequenced;
        self.record(changes);
        self.dedup.insert(event_id, (stored.seq, hash));
        self.events.push(stored.clone());
        feed.committed(Committed {
            branch: self.key.clone(),
            head: self.seq.head(),
            publication: Some(Arc::new(Publication::new(
                self.key.clone(),
                self.epoch,
                vec![stored],
            ))),
            device_seqs: device_seq.into_iter().collect(),
            oversold: self.seq.oversold(),
            open_conflicts: self.seq.open_conflicts(),
        });
    }

    /// Keeps the conflict records among `changes` (the state changes live in the sequencer).
    fn record(&mut self, changes: Vec<Change>) {
        for change in changes {
            if let Change::Conflict(record) = change {
                self.conflicts.insert(record.id, *record);
            }
        }
    }
}

/// What the rules ask of a memory log.
struct MemoryLookups<'a> {
    events: &'a [StoredEvent],
    dedup: &'a HashMap<Uuid, (u64, u64)>,
    floor: u64,
}

impl Lookups for MemoryLookups<'_> {
    fn known(&mut self, event_id: &Uuid) -> Result<Option<(u64, u64)>, Refused> {
        Ok(self.dedup.get(event_id).copied())
    }

    fn moved_since(&mut self, sku: &Sku, base_seq: u64, head: u64) -> Result<i64, Refused> {
        if base_seq > head || base_seq < self.floor {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                format!(
                    "base_seq {base_seq} is outside the log ({}..={head})",
                    self.floor
                ),
            ));
        }
        let mut sum = 0i64;
        for e in self.events.iter().filter(|e| e.seq > base_seq) {
            sum = sum.saturating_add(sku_delta(&e.bytes, sku)?);
        }
        Ok(sum)
    }

    fn writable(&self) -> Result<(), Unwritable> {
        Ok(())
    }
}

/// The memory engine.
pub struct MemoryEngine {
    logs: Mutex<HashMap<BranchKey, Log>>,
    feed: Arc<dyn Feed>,
    policies: Policies,
}

impl MemoryEngine {
    /// An empty engine reporting to `feed`, settling conflicts by `policies`.
    pub fn new(feed: Arc<dyn Feed>, policies: Policies) -> Self {
        Self {
            logs: Mutex::new(HashMap::new()),
            feed,
            policies,
        }
    }

    fn logs(&self) -> MutexGuard<'_, HashMap<BranchKey, Log>> {
        self.logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on `branch`'s log, making the log (with a fresh epoch) if it has none. The
    /// lock is held throughout: commits are in order, and the feed hears of them in order.
    fn with_log<T>(&self, branch: &BranchKey, f: impl FnOnce(&mut Log, &dyn Feed) -> T) -> T {
        let mut logs = self.logs();
        let log = logs.entry(branch.clone()).or_insert_with(|| {
            let key = Arc::new(branch.clone());
            let epoch = Epoch(rand::random());
            Log {
                key: key.clone(),
                epoch,
                seq: Sequencer::new(
                    key,
                    epoch,
                    0,
                    0,
                    HashMap::new(),
                    BranchState::default(),
                    self.policies,
                ),
                events: Vec::new(),
                floor: 0,
                dedup: HashMap::new(),
                conflicts: BTreeMap::new(),
            }
        });
        f(log, &*self.feed)
    }
}

#[async_trait::async_trait]
impl Engine for MemoryEngine {
    async fn open(&self, branch: &BranchKey) -> Result<Opened, EngineError> {
        Ok(self.with_log(branch, |log, _| Opened {
            epoch: log.epoch,
            head: log.seq.head(),
            floor: log.floor,
            devices: log.seq.devices(),
            oversold: log.seq.oversold(),
            open_conflicts: log.seq.open_conflicts(),
        }))
    }

    async fn publish(&self, branch: &BranchKey, publish: Publish, origin: Origin) -> Answer {
        let answer = self.with_log(branch, |log, feed| {
            let mut lookups = MemoryLookups {
                events: &log.events,
                dedup: &log.dedup,
                floor: log.floor,
            };
            match log
                .seq
                .publish(publish, &origin.device, origin.offset_ms, &mut lookups)
            {
                Outcome::Sequenced(sequenced, answer) => {
                    log.commit(*sequenced, feed);
                    answer
                }
                Outcome::Answered(answer, record) => {
                    log.record(record.into_iter().map(Change::Conflict).collect());
                    answer
                }
            }
        });
        futures::future::ready(answer).boxed()
    }

    async fn resolve(
        &self,
        branch: &BranchKey,
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
    ) -> Result<ResolveResponse, Rejected> {
        self.with_log(branch, |log, feed| {
            let recorded = log.conflicts.contains_key(&id);
            let (sequenced, response) = log
                .seq
                .resolve(&id, &request, &admin, Ok(()), |_| Ok(recorded))?;
            log.commit(*sequenced, feed);
            Ok(response)
        })
    }

    async fn snapshot(&self, branch: &BranchKey) -> Result<(StateSnapshot, u64), ErrorCode> {
        Ok(self.with_log(branch, |log, _| log.seq.snapshot()))
    }

    async fn read(
        &self,
        branch: &BranchKey,
        epoch: Epoch,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Read, EngineError> {
        Ok(self.with_log(branch, |log, _| {
            if epoch != log.epoch {
                Read::Resync(ResyncReason::EpochMismatch)
            } else if after > log.seq.head() {
                Read::Resync(ResyncReason::AheadOfHead)
            } else if after < log.floor {
                Read::Resync(ResyncReason::BelowFloor)
            } else {
                Read::Events(log.range(after, until, limit))
            }
        }))
    }

    async fn conflicts(
        &self,
        branch: &BranchKey,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, EngineError> {
        Ok(self.with_log(branch, |log, _| {
            // Ids are UUID v7: the newest is the greatest.
            log.conflicts
                .values()
                .rev()
                .filter(|c| status.is_none_or(|s| s == c.status))
                .take(limit)
                .cloned()
                .collect()
        }))
    }

    async fn retain(
        &self,
        retention: &RetentionConfig,
        _now: UnixMillis,
        _dedup: bool,
    ) -> Result<(), EngineError> {
        let mut logs = self.logs();
        for log in logs.values_mut() {
            let floor = log.seq.head().saturating_sub(retention.max_events);
            if floor > log.floor {
                log.floor = floor;
                self.feed.trimmed(&log.key, floor);
                log.events.retain(|e| e.seq > floor);
            }
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), Unwritable> {
        Ok(())
    }

    fn check_space(&self) {}

    async fn stop(&self, _deadline: tokio::time::Instant) -> Result<(), StopError> {
        Ok(())
    }
}
