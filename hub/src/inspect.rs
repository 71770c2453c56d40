//! Offline inspection of a store: `branchline-hub log inspect` and `log dump`.
//!
//! Sled locks its directory, so these read a stopped hub's store (or a copy of it).

use std::io::Write;
use std::path::Path;

use branchline_protocol::{Codec, Event};

use crate::config::FsyncMode;
use crate::log::{BranchKey, EventLog, SledLog, StoreError};

/// One branch as `log inspect` reports it.
#[derive(Debug, serde::Serialize)]
pub struct BranchReport {
    /// `tenant/branch`.
    pub branch: String,
    /// The log's epoch.
    pub epoch: String,
    /// The last seq.
    pub head: u64,
    /// The retention floor.
    pub floor: u64,
    /// Events held.
    pub events: u64,
    /// Bytes of those events (keys and values).
    pub event_bytes: u64,
}

fn open(dir: &Path) -> Result<SledLog, StoreError> {
    if !dir.exists() {
        return Err(StoreError::Corrupt {
            key: dir.display().to_string(),
            why: "no store at this path".into(),
        });
    }
    SledLog::open(dir, 64 << 20, FsyncMode::Always)
}

/// Reports every branch of the store in `dir` (or only `only`) and writes a table to `out`.
pub fn inspect(
    dir: &Path,
    only: Option<&BranchKey>,
    out: &mut impl Write,
) -> Result<Vec<BranchReport>, StoreError> {
    let log = open(dir)?;
    let mut reports = Vec::new();
    for key in log.branches()? {
        if only.is_some_and(|o| *o != key) {
            continue;
        }
        let loaded = log.open_branch(&key)?;
        let (events, event_bytes) = log.event_stats(&key)?;
        reports.push(BranchReport {
            branch: key.to_string(),
            epoch: loaded.epoch.to_string(),
            head: loaded.head,
            floor: loaded.floor,
            events,
            event_bytes,
        });
    }
    let io = |e: std::io::Error| StoreError::Corrupt {
        key: "output".into(),
        why: e.to_string(),
    };
    writeln!(
        out,
        "{:<32} {:<16} {:>12} {:>12} {:>12} {:>14}",
        "branch", "epoch", "head", "floor", "events", "event bytes"
    )
    .map_err(io)?;
    for r in &reports {
        writeln!(
            out,
            "{:<32} {:<16} {:>12} {:>12} {:>12} {:>14}",
            r.branch, r.epoch, r.head, r.floor, r.events, r.event_bytes
        )
        .map_err(io)?;
    }
    writeln!(out, "store size on disk: {} bytes", log.size_on_disk()?).map_err(io)?;
    Ok(reports)
}

/// Writes events of `branch` after `after` (at most `limit`) to `out` as JSON lines.
pub fn dump(
    dir: &Path,
    branch: &BranchKey,
    after: u64,
    limit: usize,
    out: &mut impl Write,
) -> Result<usize, StoreError> {
    let log = open(dir)?;
    let head = log.open_branch(branch)?.head;
    let io = |e: std::io::Error| StoreError::Corrupt {
        key: "output".into(),
        why: e.to_string(),
    };
    let mut written = 0;
    let mut from = after;
    while written < limit && from < head {
        let events = log.read_events(branch, from, head, (limit - written).min(1024))?;
        let Some(last) = events.last() else { break };
        from = last.seq;
        for stored in &events {
            let event: Event =
                Codec::MsgPack
                    .decode(&stored.bytes)
                    .map_err(|e| StoreError::Corrupt {
                        key: format!("{branch} seq {}", stored.seq),
                        why: e.to_string(),
                    })?;
            let line = serde_json::to_string(&event).map_err(|e| StoreError::Corrupt {
                key: "event".into(),
                why: e.to_string(),
            })?;
            writeln!(out, "{line}").map_err(io)?;
            written += 1;
        }
    }
    Ok(written)
}
