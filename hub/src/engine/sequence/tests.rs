//! The rules, one by one, against a store that answers what each test says.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use branchline_protocol::{
    AdjustReason, ConflictPolicy, Custom, ProductFields, ProductUpserted, StockAdjusted,
    StockCounted,
};

use super::*;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

/// A store as the rules see it: what it accepted before, whether it takes writes, and a
/// count's movements.
struct Store {
    known: HashMap<Uuid, (u64, u64)>,
    writable: Result<(), Unwritable>,
    moved: i64,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            known: HashMap::new(),
            writable: Ok(()),
            moved: 0,
        }
    }
}

impl Lookups for Store {
    fn known(&mut self, event_id: &Uuid) -> Result<Option<(u64, u64)>, Refused> {
        Ok(self.known.get(event_id).copied())
    }
    fn moved_since(&mut self, _: &Sku, _: u64, _: u64) -> Result<i64, Refused> {
        Ok(self.moved)
    }
    fn writable(&self) -> Result<(), Unwritable> {
        self.writable
    }
}

fn sequencer(policy: ConflictPolicy) -> Sequencer {
    Sequencer::new(
        Arc::new(BranchKey::new(name("acme"), name("b1"))),
        Epoch(7),
        0,
        0,
        HashMap::new(),
        BranchState::default(),
        Policies {
            upserted: policy,
            removed: policy,
            merge_fallback: ConflictPolicy::ServerWins,
        },
    )
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
        custom_type: "note".into(),
        data: serde_json::json!({ "n": n }),
    })
}

/// Sequences `p` from till-1; the outcome.
fn run(seq: &mut Sequencer, store: &mut Store, p: Publish) -> Outcome {
    seq.publish(p, &name("till-1"), 0, store)
}

fn rejected(outcome: &Outcome) -> &Rejected {
    match outcome {
        Outcome::Answered(PushResult::Rejected(r), _) => r,
        other => panic!("not a rejection: {other:?}"),
    }
}

fn sequenced(outcome: Outcome) -> (Box<Sequenced>, Accepted) {
    match outcome {
        Outcome::Sequenced(s, PushResult::Accepted(a)) => (s, a),
        other => panic!("not sequenced: {other:?}"),
    }
}

#[test]
fn publishes_get_consecutive_seqs_and_move_their_devices_counter() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    for n in 1..=3 {
        let (s, a) = sequenced(run(&mut seq, &mut store, publish(n, note(n))));
        assert_eq!((a.seq, a.duplicate, a.epoch), (n, false, Epoch(7)));
        assert_eq!(s.stored.seq, n);
        assert_eq!(s.device_seq, Some((name("till-1"), n)));
        let event: Event = Codec::MsgPack.decode(&s.stored.bytes).unwrap();
        assert_eq!(
            (event.seq, event.device_seq),
            (n, n),
            "the stored event is the event"
        );
    }
    assert_eq!(seq.head(), 3);
    assert_eq!(seq.devices(), vec![(name("till-1"), 3)]);
}

#[test]
fn a_retry_is_a_duplicate_at_its_seq_and_other_content_under_its_id_is_refused() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    let first = publish(1, note(1));
    let (s, _) = sequenced(run(&mut seq, &mut store, first.clone()));
    store.known.insert(first.event_id, (s.stored.seq, s.hash));
    match run(&mut seq, &mut store, first.clone()) {
        Outcome::Answered(PushResult::Accepted(a), None) => {
            assert_eq!((a.seq, a.duplicate), (1, true));
        }
        other => panic!("{other:?}"),
    }
    let renumbered = Publish {
        device_seq: 9,
        ..first.clone()
    };
    assert!(
        matches!(
            run(&mut seq, &mut store, renumbered),
            Outcome::Answered(PushResult::Accepted(_), _)
        ),
        "device_seq is not content: a renumbered retry is still the same event"
    );
    let other = Publish {
        body: note(2),
        ..first
    };
    let r = run(&mut seq, &mut store, other);
    assert_eq!(rejected(&r).code, ErrorCode::IdempotencyMismatch);
    assert_eq!(seq.head(), 1, "nothing was sequenced");
}

