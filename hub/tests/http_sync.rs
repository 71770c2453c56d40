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
    let poll = {
        let url = format!(
            "{}/v1/branches/acme/b1/events?epoch={epoch}&after=4000&wait_ms=20000",
            reader.base
        );
        let (client, token) = (reader.client.clone(), reader.token.clone());
        tokio::spawn(async move {
            let resp = client.get(url).bearer_auth(token).send().await.unwrap();
            (Instant::now(), resp.json::<EventsPage>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let published = Instant::now();
    writer
        .push("acme", "b1", vec![publish("b1", 4_001, note(1))])
        .await;
    let (woke, page) = poll.await.unwrap();
    assert_contiguous(&page.events, 4_001, 4_001);
    eprintln!(
        "long poll woke {:?} after the push was answered",
        woke.saturating_duration_since(published)
    );

    // The poll told the hub where the reader stands: admins see its lag.
    let admin = Api::new(&hub, &hub.token("acme", &["*"], "console", Role::Admin));
    let devices: Devices = json(
        admin
            .get("/v1/branches/acme/b1/devices")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let r = devices
        .devices
        .iter()
        .find(|d| d.device.as_str() == "till-r")
        .unwrap();
    assert_eq!(
        (r.acked_seq, r.lag, r.online),
        (Some(4_000), Some(1), false)
    );
    let w = devices
        .devices
        .iter()
        .find(|d| d.device.as_str() == "till-w")
        .unwrap();
    assert_eq!(w.last_device_seq, 4_001);
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
async fn sales_beyond_stock_are_accepted_and_a_count_loses_no_concurrent_sale() {
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

    // The counter sees seq 2 and starts counting; meanwhile the seller rings up 40 more sales.
    let base_seq = 2;
    let selling = {
        let seller = Api {
            base: seller.base.clone(),
            token: seller.token.clone(),
            client: seller.client.clone(),
        };
        tokio::spawn(async move {
            for i in 0..40 {
                seller
                    .push("acme", "b1", vec![publish("b1", 2 + i, sale_of("MILK", 1))])
                    .await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
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
    selling.await.unwrap();
    // Every sale after base_seq counts against the count, whether before or after it in seq.
    let all = events_after(&counter, counted.epoch, 0).await;
    let last = all.events.last().unwrap();
    assert_eq!(
        last.effect.stock,
        vec![StockLevel::new(sku("MILK"), 100 - 40)]
    );
    let sales_before_count = all
        .events
        .iter()
        .filter(|e| e.seq > base_seq && e.seq < count_seq)
        .count();
    eprintln!("{sales_before_count} sales landed between the count's base and the count");

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
    // till-b changed the price 10 s ago, offline, and sends it now.
    let offline = Publish {
        client_time_ms: now_ms() - 10_000,
        ..upsert("TEA", 1, 1, price(300))
    };
    b.push("acme", "b1", vec![offline]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_wins_compares_client_times_corrected_by_the_device_clock_offset() {
    let (hub, _a, _admin) =
        stale_scene(ConflictPolicy::NewestWins, ConflictPolicy::ServerWins).await;
    // till-c's clock runs 10 minutes slow. Its write happens now, 10 s after till-b's (on the
    // hub's clock): by its raw clock it looks 10 minutes old, corrected it is newer.
    let c = Api::new(&hub, &hub.token("acme", &["b1"], "till-c", Role::Cashier));
    let skew = 600_000;
    let write = Publish {
        client_time_ms: now_ms() - skew,
        ..upsert("TEA", 1, 1, price(320))
    };
    let body = serde_json::json!({ "client_time_ms": now_ms() - skew, "events": [write] });
    let r: PushResponse = json(
        c.post("/v1/branches/acme/b1/events")
            .json(&body)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        accepted(&r.results[0]).seq,
        3,
        "the corrected time is newer by more than 1 s"
    );

    // A write whose corrected time is within the tolerance of the current version loses.
    let d = Api::new(&hub, &hub.token("acme", &["b1"], "till-d", Role::Cashier));
    let tie = Publish {
        client_time_ms: now_ms(),
        ..upsert("TEA", 1, 1, price(330))
    };
    let body = serde_json::json!({ "client_time_ms": now_ms(), "events": [tie] });
    let r: PushResponse = json(
        d.post("/v1/branches/acme/b1/events")
            .json(&body)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        rejected(&r.results[0]).code,
        ErrorCode::Conflict,
        "ties go to the server"
    );
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

/// A replica: SKU → (product, stock level), as a snapshot gives it and effects update it.
type Replica = BTreeMap<String, (Option<ProductRecord>, Option<StockLevel>)>;

async fn full_snapshot(
    api: &Api,
    limit: usize,
    mut between_pages: impl FnMut(),
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
        between_pages();
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let (epoch, at_seq, total) = at.unwrap();
    assert_eq!(replica.len() as u64, total);
    (epoch, at_seq, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_paged_during_publishing_plus_later_events_equals_the_hubs_state() {
    const SKUS: usize = 3_000;
    let hub = TestHub::start().await;
    let setup = Api::new(
        &hub,
        &hub.token("acme", &["b1"], "till-setup", Role::Cashier),
    );
    let mut n = 0;
    let mut batch = Vec::new();
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
        if batch.len() >= 500 {
            setup.push("acme", "b1", std::mem::take(&mut batch)).await;
        }
    }
    setup.push("acme", "b1", batch).await;

    // Another till keeps selling, counting and repricing while the snapshot is paged.
    let busy = Api::new(
        &hub,
        &hub.token("acme", &["b1"], "till-busy", Role::Cashier),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = {
        let stop = stop.clone();
        let busy = Api {
            base: busy.base.clone(),
            token: busy.token.clone(),
            client: busy.client.clone(),
        };
        tokio::spawn(async move {
            let mut ds = 0;
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 7;
                let sku_name = format!("SKU-{:05}", i % SKUS);
                ds += 1;
                let event = match i % 3 {
                    0 => publish("b1", ds, sale_of(&sku_name, 2)),
                    1 => adjust(&sku_name, ds, -1),
                    _ => publish("b1", ds, sale_of(&format!("NEW-{i}"), 1)),
                };
                busy.push("acme", "b1", vec![event]).await;
            }
        })
    };
    let reader = Api::new(&hub, &hub.token("acme", &["b1"], "till-new", Role::Cashier));
    let (epoch, at_seq, mut replica) = full_snapshot(&reader, 400, || {}).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publishing.await.unwrap();

    // Apply every later event's effect, as a client does.
    let later = events_after(&reader, epoch, at_seq).await;
    assert!(
        !later.events.is_empty(),
        "publishing went on while the snapshot was paged"
    );
    for event in &later.events {
        for level in &event.effect.stock {
            replica.entry(level.sku.to_string()).or_default().1 = Some(level.clone());
        }
        if let Some(p) = &event.effect.product {
            replica.entry(p.sku.to_string()).or_default().0 = Some(p.clone());
        }
    }
    let (_, final_seq, hub_state) = full_snapshot(&reader, 10_000, || {}).await;
    assert_eq!(final_seq, later.head);
    assert_eq!(
        replica, hub_state,
        "snapshot + later events = the hub's state"
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
    let problem = |r: reqwest::Response, status: u16, code: ErrorCode| async move {
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Problem = r.json().await.unwrap();
        assert_eq!((p.status, p.code), (status, code), "{}", p.message);
    };
    let c = &cashier.client;
    problem(
        c.get(format!("{}/v1/branches/acme/b1/events", hub.http_url()))
            .send()
            .await
            .unwrap(),
        401,
        ErrorCode::Unauthorized,
    )
    .await;
    problem(
        c.get(format!("{}/v1/branches/acme/b1/events", hub.http_url()))
            .bearer_auth("x.y.z")
            .send()
            .await
            .unwrap(),
        401,
        ErrorCode::Unauthorized,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/acme/b2/events")
            .send()
            .await
            .unwrap(),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/globex/b1/events")
            .send()
            .await
            .unwrap(),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/acme/b1/devices")
            .send()
            .await
            .unwrap(),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/acme/b1/conflicts")
            .send()
            .await
            .unwrap(),
        403,
        ErrorCode::Forbidden,
    )
    .await;
    problem(
        cashier.get("/v1/nowhere").send().await.unwrap(),
        404,
        ErrorCode::NotFound,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/acme/b1/events?after=3")
            .send()
            .await
            .unwrap(),
        422,
        ErrorCode::InvalidField,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/acme/b1/events?after=x")
            .send()
            .await
            .unwrap(),
        422,
        ErrorCode::InvalidField,
    )
    .await;
    problem(
        cashier
            .get("/v1/branches/acme/b1/snapshot?page_token=AAAAAAAAAAE")
            .send()
            .await
            .unwrap(),
        410,
        ErrorCode::SnapshotExpired,
    )
    .await;
    let big = serde_json::json!({ "client_time_ms": 0, "events": [publish("b1", 1, EventBody::Custom(Custom { custom_type: "x".into(), data: serde_json::json!("y".repeat(100_000)) }))] });
    problem(
        cashier
            .post("/v1/branches/acme/b1/events")
            .json(&big)
            .send()
            .await
            .unwrap(),
        413,
        ErrorCode::MessageTooBig,
    )
    .await;
    let many = serde_json::json!({ "client_time_ms": 0, "events": (1..=11).map(|i| publish("b1", i, note(i))).collect::<Vec<_>>() });
    problem(
        cashier
            .post("/v1/branches/acme/b1/events")
            .json(&many)
            .send()
            .await
            .unwrap(),
        413,
        ErrorCode::MessageTooBig,
    )
    .await;
    problem(
        cashier
            .post("/v1/branches/acme/b1/events")
            .body("{")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap(),
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
