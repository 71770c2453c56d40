//! Draining one branch's outbox: the pipelined window, answers, quarantine, renumbering and
//! retry timing (PROTOCOL.md §7). Transport-agnostic: the WebSocket session and the HTTP
//! batch push both feed it the hub's answers, which come in send order per branch.
//!
//! The rule that shapes it: a rejected event does not use up its `device_seq`, and the hub
//! refuses every later number until that one is filled. So after any refusal the events
//! sent behind it are refused too (`out_of_order`) and those answers say nothing new. The
//! publisher *halts* at the first refusal, lets the in-flight answers drain (accepting any
//! that were accepted — duplicates can be), fixes the numbering once, and resends from the
//! first unaccepted event.
//!
//! The rule that keeps renumbering from doubling an event: before the first send the hub
//! could apply (a `device_seq` above the last one the hub is known to have applied), the
//! entry is marked `sent` on disk, and a sent entry is never given a higher number (see
//! [`Store::renumber`]). The hub keeps an event's id for deduplication only while the event
//! is in its log; after that, a sent event whose answer was lost would be refused as
//! `device_seq_reused` whether or not it was applied, and renumbering it upward could apply
//! it a second time. Such an event is quarantined instead.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use branchline_protocol::http::PushResult;
use branchline_protocol::{ClientFrame, Codec, ErrorCode, Name, Position, Rejected};
use tokio::time::Instant;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::error::Result;
use crate::store::{PendingEvent, QuarantinedEvent, Store};

/// What an answer led to, for status and notifications.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    /// The hub sequenced the event (`duplicate`: it had already, this was a retry).
    Accepted {
        event_id: Uuid,
        position: Position,
        duplicate: bool,
    },
    /// The event was moved to quarantine.
    Quarantined(Box<QuarantinedEvent>),
    /// The hub asked for a renumbering (`device_seq_reused`): the store was lost or restored.
    Renumbered { from: u64 },
    /// A transient refusal; sending resumes after the backoff.
    Backoff { code: ErrorCode, delay: Duration },
}

/// The largest frame a transport takes (a WebSocket session: the hub's `max_frame_bytes`
/// from `welcome`), in the encoding it speaks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameLimit {
    pub codec: Codec,
    pub max_bytes: u64,
}

#[derive(Debug)]
struct InFlight {
    event_id: Uuid,
    device_seq: u64,
    /// Whether the entry was already marked sent before this send.
    sent_before: bool,
}

/// The publishing state of one branch.
#[derive(Debug)]
pub(crate) struct Publisher {
    branch: Name,
    inflight: VecDeque<InFlight>,
    /// The outbox ordinal of the last entry sent in this round.
    last_sent: Option<u64>,
    /// A refusal was met: send nothing more until the in-flight answers are in.
    halted: bool,
    /// Once drained, renumber the unaccepted entries from `known_next`.
    needs_renumber: bool,
    /// Whether the refusal that asked for the renumbering was `device_seq_reused`.
    reused: bool,
    /// The `device_seq` the hub expects next, as far as we know.
    known_next: Option<u64>,
    /// A lower bound of the last `device_seq` the hub applied from us, learnt on this
    /// connection (from the branch start and the answers). A send numbered at or below it
    /// cannot be applied, so it does not mark the entry sent.
    hub_last: Option<u64>,
    /// Entries of this round whose first send that could be applied was refused.
    refused: HashSet<Uuid>,
    retry_at: Option<Instant>,
    attempt: u32,
}

impl Publisher {
    pub fn new(branch: Name) -> Self {
        Self {
            branch,
            inflight: VecDeque::new(),
            last_sent: None,
            halted: false,
            needs_renumber: false,
            reused: false,
            known_next: None,
            hub_last: None,
            refused: HashSet::new(),
            retry_at: None,
            attempt: 0,
        }
    }

    /// Whether `event_id` is awaiting an answer here.
    pub fn is_in_flight(&self, event_id: Uuid) -> bool {
        self.inflight.iter().any(|f| f.event_id == event_id)
    }

    /// Events in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// When a backoff ends, if one is running.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The hub told us its last applied `device_seq` (welcome / subscribed).
    pub fn set_last_device_seq(&mut self, store: &Store, last: u64) -> Result<()> {
        self.known_next = Some(last + 1);
        self.hub_last = Some(last);
        store.align_counter(&self.branch, last)
    }

