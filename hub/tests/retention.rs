//! Retention: trimming by count and by age moves the floor, readers below it must resync, and
//! dedup outlives trimmed events for its window.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use branchline_hub::protocol::http::{EventsPage, Problem, PushResult};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::*;

const DAY_MS: i64 = 24 * 3_600_000;

async fn push_notes(api: &Api, from: u64, to: u64) -> Vec<Publish> {
    let events: Vec<Publish> = (from..=to).map(|i| publish("b1", i, note(i))).collect();
    for chunk in events.chunks(500) {
        let results = api.push("acme", "b1", chunk.to_vec()).await.results;
        assert!(results.iter().all(|r| matches!(r, PushResult::Accepted(_))));
    }
    events
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_by_count_moves_the_floor_and_dedup_outlives_the_events() {
    let hub = TestHub::start_with(|c| c.retention.max_events = 50).await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let published = push_notes(&api, 1, 120).await;
    hub.run_retention().await;

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

    // A retry of a trimmed event is still recognised within the dedup window…
    let old = published[9].clone();
    match &api.push("acme", "b1", vec![old.clone()]).await.results[0] {
        PushResult::Accepted(a) => assert_eq!((a.seq, a.duplicate), (10, true)),
        other => panic!("{other:?}"),
    }
    // …and after the window, device_seq still refuses to apply it twice.
    hub.run_retention_at(now_ms() + 8 * DAY_MS).await;
    match &api.push("acme", "b1", vec![old]).await.results[0] {
        PushResult::Rejected(r) => assert_eq!(
            (r.code, r.expected_device_seq),
            (ErrorCode::DeviceSeqReused, Some(121))
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_by_age_keeps_only_events_younger_than_the_limit() {
    let max_age = std::time::Duration::from_secs(3_600);
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
    let status: http::BranchStatus = api
        .get("/v1/branches/acme/b1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((status.floor, status.head), (10, 15));
    let kept: EventsPage = page(&api, Some(first.epoch), 10)
        .await
        .json()
        .await
        .unwrap();
    assert_contiguous(&kept.events, 11, 15);
    assert_eq!(page(&api, Some(first.epoch), 9).await.status(), 409);
}
