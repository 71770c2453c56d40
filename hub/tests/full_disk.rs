//! A full disk, end to end, with the real hub binary on a disk of limited size (the power-cut
//! FUSE filesystem with a capacity: `statfs` and `ENOSPC` as a real disk gives them).
//!
//! - Under the free-space floor, new writes are refused (`storage_unavailable`) and resume by
//!   themselves once there is room; reads, snapshots and duplicates go on.
//! - With the floor off, a write that meets `ENOSPC` acknowledges nothing and stops writes
//!   until a restart; every committed event stays readable, the newest page included; a
//!   SIGTERM ends the process within the shutdown grace, with an exit status that says the
//!   store failed; a start while the disk is still full
//!   fails with a clear message and leaves nothing that blocks the next start; once there is
//!   room, the store opens with every acknowledged event.
//! - The metrics count what was answered: `accepted` only what was acknowledged, rejections
//!   by code.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use branchline_hub::protocol::http::SnapshotPage;
use branchline_hub::protocol::*;
use branchline_powercut::PowerCutFs;
use support::process::{HubProcess, SECRET, admin_of_all, cashier_of};
use support::*;

/// The hub's flags: the free-space floor `floor`, a shutdown grace of 3 s.
fn args(floor: &str) -> [&str; 6] {
    [
        "--token-secret",
        SECRET,
        "--min-free-space",
        floor,
        "--shutdown-grace",
        "3s",
    ]
}

async fn spawn_hub(data: &Path, floor: &str) -> HubProcess {
    HubProcess::start(data, &args(floor)).await
}

async fn get(hub: &HubProcess, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}{path}", hub.http_url()))
        .bearer_auth(admin_of_all("console"))
        .send()
        .await
        .unwrap()
}

