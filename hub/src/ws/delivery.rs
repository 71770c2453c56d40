//! Delivery, per followed branch: live batches when they continue exactly from what was
//! delivered, catch-up from the log when they cannot (see the module docs of [`super`]).

use std::time::Instant;

use branchline_protocol::{CaughtUp, ErrorCode, ServerFrame};

use super::frames::events_message;
use super::room::Outbound;
use super::session::Session;
use crate::branch::Page;
use crate::engine::FRAME_EVENT_BYTES;

/// What to do with a live batch of seqs `first..=last` for one followed branch.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// Nothing new in it, or the branch is catching up (the log has these events too).
    Drop,
    /// It continues exactly from what was delivered.
    Whole,
    /// It overlaps what was delivered: send only the events after it.
    After(u64),
    /// It would leave a gap: catch up from the log instead.
    Gap,
}

/// Decides what a branch that delivered up to `delivered` does with a live batch.
fn take(delivered: u64, catching_up: bool, first: u64, last: u64) -> Take {
    if catching_up || last <= delivered {
        Take::Drop
    } else if first == delivered + 1 {
        Take::Whole
    } else if first <= delivered {
        Take::After(delivered)
    } else {
        Take::Gap
    }
}

impl Session {
    /// Handles what the session was sent: a frame, or a live batch of a followed branch.
    pub(super) fn outbound(&mut self, out: Outbound) {
        match out {
            Outbound::Frame(frame) => self.push(&frame),
            // The lagging member is picked up by `check_lagging` after this round.
            Outbound::Wake => {}
            Outbound::Live(batch) => {
                self.ctl.consumed(batch.len());
                let codec = self.codec;
                let Some(sub) = self.subs.get_mut(batch.branch()) else {
                    return;
                };
                let msg = match take(
                    sub.delivered,
                    sub.catching_since.is_some(),
                    batch.first(),
                    batch.last(),
                ) {
                    Take::Drop => return,
                    Take::Whole => batch.message(codec),
                    Take::After(delivered) => batch.message_after(delivered, codec),
                    Take::Gap => {
                        sub.catching_since = Some(Instant::now());
                        self.hub.metrics().catchups.increment(1);
                        return;
                    }
                };
                if let Some(msg) = msg {
                    self.delivered_events += batch.last() - sub.delivered;
                    sub.delivered = batch.last();
                    self.out.push(msg);
                }
            }
        }
    }

    /// Branches the room cut over (queue full) start catching up from the log.
    pub(super) fn check_lagging(&mut self) {
        for sub in self.subs.values_mut() {
            if sub.member.take_lagging() && sub.catching_since.is_none() {
                sub.catching_since = Some(Instant::now());
                self.hub.metrics().catchups.increment(1);
            }
        }
    }

    /// Sends one chunk of the log to the branch catching up that waited longest for one.
    pub(super) async fn catch_up_step(&mut self) {
        let limits = &self.hub.config().limits;
        let (chunk, too_slow_after) = (limits.replay_chunk_events, limits.too_slow_after);
        let Some(name) = self
            .subs
            .iter()
            .filter(|(_, s)| s.catching_since.is_some())
            .min_by_key(|(_, s)| s.last_step)
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        let codec = self.codec;
        let Some(sub) = self.subs.get_mut(&name) else {
            return;
        };
        sub.last_step = Some(Instant::now());
        let branch = sub.branch.clone();
        let head = branch.head();
        if sub.delivered >= head {
            sub.catching_since = None;
            let caught = ServerFrame::CaughtUp(CaughtUp {
                branch: name,
                epoch: branch.epoch(),
                seq: sub.delivered,
            });
            self.push(&caught);
            return;
        }
        if sub
            .catching_since
            .is_some_and(|t| t.elapsed() > too_slow_after)
        {
            self.hub.metrics().too_slow.increment(1);
            self.ctl.close(
                ErrorCode::TooSlow,
                "the session could not keep up with its branches; reconnect and resume",
            );
            sub.catching_since = None;
            return;
        }
        let delivered = sub.delivered;
        let mut events = match branch.read(delivered, head, chunk).await {
            Ok(Page::Events(events)) => events,
            Ok(Page::Resync(resync)) => {
                // Retention trimmed what this session still needed.
                self.unsubscribe(&name);
                let resync = ServerFrame::ResyncRequired(resync);
                self.push(&resync);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, branch = %branch.key(), "replay read failed");
                self.ctl
                    .close(ErrorCode::Internal, "the log cannot be read");
                return;
            }
        };
        // One replay frame carries at most FRAME_EVENT_BYTES (and at least one event).
        let mut bytes = 0;
        if let Some(cut) = events.iter().position(|e| {
            bytes += e.bytes.len();
            bytes > FRAME_EVENT_BYTES
        }) {
            events.truncate(cut.max(1));
        }
        let last = events.last().map_or(delivered, |e| e.seq);
        let Some(sub) = self.subs.get_mut(&name) else {
            return;
        };
        if let Some(msg) = events_message(codec, &name, branch.epoch(), &events) {
            self.out.push(msg);
            sub.delivered = last;
            let n = last - delivered;
            self.delivered_events += n;
            self.hub.metrics().replayed.increment(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_batches_continue_the_stream_exactly_once() {
        assert_eq!(take(10, false, 11, 15), Take::Whole);
        assert_eq!(
            take(10, false, 5, 10),
            Take::Drop,
            "already delivered (late after a catch-up)"
        );
        assert_eq!(
            take(10, false, 8, 12),
            Take::After(10),
            "overlap: only 11 and 12"
        );
        assert_eq!(
            take(10, false, 12, 15),
            Take::Gap,
            "never skip: catch up instead"
        );
        assert_eq!(
            take(10, true, 11, 15),
            Take::Drop,
            "catch-up reads these from the log"
        );
    }
}
