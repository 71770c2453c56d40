use super::*;
use branchline_protocol::{Custom, Effect, Epoch, EventBody};

fn b() -> Name {
    Name::new("b1").unwrap()
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

/// An event of `b1` at `(epoch, seq)` whose effect sets the stock levels given. The engine's
/// tests use it too.
pub(crate) fn event(epoch: u64, seq: u64, stock: &[(&str, i64)], id: Uuid) -> Event {
    Event {
        branch: b(),
        epoch: Epoch(epoch),
        seq,
        event_id: id,
        device: Name::new("till-1").unwrap(),
        device_seq: seq,
        client_time_ms: 0,
        server_time_ms: 0,
        base_seq: None,
        base_version: None,
        body: EventBody::Custom(Custom {
            custom_type: "t".into(),
            data: serde_json::Value::Null,
        }),
        effect: Effect {
            stock: stock
                .iter()
                .map(|(s, n)| StockLevel::new(sku(s), *n))
                .collect(),
            product: None,
            conflict: None,
        },
    }
}

fn ev(seq: u64, on_hand: i64) -> Event {
    event(7, seq, &[("A", on_hand)], Uuid::now_v7())
}

#[test]
fn events_apply_in_order_skipping_duplicates_and_stopping_at_gaps() {
    let s = Store::temporary(100).unwrap();
    s.apply_snapshot(&b(), Position::new(Epoch(7), 0), &[], &[])
        .unwrap();
    let a = s.apply_events(&b(), vec![ev(1, 5), ev(2, 4)]).unwrap();
    assert_eq!(a.applied, 2);
    assert_eq!(s.cursor(&b()).unwrap(), Some(Position::new(Epoch(7), 2)));
    // A replayed duplicate is skipped; a gap stops the run before it.
    let a = s
        .apply_events(&b(), vec![ev(2, 4), ev(3, 3), ev(5, 1)])
        .unwrap();
    assert_eq!(a.applied, 1);
    assert_eq!(a.gap, Some((4, 5)));
    assert_eq!(s.cursor(&b()).unwrap(), Some(Position::new(Epoch(7), 3)));
    assert_eq!(
        s.confirmed_stock(&b(), &sku("A")).unwrap().unwrap().on_hand,
        3
    );
    // Another epoch is never applied.
    let a = s
        .apply_events(&b(), vec![event(8, 4, &[("A", 0)], Uuid::now_v7())])
        .unwrap();
    assert!(a.epoch_mismatch && a.applied == 0);
    assert_eq!(
        s.confirmed_stock(&b(), &sku("A")).unwrap().unwrap().on_hand,
        3
    );
}

#[test]
fn events_before_the_first_snapshot_are_refused() {
    let s = Store::temporary(100).unwrap();
    let a = s.apply_events(&b(), vec![ev(1, 5)]).unwrap();
    assert!(a.epoch_mismatch && a.applied == 0);
    assert_eq!(s.cursor(&b()).unwrap(), None);
}

#[tokio::test]
async fn an_applied_own_event_retires_its_outbox_entry_atomically() {
    let s = Store::temporary(100).unwrap();
    s.apply_snapshot(&b(), Position::new(Epoch(7), 0), &[], &[])
        .unwrap();
    let e = s
        .record(
            &b(),
            EventBody::Custom(Custom {
                custom_type: "t".into(),
                data: serde_json::Value::Null,
            }),
            None,
            None,
            0,
        )
        .await
        .unwrap();
    s.mark_accepted(e.event_id, Position::new(Epoch(7), 1), true)
        .unwrap();
    assert_eq!(
        s.pending(&b()).len(),
        1,
        "kept until the event itself arrives"
    );
    assert_eq!(s.pending_stats().0, 0, "but no longer counted as pending");
    s.apply_events(&b(), vec![event(7, 1, &[], e.event_id)])
        .unwrap();
    assert!(s.pending(&b()).is_empty());
}

#[tokio::test]
async fn renumbering_never_raises_a_sent_event_and_quarantines_it_instead() {
    let s = Store::temporary(100).unwrap();
    let body = || {
        EventBody::Custom(Custom {
            custom_type: "t".into(),
            data: serde_json::Value::Null,
        })
    };
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(s.record(&b(), body(), None, None, 0).await.unwrap());
    }
    // 1 and 2 were sent; the hub's answer for 2 was a refusal of its only send.
    s.mark_sent(&b(), &[ids[0].order(), ids[1].order()])
        .unwrap();
    let refused: HashSet<Uuid> = [ids[1].event_id].into();
    // Lowering is fine for anyone…
    let r = s.renumber(&b(), 1, &refused).unwrap();
    assert!(r.quarantined.is_empty() && r.changed == 0);
    // …raising is not, for a sent event.
    s.mark_sent(&b(), &[ids[1].order()]).unwrap();
    let r = s.renumber(&b(), 10, &refused).unwrap();
    assert_eq!(r.quarantined.len(), 1);
    assert_eq!(r.quarantined[0].event.event_id, ids[0].event_id);
    assert_eq!(r.quarantined[0].code, ErrorCode::DeviceSeqReused);
    assert_eq!(r.changed, 3);
    let left = s.pending(&b());
    assert_eq!(
        left.iter()
            .map(|e| (e.event_id, e.device_seq, e.sent))
            .collect::<Vec<_>>(),
        [
            (ids[1].event_id, 10, false),
            (ids[2].event_id, 11, false),
            (ids[3].event_id, 12, false)
        ]
    );
    assert_eq!(s.quarantined_count(), 1);
    assert_eq!(s.next_device_seq(&b()).unwrap(), 13);
}

