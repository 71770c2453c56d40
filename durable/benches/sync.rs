//! What durability costs per group commit on this machine's disk: one `fdatasync` of a small
//! overwrite, and a small sled write flushed by sled alone (`sync_file_range`) against the
//! same followed by [`DurableDir::sync`].
//!
//! The store lives under `target/` (on the project's disk, not in a RAM-backed `/tmp`).
//! Run: `cargo bench -p branchline-durable --bench sync`

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use branchline_durable::DurableDir;
use criterion::{Criterion, criterion_group, criterion_main};

/// A scratch directory on the disk the project (and its stores) live on.
fn scratch() -> tempfile::TempDir {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&target).expect("the target directory");
    tempfile::tempdir_in(target).expect("a scratch directory")
}

fn sync(c: &mut Criterion) {
    let dir = scratch();
    let mut file = std::fs::File::create(dir.path().join("f")).expect("a file");
    file.write_all(&[0; 4096]).expect("a page");
    file.sync_all().expect("synced");
    c.bench_function("fdatasync of a 4 KiB overwrite", |b| {
        b.iter(|| {
            file.write_at(&[1; 4096], 0).expect("written");
            file.sync_data().expect("synced");
        });
    });

    let store = dir.path().join("store");
    let db = sled::Config::new()
        .path(&store)
        .flush_every_ms(None)
        .open()
        .expect("a store");
    let durable = DurableDir::open(&store).expect("durable");
    let mut n = 0u64;
    let mut write = || {
        n += 1;
        db.insert(n.to_be_bytes(), &[7u8; 300][..])
            .expect("inserted");
    };
    c.bench_function("sled insert + flush (sync_file_range only)", |b| {
        b.iter(|| {
            write();
            db.flush().expect("flushed");
        });
    });
    c.bench_function("sled insert + flush + DurableDir::sync", |b| {
        b.iter(|| {
            write();
            db.flush().expect("flushed");
            durable.sync().expect("synced");
        });
    });
}

criterion_group!(benches, sync);
criterion_main!(benches);
