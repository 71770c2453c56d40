//! The live progress line: phase, connections, rates, failures and hub memory, redrawn twice a
//! second on stderr. Hidden when stderr is not a terminal (indicatif draws nothing there), so
//! logs and CI output hold only the final table.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stats::{Latency, Stats};
use crate::usage::ProcWatch;

const TICK: Duration = Duration::from_millis(500);

/// The progress line of one run.
pub struct Progress {
    bar: ProgressBar,
    phase: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts drawing for `scenario`.
    pub fn start(scenario: &str, stats: Arc<Stats>, hub: Option<Arc<ProcWatch>>) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_prefix(scenario.to_owned());
        let phase = Arc::new(Mutex::new(String::from("starting")));
        let task = tokio::spawn(draw(bar.clone(), phase.clone(), stats, hub));
        Self { bar, phase, task }
    }

    /// Names the phase shown.
    pub fn phase(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase.into();
    }

    /// Clears the line.
    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

async fn draw(
    bar: ProgressBar,
    phase: Arc<Mutex<String>>,
    stats: Arc<Stats>,
    hub: Option<Arc<ProcWatch>>,
) {
    let mut tick = tokio::time::interval(TICK);
    let mut last = (Instant::now(), stats.counters());
    loop {
        tick.tick().await;
        let now = (Instant::now(), stats.counters());
        let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let p99 = stats
            .p99_ms(Latency::Delivery)
            .map_or_else(String::new, |p| format!(" p99 {p:.1}ms"));
        let hub = hub.as_ref().map_or_else(String::new, |h| {
            format!(" | hub {:.0} MiB", h.rss() as f64 / (1 << 20) as f64)
        });
        let phase = phase.lock().unwrap_or_else(PoisonError::into_inner).clone();
        bar.set_message(format!(
            "{phase} | conns {} | deliv {:.0}/s{p99} | acks {:.0}/s | gaps {} dup {} err {}{hub}",
            stats.open.load(Ordering::Relaxed),
            rate(last.1.deliveries, now.1.deliveries),
            rate(last.1.acked, now.1.acked),
            stats.gaps.load(Ordering::Relaxed),
            stats.duplicates.load(Ordering::Relaxed),
            stats.errors.load(Ordering::Relaxed),
        ));
        bar.tick();
        last = now;
    }
}
