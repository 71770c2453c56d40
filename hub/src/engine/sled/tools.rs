//! Offline tools on a stopped hub's store (`branchline-hub log …`): open it without waiting
//! for its lock, look at a branch without creating its log, reset an epoch.

use std::path::Path;

use branchline_protocol::{BranchKey, Epoch, now_ms};

use super::log::keys::{FLOOR, HEAD, META, key, u64_at};
use super::log::{EventLog, SEGMENT_SIZE, SledLog, StoreError};

/// Offline tools (`branchline-hub log …`) on a stopped hub's store: open it without waiting for
/// its lock, look at a branch without creating its log, and reset an epoch.
impl SledLog {
    /// Opens the existing store in `dir` for an offline tool. Unlike [`SledLog::open`] it does
    /// not wait for a held lock (a running hub holds it; sled's error says "could not acquire
    /// lock") and does not create the replay log: a store without one is reported as such.
    pub fn open_existing(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        branchline_durable::prepare(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(branchline_durable::segment_size(dir).unwrap_or(SEGMENT_SIZE))
            .flush_every_ms(None)
            .open()?;
        if !db.tree_names().iter().any(|name| name.as_ref() == b"log") {
            return Err(StoreError::Corrupt {
                key: dir.display().to_string(),
                why: "this store has no replay log".into(),
            });
        }
        Self::with_db(db, dir)
    }

    /// The `(epoch, head, floor)` of `branch`'s log, or `None` if it has none. Unlike
    /// [`EventLog::open_branch`] this never creates a log: it only reads.
    pub fn branch_position(
        &self,
        branch: &BranchKey,
    ) -> Result<Option<(Epoch, u64, u64)>, StoreError> {
        let Some(meta) = self.tree.get(key(META, branch, &[]))? else {
            return Ok(None);
        };
        let epoch = Epoch(u64_at(&meta, 0, "meta")?);
        let head = self.read_u64(&key(HEAD, branch, &[]), "head")?.unwrap_or(0);
        let floor = self
            .read_u64(&key(FLOOR, branch, &[]), "floor")?
            .unwrap_or(0);
        Ok(Some((epoch, head, floor)))
    }

    /// Gives `branch`'s log a new random epoch and moves its floor to its head, deleting its
    /// events: positions of the old epoch mean nothing any more, so every client resyncs from
    /// a snapshot (whose state the store holds) and continues under the new epoch. Returns
    /// `(old, new)`, or `None` if the branch has no log. The dedup index and device counters
    /// stay: a retried event is still a duplicate. The new epoch and floor are written and
    /// flushed together before any event is deleted.
    pub fn reset_epoch(&self, branch: &BranchKey) -> Result<Option<(Epoch, Epoch)>, StoreError> {
        let Some((old, head, _)) = self.branch_position(branch)? else {
            return Ok(None);
        };
        let new = loop {
            let epoch = Epoch(rand::random::<u64>());
            if epoch != old {
                break epoch;
            }
        };
        let mut meta = new.0.to_be_bytes().to_vec();
        meta.extend_from_slice(&now_ms().to_be_bytes());
        let mut batch = sled::Batch::default();
        batch.insert(key(META, branch, &[]), meta);
        batch.insert(key(FLOOR, branch, &[]), &head.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.trim(branch, head)?;
        // Dropping the store does not wait for sled's flush: what a tool wrote is made durable
        // here.
        self.flush()?;
        Ok(Some((old, new)))
    }
}
