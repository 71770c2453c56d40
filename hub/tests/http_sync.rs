//! The HTTP sync API (PROTOCOL.md §11) and branch state (§10): polling catch-up and long poll,
//! batch push results, stock rules, conflict policies, pinned snapshots, and HTTP errors.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use branchline_hub::protocol::http::*;
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::*;

async fn json<T: serde::de::DeserializeOwned>(resp: reqwest::Response, status: u16) -> T {
    assert_eq!(resp.status(), status, "unexpected status");
    resp.json().await.unwrap()
}

fn upsert(sku_name: &str, device_seq: u64, base: u64, fields: ProductFields) -> Publish {
    Publish {
        base_version: Some(base),
        ..publish(
            "b1",
            device_seq,
            EventBody::ProductUpserted(ProductUpserted {
                sku: sku(sku_name),
                fields,
            }),
        )
    }
}

fn price(p: i64) -> ProductFields {
    ProductFields {
        price: Some(p),
        ..Default::default()
    }
}

fn create(name: &str, price: i64) -> ProductFields {
    ProductFields {
        name: Some(name.into()),
        price: Some(price),
        ..Default::default()
    }
}

fn adjust(sku_name: &str, device_seq: u64, delta: i64) -> Publish {
    publish(
        "b1",
        device_seq,
        EventBody::StockAdjusted(StockAdjusted {
            sku: sku(sku_name),
            delta,
            reason: AdjustReason::Receipt,
            note: None,
        }),
    )
}

fn accepted(r: &PushResult) -> &Accepted {
    match r {
        PushResult::Accepted(a) => a,
        PushResult::Rejected(r) => panic!("expected accepted, got {r:?}"),
    }
}

fn rejected(r: &PushResult) -> &Rejected {
    match r {
        PushResult::Rejected(r) => r,
        PushResult::Accepted(a) => panic!("expected rejected, got {a:?}"),
    }
}

