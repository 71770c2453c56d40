//! Sequencing and idempotency (guarantees 1 and 3): gap-free seqs under concurrency, and the
//! `event_id` / `device_seq` rules of PROTOCOL.md §7.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashSet};

use branchline_hub::protocol::http::{EventsPage, PushResult};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use support::*;

async fn all_events(api: &Api, branch: &str) -> EventsPage {
    let mut page: EventsPage = api
        .get(&format!(
            "/v1/branches/acme/{branch}/events?after=0&limit=5000"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    while page.has_more {
        let more: EventsPage = api
            .get_json(&format!(
                "/v1/branches/acme/{branch}/events?epoch={}&after={}&limit=5000",
                page.epoch, page.next_after
            ))
            .await;
        page.events.extend(more.events);
        page.has_more = more.has_more;
        page.next_after = more.next_after;
    }
    page
}

/// One device's run: its name, the ids it published in order, and the seqs it was told.
type DeviceRun = (String, Vec<uuid::Uuid>, Vec<u64>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_many_branches_get_gap_free_ordered_seqs() {
    const BRANCHES: usize = 6;
    const DEVICES: usize = 4;
    let hub = TestHub::start().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut devices: Vec<(String, String, u64)> = (0..BRANCHES)
        .flat_map(|b| (0..DEVICES).map(move |d| (format!("b{b}"), format!("till-{b}-{d}"))))
        .map(|(b, d)| (b, d, rng.random_range(50..250)))
        .collect();
    devices.shuffle(&mut rng);
    let mut tasks = Vec::new();
    for (i, (branch, device, count)) in devices.into_iter().enumerate() {
        let token = hub.token("acme", &[&branch], &device, Role::Cashier);
        let mut ws = connect(
            &hub,
            if i % 2 == 0 {
                Codec::MsgPack
            } else {
                Codec::Json
            },
        )
        .await;
        ws.hello(&token, "acme", &device, vec![]).await;
        let batch: Vec<Publish> = (1..=count)
            .map(|n| publish(&branch, n, sale_of("TEA", 1)))
            .collect();
        let ids: Vec<uuid::Uuid> = batch.iter().map(|p| p.event_id).collect();
        tasks.push(tokio::spawn(async move {
            let answers = ws.publish_all(batch).await;
            let seqs: Vec<u64> = answers.into_iter().map(|a| a.unwrap().seq).collect();
            (branch, device, ids, seqs)
        }));
    }
    let mut by_branch: BTreeMap<String, Vec<DeviceRun>> = BTreeMap::new();
    for task in tasks {
        let (branch, device, ids, seqs) = task.await.unwrap();
        by_branch
            .entry(branch)
            .or_default()
            .push((device, ids, seqs));
    }
    let api = Api::new(&hub, &hub.token("acme", &["*"], "console", Role::Admin));
    for (branch, devices) in by_branch {
        let page = all_events(&api, &branch).await;
        let total: usize = devices.iter().map(|(_, ids, _)| ids.len()).sum();
        assert_contiguous(&page.events, 1, total as u64);
        assert_eq!(page.head, total as u64);
        let logged: HashSet<uuid::Uuid> = page.events.iter().map(|e| e.event_id).collect();
        assert_eq!(logged.len(), total, "every event once");
        for (device, ids, seqs) in devices {
            let mine: Vec<&Event> = page
                .events
                .iter()
                .filter(|e| e.device.as_str() == device)
                .collect();
            assert_eq!(
                mine.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                ids,
                "{device}: in publish order"
            );
            assert_eq!(
                mine.iter().map(|e| e.device_seq).collect::<Vec<_>>(),
                (1..=ids.len() as u64).collect::<Vec<_>>()
            );
            assert_eq!(
                mine.iter().map(|e| e.seq).collect::<Vec<_>>(),
                seqs,
                "{device}: acknowledged seqs are the logged ones"
            );
        }
        // Stock is the ledger of every sale: one TEA per event.
        assert_eq!(
            page.events.last().unwrap().effect.stock,
            vec![StockLevel::new(sku("TEA"), -(total as i64))]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_idempotent_and_device_seq_rules_say_what_to_send_next() {
    let hub = TestHub::start().await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
    let mut ws = connect(&hub, Codec::MsgPack).await;
    let welcome = ws.hello(&token, "acme", "till-1", vec![]).await;
    assert!(welcome.branches.is_empty());

    let first = publish("b1", 1, sale_of("TEA", 2));
    let accepted = ws.publish(first.clone()).await.unwrap();
    assert_eq!((accepted.seq, accepted.duplicate), (1, false));

    // The same event again: the original seq, flagged duplicate, nothing changes.
    let again = ws.publish(first.clone()).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true));
    // Renumbered (as a device that lost its counter would): still the same event.
    let renumbered = ws
        .publish(Publish {
            device_seq: 7,
            ..first.clone()
        })
        .await
        .unwrap();
    assert_eq!((renumbered.seq, renumbered.duplicate), (1, true));
    // The same id with other content is refused.
    let changed = ws
        .publish(Publish {
            body: sale_of("TEA", 3),
            ..first.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(changed.code, ErrorCode::IdempotencyMismatch);

    // A gap: refused with the value to resend from.
    let gap = ws.publish(publish("b1", 5, note(5))).await.unwrap_err();
    assert_eq!(
        (gap.code, gap.expected_device_seq),
        (ErrorCode::OutOfOrder, Some(2))
    );
    // A used number with a new id: refused with the value to continue from.
    let reused = ws.publish(publish("b1", 1, note(1))).await.unwrap_err();
    assert_eq!(
        (reused.code, reused.expected_device_seq),
        (ErrorCode::DeviceSeqReused, Some(2))
    );
    assert_eq!(ws.publish(publish("b1", 2, note(2))).await.unwrap().seq, 2);

    // Over HTTP the same rules give one result per event, in order.
    let api = Api::new(&hub, &token);
    let fresh = publish("b1", 3, note(3));
    let results = api
        .push(
            "acme",
            "b1",
            vec![
                fresh.clone(),
                fresh.clone(),
                publish("b1", 9, note(9)),
                publish("b1", 2, note(2)),
            ],
        )
        .await
        .results;
    let summary: Vec<(bool, u64, Option<ErrorCode>, Option<u64>)> = results
        .iter()
        .map(|r| match r {
            PushResult::Accepted(a) => (a.duplicate, a.seq, None, None),
            PushResult::Rejected(r) => (false, 0, Some(r.code), r.expected_device_seq),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (false, 3, None, None),
            (true, 3, None, None),
            (false, 0, Some(ErrorCode::OutOfOrder), Some(4)),
            (false, 0, Some(ErrorCode::DeviceSeqReused), Some(4)),
        ]
    );
    let page = all_events(&api, "b1").await;
    assert_contiguous(&page.events, 1, 3);
    assert_eq!(
        page.events[0].effect.stock,
        vec![StockLevel::new(sku("TEA"), -2)],
        "the duplicate sold nothing more"
    );

    // The hub tells a device where its counter stands.
    let mut again = connect(&hub, Codec::MsgPack).await;
    let welcome = again
        .hello(
            &token,
            "acme",
            "till-1",
            vec![Subscription {
                branch: name("b1"),
                from: None,
            }],
        )
        .await;
    assert_eq!(welcome.branches[0].last_device_seq, 3);
}
