//! The replay log: the storage engine boundary and its sled implementation.
//!
//! The rest of the hub sees only [`EventLog`]: append a batch of typed [`Op`]s atomically
//! (events with their dedup entries, device counters and state), read a range of events, and
//! the per-branch metadata. [`SledLog`] keeps everything in one sled tree under typed key
//! prefixes, so that one group commit is one atomic `apply_batch` and one flush. Another engine
//! (a multi-node one) implements the same trait without touching rooms, sessions or HTTP.
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
use std::sync::Arc;
use std::time::Duration;

use branchline_durable::{Closing, DurableDir};
use branchline_protocol::{
    Codec, ConflictRecord, ConflictStatus, Epoch, Name, Sku, UnixMillis, now_ms,
};
use bytes::Bytes;
use uuid::Uuid;

use crate::state::ProductState;

pub use branchline_protocol::BranchKey;

/// `tenant \0 branch \0`, a branch's part of every key: names never hold a NUL, so this is
/// prefix-free.
fn encode_branch(branch: &BranchKey) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(branch.tenant.as_str().len() + branch.branch.as_str().len() + 2);
    out.extend_from_slice(branch.tenant.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(branch.branch.as_str().as_bytes());
    out.push(0);
    out
}

/// The branch a key part names, and what follows it.
fn decode_branch(bytes: &[u8]) -> Option<(BranchKey, &[u8])> {
    let t = bytes.iter().position(|&b| b == 0)?;
    let rest = &bytes[t + 1..];
    let b = rest.iter().position(|&b| b == 0)?;
    let tenant = Name::new(std::str::from_utf8(&bytes[..t]).ok()?).ok()?;
    let branch = Name::new(std::str::from_utf8(&rest[..b]).ok()?).ok()?;
    Some((BranchKey::new(tenant, branch), &rest[b + 1..]))
}

/// A stored event: its seq, when it was sequenced, and its MessagePack encoding.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// The event's seq.
    pub seq: u64,
    /// When the hub sequenced it.
    pub server_time_ms: UnixMillis,
    /// The `Event` as MessagePack, exactly as sent to MessagePack clients.
    pub bytes: Bytes,
}

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

/// A storage failure. Fatal for the write that met it: the hub stops accepting writes until
/// it is restarted (see [`crate::commit`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed.
    #[error("store: {0}")]
    Engine(#[from] sled::Error),
    /// A file of the store could not be synced, listed or measured.
    #[error("store files: {0}")]
    Disk(#[from] std::io::Error),
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

impl StoreError {
    /// Whether it failed for want of disk space.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Engine(sled::Error::Io(e)) | StoreError::Disk(e) => e,
            _ => return false,
        };
        io.kind() == std::io::ErrorKind::StorageFull
    }
}

/// The storage engine boundary.
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

const META: u8 = b'M';
const HEAD: u8 = b'H';
const FLOOR: u8 = b'F';
const EVENT: u8 = b'E';
const DEDUP: u8 = b'D';
const PRODUCT: u8 = b'P';
const STOCK: u8 = b'S';
const CONFLICT: u8 = b'C';
const RUN: u8 = b'R';

/// Bytes of one dedup entry: event id, seq, content hash, server time.
const DEDUP_ENTRY: usize = 40;

/// The dedup bucket of an event id: its UUID v7 creation time in units of 1,024 ms.
fn dedup_bucket(event_id: &Uuid) -> [u8; 8] {
    let b = event_id.as_bytes();
    let ms = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    (ms >> 10).to_be_bytes()
}

/// The dedup entries of one `D` value.
fn dedup_entries(value: &[u8]) -> impl Iterator<Item = Result<(Uuid, DedupEntry), StoreError>> {
    let corrupt = value.len() % DEDUP_ENTRY != 0;
    let whole = if corrupt { &[][..] } else { value };
    let err = corrupt.then(|| {
        Err(StoreError::Corrupt {
            key: "dedup".into(),
            why: format!("{} bytes", value.len()),
        })
    });
    whole
        .chunks_exact(DEDUP_ENTRY)
        .map(|e| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&e[..16]);
            Ok((
                Uuid::from_bytes(id),
                DedupEntry {
                    seq: u64_at(e, 16, "dedup")?,
                    hash: u64_at(e, 24, "dedup")?,
                    server_time_ms: i64_at(e, 32, "dedup")?,
                },
            ))
        })
        .chain(err)
}

