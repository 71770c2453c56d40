//! Crash safety (guarantee 6): `kill -9` the real hub binary at random moments while clients
//! publish as fast as they are acknowledged; after every restart on the same store, each
//! acknowledged event is there exactly once, seqs are gap-free, the epoch is unchanged and
//! dedup still recognises events from before the crash. Each kill's count of publishes in
//! flight (sent, never answered) shows that the kills landed inside the crash window.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_hub::protocol::*;
use rand::{Rng, SeedableRng};
use support::fleet::{DEVICES, Fleet, check_logs, in_flight_at_each_kill, token};
use support::process::{HubProcess, SECRET};
use support::*;

/// The hub binary on `data` with the process tests' secret.
async fn spawn_hub(data: &std::path::Path) -> HubProcess {
    HubProcess::start(data, &["--token-secret", SECRET]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_event() {
    const TARGET: u64 = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut hub = spawn_hub(&data).await;
    let fleet = Fleet::start(&hub.addr, &DEVICES, TARGET);

    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        fleet.killing();
        hub.kill_9().await;
        hub = spawn_hub(&data).await;
        eprintln!("round {round}: killed and restarted on {}", hub.addr);
        fleet.moved(&hub.addr);
    }
    let logs = fleet.join().await;
    let in_flight = in_flight_at_each_kill(&logs, 4);
    eprintln!("publishes in flight at each kill: {in_flight:?}");
    assert!(
        in_flight.iter().any(|&n| n > 0),
        "no kill landed while publishes were in flight, so the crash window was never hit"
    );
    for log in &logs {
        assert_eq!(log.acked.len() as u64, TARGET);
    }
    let heads = check_logs(&hub, &["b1", "b2"], &logs).await;
    assert_eq!(heads, [2 * TARGET, 2 * TARGET]);
    hub.kill_9().await;
}

/// Publishes `from..=to` to b1 as till-1; the last answer.
async fn publish_through(hub: &HubProcess, from: u64, to: u64) -> Accepted {
    let mut till = hub.till("till-1").await;
    let mut last = None;
    for i in from..=to {
        last = Some(till.publish(publish("b1", i, note(i))).await.unwrap());
    }
    last.unwrap()
}

/// `--fsync interval` acknowledges and delivers before the flush, so a crash can take back
/// events that clients saw, and the hub would hand their seqs to other events. After a
/// `kill -9` the hub gives every branch a new epoch, with nothing of the old one to replay:
/// a device resuming from the old epoch is told to resync. A clean stop keeps the epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_in_interval_mode_devices_resync_instead_of_diverging() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--token-secret", SECRET, "--fsync", "interval=10s"];
    let hub = HubProcess::start(&data, &args).await;
    let first = publish_through(&hub, 1, 20).await;
    let (stopped, stderr) = hub.terminate().await;
    assert!(stopped.success(), "{stderr}");
    let hub = HubProcess::start(&data, &args).await;
    let kept = hub.b1_status().await;
    assert_eq!(
        (kept.epoch, kept.head),
        (first.epoch, 20),
        "a clean stop keeps the epoch"
    );

    let seen = publish_through(&hub, 21, 25).await;
    assert_eq!(seen.seq, 25);
    hub.kill_9().await;
    let hub = HubProcess::start(&data, &args).await;
    let after = hub.b1_status().await;
    assert_ne!(after.epoch, first.epoch, "a new epoch after the crash");
    assert!(after.head <= 25, "head {}", after.head);
    assert_eq!(
        after.floor, after.head,
        "nothing of the old epoch to replay"
    );

    let mut reader = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let welcome = reader
        .hello(
            &token("b1", "till-2", Role::Cashier),
            "acme",
            "till-2",
            vec![Subscription {
                branch: name("b1"),
                from: Some(Position::new(seen.epoch, seen.seq)),
            }],
        )
        .await;
    assert_eq!(
        (welcome.branches[0].mode, welcome.branches[0].epoch),
        (StartMode::ResyncRequired, after.epoch)
    );
    hub.kill_9().await;
}
