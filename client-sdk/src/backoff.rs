//! Reconnect and retry delays.
//!
//! A [`Backoff`] maps the number of the attempt that just failed (1 for the first failure) to
//! how long to wait before the next one. The default is capped exponential backoff with *full
//! jitter* (a uniformly random delay between zero and the exponential bound): when a hub
//! restarts, a thousand tills that lost it at the same instant spread their reconnects over
//! the whole window instead of arriving together.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

/// A retry policy: `attempt` (1 for the first failure, 2 for the second…) to delay.
#[derive(Clone)]
pub struct Backoff(Arc<dyn Fn(u32) -> Duration + Send + Sync>);

impl Backoff {
    /// A policy from any function of the attempt number.
    pub fn from_fn(f: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Capped exponential backoff with full jitter: a uniformly random delay in
    /// `[0, min(cap, base × 2^(attempt−1))]`.
    pub fn exponential(base: Duration, cap: Duration) -> Self {
        Self::from_fn(move |attempt| {
            let bound = exponential_bound(base, cap, attempt);
            let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
            if nanos == 0 {
                return Duration::ZERO;
            }
            Duration::from_nanos(rand::rng().random_range(0..=nanos))
        })
    }

    /// The same delay every time (mostly for tests).
    pub fn constant(delay: Duration) -> Self {
        Self::from_fn(move |_| delay)
    }

    /// The delay after failed attempt number `attempt` (1-based; 0 is treated as 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        (self.0)(attempt.max(1))
    }
}

impl Default for Backoff {
    /// [`Backoff::exponential`] from 250 ms, capped at 30 s.
    fn default() -> Self {
        Self::exponential(Duration::from_millis(250), Duration::from_secs(30))
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Backoff(..)")
    }
}

/// `every` scaled by a uniformly random factor in `[0.5, 1.5)`: for periodic work that many
/// clients start at the same moment (the WebSocket probe of tills that fell back to polling
/// together), so that it does not stay in lockstep.
pub(crate) fn jitter(every: Duration) -> Duration {
    every.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// The upper bound of the jittered delay: `min(cap, base × 2^(attempt−1))`, without overflow.
pub fn exponential_bound(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1);
    if shift >= 64 {
        return cap;
    }
    let nanos = base.as_nanos().saturating_mul(1u128 << shift);
    let capped = nanos.min(cap.as_nanos());
    Duration::from_nanos(u64::try_from(capped).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_doubles_from_base_until_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        let bounds: Vec<u128> = (1..=9)
            .map(|a| exponential_bound(base, cap, a).as_millis())
            .collect();
        assert_eq!(bounds, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(exponential_bound(base, cap, u32::MAX), cap);
        assert_eq!(exponential_bound(base, cap, 0), base);
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_bound_and_spreads() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        let b = Backoff::exponential(base, cap);
        for attempt in 1..=12 {
            let bound = exponential_bound(base, cap, attempt);
            let samples: Vec<Duration> = (0..400).map(|_| b.delay(attempt)).collect();
            assert!(samples.iter().all(|d| *d <= bound), "attempt {attempt}");
            // Full jitter: both halves of the window are used, so reconnects spread out.
            let low = samples.iter().filter(|d| **d < bound / 2).count();
            assert!(
                low > 100 && low < 300,
                "attempt {attempt}: {low} of 400 low"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_tills_reconnecting_spread_over_the_window() {
        // A hub restarts; a thousand tills each wait their jittered delay (on paused, virtual
        // time) before reconnecting. Arrivals must spread evenly, not stampede.
        let base = Duration::from_millis(250);
        let cap = Duration::from_secs(30);
        let attempt = 4; // bound 2 s
        let bound = exponential_bound(base, cap, attempt);
        let b = Backoff::exponential(base, cap);
        let start = tokio::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1000 {
            let (tx, delay) = (tx.clone(), b.delay(attempt));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(start.elapsed());
            });
        }
        drop(tx);
        let mut buckets = [0u32; 10];
        while let Some(at) = rx.recv().await {
            assert!(at <= bound, "{at:?} past the bound {bound:?}");
            let i = (at.as_secs_f64() / bound.as_secs_f64() * 10.0) as usize;
            buckets[i.min(9)] += 1;
        }
        assert_eq!(buckets.iter().sum::<u32>(), 1000);
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (50..=150).contains(n),
                "window {i}: {n} of 1000 arrivals: {buckets:?}"
            );
        }
        assert!(start.elapsed() <= bound);
    }

    #[test]
    fn periodic_jitter_stays_within_half_and_one_and_a_half_times_and_spreads() {
        let every = Duration::from_secs(30);
        let samples: Vec<Duration> = (0..400).map(|_| jitter(every)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= every / 2 && *d < every * 3 / 2)
        );
        let early = samples.iter().filter(|d| **d < every).count();
        assert!(early > 100 && early < 300, "{early} of 400 early");
    }

    #[test]
    fn custom_policies_receive_the_attempt_number() {
        let b = Backoff::from_fn(|a| Duration::from_secs(u64::from(a)));
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(4), Duration::from_secs(4));
    }
}