fn key(tag: u8, branch: &BranchKey, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(
        1 + branch.tenant.as_str().len() + branch.branch.as_str().len() + 2 + suffix.len(),
    );
    k.push(tag);
    k.extend_from_slice(&encode_branch(branch));
    k.extend_from_slice(suffix);
    k
}

fn u64_at(bytes: &[u8], at: usize, what: &str) -> Result<u64, StoreError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: what.into(),
            why: format!("{} bytes", bytes.len()),
        })
}

fn i64_at(bytes: &[u8], at: usize, what: &str) -> Result<i64, StoreError> {
    u64_at(bytes, at, what).map(|v| v as i64)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    Codec::MsgPack
        .decode(bytes)
        .map_err(|e| StoreError::Corrupt {
            key: what.into(),
            why: e.to_string(),
        })
}

/// Appends one event to a round value: seq, server time, length, bytes.
fn push_entry(value: &mut Vec<u8>, event: &StoredEvent) {
    value.extend_from_slice(&event.seq.to_be_bytes());
    value.extend_from_slice(&event.server_time_ms.to_be_bytes());
    value.extend_from_slice(
        &u32::try_from(event.bytes.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    value.extend_from_slice(&event.bytes);
}

/// The events of a round value, sharing its bytes.
fn entries(value: Bytes) -> impl Iterator<Item = Result<StoredEvent, StoreError>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= value.len() {
            return None;
        }
        let entry = (|| {
            let seq = u64_at(&value, at, "round")?;
            let server_time_ms = i64_at(&value, at + 8, "round")?;
            let len = value
                .get(at + 16..at + 20)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    key: "round".into(),
                    why: "truncated entry".into(),
                })? as usize;
            let start = at + 20;
            if start + len > value.len() {
                return Err(StoreError::Corrupt {
                    key: "round".into(),
                    why: "entry past the end".into(),
                });
            }
            at = start + len;
            Ok(StoredEvent {
                seq,
                server_time_ms,
                bytes: value.slice(start..start + len),
            })
        })();
        if entry.is_err() {
            at = value.len();
        }
        Some(entry)
    })
}

/// The `H` value: the head, then each device as name length, name and `device_seq`.
fn encode_head(head: u64, devices: &[(Name, u64)]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + devices.len() * 24);
    value.extend_from_slice(&head.to_be_bytes());
    for (device, seq) in devices {
        let name = device.as_str().as_bytes();
        value.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        value.extend_from_slice(name);
        value.extend_from_slice(&seq.to_be_bytes());
    }
    value
}

fn decode_head(value: &[u8]) -> Result<(u64, HashMap<Name, u64>), StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: "head".into(),
        why: "bad device entry".into(),
    };
    let head = u64_at(value, 0, "head")?;
    let mut devices = HashMap::new();
    let mut at = 8;
    while at < value.len() {
        let len = usize::from(value[at]);
        let name = value.get(at + 1..at + 1 + len).ok_or_else(corrupt)?;
        let device = std::str::from_utf8(name)
            .ok()
            .and_then(|n| Name::new(n).ok())
            .ok_or_else(corrupt)?;
        devices.insert(device, u64_at(value, at + 1 + len, "head")?);
        at += 1 + len + 8;
    }
    Ok((head, devices))
}

/// The rounds one commit adds to one branch, in seq order, as one.
struct BranchRounds<'a> {
    branch: &'a Arc<BranchKey>,
    /// Every event with its id and content hash.
    events: Vec<(&'a StoredEvent, &'a (Uuid, u64))>,
    /// The last round's head and device counters.
    head: u64,
    devices: &'a [(Name, u64)],
}

