//! The sled engine's store: one sled tree holding every branch's log, dedup index, device
//! counters and state.
//!
//! The engine's writers and committer see it as [`EventLog`]: append a batch of typed [`Op`]s
//! atomically (events with their dedup entries, device counters and state), make it durable,
//! read a range of events, and the per-branch metadata. (Tests put a [`EventLog`] in front of
//! the real store that fails on demand.) [`SledLog`] keeps everything in one sled tree under
//! typed key prefixes, so that one group commit is one atomic `apply_batch` and one flush.
//!
//! Key layout (`B` is `tenant \0 branch \0`, seqs are big-endian so scans run in order):
//!
//! | key | value |
//! |---|---|
//! | `M` B | epoch (u64), created (i64 ms) |
//! | `H` B | head seq (u64) and every device's last applied `device_seq`, written by commits |
//! | `F` B | floor seq (u64), written by retention |
//! | `E` B last_seq | the events one writer round added to the branch, up to `last_seq`: for each, seq (u64), server time (i64 ms), length (u32) and the event as MessagePack, ready to send |
//! | `D` B bucket last_seq | the dedup entries of one round's events whose ids fall in `bucket`: for each, event id, seq, content hash, server time |
//! | `P` B sku | product state (MessagePack) |
//! | `S` B sku | stock on hand (i64) |
//! | `C` B conflict_id | conflict record (MessagePack); ids are UUID v7, so newest last |
//!
//! | `R` | the run marker: present while a hub runs on the store, with its durability mode |
//!
//! Events are stored a round at a time because sled's cost is per key (a tree walk, node
//! splits every 16 keys, allocations), and the commit thread's time is the durable publish
//! rate. The dedup index is grouped the same way: a UUID v7 starts with its creation time in
//! milliseconds, so `bucket` (that time in units of 1,024 ms) puts the ids a round carries,
//! made moments apart, under one key, and a lookup of one id reads only the few rounds of its
//! second. A round is then two or three keys whatever its size, instead of one per event.
//!
//! The run marker makes `--fsync interval` honest: that mode acknowledges and broadcasts
//! before the flush, so a crash can take back events that clients saw, and the seqs they had
//! would be given to other events. A hub that finds the marker of an interval-mode run that
//! did not stop cleanly gives every branch a new epoch and moves its floor to its head, so
//! every client resyncs from a snapshot instead of silently holding events that are gone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use branchline_durable::{Closing, DurableDir};
use branchline_protocol::{
    BranchKey, ConflictRecord, ConflictStatus, Epoch, Sku, UnixMillis, now_ms,
};
use bytes::Bytes;
use uuid::Uuid;

use self::keys::{
    BranchRounds, CONFLICT, DEDUP, DEDUP_ENTRY, EVENT, FLOOR, HEAD, META, PRODUCT, RUN, STOCK,
    decode, decode_branch, decode_head, dedup_bucket, dedup_entries, entries, i64_at, key, u64_at,
};
use crate::engine::StoredEvent;

pub mod keys;
mod records;

pub use records::{DedupEntry, LoadedBranch, Op, StoreError};

