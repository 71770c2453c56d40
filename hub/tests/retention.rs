//! Retention: trimming by count and by age moves the floor and deletes the events below it
//! from the store, readers below the floor must resync, and dedup outlives trimmed events for
//! its window. The hub's own background pass does it, on the real binary.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use branchline_hub::protocol::http::{BranchStatus, EventsPage, Problem, PushResult};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::process::{BIN, HubProcess, SECRET, cashier_of};
use support::*;
use tokio::process::Command;

const DAY_MS: i64 = 24 * 3_600_000;

async fn push_notes(api: &Api, from: u64, to: u64) -> Vec<Publish> {
    let events: Vec<Publish> = (from..=to).map(|i| publish("b1", i, note(i))).collect();
    for chunk in events.chunks(500) {
        let results = api.push("acme", "b1", chunk.to_vec()).await.results;
        assert!(results.iter().all(|r| matches!(r, PushResult::Accepted(_))));
    }
    events
}

/// Publishes notes `from..=to` one at a time, each after the previous one's answer, so that
/// every event is a writer round (a stored value) of its own and trimming can delete them one
/// by one.
async fn publish_one_by_one(till: &mut Ws, from: u64, to: u64) -> Vec<Publish> {
    let mut sent = Vec::new();
    for i in from..=to {
        let p = publish("b1", i, note(i));
        assert_eq!(till.publish(p.clone()).await.unwrap().seq, i);
        sent.push(p);
    }
    sent
}

async fn page(api: &Api, epoch: Option<Epoch>, after: u64) -> reqwest::Response {
    let epoch = epoch.map(|e| format!("epoch={e}&")).unwrap_or_default();
    api.get(&format!(
        "/v1/branches/acme/b1/events?{epoch}after={after}&limit=5000"
    ))
    .send()
    .await
    .unwrap()
}

fn b1() -> BranchKey {
    BranchKey::new(name("acme"), name("b1"))
}