impl BranchRounds<'_> {
    /// One `E` value with every event, the `H` value of the last round, and one `D` value
    /// per bucket of their ids, all keyed by the last seq.
    fn write(&self, batch: &mut sled::Batch) {
        let size = self.events.iter().map(|(e, _)| 20 + e.bytes.len()).sum();
        let mut value = Vec::with_capacity(size);
        // Ids made within the same second share a bucket: usually one key.
        let mut buckets: Vec<([u8; 8], Vec<u8>)> = Vec::new();
        for (event, (id, hash)) in &self.events {
            push_entry(&mut value, event);
            let bucket = dedup_bucket(id);
            let at = match buckets.iter().position(|(b, _)| *b == bucket) {
                Some(at) => at,
                None => {
                    buckets.push((bucket, Vec::new()));
                    buckets.len() - 1
                }
            };
            let entry = &mut buckets[at].1;
            entry.extend_from_slice(id.as_bytes());
            entry.extend_from_slice(&event.seq.to_be_bytes());
            entry.extend_from_slice(&hash.to_be_bytes());
            entry.extend_from_slice(&event.server_time_ms.to_be_bytes());
        }
        let (branch, head) = (self.branch, self.head);
        batch.insert(key(EVENT, branch, &head.to_be_bytes()), value);
        batch.insert(key(HEAD, branch, &[]), encode_head(head, self.devices));
        for (bucket, entries) in buckets {
            let mut suffix = [0u8; 16];
            suffix[..8].copy_from_slice(&bucket);
            suffix[8..].copy_from_slice(&head.to_be_bytes());
            batch.insert(key(DEDUP, branch, &suffix), entries);
        }
    }
}

