// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_client::protocol::Role;
use branchline_client::{ClientEvent, SyncState};
use branchline_hub::test_util::TestHub;
use futures::StreamExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_transitions_are_reported_in_order_across_a_hub_restart() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let till = opts(token, dir.path())
        .websocket_failures_before_polling(1000)
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut notes = till.notifications();
    let mut story = Vec::new();
    let mut next = async |story: &mut Vec<String>| {
        let n = tokio::time::timeout(Duration::from_secs(10), notes.next())
            .await
            .unwrap()
            .unwrap();
        let tag = match &n {
            ClientEvent::Connected { .. } => "connected",
            ClientEvent::Disconnected { .. } => "disconnected",
            ClientEvent::Resynced { .. } => "resynced",
            ClientEvent::CaughtUp { .. } => "caught_up",
            ClientEvent::Accepted { .. } => "accepted",
            _ => "other",
        };
        story.push(tag.to_string());
        tag
    };
    // Fresh device: connect, snapshot (PROTOCOL.md §8), subscribe, caught up.
    while next(&mut story).await != "caught_up" {}
    assert_eq!(story, ["connected", "resynced", "caught_up"]);
    assert_eq!(till.status().borrow().state, SyncState::Live);

    // The hub goes away: disconnected (maybe several times while it is down)…
    let hub = hub.restart().await;
    while next(&mut story).await != "disconnected" {}
    wait_for("offline or connecting", Duration::from_secs(5), || async {
        matches!(
            till.status().borrow().state,
            SyncState::Offline | SyncState::Connecting
        )
    })
    .await;
    // …and back on its new address: connected, resumed from the stored position.
    proxy.retarget(hub.addr());
    story.clear();
    while next(&mut story).await != "caught_up" {}
    let connected = story.iter().position(|s| s == "connected").unwrap();
    assert_eq!(&story[connected..], ["connected", "caught_up"], "{story:?}");
    assert_eq!(till.status().borrow().state, SyncState::Live);

    till.publish(custom(1)).await.unwrap();
    while next(&mut story).await != "accepted" {}
    wait_for("a push time", Duration::from_secs(5), || async {
        let s = till.status().borrow().clone();
        s.pending == 0 && s.last_push_ms.is_some() && s.clock_offset_ms.is_some()
    })
    .await;
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_connection_is_detected_and_resumed() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let till = opts(token, dir.path())
        .idle_timeout(Duration::from_millis(500))
        .connect(&proxy.url())
        .await
        .unwrap();
    wait_for("live", Duration::from_secs(10), || async {
        till.status().borrow().state == SyncState::Live
            && till.position(&branch()).unwrap().is_some()
    })
    .await;
    let mut notes = till.notifications();
    // The network drops the connection without a FIN or RST: only silence tells.
    proxy.stall_all();
    let e = till.publish(custom(1)).await.unwrap();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), notes.next())
            .await
            .unwrap()
            .unwrap();
        if matches!(n, ClientEvent::Disconnected { .. }) {
            break;
        }
    }
    wait_for(
        "the event sequenced on a new connection",
        Duration::from_secs(10),
        || async {
            till.position(&branch())
                .unwrap()
                .is_some_and(|p| p.seq == 1)
                && till.pending().is_empty()
        },
    )
    .await;
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].event_id, e.event_id);
    proxy.cut_all();
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_follow_the_backoff_policy_attempt_by_attempt() {
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start().await;
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    hub.stop().await;
    let till = opts(token, dir.path())
        .transport(branchline_client::Transport::WebSocketOnly)
        .backoff(branchline_client::Backoff::from_fn(|attempt| {
            Duration::from_millis(5 << attempt.min(5))
        }))
        .connect(&format!("http://{addr}"))
        .await
        .unwrap();
    let mut notes = till.notifications();
    let mut delays = Vec::new();
    while delays.len() < 6 {
        let n = tokio::time::timeout(Duration::from_secs(10), notes.next())
            .await
            .unwrap()
            .unwrap();
        if let ClientEvent::Disconnected { retry_in, .. } = n {
            delays.push(retry_in.as_millis());
        }
    }
    // Attempts count up from wherever the listener joined; the curve doubles each time.
    for w in delays.windows(2) {
        assert!(w[1] == w[0] * 2 || w[1] == 160, "{delays:?}");
    }
    assert!(matches!(
        till.status().borrow().state,
        SyncState::Offline | SyncState::Connecting
    ));
    till.shutdown().await.unwrap();
}
