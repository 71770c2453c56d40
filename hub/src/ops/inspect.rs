//! Offline tools on a stopped hub's store: `branchline-hub log inspect`, `log dump` and
//! `log reset-epoch`.
//!
//! Sled locks its directory, so these work on a stopped hub's store (or a copy of it) and say
//! so when a running hub holds it. `inspect` and `dump` only read: asking about a branch that
//! has no log is an error, never a reason to create one. `reset-epoch` is the one that writes.

use std::io::Write;
use std::path::{Path, PathBuf};

use branchline_protocol::{Codec, Epoch, Event};

use branchline_protocol::BranchKey;

use crate::engine::sled::{EventLog, SledLog, StoreError};

/// Page cache of an offline tool: it reads each page about once.
const CACHE_BYTES: u64 = 64 << 20;

/// Why an offline tool could not do its job. Every variant is fatal for the command.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// There is no hub store at the path.
    #[error("no branchline store at {}", .0.display())]
    NoStore(PathBuf),
    /// A running hub holds the store's lock.
    #[error("the store at {} is locked by a running hub; stop the hub first", .0.display())]
    Locked(PathBuf),
    /// The branch has no log in this store.
    #[error("no log for branch {0}")]
    NoLog(BranchKey),
    /// The store failed or holds unreadable data.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output could not be written.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

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

/// Which branches `reset-epoch` resets.
#[derive(Debug)]
pub enum Branches {
    /// One branch, which must have a log.
    One(BranchKey),
    /// Every branch with a log.
    All,
}

/// An epoch `reset-epoch` replaced.
#[derive(Debug)]
pub struct EpochReset {
    /// The branch.
    pub branch: BranchKey,
    /// Its epoch before.
    pub old: Epoch,
    /// Its epoch now.
    pub new: Epoch,
}

fn open(dir: &Path) -> Result<SledLog, InspectError> {
    // sled keeps its data in `db`; without it there is no store, and opening would make one.
    if !dir.join("db").is_file() {
        return Err(InspectError::NoStore(dir.to_path_buf()));
    }
    SledLog::open_existing(dir, CACHE_BYTES).map_err(|e| match e {
        // sled reports a held lock only as an I/O error with this text.
        e if e.is_locked() => InspectError::Locked(dir.to_path_buf()),
        other => InspectError::Store(other),
    })
}

/// Reports every branch of the store in `dir` (or only `only`) and writes a table to `out`.
pub fn inspect(
    dir: &Path,
    only: Option<&BranchKey>,
    out: &mut impl Write,
) -> Result<Vec<BranchReport>, InspectError> {
    let log = open(dir)?;
    let keys = match only {
        Some(key) => vec![key.clone()],
        None => log.branches()?,
    };
    let mut reports = Vec::new();
    for key in keys {
        let (epoch, head, floor) = log
            .branch_position(&key)?
            .ok_or_else(|| InspectError::NoLog(key.clone()))?;
        let (events, event_bytes) = log.event_stats(&key)?;
        reports.push(BranchReport {
            branch: key.to_string(),
            epoch: epoch.to_string(),
            head,
            floor,
            events,
            event_bytes,
        });
    }
    writeln!(
        out,
        "{:<32} {:<16} {:>12} {:>12} {:>12} {:>14}",
        "branch", "epoch", "head", "floor", "events", "event bytes"
    )?;
    for r in &reports {
        writeln!(
            out,
            "{:<32} {:<16} {:>12} {:>12} {:>12} {:>14}",
            r.branch, r.epoch, r.head, r.floor, r.events, r.event_bytes
        )?;
    }
    writeln!(out, "store size on disk: {} bytes", log.size_on_disk()?)?;
    Ok(reports)
}

