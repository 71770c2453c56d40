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
mod tests;
