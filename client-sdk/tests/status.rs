// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_client::protocol::Role;
use branchline_client::{ClientEvent, SyncState, SyncStatus};
use branchline_hub::test_util::TestHub;
use futures::StreamExt;
use support::*;

/// Collapses runs of one state: the order of states the watch went through.
fn states(seen: &[SyncStatus]) -> Vec<SyncState> {
    let mut out: Vec<SyncState> = Vec::new();
    for s in seen {
        if out.last() != Some(&s.state) {
            out.push(s.state);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_transitions_are_reported_in_order_across_a_hub_restart() {
    let hub = TestHub::start().await;
    // Enough of a catalog that the first snapshot takes many pages.
    let skus = 100;
    seed_stock(&hub, BRANCH, skus).await;
    let proxy = Proxy::start(hub.addr()).await;
    // Nothing connects until the status recorder below listens.
    proxy.refuse_all(true);
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let till = opts(token, dir.path())
        .websocket_failures_before_polling(1000)
        .snapshot_page(5)
        .connect(&proxy.url())
        .await
        .unwrap();
    // Every change of the status watch, in order.
    let mut watch = till.status();
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(Vec::<SyncStatus>::new());
    tokio::spawn(async move {
        seen_tx.send_modify(|v| v.push(watch.borrow_and_update().clone()));
        while watch.changed().await.is_ok() {
            let s = watch.borrow_and_update().clone();
            seen_tx.send_modify(|v| v.push(s));
        }
    });
    let recorded = |from: usize| seen_rx.borrow()[from..].to_vec();
    let mut notes = till.notifications();
    proxy.refuse_all(false);
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
    let connected = story.iter().position(|s| s == "connected").unwrap();
    assert_eq!(
        &story[connected..],
        ["connected", "resynced", "caught_up"],
        "{story:?}"
    );
    assert!(story[..connected].iter().all(|s| s == "disconnected"));
    assert_eq!(till.status().borrow().state, SyncState::Live);
    // The watch went connecting and offline (while the proxy refused), then resyncing
    // with the snapshot's progress, then live. (A watch keeps only the latest value, so
    // a state too short for the recorder to run in between may be missing; the snapshot
    // of 20 pages is not.)
    wait_for("live recorded", Duration::from_secs(5), || async {
        seen_rx.borrow().last().map(|s| s.state) == Some(SyncState::Live)
    })
    .await;
    let first = recorded(0);
    let order = states(&first);
    assert_eq!(
        &order[order.len() - 2..],
        [SyncState::Resyncing, SyncState::Live],
        "{order:?}"
    );
    assert!(
        order[..order.len() - 2]
            .iter()
            .all(|s| matches!(s, SyncState::Connecting | SyncState::Offline)),
        "{order:?}"
    );
    let progress: Vec<(u64, u64)> = first
        .iter()
        .filter(|s| s.state == SyncState::Resyncing)
        .map(|s| {
            let p = s.snapshot.as_ref().expect("resyncing shows its progress");
            assert_eq!(p.branch, branch());
            (p.received, p.total)
        })
        .collect();
    assert!(!progress.is_empty());
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[1].0 <= w[1].1.max(w[1].0)),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .all(|&(r, t)| t == 0 || (t == skus as u64 && r <= t)),
        "{progress:?}"
    );
    assert!(
        first
            .iter()
            .all(|s| s.state == SyncState::Resyncing || s.snapshot.is_none())
    );
    let mark = seen_rx.borrow().len();

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
    // Live → offline (and connecting, maybe several times, while the hub is away) → live:
    // resumed from the stored position, no resync.
    wait_for("live recorded again", Duration::from_secs(5), || async {
        seen_rx.borrow().last().map(|s| s.state) == Some(SyncState::Live)
    })
    .await;
    let order = states(&recorded(mark - 1));
    assert_eq!(order.first(), Some(&SyncState::Live), "{order:?}");
    assert!(order.contains(&SyncState::Offline), "{order:?}");
    assert_eq!(order.last(), Some(&SyncState::Live), "{order:?}");
    assert!(
        order[1..order.len() - 1]
            .iter()
            .all(|s| matches!(s, SyncState::Connecting | SyncState::Offline)),
        "{order:?}"
    );

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_token_changes_never_blocks_and_the_last_token_wins() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    // Same claims, another signature: the hub refuses it as unauthorized.
    let (unsigned, _) = good.rsplit_once('.').unwrap();
    let bad = format!("{unsigned}.{}", "A".repeat(43));
    let till = opts(bad.clone(), dir.path())
        .connect(&hub.http_url())
        .await
        .unwrap();
    wait_for("the bad token refused", Duration::from_secs(10), || async {
        let s = till.status().borrow().clone();
        s.state == SyncState::Offline && s.last_error.is_some_and(|e| e.starts_with("unauthorized"))
    })
    .await;
    // Far more changes than the command queue holds: none blocks or fails.
    for _ in 0..1000 {
        till.set_token(bad.clone()).unwrap();
    }
    till.set_token(good).unwrap();
    wait_for(
        "live with the last token",
        Duration::from_secs(20),
        || async { till.status().borrow().state == SyncState::Live },
    )
    .await;
    till.shutdown().await.unwrap();
    hub.stop().await;
}
