//! An interrupted snapshot (a start or a snapshot on a full disk) leaves `snap.*.generating`
//! behind, empty or partial. sled 0.34 reads it as the newest snapshot and refuses to open the
//! store; [`prepare`] removes it, and the store opens with everything that was flushed.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use branchline_durable::{DurableDir, prepare, segment_size};

#[test]
fn an_interrupted_snapshot_no_longer_blocks_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let db = sled::open(&path).unwrap();
        db.insert(b"sale", b"R1").unwrap();
        db.flush().unwrap();
        DurableDir::open(&path).unwrap().sync().unwrap();
    }
    // What a start on a full disk leaves: an empty snapshot, and a partial one.
    std::fs::write(path.join("snap.FFFFFFFFFFFFFFFF.generating"), b"").unwrap();
    std::fs::write(
        path.join("snap.FFFFFFFFFFFFFFFE.generating"),
        b"partial bytes",
    )
    .unwrap();
    let refused = sled::open(&path).map(|_| ()).unwrap_err();
    assert!(
        matches!(refused, sled::Error::Corruption { .. }),
        "sled alone refuses the store: {refused:?}"
    );

    let removed = prepare(&path).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    let db = sled::open(&path).unwrap();
    assert_eq!(db.get(b"sale").unwrap().as_deref(), Some(&b"R1"[..]));
    assert!(
        prepare(&path).unwrap().is_empty(),
        "nothing else is touched"
    );
}

#[test]
fn a_missing_store_is_nothing_to_prepare() {
    let dir = tempfile::tempdir().unwrap();
    assert!(prepare(&dir.path().join("absent")).unwrap().is_empty());
}

#[test]
fn the_segment_size_of_a_store_is_read_from_its_configuration() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(segment_size(dir.path()), None, "no store yet");
    let path = dir.path().join("store");
    drop(
        sled::Config::new()
            .path(&path)
            .segment_size(1 << 23)
            .open()
            .unwrap(),
    );
    assert_eq!(segment_size(&path), Some(1 << 23));
}
