//! # branchline-durable
//!
//! Makes what sled 0.34 writes durable, for the hub's replay log and the SDK's outbox.
//!
//! sled's `flush` ends in `sync_file_range`, which pushes the data file's dirty pages to the
//! device but persists neither the file's size nor any other metadata, nor the device's write
//! cache: after a power cut, "flushed" data can be gone (sled issues #1077 and #1452). sled
//! also writes values over 128 KiB to files of their own under `blobs/` without syncing them,
//! and creates and renames files without syncing their directory. [`DurableDir::sync`],
//! called after every sled flush, closes those gaps:
//!
//! 1. every blob file not synced yet gets an `fdatasync`, and the `blobs` directory an
//!    `fsync` (a log entry whose blob is missing is skipped by sled's recovery: the blob must
//!    be durable no later than the entry);
//! 2. the data file gets an `fdatasync` (its size included, which is what `fdatasync` adds
//!    over `sync_file_range` besides the device cache);
//! 3. the store directory gets an `fsync` when its entries changed (sled's snapshots are
//!    written, synced and then renamed into place).
//!
//! A directory is only listed and synced when its modification or change time moved since
//! the last sync, or is too recent to tell (timestamps are coarse), so a round that created
//! no file costs one `fdatasync` and two `stat`s. Concurrent callers share syncs: a call
//! returns as soon as a sync that started after it was made has finished.
//!
//! [`prepare`] runs before sled opens a store: it removes what an interrupted snapshot left
//! (`snap.*.generating`, which sled would otherwise read as the newest snapshot and refuse to
//! open), and [`free_bytes`] tells how much room the store's filesystem has left.
//!
//! [`Closing`] holds a sled handle so that dropping it never hangs its caller: sled flushes
//! when its last handle goes, and a flush that cannot finish (a full disk after a failed
//! write) waits forever.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A directory change this recent may share its timestamp with a later one: the directory
/// is synced again until its timestamps are older than this. File timestamps come from the
/// kernel's coarse clock (a few milliseconds); a second is ample.
const AMBIGUOUS: Duration = Duration::from_secs(1);

/// Where sled keeps values too large for its log.
const BLOBS: &str = "blobs";
/// sled's data file.
const DATA_FILE: &str = "db";
/// The suffix of a snapshot sled had not finished writing.
const GENERATING: &str = ".generating";

/// What a directory looked like when it was last synced.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(dir: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(dir)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Self {
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether a change made after this stamp was taken could still carry the same one.
    fn ambiguous(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let recent = now - AMBIGUOUS.as_nanos() as i128;
        self.mtime_ns >= recent || self.ctime_ns >= recent
    }
}

/// A directory whose entries are kept durable.
struct WatchedDir {
    path: PathBuf,
    synced: Option<Stamp>,
}

impl WatchedDir {
    fn new(path: PathBuf) -> Self {
        Self { path, synced: None }
    }

    /// Syncs the directory if it may have changed since it was last synced, first calling
    /// `before` (which syncs what the new entries point at). Returns whether it synced.
    fn sync(&mut self, before: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<bool> {
        // Taken first: a change made while we sync shows up as a newer stamp next time.
        let now = Stamp::of(&self.path)?;
        if self.synced == Some(now) && !now.ambiguous() {
            return Ok(false);
        }
        before(&self.path)?;
        sync_dir(&self.path)?;
        self.synced = Some(now);
        Ok(true)
    }
}

struct State {
    root: WatchedDir,
    blobs: WatchedDir,
    /// Blob files already synced (blobs are written once and never changed).
    synced_blobs: HashSet<OsString>,
    /// The sync that finished last covered every call with a ticket up to this.
    done: u64,
}

/// A sled store directory whose writes are made durable after each flush.
pub struct DurableDir {
    data: File,
    state: Mutex<State>,
    tickets: AtomicU64,
}

/// What [`DurableDir::sync`] did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Blob files synced.
    pub blobs: usize,
    /// Directories synced.
    pub dirs: usize,
}

