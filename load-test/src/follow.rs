//! What one session follows: one [`StreamCheck`] per branch, resume positions across
//! reconnects, publish→receive latency, and the progress the orchestrator watches.
//!
//! Kept free of sockets so the checks can be driven directly by tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use branchline_protocol::{BranchStart, Epoch, Name, Position, StartMode, Subscription};

use crate::clock;
use crate::stats::{Latency, LatencyBuf, Stats};
use crate::stream::StreamCheck;

/// One session's progress, shared with the orchestrator.
#[derive(Debug)]
pub struct Probe {
    /// The last seq received in order, per followed branch (in the plan's order).
    pub last: Vec<AtomicU64>,
    /// Harness clock when every followed branch last reported `caught_up` since the latest
    /// (re)connect; 0 before that.
    pub caught_up_ns: AtomicU64,
    /// Whether the session is open (past `welcome`).
    pub connected: AtomicBool,
    /// Events the session was behind, summed over its branches, at its latest start.
    pub behind: AtomicU64,
    /// Publishes not yet accepted (waiting for their answer, or rejected and to be resent).
    pub inflight: AtomicU64,
    /// Set when the session's task has ended.
    pub done: AtomicBool,
}

impl Probe {
    /// A probe for a session following `branches` branches.
    pub fn new(branches: usize) -> Self {
        Self {
            last: (0..branches).map(|_| AtomicU64::new(0)).collect(),
            caught_up_ns: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            behind: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    /// The last seq received on the `i`th followed branch.
    pub fn last(&self, i: usize) -> u64 {
        self.last.get(i).map_or(0, |a| a.load(Ordering::Acquire))
    }
}

/// One event as a follower sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Arrival {
    /// Its seq.
    pub seq: u64,
    /// The harness stamp it carries, if a harness publisher made it.
    pub stamp: Option<u64>,
    /// When the hub sequenced it (hub wall clock, ms).
    pub server_time_ms: Option<u64>,
}

struct Branch {
    name: Name,
    epoch: Option<Epoch>,
    epoch_hex: String,
    check: Option<StreamCheck>,
    caught_up: bool,
}

/// The branches one session follows.
pub struct Streams {
    who: Name,
    branches: Vec<Branch>,
    stats: Arc<Stats>,
    probe: Arc<Probe>,
    latency: LatencyBuf,
    to_sequenced: LatencyBuf,
    from_sequenced: LatencyBuf,
}

impl Streams {
    /// Streams for `who` following `branches`, starting live, or from `from` positions (same
    /// order) to resume.
    pub fn new(
        who: Name,
        branches: Vec<Name>,
        from: Option<Vec<Position>>,
        stats: Arc<Stats>,
        probe: Arc<Probe>,
    ) -> Self {
        let mut from = from.unwrap_or_default().into_iter();
        let branches = branches
            .into_iter()
            .map(|name| {
                let pos = from.next();
                Branch {
                    name,
                    epoch: pos.map(|p| p.epoch),
                    epoch_hex: pos.map(|p| p.epoch.to_string()).unwrap_or_default(),
                    check: pos.map(|p| StreamCheck::starting_at(p.seq)),
                    caught_up: false,
                }
            })
            .collect();
        Self {
            who,
            latency: LatencyBuf::new(stats.clone(), Latency::Delivery),
            to_sequenced: LatencyBuf::new(stats.clone(), Latency::ToSequenced),
            from_sequenced: LatencyBuf::new(stats.clone(), Latency::FromSequenced),
            branches,
            stats,
            probe,
        }
    }

    /// The `hello` subscriptions: live for branches never started, else from the position
    /// held.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.branches
            .iter()
            .map(|b| Subscription {
                branch: b.name.clone(),
                from: match (b.epoch, &b.check) {
                    (Some(epoch), Some(check)) => Some(Position::new(epoch, check.last())),
                    _ => None,
                },
            })
            .collect()
    }

