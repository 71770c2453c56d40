//! The device's local store (sled): outbox, quarantine, `device_seq` counters, per-branch
//! positions, the local replica of branch state and the local log the event stream reads.
//!
//! Everything lives in sled's default tree under key prefixes, so that one
//! [`sled::Batch`] is one atomic write across all of them: an applied event moves the
//! branch position, updates the replica, appends to the local log and retires its outbox
//! entry together, and a crash never leaves one without the others.
//!
//! | key | value | part |
//! |---|---|---|
//! | `meta/order` | next outbox ordinal (u64 BE) | `outbox` |
//! | `meta/log` | next local log offset (u64 BE) | `log` |
//! | `meta/clock` | last measured clock offset, ms (i64 BE) | here |
//! | `c/{branch}` | the branch position `(epoch, seq)` the replica is at | `replica` |
//! | `n/{branch}` | the next `device_seq` to assign on the branch (u64 BE) | `outbox` |
//! | `o/{branch}/{ordinal}` | an outbox entry, in publish order | `outbox` |
//! | `q/{branch}/{event_id}` | a quarantined event | `quarantine` |
//! | `p/{branch}/{sku}` | a product of the replica | `replica` |
//! | `s/{branch}/{sku}` | a stock level of the replica | `replica` |
//! | `l/{offset}` | the local log of updates the event stream reads | `log` |
//!
//! Each part owns its keys and the changes that touch only it; a change that crosses parts
//! (applying events or a snapshot, quarantining, renumbering) is written here, as each
//! part's additions to one batch, applied once, and only then mirrored in memory.
//!
//! The outbox and the log's bookkeeping are also mirrored in memory behind a mutex:
//! publishing, renumbering and retiring entries are read-modify-writes that must not
//! interleave, and the mirror makes pending counts and read-your-writes overlays cheap.
//! Applying events and snapshots holds the mutex too, so a reader that takes it sees the
//! replica and the outbox at one instant ([`Store::branch_view`]). The mutex is never held
//! across an `.await`.

