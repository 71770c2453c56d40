// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use branchline_client::protocol::{Event, Role};
use branchline_client::{Client, Update};
use branchline_hub::test_util::TestHub;
use futures::StreamExt;
use support::*;
use uuid::Uuid;

/// Checks the hub's log holds exactly `ids` from `device`, once each, in device order with
/// device_seq 1, 2, 3….
fn assert_exactly_once(log: &[Event], device: &str, ids: &[Uuid]) {
    let mine: Vec<&Event> = log.iter().filter(|e| e.device.as_str() == device).collect();
    let got: Vec<Uuid> = mine.iter().map(|e| e.event_id).collect();
    assert_eq!(got.len(), ids.len(), "{device}: count");
    assert_eq!(got, ids, "{device}: every event once, in publish order");
    for (i, e) in mine.iter().enumerate() {
        assert_eq!(
            e.device_seq,
            i as u64 + 1,
            "{device}: device_seq without gaps"
        );
    }
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "branch seq without gaps");
    }
}

async fn drained(client: &Client) -> bool {
    let s = client.status().borrow().clone();
    s.pending == 0 && client.pending().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_through_random_cuts_are_sequenced_exactly_once() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    // Cut each connection after a random amount of hub output: answers are lost after the
    // hub made the events durable, in the middle of frames, during replay… (The bound is
    // above the size of one replay frame, so a connection can make progress at all.)
    proxy.random_cuts(100_000);
    let client = opts(token, dir.path())
        .publish_window(64)
        .connect(&proxy.url())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..1000 {
        ids.push(client.publish(custom(n)).await.unwrap().event_id);
    }
    wait_for("the outbox to drain", Duration::from_secs(60), || {
        drained(&client)
    })
    .await;
    proxy.random_cuts(0);
    assert!(proxy.connections() > 3, "the proxy cut connections");
    // Some cut fell between the hub's flush and its answer reaching the client: the hub
    // answered a resend of an event it had applied as a duplicate.
    let duplicates = hub_metric(&hub, r#"branchline_publishes_total{result="duplicate"}"#).await;
    assert!(duplicates > 0.0, "no cut between flush and ack");
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_exactly_once(&log, "till-1", &ids);
    client.shutdown().await.unwrap();
    hub.stop().await;
}

/// What the app on the killed runtime handled: (local log offset after it, its seq).
type Handled = Arc<Mutex<Vec<(u64, Option<u64>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_client_mid_drain_loses_and_doubles_nothing() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    proxy.refuse_all(true);
    // The first client and its app live on a runtime of their own, which is killed: every
    // task of it dropped wherever it stands, nothing shut down or flushed on the way.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handled: Handled = Arc::default();
    let client = {
        let first = opts(token.clone(), dir.path()).publish_window(8);
        let (url, app) = (proxy.url(), Arc::clone(&handled));
        doomed
            .spawn(async move {
                let client = first.connect(&url).await.unwrap();
                // The app handles each update and keeps the offset after it, as it would
                // store it with what it did.
                let mut stream = client.events();
                tokio::spawn(async move {
                    while let Some(u) = stream.next().await {
                        let seq = match &u {
                            Update::Event(e) => Some(e.seq),
                            _ => None,
                        };
                        app.lock().unwrap().push((stream.offset(), seq));
                    }
                });
                client
            })
            .await
            .unwrap()
    };
    let mut ids = Vec::new();
    for n in 0..300 {
        ids.push(client.publish(custom(n)).await.unwrap().event_id);
    }
    proxy.refuse_all(false);
    wait_for("mid-drain", Duration::from_secs(20), || async {
        client.status().borrow().pending < 250
            && handled.lock().unwrap().iter().any(|(_, seq)| seq.is_some())
    })
    .await;
    assert!(
        !client.pending().is_empty(),
        "killed before the outbox drained"
    );
    doomed.shutdown_background();
    drop(client);
    let saved = handled.lock().unwrap().clone();
    let (offset, _) = *saved.last().unwrap();
    let mut seqs: Vec<u64> = saved.iter().filter_map(|(_, seq)| *seq).collect();

    let client = connect_when_unlocked(
        opts(token, dir.path()),
        &proxy.url(),
        Duration::from_secs(20),
    )
    .await;
    for n in 300..400 {
        ids.push(client.publish(custom(n)).await.unwrap().event_id);
    }
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        drained(&client)
    })
    .await;
    // The app resumes from the offset it saved: every later event once, in order.
    let mut stream = client.events_from(offset);
    while seqs.len() < ids.len() {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
        {
            Update::Event(e) => seqs.push(e.seq),
            other => panic!("unexpected {other} after offset {offset}"),
        }
    }
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>(), "no gap, no repeat");
    let log = hub_events(&hub, &admin_token(&hub)).await;
    assert_exactly_once(&log, "till-1", &ids);
    client.shutdown().await.unwrap();
    hub.stop().await;
}

async fn collect(mut stream: branchline_client::EventStream, n: usize) -> Vec<(u64, Uuid)> {
    let mut out = Vec::new();
    while out.len() < n {
        match stream.next().await.unwrap() {
            Update::Event(e) => out.push((e.seq, e.event_id)),
            Update::Resynced { .. } => {}
            Update::Lagged { missed } => panic!("lagged by {missed}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_and_an_admin_see_identical_streams_despite_cuts() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr()).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let t1 = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let t2 = hub.token(TENANT, &[BRANCH], "till-2", Role::Cashier);
    let ta = admin_token(&hub);
    let a = opts(t1, dirs[0].path())
        .connect(&proxy.url())
        .await
        .unwrap();
    let b = opts(t2, dirs[1].path())
        .connect(&proxy.url())
        .await
        .unwrap();
    let admin = opts(ta.clone(), dirs[2].path())
        .branches([branch()])
        .connect(&proxy.url())
        .await
        .unwrap();
    // Everyone starts from the empty branch's snapshot.
    for c in [&a, &b, &admin] {
        wait_for("the first snapshot", Duration::from_secs(10), || async {
            c.position(&branch()).unwrap().is_some()
        })
        .await;
    }
    let streams: Vec<_> = [&a, &b, &admin].iter().map(|c| c.events()).collect();
    let total = 400;
    let collectors: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(collect(s, total)))
        .collect();
    let (mut ids_a, mut ids_b) = (Vec::new(), Vec::new());
    for n in 0..total as u64 / 2 {
        ids_a.push(a.publish(custom(n)).await.unwrap().event_id);
        ids_b.push(b.publish(custom(n)).await.unwrap().event_id);
        if n % 40 == 39 {
            proxy.cut_all();
        }
    }
    let mut seen = Vec::new();
    for c in collectors {
        seen.push(
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(seen[0], seen[1], "till-1 and till-2 saw the same stream");
    assert_eq!(seen[0], seen[2], "the admin saw the same stream");
    let seqs: Vec<u64> = seen[0].iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    let ids: HashSet<Uuid> = seen[0].iter().map(|(_, id)| *id).collect();
    assert!(ids_a.iter().chain(&ids_b).all(|id| ids.contains(id)));
    let log = hub_events(&hub, &ta).await;
    assert_exactly_once(&log, "till-1", &ids_a);
    assert_exactly_once(&log, "till-2", &ids_b);
    for c in [a, b, admin] {
        c.shutdown().await.unwrap();
    }
    hub.stop().await;
}
