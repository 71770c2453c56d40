//! What the store reads and writes: the ops of a commit, a branch as loaded, a dedup entry,
//! and the store's errors.

use std::collections::HashMap;
use std::sync::Arc;

use branchline_protocol::{BranchKey, ConflictRecord, Epoch, Name, Sku, UnixMillis};
use bytes::Bytes;
use uuid::Uuid;

use crate::engine::StoredEvent;
use crate::state::ProductState;

/// What the dedup index remembers of an accepted event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupEntry {
    /// Its seq.
    pub seq: u64,
    /// Hash of its content (kind, body, client time, bases).
    pub hash: u64,
    /// When it was sequenced (for the dedup window).
    pub server_time_ms: UnixMillis,
}

/// Everything the branch writer needs to pick up a branch where it was.
#[derive(Debug, Default)]
pub struct LoadedBranch {
    /// The log's epoch.
    pub epoch: Epoch,
    /// The last committed seq.
    pub head: u64,
    /// The retention floor.
    pub floor: u64,
    /// When the head event was sequenced (0 if the log is empty): server times never go
    /// backwards within a branch, even across restarts.
    pub head_time_ms: UnixMillis,
    /// Last applied `device_seq` per device.
    pub devices: HashMap<Name, u64>,
    /// The catalog.
    pub products: Vec<(Sku, ProductState)>,
    /// Stock on hand per SKU.
    pub stock: Vec<(Sku, i64)>,
    /// Conflicts waiting for an admin.
    pub open_conflicts: Vec<ConflictRecord>,
}

/// One write of a commit. A commit applies all its ops atomically.
#[derive(Clone, Debug)]
pub enum Op {
    /// What one writer round added to a branch: its events (consecutive seqs), the head
    /// after them and every device's last applied `device_seq`.
    Round {
        /// The branch.
        branch: Arc<BranchKey>,
        /// The events, in seq order, at least one.
        events: Vec<StoredEvent>,
        /// Each event's id and content hash, in the same order: its dedup entry.
        ids: Vec<(Uuid, u64)>,
        /// The head after them (the last event's seq).
        head: u64,
        /// Every device of the branch with its last applied `device_seq`.
        devices: Vec<(Name, u64)>,
    },
    /// A product's state, encoded.
    Product {
        /// The branch.
        branch: Arc<BranchKey>,
        /// The SKU.
        sku: Sku,
        /// Its [`ProductState`] as MessagePack.
        state: Bytes,
    },
    /// A SKU's stock on hand.
    Stock {
        /// The branch.
        branch: Arc<BranchKey>,
        /// The SKU.
        sku: Sku,
        /// Units on hand.
        on_hand: i64,
    },
    /// A conflict record, encoded.
    Conflict {
        /// The branch.
        branch: Arc<BranchKey>,
        /// The conflict id.
        id: Uuid,
        /// The [`ConflictRecord`] as MessagePack.
        record: Bytes,
    },
}

/// A storage failure. Fatal for the write that met it: the engine stops accepting writes
/// until it is restarted (see the committer, `engine::sled::commit`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk failed (full, unwritable, gone): a read, write, sync or listing.
    #[error("store: I/O error: {0}")]
    Disk(#[from] std::io::Error),
    /// The store failed otherwise (sled said why).
    #[error("store: {0}")]
    Engine(String),
    /// Stored bytes could not be read back.
    #[error("store holds unreadable data at {key}: {why}")]
    Corrupt {
        /// Where.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// An earlier write failed; nothing more is written until a restart.
    #[error("store refused writes after an earlier failure")]
    Failed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => StoreError::Disk(io),
            other => StoreError::Engine(other.to_string()),
        }
    }
}

impl StoreError {
    /// Whether it failed for want of disk space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Disk(e) if e.kind() == std::io::ErrorKind::StorageFull)
    }

    /// Whether sled refused the store because another process holds its lock (sled says so
    /// only in the text of an I/O error).
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Disk(e) if e.to_string().contains("could not acquire lock"))
    }
}
