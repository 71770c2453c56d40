//! One device publishing to one branch: pacing, `device_seq`, and the answers.
//!
//! **Pacing.** [`Pace::Rate`] is open-loop: event `k` is *meant* to go out at
//! `start + k / rate` and carries that instant as its stamp, so a hub (or harness) that falls
//! behind shows up as latency instead of silently lowering the rate — the correction for
//! coordinated omission. [`Pace::Window`] is closed-loop: keep `n` publishes unanswered, as
//! fast as acks allow; its stamps are the real send times.
//!
//! **Answers.** The hub answers one session's publishes to one branch in order (PROTOCOL.md
//! §7), so each answer must match the oldest unanswered publish. A `rate_limited` rejection
//! does not use up its `device_seq`, and the publishes pipelined behind it come back
//! `out_of_order`: the publisher counts them as rejected, waits until nothing is in flight,
//! backs off for [`RATE_LIMIT_PAUSE`] (as a real client would, instead of spinning on
//! rejections) and then sends the rejected events again, from the `device_seq` the hub
//! expects, each with the stamp it first had (and a fresh event id: the hub applied nothing
//! of the rejected one). A rejection therefore costs no slot of the schedule: a rejected
//! event's latency runs from when it was first meant to go out, through the rejection and the
//! pause, to its `accepted`; the events scheduled after it keep their own intended times
//! (with a rate, the backlog that built up during the pause goes out at once, open loop). Any
//! other rejection is an error, and that event is not resent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use branchline_protocol::{EncodeError, Name};
use bytes::Bytes;
use uuid::Uuid;

use crate::clock;
use crate::stats::{Latency, LatencyBuf, Stats};
use crate::wire::{self, Payload};

/// How a publisher paces itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// This many events per second, open loop, with at most `max_inflight` unanswered: a hub
    /// that falls behind leaves the backlog in the harness (still stamped with intended
    /// times), not in the hub's queues, so its memory stays what a real fleet would cause.
    Rate {
        /// Events per second.
        per_s: f64,
        /// Most publishes unanswered at once.
        max_inflight: usize,
    },
    /// Keep this many publishes unanswered, closed loop.
    Window(usize),
}

/// The hub's default limit on one session's unanswered publishes; more only stalls its reads.
pub const MAX_INFLIGHT: usize = 1_024;

impl Pace {
    fn cap(self) -> usize {
        match self {
            Pace::Rate { max_inflight, .. } => max_inflight,
            Pace::Window(n) => n,
        }
        .clamp(1, MAX_INFLIGHT)
    }
}

/// How long a publisher pauses after a `rate_limited` answer.
pub const RATE_LIMIT_PAUSE: u64 = 50_000_000;

/// What a publisher needs to know.
#[derive(Clone, Debug)]
pub struct PublishPlan {
    /// The branch.
    pub branch: Name,
    /// Pacing.
    pub pace: Pace,
    /// What each event carries.
    pub payload: Payload,
    /// The branch head as far as acks tell, shared by every publisher of the branch.
    pub head: Arc<AtomicU64>,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    id: Uuid,
    device_seq: u64,
    /// When it was first meant to go out (kept when it is resent).
    stamp_ns: u64,
}

/// A publisher's state between frames.
pub struct Publisher {
    plan: PublishPlan,
    device: Name,
    stats: Arc<Stats>,
    latency: LatencyBuf,
    send_lag: LatencyBuf,
    next_seq: u64,
    inflight: VecDeque<Pending>,
    /// Stamps of events rejected in the current round (in publish order), to resend once
    /// nothing is in flight.
    rejected: Vec<u64>,
    /// Stamps of rejected events waiting to be sent again, ahead of any new event.
    retry: VecDeque<u64>,
    /// Rate mode: when the schedule started and how many of its slots have been used (a
    /// resent event keeps its first slot).
    started_ns: Option<u64>,
    scheduled: u64,
    /// Set after a rejection: continue from this `device_seq` once nothing is in flight.
    rewind_to: Option<u64>,
    /// Set after `rate_limited`: no publish before this stamp.
    paused_until: Option<u64>,
    stopped: bool,
}

impl Publisher {
    /// A publisher for `device` whose next `device_seq` is `next_seq`.
    pub fn new(plan: PublishPlan, device: Name, next_seq: u64, stats: Arc<Stats>) -> Self {
        Self {
            latency: LatencyBuf::new(stats.clone(), Latency::Ack),
            send_lag: LatencyBuf::new(stats.clone(), Latency::SendLag),
            plan,
            device,
            stats,
            next_seq,
            inflight: VecDeque::new(),
            rejected: Vec::new(),
            retry: VecDeque::new(),
            started_ns: None,
            scheduled: 0,
            rewind_to: None,
            paused_until: None,
            stopped: false,
        }
    }

