//! What the harness counts while it runs: shared counters (read by the progress line and the
//! report), the latency histograms (one per [`Latency`]), and the first few error messages.
//!
//! Counters are atomics bumped once per frame, not per event. Latencies are buffered per
//! connection in a [`LatencyBuf`] and merged into the shared HdrHistogram under a lock a few
//! hundred samples at a time, so thousands of connections never contend on it.
//!
//! **Which latencies count.** A sample belongs to the measured window when the event's
//! intended send stamp falls inside it, whenever the answer arrives: the events published in
//! the window's last moments that an overloaded hub delivers only during the drain are the
//! slowest ones, and dropping them would make p99 and max read low exactly when they matter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stream::Anomaly;

/// Longest latency recorded, in microseconds (10 minutes); longer ones count as this.
const MAX_MICROS: u64 = 600_000_000;
/// Samples buffered per connection before they are merged into the shared histogram.
const FLUSH_EVERY: usize = 512;
/// Error messages kept for the report; the rest are only counted.
const MAX_SAMPLES: usize = 20;

/// Which histogram a latency goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Latency {
    /// Publish (intended send time) → receive by a follower.
    Delivery,
    /// Publish (intended send time) → `accepted`.
    Ack,
    /// Publish (intended send time) → sequenced by the hub (its `server_time_ms`; wall
    /// clocks, millisecond resolution, meaningful only for a hub on this machine).
    ToSequenced,
    /// Sequenced by the hub → receive by a follower (same caveats).
    FromSequenced,
    /// Intended send time → the harness actually sent the publish: the harness's own share
    /// of the latency (timer resolution, its runtime being busy).
    SendLag,
}

impl Latency {
    const ALL: usize = 5;

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters and histograms of one run.
pub struct Stats {
    /// Events received by followers (one per event per follower).
    pub deliveries: AtomicU64,
    /// Publishes answered `accepted` (not duplicates).
    pub acked: AtomicU64,
    /// Publishes answered `rejected` for a reason the harness expects under load
    /// (`rate_limited` and the `out_of_order` answers that follow it).
    pub rejected: AtomicU64,
    /// Gaps seen in any stream.
    pub gaps: AtomicU64,
    /// Events those gaps skipped.
    pub missing: AtomicU64,
    /// Duplicate or reordered events seen in any stream.
    pub duplicates: AtomicU64,
    /// Everything else that went wrong: failed connections, fatal errors from the hub,
    /// unexpected rejections, frames that do not decode.
    pub errors: AtomicU64,
    /// Sessions open now (past `welcome`).
    pub open: AtomicU64,
    /// The most sessions open at once since [`Stats::reset_peak_open`].
    pub peak_open: AtomicU64,
    /// Connection attempts the hub refused with 503 `overloaded` and that were retried.
    pub connect_retries: AtomicU64,
    /// Latencies are kept for stamps in `[window_from, window_until)` (harness clock, ns);
    /// `window_from` is `u64::MAX` until a window opens, so nothing counts before.
    window_from: AtomicU64,
    window_until: AtomicU64,
    /// One per [`Latency`], over the whole measured window.
    total: [Mutex<Histogram<u64>>; Latency::ALL],
    /// The same samples since the timeline last took them (one tick).
    recent: [Mutex<Histogram<u64>>; Latency::ALL],
    samples: Mutex<Vec<String>>,
}

/// A point-in-time copy of the rate counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// [`Stats::deliveries`].
    pub deliveries: u64,
    /// [`Stats::acked`].
    pub acked: u64,
    /// [`Stats::rejected`].
    pub rejected: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds; `None` if it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        Some(Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        })
    }
}