#[test]
fn a_view_of_a_branch_counts_each_event_once_while_events_are_applied() {
    // A reader laying pending events on the replica while the engine applies them must
    // never see an event in both parts or in neither.
    let s = Arc::new(Store::temporary(10_000).unwrap());
    s.apply_snapshot(&b(), Position::new(Epoch(7), 0), &[], &[])
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let n = 300;
    let mut recorded = Vec::new();
    for _ in 0..n {
        let body = EventBody::StockAdjusted(branchline_protocol::StockAdjusted {
            sku: sku("A"),
            delta: 1,
            reason: branchline_protocol::AdjustReason::Receipt,
            note: None,
        });
        recorded.push(rt.block_on(s.record(&b(), body, None, None, 0)).unwrap());
    }
    let reader = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            let mut reads = 0;
            loop {
                let v = s.branch_view(&b()).unwrap();
                let confirmed = v.stock.first().map_or(0, |l| l.on_hand);
                assert_eq!(
                    confirmed + v.pending.len() as i64,
                    n,
                    "at {:?}: {confirmed} confirmed + {} pending",
                    v.position,
                    v.pending.len()
                );
                let (_, level, pending) = s.sku_view(&b(), &sku("A")).unwrap();
                assert_eq!(level.map_or(0, |l| l.on_hand) + pending.len() as i64, n);
                reads += 1;
                if v.pending.is_empty() {
                    return reads;
                }
            }
        })
    };
    for (i, e) in recorded.iter().enumerate() {
        let seq = i as u64 + 1;
        s.apply_events(&b(), vec![event(7, seq, &[("A", seq as i64)], e.event_id)])
            .unwrap();
    }
    assert!(reader.join().unwrap() > 0);
}

#[tokio::test]
async fn accepted_entries_of_a_branch_no_longer_followed_are_retired() {
    let s = Store::temporary(100).unwrap();
    let body = || {
        EventBody::Custom(Custom {
            custom_type: "t".into(),
            data: serde_json::Value::Null,
        })
    };
    let accepted = s.record(&b(), body(), None, None, 0).await.unwrap();
    let waiting = s.record(&b(), body(), None, None, 0).await.unwrap();
    s.mark_accepted(accepted.event_id, Position::new(Epoch(7), 1), true)
        .unwrap();
    s.retire_accepted(&b()).unwrap();
    let left: Vec<Uuid> = s.pending(&b()).iter().map(|e| e.event_id).collect();
    assert_eq!(left, [waiting.event_id]);
}

#[test]
fn a_snapshot_replaces_the_replica_and_the_local_log_trims_to_capacity() {
    let s = Store::temporary(3).unwrap();
    s.apply_snapshot(
        &b(),
        Position::new(Epoch(7), 0),
        &[],
        &[StockLevel::new(sku("OLD"), 1)],
    )
    .unwrap();
    for seq in 1..=4 {
        s.apply_events(&b(), vec![ev(seq, 10 - seq as i64)])
            .unwrap();
    }
    assert_eq!(s.log_end() - s.log_start(), 3);
    assert!(s.log_entry(s.log_start() - 1).unwrap().is_none());
    let (_, u) = s
        .apply_snapshot(
            &b(),
            Position::new(Epoch(9), 40),
            &[],
            &[StockLevel::new(sku("NEW"), 2)],
        )
        .unwrap();
    assert!(matches!(u, Update::Resynced { .. }));
    let levels = s.confirmed_stock_levels(&b()).unwrap();
    assert_eq!(levels, vec![StockLevel::new(sku("NEW"), 2)]);
    assert_eq!(s.cursor(&b()).unwrap(), Some(Position::new(Epoch(9), 40)));
}

/// Opens the store at `path` again, waiting (for a while) until sled's background
/// flusher of the previous instance has let go of it.
fn reopen(path: &Path) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path, 10, true) {
            Err(Error::StoreLocked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
}

#[test]
fn a_store_in_use_is_reported_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _held = Store::open(dir.path(), 10, true).unwrap();
    assert!(matches!(
        Store::open(dir.path(), 10, true),
        Err(Error::StoreLocked { .. })
    ));
}

#[tokio::test]
async fn the_outbox_and_counters_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let body = || {
        EventBody::Custom(Custom {
            custom_type: "t".into(),
            data: serde_json::Value::Null,
        })
    };
    let ids: Vec<Uuid> = {
        let s = Store::open(dir.path(), 10, true).unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(
                s.record(&b(), body(), None, None, 0)
                    .await
                    .unwrap()
                    .event_id,
            );
        }
        s.renumber(&b(), 41, &HashSet::new()).unwrap();
        let first = s.pending(&b())[0].order();
        s.mark_sent(&b(), &[first]).unwrap();
        s.sync_sent().await.unwrap();
        s.mark_accepted(ids[2], Position::new(Epoch(7), 9), true)
            .unwrap();
        ids
    };
    let s = reopen(dir.path());
    let pending = s.pending(&b());
    assert_eq!(pending.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
    assert_eq!(
        pending.iter().map(|e| e.device_seq).collect::<Vec<_>>(),
        [41, 42, 43]
    );
    assert_eq!(
        pending.iter().map(|e| e.sent).collect::<Vec<_>>(),
        [true, false, false],
        "the sent mark is durable"
    );
    assert_eq!(
        pending[2].accepted,
        Some(Position::new(Epoch(7), 9)),
        "so is the acceptance"
    );
    assert_eq!(
        s.record(&b(), body(), None, None, 0)
            .await
            .unwrap()
            .device_seq,
        44
    );
}
