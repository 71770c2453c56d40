//! The harness clock: monotonic nanoseconds since the harness started.
//!
//! Publishers stamp each event with this clock and subscribers read it back, so
//! publish→receive latency never depends on wall clocks: both ends live in this process, even
//! when the hub is on another machine.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static START: OnceLock<(Instant, u64)> = OnceLock::new();

fn start() -> (Instant, u64) {
    *START.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        (Instant::now(), wall)
    })
}

/// The instant the clock counts from (fixed by the first call).
pub fn origin() -> Instant {
    start().0
}

/// Unix time in milliseconds of a stamp: for comparing with the hub's `server_time_ms`
/// (which only means something when the hub runs on this machine).
pub fn wall_ms(ns: u64) -> u64 {
    (start().1 + ns) / 1_000_000
}

/// Nanoseconds since [`origin`].
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// The stamp of `at` (0 for instants before the origin).
pub fn ns_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin()).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant of a stamp.
pub fn instant_of(ns: u64) -> Instant {
    origin() + Duration::from_nanos(ns)
}

/// Microseconds from stamp `from` to stamp `to` (0 if `to` is earlier).
pub fn micros_between(from: u64, to: u64) -> u64 {
    to.saturating_sub(from) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_instants_and_never_go_negative() {
        let a = now_ns();
        let at = instant_of(a);
        assert_eq!(ns_at(at), a);
        assert_eq!(micros_between(a + 5_000, a), 0, "late stamps saturate at 0");
        assert_eq!(micros_between(a, a + 2_500_000), 2_500);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            wall_ms(now_ns()).abs_diff(wall) <= 5,
            "stamps map to wall time"
        );
    }
}
