//! The publisher against a scripted hub: renumbering, quarantine, resends and back-off.

use super::*;
use branchline_protocol::{Accepted, Custom, Epoch, EventBody};

fn body(n: u32) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: format!("t{n}"),
        data: serde_json::Value::Null,
    })
}

fn branch() -> Name {
    Name::new("b1").unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn store_with(n: u32) -> Store {
    let s = Store::temporary(100).unwrap();
    let rt = rt();
    for i in 0..n {
        rt.block_on(s.record(&branch(), body(i), None, None, 0))
            .unwrap();
    }
    s
}

fn accepted(e: &PendingEvent, seq: u64, duplicate: bool) -> PushResult {
    PushResult::Accepted(Accepted {
        event_id: e.event_id,
        branch: branch(),
        epoch: Epoch(1),
        seq,
        duplicate,
    })
}

fn rejected(e: &PendingEvent, code: ErrorCode, expected: Option<u64>) -> PushResult {
    PushResult::Rejected(Rejected {
        expected_device_seq: expected,
        ..Rejected::of(e.event_id, branch(), code, code.to_string())
    })
}

/// A tiny hub model of PROTOCOL.md §7 for one device: `last` is L; `poison` are event
/// ids refused as invalid; `seen` maps accepted ids to their seq (the dedup index:
/// clearing it is the hub forgetting events that left its log).
struct Hub {
    last: u64,
    seq: u64,
    poison: Vec<Uuid>,
    seen: std::collections::HashMap<Uuid, u64>,
    order: Vec<Uuid>,
}

impl Hub {
    fn answer(&mut self, e: &PendingEvent) -> PushResult {
        if self.poison.contains(&e.event_id) {
            return rejected(e, ErrorCode::InvalidEvent, None);
        }
        if let Some(seq) = self.seen.get(&e.event_id) {
            return accepted(e, *seq, true);
        }
        if e.device_seq == self.last + 1 {
            self.last += 1;
            self.seq += 1;
            self.seen.insert(e.event_id, self.seq);
            self.order.push(e.event_id);
            accepted(e, self.seq, false)
        } else if e.device_seq > self.last + 1 {
            rejected(e, ErrorCode::OutOfOrder, Some(self.last + 1))
        } else {
            rejected(e, ErrorCode::DeviceSeqReused, Some(self.last + 1))
        }
    }
}

fn drain(store: &Store, hub: &mut Hub, window: usize) -> Vec<Outcome> {
    drain_with(&mut Publisher::new(branch()), store, hub, window)
}

/// Sends `p`'s outbox to `hub` and answers it until nothing is left to send or in flight.
fn drain_with(p: &mut Publisher, store: &Store, hub: &mut Hub, window: usize) -> Vec<Outcome> {
    let backoff = Backoff::constant(Duration::ZERO);
    let mut outcomes = Vec::new();
    for _ in 0..1000 {
        let sent = p.take(store, window, Instant::now(), None).unwrap().0;
        if sent.is_empty() && p.in_flight() == 0 {
            break;
        }
        // Answer the whole window, in order, like a pipelined session.
        for e in sent {
            let a = hub.answer(&e);
            outcomes.extend(
                p.on_answer(store, a, false, &backoff, Instant::now())
                    .unwrap(),
            );
        }
    }
    outcomes
}

#[test]
fn a_poisoned_event_is_quarantined_and_the_rest_renumbered_and_delivered() {
    let store = store_with(10);
    let pending = store.pending(&branch());
    let mut hub = Hub {
        last: 0,
        seq: 0,
        poison: vec![pending[3].event_id],
        seen: Default::default(),
        order: Vec::new(),
    };
    let outcomes = drain(&store, &mut hub, 4);
    let expected: Vec<Uuid> = pending
        .iter()
        .filter(|e| e.event_id != pending[3].event_id)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        hub.order, expected,
        "every other event once, in device order"
    );
    assert_eq!(hub.last, 9, "device_seqs 1..=9 with no gap");
    assert!(store.pending(&branch()).is_empty());
    let q = store.quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].event.event_id, pending[3].event_id);
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Quarantined(_)))
            .count(),
        1
    );
    assert_eq!(store.next_device_seq(&branch()).unwrap(), 10);
}

#[test]
fn a_lost_counter_is_renumbered_from_the_hubs_expectation() {
    // The hub already applied 41 events from this device (the store was restored).
    let store = store_with(5);
    let mut hub = Hub {
        last: 41,
        seq: 100,
        poison: vec![],
        seen: Default::default(),
        order: Vec::new(),
    };
    let outcomes = drain(&store, &mut hub, 3);
    assert_eq!(hub.last, 46);
    assert_eq!(hub.order.len(), 5);
    assert!(outcomes.contains(&Outcome::Renumbered { from: 42 }));
    assert_eq!(store.next_device_seq(&branch()).unwrap(), 47);
}

