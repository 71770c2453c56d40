//! Bounded memory for slow consumers (guarantee 5) and graceful shutdown.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use branchline_hub::protocol::http::EventsPage;
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::*;

fn live(branch: &str) -> Subscription {
    Subscription {
        branch: name(branch),
        from: None,
    }
}

/// A kilobyte of payload, so that a stalled reader's socket buffers fill up.
fn heavy(n: u64) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: "test.heavy".into(),
        data: serde_json::json!({ "n": n, "pad": "x".repeat(1_000) }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stays_bounded_delays_no_one_and_resumes_gap_free() {
    const TOTAL: u64 = 8_000;
    const BUDGET: usize = 256;
    let hub = TestHub::start_with(|c| {
        c.limits.session_queue_events = BUDGET;
        c.limits.too_slow_after = Duration::from_secs(120);
        c.limits.publish_rate = 1_000_000;
        c.limits.publish_burst = 1_000_000;
    })
    .await;
    let token = hub.token("acme", &["b1"], "till-x", Role::Cashier);
    let mut stalled = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-slow",
        Role::Cashier,
        vec![live("b1")],
    )
    .await;
    let mut fast = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-fast",
        Role::Cashier,
        vec![live("b1")],
    )
    .await;

    let mut publisher = connect(&hub, Codec::MsgPack).await;
    publisher.hello(&token, "acme", "till-x", vec![]).await;
    let publishing = tokio::spawn(
        publisher.publish_all((1..=TOTAL).map(|i| publish("b1", i, heavy(i))).collect()),
    );

    // While the fast follower reads everything and the stalled one reads nothing at all, the
    // events queued for sessions never exceed their budgets: the stalled session is cut over
    // to catch-up from the log instead of growing.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (rooms, done) = (hub.hub().rooms().clone(), done.clone());
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(rooms.queued_events());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            max
        })
    };
    let started = Instant::now();
    let got = fast.events_through("b1", TOTAL).await;
    let fast_took = started.elapsed();
    assert_contiguous(&got, 1, TOTAL);
    assert!(publishing.await.unwrap().iter().all(Result::is_ok));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_queued = watch.await.unwrap();
    assert!(
        max_queued <= 2 * BUDGET,
        "queued events peaked at {max_queued}"
    );

    // The stalled reader now reads: it gets every event once, in order, caught up from the log.
    let resumed = stalled.events_through("b1", TOTAL).await;
    assert_contiguous(&resumed, 1, TOTAL);
    let catchups = metric(&hub, "branchline_catchups_total").await.unwrap();
    assert!(
        catchups >= 1.0,
        "the stalled session was cut over to catch-up"
    );
    eprintln!(
        "fast follower took {fast_took:?} for {TOTAL} events; queued events peaked at {max_queued}"
    );
    drop((fast, stalled));
    hub.stop().await;
}

/// A hub that gives up on a session after `too_slow_after`, with small queues and no
/// publish rate limit, so that one publisher can flood it.
async fn flood_hub(queue: usize, too_slow_after: Duration) -> TestHub {
    TestHub::start_with(|c| {
        c.limits.session_queue_events = queue;
        c.limits.too_slow_after = too_slow_after;
        c.limits.publish_rate = 1_000_000;
        c.limits.publish_burst = 1_000_000;
    })
    .await
}

