//! A large branch pages through its snapshot in bounded pages: no response holds more than
//! one page, and the pages together are every SKU once, in order (PROTOCOL.md §11).
//!
//! 40,000 SKUs keeps the test near 10 s in a debug build, nearly all of it publishing them;
//! paging is seek + page in the pinned persistent maps, so its cost per page does not grow with
//! the branch (100,000 SKUs in pages of 10,000 took 1.1 s to page in debug, 20 s to set up).

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Instant;

use branchline_hub::protocol::http::{PushResult, SnapshotPage};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::*;

const SKUS: u64 = 40_000;
const PAGE: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_branch_snapshot_pages_in_bounded_pages() {
    let started = Instant::now();
    let hub = TestHub::start_with(|c| {
        // Setting up is one till pushing every SKU as fast as it can.
        c.limits.publish_rate = 1_000_000;
        c.limits.publish_burst = 1_000_000;
    })
    .await;
    let till = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let sku_of = |i: u64| format!("SKU-{i:06}");
    for chunk in (1..=SKUS).collect::<Vec<_>>().chunks(1_000) {
        let events = chunk
            .iter()
            .map(|&i| {
                let body = if i % 2 == 0 {
                    EventBody::ProductUpserted(ProductUpserted {
                        sku: sku(&sku_of(i)),
                        fields: ProductFields {
                            name: Some(format!("Item {i}")),
                            price: Some(100 + i as i64),
                            ..Default::default()
                        },
                    })
                } else {
                    EventBody::StockAdjusted(StockAdjusted {
                        sku: sku(&sku_of(i)),
                        delta: 1 + i as i64 % 7,
                        reason: AdjustReason::Receipt,
                        note: None,
                    })
                };
                Publish {
                    base_version: Some(0),
                    ..publish("b1", i, body)
                }
            })
            .collect();
        let pushed = till.push("acme", "b1", events).await;
        assert!(
            pushed
                .results
                .iter()
                .all(|r| matches!(r, PushResult::Accepted(_)))
        );
    }
    let set_up = started.elapsed();

    let mut token: Option<String> = None;
    let mut seen = 0u64;
    let mut last: Option<String> = None;
    let mut pages = 0;
    let mut largest_body = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/branches/acme/b1/snapshot?limit={PAGE}&page_token={t}"),
            None => format!("/v1/branches/acme/b1/snapshot?limit={PAGE}"),
        };
        let resp = till.get(&path).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await.unwrap();
        largest_body = largest_body.max(body.len());
        let page: SnapshotPage = serde_json::from_slice(&body).unwrap();
        assert_eq!((page.at_seq, page.total_items), (SKUS, SKUS));
        assert!(page.items.len() <= PAGE, "one page per response");
        for item in &page.items {
            let key = item
                .product
                .as_ref()
                .map(|p| p.sku.to_string())
                .or_else(|| item.stock.as_ref().map(|s| s.sku.to_string()))
                .unwrap();
            assert!(
                last.as_ref().is_none_or(|l| *l < key),
                "SKU order, once each"
            );
            last = Some(key);
        }
        seen += page.items.len() as u64;
        pages += 1;
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, SKUS);
    assert_eq!(pages, SKUS.div_ceil(PAGE as u64));
    assert!(
        largest_body < 1 << 20,
        "a page of {PAGE} items is about half a MiB, not the whole branch ({largest_body} bytes)"
    );
    eprintln!(
        "{SKUS} SKUs: set up in {set_up:?}, {pages} pages (largest {largest_body} bytes) in {:?}",
        started.elapsed() - set_up
    );
}
