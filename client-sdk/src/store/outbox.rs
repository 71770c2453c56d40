//! The outbox: events recorded on this device and not yet seen sequenced, with the
//! per-branch `device_seq` counters, mirrored in memory for cheap counts and overlays.
//!
//! An entry carries two marks besides its event: `sent` (flushed before the first send the
//! hub could apply; it forbids raising the entry's `device_seq`) and `accepted` (written when
//! the hub answers, not flushed: losing it only costs a resend).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use branchline_protocol::{EventBody, Name, Position, Publish, Sku, UnixMillis, now_ms};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Store, dec, enc, key, u64_of};
use crate::error::{Error, Result};

/// `meta/order`: the next outbox ordinal (u64 BE).
const META_ORDER: &[u8] = b"meta/order";

/// `o/{branch}/{ordinal}`: an outbox entry, in publish order.
pub(super) fn entry_key(branch: &Name, order: u64) -> Vec<u8> {
    key("o", branch, &order.to_be_bytes())
}

/// `n/{branch}`: the next `device_seq` to assign on the branch (u64 BE).
fn counter_key(branch: &Name) -> Vec<u8> {
    key("n", branch, b"")
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
    /// Its ordinal: the key's last part, not stored in the value.
    #[serde(skip)]
    pub(super) order: u64,
}

impl PendingEvent {
    /// The entry's place in the outbox (publish order), stable across renumbering.
    pub(crate) fn order(&self) -> u64 {
        self.order
    }

