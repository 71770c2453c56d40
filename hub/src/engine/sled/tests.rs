//! The sled engine's writer and committer through the engine boundary, on a real store in a
//! temporary directory: pipelined publishes and an early retry, the store reads a publish
//! needs, and what survives a reopen.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::time::Duration;

use branchline_protocol::http::PushResult;
use branchline_protocol::{
    Codec, Custom, Event, EventBody, Payment, PaymentMethod, SaleLine, SaleRecorded, Sku,
    StockCounted, now_ms,
};

use super::*;
use crate::engine::{Committed, Engine, Origin};

/// What the feed heard: each commit's branch head and the seqs it published.
#[derive(Default)]
struct Heard(Mutex<Vec<(u64, Vec<u64>)>>);

impl Feed for Heard {
    fn committed(&self, commit: Committed) {
        let seqs = commit
            .publication
            .map(|p| p.events.iter().map(|e| e.seq).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().push((commit.head, seqs));
    }
    fn trimmed(&self, _: &BranchKey, _: u64) {}
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn key() -> BranchKey {
    BranchKey::new(name("acme"), name("b1"))
}

fn origin() -> Origin {
    Origin {
        device: name("till-1"),
        offset_ms: 0,
    }
}

fn publish(device_seq: u64, body: EventBody) -> Publish {
    Publish {
        branch: name("b1"),
        event_id: Uuid::now_v7(),
        device_seq,
        client_time_ms: now_ms(),
        base_seq: None,
        base_version: None,
        body,
    }
}

fn note(n: u64) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: "test.note".into(),
        data: serde_json::json!({ "n": n }),
    })
}

fn open(dir: &std::path::Path, feed: Arc<Heard>) -> SledEngine {
    let config = Config {
        data_dir: dir.to_path_buf(),
        store_cache_bytes: 16 << 20,
        min_free_space: crate::config::ByteSize::b(0),
        ..Config::default()
    };
    SledEngine::open(&config, feed, Arc::new(Metrics::new())).unwrap()
}

async fn stop(engine: &SledEngine) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    engine.stop(deadline).await.unwrap();
}

/// `(seq, duplicate)` of an accepted answer, or the refusal's code and expected device_seq.
fn outcome(answer: PushResult) -> Result<(u64, bool), (ErrorCode, Option<u64>)> {
    match answer {
        PushResult::Accepted(a) => Ok((a.seq, a.duplicate)),
        PushResult::Rejected(r) => Err((r.code, r.expected_device_seq)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_and_an_early_retry_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let heard = Arc::new(Heard::default());
    let engine = open(dir.path(), heard.clone());
    engine.open(&key()).await.unwrap();
    let first = publish(1, note(1));
    let queued = vec![
        first.clone(),
        publish(2, note(2)),
        // The retry is queued before its original was answered: in the same round or the
        // next, it is the original's duplicate.
        first,
        publish(5, note(5)),
        publish(3, note(3)),
    ];
    let mut answers = Vec::new();
    for p in queued {
        answers.push(engine.publish(&key(), p, origin()).await);
    }
    let mut got = Vec::new();
    for answer in answers {
        got.push(outcome(answer.await));
    }
    assert_eq!(
        got,
        vec![
            Ok((1, false)),
            Ok((2, false)),
            Ok((1, true)),
            Err((ErrorCode::OutOfOrder, Some(3))),
            Ok((3, false)),
        ]
    );
    // The feed heard every event once, in order, and the head only ever moved up.
    let heard = heard.0.lock().unwrap().clone();
    let seqs: Vec<u64> = heard.iter().flat_map(|(_, s)| s.clone()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(heard.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(heard.last().unwrap().0, 3);
    stop(&engine).await;
}

fn sale(qty: i64) -> EventBody {
    EventBody::SaleRecorded(SaleRecorded {
        sale_id: format!("R-{qty}"),
        lines: vec![SaleLine {
            sku: Sku::new("TEA").unwrap(),
            qty,
            unit_price: 100,
            discount: 0,
        }],
        total: 100 * qty,
        tax: 0,
        currency: "EUR".into(),
        payments: vec![Payment {
            method: PaymentMethod::Card,
            amount: 100 * qty,
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_reads_the_movements_since_its_base_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Arc::new(Heard::default()));
    let opened = engine.open(&key()).await.unwrap();
    for (n, qty) in [(1, 2), (2, 3)] {
        let answer = engine
            .publish(&key(), publish(n, sale(qty)), origin())
            .await;
        assert_eq!(outcome(answer.await), Ok((n, false)));
    }
    // Counted 10 after seq 1: the sale of 3 at seq 2 happened during the count.
    let mut count = publish(
        3,
        EventBody::StockCounted(StockCounted {
            sku: Sku::new("TEA").unwrap(),
            counted: 10,
        }),
    );
    count.base_seq = Some(1);
    let answer = engine.publish(&key(), count, origin()).await;
    assert_eq!(outcome(answer.await), Ok((3, false)));
    let Read::Events(events) = engine.read(&key(), opened.epoch, 2, 3, 10).await.unwrap() else {
        panic!("the log serves its own head");
    };
    let event: Event = Codec::MsgPack.decode(&events[0].bytes).unwrap();
    let level = &event.effect.stock[0];
    assert_eq!(level.on_hand, 7);
    stop(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_writer_committed_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Arc::new(Heard::default()));
    let epoch = engine.open(&key()).await.unwrap().epoch;
    let first = publish(1, note(1));
    for p in [first.clone(), publish(2, note(2))] {
        engine.publish(&key(), p, origin()).await.await;
    }
    stop(&engine).await;
    drop(engine);

    let engine = open(dir.path(), Arc::new(Heard::default()));
    let opened = engine.open(&key()).await.unwrap();
    assert_eq!(
        (opened.epoch, opened.head, opened.devices),
        (epoch, 2, vec![(name("till-1"), 2)])
    );
    let retry = engine.publish(&key(), first, origin()).await;
    assert_eq!(outcome(retry.await), Ok((1, true)));
    let reused = engine.publish(&key(), publish(1, note(9)), origin()).await;
    assert_eq!(
        outcome(reused.await),
        Err((ErrorCode::DeviceSeqReused, Some(3)))
    );
    stop(&engine).await;
}
