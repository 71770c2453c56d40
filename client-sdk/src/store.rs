//! The device's local store (sled): outbox, quarantine, `device_seq` counters, per-branch
//! positions, the local replica of branch state and the local log the event stream reads.
//!
//! Everything lives in sled's default tree under key prefixes, so that one
//! [`sled::Batch`] is one atomic write across all of them: an applied event moves the
//! branch position, updates the replica, appends to the local log and retires its outbox
//! entry together, and a crash never leaves one without the others.
//!
//! | key | value |
//! |---|---|
//! | `meta/order` | next outbox ordinal (u64 BE) |
//! | `meta/log` | next local log offset (u64 BE) |
//! | `meta/clock` | last measured clock offset, ms (i64 BE) |
//! | `c/{branch}` | the branch position `(epoch, seq)` the replica is at |
//! | `n/{branch}` | the next `device_seq` to assign on the branch (u64 BE) |
//! | `o/{branch}/{ordinal}` | an outbox entry, in publish order |
//! | `q/{branch}/{event_id}` | a quarantined event |
//! | `p/{branch}/{sku}` | a product of the replica |
//! | `s/{branch}/{sku}` | a stock level of the replica |
//! | `l/{offset}` | the local log of updates the event stream reads |
//!
//! The outbox is also mirrored in memory behind a mutex: publishing, renumbering and
//! retiring entries are read-modify-writes that must not interleave, and the mirror makes
//! pending counts and read-your-writes overlays cheap. Applying events and snapshots holds
//! the mutex too, so a reader that takes it sees the replica and the outbox at one instant
//! ([`Store::branch_view`]). The mutex is never held across an `.await`.
//!
//! An outbox entry carries two marks besides its event: `sent` (flushed before the first
//! send the hub could apply; it forbids raising the entry's `device_seq`) and `accepted`
//! (written when the hub answers, not flushed: losing it only costs a resend).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use branchline_durable::{Closing, DurableDir};
use branchline_protocol::{
    Codec, ErrorCode, Event, EventBody, Name, Position, ProductRecord, Publish, Rejected, Sku,
    StockLevel, UnixMillis, now_ms,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::update::Update;

/// How long dropping a store waits for sled's closing flush: long enough for a healthy disk,
/// bounded for one that cannot take it (a full disk would otherwise hang the app).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A failure of the store's files (a sync, a listing) as a store error.
fn disk(e: std::io::Error) -> Error {
    Error::Store(sled::Error::Io(e))
}

const META_ORDER: &[u8] = b"meta/order";
const META_LOG: &[u8] = b"meta/log";
const META_CLOCK: &[u8] = b"meta/clock";

fn key(prefix: &str, branch: &Name, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + branch.as_str().len() + rest.len() + 2);
    k.extend_from_slice(prefix.as_bytes());
    k.push(b'/');
    k.extend_from_slice(branch.as_str().as_bytes());
    if !rest.is_empty() {
        k.push(b'/');
        k.extend_from_slice(rest);
    }
    k
}

fn branch_prefix(prefix: &str, branch: &Name) -> Vec<u8> {
    let mut k = key(prefix, branch, b"");
    k.push(b'/');
    k
}

fn log_key(offset: u64) -> Vec<u8> {
    let mut k = b"l/".to_vec();
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn enc<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(Codec::MsgPack.encode(value)?.to_vec())
}

fn dec<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    Codec::MsgPack
        .decode(bytes)
        .map_err(|e| Error::corrupt(key, e))
}

fn u64_of(key: &[u8], bytes: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::corrupt(key, "expected 8 bytes"))
}

/// An event recorded on this device and not yet seen sequenced: in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingEvent {
    /// The branch it is published to.
    pub branch: Name,
    /// Its identity (UUID v7), kept across retries and renumbering.
    pub event_id: Uuid,
    /// The `device_seq` it currently carries. It may change before the hub accepts it:
    /// when an event ahead of it is quarantined, or when the hub says the device's counter
    /// was lost (PROTOCOL.md §7).
    pub device_seq: u64,
    /// When it happened, on the device's clock corrected by the measured offset to the hub.
    pub client_time_ms: UnixMillis,
    /// For `stock.counted`: the last seq the device had applied.
    #[serde(default)]
    pub base_seq: Option<u64>,
    /// For `product.*`: the product version the write is based on.
    #[serde(default)]
    pub base_version: Option<u64>,
    /// Kind and body.
    pub body: EventBody,
    /// When it was recorded, on the device's own clock (for "oldest pending" ages).
    pub recorded_at_ms: UnixMillis,
    /// Where the hub sequenced it, once it said `accepted` (the entry stays until the event
    /// itself is applied to the replica, so reads keep showing it in between). Kept in the
    /// store (without waiting for a flush), so that after a restart the entry is not sent
    /// again and a snapshot that already holds it retires it.
    #[serde(default)]
    pub accepted: Option<Position>,
    /// Whether the hub may have applied it: set, and on disk, before the first send whose
    /// `device_seq` the hub could have applied. Such an event never gets a higher
    /// `device_seq` again, and if the hub calls its number `device_seq_reused` it is
    /// quarantined instead of renumbered: the hub may have applied it and since forgotten
    /// its id, and a new number would apply it twice (PROTOCOL.md §7).
    #[serde(default)]
    pub sent: bool,
    #[serde(skip)]
    order: u64,
}

impl PendingEvent {
    /// The entry's place in the outbox (publish order), stable across renumbering.
    pub(crate) fn order(&self) -> u64 {
        self.order
    }

    /// The `publish` frame (or batch push element) for this event.
    pub fn to_publish(&self) -> Publish {
        Publish {
            branch: self.branch.clone(),
            event_id: self.event_id,
            device_seq: self.device_seq,
            client_time_ms: self.client_time_ms,
            base_seq: self.base_seq,
            base_version: self.base_version,
            body: self.body.clone(),
        }
    }
}

