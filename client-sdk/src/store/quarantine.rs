//! The quarantine: events the hub refused permanently, set aside so that the events behind
//! them go through, until the app retries or drops them.

use branchline_protocol::{ConflictDetail, ErrorCode, Name, UnixMillis, now_ms};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::outbox::PendingEvent;
use super::{Store, dec, enc, key};
use crate::error::{Error, Result};

/// `q/{branch}/{event_id}`: a quarantined event.
fn quarantine_key(branch: &Name, event_id: Uuid) -> Vec<u8> {
    key("q", branch, event_id.as_bytes())
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
    pub conflict: Option<ConflictDetail>,
    /// When it was quarantined, on the device's clock.
    pub quarantined_at_ms: UnixMillis,
}

impl QuarantinedEvent {
    /// `event`, quarantined now.
    pub(super) fn now(
        event: PendingEvent,
        code: ErrorCode,
        message: String,
        conflict: Option<ConflictDetail>,
    ) -> Self {
        Self {
            event,
            code,
            message,
            conflict,
            quarantined_at_ms: now_ms(),
        }
    }

    /// Adds it to `batch`.
    pub(super) fn put(&self, batch: &mut sled::Batch) -> Result<()> {
        batch.insert(
            quarantine_key(&self.event.branch, self.event.event_id),
            enc(self)?,
        );
        Ok(())
    }
}

impl Store {
    /// Entries in quarantine.
    pub fn quarantined_count(&self) -> usize {
        self.lock().quarantined
    }

    /// Every quarantined event, by branch.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedEvent>> {
        self.scan_values(b"q/")
    }

    /// The quarantined event `event_id`, with its key.
    pub(super) fn find_quarantined(&self, event_id: Uuid) -> Result<(Vec<u8>, QuarantinedEvent)> {
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

    /// Deletes a quarantined event for good.
    pub fn drop_quarantined(&self, event_id: Uuid) -> Result<QuarantinedEvent> {
        let mut inner = self.lock();
        let (qkey, q) = self.find_quarantined(event_id)?;
        self.db.remove(qkey)?;
        inner.quarantined = inner.quarantined.saturating_sub(1);
        Ok(q)
    }
}
