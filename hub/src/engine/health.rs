//! Whether the store takes writes: it has not failed, and its disk has room.
//!
//! Two conditions refuse writes with `storage_unavailable`, and both are shown by `/readyz`:
//!
//! - **A failed write or flush** is permanent until a restart: after a failed `fsync` the
//!   state of the files is unknowable, and retrying could acknowledge what is not on disk.
//! - **Free space under the floor** (`--min-free-space`) is temporary: the committer and the
//!   maintenance task look at the free space after every commit and every few seconds, and
//!   writes resume once there is room again. The floor keeps room for what must still
//!   write when publishes stop — the commits already sequenced, sled's snapshots, the final
//!   flush at shutdown — so that the store never meets a full disk of its own making, and
//!   reads, snapshots and shutdown keep working.
//!
//! Reads never consult this: every committed event stays readable either way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use branchline_protocol::ErrorCode;

/// Why writes are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unwritable {
    /// A store write or flush failed; writes stay refused until the hub is restarted.
    #[error("a store write failed; restart the hub after fixing the disk")]
    Failed,
    /// The disk holding the store has less free space than the configured floor.
    #[error(
        "the store's disk has {free} bytes free, under the floor of {floor} (--min-free-space); \
         writes resume when there is room"
    )]
    LowSpace {
        /// Bytes free when last looked at.
        free: u64,
        /// The floor.
        floor: u64,
    },
}

impl Unwritable {
    /// The code clients are answered with.
    pub fn code(self) -> ErrorCode {
        ErrorCode::StorageUnavailable
    }
}

/// The store's health, shared by the committer, branch writers and the HTTP layer.
#[derive(Debug)]
pub struct StoreHealth {
    failed: AtomicBool,
    free: AtomicU64,
    floor: u64,
    /// The last measure of the free space failed (said once, not at every commit).
    unmeasured: AtomicBool,
}

impl StoreHealth {
    /// Healthy, with free space not yet looked at, refusing writes under `floor` free bytes.
    pub fn new(floor: u64) -> Self {
        Self {
            failed: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            floor,
            unmeasured: AtomicBool::new(false),
        }
    }

    /// Records a measure of the free space (or why there is none: the floor then goes by the
    /// last measure, and the failure is logged once until a measure succeeds again).
    pub fn measured(&self, free: Result<u64, impl std::fmt::Display>) {
        match free {
            Ok(free) => {
                self.note_free(free);
                self.unmeasured.store(false, Ordering::Release);
            }
            Err(e) => {
                if !self.unmeasured.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "cannot measure the store's free space");
                }
            }
        }
    }

    /// Records a failed write or flush: writes are refused until a restart.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Whether a write or flush failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Records the free space just measured.
    pub fn note_free(&self, free: u64) {
        self.free.store(free, Ordering::Release);
    }

    /// Free bytes last measured (`u64::MAX` before the first measure).
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }

    /// `Ok` if a write may be taken now.
    pub fn writable(&self) -> Result<(), Unwritable> {
        if self.failed() {
            return Err(Unwritable::Failed);
        }
        let free = self.free();
        if free < self.floor {
            return Err(Unwritable::LowSpace {
                free,
                floor: self.floor,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_space_passes_and_a_failure_stays() {
        let health = StoreHealth::new(100);
        assert_eq!(health.writable(), Ok(()), "not measured yet");
        health.note_free(99);
        assert_eq!(
            health.writable(),
            Err(Unwritable::LowSpace {
                free: 99,
                floor: 100
            })
        );
        health.note_free(100);
        assert_eq!(health.writable(), Ok(()), "room again");
        health.fail();
        health.note_free(u64::MAX);
        assert_eq!(health.writable(), Err(Unwritable::Failed));
    }
}