#[test]
fn answers_lost_in_a_cut_are_resent_and_deduplicated() {
    let store = store_with(6);
    let mut hub = hub(0);
    let mut p = Publisher::new(branch());
    let backoff = Backoff::constant(Duration::ZERO);
    // Send 4; the hub applies them all but only the first two answers arrive.
    let sent = p.take(&store, 4, Instant::now(), None).unwrap().0;
    let answers: Vec<_> = sent.iter().map(|e| hub.answer(e)).collect();
    for a in answers.into_iter().take(2) {
        p.on_answer(&store, a, false, &backoff, Instant::now())
            .unwrap();
    }
    p.reset(&store).unwrap();
    let outcomes = drain_with(&mut p, &store, &mut hub, 4);
    assert_eq!(hub.order.len(), 6, "each event sequenced exactly once");
    let dups = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outcome::Accepted {
                    duplicate: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(dups, 2, "the two unanswered ones came back as duplicates");
    assert!(store.pending(&branch()).is_empty());
}

fn hub(last: u64) -> Hub {
    Hub {
        last,
        seq: last,
        poison: vec![],
        seen: Default::default(),
        order: Vec::new(),
    }
}

#[test]
fn a_sent_event_the_hub_has_forgotten_is_quarantined_never_renumbered() {
    let store = store_with(3);
    let mut hub = hub(0);
    let mut p = Publisher::new(branch());
    // The hub applies all three, the answers are lost in a cut…
    for e in p.take(&store, 8, Instant::now(), None).unwrap().0 {
        hub.answer(&e);
    }
    p.begin(&store).unwrap();
    // …and by the time the device is back the events have left the hub's log, taking
    // their dedup entries with them. A fourth event was recorded meanwhile.
    hub.seen.clear();
    let fourth = rt()
        .block_on(store.record(&branch(), body(9), None, None, 0))
        .unwrap();
    let outcomes = drain_with(&mut p, &store, &mut hub, 8);
    assert_eq!(
        hub.order.len(),
        4,
        "each event applied once: {:?}",
        hub.order
    );
    assert_eq!(hub.order[3], fourth.event_id);
    let q = store.quarantined().unwrap();
    assert_eq!(q.len(), 3, "the three the hub cannot vouch for");
    assert!(
        q.iter()
            .all(|q| q.code == ErrorCode::DeviceSeqReused && q.message.contains("sent before"))
    );
    assert!(
        !outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Renumbered { .. }))
    );
    assert!(store.pending(&branch()).is_empty());
}

#[test]
fn a_send_the_hub_could_not_apply_leaves_the_event_free_to_renumber() {
    // A restored store: the hub has applied 41 of this device's events. The welcome
    // says so, so the first round's sends (numbered 1…3) cannot be applied and do not
    // mark the events; the round is cut before any answer.
    let store = store_with(3);
    let mut hub = hub(41);
    let mut p = Publisher::new(branch());
    p.set_last_device_seq(&store, 41).unwrap();
    assert_eq!(p.take(&store, 8, Instant::now(), None).unwrap().0.len(), 3);
    p.begin(&store).unwrap();
    assert!(store.pending(&branch()).iter().all(|e| !e.sent));
    p.set_last_device_seq(&store, 41).unwrap();
    let outcomes = drain_with(&mut p, &store, &mut hub, 8);
    assert_eq!(hub.order.len(), 3);
    assert_eq!(hub.last, 44);
    assert!(store.quarantined().unwrap().is_empty());
    assert!(outcomes.contains(&Outcome::Renumbered { from: 42 }));
}

#[test]
fn an_event_over_the_frame_limit_is_quarantined_unsent_and_its_number_reused() {
    let store = Store::temporary(100).unwrap();
    let rt = rt();
    let big = EventBody::Custom(Custom {
        custom_type: "big".into(),
        data: serde_json::json!("x".repeat(2000)),
    });
    let small = rt
        .block_on(store.record(&branch(), body(1), None, None, 0))
        .unwrap();
    let oversized = rt
        .block_on(store.record(&branch(), big, None, None, 0))
        .unwrap();
    let behind = rt
        .block_on(store.record(&branch(), body(2), None, None, 0))
        .unwrap();
    let limit = FrameLimit {
        codec: Codec::MsgPack,
        max_bytes: 1000,
    };
    let mut hub = hub(0);
    let mut p = Publisher::new(branch());
    let backoff = Backoff::constant(Duration::ZERO);
    let (sent, outcomes) = p.take(&store, 8, Instant::now(), Some(limit)).unwrap();
    assert_eq!(
        sent.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        [small.event_id],
        "sent up to the oversized one"
    );
    assert!(matches!(&outcomes[..], [Outcome::Quarantined(q)]
        if q.event.event_id == oversized.event_id && q.code == ErrorCode::MessageTooBig));
    for e in sent {
        let a = hub.answer(&e);
        p.on_answer(&store, a, true, &backoff, Instant::now())
            .unwrap();
    }
    let (sent, _) = p.take(&store, 8, Instant::now(), Some(limit)).unwrap();
    assert_eq!(
        sent.iter()
            .map(|e| (e.event_id, e.device_seq))
            .collect::<Vec<_>>(),
        [(behind.event_id, 2)]
    );
    assert_eq!(store.quarantined_count(), 1);
}

#[test]
fn transient_refusals_back_off_then_resend() {
    let store = store_with(2);
    let mut p = Publisher::new(branch());
    let backoff = Backoff::constant(Duration::from_secs(2));
    let t0 = Instant::now();
    let sent = p.take(&store, 8, t0, None).unwrap().0;
    assert_eq!(sent.len(), 2);
    let out = p
        .on_answer(
            &store,
            rejected(&sent[0], ErrorCode::RateLimited, None),
            true,
            &backoff,
            t0,
        )
        .unwrap();
    assert_eq!(
        out,
        vec![Outcome::Backoff {
            code: ErrorCode::RateLimited,
            delay: Duration::from_secs(2)
        }]
    );
    p.on_answer(
        &store,
        rejected(&sent[1], ErrorCode::OutOfOrder, Some(1)),
        true,
        &backoff,
        t0,
    )
    .unwrap();
    assert!(
        p.take(&store, 8, t0 + Duration::from_secs(1), None)
            .unwrap()
            .0
            .is_empty()
    );
    let again = p
        .take(&store, 8, t0 + Duration::from_secs(2), None)
        .unwrap()
        .0;
    assert_eq!(
        again.iter().map(|e| e.device_seq).collect::<Vec<_>>(),
        [1, 2],
        "numbering unchanged by a transient refusal"
    );
}
