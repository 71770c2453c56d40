//! What the engine's threads share about one branch: its identity, and the head and floor
//! the committer and retention move while the writer and readers look on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use branchline_protocol::{BranchKey, Epoch};

/// What the engine's threads share about one branch.
pub struct BranchCore {
    /// The branch.
    pub key: Arc<BranchKey>,
    /// Its log's epoch.
    pub epoch: Epoch,
    committed: AtomicU64,
    floor: AtomicU64,
}

impl BranchCore {
    /// A branch at `head` and `floor`.
    pub fn new(key: Arc<BranchKey>, epoch: Epoch, head: u64, floor: u64) -> Self {
        Self {
            key,
            epoch,
            committed: AtomicU64::new(head),
            floor: AtomicU64::new(floor),
        }
    }

    /// The last durable seq.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Called by the committer after a durable write.
    pub fn set_committed(&self, head: u64) {
        self.committed.store(head, Ordering::SeqCst);
    }

    /// The retention floor.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }

    /// Moves the floor up (retention does, before it deletes).
    pub fn raise_floor(&self, floor: u64) {
        self.floor.fetch_max(floor, Ordering::SeqCst);
    }
}