/// sled's segment size for new stores: 8 MiB, where sled's default is 512 KiB. sled writes
/// any node over a quarter of a segment to a blob file of its own, and a node of this log
/// (up to 17 rounds of a branch) often passes 128 KiB under load: every such write then costs
/// a file, its `fdatasync` and a directory sync before the commit can be acknowledged,
/// which more than doubled the commit time. With 8 MiB segments (2 MiB nodes inline) the
/// durable publish bench writes no blob at all. sled keeps a store's segment size for life,
/// so a store made with another keeps it. (sled marks the setting as one for its own tests;
/// the power-loss tests run the hub with it.)
const SEGMENT_SIZE: usize = 8 << 20;

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
    db: Closing<sled::Db>,
    tree: Closing<sled::Tree>,
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

    fn with_db(db: sled::Db, dir: &Path) -> Result<Self, StoreError> {
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

    fn read_u64(&self, k: &[u8], what: &str) -> Result<Option<u64>, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(t: &str, b: &str) -> BranchKey {
        BranchKey::new(Name::new(t).unwrap(), Name::new(b).unwrap())
    }

    #[test]
    fn branch_keys_are_prefix_free_and_round_trip() {
        let a = branch("acme", "b1");
        let b = branch("acme", "b10");
        assert!(!encode_branch(&b).starts_with(&encode_branch(&a)));
        let encoded = encode_branch(&a);
        let (decoded, rest) = decode_branch(&encoded).unwrap();
        assert_eq!(decoded, a);
        assert!(rest.is_empty());
        assert_eq!(BranchKey::parse("acme/b1").unwrap(), a);
        assert!(BranchKey::parse("acme").is_err());
    }

    #[test]
    fn a_store_left_with_an_interrupted_snapshot_opens() {
        let dir = tempfile::tempdir().unwrap();
        let b = branch("acme", "b1");
        let epoch = SledLog::open(dir.path(), 1 << 20)
            .unwrap()
            .open_branch(&b)
            .unwrap()
            .epoch;
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), b"").unwrap();
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.open_branch(&b).unwrap().epoch, epoch);
    }

    #[test]
    fn epoch_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let b = branch("acme", "b1");
        let first = {
            let log = SledLog::open(dir.path(), 1 << 20).unwrap();
            log.open_branch(&b).unwrap().epoch
        };
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.open_branch(&b).unwrap().epoch, first);
        assert_ne!(log.open_branch(&branch("acme", "b2")).unwrap().epoch, first);
        assert_eq!(log.branches().unwrap().len(), 2);
    }

    #[test]
    fn reads_return_ranges_in_order_and_trim_moves_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        let b = Arc::new(branch("acme", "b1"));
        log.open_branch(&b).unwrap();
        // Three rounds of 100 events each.
        let ops: Vec<Op> = (0..3u64)
            .map(|round| Op::Round {
                branch: b.clone(),
                events: (round * 100 + 1..=round * 100 + 100)
                    .map(|seq| StoredEvent {
                        seq,
                        server_time_ms: 1_000 + seq as i64,
                        bytes: Bytes::from(seq.to_string()),
                    })
                    .collect(),
                ids: (0..100).map(|_| (Uuid::now_v7(), 0)).collect(),
                head: round * 100 + 100,
                devices: vec![(Name::new("till-1").unwrap(), round + 1)],
            })
            .collect();
        // Three commits of one round each.
        for op in &ops {
            log.apply(std::slice::from_ref(op)).unwrap();
        }
        log.flush().unwrap();
        let got = log.read_events(&b, 255, 300, 10).unwrap();
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (256..=265).collect::<Vec<_>>(),
            "no lexicographic surprise at 255/256"
        );
        assert_eq!(got[0].bytes, Bytes::from("256"));
        assert_eq!(
            log.read_events(&b, 298, 299, 10).unwrap().len(),
            1,
            "until is inclusive"
        );
        assert_eq!(
            log.read_events(&b, 150, 300, 3)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [151, 152, 153]
        );
        assert_eq!(log.last_seq_before(&b, 1_101).unwrap(), Some(100));
        assert_eq!(
            log.trim(&b, 100).unwrap(),
            100,
            "the first round goes whole"
        );
        assert_eq!(
            log.trim(&b, 150).unwrap(),
            0,
            "a round across the floor stays"
        );
        let loaded = log.open_branch(&b).unwrap();
        assert_eq!(
            (loaded.head, loaded.floor, loaded.head_time_ms),
            (300, 150, 1_300)
        );
        assert_eq!(
            loaded.devices.get(&Name::new("till-1").unwrap()),
            Some(&3),
            "devices as of the last round"
        );
        assert_eq!(log.read_events(&b, 150, 300, 1).unwrap()[0].seq, 151);
        assert_eq!(log.event_stats(&b).unwrap().0, 200);
    }

    /// An id made at `ms` (Unix milliseconds), as a UUID v7 would be.
    fn id_at(ms: u64, n: u8) -> Uuid {
        let mut b = [n; 16];
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        b[6] = 0x70 | (n & 0x0f);
        Uuid::from_bytes(b)
    }

    fn round(b: &Arc<BranchKey>, first: u64, ids: &[Uuid], time_ms: i64) -> Op {
        Op::Round {
            branch: b.clone(),
            events: (0..ids.len() as u64)
                .map(|i| StoredEvent {
                    seq: first + i,
                    server_time_ms: time_ms,
                    bytes: Bytes::from_static(b"e"),
                })
                .collect(),
            ids: ids.iter().map(|id| (*id, first)).collect(),
            head: first + ids.len() as u64 - 1,
            devices: vec![],
        }
    }

    #[test]
    fn dedup_entries_are_found_by_id_across_buckets_and_outlive_nothing_still_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        let b = Arc::new(branch("acme", "b1"));
        let other = Arc::new(branch("acme", "b2"));
        log.open_branch(&b).unwrap();
        // One round whose ids span two buckets (a device that was offline), then a round of
        // ids made in one second, then the same ids on another branch.
        let old = [id_at(1_000, 1), id_at(500_000, 2), id_at(500_001, 3)];
        let new: Vec<Uuid> = (10..20).map(|n| id_at(900_000, n)).collect();
        log.apply(&[
            round(&b, 1, &old, 10_000),
            round(&b, 4, &new, 20_000),
            round(&other, 1, &new[..1], 20_000),
        ])
        .unwrap();
        for (seq, id) in (1..).zip(old.iter().chain(&new)) {
            let entry = log.dedup(&b, id).unwrap().expect("remembered");
            assert_eq!(entry.seq, seq, "{id}");
        }
        assert_eq!(log.dedup(&b, &id_at(900_000, 99)).unwrap(), None);
        assert_eq!(
            log.dedup(&other, &new[0]).unwrap().map(|e| e.seq),
            Some(1),
            "branches keep their own entries"
        );
        let mut ids = Vec::new();
        log.dedup_ids(&b, &mut |id| ids.push(id)).unwrap();
        assert_eq!(ids.len(), 13);

        // Old enough, but the log still holds them: nothing goes.
        assert_eq!(log.expire_dedup(&b, 30_000, 0).unwrap(), 0);
        assert!(log.dedup(&b, &old[0]).unwrap().is_some());
        // The first round trimmed (floor 3) and old: it goes; the second is not old enough.
        assert_eq!(log.expire_dedup(&b, 15_000, 13).unwrap(), 3);
        assert_eq!(log.dedup(&b, &old[1]).unwrap(), None);
        assert!(log.dedup(&b, &new[9]).unwrap().is_some());
        assert!(log.dedup(&other, &new[0]).unwrap().is_some());
    }

    #[test]
    fn rounds_of_one_commit_are_stored_as_one_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (
            Arc::new(branch("acme", "b1")),
            Arc::new(branch("acme", "b2")),
        );
        log.open_branch(&a).unwrap();
        log.open_branch(&b).unwrap();
        let ids: Vec<Uuid> = (0..6).map(|n| id_at(5_000, n)).collect();
        // Two branches' rounds interleaved, as writers hand them to one commit.
        log.apply(&[
            round(&a, 1, &ids[..2], 10),
            round(&b, 1, &ids[2..3], 10),
            round(&a, 3, &ids[3..5], 11),
            round(&b, 2, &ids[5..], 11),
        ])
        .unwrap();
        let seqs = |k: &BranchKey| -> Vec<u64> {
            log.read_events(k, 0, 10, 10)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        assert_eq!((seqs(&a), seqs(&b)), (vec![1, 2, 3, 4], vec![1, 2]));
        assert_eq!(log.position(&a).unwrap().0, 4, "the head of the last round");
        assert_eq!(log.dedup(&a, &ids[4]).unwrap().map(|e| e.seq), Some(4));
        assert_eq!(log.dedup(&b, &ids[5]).unwrap().map(|e| e.seq), Some(2));
        assert_eq!(
            log.trim(&a, 2).unwrap(),
            0,
            "one stored round: it stays until the floor passes its last event"
        );
        assert_eq!(log.trim(&a, 4).unwrap(), 4);
    }

    #[test]
    fn an_interval_run_that_did_not_stop_cleanly_resets_every_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(branch("acme", "b1"));
        let epoch_of = |log: &SledLog| log.open_branch(&b).unwrap().epoch;
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.begin_run(false).unwrap(), 0, "a fresh store");
        let first = epoch_of(&log);
        log.apply(&[round(&b, 1, &[id_at(1, 1), id_at(1, 2)], 10)])
            .unwrap();
        log.flush().unwrap();
        log.end_run().unwrap();
        assert_eq!(
            log.begin_run(false).unwrap(),
            0,
            "the interval run stopped cleanly"
        );
        assert_eq!(epoch_of(&log), first);
        // This interval run "crashes": no end_run.
        drop(log);
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.begin_run(true).unwrap(), 1);
        let loaded = log.open_branch(&b).unwrap();
        assert_ne!(loaded.epoch, first, "a new epoch");
        assert_eq!(
            (loaded.head, loaded.floor),
            (2, 2),
            "nothing to replay under it"
        );
        // A durable run that crashes leaves the epoch alone.
        drop(log);
        let log = SledLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.begin_run(true).unwrap(), 0);
        assert_eq!(epoch_of(&log), loaded.epoch);
    }
}
