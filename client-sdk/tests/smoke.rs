// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_client::protocol::{Role, Sku};
use branchline_client::{SyncState, Update};
use branchline_hub::test_util::TestHub;
use futures::StreamExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_recorded_offline_is_sequenced_once_online() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    proxy.refuse_all(true);
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let client = opts(token, dir.path()).connect(&proxy.url()).await.unwrap();
    let mut events = client.events();

    let body = serde_json::from_value(serde_json::json!({
        "kind": "sale.recorded",
        "body": {"sale_id": "T1-1", "lines": [{"sku": "MILK", "qty": 2, "unit_price": 129}],
                 "total": 258, "currency": "EUR"}
    }))
    .unwrap();
    // Refused locally, before taking a device_seq: an event the hub would reject as invalid,
    // and a branch the token does not allow.
    let empty_sale = serde_json::from_value(serde_json::json!({
        "kind": "sale.recorded",
        "body": {"sale_id": "T1-0", "lines": [], "total": 0, "currency": "EUR"}
    }))
    .unwrap();
    assert!(matches!(
        client.publish(empty_sale).await,
        Err(branchline_client::Error::InvalidEvent(_))
    ));
    let elsewhere = branchline_client::protocol::Name::new("b2").unwrap();
    assert!(matches!(
        client.publish_to(&elsewhere, custom(0)).await,
        Err(branchline_client::Error::Config(_))
    ));
    let pending = client.publish(body).await.unwrap();
    assert_eq!(pending.device_seq, 1);
    assert_eq!(client.status().borrow().pending, 1);
    let milk = Sku::new("MILK").unwrap();
    assert_eq!(
        client.stock(&branch(), &milk).unwrap().unwrap().on_hand,
        -2,
        "read-your-writes"
    );

    proxy.refuse_all(false);
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await.unwrap() {
                Update::Event(e) => return e,
                Update::Resynced { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.event_id, pending.event_id);
    assert_eq!(got.seq, 1);
    wait_for("nothing pending", Duration::from_secs(5), || async {
        let s = client.status().borrow().clone();
        s.pending == 0 && s.state == SyncState::Live
    })
    .await;
    let stock = client.confirmed_state(&branch()).unwrap().stock;
    assert_eq!(stock[&milk].on_hand, -2);
    assert!(stock[&milk].oversold);
    assert!(client.pending().is_empty());
    client.shutdown().await.unwrap();
    hub.stop().await;
}