mod log;
mod outbox;
mod quarantine;
mod replica;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use branchline_durable::{Closing, DurableDir};
use branchline_protocol::{
    Codec, ErrorCode, Event, Name, Position, ProductRecord, Rejected, Sku, StockLevel,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use self::log::Log;
pub use self::outbox::PendingEvent;
use self::outbox::{Outbox, entry_key, set_counter};
pub use self::quarantine::QuarantinedEvent;
use crate::error::{Error, Result};
use crate::update::Update;

/// How long dropping a store waits for sled's closing flush: long enough for a healthy disk,
/// bounded for one that cannot take it (a full disk would otherwise hang the app).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A failure of the store's files (a sync, a listing) as a store error.
fn disk(e: std::io::Error) -> Error {
    Error::Store(sled::Error::Io(e))
}

/// `meta/clock`: the last measured clock offset, ms (i64 BE).
const META_CLOCK: &[u8] = b"meta/clock";

/// `{prefix}/{branch}` or `{prefix}/{branch}/{rest}`.
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

/// `{prefix}/{branch}/`: what every key of `branch` under `prefix` starts with.
fn branch_prefix(prefix: &str, branch: &Name) -> Vec<u8> {
    let mut k = key(prefix, branch, b"");
    k.push(b'/');
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

/// What the store mirrors in memory, under its mutex.
struct Inner {
    outbox: Outbox,
    log: Log,
    /// Entries in quarantine.
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
        let inner = Inner {
            outbox: Outbox::load(&db)?,
            log: Log::load(&db, log_capacity)?,
            quarantined: db.scan_prefix(b"q/").count(),
        };
        Ok(Self {
            // A dropped client gives sled a moment to finish its last flush, but never hangs
            // the app on a disk that cannot take it.
            db: Closing::new(db, CLOSE_WAIT),
            durable_dir: dir,
            inner: Mutex::new(inner),
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

    /// The value at `key`, if any.
    fn read<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.db.get(key)?.map(|v| dec(key, &v)).transpose()
    }

    /// Every value under `prefix`, in key order.
    fn scan_values<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                dec(&k, &v)
            })
            .collect()
    }

    // ---- reads across parts --------------------------------------------------------------

    /// The confirmed replica of `branch` and its outbox entries, read under the lock that
    /// applying events takes, so an event applied meanwhile is counted exactly once: either
    /// in the replica or as pending.
    pub fn branch_view(&self, branch: &Name) -> Result<BranchView> {
        let inner = self.lock();
        Ok(BranchView {
            position: self.cursor(branch)?,
            products: self.confirmed_products(branch)?,
            stock: self.confirmed_stock_levels(branch)?,
            pending: inner.outbox.pending(branch, |_| true),
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
            inner.outbox.pending(branch, |e| e.touches(sku)),
        ))
    }

    // ---- changes across parts: one batch each ----------------------------------------------

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
        let mut updates = Vec::new();
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
            replica::put_effect(&mut batch, branch, &event.effect)?;
            if let Some((b, order)) = inner.outbox.locate(event.event_id) {
                if &b == branch {
                    batch.remove(entry_key(branch, order));
                    retired.push(order);
                }
            }
            pos = event.position();
            updates.push(Update::Event(Box::new(event)));
        }
        out.applied = updates.len();
        if out.applied == 0 {
            return Ok(out);
        }
        replica::set_position(&mut batch, branch, pos)?;
        let log_end = inner.log.append(&mut batch, &updates)?;
        self.db.apply_batch(batch)?;
        for order in retired {
            inner.outbox.remove(branch, order);
        }
        inner.log.commit(log_end);
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
        self.clear_replica(&mut batch, branch)?;
        replica::put(&mut batch, branch, products, stock)?;
        replica::set_position(&mut batch, branch, position)?;
        let mut retired = Vec::new();
        let mut unaccepted = Vec::new();
        for e in inner.outbox.branch(branch) {
            match e.accepted {
                Some(a) if a.epoch == position.epoch && a.seq <= position.seq => {
                    batch.remove(entry_key(branch, e.order));
                    retired.push(e.order);
                }
                Some(a) if a.epoch != position.epoch => {
                    let mut e = e.clone();
                    e.accepted = None;
                    batch.insert(entry_key(branch, e.order), enc(&e)?);
                    unaccepted.push(e);
                }
                _ => {}
            }
        }
        let offset = inner.log.next();
        let update = Update::Resynced {
            branch: branch.clone(),
            position,
        };
        let log_end = inner
            .log
            .append(&mut batch, std::slice::from_ref(&update))?;
        self.db.apply_batch(batch)?;
        for order in retired {
            inner.outbox.remove(branch, order);
        }
        for e in unaccepted {
            inner.outbox.insert(e);
        }
        inner.log.commit(log_end);
        Ok((offset, update))
    }

    /// Moves an entry the hub refused permanently into quarantine.
    pub fn quarantine(
        &self,
        event_id: Uuid,
        rejected: &Rejected,
    ) -> Result<Option<QuarantinedEvent>> {
        let mut inner = self.lock();
        let Some((branch, order)) = inner.outbox.locate(event_id) else {
            return Ok(None);
        };
        let Some(event) = inner.outbox.get(&branch, order).cloned() else {
            return Ok(None);
        };
        let q = QuarantinedEvent::now(
            event,
            rejected.code,
            rejected.message.clone(),
            rejected.conflict.as_deref().cloned(),
        );
        let mut batch = sled::Batch::default();
        batch.remove(entry_key(&branch, order));
        q.put(&mut batch)?;
        self.db.apply_batch(batch)?;
        inner.outbox.remove(&branch, order);
        inner.quarantined += 1;
        Ok(Some(q))
    }

    /// Puts a quarantined event back at the end of its branch's outbox, with the next
    /// `device_seq`, to be sent again.
    pub fn retry_quarantined(&self, event_id: Uuid) -> Result<PendingEvent> {
        let mut inner = self.lock();
        let (qkey, q) = self.find_quarantined(event_id)?;
        let entry = PendingEvent {
            device_seq: self.next_dseq(&q.event.branch)?,
            order: inner.outbox.next_order(),
            accepted: None,
            sent: false,
            ..q.event
        };
        let mut batch = sled::Batch::default();
        batch.remove(qkey);
        Outbox::add(&mut batch, &entry)?;
        self.db.apply_batch(batch)?;
        inner.quarantined = inner.quarantined.saturating_sub(1);
        inner.outbox.added(entry.clone());
        Ok(entry)
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
        for e in inner.outbox.branch(branch).filter(|e| e.accepted.is_none()) {
            let sent = e.sent && !refused.contains(&e.event_id);
            let k = entry_key(branch, e.order);
            if sent && e.device_seq < next {
                let q = QuarantinedEvent::now(
                    e.clone(),
                    ErrorCode::DeviceSeqReused,
                    format!(
                        "sent before as device_seq {}, and the hub has moved past that \
                         number (it expects {from}): it may have applied the event and, \
                         the event having left its log, forgotten it. A new number could \
                         apply it twice, so it waits here: drop it if the branch holds \
                         it, retry it if not",
                        e.device_seq
                    ),
                    None,
                );
                batch.remove(k);
                q.put(&mut batch)?;
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
        set_counter(&mut batch, branch, next);
        self.db.apply_batch(batch)?;
        for q in &out.quarantined {
            inner.outbox.remove(branch, q.event.order);
            inner.quarantined += 1;
        }
        for e in rewritten {
            inner.outbox.insert(e);
        }
        Ok(out)
    }

    // ---- the clock ---------------------------------------------------------------------------

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