    /// Publishes not yet accepted: waiting for their answer, or rejected and waiting to be
    /// sent again.
    pub fn outstanding(&self) -> usize {
        self.inflight.len() + self.rejected.len() + self.retry.len()
    }

    /// Stops emitting new publishes; answers are still taken and rejected events still resent
    /// (they were published before the stop).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    fn intended_ns(&self, k: u64) -> Option<u64> {
        match (self.plan.pace, self.started_ns) {
            (Pace::Rate { per_s, .. }, Some(start)) if per_s > 0.0 => {
                Some(start + (k as f64 * 1e9 / per_s) as u64)
            }
            _ => None,
        }
    }

    /// When the next paced publish is due (harness clock), if the publisher is waiting for
    /// time rather than for answers.
    pub fn next_due(&self) -> Option<u64> {
        if self.rewind_to.is_some()
            || self.inflight.len() >= self.plan.pace.cap()
            || (self.stopped && self.retry.is_empty())
        {
            return None;
        }
        if self.paused_until.is_some() {
            return self.paused_until;
        }
        match self.retry.front() {
            Some(&stamp) => Some(stamp),
            None => self.intended_ns(self.scheduled),
        }
    }

    /// Encodes every publish due at `now_ns` into `out`: rejected events first, then new ones.
    pub fn fill(&mut self, now_ns: u64, out: &mut Vec<Bytes>) -> Result<(), EncodeError> {
        if self.rewind_to.is_some() || (self.stopped && self.retry.is_empty()) {
            return Ok(());
        }
        match self.paused_until {
            Some(until) if until > now_ns => return Ok(()),
            Some(_) => self.paused_until = None,
            None => {}
        }
        self.started_ns.get_or_insert(now_ns);
        while self.inflight.len() < self.plan.pace.cap() {
            let (stamp_ns, resent) = if let Some(stamp) = self.retry.pop_front() {
                (stamp, true)
            } else if self.stopped {
                return Ok(());
            } else {
                let stamp = match self.plan.pace {
                    Pace::Window(_) => now_ns,
                    Pace::Rate { .. } => match self.intended_ns(self.scheduled) {
                        Some(t) if t <= now_ns => t,
                        _ => return Ok(()),
                    },
                };
                self.scheduled += 1;
                (stamp, false)
            };
            let pending = Pending {
                id: Uuid::now_v7(),
                device_seq: self.next_seq,
                stamp_ns,
            };
            let mut buf = Vec::with_capacity(128);
            wire::publish(
                &mut buf,
                &self.plan.branch,
                &self.device,
                pending.id,
                pending.device_seq,
                stamp_ns,
                &self.plan.payload,
            )?;
            out.push(Bytes::from(buf));
            if !resent {
                // The harness's own lateness; a resent event's wait is the hub's doing.
                self.send_lag
                    .push(stamp_ns, clock::micros_between(stamp_ns, now_ns));
            }
            self.inflight.push_back(pending);
            self.next_seq += 1;
        }
        Ok(())
    }

    /// Takes the answer for `event_id` off the queue; answers come in publish order.
    fn answered(&mut self, event_id: Option<&str>) -> Option<Pending> {
        let id = event_id.and_then(|s| Uuid::parse_str(s).ok());
        let front = self.inflight.front().copied();
        match (front, id) {
            (Some(p), Some(id)) if p.id == id => self.inflight.pop_front(),
            (_, Some(id)) => {
                self.stats.error(format!(
                    "{}: answer for {id} out of publish order",
                    self.device
                ));
                let at = self.inflight.iter().position(|p| p.id == id)?;
                self.inflight.remove(at)
            }
            (_, None) => {
                self.stats
                    .error(format!("{}: answer without an event id", self.device));
                self.inflight.pop_front()
            }
        }
    }

    /// Once a rejection round has no answer left to wait for, rewinds `device_seq` and puts
    /// the rejected events ahead of those still waiting to be resent (they were published
    /// before them).
    fn settle(&mut self) {
        if self.inflight.is_empty() {
            if let Some(seq) = self.rewind_to.take() {
                self.next_seq = seq;
                for stamp in self.rejected.drain(..).rev() {
                    self.retry.push_front(stamp);
                }
            }
        }
    }

    /// `accepted` for `event_id` at `seq`, received at `now_ns`.
    pub fn accepted(&mut self, event_id: Option<&str>, seq: u64, duplicate: bool, now_ns: u64) {
        let Some(p) = self.answered(event_id) else {
            return;
        };
        if duplicate {
            // The harness never retries an event id, so a duplicate means the hub applied
            // something twice or mixed up ids.
            self.stats.error(format!(
                "{}: accepted as duplicate though never sent before (device_seq {})",
                self.device, p.device_seq
            ));
        } else {
            self.stats.acked.fetch_add(1, Ordering::Relaxed);
            self.latency
                .push(p.stamp_ns, clock::micros_between(p.stamp_ns, now_ns));
        }
        self.plan.head.fetch_max(seq, Ordering::AcqRel);
        self.settle();
    }

    /// `rejected` for `event_id` with `code`, received at `now_ns`.
    pub fn rejected(
        &mut self,
        event_id: Option<&str>,
        code: &str,
        expected: Option<u64>,
        message: &str,
        now_ns: u64,
    ) {
        let Some(p) = self.answered(event_id) else {
            return;
        };
        let pipelined_behind_a_rejection =
            matches!(code, "out_of_order") && self.rewind_to.is_some();
        if code == "rate_limited" {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            self.paused_until = Some(now_ns + RATE_LIMIT_PAUSE);
            self.rejected.push(p.stamp_ns);
        } else if pipelined_behind_a_rejection {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            self.rejected.push(p.stamp_ns);
        } else {
            self.stats.error(format!(
                "{}: publish device_seq {} rejected {code}: {message}",
                self.device, p.device_seq
            ));
        }
        let resume = expected.unwrap_or(p.device_seq);
        self.rewind_to = Some(self.rewind_to.map_or(resume, |r| r.min(resume)));
        self.settle();
    }

    /// Merges buffered latencies.
    pub fn flush(&mut self) {
        self.latency.flush();
        self.send_lag.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(pace: Pace) -> (Publisher, Arc<Stats>) {
        let stats = Arc::new(Stats::new());
        stats.open_latency_window(0);
        let plan = PublishPlan {
            branch: Name::new("b1").unwrap(),
            pace,
            payload: Payload::custom(0),
            head: Arc::new(AtomicU64::new(0)),
        };
        let p = Publisher::new(plan, Name::new("p1").unwrap(), 1, stats.clone());
        (p, stats)
    }

    fn ids(p: &Publisher) -> Vec<(String, u64)> {
        p.inflight
            .iter()
            .map(|x| (x.id.to_string(), x.device_seq))
            .collect()
    }

    #[test]
    fn a_rate_is_paced_from_intended_times() {
        let (mut p, _) = publisher(Pace::Rate {
            per_s: 1_000.0,
            max_inflight: 100,
        });
        let mut out = Vec::new();
        p.fill(1_000_000_000, &mut out).unwrap();
        assert_eq!(out.len(), 1, "the first event is due at once");
        assert_eq!(p.next_due(), Some(1_001_000_000));
        p.fill(1_010_500_000, &mut out).unwrap();
        assert_eq!(out.len(), 11, "10.5 ms later ten more are due");
        let stamps: Vec<u64> = p.inflight.iter().map(|x| x.stamp_ns).collect();
        assert_eq!(stamps[10], 1_010_000_000, "stamped with the intended time");
        p.fill(1_500_000_000, &mut out).unwrap();
        assert_eq!(p.outstanding(), 100, "no more unanswered than the cap");
        assert_eq!(p.next_due(), None, "waiting for answers, not time");
        let first = p.inflight.front().unwrap().id.to_string();
        p.accepted(Some(&first), 1, false, 1_500_000_000);
        out.clear();
        p.fill(1_500_000_000, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let last = p.inflight.back().unwrap().stamp_ns;
        assert_eq!(last, 1_100_000_000, "the backlog keeps its intended times");
    }

    #[test]
    fn a_window_keeps_n_in_flight_and_acks_free_slots() {
        let (mut p, stats) = publisher(Pace::Window(4));
        let mut out = Vec::new();
        p.fill(0, &mut out).unwrap();
        assert_eq!(p.outstanding(), 4);
        let (id, _) = ids(&p)[0].clone();
        p.accepted(Some(&id), 1, false, 2_000_000);
        assert_eq!(stats.acked.load(Ordering::Relaxed), 1);
        assert_eq!(p.plan.head.load(Ordering::Relaxed), 1);
        p.fill(0, &mut out).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(ids(&p).last().unwrap().1, 5, "device_seq keeps counting");
    }

    #[test]
    fn rate_limiting_rewinds_device_seq_without_errors() {
        let (mut p, stats) = publisher(Pace::Window(3));
        let mut out = Vec::new();
        p.fill(0, &mut out).unwrap();
        let sent = ids(&p);
        p.accepted(Some(&sent[0].0), 1, false, 0);
        p.rejected(Some(&sent[1].0), "rate_limited", None, "slow down", 0);
        assert_eq!(p.next_due(), None, "nothing new while answers are pending");
        out.clear();
        p.fill(0, &mut out).unwrap();
        assert!(out.is_empty());
        p.rejected(Some(&sent[2].0), "out_of_order", Some(2), "expected 2", 0);
        assert_eq!(p.next_due(), Some(RATE_LIMIT_PAUSE), "then it backs off");
        p.fill(RATE_LIMIT_PAUSE - 1, &mut out).unwrap();
        assert!(out.is_empty());
        p.fill(RATE_LIMIT_PAUSE, &mut out).unwrap();
        assert_eq!(
            ids(&p).iter().map(|x| x.1).collect::<Vec<_>>(),
            [2, 3, 4],
            "resends from the device_seq the hub expects, then a new event"
        );
        let stamps: Vec<u64> = p.inflight.iter().map(|x| x.stamp_ns).collect();
        assert_eq!(
            stamps,
            [0, 0, RATE_LIMIT_PAUSE],
            "the resent events keep their first send time"
        );
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 2);
        assert_eq!(stats.failures(), 0);
    }

    #[test]
    fn rejected_events_keep_their_slots_and_the_schedule_holds() {
        const MS: u64 = 1_000_000;
        let t0 = 1_000 * MS;
        let (mut p, stats) = publisher(Pace::Rate {
            per_s: 1_000.0,
            max_inflight: 100,
        });
        let mut out = Vec::new();
        p.fill(t0, &mut out).unwrap();
        p.fill(t0 + 3 * MS, &mut out).unwrap();
        let sent = ids(&p);
        assert_eq!(sent.len(), 4, "slots 0 to 3");
        p.accepted(Some(&sent[0].0), 1, false, t0 + 3 * MS);
        p.rejected(Some(&sent[1].0), "rate_limited", None, "", t0 + 4 * MS);
        p.rejected(Some(&sent[2].0), "out_of_order", Some(2), "", t0 + 4 * MS);
        p.rejected(Some(&sent[3].0), "out_of_order", Some(2), "", t0 + 4 * MS);
        assert_eq!(p.outstanding(), 3, "the rejected events are still owed");
        let resume = t0 + 4 * MS + RATE_LIMIT_PAUSE;
        assert_eq!(p.next_due(), Some(resume));
        p.fill(resume, &mut out).unwrap();
        // Every slot from 1 up to the resume time goes out exactly once, in order: the three
        // rejected ones with their first stamps, then the backlog of the pause.
        let slots = (resume - t0) / MS;
        let stamps: Vec<u64> = p.inflight.iter().map(|x| x.stamp_ns).collect();
        let expected: Vec<u64> = (1..=slots).map(|k| t0 + k * MS).collect();
        assert_eq!(stamps, expected);
        let seqs: Vec<u64> = ids(&p).iter().map(|x| x.1).collect();
        assert_eq!(seqs, (2..=slots + 1).collect::<Vec<_>>());
        // The rate-limited event's latency runs from its first intended time.
        let resent = ids(&p)[0].0.clone();
        p.accepted(Some(&resent), 2, false, t0 + 60 * MS);
        p.flush();
        let ack = stats.percentiles(Latency::Ack).unwrap();
        assert_eq!(ack.count, 2);
        assert!((ack.max - 59.0).abs() < 0.1, "{ack:?}");
        let lag = stats.percentiles(Latency::SendLag).unwrap();
        assert_eq!(lag.count, 4 + slots - 3, "send lag counts first sends only");
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 3);
        assert_eq!(stats.failures(), 0);
    }

    #[test]
    fn events_rejected_before_a_stop_are_still_resent() {
        let (mut p, stats) = publisher(Pace::Window(2));
        let mut out = Vec::new();
        p.fill(0, &mut out).unwrap();
        let sent = ids(&p);
        p.rejected(Some(&sent[0].0), "rate_limited", None, "", 0);
        p.rejected(Some(&sent[1].0), "out_of_order", Some(1), "", 0);
        p.stop();
        assert_eq!(p.next_due(), Some(RATE_LIMIT_PAUSE));
        out.clear();
        p.fill(RATE_LIMIT_PAUSE, &mut out).unwrap();
        assert_eq!(out.len(), 2, "the two rejected, nothing new");
        let resent = ids(&p);
        assert_eq!((resent[0].1, resent[1].1), (1, 2));
        p.accepted(Some(&resent[0].0), 1, false, RATE_LIMIT_PAUSE);
        p.accepted(Some(&resent[1].0), 2, false, RATE_LIMIT_PAUSE);
        assert_eq!(p.outstanding(), 0);
        assert_eq!(p.next_due(), None);
        out.clear();
        p.fill(2 * RATE_LIMIT_PAUSE, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(stats.acked.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn unexpected_rejections_and_duplicates_are_errors() {
        let (mut p, stats) = publisher(Pace::Window(2));
        let mut out = Vec::new();
        p.fill(0, &mut out).unwrap();
        let sent = ids(&p);
        p.rejected(Some(&sent[0].0), "invalid_event", None, "bad", 0);
        p.accepted(Some(&sent[1].0), 9, true, 0);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
    }
}