/// Writes events of `branch` after `after` (at most `limit`) to `out` as JSON lines. Events
/// at or below the retention floor are gone (a few may linger in storage until their whole
/// round is trimmed): when `after` is below the floor, a line on `notes` says so and the dump
/// starts at the floor.
pub fn dump(
    dir: &Path,
    branch: &BranchKey,
    after: u64,
    limit: usize,
    out: &mut impl Write,
    notes: &mut impl Write,
) -> Result<usize, InspectError> {
    let log = open(dir)?;
    let (_, head, floor) = log
        .branch_position(branch)?
        .ok_or_else(|| InspectError::NoLog(branch.clone()))?;
    if after < floor {
        writeln!(
            notes,
            "{branch}: events up to seq {floor} were trimmed by retention (floor {floor}); \
             dumping from seq {}",
            floor + 1
        )?;
    }
    let mut written = 0;
    let mut from = after.max(floor);
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
            let line = serde_json::to_string(&event).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
            written += 1;
        }
    }
    Ok(written)
}

/// Gives `which` branches of the store in `dir` a new random epoch (for a store restored from
/// a backup: devices that resume from the old epoch are told `resync_required` instead of
/// being served a history that may differ from what they saw). Writes one line per branch,
/// `tenant/branch: old → new`, to `out`.
pub fn reset_epoch(
    dir: &Path,
    which: &Branches,
    out: &mut impl Write,
) -> Result<Vec<EpochReset>, InspectError> {
    let log = open(dir)?;
    let keys = match which {
        Branches::One(key) => vec![key.clone()],
        Branches::All => log.branches()?,
    };
    let mut resets = Vec::with_capacity(keys.len());
    for branch in keys {
        let (old, new) = log
            .reset_epoch(&branch)?
            .ok_or_else(|| InspectError::NoLog(branch.clone()))?;
        writeln!(out, "{branch}: {old} → {new}")?;
        resets.push(EpochReset { branch, old, new });
    }
    Ok(resets)
}

#[cfg(test)]
mod tests {
    // In tests a panic is the failure report.
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use branchline_protocol::{Custom, Effect, EventBody, Name};

    use super::*;
    use crate::engine::StoredEvent;
    use crate::engine::sled::log::Op;

    fn key(b: &str) -> BranchKey {
        BranchKey::new(Name::new("acme").unwrap(), Name::new(b).unwrap())
    }

    fn event(epoch: Epoch, seq: u64) -> StoredEvent {
        let event = Event {
            branch: Name::new("b1").unwrap(),
            epoch,
            seq,
            event_id: uuid::Uuid::now_v7(),
            device: Name::new("till-1").unwrap(),
            device_seq: seq,
            client_time_ms: 1_000,
            server_time_ms: 1_000 + seq as i64,
            base_seq: None,
            base_version: None,
            body: EventBody::Custom(Custom {
                custom_type: "test.note".into(),
                data: serde_json::json!({ "n": seq }),
            }),
            effect: Effect::default(),
        };
        StoredEvent {
            seq,
            server_time_ms: event.server_time_ms,
            bytes: Codec::MsgPack.encode(&event).unwrap(),
        }
    }