fn histogram() -> Histogram<u64> {
    // 3 significant digits up to 10 minutes: ~170 KiB each; a run holds ten (the whole window
    // and the current tick for each of the five kinds), a fixed ~1.7 MiB.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty stats; no latency counts until [`Stats::open_latency_window`].
    pub fn new() -> Self {
        Self {
            deliveries: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            connect_retries: AtomicU64::new(0),
            window_from: AtomicU64::new(u64::MAX),
            window_until: AtomicU64::new(u64::MAX),
            total: std::array::from_fn(|_| Mutex::new(histogram())),
            recent: std::array::from_fn(|_| Mutex::new(histogram())),
            samples: Mutex::new(Vec::new()),
        }
    }

    /// From now on, latencies of events meant to be sent at or after `at_ns` count (warm-up
    /// events do not, even when they arrive later).
    pub fn open_latency_window(&self, at_ns: u64) {
        self.window_until.store(u64::MAX, Ordering::Release);
        self.window_from.store(at_ns, Ordering::Release);
    }

    /// Events meant to be sent at or after `at_ns` no longer count; those meant before still
    /// do when their answer arrives later (during the drain).
    pub fn close_latency_window(&self, at_ns: u64) {
        self.window_until.store(at_ns, Ordering::Release);
    }

    /// Whether an event stamped `stamp_ns` (its intended send time) is in the measured window.
    pub fn in_window(&self, stamp_ns: u64) -> bool {
        stamp_ns >= self.window_from.load(Ordering::Acquire)
            && stamp_ns < self.window_until.load(Ordering::Acquire)
    }

    /// Starts a new peak of open sessions from the number open now.
    pub fn reset_peak_open(&self) {
        self.peak_open
            .store(self.open.load(Ordering::Acquire), Ordering::Release);
        // A session that opened between the two operations above is not lost.
        self.peak_open
            .fetch_max(self.open.load(Ordering::Acquire), Ordering::AcqRel);
    }

    /// The rate counters now.
    pub fn counters(&self) -> Counters {
        Counters {
            deliveries: self.deliveries.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Counts an error and keeps its message if there is room.
    pub fn error(&self, message: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.sample(message.into());
    }

    /// Counts a stream anomaly seen by `who`.
    pub fn anomaly(&self, who: &str, branch: &str, anomaly: &Anomaly) {
        match anomaly {
            Anomaly::Gap { .. } => {
                self.gaps.fetch_add(1, Ordering::Relaxed);
                self.missing.fetch_add(anomaly.missing(), Ordering::Relaxed);
            }
            Anomaly::Duplicate { .. } => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Anomaly::CaughtUpBehind { .. } => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sample(format!("{who} on {branch}: {anomaly}"));
    }

    fn sample(&self, message: String) {
        let mut samples = lock(&self.samples);
        if samples.len() < MAX_SAMPLES {
            samples.push(message);
        }
    }

    /// The kept error messages.
    pub fn error_samples(&self) -> Vec<String> {
        lock(&self.samples).clone()
    }

    /// Total of gaps, duplicates and errors: non-zero fails the run.
    pub fn failures(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
            + self.duplicates.load(Ordering::Relaxed)
            + self.errors.load(Ordering::Relaxed)
    }

    fn histogram(&self, which: Latency) -> &Mutex<Histogram<u64>> {
        &self.total[which.index()]
    }

    fn recent(&self, which: Latency) -> &Mutex<Histogram<u64>> {
        &self.recent[which.index()]
    }

    /// Merges buffered samples (microseconds) into a histogram.
    pub fn record(&self, which: Latency, micros: &[u64]) {
        for h in [self.histogram(which), self.recent(which)] {
            let mut h = lock(h);
            for &us in micros {
                h.saturating_record(us.clamp(1, MAX_MICROS));
            }
        }
    }

    /// The percentiles recorded since the last call, and starts a new interval.
    pub fn take_recent(&self, which: Latency) -> Option<Percentiles> {
        let mut h = lock(self.recent(which));
        let p = Percentiles::of(&h);
        h.reset();
        p
    }

    /// The percentiles recorded so far.
    pub fn percentiles(&self, which: Latency) -> Option<Percentiles> {
        Percentiles::of(&lock(self.histogram(which)))
    }

    /// The 99th percentile so far, ms (for the progress line).
    pub fn p99_ms(&self, which: Latency) -> Option<f64> {
        let h = lock(self.histogram(which));
        (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1_000.0)
    }
}

/// Latency samples of one connection, merged into [`Stats`] in batches (and on drop).
pub struct LatencyBuf {
    stats: Arc<Stats>,
    which: Latency,
    buf: Vec<u64>,
}

impl LatencyBuf {
    /// An empty buffer for `which`.
    pub fn new(stats: Arc<Stats>, which: Latency) -> Self {
        Self {
            stats,
            which,
            buf: Vec::new(),
        }
    }

    /// Records the latency of an event meant to be sent at `stamp_ns` if that stamp is in the
    /// measured window.
    pub fn push(&mut self, stamp_ns: u64, micros: u64) {
        if !self.stats.in_window(stamp_ns) {
            return;
        }
        self.buf.push(micros);
        if self.buf.len() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Merges what is buffered.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.stats.record(self.which, &self.buf);
            self.buf.clear();
        }
    }
}

impl Drop for LatencyBuf {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Counts one open session in [`Stats::open`] for as long as it lives.
pub struct OpenGuard {
    stats: Arc<Stats>,
}

impl OpenGuard {
    /// Counts a session as open.
    pub fn new(stats: &Arc<Stats>) -> Self {
        let open = stats.open.fetch_add(1, Ordering::AcqRel) + 1;
        stats.peak_open.fetch_max(open, Ordering::AcqRel);
        Self {
            stats: stats.clone(),
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_count_by_intended_send_time_not_arrival() {
        let stats = Arc::new(Stats::new());
        let mut buf = LatencyBuf::new(stats.clone(), Latency::Delivery);
        buf.push(50, 5_000);
        stats.open_latency_window(100);
        buf.push(99, 4_000);
        for (stamp, us) in [(100, 1_000), (150, 2_000)] {
            buf.push(stamp, us);
        }
        stats.close_latency_window(200);
        // Meant inside the window, answered after it closed (the slow tail): kept.
        buf.push(199, 3_000);
        // Meant after it closed: not part of the measurement.
        buf.push(200, 9_000);
        drop(buf);
        let p = stats.percentiles(Latency::Delivery).unwrap();
        assert_eq!(p.count, 3, "only events stamped in [100, 200) count");
        assert!((p.max - 3.0).abs() < 0.01, "the late answer is kept: {p:?}");
        assert!((p.p50 - 2.0).abs() < 0.01, "{p:?}");
        assert!(stats.percentiles(Latency::Ack).is_none());
        assert_eq!(stats.take_recent(Latency::Delivery).unwrap().count, 3);
        assert!(
            stats.take_recent(Latency::Delivery).is_none(),
            "each interval starts empty"
        );
        assert_eq!(stats.percentiles(Latency::Delivery).unwrap().count, 3);
    }

    #[test]
    fn the_peak_of_open_sessions_is_what_actually_opened() {
        let stats = Arc::new(Stats::new());
        let a = OpenGuard::new(&stats);
        let b = OpenGuard::new(&stats);
        drop(a);
        stats.reset_peak_open();
        assert_eq!(
            stats.peak_open.load(Ordering::Relaxed),
            1,
            "starts from those open"
        );
        let c = OpenGuard::new(&stats);
        let d = OpenGuard::new(&stats);
        drop((b, c, d));
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
        assert_eq!(stats.peak_open.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn anomalies_are_counted_by_kind_and_fail_the_run() {
        let stats = Stats::new();
        assert_eq!(stats.failures(), 0);
        stats.anomaly("sub-1", "b0", &Anomaly::Gap { after: 2, got: 6 });
        stats.anomaly("sub-1", "b0", &Anomaly::Duplicate { seq: 6, last: 6 });
        assert_eq!(stats.gaps.load(Ordering::Relaxed), 1);
        assert_eq!(stats.missing.load(Ordering::Relaxed), 3);
        assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(stats.failures(), 2);
        assert!(stats.error_samples()[0].contains("gap: after seq 2 came 6"));
    }
}
