//! Applying what the hub sequenced to the store: runs of events and snapshots, each in one
//! atomic write (see [`Store::apply_events`](crate::store::Store)); then the event streams are
//! woken and the app told. Also what the hub last said of each branch's head, for the lag.

use std::collections::HashMap;
use std::sync::Arc;

use branchline_protocol::{Event, Name, Position, UnixMillis};
use tokio::sync::watch;

use super::shared::Shared;
use crate::error::{Error, Result};
use crate::http::Snapshot;
use crate::status::ClientEvent;

/// Applies sequenced events and snapshots, and keeps what the hub said of its heads.
pub(crate) struct Applier {
    shared: Arc<Shared>,
    /// The local log's end, for the event streams to wake on.
    log_tx: watch::Sender<u64>,
    /// The hub's head of each branch, as last heard.
    heads: HashMap<Name, u64>,
    /// When events or a caught-up last came, in hub time.
    last_pull_ms: Option<UnixMillis>,
}

impl Applier {
    pub fn new(shared: Arc<Shared>, log_tx: watch::Sender<u64>) -> Self {
        Self {
            shared,
            log_tx,
            heads: HashMap::new(),
            last_pull_ms: None,
        }
    }

    /// The hub says the head of `branch` is `head`.
    pub fn set_head(&mut self, branch: &Name, head: u64) {
        self.heads.insert(branch.clone(), head);
    }

    /// The hub has at least `seq` on `branch`.
    fn raise_head(&mut self, branch: &Name, seq: u64) {
        let head = self.heads.entry(branch.clone()).or_insert(0);
        *head = (*head).max(seq);
    }

    /// Events the hub has that this device has not applied, over the followed branches.
    pub fn lag(&self) -> u64 {
        let store = &self.shared.store;
        let mut lag = 0;
        for b in &self.shared.followed {
            if let (Some(head), Ok(Some(c))) = (self.heads.get(b), store.cursor(b)) {
                lag += head.saturating_sub(c.seq);
            }
        }
        lag
    }

    pub fn last_pull_ms(&self) -> Option<UnixMillis> {
        self.last_pull_ms
    }

    /// Applies a run of events of `branch`; `Some(reason)` if it did not follow the stored
    /// position (a gap, an epoch change without `resync_required`), and must be resumed
    /// from there.
    pub fn events(&mut self, branch: &Name, events: Vec<Event>) -> Result<Option<String>> {
        let last_seq = events.last().map(|e| e.seq);
        let applied = self.shared.store.apply_events(branch, events)?;
        if applied.applied > 0 {
            self.log_tx.send_replace(self.shared.store.log_end());
        }
        if let Some(seq) = last_seq {
            self.raise_head(branch, seq);
        }
        self.last_pull_ms = Some(self.shared.clock.now());
        if let Some((want, got)) = applied.gap {
            tracing::error!(%branch, want, got, "the hub skipped events; resuming");
            return Ok(Some(format!(
                "gap in {branch}: expected seq {want}, got {got}; resuming"
            )));
        }
        if applied.epoch_mismatch {
            return Ok(Some(format!(
                "{branch} changed epoch without resync_required; resuming"
            )));
        }
        Ok(None)
    }

    /// `branch` is at the hub's head, at `position`: tell the app.
    pub fn caught_up(&mut self, branch: &Name, position: Position) {
        self.raise_head(branch, position.seq);
        self.last_pull_ms = Some(self.shared.clock.now());
        self.shared.notify(ClientEvent::CaughtUp {
            branch: branch.clone(),
            position,
        });
    }

    /// Replaces the replica of `branch` with a complete snapshot; returns where it is
    /// pinned, to follow the branch from.
    pub fn snapshot(&mut self, branch: &Name, snap: &Snapshot) -> Result<Position> {
        let position = snap
            .position
            .ok_or_else(|| Error::Network("snapshot without pages".into()))?;
        self.shared
            .store
            .apply_snapshot(branch, position, &snap.products, &snap.stock)?;
        self.log_tx.send_replace(self.shared.store.log_end());
        self.raise_head(branch, position.seq);
        self.shared.notify(ClientEvent::Resynced {
            branch: branch.clone(),
            position,
        });
        Ok(position)
    }
}