    /// Whether it touches `sku` (for single-SKU reads).
    pub(crate) fn touches(&self, sku: &Sku) -> bool {
        match &self.body {
            EventBody::SaleRecorded(s) => s.lines.iter().any(|l| &l.sku == sku),
            other => other.sku() == Some(sku),
        }
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

/// The outbox as mirrored in memory. Publishing, renumbering and retiring entries are
/// read-modify-writes that must not interleave: the mirror lives under the store's mutex.
pub(super) struct Outbox {
    /// Per branch, by ordinal (publish order).
    entries: BTreeMap<Name, BTreeMap<u64, PendingEvent>>,
    /// Event id → (branch, ordinal), for retiring entries when their event arrives.
    index: HashMap<Uuid, (Name, u64)>,
    next_order: u64,
}

impl Outbox {
    /// Reads the outbox back from `db`.
    pub fn load(db: &sled::Db) -> Result<Self> {
        let mut outbox = Self {
            entries: BTreeMap::new(),
            index: HashMap::new(),
            next_order: match db.get(META_ORDER)? {
                Some(v) => u64_of(META_ORDER, &v)?,
                None => 1,
            },
        };
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
            outbox.insert(e);
        }
        Ok(outbox)
    }

    /// The ordinal the next new entry gets.
    pub fn next_order(&self) -> u64 {
        self.next_order
    }

    /// The entries of `branch`, by ordinal.
    pub fn branch(&self, branch: &Name) -> impl Iterator<Item = &PendingEvent> {
        self.entries
            .get(branch)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Copies of the entries of `branch` that `keep` selects, in publish order.
    pub fn pending(
        &self,
        branch: &Name,
        keep: impl Fn(&PendingEvent) -> bool,
    ) -> Vec<PendingEvent> {
        self.branch(branch).filter(|e| keep(e)).cloned().collect()
    }

    /// Where the entry of `event_id` is: (branch, ordinal).
    pub fn locate(&self, event_id: Uuid) -> Option<(Name, u64)> {
        self.index.get(&event_id).cloned()
    }

    /// The entry at `order` of `branch`.
    pub fn get(&self, branch: &Name, order: u64) -> Option<&PendingEvent> {
        self.entries.get(branch).and_then(|m| m.get(&order))
    }

    /// Adds or replaces an entry (after its write was applied).
    pub fn insert(&mut self, entry: PendingEvent) {
        self.index
            .insert(entry.event_id, (entry.branch.clone(), entry.order));
        self.entries
            .entry(entry.branch.clone())
            .or_default()
            .insert(entry.order, entry);
    }

    /// Drops an entry (after its removal was applied).
    pub fn remove(&mut self, branch: &Name, order: u64) {
        if let Some(m) = self.entries.get_mut(branch) {
            if let Some(e) = m.remove(&order) {
                self.index.remove(&e.event_id);
            }
            if m.is_empty() {
                self.entries.remove(branch);
            }
        }
    }

    /// Adds to `batch` a new entry at the end of the outbox, taking its `device_seq` and
    /// ordinal: the entry, the branch counter after it and the next ordinal. [`Outbox::added`]
    /// follows once the batch is applied.
    pub fn add(batch: &mut sled::Batch, entry: &PendingEvent) -> Result<()> {
        batch.insert(entry_key(&entry.branch, entry.order), enc(entry)?);
        set_counter(batch, &entry.branch, entry.device_seq + 1);
        batch.insert(META_ORDER, &(entry.order + 1).to_be_bytes());
        Ok(())
    }

    /// Mirrors an [`Outbox::add`] that was applied.
    pub fn added(&mut self, entry: PendingEvent) {
        self.next_order = entry.order + 1;
        self.insert(entry);
    }
}

/// Adds to `batch` the `device_seq` the next publish on `branch` gets.
pub(super) fn set_counter(batch: &mut sled::Batch, branch: &Name, next: u64) {
    batch.insert(counter_key(branch), &next.to_be_bytes());
}

impl Store {
    /// The `device_seq` the next publish on `branch` gets, as stored.
    pub(super) fn next_dseq(&self, branch: &Name) -> Result<u64> {
        let k = counter_key(branch);
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
            let entry = PendingEvent {
                branch: branch.clone(),
                event_id: Uuid::now_v7(),
                device_seq: self.next_dseq(branch)?,
                client_time_ms,
                base_seq,
                base_version,
                body,
                recorded_at_ms: now_ms(),
                accepted: None,
                sent: false,
                order: inner.outbox.next_order(),
            };
            let mut batch = sled::Batch::default();
            Outbox::add(&mut batch, &entry)?;
            self.db.apply_batch(batch)?;
            inner.outbox.added(entry.clone());
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
        self.lock().outbox.pending(branch, |_| true)
    }

    /// Every outbox entry, by branch then publish order.
    pub fn all_pending(&self) -> Vec<PendingEvent> {
        self.lock()
            .outbox
            .entries
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// Branches with outbox entries.
    pub fn outbox_branches(&self) -> Vec<Name> {
        self.lock()
            .outbox
            .entries
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Up to `limit` entries of `branch` not yet accepted, in publish order, after the entry
    /// with ordinal `after`, or from the first.
    pub fn unaccepted(&self, branch: &Name, after: Option<u64>, limit: usize) -> Vec<PendingEvent> {
        let inner = self.lock();
        let Some(m) = inner.outbox.entries.get(branch) else {
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
        for e in inner.outbox.entries.values().flat_map(|m| m.values()) {
            if e.accepted.is_none() {
                count += 1;
                oldest = Some(oldest.map_or(e.recorded_at_ms, |o| o.min(e.recorded_at_ms)));
            }
        }
        (count, oldest)
    }

    /// The hub accepted `event_id` at `position`. The entry is retired now if the replica
    /// already holds that position (or the branch is not followed, so the event will never
    /// arrive); otherwise it stays, marked, until the event is applied.
    pub fn mark_accepted(&self, event_id: Uuid, position: Position, followed: bool) -> Result<()> {
        let mut inner = self.lock();
        let Some((branch, order)) = inner.outbox.locate(event_id) else {
            return Ok(());
        };
        let cursor = self.cursor(&branch)?;
        let applied = cursor.is_some_and(|c| c.epoch == position.epoch && c.seq >= position.seq);
        let k = entry_key(&branch, order);
        if !followed || applied {
            self.db.remove(k)?;
            inner.outbox.remove(&branch, order);
        } else if let Some(e) = inner.outbox.get(&branch, order) {
            let mut marked = e.clone();
            marked.accepted = Some(position);
            // Not flushed: losing the mark in a crash only means sending the event again,
            // which the hub answers `duplicate` (or, if it forgot the event, which the
            // `sent` mark makes a quarantine).
            self.db.insert(k, enc(&marked)?)?;
            inner.outbox.insert(marked);
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
            .branch(branch)
            .filter(|e| e.accepted.is_some())
            .map(|e| e.order)
            .collect();
        let mut batch = sled::Batch::default();
        for order in &accepted {
            batch.remove(entry_key(branch, *order));
        }
        self.db.apply_batch(batch)?;
        for order in accepted {
            inner.outbox.remove(branch, order);
        }
        Ok(())
    }

    /// Marks entries of `branch` (by ordinal) as possibly applied by the hub (see
    /// [`PendingEvent::sent`]), in one write. [`Store::sync_sent`] must follow before the
    /// sends leave.
    pub fn mark_sent(&self, branch: &Name, orders: &[u64]) -> Result<()> {
        let mut inner = self.lock();
        let mut batch = sled::Batch::default();
        let mut marked = Vec::new();
        for order in orders {
            if let Some(e) = inner.outbox.get(branch, *order).filter(|e| !e.sent) {
                let mut e = e.clone();
                e.sent = true;
                batch.insert(entry_key(branch, *order), enc(&e)?);
                marked.push(e);
            }
        }
        if marked.is_empty() {
            return Ok(());
        }
        self.db.apply_batch(batch)?;
        for e in marked {
            inner.outbox.insert(e);
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

    /// The hub says its last applied `device_seq` from this device on `branch` is `last`.
    /// If nothing is waiting to be sent there, the counter is set to follow it, so the next
    /// publish is numbered right (a restored or fresh store would otherwise start wrong).
    pub fn align_counter(&self, branch: &Name, last: u64) -> Result<()> {
        let inner = self.lock();
        let waiting = inner.outbox.branch(branch).any(|e| e.accepted.is_none());
        if !waiting && self.next_dseq(branch)? != last + 1 {
            self.db
                .insert(counter_key(branch), &(last + 1).to_be_bytes())?;
        }
        Ok(())
    }

    /// The `device_seq` the next publish on `branch` gets.
    #[cfg(test)]
    pub fn next_device_seq(&self, branch: &Name) -> Result<u64> {
        let _inner = self.lock();
        self.next_dseq(branch)
    }
}
