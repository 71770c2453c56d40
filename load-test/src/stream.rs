//! The stream checker: one branch's stream as one client receives it must be gap-free and
//! duplicate-free (PROTOCOL.md §2 and §8). Every `event`, every element of an `events` frame
//! and every `caught_up` goes through a [`StreamCheck`]; anything else is an [`Anomaly`].

use std::fmt;

/// Something a correct hub never sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// The stream skipped: after `after` came `got` (so `got - after - 1` events are missing),
    /// or a `caught_up` claimed `got` was delivered when only `after` had arrived.
    Gap {
        /// The last seq received in order.
        after: u64,
        /// What came (or what `caught_up` claimed) next.
        got: u64,
    },
    /// `seq` arrived again, or out of order, after `last`.
    Duplicate {
        /// The repeated seq.
        seq: u64,
        /// The last seq received before it.
        last: u64,
    },
    /// A `caught_up` said less was delivered than had arrived.
    CaughtUpBehind {
        /// The seq the `caught_up` named.
        claimed: u64,
        /// What had arrived.
        received: u64,
    },
}

impl Anomaly {
    /// Events the anomaly says are missing (0 unless it is a gap).
    pub fn missing(&self) -> u64 {
        match *self {
            Anomaly::Gap { after, got } => got.saturating_sub(after).saturating_sub(1),
            _ => 0,
        }
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Anomaly::Gap { after, got } => {
                write!(
                    f,
                    "gap: after seq {after} came {got} ({} missing)",
                    self.missing()
                )
            }
            Anomaly::Duplicate { seq, last } => {
                write!(f, "duplicate: seq {seq} again after {last}")
            }
            Anomaly::CaughtUpBehind { claimed, received } => write!(
                f,
                "caught_up says {claimed} was delivered but {received} had arrived"
            ),
        }
    }
}

/// The position of one branch stream and the checks on what comes next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCheck {
    last: u64,
}

impl StreamCheck {
    /// A stream whose client holds everything up to `last` (the welcome's head for a live
    /// start, the resume position otherwise).
    pub fn starting_at(last: u64) -> Self {
        Self { last }
    }

    /// The last seq received in order: the position to resume from.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// One event arrived. On a gap the stream continues from `seq`, so each hole is reported
    /// once.
    pub fn event(&mut self, seq: u64) -> Result<(), Anomaly> {
        if seq == self.last + 1 {
            self.last = seq;
            Ok(())
        } else if seq <= self.last {
            Err(Anomaly::Duplicate {
                seq,
                last: self.last,
            })
        } else {
            let gap = Anomaly::Gap {
                after: self.last,
                got: seq,
            };
            self.last = seq;
            Err(gap)
        }
    }

    /// `caught_up` arrived: everything up to `seq` was delivered, which must be exactly what
    /// arrived.
    pub fn caught_up(&mut self, seq: u64) -> Result<(), Anomaly> {
        if seq == self.last {
            Ok(())
        } else if seq > self.last {
            let gap = Anomaly::Gap {
                after: self.last,
                got: seq + 1,
            };
            self.last = seq;
            Err(gap)
        } else {
            Err(Anomaly::CaughtUpBehind {
                claimed: seq,
                received: self.last,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbroken_stream_passes() {
        let mut s = StreamCheck::starting_at(10);
        for seq in 11..=20 {
            assert_eq!(s.event(seq), Ok(()));
        }
        assert_eq!(s.caught_up(20), Ok(()));
        assert_eq!(s.last(), 20);
    }

    #[test]
    fn a_hole_is_a_gap_reported_once() {
        let mut s = StreamCheck::starting_at(0);
        s.event(1).unwrap();
        s.event(2).unwrap();
        let gap = s.event(5).unwrap_err();
        assert_eq!(gap, Anomaly::Gap { after: 2, got: 5 });
        assert_eq!(gap.missing(), 2);
        assert_eq!(s.event(6), Ok(()), "the stream continues after the hole");
    }

    #[test]
    fn repeats_and_reordering_are_duplicates() {
        let mut s = StreamCheck::starting_at(0);
        s.event(1).unwrap();
        s.event(2).unwrap();
        assert_eq!(s.event(2), Err(Anomaly::Duplicate { seq: 2, last: 2 }));
        assert_eq!(s.event(1), Err(Anomaly::Duplicate { seq: 1, last: 2 }));
        assert_eq!(s.last(), 2, "the position does not move back");
    }

    #[test]
    fn caught_up_must_match_what_arrived() {
        let mut s = StreamCheck::starting_at(3);
        s.event(4).unwrap();
        let gap = s.caught_up(6).unwrap_err();
        assert_eq!(gap.missing(), 2, "5 and 6 were claimed but never arrived");
        assert_eq!(
            s.caught_up(5),
            Err(Anomaly::CaughtUpBehind {
                claimed: 5,
                received: 6
            })
        );
    }
}
