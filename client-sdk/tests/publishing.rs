// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

//! Publishing edge cases against a real hub: oversized events, branches the client does
//! not follow, refusals of a whole push, and events the hub can no longer vouch for.

mod support;

use std::time::Duration;

use branchline_client::protocol::{Custom, ErrorCode, EventBody, Name, Role, now_ms};
use branchline_client::{ClientEvent, Error, SyncState, Transport};
use branchline_hub::test_util::TestHub;
use futures::StreamExt;
use support::*;

/// A `custom` event whose payload is `bytes` long.
fn big(bytes: usize) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: "test.big".into(),
        data: serde_json::json!({ "blob": "x".repeat(bytes) }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_size_limit_is_refused_before_it_takes_a_device_seq() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let till = opts(token, dir.path())
        .connect(&hub.http_url())
        .await
        .unwrap();
    match till.publish(big(2 << 20)).await {
        Err(Error::EventTooBig { size, limit }) => {
            assert_eq!(limit, 1 << 20, "the hub's default frame limit");
            assert!(size > 2 << 20);
        }
        other => panic!("expected EventTooBig, got {other:?}"),
    }
    assert!(till.pending().is_empty());
    // Just under the limit goes through, and got the first number.
    let fits = till.publish(big((1 << 20) - 1024)).await.unwrap();
    assert_eq!(fits.device_seq, 1);
    wait_for(
        "the big event sequenced",
        Duration::from_secs(30),
        || async { till.pending().is_empty() },
    )
    .await;
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].event_id, fits.event_id);
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_hubs_frame_limit_is_quarantined_unsent_and_the_rest_go_on() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    proxy.refuse_all(true);
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    // A client configured above the hub's limit (as for a hub that once had a larger
    // one): the event reaches the outbox. Sending it would get the session closed, on
    // every reconnect; the limit the hub's welcome gives keeps it from being sent.
    let till = opts(token, dir.path())
        .transport(Transport::WebSocketOnly)
        .max_event_bytes(8 << 20)
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut notes = till.notifications();
    let before = till.publish(custom(1)).await.unwrap();
    let oversized = till.publish(big(2 << 20)).await.unwrap();
    let after = till.publish(custom(2)).await.unwrap();
    proxy.refuse_all(false);
    wait_for("the outbox drained", Duration::from_secs(30), || async {
        let s = till.status().borrow().clone();
        s.pending == 0 && s.quarantined == 1 && till.pending().is_empty()
    })
    .await;
    let q = till.quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].event.event_id, oversized.event_id);
    assert_eq!(q[0].code, ErrorCode::MessageTooBig);
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_eq!(
        log.iter()
            .map(|e| (e.event_id, e.device_seq))
            .collect::<Vec<_>>(),
        [(before.event_id, 1), (after.event_id, 2)],
        "the ones around it, once each, the gap closed"
    );
    // The session that met it carried on: no disconnect between connecting and the
    // quarantine.
    let mut connected = false;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), notes.next())
            .await
            .unwrap()
            .unwrap();
        match n {
            ClientEvent::Connected { .. } => connected = true,
            ClientEvent::Disconnected { reason, .. } => {
                assert!(!connected, "a session was lost: {reason}");
            }
            ClientEvent::Quarantined { event_id, code, .. } => {
                assert!(connected);
                assert_eq!(
                    (event_id, code),
                    (oversized.event_id, ErrorCode::MessageTooBig)
                );
                break;
            }
            _ => {}
        }
    }
    assert_eq!(till.status().borrow().state, SyncState::Live);
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_branch_the_client_does_not_follow_goes_over_the_websocket() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH, "b2"], "till-1", Role::Cashier);
    let b2 = Name::new("b2").unwrap();
    let till = opts(token, dir.path())
        .branches([branch()])
        .transport(Transport::WebSocketOnly)
        .connect(&hub.http_url())
        .await
        .unwrap();
    wait_for("live", Duration::from_secs(10), || async {
        till.status().borrow().state == SyncState::Live
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(till.publish_to(&b2, custom(n)).await.unwrap().event_id);
    }
    wait_for("the b2 outbox drained", Duration::from_secs(10), || async {
        till.pending().is_empty() && till.status().borrow().pending == 0
    })
    .await;
    let log = hub_events_of(&hub, &admin_token(&hub), "b2").await;
    assert_eq!(log.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
    assert_eq!(
        log.iter().map(|e| e.device_seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(hub_events(&hub, &admin_token(&hub)).await.is_empty());
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_refused_forbidden_is_quarantined_and_can_be_retried() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    proxy.refuse_all(true);
    let dir = tempfile::tempdir().unwrap();
    let both = hub.token(TENANT, &[BRANCH, "b2"], "till-1", Role::Cashier);
    let b1_only = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let b2 = Name::new("b2").unwrap();
    let till = opts(both.clone(), dir.path())
        .branches([branch()])
        .transport(Transport::HttpOnly)
        .connect(&proxy.url())
        .await
        .unwrap();
    // The token is replaced by one without b2 while the event for b2 waits in the outbox
    // (the client still takes it: its first token allowed b2). The hub refuses the whole
    // push with 403 forbidden.
    till.set_token(b1_only).unwrap();
    let refused = till.publish_to(&b2, custom(1)).await.unwrap();
    let fine = till.publish(custom(2)).await.unwrap();
    proxy.refuse_all(false);
    wait_for(
        "the refused event quarantined, the other delivered",
        Duration::from_secs(20),
        || async {
            let s = till.status().borrow().clone();
            s.quarantined == 1 && s.pending == 0 && till.pending().is_empty()
        },
    )
    .await;
    let q = till.quarantined().unwrap();
    assert_eq!(q[0].event.event_id, refused.event_id);
    assert_eq!(q[0].code, ErrorCode::Forbidden);
    // Not waiting for a new token: still polling b1.
    assert_eq!(till.status().borrow().state, SyncState::Polling);
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].event_id, fine.event_id);

    // The permission comes back; the app retries the event.
    till.set_token(both).unwrap();
    let again = till.retry_quarantined(refused.event_id).unwrap();
    assert_eq!(again.event_id, refused.event_id);
    assert!(till.quarantined().unwrap().is_empty());
    assert!(matches!(
        till.retry_quarantined(refused.event_id),
        Err(Error::NotQuarantined(_))
    ));
    wait_for(
        "the retried event delivered",
        Duration::from_secs(20),
        || async { till.pending().is_empty() && till.status().borrow().quarantined == 0 },
    )
    .await;
    let log = hub_events_of(&hub, &admin_token(&hub), "b2").await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].event_id, refused.event_id);
    assert_eq!(
        log[0].device_seq, 1,
        "a refused event uses up no device_seq"
    );
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_event_the_hub_has_forgotten_is_quarantined_after_a_restart_not_applied_twice() {
    let hub = TestHub::start_with(|cfg| cfg.retention.max_events = 5).await;
    let proxy = Proxy::start(hub.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let admin = admin_token(&hub);
    let options = || {
        opts(token.clone(), dir.path())
            .transport(Transport::WebSocketOnly)
            .connect_timeout(Duration::from_secs(10))
    };
    let till = options().connect(&proxy.url()).await.unwrap();
    wait_for("live", Duration::from_secs(10), || async {
        till.status().borrow().state == SyncState::Live
            && till.position(&branch()).unwrap().is_some()
    })
    .await;
    // The hub applies the event, but its answer (and the event frame) never arrive.
    proxy.mute(true);
    let lost = till.publish(custom(1)).await.unwrap();
    wait_for("the hub to hold it", Duration::from_secs(10), || async {
        hub_events(&hub, &admin)
            .await
            .iter()
            .any(|e| e.event_id == lost.event_id)
    })
    .await;
    till.shutdown().await.unwrap();
    drop(till);
    // While the till is off, the branch moves on, the event leaves the hub's log, and the
    // hub forgets its id.
    seed_stock(&hub, BRANCH, 10).await;
    hub.run_retention_at(now_ms() + 8 * 24 * 3600 * 1000).await;
    assert!(
        !hub_events(&hub, &admin)
            .await
            .iter()
            .any(|e| e.event_id == lost.event_id)
    );
    let head = hub_events(&hub, &admin).await.last().unwrap().seq;
    proxy.mute(false);
    let till = connect_when_unlocked(options(), &proxy.url(), Duration::from_secs(10)).await;
    wait_for("the event quarantined", Duration::from_secs(20), || async {
        till.status().borrow().quarantined == 1
    })
    .await;
    let q = till.quarantined().unwrap();
    assert_eq!(q[0].event.event_id, lost.event_id);
    assert_eq!(q[0].code, ErrorCode::DeviceSeqReused);
    assert!(q[0].message.contains("sent before"), "{}", q[0].message);
    // The device goes on numbering after the event the hub did apply.
    let next = till.publish(custom(2)).await.unwrap();
    wait_for(
        "the next event sequenced",
        Duration::from_secs(10),
        || async { till.pending().is_empty() },
    )
    .await;
    let log = hub_events(&hub, &admin).await;
    let mine: Vec<_> = log
        .iter()
        .filter(|e| e.device.as_str() == "till-1")
        .map(|e| (e.event_id, e.device_seq, e.seq))
        .collect();
    assert_eq!(
        mine,
        [(next.event_id, 2, head + 1)],
        "nothing applied twice, nothing in between"
    );
    till.shutdown().await.unwrap();
    hub.stop().await;
}
