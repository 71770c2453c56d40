//! The mounted filesystem, driven through real system calls: what `fsync` makes durable
//! survives a cut, what it does not is gone, and a full disk says `ENOSPC`.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};

use branchline_powercut::{Cut, PowerCutFs};

fn read(path: &std::path::Path) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut out).unwrap();
            Some(out)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn only_what_was_synced_survives_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut fs = PowerCutFs::mount(dir.path()).unwrap();
    let root = fs.path().to_path_buf();

    // A file synced with its directory: survives whole.
    let kept = root.join("kept");
    let mut f = File::create(&kept).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_data().unwrap();
    File::open(&root).unwrap().sync_all().unwrap();
    // Written after the sync: lost.
    f.write_all(b" and more").unwrap();
    drop(f);
    // A subdirectory and a file in it, all synced.
    fs::create_dir(root.join("sub")).unwrap();
    File::open(&root).unwrap().sync_all().unwrap();
    let inner = root.join("sub/inner");
    let mut h = File::create(&inner).unwrap();
    h.write_all(b"inside").unwrap();
    h.sync_all().unwrap();
    File::open(root.join("sub")).unwrap().sync_all().unwrap();
    drop(h);
    // Synced, but its directory was not synced after it was made: its name is lost.
    let orphan = root.join("orphan");
    let mut g = File::create(&orphan).unwrap();
    g.write_all(b"bytes").unwrap();
    g.sync_all().unwrap();
    drop(g);
    assert_eq!(read(&kept).unwrap(), b"synced and more");

    let before = fs.syncs();
    assert!(before.files >= 3 && before.dirs >= 3, "{before:?}");
    let report = fs.cut(Cut::DropUnsynced).unwrap();
    assert_eq!(report.bytes_lost, 15, "the dirty page");
    assert_eq!(read(&kept).unwrap(), b"synced");
    assert_eq!(read(&orphan), None);
    assert_eq!(read(&inner).unwrap(), b"inside");

    // The remounted filesystem works as before.
    let mut again = OpenOptions::new().append(true).open(&kept).unwrap();
    again.write_all(b"!").unwrap();
    again.sync_data().unwrap();
    drop(again);
    fs.cut(Cut::Torn { seed: 1 }).unwrap();
    assert_eq!(read(&kept).unwrap(), b"synced!");
}

#[test]
fn a_full_disk_refuses_writes_and_statfs_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(dir.path()).unwrap();
    fs.set_capacity(Some(64 * 1024));
    let mut f = File::create(fs.path().join("big")).unwrap();
    f.write_all(&[7u8; 60 * 1024]).unwrap();
    let err = f.write_all(&[7u8; 8 * 1024]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
    assert!(fs.free_bytes() < 8 * 1024);
    fs.set_capacity(None);
    f.write_all(&[7u8; 8 * 1024]).unwrap();
}
