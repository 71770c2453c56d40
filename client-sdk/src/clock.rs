//! Clock offset between the device and the hub.
//!
//! Each round trip (a `ping`/`pong`, or `GET /v1/time`) gives a sample
//! `offset = server − (sent + received) / 2`, good to within half the round trip. The client
//! keeps the sample with the smallest round trip among the last few (PROTOCOL.md §5) and
//! stamps every event with `device clock + offset`, so the hub's `newest_wins` policy
//! compares times on one clock. The `hello` and push requests carry corrected times too, so
//! the offset the hub measures itself is about zero and never applied twice.

use std::collections::VecDeque;
use std::sync::Mutex;

use branchline_protocol::{UnixMillis, now_ms};

/// How many recent samples the best one is chosen from.
const SAMPLES: usize = 8;

#[derive(Default)]
struct State {
    /// (round trip, offset)
    samples: VecDeque<(i64, i64)>,
    offset: Option<i64>,
}

/// The measured offset, shared by the publishing handles and the background task.
#[derive(Default)]
pub(crate) struct Clock(Mutex<State>);

impl Clock {
    /// A clock starting from a previously measured offset (kept in the store).
    pub fn with_offset(offset: Option<i64>) -> Self {
        Self(Mutex::new(State {
            samples: VecDeque::new(),
            offset,
        }))
    }

    /// Adds a sample; returns the offset now in use.
    pub fn sample(&self, sent: UnixMillis, server: UnixMillis, received: UnixMillis) -> i64 {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let rtt = received.saturating_sub(sent).max(0);
        let offset = server.saturating_sub(sent.saturating_add(rtt / 2));
        if s.samples.len() == SAMPLES {
            s.samples.pop_front();
        }
        s.samples.push_back((rtt, offset));
        let best = s
            .samples
            .iter()
            .min_by_key(|(rtt, _)| *rtt)
            .map_or(offset, |(_, o)| *o);
        s.offset = Some(best);
        best
    }

    /// The offset in use (hub minus device, ms).
    pub fn offset(&self) -> Option<i64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).offset
    }

    /// The device clock corrected by the offset: the hub's time, as well as it is known.
    pub fn now(&self) -> UnixMillis {
        now_ms().saturating_add(self.offset().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_with_the_shortest_round_trip_wins() {
        let c = Clock::default();
        // Hub is 1,000 ms ahead. A slow round trip with an asymmetric delay misleads…
        assert_eq!(c.sample(0, 1_400, 600), 1_100);
        // …a fast one is closer to the truth and replaces it.
        assert_eq!(c.sample(10_000, 11_005, 10_010), 1_000);
        // A later slow sample does not displace the fast one.
        assert_eq!(c.sample(20_000, 21_500, 20_800), 1_000);
        assert_eq!(c.offset(), Some(1_000));
    }

    #[test]
    fn old_samples_age_out() {
        let c = Clock::default();
        c.sample(0, 500, 0);
        for i in 1..=SAMPLES as i64 {
            c.sample(i * 1000, i * 1000 + 50 + 20, i * 1000 + 40);
        }
        assert_eq!(c.offset(), Some(50));
    }
}
