//! # branchline-powercut
//!
//! A test filesystem that simulates a power cut the way Jepsen's LazyFS does: it keeps what a
//! program wrote in memory and remembers which of it was made durable — a file's bytes by
//! `fsync`/`fdatasync`, a name by an `fsync` of its directory. At a [`Cut`] everything else is
//! lost (or, for a torn cut, partly lost at page boundaries), exactly as a machine that lost
//! its power would lose its page cache and its disk's write cache.
//!
//! It is mounted with FUSE (the kernel module and root are needed; nothing else), so the
//! program under test is the real one, unmodified, doing real system calls: tests run the
//! hub binary on it, `kill -9` it, cut the power, and start it again on what survived.
//!
//! - [`disk`]: the model of durable and not-yet-durable state, testable without a mount.
//! - [`PowerCutFs`]: the mounted filesystem, with [`PowerCutFs::cut`] and a capacity for
//!   full-disk tests ([`PowerCutFs::set_capacity`]).

pub mod disk;
mod fs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

pub use disk::{Cut, CutReport, Disk, SyncCounts};
use fs::Shared;

/// How long a cut waits for the last program to close its files before it gives up.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// A [`Disk`] mounted at a directory.
pub struct PowerCutFs {
    shared: Arc<Shared>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl PowerCutFs {
    /// Mounts a new, empty disk at `mountpoint` (an existing, empty directory).
    pub fn mount(mountpoint: &Path) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let session = fs::mount(shared.clone(), mountpoint).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mounting the power-cut filesystem at {} (FUSE needs /dev/fuse and root): {e}",
                    mountpoint.display()
                ),
            )
        })?;
        Ok(Self {
            shared,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Cuts the power: waits until no file is open (kill the programs using it first),
    /// unmounts, drops what was not durable as `how` says, and mounts what survived again.
    pub fn cut(&mut self, how: Cut) -> io::Result<CutReport> {
        self.unmount()?;
        let report = self.disk().cut(how);
        self.session = Some(fs::mount(self.shared.clone(), &self.mountpoint)?);
        Ok(report)
    }

    /// Limits the bytes its files may hold (`None`: no limit); `statfs` reports the rest as
    /// free, and a write past it fails with `ENOSPC`.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.disk().set_capacity(bytes);
    }

    /// Bytes free, as `statfs` reports them.
    pub fn free_bytes(&self) -> u64 {
        self.disk().space().1
    }

    /// The syncs seen so far.
    pub fn syncs(&self) -> SyncCounts {
        self.disk().syncs()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.shared.disk()
    }

    fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // A killed program's files are closed by the kernel shortly after it dies; FUSE hears
        // of it as `release`, and the kernel lets go of the mount a moment after that.
        // Unmounting before then fails as busy: wait, and try again.
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            let unmounted = if self.shared.open.load(Ordering::SeqCst) > 0 {
                Err(rustix::io::Errno::BUSY)
            } else {
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty())
            };
            match unmounted {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    self.session = Some(session);
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!(
                            "unmounting {} ({} files still open): {e}",
                            self.mountpoint.display(),
                            self.shared.open.load(Ordering::SeqCst)
                        ),
                    ));
                }
            }
        }
        // Unmounted: the FUSE thread ends (fuser's own unmount, on drop, finds nothing to do).
        session.join()
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        // Whatever still holds files open, the mount must not outlive the test: detach it.
        if self.unmount().is_err() {
            let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

impl Shared {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A panic in a filesystem method leaves the model as it was before that method.
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