/// A cashier session of branch b1.
async fn till(hub: &TestHub, device: &str, subscriptions: Vec<Subscription>) -> Ws {
    session(
        hub,
        Codec::MsgPack,
        &["b1"],
        device,
        Role::Cashier,
        subscriptions,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_catch_up_is_closed_as_too_slow() {
    let hub = flood_hub(32, Duration::from_millis(200)).await;
    let mut stalled = till(&hub, "till-slow", vec![live("b1")]).await;
    let publisher = till(&hub, "till-x", vec![]).await;
    let answers = publisher
        .publish_all((1..=20_000).map(|i| publish("b1", i, heavy(i))).collect())
        .await;
    assert!(answers.iter().all(Result::is_ok));
    // The hub gave up on it as too slow, whether it found out in catch-up or because its
    // socket accepted nothing; it says so with 4008 where the client can still read that.
    wait_for_metric(&hub, "branchline_too_slow_closes_total", |v| v >= 1.0).await;
    let (error, code) = stalled.closed().await;
    if let Some(code) = code {
        assert_eq!(
            (error.map(|e| e.code), code),
            (Some(ErrorCode::TooSlow), 4008)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_closed_and_holds_up_no_one() {
    let hub = flood_hub(4_096, Duration::from_secs(3)).await;
    // This client never reads again after its welcome: once the hub's writes to it fill the
    // socket, they stall. The hub must neither wait for it forever nor keep its slot.
    let frozen = till(&hub, "till-frozen", vec![live("b1")]).await;
    let mut fast = till(&hub, "till-fast", vec![live("b1")]).await;
    let publisher = till(&hub, "till-x", vec![]).await;
    const TOTAL: u64 = 20_000;
    let publishing = tokio::spawn(
        publisher.publish_all((1..=TOTAL).map(|i| publish("b1", i, heavy(i))).collect()),
    );
    assert_contiguous(&fast.events_through("b1", TOTAL).await, 1, TOTAL);
    assert!(publishing.await.unwrap().iter().all(Result::is_ok));
    wait_for_metric(&hub, "branchline_too_slow_closes_total", |v| v >= 1.0).await;
    wait_for_metric(&hub, "branchline_sessions", |v| v <= 2.0).await;
    drop((fast, frozen));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_sessions_and_loses_no_acknowledged_event() {
    let hub = TestHub::start().await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
    let mut till = connect(&hub, Codec::MsgPack).await;
    till.hello(&token, "acme", "till-1", vec![live("b1")]).await;
    let mut sent = Vec::new();
    for i in 1..=2_000 {
        let p = publish("b1", i, note(i));
        sent.push(p.event_id);
        till.send(&ClientFrame::Publish(p)).await;
    }
    let reading = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut refused = 0;
        loop {
            match till.next().await {
                Incoming::Frame(ServerFrame::Accepted(a)) => accepted.push(a),
                Incoming::Frame(ServerFrame::Rejected(r)) => {
                    assert_eq!(r.code, ErrorCode::ShuttingDown);
                    refused += 1;
                }
                Incoming::Frame(ServerFrame::Error(e)) => {
                    assert_eq!((e.code, e.fatal), (ErrorCode::ShuttingDown, true));
                }
                Incoming::Frame(_) => {}
                Incoming::Closed(frame) => {
                    return (accepted, refused, frame.map(|f| u16::from(f.code)));
                }
            }
        }
    });
    // Stop while publishes are in flight; start again on the same store.
    let hub = hub.restart().await;
    let (accepted, refused, code) = reading.await.unwrap();
    assert_eq!(
        code,
        Some(1001),
        "sessions are closed with 1001 (shutting down)"
    );
    assert!(!accepted.is_empty());
    eprintln!(
        "{} accepted and {refused} refused before the shutdown",
        accepted.len()
    );

    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let page: EventsPage = api
        .get_json("/v1/branches/acme/b1/events?after=0&limit=5000")
        .await;
    for a in &accepted {
        let event = page
            .events
            .iter()
            .find(|e| e.event_id == a.event_id)
            .expect("every acknowledged event survives");
        assert_eq!(event.seq, a.seq);
    }
    assert_contiguous(&page.events, 1, page.head);
    assert_eq!(
        page.head as usize,
        accepted.len(),
        "nothing unacknowledged was applied either"
    );
}

/// A commit can carry more events than a session's queue budget. The session must still be
/// told to catch up at once, not when some later frame or heartbeat happens to wake it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_queue_budget_is_delivered_without_waiting() {
    let hub = TestHub::start_with(|c| {
        c.limits.session_queue_events = 8;
        c.limits.heartbeat = Duration::from_secs(3_600);
    })
    .await;
    let mut follower = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-f",
        Role::Cashier,
        vec![live("b1")],
    )
    .await;
    let publisher = connect(&hub, Codec::MsgPack).await;
    let mut publisher = publisher;
    publisher
        .hello(
            &hub.token("acme", &["b1"], "till-p", Role::Cashier),
            "acme",
            "till-p",
            vec![],
        )
        .await;
    let answers = publisher
        .publish_all((1..=500).map(|i| publish("b1", i, note(i))).collect())
        .await;
    assert!(answers.iter().all(Result::is_ok));
    // `events_through` fails the test if nothing arrives for 15 s; the heartbeat is an hour.
    assert_contiguous(&follower.events_through("b1", 500).await, 1, 500);
}