    /// Applies the branch starts of a `welcome`. Returns the events the session is behind
    /// (head minus the position held, summed), or why the start breaks the protocol.
    pub fn start(&mut self, starts: &[BranchStart]) -> Result<u64, String> {
        let mut behind = 0;
        for b in &mut self.branches {
            b.caught_up = false;
            let start = starts
                .iter()
                .find(|s| s.branch == b.name)
                .ok_or_else(|| format!("welcome has no start for {}", b.name))?;
            if start.mode == StartMode::ResyncRequired {
                return Err(format!(
                    "{} on {}: resync_required for a position the hub should serve",
                    self.who, b.name
                ));
            }
            match (&b.check, b.epoch) {
                (Some(check), Some(epoch)) => {
                    if epoch != start.epoch {
                        return Err(format!(
                            "{} on {}: epoch changed from {epoch} to {}",
                            self.who, b.name, start.epoch
                        ));
                    }
                    behind += start.head.saturating_sub(check.last());
                }
                _ => {
                    // A live start: the stream begins after the head.
                    b.check = Some(StreamCheck::starting_at(start.head));
                    b.epoch = Some(start.epoch);
                    b.epoch_hex = start.epoch.to_string();
                }
            }
        }
        self.probe.behind.store(behind, Ordering::Release);
        self.probe.caught_up_ns.store(0, Ordering::Release);
        self.publish_progress();
        Ok(behind)
    }

    fn index(&self, branch: Option<&str>) -> Option<usize> {
        let branch = branch?;
        self.branches.iter().position(|b| b.name.as_str() == branch)
    }

    /// One event of `branch`/`epoch` arrived at `now_ns`.
    pub fn event(
        &mut self,
        branch: Option<&str>,
        epoch: Option<&str>,
        event: Arrival,
        now_ns: u64,
    ) {
        self.events(branch, epoch, std::iter::once(event), now_ns);
    }

    /// Events of `branch`/`epoch` arrived together at `now_ns` (one frame).
    pub fn events(
        &mut self,
        branch: Option<&str>,
        epoch: Option<&str>,
        events: impl Iterator<Item = Arrival>,
        now_ns: u64,
    ) {
        let Some(i) = self.index(branch) else {
            self.stats.error(format!(
                "{}: event for {} which it does not follow",
                self.who,
                branch.unwrap_or("?")
            ));
            return;
        };
        let b = &mut self.branches[i];
        if let Some(epoch) = epoch {
            if epoch != b.epoch_hex {
                self.stats.error(format!(
                    "{} on {}: event of epoch {epoch}, expected {}",
                    self.who, b.name, b.epoch_hex
                ));
            }
        }
        let Some(check) = b.check.as_mut() else {
            self.stats
                .error(format!("{} on {}: event before welcome", self.who, b.name));
            return;
        };
        let mut n = 0;
        let now_ms = clock::wall_ms(now_ns);
        for e in events {
            n += 1;
            if let Err(anomaly) = check.event(e.seq) {
                self.stats
                    .anomaly(self.who.as_str(), b.name.as_str(), &anomaly);
            }
            if let Some(stamp) = e.stamp {
                self.latency
                    .push(stamp, clock::micros_between(stamp, now_ns));
                if let Some(sequenced) = e.server_time_ms {
                    let sent = clock::wall_ms(stamp);
                    self.to_sequenced
                        .push(stamp, sequenced.saturating_sub(sent) * 1_000);
                    self.from_sequenced
                        .push(stamp, now_ms.saturating_sub(sequenced) * 1_000);
                }
            }
        }
        self.stats.deliveries.fetch_add(n, Ordering::Relaxed);
    }

