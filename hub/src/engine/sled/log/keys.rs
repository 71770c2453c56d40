//! The store's key layout and value encodings (the table is in [`super`], the store).

use std::collections::HashMap;
use std::sync::Arc;

use branchline_protocol::{BranchKey, Codec, Name};
use bytes::Bytes;
use uuid::Uuid;

use super::records::{DedupEntry, StoreError};
use crate::engine::StoredEvent;

/// `tenant \0 branch \0`, a branch's part of every key: names never hold a NUL, so this is
/// prefix-free.
pub(crate) fn encode_branch(branch: &BranchKey) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(branch.tenant.as_str().len() + branch.branch.as_str().len() + 2);
    out.extend_from_slice(branch.tenant.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(branch.branch.as_str().as_bytes());
    out.push(0);
    out
}

/// The branch a key part names, and what follows it.
pub(crate) fn decode_branch(bytes: &[u8]) -> Option<(BranchKey, &[u8])> {
    let t = bytes.iter().position(|&b| b == 0)?;
    let rest = &bytes[t + 1..];
    let b = rest.iter().position(|&b| b == 0)?;
    let tenant = Name::new(std::str::from_utf8(&bytes[..t]).ok()?).ok()?;
    let branch = Name::new(std::str::from_utf8(&rest[..b]).ok()?).ok()?;
    Some((BranchKey::new(tenant, branch), &rest[b + 1..]))
}

pub(crate) const META: u8 = b'M';
pub(crate) const HEAD: u8 = b'H';
pub(crate) const FLOOR: u8 = b'F';
pub(crate) const EVENT: u8 = b'E';
pub(crate) const DEDUP: u8 = b'D';
pub(crate) const PRODUCT: u8 = b'P';
pub(crate) const STOCK: u8 = b'S';
pub(crate) const CONFLICT: u8 = b'C';
pub(crate) const RUN: u8 = b'R';

/// Bytes of one dedup entry: event id, seq, content hash, server time.
pub(crate) const DEDUP_ENTRY: usize = 40;

/// The dedup bucket of an event id: its UUID v7 creation time in units of 1,024 ms.
pub(crate) fn dedup_bucket(event_id: &Uuid) -> [u8; 8] {
    let b = event_id.as_bytes();
    let ms = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    (ms >> 10).to_be_bytes()
}

/// The dedup entries of one `D` value.
pub(crate) fn dedup_entries(
    value: &[u8],
) -> impl Iterator<Item = Result<(Uuid, DedupEntry), StoreError>> {
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

pub(crate) fn key(tag: u8, branch: &BranchKey, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(
        1 + branch.tenant.as_str().len() + branch.branch.as_str().len() + 2 + suffix.len(),
    );
    k.push(tag);
    k.extend_from_slice(&encode_branch(branch));
    k.extend_from_slice(suffix);
    k
}

pub(crate) fn u64_at(bytes: &[u8], at: usize, what: &str) -> Result<u64, StoreError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: what.into(),
            why: format!("{} bytes", bytes.len()),
        })
}

pub(crate) fn i64_at(bytes: &[u8], at: usize, what: &str) -> Result<i64, StoreError> {
    u64_at(bytes, at, what).map(|v| v as i64)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, StoreError> {
    Codec::MsgPack
        .decode(bytes)
        .map_err(|e| StoreError::Corrupt {
            key: what.into(),
            why: e.to_string(),
        })
}

/// Appends one event to a round value: seq, server time, length, bytes.
pub(crate) fn push_entry(value: &mut Vec<u8>, event: &StoredEvent) {
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
pub(crate) fn entries(value: Bytes) -> impl Iterator<Item = Result<StoredEvent, StoreError>> {
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
pub(crate) fn encode_head(head: u64, devices: &[(Name, u64)]) -> Vec<u8> {
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

pub(crate) fn decode_head(value: &[u8]) -> Result<(u64, HashMap<Name, u64>), StoreError> {
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
pub(crate) struct BranchRounds<'a> {
    pub(crate) branch: &'a Arc<BranchKey>,
    /// Every event with its id and content hash.
    pub(crate) events: Vec<(&'a StoredEvent, &'a (Uuid, u64))>,
    /// The last round's head and device counters.
    pub(crate) head: u64,
    pub(crate) devices: &'a [(Name, u64)],
}

impl BranchRounds<'_> {
    /// One `E` value with every event, the `H` value of the last round, and one `D` value
    /// per bucket of their ids, all keyed by the last seq.
    pub(crate) fn write(&self, batch: &mut sled::Batch) {
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