    fn learn_hub_last(&mut self, last: u64) {
        self.hub_last = Some(self.hub_last.map_or(last, |l| l.max(last)));
    }

    /// The next events to send, filling the window up to `window` in flight. Entries the
    /// hub could apply are marked sent first; the caller must [`Store::sync_sent`] before
    /// they leave. With a `limit`, an entry whose `publish` frame is over it is quarantined
    /// `message_too_big` instead of sent (the hub would close the session on it, and on
    /// every next one), and the round halts there as at a refusal, so the entries behind
    /// it are renumbered into its unused `device_seq`.
    pub fn take(
        &mut self,
        store: &Store,
        window: usize,
        now: Instant,
        limit: Option<FrameLimit>,
    ) -> Result<(Vec<PendingEvent>, Vec<Outcome>)> {
        let mut out = Vec::new();
        if self.halted || self.retry_at.is_some_and(|t| t > now) {
            return Ok((Vec::new(), out));
        }
        self.retry_at = None;
        let room = window.saturating_sub(self.inflight.len());
        if room == 0 {
            return Ok((Vec::new(), out));
        }
        let mut batch = store.unaccepted(&self.branch, self.last_sent, room);
        if let Some(limit) = limit {
            if let Some((i, refusal)) = oversized(&batch, limit)? {
                let culprit = batch.split_off(i);
                if let Some(q) = store.quarantine(culprit[0].event_id, &refusal)? {
                    out.push(Outcome::Quarantined(Box::new(q)));
                }
                self.halted = true;
                self.needs_renumber = true;
            }
        }
        let may_apply = |e: &&PendingEvent| self.hub_last.is_none_or(|l| e.device_seq > l);
        let marks: Vec<u64> = batch
            .iter()
            .filter(|e| !e.sent)
            .filter(may_apply)
            .map(PendingEvent::order)
            .collect();
        store.mark_sent(&self.branch, &marks)?;
        if let Some(first) = batch.first() {
            self.known_next.get_or_insert(first.device_seq);
        }
        for e in &batch {
            self.inflight.push_back(InFlight {
                event_id: e.event_id,
                device_seq: e.device_seq,
                sent_before: e.sent,
            });
            self.last_sent = Some(e.order());
        }
        if self.halted && self.inflight.is_empty() {
            self.resolve(store, &mut out)?;
        }
        Ok((batch, out))
    }

    /// Handles one answer. `followed`: whether the branch's events will arrive (so accepted
    /// entries wait for them to keep read-your-writes).
    pub fn on_answer(
        &mut self,
        store: &Store,
        answer: PushResult,
        followed: bool,
        backoff: &Backoff,
        now: Instant,
    ) -> Result<Vec<Outcome>> {
        let mut out = Vec::new();
        let event_id = match &answer {
            PushResult::Accepted(a) => Some(a.event_id),
            PushResult::Rejected(r) => r.event_id,
        };
        // Answers come in send order: everything in front of this one was answered (or will
        // never be, for frames the hub could not read).
        let sent = match event_id {
            Some(id) => match self.inflight.iter().position(|f| f.event_id == id) {
                Some(i) => self.inflight.drain(..=i).next_back(),
                None => None,
            },
            None => self.inflight.pop_front(),
        };
        match answer {
            PushResult::Accepted(a) => {
                let position = Position::new(a.epoch, a.seq);
                store.mark_accepted(a.event_id, position, followed)?;
                if let Some(f) = &sent {
                    if !a.duplicate {
                        self.known_next = Some(f.device_seq + 1);
                        self.learn_hub_last(f.device_seq);
                    }
                }
                if !self.halted {
                    self.attempt = 0;
                }
                out.push(Outcome::Accepted {
                    event_id: a.event_id,
                    position,
                    duplicate: a.duplicate,
                });
            }
            PushResult::Rejected(r) => {
                let Some(f) = sent else {
                    // An answer to a send from an earlier round (before a reconnect): its
                    // refusal is stale. Accepted answers are always applied, above.
                    return Ok(out);
                };
                if !f.sent_before {
                    // Its one send that could have been applied was refused: it never was.
                    self.refused.insert(f.event_id);
                }
                self.on_rejected(store, &r, event_id, backoff, now, &mut out)?;
            }
        }
        if self.halted && self.inflight.is_empty() {
            self.resolve(store, &mut out)?;
        }
        Ok(out)
    }

