//! The store, key by key.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use branchline_protocol::Name;

use super::keys::{decode_branch, encode_branch};
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
