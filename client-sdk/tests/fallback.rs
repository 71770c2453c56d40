// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_client::protocol::{
    AdjustReason, EventBody, Role, Sku, StockAdjusted, StockCounted,
};
use branchline_client::{Base, ClientEvent, SyncState, SyncStatus, Transport, Update};
use branchline_hub::test_util::TestHub;
use futures::StreamExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_switch_to_polling_and_back_to_live() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    proxy.block_upgrades(true);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let t1 = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let t2 = hub.token(TENANT, &[BRANCH], "till-2", Role::Cashier);
    let till = opts(t1, dirs[0].path())
        .websocket_failures_before_polling(2)
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut notes = till.notifications();
    // Another till talks to the hub directly, over the socket.
    let other = opts(t2, dirs[1].path())
        .connect(&hub.http_url())
        .await
        .unwrap();
    wait_for("polling", Duration::from_secs(10), || async {
        till.status().borrow().state == SyncState::Polling
    })
    .await;
    let mut events = till.events();
    // Pushing over HTTP…
    let mine = till.publish(custom(1)).await.unwrap();
    // …and receiving by long poll.
    let theirs = other.publish(custom(2)).await.unwrap();
    let got: Vec<_> = next_events(&mut events, 2, Duration::from_secs(10), "both events")
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert!(got.contains(&mine.event_id) && got.contains(&theirs.event_id));
    assert_eq!(till.status().borrow().state, SyncState::Polling);
    // The socket works again: the probe takes the client back to live.
    proxy.block_upgrades(false);
    wait_for("live again", Duration::from_secs(10), || async {
        till.status().borrow().state == SyncState::Live
    })
    .await;
    let third = other.publish(custom(3)).await.unwrap();
    let next = next_events(&mut events, 1, Duration::from_secs(10), "the third event").await;
    assert_eq!(
        next[0].event_id, third.event_id,
        "no repeat across the transport change"
    );
    // The notifications told the story in order: polling, then connected.
    let mut story = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(200), notes.next()).await {
        match n {
            ClientEvent::Polling { .. } => story.push("polling"),
            ClientEvent::Connected { .. } => story.push("connected"),
            _ => {}
        }
    }
    let first_polling = story.iter().position(|s| *s == "polling").unwrap();
    assert!(story[first_polling..].contains(&"connected"), "{story:?}");
    till.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_only_clients_push_and_poll() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let till = opts(token, dir.path())
        .transport(Transport::HttpOnly)
        .connect(&hub.http_url())
        .await
        .unwrap();
    let mut events = till.events();
    let e = till.publish(custom(7)).await.unwrap();
    let got = next_events(&mut events, 1, Duration::from_secs(10), "the polled event").await;
    assert_eq!(got[0].event_id, e.event_id);
    assert_eq!(till.status().borrow().state, SyncState::Polling);
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_event_is_quarantined_and_the_ones_behind_it_go_through() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let proxy = Proxy::start(hub.addr()).await;
    proxy.refuse_all(true);
    let till = opts(token, dir.path()).connect(&proxy.url()).await.unwrap();
    let mut notes = till.notifications();
    let sku = Sku::new("TEA").unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(till.publish(custom(n)).await.unwrap().event_id);
    }
    // A count based on a seq the log never had: the hub refuses it `stale_base`, which no
    // retry can fix.
    let poison = till
        .publish_with(
            &branch(),
            EventBody::StockCounted(StockCounted {
                sku: sku.clone(),
                counted: 3,
            }),
            Base {
                base_seq: Some(1_000_000),
                base_version: None,
            },
        )
        .await
        .unwrap();
    for n in 5..10 {
        ids.push(till.publish(custom(n)).await.unwrap().event_id);
    }
    ids.push(
        till.publish(EventBody::StockAdjusted(StockAdjusted {
            sku: sku.clone(),
            delta: 4,
            reason: AdjustReason::Receipt,
            note: None,
        }))
        .await
        .unwrap()
        .event_id,
    );
    proxy.refuse_all(false);
    wait_for("drained", Duration::from_secs(20), || async {
        let s = till.status().borrow().clone();
        s.pending == 0 && s.quarantined == 1
    })
    .await;
    let log = hub_events(&hub, &admin_token(&hub)).await;
    let got: Vec<_> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(got, ids, "everything but the poisoned event, in order");
    let dseqs: Vec<u64> = log.iter().map(|e| e.device_seq).collect();
    assert_eq!(dseqs, (1..=11).collect::<Vec<_>>(), "the gap was closed");
    let q = till.quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].event.event_id, poison.event_id);
    assert_eq!(q[0].code.as_str(), "stale_base");
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), notes.next())
            .await
            .unwrap()
            .unwrap();
        if let ClientEvent::Quarantined { event_id, .. } = n {
            assert_eq!(event_id, poison.event_id);
            break;
        }
    }
    wait_for(
        "the replica to hold the receipt",
        Duration::from_secs(5),
        || async { till.stock(&branch(), &sku).unwrap().map(|s| s.on_hand) == Some(4) },
    )
    .await;
    till.drop_quarantined(poison.event_id).unwrap();
    assert!(till.quarantined().unwrap().is_empty());
    assert_eq!(till.status().borrow().quarantined, 0);
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_behind_the_retention_floor_resyncs_and_still_delivers_its_outbox() {
    let hub = TestHub::start_with(|cfg| cfg.retention.max_events = 10).await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let t1 = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let t2 = hub.token(TENANT, &[BRANCH], "till-2", Role::Cashier);
    let proxy = Proxy::start(hub.addr()).await;
    let till = opts(t1, dirs[0].path())
        .transport(Transport::WebSocketOnly)
        .connect(&proxy.url())
        .await
        .unwrap();
    let other = opts(t2, dirs[1].path())
        .connect(&hub.http_url())
        .await
        .unwrap();
    let sku = Sku::new("COFFEE").unwrap();
    let adjust = |delta| {
        EventBody::StockAdjusted(StockAdjusted {
            sku: sku.clone(),
            delta,
            reason: AdjustReason::Receipt,
            note: None,
        })
    };
    till.publish(adjust(100)).await.unwrap();
    wait_for("till caught up", Duration::from_secs(10), || async {
        till.position(&branch())
            .unwrap()
            .is_some_and(|p| p.seq == 1)
    })
    .await;
    // The till goes offline and records sales; meanwhile the branch moves on far enough
    // that retention trims what the till would need.
    proxy.refuse_all(true);
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(till.publish(adjust(-1)).await.unwrap().event_id);
    }
    for _ in 0..30 {
        other.publish(adjust(-2)).await.unwrap();
    }
    wait_for("other drained", Duration::from_secs(10), || async {
        other.status().borrow().pending == 0
    })
    .await;
    hub.run_retention().await;
    let mut events = till.events();
    proxy.refuse_all(false);
    // Resynced by snapshot first; then every later event, the till's own included.
    let snap = match tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .unwrap()
        .unwrap()
    {
        Update::Resynced { position, .. } => position,
        other => panic!("expected a resync first, got {other}"),
    };
    assert!(snap.seq >= 31, "the snapshot holds what the till missed");
    wait_for("the outbox delivered", Duration::from_secs(15), || async {
        till.status().borrow().pending == 0
            && till
                .position(&branch())
                .unwrap()
                .is_some_and(|p| p.seq == 34)
    })
    .await;
    let mut seqs = Vec::new();
    while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(300), events.next()).await {
        match u {
            Update::Event(e) => seqs.push(e.seq),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        seqs,
        (snap.seq + 1..=34).collect::<Vec<_>>(),
        "gap-free after the snapshot"
    );
    // The replica is exactly the hub's own state, as its HTTP snapshot gives it.
    let (at, products, stock) = hub_snapshot(&hub, &admin_token(&hub), BRANCH).await;
    assert_eq!(at.seq, 34);
    let replica = till.confirmed_state(&branch()).unwrap();
    assert_eq!(replica.position, Some(at));
    assert_eq!(replica.stock.into_values().collect::<Vec<_>>(), stock);
    assert_eq!(replica.products.into_values().collect::<Vec<_>>(), products);
    assert_eq!(stock[0].on_hand, 100 - 3 - 60);
    let log = hub_events(&hub, &admin_token(&hub)).await;
    for id in &mine {
        assert_eq!(log.iter().filter(|e| e.event_id == *id).count(), 1);
    }
    till.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_store_was_lost_renumbers_and_loses_nothing() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let first = tempfile::tempdir().unwrap();
    let till = opts(token.clone(), first.path())
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(till.publish(custom(n)).await.unwrap().event_id);
    }
    wait_for("drained", Duration::from_secs(10), || async {
        till.status().borrow().pending == 0
    })
    .await;
    till.shutdown().await.unwrap();
    // The till is replaced (or its disk wiped): a fresh store records sales offline,
    // numbering them from 1 again.
    proxy.refuse_all(true);
    let second = tempfile::tempdir().unwrap();
    let till = opts(token, second.path())
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut notes = till.notifications();
    for n in 5..8 {
        let e = till.publish(custom(n)).await.unwrap();
        assert_eq!(e.device_seq, n - 4);
        ids.push(e.event_id);
    }
    proxy.refuse_all(false);
    wait_for("drained again", Duration::from_secs(10), || async {
        till.status().borrow().pending == 0 && till.pending().is_empty()
    })
    .await;
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_eq!(log.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
    assert_eq!(
        log.iter().map(|e| e.device_seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let mut renumbered = false;
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(200), notes.next()).await {
        renumbered |= matches!(n, ClientEvent::Renumbered { from: 6, .. });
    }
    assert!(renumbered, "the app was told");
    till.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_connects_but_cannot_be_held_falls_back_to_polling() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    // Every WebSocket gets its welcome, then dies well before it counts as healthy.
    proxy.hold_websockets_for(Some(Duration::from_millis(500)));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let t1 = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let t2 = hub.token(TENANT, &[BRANCH], "till-2", Role::Cashier);
    let till = opts(t1, dirs[0].path())
        .websocket_failures_before_polling(3)
        .probe_interval(Duration::from_secs(600))
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut notes = till.notifications();
    let mut connected = 0;
    let failures = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match notes.next().await.unwrap() {
                ClientEvent::Connected { .. } => connected += 1,
                ClientEvent::Polling { websocket_failures } => break websocket_failures,
                _ => {}
            }
        }
    })
    .await
    .expect("polling after sessions that could not be held");
    assert_eq!(failures, 3);
    assert!(connected >= 2, "the sessions did open: {connected}");
    assert_eq!(till.status().borrow().state, SyncState::Polling);
    // And polling works: pushing and receiving.
    let other = opts(t2, dirs[1].path())
        .connect(&hub.http_url())
        .await
        .unwrap();
    let mut events = till.events();
    let mine = till.publish(custom(1)).await.unwrap();
    let theirs = other.publish(custom(2)).await.unwrap();
    let got: Vec<_> = next_events(&mut events, 2, Duration::from_secs(10), "both events")
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert!(got.contains(&mine.event_id) && got.contains(&theirs.event_id));
    till.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_probe_holds_up_neither_polling_nor_shutdown() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    proxy.block_upgrades(true);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let t1 = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let t2 = hub.token(TENANT, &[BRANCH], "till-2", Role::Cashier);
    // A probe that hangs hangs for a minute: far longer than this test waits for anything.
    let till = opts(t1, dirs[0].path())
        .websocket_failures_before_polling(1)
        .connect_timeout(Duration::from_secs(60))
        .connect(&proxy.url())
        .await
        .unwrap();
    wait_for("polling", Duration::from_secs(10), || async {
        till.status().borrow().state == SyncState::Polling
            && till.position(&branch()).unwrap().is_some()
    })
    .await;
    // Upgrades are now swallowed: the next probe hangs.
    proxy.stall_upgrades(true);
    proxy.block_upgrades(false);
    wait_for("a probe hanging", Duration::from_secs(10), || async {
        proxy.stalled_upgrades() >= 1
    })
    .await;
    let other = opts(t2, dirs[1].path())
        .connect(&hub.http_url())
        .await
        .unwrap();
    let mut events = till.events();
    let mine = till.publish(custom(1)).await.unwrap();
    let theirs = other.publish(custom(2)).await.unwrap();
    let what = "polling goes on while the probe hangs";
    let got: Vec<_> = next_events(&mut events, 2, Duration::from_secs(20), what)
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert!(got.contains(&mine.event_id) && got.contains(&theirs.event_id));
    assert_eq!(till.status().borrow().state, SyncState::Polling);
    tokio::time::timeout(Duration::from_secs(20), till.shutdown())
        .await
        .expect("shutdown does not wait for the probe")
        .unwrap();
    proxy.cut_all();
    other.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_cut_mid_download_resumes_from_its_last_page() {
    let hub = TestHub::start().await;
    let skus = 300;
    seed_stock(&hub, BRANCH, skus).await;
    let proxy = Proxy::start(hub.addr()).await;
    // Each connection carries a few pages at most before it is cut: a snapshot that
    // starts over after a cut never completes.
    proxy.fixed_cuts(6_000);
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let till = opts(token, dir.path())
        .snapshot_page(10)
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut status = till.status();
    let recorder = tokio::spawn(async move {
        let mut seen: Vec<SyncStatus> = vec![status.borrow_and_update().clone()];
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            let done = s.state == SyncState::Live && s.snapshot.is_none();
            seen.push(s);
            if done {
                break;
            }
        }
        seen
    });
    wait_for("the snapshot", Duration::from_secs(60), || async {
        till.position(&branch())
            .unwrap()
            .is_some_and(|p| p.seq == skus as u64)
    })
    .await;
    proxy.fixed_cuts(0);
    assert!(
        proxy.connections() > 3,
        "the download took several connections: {}",
        proxy.connections()
    );
    let (at, _, stock) = hub_snapshot(&hub, &admin_token(&hub), BRANCH).await;
    let replica = till.confirmed_state(&branch()).unwrap();
    assert_eq!(replica.position, Some(at));
    assert_eq!(replica.stock.into_values().collect::<Vec<_>>(), stock);
    let seen = tokio::time::timeout(Duration::from_secs(20), recorder)
        .await
        .unwrap()
        .unwrap();
    let received: Vec<u64> = seen
        .iter()
        .filter_map(|s| s.snapshot.as_ref().map(|p| p.received))
        .collect();
    assert!(!received.is_empty());
    assert!(
        received.windows(2).all(|w| w[0] <= w[1]),
        "progress never went back to an earlier page: {received:?}"
    );
    till.shutdown().await.unwrap();
    hub.stop().await;
}