    /// `caught_up` for `branch` at `seq` arrived at `now_ns`.
    pub fn caught_up(&mut self, branch: Option<&str>, seq: u64, now_ns: u64) {
        let Some(i) = self.index(branch) else {
            self.stats.error(format!(
                "{}: caught_up for {} which it does not follow",
                self.who,
                branch.unwrap_or("?")
            ));
            return;
        };
        let b = &mut self.branches[i];
        match b.check.as_mut() {
            Some(check) => {
                if let Err(anomaly) = check.caught_up(seq) {
                    self.stats
                        .anomaly(self.who.as_str(), b.name.as_str(), &anomaly);
                }
            }
            None => self.stats.error(format!(
                "{} on {}: caught_up before welcome",
                self.who, b.name
            )),
        }
        b.caught_up = true;
        if self.branches.iter().all(|b| b.caught_up) {
            self.probe
                .caught_up_ns
                .store(now_ns.max(1), Ordering::Release);
        }
    }

    /// Publishes the last seq of every branch to the probe (once per frame).
    pub fn publish_progress(&self) {
        for (i, b) in self.branches.iter().enumerate() {
            if let (Some(slot), Some(check)) = (self.probe.last.get(i), &b.check) {
                slot.store(check.last(), Ordering::Release);
            }
        }
    }

    /// `(branch, epoch, last seq)` of every started branch, for acks.
    pub fn positions(&self) -> impl Iterator<Item = (&Name, Epoch, u64)> {
        self.branches
            .iter()
            .filter_map(|b| Some((&b.name, b.epoch?, b.check.as_ref()?.last())))
    }

    /// Merges buffered latencies into the shared histograms.
    pub fn flush(&mut self) {
        self.latency.flush();
        self.to_sequenced.flush();
        self.from_sequenced.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// An event without stamps.
    fn arrival(seq: u64) -> Arrival {
        Arrival {
            seq,
            ..Arrival::default()
        }
    }

    fn start(head: u64, mode: StartMode) -> BranchStart {
        BranchStart {
            branch: name("b1"),
            epoch: Epoch(7),
            head,
            floor: 0,
            mode,
            last_device_seq: 0,
        }
    }

    #[test]
    fn a_live_follower_starts_after_the_head_and_resumes_from_what_it_holds() {
        let stats = Arc::new(Stats::new());
        let probe = Arc::new(Probe::new(1));
        let mut s = Streams::new(
            name("sub-1"),
            vec![name("b1")],
            None,
            stats.clone(),
            probe.clone(),
        );
        assert_eq!(s.subscriptions()[0].from, None);
        s.start(&[start(10, StartMode::Live)]).unwrap();
        let epoch = Epoch(7).to_string();
        for seq in 11..=13 {
            s.event(Some("b1"), Some(&epoch), arrival(seq), 0);
        }
        s.caught_up(Some("b1"), 13, 5);
        s.publish_progress();
        assert_eq!(probe.last(0), 13);
        assert_eq!(probe.caught_up_ns.load(Ordering::Acquire), 5);
        assert_eq!(
            s.subscriptions()[0].from,
            Some(Position::new(Epoch(7), 13)),
            "a reconnect resumes from the last event held"
        );
        assert_eq!(s.start(&[start(113, StartMode::Replay)]), Ok(100));
        assert_eq!(stats.failures(), 0);
    }

    #[test]
    fn gaps_foreign_epochs_and_resyncs_fail_the_run() {
        let stats = Arc::new(Stats::new());
        let probe = Arc::new(Probe::new(1));
        let mut s = Streams::new(name("sub-1"), vec![name("b1")], None, stats.clone(), probe);
        s.start(&[start(0, StartMode::Live)]).unwrap();
        let epoch = Epoch(7).to_string();
        s.event(Some("b1"), Some(&epoch), arrival(1), 0);
        s.event(Some("b1"), Some(&epoch), arrival(3), 0);
        assert_eq!(stats.gaps.load(Ordering::Relaxed), 1);
        s.event(Some("b1"), Some("0000000000000008"), arrival(4), 0);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
        assert!(s.start(&[start(4, StartMode::ResyncRequired)]).is_err());
    }
}