/// The seqs of the events the store still holds for acme/b1, whatever the floor says.
fn stored_seqs(hub: &TestHub) -> Vec<u64> {
    hub.store()
        .read_events(&b1(), 0, 10_000, 10_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_by_count_deletes_old_events_and_dedup_outlives_them() {
    let hub = TestHub::start_with(|c| c.retention.max_events = 50).await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let mut till = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    let published = publish_one_by_one(&mut till, 1, 120).await;
    assert_eq!(stored_seqs(&hub), (1..=120).collect::<Vec<_>>());
    hub.run_retention().await;
    assert_eq!(
        stored_seqs(&hub),
        (71..=120).collect::<Vec<_>>(),
        "the 70 oldest events are gone from the store, not only hidden by the floor"
    );

    let refused = page(&api, None, 0).await;
    assert_eq!(refused.status(), 409);
    let problem: Problem = refused.json().await.unwrap();
    let resync = problem.resync.unwrap();
    assert_eq!(
        (problem.code, resync.reason, resync.floor, resync.head),
        (ErrorCode::ResyncRequired, ResyncReason::BelowFloor, 70, 120)
    );

    let kept: EventsPage = page(&api, Some(resync.epoch), 70)
        .await
        .json()
        .await
        .unwrap();
    assert_contiguous(&kept.events, 71, 120);
    assert_eq!(kept.floor, 70);

    // A retry of a trimmed event is still recognised within the dedup window, over either
    // interface and after a restart…
    let old = published[9].clone();
    match &api.push("acme", "b1", vec![old.clone()]).await.results[0] {
        PushResult::Accepted(a) => assert_eq!((a.seq, a.duplicate), (10, true)),
        other => panic!("{other:?}"),
    }
    drop(till);
    let hub = hub.restart().await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let mut till = session(&hub, Codec::Json, &["b1"], "till-1", Role::Cashier, vec![]).await;
    let again = till.publish(old.clone()).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (10, true));
    assert_eq!(stored_seqs(&hub).len(), 50, "a duplicate stores nothing");
    // …and after the window, device_seq still refuses to apply it twice.
    hub.run_retention_at(now_ms() + 8 * DAY_MS).await;
    match &api.push("acme", "b1", vec![old]).await.results[0] {
        PushResult::Rejected(r) => assert_eq!(
            (r.code, r.expected_device_seq),
            (ErrorCode::DeviceSeqReused, Some(121))
        ),
        other => panic!("{other:?}"),
    }
    // An event the log still holds is remembered whatever its age: a retry is a duplicate.
    let logged = published[99].clone();
    match &api.push("acme", "b1", vec![logged]).await.results[0] {
        PushResult::Accepted(a) => assert_eq!((a.seq, a.duplicate), (100, true)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_by_age_keeps_only_events_younger_than_the_limit() {
    let max_age = Duration::from_secs(3_600);
    let hub = TestHub::start_with(|c| c.retention.max_age = max_age).await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    push_notes(&api, 1, 10).await;
    let first: EventsPage = page(&api, None, 0).await.json().await.unwrap();
    let cutoff = first.events.last().unwrap().server_time_ms + 1;
    // The next events must be sequenced at a later millisecond than the cutoff.
    while now_ms() <= cutoff {
        tokio::task::yield_now().await;
    }
    push_notes(&api, 11, 15).await;

    // An hour after the cutoff, everything sequenced before it is too old.
    hub.run_retention_at(cutoff + max_age.as_millis() as i64)
        .await;
    let status: BranchStatus = api.get_json("/v1/branches/acme/b1").await;
    assert_eq!((status.floor, status.head), (10, 15));
    // The first push was written as rounds ending at or before seq 10: all of them go.
    assert_eq!(stored_seqs(&hub), (11..=15).collect::<Vec<_>>());
    let kept: EventsPage = page(&api, Some(first.epoch), 10)
        .await
        .json()
        .await
        .unwrap();
    assert_contiguous(&kept.events, 11, 15);
    assert_eq!(page(&api, Some(first.epoch), 9).await.status(), 409);
}

async fn tool(args: &[&str], data: &Path) -> std::process::Output {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(BIN)
            .args(args)
            .arg("--data")
            .arg(data)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_pass_trims_the_store_and_the_log_tools_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let hub = HubProcess::start(
        &data,
        &[
            "--token-secret",
            SECRET,
            "--retention-max-events",
            "50",
            "--retention-interval",
            "50ms",
        ],
    )
    .await;

    let mut till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    till.hello(&cashier_of("b1", "till-1"), "acme", "till-1", vec![])
        .await;
    let published = publish_one_by_one(&mut till, 1, 120).await;

    // No one calls for a pass: the hub's own retention tick moves the floor.
    eventually("the background pass trims to 70", || async {
        let floor = hub.b1_status().await.floor;
        if floor == 70 { Ok(()) } else { Err(floor) }
    })
    .await;
    // A retry of a trimmed event is still a duplicate.
    let again = till.publish(published[0].clone()).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true));
    drop(till);
    let (status, stderr) = hub.terminate().await;
    assert!(status.success(), "{stderr}");

    let table = String::from_utf8(tool(&["log", "inspect"], &data).await.stdout).unwrap();
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("acme/b1"))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        (row[2], row[3], row[4]),
        ("120", "70", "50"),
        "head, floor and the events the store still holds:\n{table}"
    );

    let out = tool(
        &[
            "log", "dump", "--branch", "acme/b1", "--after", "0", "--limit", "3",
        ],
        &data,
    )
    .await;
    let notes = String::from_utf8(out.stderr).unwrap();
    assert!(
        notes.contains("events up to seq 70 were trimmed by retention (floor 70)"),
        "{notes}"
    );
    let seqs: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Event>(l).unwrap().seq)
        .collect();
    assert_eq!(seqs, [71, 72, 73]);
}