    fn on_rejected(
        &mut self,
        store: &Store,
        r: &Rejected,
        event_id: Option<Uuid>,
        backoff: &Backoff,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) -> Result<()> {
        let first_refusal = !self.halted;
        self.halted = true;
        if let Some(e) = r.expected_device_seq {
            self.known_next = Some(e);
            self.learn_hub_last(e.saturating_sub(1));
        }
        match r.code {
            code if code.is_permanent() => {
                if let Some(id) = event_id {
                    if let Some(q) = store.quarantine(id, r)? {
                        out.push(Outcome::Quarantined(Box::new(q)));
                    }
                }
                self.needs_renumber = true;
            }
            ErrorCode::OutOfOrder => self.needs_renumber = true,
            ErrorCode::DeviceSeqReused => {
                // Never-sent entries are renumbered from the expected value; sent ones the
                // hub has moved past are quarantined (`Store::renumber`).
                self.needs_renumber = true;
                // Only the first refusal of a round is news; later ones follow from it.
                self.reused |= first_refusal;
            }
            code => {
                self.attempt += 1;
                let delay = backoff.delay(self.attempt);
                self.retry_at = Some(now + delay);
                out.push(Outcome::Backoff { code, delay });
            }
        }
        Ok(())
    }

    /// All answers of the halted round are in: fix the numbering and start a new round.
    fn resolve(&mut self, store: &Store, out: &mut Vec<Outcome>) -> Result<()> {
        if self.needs_renumber {
            let from = match self.known_next {
                Some(n) => n,
                None => store
                    .unaccepted(&self.branch, None, 1)
                    .first()
                    .map_or(1, |e| e.device_seq),
            };
            let done = store.renumber(&self.branch, from, &self.refused)?;
            out.extend(
                done.quarantined
                    .into_iter()
                    .map(|q| Outcome::Quarantined(Box::new(q))),
            );
            if self.reused && done.changed > 0 {
                out.push(Outcome::Renumbered { from });
            }
        }
        self.halted = false;
        self.needs_renumber = false;
        self.reused = false;
        self.refused.clear();
        self.last_sent = None;
        Ok(())
    }

    /// Nothing in flight will be answered (the connection was lost, or a push failed). The
    /// next round starts from the first unaccepted entry (resending is safe: the hub
    /// deduplicates by event id).
    pub fn reset(&mut self, store: &Store) -> Result<Vec<Outcome>> {
        self.inflight.clear();
        let mut out = Vec::new();
        self.resolve(store, &mut out)?;
        Ok(out)
    }

    /// A new connection: [`Publisher::reset`], and forget what the last one taught about
    /// the hub's counter (the next branch start or answer says it again).
    pub fn begin(&mut self, store: &Store) -> Result<Vec<Outcome>> {
        self.hub_last = None;
        self.reset(store)
    }

    /// A whole push failed for a transient reason: reset and back off.
    pub fn fail(&mut self, store: &Store, backoff: &Backoff, now: Instant) -> Result<Vec<Outcome>> {
        let out = self.reset(store)?;
        self.attempt += 1;
        let delay = backoff.delay(self.attempt);
        self.retry_at = Some(now + delay);
        Ok(out)
    }
}

/// The first entry of `batch` whose `publish` frame is over `limit`: its index, and the
/// refusal to quarantine it with.
fn oversized(batch: &[PendingEvent], limit: FrameLimit) -> Result<Option<(usize, Rejected)>> {
    for (i, e) in batch.iter().enumerate() {
        let size = limit
            .codec
            .encode(&ClientFrame::Publish(e.to_publish()))?
            .len();
        if size as u64 > limit.max_bytes {
            return Ok(Some((
                i,
                Rejected::of(
                    e.event_id,
                    e.branch.clone(),
                    ErrorCode::MessageTooBig,
                    format!(
                        "its publish frame is {size} bytes and the hub takes at most {} \
                         (its welcome says): not sent",
                        limit.max_bytes
                    ),
                ),
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
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
}