/// The store as the sled engine's writers and committer use it.
pub trait EventLog: Send + Sync + 'static {
    /// Opens a branch, creating its log (with a fresh epoch, durably) if it has none.
    fn open_branch(&self, branch: &BranchKey) -> Result<LoadedBranch, StoreError>;

    /// Applies `ops` atomically. They are readable at once but durable only after the next
    /// [`flush`](EventLog::flush) that starts after this returns.
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError>;

    /// Makes everything applied so far durable: on stable storage, as a power cut would find
    /// it, not just handed to the operating system.
    fn flush(&self) -> Result<(), StoreError>;

    /// Bytes free on the disk that holds the store.
    fn free_bytes(&self) -> Result<u64, StoreError>;

    /// Events with `after < seq <= until`, in order, at most `limit`.
    fn read_events(
        &self,
        branch: &BranchKey,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// The dedup entry of `event_id`, if it is remembered.
    fn dedup(&self, branch: &BranchKey, event_id: &Uuid) -> Result<Option<DedupEntry>, StoreError>;

    /// Calls `visit` with every event id the dedup index remembers for `branch`.
    fn dedup_ids(&self, branch: &BranchKey, visit: &mut dyn FnMut(Uuid)) -> Result<(), StoreError>;

    /// Conflict records of a branch, newest first, filtered by status.
    fn conflicts(
        &self,
        branch: &BranchKey,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError>;

    /// One conflict record.
    fn conflict(&self, branch: &BranchKey, id: &Uuid)
    -> Result<Option<ConflictRecord>, StoreError>;

    /// Every branch with a log.
    fn branches(&self) -> Result<Vec<BranchKey>, StoreError>;

    /// A branch's head and floor, without loading it (`(0, 0)` if it has no log).
    fn position(&self, branch: &BranchKey) -> Result<(u64, u64), StoreError>;

    /// The seq of the last event sequenced before `cutoff_ms`, if any.
    fn last_seq_before(
        &self,
        branch: &BranchKey,
        cutoff_ms: UnixMillis,
    ) -> Result<Option<u64>, StoreError>;

    /// Moves the floor to `floor` (durably) and deletes the events at or below it.
    fn trim(&self, branch: &BranchKey, floor: u64) -> Result<u64, StoreError>;

    /// Deletes the dedup entries of events that were sequenced before `cutoff_ms` and are at
    /// or below `floor` (trimmed from the log): an event the log still holds always answers
    /// `duplicate`, whatever its age.
    fn expire_dedup(
        &self,
        branch: &BranchKey,
        cutoff_ms: UnixMillis,
        floor: u64,
    ) -> Result<u64, StoreError>;

    /// Marks the store as in use by a running hub, `durable` or not (`--fsync interval`).
    /// If the previous run was not durable and did not stop cleanly, first gives every
    /// branch a new epoch and moves its floor to its head (see the module docs); returns how
    /// many branches that reset.
    fn begin_run(&self, durable: bool) -> Result<usize, StoreError>;

    /// Marks a clean stop, after the last flush.
    fn end_run(&self) -> Result<(), StoreError>;

    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// sled's segment size for new stores: 8 MiB, where sled's default is 512 KiB. sled writes
/// any node over a quarter of a segment to a blob file of its own, and a node of this log
/// (up to 17 rounds of a branch) often passes 128 KiB under load: every such write then costs
/// a file, its `fdatasync` and a directory sync before the commit can be acknowledged,
/// which more than doubled the commit time. With 8 MiB segments (2 MiB nodes inline) the
/// durable publish bench writes no blob at all. sled keeps a store's segment size for life,
/// so a store made with another keeps it. (sled marks the setting as one for its own tests;
/// the power-loss tests run the hub with it.)
pub(super) const SEGMENT_SIZE: usize = 8 << 20;

/// How long opening a store waits for a lock held by a hub stopping in this process.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The replay log in an embedded sled database.
///
/// Every flush is sled's flush followed by [`DurableDir::sync`]: sled 0.34's own flush ends
/// in `sync_file_range`, which survives a crash of the process but not a power cut (see the
/// `branchline-durable` crate).
///
/// Dropping it does not wait for sled's own closing flush (see [`Closing`]): whoever writes
/// flushes what must be kept (commits, the hub's last flush at shutdown, the offline tools).
pub struct SledLog {
    pub(super) db: Closing<sled::Db>,
    pub(super) tree: Closing<sled::Tree>,
    durable: DurableDir,
    dir: PathBuf,
}

impl SledLog {
    /// Opens (or creates) the store in `dir`.
    ///
    /// If the store is still locked by a hub that is stopping in this process (sled's
    /// background threads let go of it shortly after the last handle is dropped), waits for it
    /// up to [`LOCK_WAIT`].
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let removed = branchline_durable::prepare(dir)?;
        if !removed.is_empty() {
            tracing::warn!(
                files = ?removed,
                "removed the snapshot files an interrupted snapshot left (sled rebuilds them)"
            );
        }
        // The committer flushes (in every durability mode): sled's own periodic flush would
        // take the committer's locks, and sync neither blobs nor directories.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(branchline_durable::segment_size(dir).unwrap_or(SEGMENT_SIZE))
            .flush_every_ms(None);
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                // sled reports a held lock only as an I/O error with this text.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        Self::with_db(db, dir)
    }

    pub(super) fn with_db(db: sled::Db, dir: &Path) -> Result<Self, StoreError> {
        let tree = db.open_tree("log")?;
        // Everything sled made while opening (its files, the tree) is durable before the
        // store is used.
        db.flush()?;
        let durable = DurableDir::open(dir)?;
        Ok(Self {
            db: Closing::new(db, Duration::ZERO),
            tree: Closing::new(tree, Duration::ZERO),
            durable,
            dir: dir.to_path_buf(),
        })
    }

    /// How many events a branch log holds and their bytes (a full scan: for inspection).
    pub fn event_stats(&self, branch: &BranchKey) -> Result<(u64, u64), StoreError> {
        let (mut count, mut bytes) = (0, 0);
        for kv in self.scan(EVENT, branch) {
            let (k, v) = kv?;
            bytes += (k.len() + v.len()) as u64;
            for entry in entries(Bytes::from_owner(v)) {
                entry?;
                count += 1;
            }
        }
        Ok((count, bytes))
    }

    fn scan(&self, tag: u8, branch: &BranchKey) -> sled::Iter {
        self.tree.scan_prefix(key(tag, branch, &[]))
    }

    pub(super) fn read_u64(&self, k: &[u8], what: &str) -> Result<Option<u64>, StoreError> {
        self.tree.get(k)?.map(|v| u64_at(&v, 0, what)).transpose()
    }
}

impl EventLog for SledLog {
    fn open_branch(&self, branch: &BranchKey) -> Result<LoadedBranch, StoreError> {
        let meta_key = key(META, branch, &[]);
        let epoch = match self.tree.get(&meta_key)? {
            Some(meta) => Epoch(u64_at(&meta, 0, "meta")?),
            None => {
                let epoch = Epoch(rand::random::<u64>());
                let mut meta = epoch.0.to_be_bytes().to_vec();
                meta.extend_from_slice(&now_ms().to_be_bytes());
                // Two openers racing: the first one's epoch stands.
                match self
                    .tree
                    .compare_and_swap(&meta_key, None::<&[u8]>, Some(meta))?
                {
                    Ok(()) => {
                        self.flush()?;
                        epoch
                    }
                    Err(cas) => {
                        let current = cas.current.ok_or_else(|| StoreError::Corrupt {
                            key: "meta".into(),
                            why: "vanished during creation".into(),
                        })?;
                        Epoch(u64_at(&current, 0, "meta")?)
                    }
                }
            }
        };
        let (head, devices) = match self.tree.get(key(HEAD, branch, &[]))? {
            Some(value) => decode_head(&value)?,
            None => (0, HashMap::new()),
        };
        let floor = self
            .read_u64(&key(FLOOR, branch, &[]), "floor")?
            .unwrap_or(0);
        let head_time_ms = match self.scan(EVENT, branch).next_back().transpose()? {
            Some((_, v)) => entries(Bytes::from_owner(v))
                .last()
                .transpose()?
                .map_or(0, |e| e.server_time_ms),
            None => 0,
        };
        let prefix_len = key(PRODUCT, branch, &[]).len();
        let sku_of = |k: &[u8]| {
            std::str::from_utf8(&k[prefix_len..])
                .ok()
                .and_then(|s| Sku::new(s).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: "sku".into(),
                    why: "bad sku".into(),
                })
        };
        let mut products = Vec::new();
        for kv in self.scan(PRODUCT, branch) {
            let (k, v) = kv?;
            products.push((sku_of(&k)?, decode(&v, "product")?));
        }
        let mut stock = Vec::new();
        for kv in self.scan(STOCK, branch) {
            let (k, v) = kv?;
            stock.push((sku_of(&k)?, i64_at(&v, 0, "stock")?));
        }
        let open_conflicts = self.conflicts(branch, Some(ConflictStatus::Open), usize::MAX)?;
        Ok(LoadedBranch {
            epoch,
            head,
            floor,
            head_time_ms,
            devices,
            products,
            stock,
            open_conflicts,
        })
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        // The rounds of one branch in this commit are consecutive: they are written as one,
        // so a commit costs a few keys per branch however many rounds its writers made.
        let mut rounds: Vec<BranchRounds<'_>> = Vec::new();
        let mut of_branch: HashMap<&BranchKey, usize> = HashMap::new();
        for op in ops {
            match op {
                Op::Round {
                    branch,
                    events,
                    ids,
                    head,
                    devices,
                } => {
                    let at = *of_branch.entry(&**branch).or_insert_with(|| {
                        rounds.push(BranchRounds {
                            branch,
                            events: Vec::new(),
                            head: *head,
                            devices,
                        });
                        rounds.len() - 1
                    });
                    let r = &mut rounds[at];
                    r.events.extend(events.iter().zip(ids));
                    (r.head, r.devices) = (*head, devices);
                }
                Op::Product { branch, sku, state } => {
                    batch.insert(
                        key(PRODUCT, branch, sku.as_str().as_bytes()),
                        state.as_ref(),
                    );
                }
                Op::Stock {
                    branch,
                    sku,
                    on_hand,
                } => {
                    batch.insert(
                        key(STOCK, branch, sku.as_str().as_bytes()),
                        &on_hand.to_be_bytes(),
                    );
                }
                Op::Conflict { branch, id, record } => {
                    batch.insert(key(CONFLICT, branch, id.as_bytes()), record.as_ref());
                }
            }
        }
        for r in &rounds {
            r.write(&mut batch);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.durable.sync()?;
        Ok(())
    }

    fn free_bytes(&self) -> Result<u64, StoreError> {
        Ok(branchline_durable::free_bytes(&self.dir)?)
    }

    fn read_events(
        &self,
        branch: &BranchKey,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if until <= after || limit == 0 {
            return Ok(Vec::new());
        }
        // Rounds are keyed by their last seq: the first one at or past `after + 1` holds it.
        let start = key(EVENT, branch, &(after + 1).to_be_bytes());
        let end = key(EVENT, branch, &u64::MAX.to_be_bytes());
        // Capacity for a usual page at most: `limit` comes from callers.
        let mut out = Vec::with_capacity(limit.min(1024).min((until - after) as usize));
        for kv in self.tree.range(start..=end) {
            let (_, value) = kv?;
            for entry in entries(Bytes::from_owner(value)) {
                let event = entry?;
                if event.seq <= after {
                    continue;
                }
                if event.seq > until || out.len() >= limit {
                    return Ok(out);
                }
                out.push(event);
            }
        }
        Ok(out)
    }

    fn dedup(&self, branch: &BranchKey, event_id: &Uuid) -> Result<Option<DedupEntry>, StoreError> {
        for kv in self
            .tree
            .scan_prefix(key(DEDUP, branch, &dedup_bucket(event_id)))
        {
            let (_, value) = kv?;
            for entry in dedup_entries(&value) {
                let (id, entry) = entry?;
                if id == *event_id {
                    return Ok(Some(entry));
                }
            }
        }
        Ok(None)
    }

    fn dedup_ids(&self, branch: &BranchKey, visit: &mut dyn FnMut(Uuid)) -> Result<(), StoreError> {
        for kv in self.scan(DEDUP, branch) {
            let (_, value) = kv?;
            for entry in dedup_entries(&value) {
                visit(entry?.0);
            }
        }
        Ok(())
    }

    fn conflicts(
        &self,
        branch: &BranchKey,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.scan(CONFLICT, branch).rev() {
            if out.len() >= limit {
                break;
            }
            let (_, v) = kv?;
            let record: ConflictRecord = decode(&v, "conflict")?;
            if status.is_none_or(|s| s == record.status) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn conflict(
        &self,
        branch: &BranchKey,
        id: &Uuid,
    ) -> Result<Option<ConflictRecord>, StoreError> {
        self.tree
            .get(key(CONFLICT, branch, id.as_bytes()))?
            .map(|v| decode(&v, "conflict"))
            .transpose()
    }

    fn branches(&self) -> Result<Vec<BranchKey>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([META]) {
            let (k, _) = kv?;
            if let Some((branch, _)) = decode_branch(&k[1..]) {
                out.push(branch);
            }
        }
        Ok(out)
    }

    fn position(&self, branch: &BranchKey) -> Result<(u64, u64), StoreError> {
        Ok(self
            .branch_position(branch)?
            .map_or((0, 0), |(_, head, floor)| (head, floor)))
    }

    fn last_seq_before(
        &self,
        branch: &BranchKey,
        cutoff_ms: UnixMillis,
    ) -> Result<Option<u64>, StoreError> {
        // Server times grow with seq, so the events before the cutoff are a prefix of the log.
        let mut last = None;
        for kv in self.scan(EVENT, branch) {
            let (_, value) = kv?;
            for entry in entries(Bytes::from_owner(value)) {
                let event = entry?;
                if event.server_time_ms >= cutoff_ms {
                    return Ok(last);
                }
                last = Some(event.seq);
            }
        }
        Ok(last)
    }

    fn trim(&self, branch: &BranchKey, floor: u64) -> Result<u64, StoreError> {
        // The floor moves first (durably): a reader that finds a hole below it resyncs rather
        // than serving a partial page.
        self.tree
            .insert(key(FLOOR, branch, &[]), &floor.to_be_bytes())?;
        self.flush()?;
        // Rounds are keyed by their last seq: those at or below the floor go whole. A round
        // across the floor stays; its events at or below the floor are never read again.
        let end = key(EVENT, branch, &floor.to_be_bytes());
        let (mut removed, mut rounds) = (0, 0);
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(key(EVENT, branch, &[])..=end) {
            let (k, value) = kv?;
            removed += entries(Bytes::from_owner(value)).count() as u64;
            batch.remove(k);
            rounds += 1;
            if rounds % 10_000 == 0 {
                self.tree.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(removed)
    }

    fn expire_dedup(
        &self,
        branch: &BranchKey,
        cutoff_ms: UnixMillis,
        floor: u64,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut batch = sled::Batch::default();
        for kv in self.scan(DEDUP, branch) {
            let (k, value) = kv?;
            // A value holds one round's entries in one bucket: keep those that must stay.
            let mut kept = Vec::new();
            let mut gone = 0;
            for (entry, bytes) in dedup_entries(&value).zip(value.chunks(DEDUP_ENTRY)) {
                let (_, entry) = entry?;
                if entry.server_time_ms < cutoff_ms && entry.seq <= floor {
                    gone += 1;
                } else {
                    kept.extend_from_slice(bytes);
                }
            }
            match (gone, kept.is_empty()) {
                (0, _) => {}
                (_, true) => batch.remove(k),
                (_, false) => batch.insert(k, kept),
            }
            removed += gone;
        }
        self.tree.apply_batch(batch)?;
        Ok(removed)
    }

    fn begin_run(&self, durable: bool) -> Result<usize, StoreError> {
        let previous = self.tree.get([RUN])?;
        let mut reset = 0;
        if previous.as_deref() == Some(&[0][..]) {
            // The last run acknowledged before flushing and did not stop cleanly: what its
            // clients saw may be gone, and its seqs would be reused. Start every log afresh.
            for branch in self.branches()? {
                if self.reset_epoch(&branch)?.is_some() {
                    reset += 1;
                }
            }
        }
        self.tree.insert([RUN], &[u8::from(durable)])?;
        self.flush()?;
        Ok(reset)
    }

    fn end_run(&self) -> Result<(), StoreError> {
        self.tree.remove([RUN])?;
        self.flush()?;
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests;