    /// A store holding `acme/b1` with events 1..=6 in rounds of two, trimmed to floor 2.
    fn store() -> (tempfile::TempDir, PathBuf, Epoch) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let log = SledLog::open(&path, 1 << 20).unwrap();
        let b = Arc::new(key("b1"));
        let epoch = log.open_branch(&b).unwrap().epoch;
        let rounds: Vec<Op> = [2, 4, 6]
            .into_iter()
            .map(|last| Op::Round {
                branch: b.clone(),
                events: vec![event(epoch, last - 1), event(epoch, last)],
                ids: vec![(uuid::Uuid::now_v7(), 0), (uuid::Uuid::now_v7(), 0)],
                head: last,
                devices: vec![(Name::new("till-1").unwrap(), last)],
            })
            .collect();
        log.apply(&rounds).unwrap();
        log.flush().unwrap();
        log.trim(&b, 2).unwrap();
        (dir, path, epoch)
    }

    /// Runs `tool` once the store's lock is free. In one process sled lets go of a closed
    /// store's lock a little after the last handle is dropped (its background threads hold
    /// on); between processes the lock goes with the process.
    fn unlocked<T>(mut tool: impl FnMut() -> Result<T, InspectError>) -> Result<T, InspectError> {
        let deadline = std::time::Instant::now() + crate::engine::sled::log::LOCK_WAIT;
        loop {
            match tool() {
                Err(InspectError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn dumped(path: &Path, after: u64) -> (Vec<Event>, String) {
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        unlocked(|| {
            out.clear();
            notes.clear();
            dump(path, &key("b1"), after, 100, &mut out, &mut notes)
        })
        .unwrap();
        let events = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (events, String::from_utf8(notes).unwrap())
    }

    #[test]
    fn asking_about_an_unknown_branch_is_an_error_and_writes_nothing() {
        let (_dir, path, _) = store();
        let err = unlocked(|| dump(&path, &key("nope"), 0, 10, &mut Vec::new(), &mut Vec::new()))
            .unwrap_err();
        assert_eq!(err.to_string(), "no log for branch acme/nope");
        let err = unlocked(|| inspect(&path, Some(&key("nope")), &mut Vec::new())).unwrap_err();
        assert!(matches!(err, InspectError::NoLog(_)), "{err}");
        let reports = unlocked(|| inspect(&path, None, &mut Vec::new())).unwrap();
        assert_eq!(
            reports
                .iter()
                .map(|r| r.branch.as_str())
                .collect::<Vec<_>>(),
            ["acme/b1"],
            "no log was created for the branch asked about"
        );
        let missing = tempfile::tempdir().unwrap();
        assert!(matches!(
            inspect(missing.path(), None, &mut Vec::new()).unwrap_err(),
            InspectError::NoStore(_)
        ));
        assert!(
            !missing.path().join("db").exists(),
            "no store was created either"
        );
    }

    #[test]
    fn a_dump_below_the_floor_says_so_and_starts_at_the_floor() {
        let (_dir, path, _) = store();
        let (events, notes) = dumped(&path, 0);
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        assert!(
            notes.contains("trimmed by retention (floor 2); dumping from seq 3"),
            "{notes}"
        );
        let (events, notes) = dumped(&path, 4);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6]);
        assert!(notes.is_empty(), "{notes}");
    }

    #[test]
    fn a_reset_gives_a_new_epoch_and_serves_nothing_of_the_old_one() {
        let (_dir, path, old) = store();
        let mut out = Vec::new();
        let resets = unlocked(|| {
            out.clear();
            reset_epoch(&path, &Branches::All, &mut out)
        })
        .unwrap();
        assert_eq!(resets.len(), 1);
        let new = resets[0].new;
        assert_eq!(resets[0].old, old);
        assert_ne!(new, old);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("acme/b1: {old} → {new}\n")
        );
        let (events, _) = dumped(&path, 6);
        assert!(
            events.is_empty(),
            "nothing of the old epoch is served: {events:?}"
        );
        let reports = unlocked(|| inspect(&path, None, &mut Vec::new())).unwrap();
        assert_eq!(
            (
                reports[0].epoch.as_str(),
                reports[0].head,
                reports[0].floor,
                reports[0].events
            ),
            (new.to_string().as_str(), 6, 6, 0),
            "the head stays; the floor moves up to it and the old events go"
        );
        let err = unlocked(|| reset_epoch(&path, &Branches::One(key("nope")), &mut Vec::new()))
            .unwrap_err();
        assert!(matches!(err, InspectError::NoLog(_)), "{err}");
    }

    #[test]
    fn a_store_in_use_is_reported_as_locked() {
        let (_dir, path, _) = store();
        let _running = SledLog::open(&path, 1 << 20).unwrap();
        let err = inspect(&path, None, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, InspectError::Locked(_)), "{err}");
        assert!(err.to_string().contains("stop the hub first"));
    }
}