/// An event the hub refused permanently, set aside so the events behind it go through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantinedEvent {
    /// The event as it was last sent.
    pub event: PendingEvent,
    /// Why the hub refused it.
    pub code: ErrorCode,
    /// The hub's explanation.
    pub message: String,
    /// For `conflict`: what the hub has.
    #[serde(default)]
    pub conflict: Option<branchline_protocol::ConflictDetail>,
    /// When it was quarantined, on the device's clock.
    pub quarantined_at_ms: UnixMillis,
}

/// The outcome of applying a run of events to a branch.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// How many events were applied (and written to the local log).
    pub applied: usize,
    /// The first event that did not follow the position: (expected seq, got seq).
    pub gap: Option<(u64, u64)>,
    /// An event of another epoch than the position's: the log was reset, resync.
    pub epoch_mismatch: bool,
}

/// What [`Store::renumber`] did.
#[derive(Debug, Default)]
pub(crate) struct Renumbered {
    /// Entries that got another number.
    pub changed: usize,
    /// Sent entries that would have needed a higher number, moved to quarantine.
    pub quarantined: Vec<QuarantinedEvent>,
}

/// A branch as the store holds it at one instant: the confirmed replica and the outbox
/// entries not yet applied to it, read together so that no event is in both or neither.
#[derive(Debug)]
pub(crate) struct BranchView {
    /// The position the confirmed replica is at.
    pub position: Option<Position>,
    /// Confirmed products, in SKU order.
    pub products: Vec<ProductRecord>,
    /// Confirmed stock levels, in SKU order.
    pub stock: Vec<StockLevel>,
    /// Outbox entries of the branch, in publish order.
    pub pending: Vec<PendingEvent>,
}

struct Inner {
    /// The outbox: per branch, by ordinal (publish order).
    outbox: BTreeMap<Name, BTreeMap<u64, PendingEvent>>,
    /// event id → (branch, ordinal), for retiring entries when their event arrives.
    index: HashMap<Uuid, (Name, u64)>,
    next_order: u64,
    next_log: u64,
    log_len: u64,
    quarantined: usize,
}

