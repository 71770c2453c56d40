//! The local log: the updates applied to the replica, in order, for the event streams to
//! read (and to resume from an offset after a restart). Bounded: the oldest entries are
//! trimmed past its capacity, in the same write that adds the new ones.

use super::{Store, enc, u64_of};
use crate::error::Result;
use crate::update::Update;

/// `meta/log`: the next local log offset (u64 BE).
const META_LOG: &[u8] = b"meta/log";

/// `l/{offset}`: an entry of the local log.
fn log_key(offset: u64) -> Vec<u8> {
    let mut k = b"l/".to_vec();
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The local log's bookkeeping, mirrored in memory.
pub(super) struct Log {
    /// The offset the next entry gets.
    next: u64,
    /// Entries held.
    len: u64,
    capacity: u64,
}

impl Log {
    /// Reads the bookkeeping back from `db`.
    pub fn load(db: &sled::Db, capacity: u64) -> Result<Self> {
        Ok(Self {
            next: match db.get(META_LOG)? {
                Some(v) => u64_of(META_LOG, &v)?,
                None => 1,
            },
            len: db.scan_prefix(b"l/").count() as u64,
            capacity: capacity.max(1),
        })
    }

    /// The offset the next entry gets.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Adds `updates` to `batch` at the end of the log, with the bookkeeping: the next
    /// offset, and the removal of entries past capacity. Returns the next offset after
    /// them, for [`Log::commit`] once the batch is applied.
    pub fn append(&self, batch: &mut sled::Batch, updates: &[Update]) -> Result<u64> {
        let mut next = self.next;
        for update in updates {
            batch.insert(log_key(next), enc(update)?);
            next += 1;
        }
        batch.insert(META_LOG, &next.to_be_bytes());
        let len = self.len + (next - self.next);
        if len > self.capacity {
            for offset in next - len..next - self.capacity {
                batch.remove(log_key(offset));
            }
        }
        Ok(next)
    }

    /// Mirrors an [`Log::append`] that was applied.
    pub fn commit(&mut self, next: u64) {
        self.len = (self.len + (next - self.next)).min(self.capacity);
        self.next = next;
    }
}

impl Store {
    /// The offset the next local log entry will get.
    pub fn log_end(&self) -> u64 {
        self.lock().log.next
    }

    /// The oldest offset still in the local log.
    pub fn log_start(&self) -> u64 {
        let inner = self.lock();
        inner.log.next - inner.log.len
    }

    /// The local log entry at `offset`, if still held.
    pub fn log_entry(&self, offset: u64) -> Result<Option<Update>> {
        self.read(&log_key(offset))
    }
}