/// A metric of the hub process, 0 if it is not there yet.
async fn metric(hub: &HubProcess, line_start: &str) -> f64 {
    let text = get(hub, "/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `/readyz` answers `status`; returns its body.
async fn readyz(hub: &HubProcess, status: u16) -> String {
    eventually(&format!("/readyz answers {status}"), || async {
        let response = get(hub, "/readyz").await;
        let (got, body) = (response.status().as_u16(), response.text().await.unwrap());
        if got == status {
            Ok(body)
        } else {
            Err((got, body))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_free_space_floor_writes_wait_and_reads_go_on() {
    let mnt = tempfile::tempdir().unwrap();
    let disk = PowerCutFs::mount(mnt.path()).unwrap();
    let data = disk.path().join("data");
    let hub = spawn_hub(&data, "8MiB").await;
    let mut till = hub.till("till-1").await;
    let first = publish("b1", 1, note(1));
    till.publish(first.clone()).await.unwrap();
    for i in 2..=3 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }
    // The disk fills up (another program, say): 4 MiB left, under the 8 MiB floor. The next
    // commit notices; the one after is refused.
    let used = (1u64 << 40) - disk.free_bytes();
    disk.set_capacity(Some(used + (4 << 20)));
    let fourth = till.publish(publish("b1", 4, note(4))).await.unwrap();
    assert_eq!(fourth.seq, 4, "sequenced before the floor was seen");
    let refused = till.publish(publish("b1", 5, note(5))).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::StorageUnavailable);
    assert!(refused.message.contains("--min-free-space"), "{refused:?}");
    // A retry of an accepted event is still answered: it writes nothing.
    let again = till.publish(first).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true));

    let why = readyz(&hub, 503).await;
    assert!(why.contains("under the floor"), "{why}");
    let events = hub.events("b1", 2).await;
    assert_contiguous(&events, 1, 4);
    let snapshot = get(&hub, "/v1/branches/acme/b1/snapshot").await;
    assert_eq!(snapshot.status(), 200, "snapshots go on");
    let snapshot: SnapshotPage = snapshot.json().await.unwrap();
    assert_eq!(snapshot.at_seq, 4);

    // Room again: writes resume by themselves, the refused event goes in at the next seq.
    disk.set_capacity(None);
    readyz(&hub, 200).await;
    let fifth = till.publish(publish("b1", 5, note(5))).await.unwrap();
    assert_eq!((fifth.seq, fifth.duplicate), (5, false));

    let accepted = metric(&hub, "branchline_publishes_total{result=\"accepted\"} ").await;
    let rejected = metric(
        &hub,
        "branchline_publishes_total{result=\"rejected\",code=\"storage_unavailable\"} ",
    )
    .await;
    assert_eq!((accepted, rejected), (5.0, 1.0));
    let (status, stderr) = hub.terminate().await;
    assert!(status.success(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_stops_in_time_and_the_store_opens_again() {
    let mnt = tempfile::tempdir().unwrap();
    let disk = PowerCutFs::mount(mnt.path()).unwrap();
    let data = disk.path().join("data");
    // The floor off: the hub meets the full disk itself.
    let hub = spawn_hub(&data, "0").await;
    let big = |n: u64| {
        EventBody::Custom(Custom {
            custom_type: "test.big".into(),
            data: serde_json::json!({ "n": n, "pad": "x".repeat(200 * 1024) }),
        })
    };
    let mut till = hub.till("till-1").await;
    for i in 1..=3 {
        till.publish(publish("b1", i, big(i))).await.unwrap();
    }
    let used = (1u64 << 40) - disk.free_bytes();
    disk.set_capacity(Some(used + 64 * 1024));
    let mut refused = 0;
    for i in 4..=6 {
        let rejection = till.publish(publish("b1", i, big(i))).await.unwrap_err();
        assert_eq!(
            rejection.code,
            ErrorCode::StorageUnavailable,
            "{rejection:?}"
        );
        refused += 1;
    }
    let why = readyz(&hub, 503).await;
    assert!(why.contains("restart"), "{why}");
    // Every committed event reads, the newest page included.
    let events = hub.events("b1", 2).await;
    assert_contiguous(&events, 1, 3);
    let rejected = metric(
        &hub,
        "branchline_publishes_total{result=\"rejected\",code=\"storage_unavailable\"} ",
    )
    .await;
    assert_eq!(rejected, f64::from(refused));
    assert_eq!(
        metric(&hub, "branchline_publishes_total{result=\"accepted\"} ").await,
        3.0
    );
    drop(till);

    // SIGTERM: the process ends within the grace (3 s) whatever the disk does.
    let asked = Instant::now();
    let (status, stderr) = hub.terminate().await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "stopped after {took:?}: {stderr}"
    );
    assert!(
        !status.success() && stderr.contains("check the disk"),
        "a run whose store failed does not end as if all was well: {status} {stderr}"
    );

    // A start while the disk is still full fails, saying where and why.
    let Err((status, output)) = HubProcess::try_start(&data, &args("0"), &[]).await else {
        panic!("the hub started on a full disk");
    };
    assert!(!status.success());
    assert!(
        output.contains(&format!("cannot open the store in {}", data.display()))
            && output.contains("the disk is full"),
        "{output}"
    );

    // Room again: the store opens with everything acknowledged, and the device goes on.
    disk.set_capacity(None);
    let hub = spawn_hub(&data, "0").await;
    assert_contiguous(&hub.events("b1", 2).await, 1, 3);
    let mut till = hub.till("till-1").await;
    let fourth = till.publish(publish("b1", 4, big(4))).await.unwrap();
    assert_eq!(fourth.seq, 4);
    let mut reader = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    reader
        .hello(
            &cashier_of("b1", "till-2"),
            "acme",
            "till-2",
            vec![Subscription {
                branch: name("b1"),
                from: Some(Position::new(events[0].epoch, 0)),
            }],
        )
        .await;
    assert_contiguous(&reader.events_through("b1", 4).await, 1, 4);
    let (status, stderr) = hub.terminate().await;
    assert!(status.success(), "{stderr}");
}