/// The local store. Cheap to share behind an `Arc`.
pub(crate) struct Store {
    db: Closing<sled::Db>,
    /// Makes sled's flushes durable (see [`Store::flush`]); `None` for a temporary store,
    /// which does not outlive the process: only a store on disk needs sent marks flushed
    /// before the sends leave.
    durable_dir: Option<Arc<DurableDir>>,
    inner: Mutex<Inner>,
    log_capacity: u64,
    /// Whether `record` waits for the flush ([`ClientOptions::durable_publish`]).
    ///
    /// [`ClientOptions::durable_publish`]: crate::ClientOptions::durable_publish
    durable: bool,
    /// Sent marks were written since the last [`Store::sync_sent`].
    sent_unsynced: AtomicBool,
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, log_capacity: u64, durable: bool) -> Result<Self> {
        // What an interrupted snapshot left (a full disk) would stop sled from opening.
        branchline_durable::prepare(path).map_err(disk)?;
        let db = sled::Config::new().path(path).open().map_err(|e| match e {
            // sled reports a held file lock as an `Other` I/O error with this text.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                Error::StoreLocked {
                    path: path.display().to_string(),
                }
            }
            other => Error::Store(other),
        })?;
        db.flush()?;
        let dir = DurableDir::open(path).map_err(disk)?;
        Self::from_db(db, log_capacity, durable, Some(Arc::new(dir)))
    }

    /// A store that lives in a temporary directory and is deleted when dropped (dashboards,
    /// tests).
    pub fn temporary(log_capacity: u64) -> Result<Self> {
        let db = sled::Config::new().temporary(true).open()?;
        Self::from_db(db, log_capacity, false, None)
    }

    fn from_db(
        db: sled::Db,
        log_capacity: u64,
        durable: bool,
        dir: Option<Arc<DurableDir>>,
    ) -> Result<Self> {
        let mut outbox: BTreeMap<Name, BTreeMap<u64, PendingEvent>> = BTreeMap::new();
        let mut index = HashMap::new();
        for kv in db.scan_prefix(b"o/") {
            let (k, v) = kv?;
            let mut e: PendingEvent = dec(&k, &v)?;
            e.order = k
                .len()
                .checked_sub(8)
                .and_then(|at| k.get(at..))
                .map(|b| u64_of(&k, b))
                .transpose()?
                .ok_or_else(|| Error::corrupt(&k, "outbox key too short"))?;
            index.insert(e.event_id, (e.branch.clone(), e.order));
            outbox
                .entry(e.branch.clone())
                .or_default()
                .insert(e.order, e);
        }
        let next_order = match db.get(META_ORDER)? {
            Some(v) => u64_of(META_ORDER, &v)?,
            None => 1,
        };
        let next_log = match db.get(META_LOG)? {
            Some(v) => u64_of(META_LOG, &v)?,
            None => 1,
        };
        let log_len = db.scan_prefix(b"l/").count() as u64;
        let quarantined = db.scan_prefix(b"q/").count();
        Ok(Self {
            // A dropped client gives sled a moment to finish its last flush, but never hangs
            // the app on a disk that cannot take it.
            db: Closing::new(db, CLOSE_WAIT),
            durable_dir: dir,
            inner: Mutex::new(Inner {
                outbox,
                index,
                next_order,
                next_log,
                log_len,
                quarantined,
            }),
            log_capacity: log_capacity.max(1),
            durable,
            sent_unsynced: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the mirror half-updated in a way that
        // matters more than losing the client: every change is written to sled first.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every write so far is on stable storage, as a power cut would find it:
    /// sled's flush, then `fdatasync` of what it wrote and `fsync` of directories it changed
    /// (sled's flush alone ends in `sync_file_range`, which a power cut can undo). Concurrent
    /// calls share the syncs.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        if let Some(dir) = self.durable_dir.clone() {
            tokio::task::spawn_blocking(move || dir.sync())
                .await
                .map_err(|e| disk(std::io::Error::other(e)))?
                .map_err(disk)?;
        }
        Ok(())
    }

    // ---- outbox -------------------------------------------------------------------------

    fn next_dseq(&self, branch: &Name) -> Result<u64> {
        let k = key("n", branch, b"");
        match self.db.get(&k)? {
            Some(v) => u64_of(&k, &v),
            None => Ok(1),
        }
    }

    /// Records an event in the outbox with the branch's next `device_seq`, durably (when
    /// the store was opened durable).
    pub async fn record(
        &self,
        branch: &Name,
        body: EventBody,
        base_seq: Option<u64>,
        base_version: Option<u64>,
        client_time_ms: UnixMillis,
    ) -> Result<PendingEvent> {
        let entry = {
            let mut inner = self.lock();
            let device_seq = self.next_dseq(branch)?;
            let order = inner.next_order;
            let entry = PendingEvent {
                branch: branch.clone(),
                event_id: Uuid::now_v7(),
                device_seq,
                client_time_ms,
                base_seq,
                base_version,
                body,
                recorded_at_ms: now_ms(),
                accepted: None,
                sent: false,
                order,
            };
            let mut batch = sled::Batch::default();
            batch.insert(key("o", branch, &order.to_be_bytes()), enc(&entry)?);
            batch.insert(key("n", branch, b""), &(device_seq + 1).to_be_bytes());
            batch.insert(META_ORDER, &(order + 1).to_be_bytes());
            self.db.apply_batch(batch)?;
            inner.next_order = order + 1;
            inner.index.insert(entry.event_id, (branch.clone(), order));
            inner
                .outbox
                .entry(branch.clone())
                .or_default()
                .insert(order, entry.clone());
            entry
        };
        if self.durable {
            self.flush().await?;
        }
        Ok(entry)
    }

    /// Every outbox entry of `branch`, in publish order.
    #[cfg(test)]
    pub fn pending(&self, branch: &Name) -> Vec<PendingEvent> {
        pending_of(&self.lock(), branch, |_| true)
    }

    /// The confirmed replica of `branch` and its outbox entries, read under the lock that
    /// applying events takes, so an event applied meanwhile is counted exactly once: either
    /// in the replica or as pending.
    pub fn branch_view(&self, branch: &Name) -> Result<BranchView> {
        let inner = self.lock();
        Ok(BranchView {
            position: self.cursor(branch)?,
            products: self.confirmed_products(branch)?,
            stock: self.confirmed_stock_levels(branch)?,
            pending: pending_of(&inner, branch, |_| true),
        })
    }

    /// Like [`Store::branch_view`] for one SKU: its confirmed product and stock level and
    /// the outbox entries touching it, read consistently.
    pub fn sku_view(
        &self,
        branch: &Name,
        sku: &Sku,
    ) -> Result<(Option<ProductRecord>, Option<StockLevel>, Vec<PendingEvent>)> {
        let inner = self.lock();
        Ok((
            self.confirmed_product(branch, sku)?,
            self.confirmed_stock(branch, sku)?,
            pending_of(&inner, branch, |e| crate::replica::touches(e, sku)),
        ))
    }

    /// Every outbox entry, by branch then publish order.
    pub fn all_pending(&self) -> Vec<PendingEvent> {
        self.lock()
            .outbox
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// Branches with outbox entries.
    pub fn outbox_branches(&self) -> Vec<Name> {
        self.lock()
            .outbox
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Up to `limit` entries of `branch` not yet accepted, in publish order, after the entry
    /// with ordinal `after`, or from the first.
    pub fn unaccepted(&self, branch: &Name, after: Option<u64>, limit: usize) -> Vec<PendingEvent> {
        let inner = self.lock();
        let Some(m) = inner.outbox.get(branch) else {
            return Vec::new();
        };
        let start = after.map_or(0, |o| o + 1);
        m.range(start..)
            .map(|(_, e)| e)
            .filter(|e| e.accepted.is_none())
            .take(limit)
            .cloned()
            .collect()
    }

    /// (entries not yet accepted, recorded time of the oldest of them), over all branches.
    pub fn pending_stats(&self) -> (u64, Option<UnixMillis>) {
        let inner = self.lock();
        let mut count = 0;
        let mut oldest: Option<UnixMillis> = None;
        for e in inner.outbox.values().flat_map(|m| m.values()) {
            if e.accepted.is_none() {
                count += 1;
                oldest = Some(oldest.map_or(e.recorded_at_ms, |o| o.min(e.recorded_at_ms)));
            }
        }
        (count, oldest)
    }

    /// Entries in quarantine.
    pub fn quarantined_count(&self) -> usize {
        self.lock().quarantined
    }

    /// The hub accepted `event_id` at `position`. The entry is retired now if the replica
    /// already holds that position (or the branch is not followed, so the event will never
    /// arrive); otherwise it stays, marked, until the event is applied.
    pub fn mark_accepted(&self, event_id: Uuid, position: Position, followed: bool) -> Result<()> {
        let mut inner = self.lock();
        let Some((branch, order)) = inner.index.get(&event_id).cloned() else {
            return Ok(());
        };
        let cursor = self.cursor(&branch)?;
        let applied = cursor.is_some_and(|c| c.epoch == position.epoch && c.seq >= position.seq);
        let k = key("o", &branch, &order.to_be_bytes());
        if !followed || applied {
            self.db.remove(k)?;
            remove_entry(&mut inner, &branch, order);
        } else if let Some(e) = inner
            .outbox
            .get_mut(&branch)
            .and_then(|m| m.get_mut(&order))
        {
            let mut marked = e.clone();
            marked.accepted = Some(position);
            // Not flushed: losing the mark in a crash only means sending the event again,
            // which the hub answers `duplicate` (or, if it forgot the event, which the
            // `sent` mark makes a quarantine).
            self.db.insert(k, enc(&marked)?)?;
            *e = marked;
        }
        Ok(())
    }

    /// Retires the entries of `branch` the hub has accepted, when the branch is no longer
    /// followed (a client restarted with other branches): their events will never arrive
    /// to retire them.
    pub fn retire_accepted(&self, branch: &Name) -> Result<()> {
        let mut inner = self.lock();
        let accepted: Vec<u64> = inner
            .outbox
            .get(branch)
            .map(|m| {
                m.values()
                    .filter(|e| e.accepted.is_some())
                    .map(|e| e.order)
                    .collect()
            })
            .unwrap_or_default();
        let mut batch = sled::Batch::default();
        for order in &accepted {
            batch.remove(key("o", branch, &order.to_be_bytes()));
        }
        self.db.apply_batch(batch)?;
        for order in accepted {
            remove_entry(&mut inner, branch, order);
        }
        Ok(())
    }

    /// Marks entries of `branch` (by ordinal) as possibly applied by the hub (see
    /// [`PendingEvent::sent`]), in one write. [`Store::sync_sent`] must follow before the
    /// sends leave.
    pub fn mark_sent(&self, branch: &Name, orders: &[u64]) -> Result<()> {
        let mut inner = self.lock();
        let Some(m) = inner.outbox.get_mut(branch) else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        let mut marked = Vec::new();
        for order in orders {
            if let Some(e) = m.get(order).filter(|e| !e.sent) {
                let mut e = e.clone();
                e.sent = true;
                batch.insert(key("o", branch, &order.to_be_bytes()), enc(&e)?);
                marked.push(e);
            }
        }
        if marked.is_empty() {
            return Ok(());
        }
        self.db.apply_batch(batch)?;
        for e in marked {
            m.insert(e.order, e);
        }
        self.sent_unsynced.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Waits until every sent mark written so far is on disk. Called before frames or a
    /// push leave, so a crash can never leave a send the hub may have applied without its
    /// mark. Cheap when nothing new was marked (a resend), and a no-op for a temporary
    /// store, whose outbox does not outlive the process anyway.
    pub async fn sync_sent(&self) -> Result<()> {
        if self.sent_unsynced.swap(false, Ordering::SeqCst) && self.durable_dir.is_some() {
            if let Err(e) = self.flush().await {
                self.sent_unsynced.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Moves an entry the hub refused permanently into quarantine.
    pub fn quarantine(
        &self,
        event_id: Uuid,
        rejected: &Rejected,
    ) -> Result<Option<QuarantinedEvent>> {
        let mut inner = self.lock();
        let Some((branch, order)) = inner.index.get(&event_id).cloned() else {
            return Ok(None);
        };
        let Some(event) = inner
            .outbox
            .get(&branch)
            .and_then(|m| m.get(&order))
            .cloned()
        else {
            return Ok(None);
        };
        let q = QuarantinedEvent {
            event,
            code: rejected.code,
            message: rejected.message.clone(),
            conflict: rejected.conflict.as_deref().cloned(),
            quarantined_at_ms: now_ms(),
        };
        let mut batch = sled::Batch::default();
        batch.remove(key("o", &branch, &order.to_be_bytes()));
        batch.insert(key("q", &branch, event_id.as_bytes()), enc(&q)?);
        self.db.apply_batch(batch)?;
        remove_entry(&mut inner, &branch, order);
        inner.quarantined += 1;
        Ok(Some(q))
    }

    /// Every quarantined event, by branch.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedEvent>> {
        self.db
            .scan_prefix(b"q/")
            .map(|kv| {
                let (k, v) = kv?;
                dec(&k, &v)
            })
            .collect()
    }

    fn find_quarantined(&self, event_id: Uuid) -> Result<(Vec<u8>, QuarantinedEvent)> {
        for kv in self.db.scan_prefix(b"q/") {
            let (k, v) = kv?;
            if k.ends_with(event_id.as_bytes()) {
                let q: QuarantinedEvent = dec(&k, &v)?;
                if q.event.event_id == event_id {
                    return Ok((k.to_vec(), q));
                }
            }
        }
        Err(Error::NotQuarantined(event_id))
    }

    /// Puts a quarantined event back at the end of its branch's outbox, with the next
    /// `device_seq`, to be sent again.
    pub fn retry_quarantined(&self, event_id: Uuid) -> Result<PendingEvent> {
        let mut inner = self.lock();
        let (qkey, q) = self.find_quarantined(event_id)?;
        let branch = q.event.branch.clone();
        let device_seq = self.next_dseq(&branch)?;
        let order = inner.next_order;
        let entry = PendingEvent {
            device_seq,
            order,
            accepted: None,
            sent: false,
            ..q.event
        };
        let mut batch = sled::Batch::default();
        batch.remove(qkey);
        batch.insert(key("o", &branch, &order.to_be_bytes()), enc(&entry)?);
        batch.insert(key("n", &branch, b""), &(device_seq + 1).to_be_bytes());
        batch.insert(META_ORDER, &(order + 1).to_be_bytes());
        self.db.apply_batch(batch)?;
        inner.next_order = order + 1;
        inner.quarantined = inner.quarantined.saturating_sub(1);
        inner.index.insert(event_id, (branch.clone(), order));
        inner
            .outbox
            .entry(branch)
            .or_default()
            .insert(order, entry.clone());
        Ok(entry)
    }

    /// Deletes a quarantined event for good.
    pub fn drop_quarantined(&self, event_id: Uuid) -> Result<QuarantinedEvent> {
        let mut inner = self.lock();
        let (qkey, q) = self.find_quarantined(event_id)?;
        self.db.remove(qkey)?;
        inner.quarantined = inner.quarantined.saturating_sub(1);
        Ok(q)
    }

    /// Renumbers the not-yet-accepted entries of `branch`, in publish order, as
    /// `from, from + 1, …`, and sets the branch counter after them. Used after a quarantine
    /// (to close the gap), `out_of_order` and `device_seq_reused` (PROTOCOL.md §7), with
    /// `from` the number the hub expects next. Accepted entries keep their numbers.
    ///
    /// An entry marked [`PendingEvent::sent`] is never given a *higher* number: the hub may
    /// have applied it under its number and, once the event left the hub's log, forgotten
    /// its id, so a number the hub has not used yet would get it applied a second time. An
    /// entry that would need one is quarantined instead (the hub would answer it
    /// `device_seq_reused`, and can no longer tell whether it was applied). Lowering a sent
    /// entry is safe: if the hub applied it, the lower number is one it has used too.
    /// `refused` are entries whose only send that could have been applied the hub has just
    /// refused: they were never applied, so they count as unsent again.
    pub fn renumber(
        &self,
        branch: &Name,
        from: u64,
        refused: &HashSet<Uuid>,
    ) -> Result<Renumbered> {
        let mut inner = self.lock();
        let mut batch = sled::Batch::default();
        let mut next = from.max(1);
        let mut out = Renumbered::default();
        let mut rewritten = Vec::new();
        if let Some(m) = inner.outbox.get(branch) {
            for e in m.values().filter(|e| e.accepted.is_none()) {
                let sent = e.sent && !refused.contains(&e.event_id);
                let k = key("o", branch, &e.order.to_be_bytes());
                if sent && e.device_seq < next {
                    let q = QuarantinedEvent {
                        event: e.clone(),
                        code: ErrorCode::DeviceSeqReused,
                        message: format!(
                            "sent before as device_seq {}, and the hub has moved past that \
                             number (it expects {from}): it may have applied the event and, \
                             the event having left its log, forgotten it. A new number could \
                             apply it twice, so it waits here: drop it if the branch holds \
                             it, retry it if not",
                            e.device_seq
                        ),
                        conflict: None,
                        quarantined_at_ms: now_ms(),
                    };
                    batch.remove(k);
                    batch.insert(key("q", branch, e.event_id.as_bytes()), enc(&q)?);
                    out.quarantined.push(q);
                    continue;
                }
                if e.device_seq != next || sent != e.sent {
                    out.changed += usize::from(e.device_seq != next);
                    let mut e2 = e.clone();
                    e2.device_seq = next;
                    e2.sent = sent;
                    batch.insert(k, enc(&e2)?);
                    rewritten.push(e2);
                }
                next += 1;
            }
        }
        batch.insert(key("n", branch, b""), &next.to_be_bytes());
        self.db.apply_batch(batch)?;
        for q in &out.quarantined {
            remove_entry(&mut inner, branch, q.event.order);
            inner.quarantined += 1;
        }
        if let Some(m) = inner.outbox.get_mut(branch) {
            for e in rewritten {
                m.insert(e.order, e);
            }
        }
        Ok(out)
    }

    /// The hub says its last applied `device_seq` from this device on `branch` is `last`.
    /// If nothing is waiting to be sent there, the counter is set to follow it, so the next
    /// publish is numbered right (a restored or fresh store would otherwise start wrong).
    pub fn align_counter(&self, branch: &Name, last: u64) -> Result<()> {
        let inner = self.lock();
        let waiting = inner
            .outbox
            .get(branch)
            .is_some_and(|m| m.values().any(|e| e.accepted.is_none()));
        if !waiting && self.next_dseq(branch)? != last + 1 {
            self.db
                .insert(key("n", branch, b""), &(last + 1).to_be_bytes())?;
        }
        Ok(())
    }

    /// The `device_seq` the next publish on `branch` gets.
    #[cfg(test)]
    pub fn next_device_seq(&self, branch: &Name) -> Result<u64> {
        let _inner = self.lock();
        self.next_dseq(branch)
    }

    // ---- positions, replica, local log ----------------------------------------------------

    /// The position the replica of `branch` is at (`None` before the first snapshot).
    pub fn cursor(&self, branch: &Name) -> Result<Option<Position>> {
        let k = key("c", branch, b"");
        self.db.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    /// Applies consecutive events of one branch: position, replica (by each event's
    /// `effect`, PROTOCOL.md §10), local log and outbox retirement in one atomic write.
    /// Events the replica already holds are skipped; the run stops at a gap or an epoch
    /// change, which the caller must answer by resuming or resyncing.
    pub fn apply_events(&self, branch: &Name, events: Vec<Event>) -> Result<Applied> {
        let mut inner = self.lock();
        let mut out = Applied::default();
        let Some(mut pos) = self.cursor(branch)? else {
            // No snapshot yet: the caller must not deliver events before one.
            out.epoch_mismatch = true;
            return Ok(out);
        };
        let mut batch = sled::Batch::default();
        let mut retired = Vec::new();
        let mut next_log = inner.next_log;
        for event in events {
            if event.epoch != pos.epoch {
                out.epoch_mismatch = true;
                break;
            }
            if event.seq <= pos.seq {
                // Already applied (a replay overlapping what we hold).
                continue;
            }
            if event.seq != pos.seq + 1 {
                out.gap = Some((pos.seq + 1, event.seq));
                break;
            }
            for level in &event.effect.stock {
                batch.insert(key("s", branch, level.sku.as_str().as_bytes()), enc(level)?);
            }
            if let Some(p) = &event.effect.product {
                batch.insert(key("p", branch, p.sku.as_str().as_bytes()), enc(p)?);
            }
            if let Some((b, order)) = inner.index.get(&event.event_id).cloned() {
                if &b == branch {
                    batch.remove(key("o", branch, &order.to_be_bytes()));
                    retired.push(order);
                }
            }
            pos = event.position();
            let update = Update::Event(Box::new(event));
            batch.insert(log_key(next_log), enc(&update)?);
            out.applied += 1;
            next_log += 1;
        }
        if out.applied == 0 {
            return Ok(out);
        }
        batch.insert(key("c", branch, b""), enc(&pos)?);
        self.finish_log(&mut inner, &mut batch, next_log);
        self.db.apply_batch(batch)?;
        for order in retired {
            remove_entry(&mut inner, branch, order);
        }
        self.commit_log(&mut inner, next_log);
        Ok(out)
    }

    /// Replaces the replica of `branch` with a snapshot pinned at `position`, in one atomic
    /// write. Outbox entries the snapshot already contains are retired; entries accepted in
    /// another epoch are sent again (the hub deduplicates them by event id).
    pub fn apply_snapshot(
        &self,
        branch: &Name,
        position: Position,
        products: &[ProductRecord],
        stock: &[StockLevel],
    ) -> Result<(u64, Update)> {
        let mut inner = self.lock();
        let mut batch = sled::Batch::default();
        for prefix in ["p", "s"] {
            for k in self.db.scan_prefix(branch_prefix(prefix, branch)).keys() {
                batch.remove(k?);
            }
        }
        for p in products {
            batch.insert(key("p", branch, p.sku.as_str().as_bytes()), enc(p)?);
        }
        for s in stock {
            batch.insert(key("s", branch, s.sku.as_str().as_bytes()), enc(s)?);
        }
        batch.insert(key("c", branch, b""), enc(&position)?);
        let mut retired = Vec::new();
        let mut unaccepted = Vec::new();
        if let Some(m) = inner.outbox.get(branch) {
            for e in m.values() {
                match e.accepted {
                    Some(a) if a.epoch == position.epoch && a.seq <= position.seq => {
                        batch.remove(key("o", branch, &e.order.to_be_bytes()));
                        retired.push(e.order);
                    }
                    Some(a) if a.epoch != position.epoch => {
                        let mut e = e.clone();
                        e.accepted = None;
                        batch.insert(key("o", branch, &e.order.to_be_bytes()), enc(&e)?);
                        unaccepted.push(e);
                    }
                    _ => {}
                }
            }
        }
        let offset = inner.next_log;
        let update = Update::Resynced {
            branch: branch.clone(),
            position,
        };
        batch.insert(log_key(offset), enc(&update)?);
        self.finish_log(&mut inner, &mut batch, offset + 1);
        self.db.apply_batch(batch)?;
        for order in retired {
            remove_entry(&mut inner, branch, order);
        }
        if let Some(m) = inner.outbox.get_mut(branch) {
            for e in unaccepted {
                m.insert(e.order, e);
            }
        }
        self.commit_log(&mut inner, offset + 1);
        Ok((offset, update))
    }

    /// Adds the local log bookkeeping (next offset, trimming past capacity) to `batch`.
    fn finish_log(&self, inner: &mut Inner, batch: &mut sled::Batch, next_log: u64) {
        batch.insert(META_LOG, &next_log.to_be_bytes());
        let len = inner.log_len + (next_log - inner.next_log);
        if len > self.log_capacity {
            let first = next_log - len;
            for offset in first..next_log - self.log_capacity {
                batch.remove(log_key(offset));
            }
        }
    }

    fn commit_log(&self, inner: &mut Inner, next_log: u64) {
        inner.log_len = (inner.log_len + (next_log - inner.next_log)).min(self.log_capacity);
        inner.next_log = next_log;
    }

    /// The offset the next local log entry will get.
    pub fn log_end(&self) -> u64 {
        self.lock().next_log
    }

    /// The oldest offset still in the local log.
    pub fn log_start(&self) -> u64 {
        let inner = self.lock();
        inner.next_log - inner.log_len
    }

    /// The local log entry at `offset`, if still held.
    pub fn log_entry(&self, offset: u64) -> Result<Option<Update>> {
        let k = log_key(offset);
        self.db.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    /// The replica's product `sku` on `branch`, as the hub last confirmed it.
    pub fn confirmed_product(&self, branch: &Name, sku: &Sku) -> Result<Option<ProductRecord>> {
        let k = key("p", branch, sku.as_str().as_bytes());
        self.db.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    /// The replica's stock level of `sku` on `branch`, as the hub last confirmed it.
    pub fn confirmed_stock(&self, branch: &Name, sku: &Sku) -> Result<Option<StockLevel>> {
        let k = key("s", branch, sku.as_str().as_bytes());
        self.db.get(&k)?.map(|v| dec(&k, &v)).transpose()
    }

    /// Every product of the replica of `branch`, in SKU order.
    pub fn confirmed_products(&self, branch: &Name) -> Result<Vec<ProductRecord>> {
        self.scan_values(&branch_prefix("p", branch))
    }

    /// Every stock level of the replica of `branch`, in SKU order.
    pub fn confirmed_stock_levels(&self, branch: &Name) -> Result<Vec<StockLevel>> {
        self.scan_values(&branch_prefix("s", branch))
    }

    fn scan_values<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                dec(&k, &v)
            })
            .collect()
    }

    /// The last measured clock offset (hub minus device, ms), kept across restarts so events
    /// recorded offline before the first measurement are still corrected.
    pub fn clock_offset(&self) -> Result<Option<i64>> {
        self.db
            .get(META_CLOCK)?
            .map(|v| u64_of(META_CLOCK, &v).map(|u| u as i64))
            .transpose()
    }

    /// Stores the measured clock offset.
    pub fn set_clock_offset(&self, offset_ms: i64) -> Result<()> {
        self.db
            .insert(META_CLOCK, &(offset_ms as u64).to_be_bytes())?;
        Ok(())
    }
}

fn pending_of(
    inner: &Inner,
    branch: &Name,
    keep: impl Fn(&PendingEvent) -> bool,
) -> Vec<PendingEvent> {
    inner
        .outbox
        .get(branch)
        .map(|m| m.values().filter(|e| keep(e)).cloned().collect())
        .unwrap_or_default()
}

fn remove_entry(inner: &mut Inner, branch: &Name, order: u64) {
    if let Some(m) = inner.outbox.get_mut(branch) {
        if let Some(e) = m.remove(&order) {
            inner.index.remove(&e.event_id);
        }
        if m.is_empty() {
            inner.outbox.remove(branch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchline_protocol::{Custom, Effect, Epoch};

    fn b() -> Name {
        Name::new("b1").unwrap()
    }

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn event(epoch: u64, seq: u64, stock: &[(&str, i64)], id: Uuid) -> Event {
        Event {
            branch: b(),
            epoch: Epoch(epoch),
            seq,
            event_id: id,
            device: Name::new("till-1").unwrap(),
            device_seq: seq,
            client_time_ms: 0,
            server_time_ms: 0,
            base_seq: None,
            base_version: None,
            body: EventBody::Custom(Custom {
                custom_type: "t".into(),
                data: serde_json::Value::Null,
            }),
            effect: Effect {
                stock: stock
                    .iter()
                    .map(|(s, n)| StockLevel::new(sku(s), *n))
                    .collect(),
                product: None,
                conflict: None,
            },
        }
    }

    fn ev(seq: u64, on_hand: i64) -> Event {
        event(7, seq, &[("A", on_hand)], Uuid::now_v7())
    }

    #[test]
    fn events_apply_in_order_skipping_duplicates_and_stopping_at_gaps() {
        let s = Store::temporary(100).unwrap();
        s.apply_snapshot(&b(), Position::new(Epoch(7), 0), &[], &[])
            .unwrap();
        let a = s.apply_events(&b(), vec![ev(1, 5), ev(2, 4)]).unwrap();
        assert_eq!(a.applied, 2);
        assert_eq!(s.cursor(&b()).unwrap(), Some(Position::new(Epoch(7), 2)));
        // A replayed duplicate is skipped; a gap stops the run before it.
        let a = s
            .apply_events(&b(), vec![ev(2, 4), ev(3, 3), ev(5, 1)])
            .unwrap();
        assert_eq!(a.applied, 1);
        assert_eq!(a.gap, Some((4, 5)));
        assert_eq!(s.cursor(&b()).unwrap(), Some(Position::new(Epoch(7), 3)));
        assert_eq!(
            s.confirmed_stock(&b(), &sku("A")).unwrap().unwrap().on_hand,
            3
        );
        // Another epoch is never applied.
        let a = s
            .apply_events(&b(), vec![event(8, 4, &[("A", 0)], Uuid::now_v7())])
            .unwrap();
        assert!(a.epoch_mismatch && a.applied == 0);
        assert_eq!(
            s.confirmed_stock(&b(), &sku("A")).unwrap().unwrap().on_hand,
            3
        );
    }

    #[test]
    fn events_before_the_first_snapshot_are_refused() {
        let s = Store::temporary(100).unwrap();
        let a = s.apply_events(&b(), vec![ev(1, 5)]).unwrap();
        assert!(a.epoch_mismatch && a.applied == 0);
        assert_eq!(s.cursor(&b()).unwrap(), None);
    }

    #[tokio::test]
    async fn an_applied_own_event_retires_its_outbox_entry_atomically() {
        let s = Store::temporary(100).unwrap();
        s.apply_snapshot(&b(), Position::new(Epoch(7), 0), &[], &[])
            .unwrap();
        let e = s
            .record(
                &b(),
                EventBody::Custom(Custom {
                    custom_type: "t".into(),
                    data: serde_json::Value::Null,
                }),
                None,
                None,
                0,
            )
            .await
            .unwrap();
        s.mark_accepted(e.event_id, Position::new(Epoch(7), 1), true)
            .unwrap();
        assert_eq!(
            s.pending(&b()).len(),
            1,
            "kept until the event itself arrives"
        );
        assert_eq!(s.pending_stats().0, 0, "but no longer counted as pending");
        s.apply_events(&b(), vec![event(7, 1, &[], e.event_id)])
            .unwrap();
        assert!(s.pending(&b()).is_empty());
    }

    #[tokio::test]
    async fn renumbering_never_raises_a_sent_event_and_quarantines_it_instead() {
        let s = Store::temporary(100).unwrap();
        let body = || {
            EventBody::Custom(Custom {
                custom_type: "t".into(),
                data: serde_json::Value::Null,
            })
        };
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(s.record(&b(), body(), None, None, 0).await.unwrap());
        }
        // 1 and 2 were sent; the hub's answer for 2 was a refusal of its only send.
        s.mark_sent(&b(), &[ids[0].order(), ids[1].order()])
            .unwrap();
        let refused: HashSet<Uuid> = [ids[1].event_id].into();
        // Lowering is fine for anyone…
        let r = s.renumber(&b(), 1, &refused).unwrap();
        assert!(r.quarantined.is_empty() && r.changed == 0);
        // …raising is not, for a sent event.
        s.mark_sent(&b(), &[ids[1].order()]).unwrap();
        let r = s.renumber(&b(), 10, &refused).unwrap();
        assert_eq!(r.quarantined.len(), 1);
        assert_eq!(r.quarantined[0].event.event_id, ids[0].event_id);
        assert_eq!(r.quarantined[0].code, ErrorCode::DeviceSeqReused);
        assert_eq!(r.changed, 3);
        let left = s.pending(&b());
        assert_eq!(
            left.iter()
                .map(|e| (e.event_id, e.device_seq, e.sent))
                .collect::<Vec<_>>(),
            [
                (ids[1].event_id, 10, false),
                (ids[2].event_id, 11, false),
                (ids[3].event_id, 12, false)
            ]
        );
        assert_eq!(s.quarantined_count(), 1);
        assert_eq!(s.next_device_seq(&b()).unwrap(), 13);
    }

    #[test]
    fn a_view_of_a_branch_counts_each_event_once_while_events_are_applied() {
        // A reader laying pending events on the replica while the engine applies them must
        // never see an event in both parts or in neither.
        let s = Arc::new(Store::temporary(10_000).unwrap());
        s.apply_snapshot(&b(), Position::new(Epoch(7), 0), &[], &[])
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let n = 300;
        let mut recorded = Vec::new();
        for _ in 0..n {
            let body = EventBody::StockAdjusted(branchline_protocol::StockAdjusted {
                sku: sku("A"),
                delta: 1,
                reason: branchline_protocol::AdjustReason::Receipt,
                note: None,
            });
            recorded.push(rt.block_on(s.record(&b(), body, None, None, 0)).unwrap());
        }
        let reader = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut reads = 0;
                loop {
                    let v = s.branch_view(&b()).unwrap();
                    let confirmed = v.stock.first().map_or(0, |l| l.on_hand);
                    assert_eq!(
                        confirmed + v.pending.len() as i64,
                        n,
                        "at {:?}: {confirmed} confirmed + {} pending",
                        v.position,
                        v.pending.len()
                    );
                    let (_, level, pending) = s.sku_view(&b(), &sku("A")).unwrap();
                    assert_eq!(level.map_or(0, |l| l.on_hand) + pending.len() as i64, n);
                    reads += 1;
                    if v.pending.is_empty() {
                        return reads;
                    }
                }
            })
        };
        for (i, e) in recorded.iter().enumerate() {
            let seq = i as u64 + 1;
            s.apply_events(&b(), vec![event(7, seq, &[("A", seq as i64)], e.event_id)])
                .unwrap();
        }
        assert!(reader.join().unwrap() > 0);
    }

    #[tokio::test]
    async fn accepted_entries_of_a_branch_no_longer_followed_are_retired() {
        let s = Store::temporary(100).unwrap();
        let body = || {
            EventBody::Custom(Custom {
                custom_type: "t".into(),
                data: serde_json::Value::Null,
            })
        };
        let accepted = s.record(&b(), body(), None, None, 0).await.unwrap();
        let waiting = s.record(&b(), body(), None, None, 0).await.unwrap();
        s.mark_accepted(accepted.event_id, Position::new(Epoch(7), 1), true)
            .unwrap();
        s.retire_accepted(&b()).unwrap();
        let left: Vec<Uuid> = s.pending(&b()).iter().map(|e| e.event_id).collect();
        assert_eq!(left, [waiting.event_id]);
    }

    #[test]
    fn a_snapshot_replaces_the_replica_and_the_local_log_trims_to_capacity() {
        let s = Store::temporary(3).unwrap();
        s.apply_snapshot(
            &b(),
            Position::new(Epoch(7), 0),
            &[],
            &[StockLevel::new(sku("OLD"), 1)],
        )
        .unwrap();
        for seq in 1..=4 {
            s.apply_events(&b(), vec![ev(seq, 10 - seq as i64)])
                .unwrap();
        }
        assert_eq!(s.log_end() - s.log_start(), 3);
        assert!(s.log_entry(s.log_start() - 1).unwrap().is_none());
        let (_, u) = s
            .apply_snapshot(
                &b(),
                Position::new(Epoch(9), 40),
                &[],
                &[StockLevel::new(sku("NEW"), 2)],
            )
            .unwrap();
        assert!(matches!(u, Update::Resynced { .. }));
        let levels = s.confirmed_stock_levels(&b()).unwrap();
        assert_eq!(levels, vec![StockLevel::new(sku("NEW"), 2)]);
        assert_eq!(s.cursor(&b()).unwrap(), Some(Position::new(Epoch(9), 40)));
    }

    /// Opens the store at `path` again, waiting (for a while) until sled's background
    /// flusher of the previous instance has let go of it.
    fn reopen(path: &Path) -> Store {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Store::open(path, 10, true) {
                Err(Error::StoreLocked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
    }

    #[test]
    fn a_store_in_use_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path(), 10, true).unwrap();
        assert!(matches!(
            Store::open(dir.path(), 10, true),
            Err(Error::StoreLocked { .. })
        ));
    }

    #[tokio::test]
    async fn the_outbox_and_counters_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let body = || {
            EventBody::Custom(Custom {
                custom_type: "t".into(),
                data: serde_json::Value::Null,
            })
        };
        let ids: Vec<Uuid> = {
            let s = Store::open(dir.path(), 10, true).unwrap();
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(
                    s.record(&b(), body(), None, None, 0)
                        .await
                        .unwrap()
                        .event_id,
                );
            }
            s.renumber(&b(), 41, &HashSet::new()).unwrap();
            let first = s.pending(&b())[0].order();
            s.mark_sent(&b(), &[first]).unwrap();
            s.sync_sent().await.unwrap();
            s.mark_accepted(ids[2], Position::new(Epoch(7), 9), true)
                .unwrap();
            ids
        };
        let s = reopen(dir.path());
        let pending = s.pending(&b());
        assert_eq!(pending.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
        assert_eq!(
            pending.iter().map(|e| e.device_seq).collect::<Vec<_>>(),
            [41, 42, 43]
        );
        assert_eq!(
            pending.iter().map(|e| e.sent).collect::<Vec<_>>(),
            [true, false, false],
            "the sent mark is durable"
        );
        assert_eq!(
            pending[2].accepted,
            Some(Position::new(Epoch(7), 9)),
            "so is the acceptance"
        );
        assert_eq!(
            s.record(&b(), body(), None, None, 0)
                .await
                .unwrap()
                .device_seq,
            44
        );
    }
}
