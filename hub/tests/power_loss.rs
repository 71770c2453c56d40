//! Power loss (guarantees 2 and 6): the real hub binary keeps its store on a disk that, at a
//! power cut, loses everything not made durable by `fsync`/`fdatasync` (and every name whose
//! directory was not synced), or, for a torn cut, keeps a random part of it page by page.
//! Devices publish as fast as they are acknowledged; at random moments the hub is killed with
//! `kill -9` and the power is cut; the hub starts again on what survived. Every acknowledged
//! event must be there exactly once at its seq, the seqs gap-free, dedup and `device_seq`
//! continuing, and the epoch unchanged.
//!
//! `BRANCHLINE_POWER_CUTS=500 cargo test -p branchline-hub --test power_loss` runs a longer
//! form (50 cuts by default); `BRANCHLINE_POWER_CUT_SEED` replays a run.
//!
//! The disk is a FUSE filesystem (`branchline-powercut`): these tests need `/dev/fuse` and
//! root, as CI has.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use branchline_hub::protocol::*;
use branchline_powercut::{Cut, PowerCutFs};
use rand::{Rng, SeedableRng};
use support::fleet::{DEVICES, Fleet, check_logs, in_flight_at_each_kill};
use support::process::{HubProcess, SECRET, cashier_of};
use support::*;

async fn spawn_hub(data: &Path) -> HubProcess {
    HubProcess::start(data, &["--token-secret", SECRET]).await
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kills the hub, cuts the power (`DropUnsynced` and `Torn` in turn), and returns the bytes
/// of dirty pages the cut took back.
async fn kill_and_cut(hub: HubProcess, disk: &mut PowerCutFs, how: Cut) -> u64 {
    hub.kill_9().await;
    tokio::task::block_in_place(|| disk.cut(how))
        .expect("the power comes back")
        .bytes_lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_at_random_moments_lose_no_acknowledged_event() {
    let cuts = setting("BRANCHLINE_POWER_CUTS", 50) as usize;
    let seed = setting("BRANCHLINE_POWER_CUT_SEED", rand::random());
    eprintln!("{cuts} power cuts, seed {seed} (BRANCHLINE_POWER_CUT_SEED replays them)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mnt = tempfile::tempdir().unwrap();
    let mut disk = PowerCutFs::mount(mnt.path()).unwrap();
    let data = disk.path().join("data");
    let mut hub = spawn_hub(&data).await;
    let fleet = Fleet::start(&hub.addr, &DEVICES, u64::MAX);
    let mut bytes_lost = 0;
    for cut in 0..cuts {
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..300))).await;
        let how = if cut % 2 == 0 {
            Cut::DropUnsynced
        } else {
            Cut::Torn { seed: rng.random() }
        };
        fleet.killing();
        bytes_lost += kill_and_cut(hub, &mut disk, how).await;
        hub = spawn_hub(&data).await;
        fleet.moved(&hub.addr);
    }
    let kills = fleet.kills();
    let logs = fleet.finish().await;
    let in_flight = in_flight_at_each_kill(&logs, kills);
    let cut_in_flight = in_flight.iter().filter(|&&n| n > 0).count();
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    eprintln!(
        "{acked} events acknowledged; {cut_in_flight} of {cuts} cuts came with publishes in \
         flight; the cuts took back {bytes_lost} bytes of dirty pages; syncs seen: {:?}",
        disk.syncs()
    );
    assert!(
        cut_in_flight >= cuts / 2,
        "most cuts must land while publishes are in flight, or the window was never hit"
    );
    assert!(
        bytes_lost > 0,
        "the cuts must take back unsynced writes, or they tested nothing"
    );
    check_logs(&hub, &["b1", "b2"], &logs).await;
    hub.kill_9().await;
}

/// Events large enough that sled keeps them in blob files of their own, which it neither
/// syncs nor names durably by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_in_sled_blob_files_survive_power_cuts() {
    let mnt = tempfile::tempdir().unwrap();
    let mut disk = PowerCutFs::mount(mnt.path()).unwrap();
    let data = disk.path().join("data");
    let mut hub = spawn_hub(&data).await;
    let big = |n: u64| {
        EventBody::Custom(Custom {
            custom_type: "test.big".into(),
            data: serde_json::json!({ "n": n, "pad": "x".repeat(600 * 1024) }),
        })
    };
    let mut acked = Vec::new();
    let mut device_seq = 1;
    let mut blobs_seen = 0;
    for round in 0..6u64 {
        let mut till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
        till.hello(&cashier_of("b1", "till-1"), "acme", "till-1", vec![])
            .await;
        for _ in 0..4 {
            let accepted = till
                .publish(publish("b1", device_seq, big(device_seq)))
                .await
                .unwrap();
            acked.push((accepted.seq, device_seq));
            device_seq += 1;
        }
        drop(till);
        blobs_seen += std::fs::read_dir(data.join("blobs")).unwrap().count();
        let how = if round % 2 == 0 {
            Cut::DropUnsynced
        } else {
            Cut::Torn { seed: round }
        };
        kill_and_cut(hub, &mut disk, how).await;
        hub = spawn_hub(&data).await;
    }
    assert!(
        blobs_seen > 0,
        "sled wrote blob files, which this test is about"
    );
    let till = cashier_of("b1", "till-1");
    let events = hub.events("b1", 100).await;
    assert_contiguous(&events, 1, acked.len() as u64);
    for ((seq, n), event) in acked.iter().zip(&events) {
        assert_eq!(event.seq, *seq);
        let EventBody::Custom(c) = &event.body else {
            panic!("{event:?}")
        };
        assert_eq!(c.data["n"], *n, "the event at seq {seq} is whole");
        assert_eq!(c.data["pad"].as_str().map(str::len), Some(600 * 1024));
    }
    // The device goes on where it was.
    let mut ws = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    ws.hello(&till, "acme", "till-1", vec![]).await;
    let next = ws
        .publish(publish("b1", device_seq, note(0)))
        .await
        .unwrap();
    assert_eq!(next.seq, acked.len() as u64 + 1);
    hub.kill_9().await;
}

/// `--fsync interval`: acknowledged before the sync, synced at most one interval later, even
/// when nothing else is written. After a cut, what was acknowledged more than an interval
/// earlier is there (under a new epoch: an interval-mode run that did not stop cleanly makes
/// every device resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_syncs_within_the_interval_even_when_quiet() {
    let mnt = tempfile::tempdir().unwrap();
    let mut disk = PowerCutFs::mount(mnt.path()).unwrap();
    let data = disk.path().join("data");
    let args = ["--token-secret", SECRET, "--fsync", "interval=200ms"];
    let hub = HubProcess::start(&data, &args).await;
    let mut till = hub.till("till-1").await;
    let mut last = None;
    for i in 1..=20 {
        last = Some(till.publish(publish("b1", i, note(i))).await.unwrap());
    }
    let last = last.unwrap();
    drop(till);
    // Quiet for several intervals: the ticks sync what the last commits wrote.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let synced = disk.syncs();
    kill_and_cut(hub, &mut disk, Cut::DropUnsynced).await;
    let hub = HubProcess::start(&data, &args).await;
    let status = hub.b1_status().await;
    assert_eq!(status.head, 20, "all 20 were synced within the interval");
    assert_ne!(
        status.epoch, last.epoch,
        "a new epoch after the unclean stop"
    );
    assert!(synced.files > 0);
    hub.kill_9().await;
}