impl DurableDir {
    /// Takes over `dir`, a store sled has opened: makes everything in it durable once (the
    /// data file, its configuration, snapshots, blobs, the directory itself and its parent,
    /// which may have just been created).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let data = File::open(dir.join(DATA_FILE)).map_err(|e| with_path(&e, dir, DATA_FILE))?;
        let mut state = State {
            root: WatchedDir::new(dir.to_path_buf()),
            blobs: WatchedDir::new(dir.join(BLOBS)),
            synced_blobs: HashSet::new(),
            done: 0,
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        sync_blobs(&mut state)?;
        state.root.sync(|_| Ok(()))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(Self {
            data,
            state: Mutex::new(state),
            tickets: AtomicU64::new(0),
        })
    }

    /// Makes everything sled has written durable. Call it after sled's `flush` returns: what
    /// that flush wrote is then on stable storage when this returns `Ok`. An error means the
    /// state of the files is unknown; treat it like a failed flush.
    pub fn sync(&self) -> io::Result<Synced> {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut state = self.lock();
        if state.done >= ticket {
            // A sync that started after this call was made has finished meanwhile.
            return Ok(Synced::default());
        }
        let covers = self.tickets.load(Ordering::SeqCst);
        let mut synced = Synced::default();
        let before = state.synced_blobs.len();
        if sync_blobs(&mut state)? {
            synced.dirs += 1;
        }
        synced.blobs = state.synced_blobs.len().saturating_sub(before);
        self.data.sync_data()?;
        if state.root.sync(|_| Ok(()))? {
            synced.dirs += 1;
        }
        state.done = covers;
        Ok(synced)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in the state is left half-updated by a panic that matters more than
        // syncing again.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Syncs the blob files not synced yet, then the blob directory, if it changed.
fn sync_blobs(state: &mut State) -> io::Result<bool> {
    let State {
        blobs,
        synced_blobs,
        ..
    } = state;
    if !blobs.path.exists() {
        return Ok(false);
    }
    blobs.sync(|path| {
        let mut present = HashSet::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name();
            if !synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // sled removed it meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            present.insert(name);
        }
        *synced_blobs = present;
        Ok(())
    })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(&e, dir, ""))
}

fn with_path(e: &io::Error, dir: &Path, file: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display()))
}

/// A value (a sled handle) that is dropped on a thread of its own, waited for at most a set
/// time: sled's drop flushes, and can wait forever on a disk that cannot take the flush.
/// Whatever must be durable is flushed before the drop; the wait only gives a healthy disk
/// the time to finish what was left.
pub struct Closing<T: Send + 'static> {
    value: Option<T>,
    wait: Duration,
}

impl<T: Send + 'static> Closing<T> {
    /// Holds `value`; its drop waits at most `wait` for it to be dropped.
    pub fn new(value: T, wait: Duration) -> Self {
        Self {
            value: Some(value),
            wait,
        }
    }
}

impl<T: Send + 'static> std::ops::Deref for Closing<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.value {
            Some(value) => value,
            None => unreachable!("the value is only taken when it is dropped"),
        }
    }
}

impl<T: Send + 'static> Drop for Closing<T> {
    fn drop(&mut self) {
        let Some(value) = self.value.take() else {
            return;
        };
        let (done, closed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("store-close".into())
            .spawn(move || {
                drop(value);
                let _ = done.send(());
            });
        // Without a thread the value is leaked, open, rather than risk hanging here.
        if thread.is_ok() {
            let _ = closed.recv_timeout(self.wait);
        }
    }
}

/// Prepares `dir` for sled to open: removes the snapshot files an interrupted snapshot left
/// (`snap.*.generating`; sled writes a snapshot under that name, syncs it and only then renames
/// it, so such a file is never needed, but sled would read it as the newest snapshot and
/// refuse to open the store). Returns the files removed.
pub fn prepare(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(with_path(&e, dir, "")),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(GENERATING) {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// The segment size an existing sled store in `dir` was made with, from its `conf` file
/// (sled refuses to open a store with another), or `None` if there is no readable one.
pub fn segment_size(dir: &Path) -> Option<usize> {
    let conf = std::fs::read(dir.join("conf")).ok()?;
    // `key: value` lines, then a checksum.
    String::from_utf8_lossy(&conf)
        .lines()
        .find_map(|line| line.strip_prefix("segment_size: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path).map_err(|e| with_path(&e.into(), path, ""))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}