#[test]
fn a_skipped_or_reused_device_seq_names_the_expected_one() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    sequenced(run(&mut seq, &mut store, publish(1, note(1))));
    let skip = run(&mut seq, &mut store, publish(3, note(3)));
    let r = rejected(&skip);
    assert_eq!(
        (r.code, r.expected_device_seq),
        (ErrorCode::OutOfOrder, Some(2))
    );
    let reuse = run(&mut seq, &mut store, publish(1, note(4)));
    let r = rejected(&reuse);
    assert_eq!(
        (r.code, r.expected_device_seq),
        (ErrorCode::DeviceSeqReused, Some(2))
    );
    assert_eq!(seq.head(), 1);
}

#[test]
fn malformed_publishes_are_refused_before_anything_changes() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    let not_v7 = Publish {
        event_id: Uuid::from_bytes([0x11; 16]),
        ..publish(1, note(1))
    };
    let zero = publish(0, note(1));
    let hub_kind = publish(
        1,
        EventBody::ConflictResolved(branchline_protocol::ConflictResolved {
            conflict_id: Uuid::now_v7(),
            sku: sku("A"),
            resolution: branchline_protocol::Resolution::Server,
            resolved_by: name("x"),
            product: None,
        }),
    );
    for p in [not_v7, zero, hub_kind] {
        let outcome = run(&mut seq, &mut store, p);
        assert_eq!(
            rejected(&outcome).code,
            ErrorCode::InvalidEvent,
            "{outcome:?}"
        );
    }
    assert_eq!((seq.head(), seq.devices().len()), (0, 0));
}

#[test]
fn low_space_refuses_new_events_but_answers_retries_and_a_failed_store_refuses_all() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    let first = publish(1, note(1));
    let (s, _) = sequenced(run(&mut seq, &mut store, first.clone()));
    store.known.insert(first.event_id, (s.stored.seq, s.hash));
    store.writable = Err(Unwritable::LowSpace { free: 1, floor: 2 });
    let new = run(&mut seq, &mut store, publish(2, note(2)));
    assert_eq!(rejected(&new).code, ErrorCode::StorageUnavailable);
    assert!(matches!(
        run(&mut seq, &mut store, first.clone()),
        Outcome::Answered(PushResult::Accepted(a), _) if a.duplicate
    ));
    store.writable = Err(Unwritable::Failed);
    let retry = run(&mut seq, &mut store, first);
    assert_eq!(rejected(&retry).code, ErrorCode::StorageUnavailable);
    assert_eq!(seq.head(), 1);
}

#[test]
fn a_count_is_the_counted_level_plus_what_moved_since_its_base() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    let adjust = EventBody::StockAdjusted(StockAdjusted {
        sku: sku("TEA"),
        delta: 4,
        reason: AdjustReason::Receipt,
        note: None,
    });
    sequenced(run(&mut seq, &mut store, publish(1, adjust)));
    store.moved = 3;
    let count = Publish {
        base_seq: Some(0),
        ..publish(
            2,
            EventBody::StockCounted(StockCounted {
                sku: sku("TEA"),
                counted: 10,
            }),
        )
    };
    let (s, _) = sequenced(run(&mut seq, &mut store, count));
    assert!(
        s.changes
            .iter()
            .any(|c| matches!(c, Change::Stock(k, 13) if *k == sku("TEA"))),
        "{:?}",
        s.changes
    );
}

#[test]
fn a_stale_catalog_write_refused_by_policy_still_leaves_its_conflict_to_record() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    let create = EventBody::ProductUpserted(ProductUpserted {
        sku: sku("TEA"),
        fields: ProductFields {
            name: Some("Tea".into()),
            price: Some(250),
            ..ProductFields::default()
        },
    });
    sequenced(run(
        &mut seq,
        &mut store,
        Publish {
            base_version: Some(0),
            ..publish(1, create.clone())
        },
    ));
    let stale = run(
        &mut seq,
        &mut store,
        Publish {
            base_version: Some(0),
            ..publish(2, create)
        },
    );
    match &stale {
        Outcome::Answered(PushResult::Rejected(r), Some(record)) => {
            assert_eq!(r.code, ErrorCode::Conflict);
            assert_eq!(record.sku, sku("TEA"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_poisoned_branch_refuses_every_write() {
    let (mut seq, mut store) = (sequencer(ConflictPolicy::ServerWins), Store::default());
    seq.poison();
    let r = run(&mut seq, &mut store, publish(1, note(1)));
    assert_eq!(rejected(&r).code, ErrorCode::Internal);
}
