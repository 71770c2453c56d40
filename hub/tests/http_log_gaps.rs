//! An events read whose events vanish between the floor check and the read (retention
//! trimming at that moment) answers `resync_required`, never a page that sends the client back
//! to the same position forever (PROTOCOL.md §11).

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};

use branchline_hub::engine::sled::{EventLog, SledLog, StoreError};
use branchline_hub::protocol::http::{EventsPage, Problem};
use branchline_hub::protocol::*;
use branchline_hub::test_util::{StoreHooks, TestHub};
use support::*;

/// Trims the log to the floor set here inside the next events read: the hub has checked the
/// floor, then the events are gone.
#[derive(Clone, Default)]
struct TrimsDuringRead {
    floor: Arc<Mutex<Option<u64>>>,
}

impl StoreHooks for TrimsDuringRead {
    fn before_read(&self, store: &SledLog, branch: &BranchKey) -> Result<(), StoreError> {
        let trim = self.floor.lock().unwrap().take();
        if let Some(floor) = trim {
            store.trim(branch, floor)?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_trimmed_during_a_read_answer_resync_required() {
    let trims = TrimsDuringRead::default();
    let hub = TestHub::start_hooked(trims.clone()).await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let pushed = api
        .push(
            "acme",
            "b1",
            (1..=10).map(|i| publish("b1", i, note(i))).collect(),
        )
        .await;
    let read = |after: u64| {
        api.get(&format!(
            "/v1/branches/acme/b1/events?epoch={}&after={after}",
            pushed.epoch
        ))
        .send()
    };

    // Every event after the position vanishes: an empty page with `has_more` would send the
    // client back to the same position forever.
    *trims.floor.lock().unwrap() = Some(10);
    let resp = read(3).await.unwrap();
    assert_eq!(resp.status(), 409);
    let problem: Problem = resp.json().await.unwrap();
    let resync = problem.resync.unwrap();
    assert_eq!(
        (problem.code, resync.reason, resync.head),
        (ErrorCode::ResyncRequired, ResyncReason::BelowFloor, 10)
    );

    // At the head, an empty page is the plain answer.
    let page: EventsPage = read(10).await.unwrap().json().await.unwrap();
    assert!(page.events.is_empty() && !page.has_more);

    hub.stop().await;
}