async fn events_after(api: &Api, epoch: Epoch, after: u64) -> EventsPage {
    json(
        api.get(&format!(
            "/v1/branches/acme/b1/events?epoch={epoch}&after={after}&limit=5000"
        ))
        .send()
        .await
        .unwrap(),
        200,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_for_a_day_catches_up_exactly_by_polling_then_long_polls() {
    let hub = TestHub::start().await;
    let writer = Api::new(&hub, &hub.token("acme", &["b1"], "till-w", Role::Cashier));
    let day: Vec<Publish> = (1..=4_000)
        .map(|i| publish("b1", i, sale_of(&format!("SKU-{}", i % 50), 1)))
        .collect();
    for chunk in day.chunks(1_000) {
        writer.push("acme", "b1", chunk.to_vec()).await;
    }
    let reader = Api::new(&hub, &hub.token("acme", &["b1"], "till-r", Role::Cashier));
    let first: EventsPage = json(
        reader
            .get("/v1/branches/acme/b1/events?after=0&limit=700")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let mut got = first.events.clone();
    let mut page = first;
    while page.has_more {
        page = json(
            reader
                .get(&format!(
                    "/v1/branches/acme/b1/events?epoch={}&after={}&limit=700",
                    page.epoch, page.next_after
                ))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        got.extend(page.events.clone());
    }
    assert_contiguous(&got, 1, 4_000);
    assert!(
        got.iter().zip(&day).all(|(e, p)| e.event_id == p.event_id),
        "in publish order"
    );

    // At the head, a long poll waits, and wakes with the next event as soon as it is there.
    let epoch = page.epoch;
    let admin = Api::new(&hub, &hub.token("acme", &["*"], "console", Role::Admin));
    let poll = long_poll(&reader, epoch, 4_000);
    // The poll acknowledges its position once it is watching the head: from then on it waits.
    wait_until("the long poll is waiting", || async {
        device(&admin, "till-r").await.and_then(|d| d.acked_seq) == Some(4_000)
    })
    .await;
    let published = Instant::now();
    writer
        .push("acme", "b1", vec![publish("b1", 4_001, note(1))])
        .await;
    let (woke, page) = poll.await.unwrap();
    assert_contiguous(&page.events, 4_001, 4_001);
    let latency = woke.saturating_duration_since(published);
    eprintln!("long poll woke {latency:?} after the push was sent");
    assert!(
        latency < LOST_WAKEUP,
        "a poll waiting 20 s must wake on the event, not time out ({latency:?})"
    );

    // The poll told the hub where the reader stands: admins see its lag.
    let r = device(&admin, "till-r").await.unwrap();
    assert_eq!(
        (r.acked_seq, r.lag, r.online),
        (Some(4_000), Some(1), false)
    );
    let w = device(&admin, "till-w").await.unwrap();
    assert_eq!(w.last_device_seq, 4_001);

    // A commit racing the start of a poll is never missed: each poll returns its event at
    // once, wherever the commit lands relative to the poll's read of the head.
    for n in 0..20u64 {
        let after = 4_001 + n;
        let poll = long_poll(&reader, epoch, after);
        writer
            .push("acme", "b1", vec![publish("b1", after + 1, note(after))])
            .await;
        let started = Instant::now();
        let (woke, page) = poll.await.unwrap();
        assert_contiguous(&page.events, after + 1, after + 1);
        assert!(
            woke.saturating_duration_since(started) < LOST_WAKEUP,
            "round {n}: the poll slept through the commit"
        );
    }
}

/// A bound only a lost wakeup can break: polls wait up to 20 s, wakeups take milliseconds.
const LOST_WAKEUP: Duration = Duration::from_secs(5);

/// A long poll (20 s) from `after`, answering when it returned and its page.
fn long_poll(
    api: &Api,
    epoch: Epoch,
    after: u64,
) -> tokio::task::JoinHandle<(Instant, EventsPage)> {
    let url = format!(
        "{}/v1/branches/acme/b1/events?epoch={epoch}&after={after}&wait_ms=20000",
        api.base
    );
    let (client, token) = (api.client.clone(), api.token.clone());
    tokio::spawn(async move {
        let resp = client.get(url).bearer_auth(token).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let page = resp.json::<EventsPage>().await.unwrap();
        (Instant::now(), page)
    })
}

/// Waits until `check` holds; fails the test after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, || {
        let checked = check();
        async move {
            if checked.await {
                Ok(())
            } else {
                Err("not yet")
            }
        }
    })
    .await;
}

/// What admins see of `name` on branch b1.
async fn device(admin: &Api, name: &str) -> Option<DeviceInfo> {
    let devices: Devices = admin.get_json("/v1/branches/acme/b1/devices").await;
    devices
        .devices
        .into_iter()
        .find(|d| d.device.as_str() == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_push_gets_one_documented_result_per_event() {
    let hub =
        TestHub::start_with(|c| c.conflicts.product_upserted = ConflictPolicy::ServerWins).await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let other = Api::new(&hub, &hub.token("acme", &["b1"], "till-2", Role::Cashier));
    other
        .push(
            "acme",
            "b1",
            vec![
                upsert("TEA", 1, 0, create("Tea", 250)),
                upsert("TEA", 2, 1, price(300)),
            ],
        )
        .await;

    let first = publish("b1", 1, sale_of("TEA", 1));
    let mut unknown_kind = serde_json::to_value(publish("b1", 3, note(0))).unwrap();
    unknown_kind["kind"] = "sale.voided".into();
    let mut missing = serde_json::to_value(publish("b1", 3, note(0))).unwrap();
    missing.as_object_mut().unwrap().remove("device_seq");
    let empty_sale = publish(
        "b1",
        3,
        EventBody::SaleRecorded(SaleRecorded {
            sale_id: "X".into(),
            lines: vec![],
            total: 0,
            tax: 0,
            currency: "EUR".into(),
            payments: vec![],
        }),
    );
    let body = serde_json::json!({
        "client_time_ms": now_ms(),
        "events": [
            first,                                   // new → seq 3
            first,                                   // the same again → duplicate of 3
            publish("b1", 9, note(9)),               // skips ahead → out_of_order, expect 2
            missing,                                 // malformed → invalid_field
            unknown_kind,                            // unknown kind
            empty_sale,                              // breaks its kind's rules, at device_seq 2
            publish("b2", 2, note(2)),               // for another branch
            upsert("TEA", 2, 1, price(999)),         // stale catalog write → conflict
            publish("b1", 2, sale_of("TEA", 1)),     // still number 2: refusals used none
        ]
    });
    let resp = api
        .post("/v1/branches/acme/b1/events")
        .json(&body)
        .send()
        .await
        .unwrap();
    let results: PushResponse = json(resp, 200).await;
    let r = &results.results;
    assert_eq!(r.len(), 9);
    assert_eq!((accepted(&r[0]).seq, accepted(&r[0]).duplicate), (3, false));
    assert_eq!((accepted(&r[1]).seq, accepted(&r[1]).duplicate), (3, true));
    assert_eq!(
        (rejected(&r[2]).code, rejected(&r[2]).expected_device_seq),
        (ErrorCode::OutOfOrder, Some(2))
    );
    assert_eq!(rejected(&r[3]).code, ErrorCode::InvalidField);
    assert_eq!(rejected(&r[4]).code, ErrorCode::UnknownKind);
    assert!(
        rejected(&r[4]).event_id.is_some(),
        "a malformed event is still named when it can be"
    );
    assert_eq!(rejected(&r[5]).code, ErrorCode::InvalidEvent);
    assert_eq!(rejected(&r[6]).code, ErrorCode::InvalidField);
    let conflict = rejected(&r[7]);
    assert_eq!(conflict.code, ErrorCode::Conflict);
    let detail = conflict.conflict.as_ref().unwrap();
    assert_eq!(
        (
            detail.base_version,
            detail.server_version,
            detail.server.as_ref().unwrap().price
        ),
        (1, 2, 300)
    );
    assert_eq!(accepted(&r[8]).seq, 4);

    let page = events_after(&api, results.epoch, 0).await;
    assert_contiguous(&page.events, 1, 4);
    assert_eq!(
        page.events[3].effect.stock,
        vec![StockLevel::new(sku("TEA"), -2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_beyond_stock_are_accepted_and_a_count_loses_no_sale_made_while_counting() {
    let hub = TestHub::start().await;
    let counter = Api::new(&hub, &hub.token("acme", &["b1"], "till-c", Role::Cashier));
    let seller = Api::new(&hub, &hub.token("acme", &["b1"], "till-s", Role::Cashier));
    counter
        .push("acme", "b1", vec![adjust("MILK", 1, 10)])
        .await;
    let sold = seller
        .push("acme", "b1", vec![publish("b1", 1, sale_of("MILK", 15))])
        .await;
    assert_eq!(accepted(&sold.results[0]).seq, 2);
    let status: BranchStatus = json(
        seller.get("/v1/branches/acme/b1").send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(status.oversold_skus, 1);
    let page = events_after(&seller, sold.epoch, 1).await;
    assert_eq!(
        page.events[0].effect.stock,
        vec![StockLevel::new(sku("MILK"), -5)],
        "accepted and flagged oversold"
    );

    // The counter has seen seq 2 and starts counting; meanwhile the seller rings up 5 sales,
    // the count lands, then 7 more sales.
    let base_seq = 2;
    let sale = |device_seq| publish("b1", device_seq, sale_of("MILK", 1));
    seller.push("acme", "b1", (2..=6).map(sale).collect()).await;
    let count = Publish {
        base_seq: Some(base_seq),
        ..publish(
            "b1",
            2,
            EventBody::StockCounted(StockCounted {
                sku: sku("MILK"),
                counted: 100,
            }),
        )
    };
    let counted = counter.push("acme", "b1", vec![count]).await;
    let count_seq = accepted(&counted.results[0]).seq;
    seller
        .push("acme", "b1", (7..=13).map(sale).collect())
        .await;

    let all = events_after(&counter, counted.epoch, 0).await;
    let sales_between = all
        .events
        .iter()
        .filter(|e| e.seq > base_seq && e.seq < count_seq)
        .filter(|e| e.body.kind() == EventKind::SaleRecorded)
        .count();
    assert_eq!(
        sales_between, 5,
        "sales landed between the count's base and the count"
    );
    let count_event = all.events.iter().find(|e| e.seq == count_seq).unwrap();
    assert_eq!(
        count_event.effect.stock,
        vec![StockLevel::new(sku("MILK"), 100 - 5)],
        "the count keeps the sales made while counting"
    );
    assert_eq!(
        all.events.last().unwrap().effect.stock,
        vec![StockLevel::new(sku("MILK"), 100 - 5 - 7)],
        "counted + every movement after the base"
    );

    // A count from beyond the log is refused.
    let stale = Publish {
        base_seq: Some(10_000),
        ..publish(
            "b1",
            3,
            EventBody::StockCounted(StockCounted {
                sku: sku("MILK"),
                counted: 1,
            }),
        )
    };
    assert_eq!(
        rejected(&counter.push("acme", "b1", vec![stale]).await.results[0]).code,
        ErrorCode::StaleBase
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_based_below_the_floor_is_refused_stale_base_and_changes_nothing() {
    let hub = TestHub::start_with(|c| c.retention.max_events = 5).await;
    let till = Api::new(&hub, &hub.token("acme", &["b1"], "till-c", Role::Cashier));
    till.push("acme", "b1", vec![adjust("MILK", 1, 10)]).await;
    let sales: Vec<Publish> = (2..=20)
        .map(|i| publish("b1", i, sale_of("MILK", 1)))
        .collect();
    let pushed = till.push("acme", "b1", sales).await;
    hub.run_retention().await;
    let status: BranchStatus = till.get_json("/v1/branches/acme/b1").await;
    assert_eq!((status.floor, status.head), (15, 20));

    // The sales after seq 3 are partly trimmed: the hub cannot add them up, so it refuses.
    let count = |device_seq, base_seq| Publish {
        base_seq: Some(base_seq),
        ..publish(
            "b1",
            device_seq,
            EventBody::StockCounted(StockCounted {
                sku: sku("MILK"),
                counted: 50,
            }),
        )
    };
    let refused = till.push("acme", "b1", vec![count(21, 3)]).await;
    let refused = rejected(&refused.results[0]);
    assert_eq!(refused.code, ErrorCode::StaleBase, "{}", refused.message);
    let status: BranchStatus = till.get_json("/v1/branches/acme/b1").await;
    assert_eq!(status.head, 20, "nothing was sequenced");

    // From the floor on, the movements are all there.
    let applied = till.push("acme", "b1", vec![count(21, 15)]).await;
    let seq = accepted(&applied.results[0]).seq;
    let page = events_after(&till, pushed.epoch, seq - 1).await;
    assert_eq!(
        page.events[0].effect.stock,
        vec![StockLevel::new(sku("MILK"), 50 - 5)]
    );
}

async fn conflicts(admin: &Api, status: &str) -> Vec<ConflictRecord> {
    let page: ConflictsPage = json(
        admin
            .get(&format!("/v1/branches/acme/b1/conflicts?status={status}"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    page.conflicts
}

/// Two tills: till-a made v1, till-b made v2 (price 300); till-a now writes based on v1.
async fn stale_scene(policy: ConflictPolicy, fallback: ConflictPolicy) -> (TestHub, Api, Api) {
    let hub = TestHub::start_with(|c| {
        c.conflicts.product_upserted = policy;
        c.conflicts.merge_fallback = fallback;
    })
    .await;
    let a = Api::new(&hub, &hub.token("acme", &["b1"], "till-a", Role::Cashier));
    let b = Api::new(&hub, &hub.token("acme", &["b1"], "till-b", Role::Cashier));
    a.push("acme", "b1", vec![upsert("TEA", 1, 0, create("Tea", 250))])
        .await;
    b.push("acme", "b1", vec![upsert("TEA", 1, 1, price(300))])
        .await;
    let admin = Api::new(&hub, &hub.token("acme", &["*"], "console", Role::Admin));
    (hub, a, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wins_and_client_wins_settle_stale_writes_and_record_them() {
    let (_hub, a, admin) =
        stale_scene(ConflictPolicy::ServerWins, ConflictPolicy::ServerWins).await;
    let r = a
        .push(
            "acme",
            "b1",
            vec![upsert(
                "TEA",
                2,
                1,
                ProductFields {
                    name: Some("Green tea".into()),
                    ..Default::default()
                },
            )],
        )
        .await;
    assert_eq!(rejected(&r.results[0]).code, ErrorCode::Conflict);
    let recorded = conflicts(&admin, "all").await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        (
            recorded[0].outcome,
            recorded[0].device.as_str(),
            recorded[0].base_version
        ),
        (ConflictOutcome::ServerWon, "till-a", 1)
    );
    assert_eq!(recorded[0].server.as_ref().unwrap().version, 2);
    // Settled by its policy when met: resolved from the start, nothing for an admin to do.
    assert_eq!(
        (recorded[0].status, recorded[0].resolution),
        (ConflictStatus::Resolved, None)
    );
    let resp = admin
        .post(&format!(
            "/v1/branches/acme/b1/conflicts/{}/resolve",
            recorded[0].id
        ))
        .json(&serde_json::json!({ "resolution": "server" }))
        .send()
        .await
        .unwrap();
    let problem: Problem = json(resp, 409).await;
    assert_eq!(problem.code, ErrorCode::ConflictAlreadyResolved);

    let (_hub, a, admin) =
        stale_scene(ConflictPolicy::ClientWins, ConflictPolicy::ServerWins).await;
    let r = a
        .push("acme", "b1", vec![upsert("TEA", 2, 1, price(275))])
        .await;
    let page = events_after(&a, r.epoch, accepted(&r.results[0]).seq - 1).await;
    let product = page.events[0].effect.product.clone().unwrap();
    assert_eq!((product.price, product.version), (275, 3));
    assert_eq!(
        conflicts(&admin, "resolved").await[0].outcome,
        ConflictOutcome::ClientWon
    );
}

/// Pushes one write from a device whose clock reads `skew_ms` off the hub's; the write
/// happened at `written_ms` on the hub's clock.
async fn push_written_at(api: &Api, write: Publish, skew_ms: i64, written_ms: i64) -> PushResult {
    let write = Publish {
        client_time_ms: written_ms + skew_ms,
        ..write
    };
    let body = serde_json::json!({ "client_time_ms": now_ms() + skew_ms, "events": [write] });
    let r: PushResponse = json(
        api.post("/v1/branches/acme/b1/events")
            .json(&body)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    r.results.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_wins_compares_client_times_corrected_by_the_device_clock_offset() {
    let hub =
        TestHub::start_with(|c| c.conflicts.product_upserted = ConflictPolicy::NewestWins).await;
    let till = |name: &str| Api::new(&hub, &hub.token("acme", &["b1"], name, Role::Cashier));
    let (a, b, c, d) = (
        till("till-a"),
        till("till-b"),
        till("till-c"),
        till("till-d"),
    );
    // Every write happened in the past, so no clock limit on future times comes into play.
    let start = now_ms();
    a.push("acme", "b1", vec![upsert("TEA", 1, 0, create("Tea", 250))])
        .await;
    let v2 = push_written_at(&b, upsert("TEA", 1, 1, price(300)), 0, start - 60_000).await;
    assert_eq!(accepted(&v2).seq, 2);

    // till-c's clock runs 10 minutes slow. Its write, based on v1, happened 30 s after
    // till-b's on the hub's clock: by its raw clock it looks 10 minutes old, corrected it is
    // newer by far more than the tolerance.
    let skew = -600_000;
    let won = push_written_at(&c, upsert("TEA", 1, 1, price(320)), skew, start - 30_000).await;
    let seq = accepted(&won).seq;
    let page = events_after(&c, accepted(&won).epoch, seq - 1).await;
    let v3 = page.events[0].effect.product.clone().unwrap();
    assert_eq!((v3.version, v3.price), (3, 320));
    let corrected = v3.updated_at_ms;
    assert!(
        (corrected - (start - 30_000)).abs() < 1_000,
        "updated_at_ms is the write's time on the hub's clock"
    );

    // Writes based on v1 whose corrected time is within 1 s of v3's, either side, are ties:
    // the server keeps its version.
    // (Refused writes use no device_seq, so each is number 1 again.)
    for delta in [500, -500, 0] {
        let tie =
            push_written_at(&d, upsert("TEA", 1, 1, price(330)), skew, corrected + delta).await;
        let refused = rejected(&tie);
        assert_eq!(
            refused.code,
            ErrorCode::Conflict,
            "{delta} ms from the current version is a tie: the server wins"
        );
        assert_eq!(refused.conflict.as_ref().unwrap().server_version, 3);
    }
    // Clearly newer (by 2 s, still in the past) wins.
    let newer = push_written_at(&d, upsert("TEA", 1, 1, price(340)), skew, corrected + 2_000).await;
    let seq = accepted(&newer).seq;
    let page = events_after(&d, accepted(&newer).epoch, seq - 1).await;
    assert_eq!(page.events[0].effect.product.as_ref().unwrap().price, 340);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_keeps_disjoint_changes_and_manual_holds_until_an_admin_resolves() {
    let (_hub, a, admin) = stale_scene(ConflictPolicy::Merge, ConflictPolicy::ServerWins).await;
    let r = a
        .push(
            "acme",
            "b1",
            vec![upsert(
                "TEA",
                2,
                1,
                ProductFields {
                    barcode: Some("4006381333931".into()),
                    ..Default::default()
                },
            )],
        )
        .await;
    let page = events_after(&a, r.epoch, 2).await;
    let merged = page.events[0].effect.product.clone().unwrap();
    assert_eq!(
        (
            merged.price,
            merged.barcode.as_deref(),
            merged.name.as_str()
        ),
        (300, Some("4006381333931"), "Tea")
    );

    let (hub, a, admin2) = stale_scene(ConflictPolicy::Manual, ConflictPolicy::ServerWins).await;
    let _ = admin;
    let r = a
        .push("acme", "b1", vec![upsert("TEA", 2, 1, price(199))])
        .await;
    let held_seq = accepted(&r.results[0]).seq;
    let page = events_after(&a, r.epoch, held_seq - 1).await;
    let note = page.events[0].effect.conflict.clone().unwrap();
    assert_eq!(note.outcome, ConflictOutcome::Held);
    assert!(
        page.events[0].effect.product.is_none(),
        "the product is unchanged while held"
    );
    let open = conflicts(&admin2, "open").await;
    assert_eq!(
        (open.len(), open[0].id, open[0].seq),
        (1, note.id, Some(held_seq))
    );
    let status: BranchStatus = json(
        admin2.get("/v1/branches/acme/b1").send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(status.open_conflicts, 1);

    let path = format!("/v1/branches/acme/b1/conflicts/{}/resolve", note.id);
    let as_cashier = a
        .post(&path)
        .json(&ResolveRequest {
            resolution: Resolution::Local,
            fields: None,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(as_cashier.status(), 403);
    let no_fields = admin2
        .post(&path)
        .json(&ResolveRequest {
            resolution: Resolution::Merged,
            fields: None,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(no_fields.status(), 422);
    let resolved: ResolveResponse = json(
        admin2
            .post(&path)
            .json(&ResolveRequest {
                resolution: Resolution::Merged,
                fields: Some(price(249)),
            })
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        (resolved.conflict.status, resolved.conflict.resolution),
        (ConflictStatus::Resolved, Some(Resolution::Merged))
    );
    let page = events_after(&a, r.epoch, resolved.seq - 1).await;
    let event = &page.events[0];
    assert_eq!(
        (event.body.kind(), event.device.as_str()),
        (EventKind::ConflictResolved, "hub")
    );
    assert_eq!(
        event.effect.product.as_ref().unwrap().price,
        249,
        "every device sees the resolution in order"
    );
    let again = admin2
        .post(&path)
        .json(&ResolveRequest {
            resolution: Resolution::Server,
            fields: None,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let unknown = admin2
        .post(&format!(
            "/v1/branches/acme/b1/conflicts/{}/resolve",
            uuid::Uuid::now_v7()
        ))
        .json(&ResolveRequest {
            resolution: Resolution::Server,
            fields: None,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(conflicts(&admin2, "open").await.is_empty());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_with_a_manual_fallback_applies_uncontested_fields_and_holds_the_contested_ones() {
    let (hub, a, admin) = stale_scene(ConflictPolicy::Merge, ConflictPolicy::Manual).await;
    // Based on v1: the price is contested (till-b changed it), the category is not.
    let write = ProductFields {
        price: Some(199),
        category: Some("tea".into()),
        ..Default::default()
    };
    let r = a.push("acme", "b1", vec![upsert("TEA", 2, 1, write)]).await;
    let seq = accepted(&r.results[0]).seq;
    let page = events_after(&a, r.epoch, seq - 1).await;
    let effect = &page.events[0].effect;
    let product = effect.product.as_ref().unwrap();
    assert_eq!(
        (product.version, product.price, product.category.as_deref()),
        (3, 300, Some("tea")),
        "the uncontested field is applied at once, the contested one is not"
    );
    let note = effect.conflict.clone().unwrap();
    assert_eq!(
        (note.outcome, note.contested.clone()),
        (ConflictOutcome::Held, vec![ProductField::Price])
    );
    let open = conflicts(&admin, "open").await;
    assert_eq!((open.len(), open[0].id), (1, note.id));

    let resolved: ResolveResponse = json(
        admin
            .post(&format!(
                "/v1/branches/acme/b1/conflicts/{}/resolve",
                note.id
            ))
            .json(&ResolveRequest {
                resolution: Resolution::Local,
                fields: None,
            })
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let page = events_after(&a, r.epoch, resolved.seq - 1).await;
    let product = page.events[0].effect.product.clone().unwrap();
    assert_eq!(
        (product.version, product.price, product.category.as_deref()),
        (4, 199, Some("tea")),
        "`local` applies the held contested field"
    );
    hub.stop().await;
}

/// A replica: SKU → (product, stock level), as a snapshot gives it and effects update it.
type Replica = BTreeMap<String, (Option<ProductRecord>, Option<StockLevel>)>;

/// Pages through a whole snapshot, `busy` publishing after every page.
async fn full_snapshot(
    api: &Api,
    limit: usize,
    mut busy: Option<&mut Busy>,
) -> (Epoch, u64, Replica) {
    let mut replica = Replica::new();
    let mut token: Option<String> = None;
    let mut at = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/branches/acme/b1/snapshot?limit={limit}&page_token={t}"),
            None => format!("/v1/branches/acme/b1/snapshot?limit={limit}"),
        };
        let page: SnapshotPage = json(api.get(&path).send().await.unwrap(), 200).await;
        assert!(page.items.len() <= limit);
        let pinned = *at.get_or_insert((page.epoch, page.at_seq, page.total_items));
        assert_eq!(
            (page.epoch, page.at_seq, page.total_items),
            pinned,
            "every page is pinned to the first one's seq"
        );
        for item in page.items {
            let key = item
                .product
                .as_ref()
                .map(|p| p.sku.to_string())
                .or_else(|| item.stock.as_ref().map(|s| s.sku.to_string()))
                .unwrap();
            replica.insert(key, (item.product, item.stock));
        }
        if let Some(busy) = busy.as_deref_mut() {
            busy.step().await;
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let (epoch, at_seq, total) = at.unwrap();
    assert_eq!(replica.len() as u64, total);
    (epoch, at_seq, replica)
}

/// A till that sells, adjusts, counts and reprices: one batch of each per step. It reprices
/// only the SKUs `reprices` picks from, so two of them never write the same product.
struct Busy {
    api: Api,
    device_seq: u64,
    last_seq: u64,
    step: usize,
    reprices: std::ops::Range<usize>,
    versions: std::collections::HashMap<String, u64>,
}

impl Busy {
    fn new(hub: &TestHub, device: &str, last_seq: u64, reprices: std::ops::Range<usize>) -> Self {
        Self {
            api: Api::new(hub, &hub.token("acme", &["b1"], device, Role::Cashier)),
            device_seq: 0,
            last_seq,
            step: 0,
            reprices,
            versions: Default::default(),
        }
    }

    fn next(&mut self, body: EventBody) -> Publish {
        self.device_seq += 1;
        publish("b1", self.device_seq, body)
    }

    async fn step(&mut self) {
        self.step += 1;
        let i = self.step * 7;
        let stocked = format!("SKU-{:05}", (i * 3) % SKUS);
        let repriced = format!("SKU-{:05}", self.reprices.start + i % self.reprices.len());
        let base_version = *self.versions.entry(repriced.clone()).or_insert(1);
        let events = vec![
            self.next(sale_of(&stocked, 2)),
            self.next(sale_of(&format!("NEW-{}-{i}", self.api.token.len()), 1)),
            Publish {
                // Based on this till's last seen seq: the sale above is after it.
                base_seq: Some(self.last_seq),
                ..self.next(EventBody::StockCounted(StockCounted {
                    sku: sku(&stocked),
                    counted: 40 + i as i64 % 9,
                }))
            },
            self.next(EventBody::StockAdjusted(StockAdjusted {
                sku: sku(&stocked),
                delta: -1,
                reason: AdjustReason::Damage,
                note: None,
            })),
            Publish {
                base_version: Some(base_version),
                ..self.next(EventBody::ProductUpserted(ProductUpserted {
                    sku: sku(&repriced),
                    fields: ProductFields {
                        price: Some(500 + i as i64),
                        category: Some(format!("c{}", i % 5)),
                        ..Default::default()
                    },
                }))
            },
        ];
        let pushed = self.api.push("acme", "b1", events).await;
        self.last_seq = pushed
            .results
            .iter()
            .map(|r| accepted(r).seq)
            .max()
            .unwrap();
        self.versions.insert(repriced, base_version + 1);
    }
}

/// Every event of the branch, from seq 1.
async fn all_events(api: &Api, epoch: Epoch) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let page = events_after(api, epoch, events.len() as u64).await;
        events.extend(page.events);
        if !page.has_more {
            return events;
        }
    }
}

/// What a replay of event bodies alone can know of a SKU: its product without the write
/// time (the device's corrected clock), and its stock on hand.
type Folded = BTreeMap<String, (Option<ProductRecord>, Option<i64>)>;

fn without_times(replica: &Replica) -> Folded {
    replica
        .iter()
        .map(|(k, (p, s))| {
            let p = p.clone().map(|p| ProductRecord {
                updated_at_ms: 0,
                ..p
            });
            (k.clone(), (p, s.as_ref().map(|s| s.on_hand)))
        })
        .collect()
}

/// The SKUs a sale or adjustment moves.
fn moved_skus(body: &EventBody) -> std::collections::BTreeSet<Sku> {
    match body {
        EventBody::SaleRecorded(s) => s.lines.iter().map(|l| l.sku.clone()).collect(),
        EventBody::StockAdjusted(a) => [a.sku.clone()].into(),
        _ => Default::default(),
    }
}

/// `sku`'s movement in `event` (sale lines and adjustments; counts are not movements).
fn movement(event: &Event, sku: &Sku) -> i64 {
    match &event.body {
        EventBody::SaleRecorded(s) => s
            .lines
            .iter()
            .filter(|l| &l.sku == sku)
            .map(|l| -l.qty)
            .sum(),
        EventBody::StockAdjusted(a) if &a.sku == sku => a.delta,
        _ => 0,
    }
}

/// The branch state after `events` (seq 1 on, in order), folded from their bodies by the
/// rules of PROTOCOL.md §9–10, without reading a single effect. The hub runs `server_wins`,
/// so every upsert in the log was based on the product's current version.
fn fold(events: &[Event]) -> Folded {
    let mut state = Folded::new();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1);
        match &event.body {
            EventBody::SaleRecorded(_) | EventBody::StockAdjusted(_) => {
                for sku in moved_skus(&event.body) {
                    let entry = state.entry(sku.to_string()).or_default();
                    entry.1 = Some(entry.1.unwrap_or(0) + movement(event, &sku));
                }
            }
            EventBody::StockCounted(c) => {
                let base = event.base_seq.unwrap() as usize;
                let moved: i64 = events[base..i].iter().map(|e| movement(e, &c.sku)).sum();
                state.entry(c.sku.to_string()).or_default().1 = Some(c.counted + moved);
            }
            EventBody::ProductUpserted(u) => {
                let slot = &mut state.entry(u.sku.to_string()).or_default().0;
                let version = slot.as_ref().map_or(0, |p| p.version) + 1;
                let mut product = slot.clone().unwrap_or_else(|| ProductRecord {
                    sku: u.sku.clone(),
                    version,
                    removed: false,
                    name: String::new(),
                    price: 0,
                    barcode: None,
                    category: None,
                    tax_code: None,
                    unit: Unit::Piece,
                    updated_at_ms: 0,
                    updated_by: event.device.clone(),
                });
                product.apply_fields(&u.fields);
                product.version = version;
                product.updated_by = event.device.clone();
                *slot = Some(product);
            }
            EventBody::Custom(_) => {}
            other => panic!("this test publishes no {:?}", other.kind()),
        }
    }
    state
}

const SKUS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_paged_during_publishing_is_the_replayed_state_at_its_seq() {
    let hub =
        TestHub::start_with(|c| c.conflicts.product_upserted = ConflictPolicy::ServerWins).await;
    let setup = Api::new(
        &hub,
        &hub.token("acme", &["b1"], "till-setup", Role::Cashier),
    );
    let mut n = 0;
    let mut batch = Vec::new();
    let mut last_seq = 0;
    for i in 0..SKUS {
        n += 1;
        batch.push(upsert(
            &format!("SKU-{i:05}"),
            n,
            0,
            create(&format!("Item {i}"), 100 + i as i64),
        ));
        if i % 3 == 0 {
            n += 1;
            batch.push(adjust(&format!("SKU-{i:05}"), n, 10));
        }
        if batch.len() >= 500 || i == SKUS - 1 {
            let pushed = setup.push("acme", "b1", std::mem::take(&mut batch)).await;
            last_seq = pushed
                .results
                .iter()
                .map(|r| accepted(r).seq)
                .max()
                .unwrap();
        }
    }

    // One till publishes after every page; another keeps publishing concurrently.
    let mut between_pages = Busy::new(&hub, "till-pages", last_seq, 0..SKUS / 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let concurrent = {
        let stop = stop.clone();
        let mut busy = Busy::new(&hub, "till-busy", last_seq, SKUS / 2..SKUS);
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                busy.step().await;
            }
            busy.step
        })
    };
    let reader = Api::new(&hub, &hub.token("acme", &["b1"], "till-new", Role::Cashier));
    let (epoch, at_seq, mut replica) = full_snapshot(&reader, 400, Some(&mut between_pages)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let concurrent_steps = concurrent.await.unwrap();
    eprintln!("{concurrent_steps} concurrent batches while paging");

    // The snapshot is exactly the state a replay of the log's first `at_seq` bodies gives.
    let events = all_events(&reader, epoch).await;
    assert!(
        events.len() as u64 > at_seq,
        "publishing went on while the snapshot was paged"
    );
    assert_eq!(
        without_times(&replica),
        fold(&events[..at_seq as usize]),
        "snapshot = replay of events 1..=at_seq"
    );

    // A client applies each later event's effect; it ends at the hub's state, which is also
    // the replay of every event.
    for event in &events[at_seq as usize..] {
        for level in &event.effect.stock {
            replica.entry(level.sku.to_string()).or_default().1 = Some(level.clone());
        }
        if let Some(p) = &event.effect.product {
            replica.entry(p.sku.to_string()).or_default().0 = Some(p.clone());
        }
    }
    let (_, final_seq, hub_state) = full_snapshot(&reader, 10_000, None).await;
    assert_eq!(final_seq, events.len() as u64);
    assert_eq!(
        replica, hub_state,
        "snapshot + later effects = the hub's state"
    );
    assert_eq!(
        without_times(&hub_state),
        fold(&events),
        "the hub's state = replay of every event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_use_the_documented_statuses_and_codes() {
    let hub = TestHub::start_with(|c| {
        c.limits.max_body_bytes = 64 * 1024;
        c.limits.max_batch_events = 10;
    })
    .await;
    let cashier = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let problem = |req: reqwest::RequestBuilder, status: u16, code: ErrorCode| async move {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Problem = r.json().await.unwrap();
        assert_eq!((p.status, p.code), (status, code), "{}", p.message);
    };
    let c = &cashier.client;
    problem(
        c.get(format!("{}/v1/branches/acme/b1/events", hub.http_url())),
        401,
        ErrorCode::Unauthorized,
    )
    .await;
    problem(
        c.get(format!("{}/v1/branches/acme/b1/events", hub.http_url()))
            .bearer_auth("x.y.z"),
        401,
        ErrorCode::Unauthorized,
    )
    .await;
    problem(
        cashier.get("/v1/branches/acme/b2/events"),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier.get("/v1/branches/globex/b1/events"),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier.get("/v1/branches/acme/b1/devices"),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier.get("/v1/branches/acme/b1/conflicts"),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(cashier.get("/v1/nowhere"), 404, ErrorCode::NotFound).await;
    problem(
        cashier.get("/v1/branches/acme/b1/events?after=3"),
        422,
        ErrorCode::InvalidField,
    )
    .await;
    problem(
        cashier.get("/v1/branches/acme/b1/events?after=x"),
        422,
        ErrorCode::InvalidField,
    )
    .await;
    problem(
        cashier.get("/v1/branches/acme/b1/snapshot?page_token=AAAAAAAAAAE"),
        410,
        ErrorCode::SnapshotExpired,
    )
    .await;
    let big = serde_json::json!({ "client_time_ms": 0, "events": [publish("b1", 1, EventBody::Custom(Custom { custom_type: "x".into(), data: serde_json::json!("y".repeat(100_000)) }))] });
    problem(
        cashier.post("/v1/branches/acme/b1/events").json(&big),
        413,
        ErrorCode::MessageTooBig,
    )
    .await;
    let many = serde_json::json!({ "client_time_ms": 0, "events": (1..=11).map(|i| publish("b1", i, note(i))).collect::<Vec<_>>() });
    problem(
        cashier.post("/v1/branches/acme/b1/events").json(&many),
        413,
        ErrorCode::MessageTooBig,
    )
    .await;
    problem(
        cashier
            .post("/v1/branches/acme/b1/events")
            .body("{")
            .header("content-type", "application/json"),
        400,
        ErrorCode::Malformed,
    )
    .await;

    problem(
        cashier
            .post("/v1/branches/acme/b1/events")
            .body("{}")
            .header("content-type", "text/plain"),
        400,
        ErrorCode::Malformed,
    )
    .await;
    for absurd in [i64::MIN, -1, i64::MAX] {
        let body =
            serde_json::json!({ "client_time_ms": absurd, "events": [publish("b1", 1, note(1))] });
        problem(
            cashier.post("/v1/branches/acme/b1/events").json(&body),
            422,
            ErrorCode::InvalidField,
        )
        .await;
    }
    let admin = Api::new(&hub, &hub.token("acme", &["*"], "console", Role::Admin));
    problem(
        admin
            .post(&format!(
                "/v1/branches/acme/b1/conflicts/{}/resolve",
                uuid::Uuid::now_v7()
            ))
            .body(r#"{"resolution":"server"}"#)
            .header("content-type", "text/plain"),
        400,
        ErrorCode::Malformed,
    )
    .await;

    // MessagePack on request.
    let r = cashier
        .get("/v1/time")
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/msgpack");
    let time: TimeResponse = Codec::MsgPack.decode(&r.bytes().await.unwrap()).unwrap();
    assert!(time.server_time_ms > 0);
    let push = PushRequest {
        client_time_ms: now_ms(),
        events: vec![publish("b1", 1, note(1))],
    };
    let r = cashier
        .post("/v1/branches/acme/b1/events")
        .header("content-type", "application/msgpack")
        .header("accept", "application/msgpack")
        .body(Codec::MsgPack.encode(&push).unwrap().to_vec())
        .send()
        .await
        .unwrap();
    let response: PushResponse = Codec::MsgPack.decode(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(accepted(&response.results[0]).seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_over_the_devices_publish_budget_get_429_and_change_nothing() {
    let hub = TestHub::start_with(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 5;
    })
    .await;
    let till = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let five: Vec<Publish> = (1..=5).map(|i| publish("b1", i, note(i))).collect();
    let pushed = till.push("acme", "b1", five).await;
    assert!(pushed.results.iter().all(|r| accepted(r).seq > 0));

    // The budget is spent: three more events need ~3 s of refill, whatever the timing here.
    let three = PushRequest {
        client_time_ms: now_ms(),
        events: (6..=8).map(|i| publish("b1", i, note(i))).collect(),
    };
    let refused = till
        .post("/v1/branches/acme/b1/events")
        .json(&three)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let problem: Problem = refused.json().await.unwrap();
    assert_eq!(problem.code, ErrorCode::RateLimited);
    let status: BranchStatus = till.get_json("/v1/branches/acme/b1").await;
    assert_eq!(status.head, 5, "nothing of a refused batch is sequenced");

    // The budget is per device: another till of the branch still pushes.
    let other = Api::new(&hub, &hub.token("acme", &["b1"], "till-2", Role::Cashier));
    let r = other
        .push("acme", "b1", vec![publish("b1", 1, note(9))])
        .await;
    assert_eq!(accepted(&r.results[0]).seq, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_share_pins_and_a_branch_pins_at_most_eight_while_they_are_paged() {
    let hub = TestHub::start().await;
    let till = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    till.push(
        "acme",
        "b1",
        vec![adjust("A", 1, 1), adjust("B", 2, 1), adjust("C", 3, 1)],
    )
    .await;
    let first_page = || async {
        let resp = till
            .get("/v1/branches/acme/b1/snapshot?limit=1")
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (status, retry_after, resp.bytes().await.unwrap())
    };

    // Nothing published in between: a second snapshot shares the first one's pin.
    let (_, _, a) = first_page().await;
    let (_, _, b) = first_page().await;
    let (a, b): (SnapshotPage, SnapshotPage) = (
        serde_json::from_slice(&a).unwrap(),
        serde_json::from_slice(&b).unwrap(),
    );
    assert_eq!(a.next_page_token, b.next_page_token, "one pin per position");

    // Seven more positions fill the branch's pins; every one is in use (just paged).
    let mut tokens = vec![a.next_page_token.unwrap()];
    for i in 0..7 {
        till.push("acme", "b1", vec![publish("b1", 4 + i, note(i))])
            .await;
        let (status, _, body) = first_page().await;
        assert_eq!(status, 200);
        let page: SnapshotPage = serde_json::from_slice(&body).unwrap();
        tokens.push(page.next_page_token.unwrap());
    }
    till.push("acme", "b1", vec![publish("b1", 11, note(11))])
        .await;
    let (status, retry_after, body) = first_page().await;
    assert_eq!(
        status, 503,
        "a ninth position is refused while eight are paged"
    );
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    let problem: Problem = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem.code, ErrorCode::Overloaded);

    // The snapshots under way all finish.
    for token in tokens {
        let page: SnapshotPage = till
            .get_json(&format!(
                "/v1/branches/acme/b1/snapshot?limit=10&page_token={token}"
            ))
            .await;
        assert_eq!(page.items.len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msgpack_event_outside_the_data_model_is_refused_alone() {
    let hub = TestHub::start().await;
    let till = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    // Three events; the second's data is a binary value, the third's an extension value —
    // neither is in the protocol's data model. The placeholders are swapped in afterwards.
    let marked = |device_seq, mark: &str| {
        publish(
            "b1",
            device_seq,
            EventBody::Custom(Custom {
                custom_type: "test.note".into(),
                data: serde_json::json!(mark),
            }),
        )
    };
    let events = [
        publish("b1", 1, note(1)),
        marked(2, "BIN!"),
        marked(2, "EXT!"),
        publish("b1", 2, note(2)),
    ];
    let body = Codec::MsgPack
        .encode(&PushRequest {
            client_time_ms: now_ms(),
            events: events.to_vec(),
        })
        .unwrap()
        .to_vec();
    let replace = |body: Vec<u8>, from: &[u8], to: &[u8]| {
        let at = body.windows(from.len()).position(|w| w == from).unwrap();
        [&body[..at], to, &body[at + from.len()..]].concat()
    };
    let body = replace(body, b"\xa4BIN!", b"\xc4\x03\x01\x02\x03"); // bin 8, 3 bytes
    let body = replace(body, b"\xa4EXT!", b"\xd4\x01\x00"); // fixext 1, type 1
    let resp = till
        .post("/v1/branches/acme/b1/events")
        .header("content-type", "application/msgpack")
        .header("accept", "application/msgpack")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r: PushResponse = Codec::MsgPack.decode(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(r.results.len(), 4);
    assert_eq!(accepted(&r.results[0]).seq, 1);
    for (i, bad) in r.results[1..3].iter().enumerate() {
        let bad = rejected(bad);
        assert_eq!(bad.code, ErrorCode::InvalidField, "{}", bad.message);
        assert_eq!(
            bad.event_id,
            Some(events[i + 1].event_id),
            "named by its id"
        );
    }
    assert_eq!(accepted(&r.results[3]).seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_frame_limit_is_refused_alone_as_over_a_websocket() {
    let hub = TestHub::start_with(|c| c.limits.max_frame_bytes = 8 << 10).await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let big = EventBody::Custom(Custom {
        custom_type: "x".into(),
        data: serde_json::json!("y".repeat(10_000)),
    });
    let r = api
        .push(
            "acme",
            "b1",
            vec![
                publish("b1", 1, note(1)),
                publish("b1", 2, big),
                publish("b1", 2, note(2)),
            ],
        )
        .await;
    assert_eq!(accepted(&r.results[0]).seq, 1);
    assert_eq!(rejected(&r.results[1]).code, ErrorCode::MessageTooBig);
    assert_eq!(
        accepted(&r.results[2]).seq,
        2,
        "the one behind takes its device_seq"
    );
}
