//! The report of a run: the JSON written with `--report` (fields named like the load tools
//! people already read; `null` where a scenario does not measure something) and the human
//! table printed at the end.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::scenario::Params;
use crate::stats::Percentiles;

/// What a reconnect storm measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StormDetail {
    /// Seconds from the reconnect signal until the last follower was caught up (`None` if
    /// not all were within the deadline).
    pub catchup_s: Option<f64>,
    /// Followers dropped.
    pub followers: u64,
    /// Followers that reconnected and caught up.
    pub reconnected: u64,
    /// The fewest events a follower was behind when it resumed.
    pub min_behind: Option<u64>,
    /// Per-follower time from the reconnect signal to `caught_up`.
    pub catchup_ms: Option<Percentiles>,
}

/// What the hub's own `/metrics` said about the measured window (differences of its
/// counters; the hub folds histogram samples in every few seconds, so commit figures are
/// approximate over short windows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HubMetrics {
    /// Group commits per second.
    pub commits_per_s: f64,
    /// Mean time to write and flush one group commit, ms.
    pub commit_ms_mean: Option<f64>,
    /// Mean store writes per group commit.
    pub ops_per_commit: Option<f64>,
    /// Sessions cut over from live delivery to catch-up from the log (slow consumers).
    pub catchups: u64,
    /// Sessions closed as too slow.
    pub too_slow_closes: u64,
    /// Connections refused with 503.
    pub refused_connections: u64,
    /// Events replayed from the log.
    pub replayed_events: u64,
}

/// Publish→receive latency split where the hub sequenced the event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencySplit {
    /// Intended send time → sent: the harness's own lateness (included in `to_sequenced`).
    pub send_lag: Option<Percentiles>,
    /// Publish (intended time) → sequenced: the harness's send, the hub reading the frame,
    /// the branch writer.
    pub to_sequenced: Option<Percentiles>,
    /// Sequenced → received: group commit and flush, fan-out, the harness reading.
    pub from_sequenced: Option<Percentiles>,
}

/// One second of the measured window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the window opened (end of this tick).
    pub t_s: f64,
    /// Deliveries per second in this tick.
    pub deliveries_per_s: f64,
    /// Acks per second in this tick.
    pub acks_per_s: f64,
    /// Publish→receive latency of the events received in this tick.
    pub latency_ms: Option<Percentiles>,
    /// Ack latency of the publishes answered in this tick.
    pub ack_latency_ms: Option<Percentiles>,
    /// Sessions open.
    pub connections: u64,
    /// Hub RSS, bytes.
    pub hub_rss_bytes: Option<u64>,
    /// Hub CPU in this tick, percent of one core.
    pub hub_cpu_percent: Option<f64>,
}

/// The fields every JSON report carries, `null` where the run did not measure them: what
/// scripts reading reports rely on (issue 7 fixed these names).
pub const REQUIRED_FIELDS: [&str; 15] = [
    "scenario",
    "duration_s",
    "connections",
    "deliveries_per_s",
    "publishes_acked_per_s",
    "latency_ms",
    "ack_latency_ms",
    "gaps",
    "duplicates",
    "errors",
    "hub_rss_bytes",
    "hub_rss_per_connection_bytes",
    "hub_cpu_percent",
    "catchup_events_per_s",
    "storm_catchup_s",
];

/// One run's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// The run's name (`--label`, else the scenario).
    pub label: String,
    /// No gap, duplicate, error or incomplete stream.
    pub passed: bool,
    /// The hub under test.
    pub hub: String,
    /// Length of the measured window (catch-up time for `catchup`), seconds.
    pub duration_s: f64,
    /// The most sessions open at once during the measured window (what actually opened, not
    /// what was planned).
    pub connections: u64,
    /// Events received by followers in the window.
    pub deliveries: u64,
    /// `deliveries` per second; `None` where nothing is delivered to followers (`publish`,
    /// `idle`).
    pub deliveries_per_s: Option<f64>,
    /// Publishes acknowledged in the window.
    pub publishes_acked: u64,
    /// `publishes_acked` per second; `None` where no session publishes (`idle`, `catchup`).
    pub publishes_acked_per_s: Option<f64>,
    /// Publishes rejected as expected under load (`rate_limited`) in the window.
    pub publishes_rejected: u64,
    /// Publish (intended time) → receive, for followers: every delivery of the events meant
    /// to be sent inside the window, also those received only after it closed.
    pub latency_ms: Option<Percentiles>,
    /// Publish (intended time with `--rate`, else first send time) → `accepted`, for the
    /// publishes meant to be sent inside the window (a rejected and resent one from its first
    /// intended time).
    pub ack_latency_ms: Option<Percentiles>,
    /// `latency_ms` split at the moment the hub sequenced the event (its `server_time_ms`),
    /// for a hub on this machine: where the time goes. Millisecond resolution.
    pub latency_split_ms: Option<LatencySplit>,
    /// Gaps in any stream, over the whole run.
    pub gaps: u64,
    /// Events those gaps skipped.
    pub missing_events: u64,
    /// Duplicate or reordered events, over the whole run.
    pub duplicates: u64,
    /// Other failures, over the whole run.
    pub errors: u64,
    /// Followers that did not receive everything up to the final head in time.
    pub incomplete_streams: u64,
    /// Connection attempts refused with 503 and retried.
    pub connect_retries: u64,
    /// Hub RSS at the end of the window, bytes.
    pub hub_rss_bytes: Option<u64>,
    /// Hub RSS before the sessions connected, bytes.
    pub hub_rss_baseline_bytes: Option<u64>,
    /// Largest hub RSS seen, bytes.
    pub hub_rss_peak_bytes: Option<u64>,
    /// `idle`: hub RSS growth per session once settled, bytes.
    pub hub_rss_per_connection_bytes: Option<f64>,
    /// `mixed`/`soak`: hub RSS change over the window, bytes.
    pub hub_rss_growth_bytes: Option<i64>,
    /// `idle`: harness RSS growth per session, bytes.
    pub harness_rss_per_connection_bytes: Option<f64>,
    /// Hub CPU over the window, percent of one core.
    pub hub_cpu_percent: Option<f64>,
    /// Harness CPU over the window, percent of one core.
    pub harness_cpu_percent: Option<f64>,
    /// Harness RSS at the end, bytes.
    pub harness_rss_bytes: Option<u64>,
    /// The hub's own metrics over the window, if it serves `/metrics`.
    pub hub_metrics: Option<HubMetrics>,
    /// `catchup`: events replayed per second until caught up.
    pub catchup_events_per_s: Option<f64>,
    /// `reconnect-storm`: seconds until every follower was caught up.
    pub storm_catchup_s: Option<f64>,
    /// `reconnect-storm` details.
    pub storm: Option<StormDetail>,
    /// The measured window second by second.
    pub timeline: Vec<Tick>,
    /// The parameters used.
    pub params: Params,
    /// The first error messages.
    pub error_samples: Vec<String>,
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as KiB/MiB/GiB.
pub fn bytes(n: f64) -> String {
    let (v, unit) = if n >= (1u64 << 30) as f64 {
        (n / (1u64 << 30) as f64, "GiB")
    } else if n >= (1 << 20) as f64 {
        (n / (1 << 20) as f64, "MiB")
    } else if n >= 1024.0 {
        (n / 1024.0, "KiB")
    } else {
        (n, "B")
    };
    format!("{v:.1} {unit}")
}

fn percentiles(p: Option<&Percentiles>) -> String {
    p.map_or_else(
        || "-".into(),
        |p| {
            format!(
                "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
                p.p50,
                p.p90,
                p.p99,
                p.p999,
                p.max,
                thousands(p.count)
            )
        },
    )
}

impl Report {
    /// Writes the JSON report.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a JSON report.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            ("scenario", format!("{} ({})", self.label, self.scenario)),
            ("target", self.hub.clone()),
            ("duration", format!("{:.2} s", self.duration_s)),
            ("connections", thousands(self.connections)),
        ];
        if let Some(rate) = self.deliveries_per_s {
            rows.push((
                "deliveries",
                format!(
                    "{}  ({}/s)",
                    thousands(self.deliveries),
                    thousands(rate.round() as u64)
                ),
            ));
        }
        if self.latency_ms.is_some() {
            rows.push(("latency ms", percentiles(self.latency_ms.as_ref())));
        }
        if let Some(split) = &self.latency_split_ms {
            rows.push(("  harness send lag", percentiles(split.send_lag.as_ref())));
            rows.push(("  to sequenced", percentiles(split.to_sequenced.as_ref())));
            rows.push((
                "  sequenced to recv",
                percentiles(split.from_sequenced.as_ref()),
            ));
        }
        if let Some(rate) = self.publishes_acked_per_s {
            rows.push((
                "publishes acked",
                format!(
                    "{}  ({}/s), rejected {}",
                    thousands(self.publishes_acked),
                    thousands(rate.round() as u64),
                    thousands(self.publishes_rejected)
                ),
            ));
            if self.ack_latency_ms.is_some() {
                rows.push(("ack latency ms", percentiles(self.ack_latency_ms.as_ref())));
            }
        }
        if let Some(rate) = self.catchup_events_per_s {
            rows.push(("catch-up", format!("{}/s", thousands(rate.round() as u64))));
        }
        if let Some(storm) = &self.storm {
            rows.push((
                "storm",
                format!(
                    "{} of {} caught up in {}, at least {} behind",
                    storm.reconnected,
                    storm.followers,
                    storm
                        .catchup_s
                        .map_or_else(|| "(deadline missed)".into(), |s| format!("{s:.2} s")),
                    storm.min_behind.map_or_else(|| "-".into(), thousands)
                ),
            ));
            rows.push(("per follower ms", percentiles(storm.catchup_ms.as_ref())));
        }
        if let Some(b) = self.hub_rss_per_connection_bytes {
            rows.push(("hub RSS/conn", bytes(b)));
        }
        if let Some(b) = self.harness_rss_per_connection_bytes {
            rows.push(("harness RSS/conn", bytes(b)));
        }
        let opt_bytes = |b: Option<u64>| b.map_or_else(|| "-".into(), |b| bytes(b as f64));
        let opt_cpu = |c: Option<f64>| c.map_or_else(|| "-".into(), |c| format!("{c:.0}%"));
        rows.push((
            "hub",
            format!(
                "RSS {} (baseline {}, peak {}), CPU {}",
                opt_bytes(self.hub_rss_bytes),
                opt_bytes(self.hub_rss_baseline_bytes),
                opt_bytes(self.hub_rss_peak_bytes),
                opt_cpu(self.hub_cpu_percent)
            ),
        ));
        let worst = self
            .timeline
            .iter()
            .filter_map(|t| Some((t.t_s, t.latency_ms.or(t.ack_latency_ms)?)))
            .max_by(|a, b| a.1.p99.total_cmp(&b.1.p99));
        if let Some((t, p)) = worst {
            rows.push((
                "worst second",
                format!(
                    "p99 {:.2} ms, max {:.2} ms (second ending at {t:.0} s of {})",
                    p.p99,
                    p.max,
                    self.timeline.len()
                ),
            ));
        }
        if let Some(m) = self.hub_metrics.as_ref().filter(|m| {
            m.commits_per_s > 0.0
                || m.catchups + m.too_slow_closes + m.refused_connections + m.replayed_events > 0
        }) {
            let opt = |v: Option<f64>, unit: &str| {
                v.map_or_else(|| "-".into(), |v| format!("{v:.2}{unit}"))
            };
            rows.push((
                "hub commits",
                format!(
                    "{:.0}/s, {} each, {} writes each; replayed {}, catch-up cut-overs {}, \
                     too slow {}, 503s {}",
                    m.commits_per_s,
                    opt(m.commit_ms_mean, " ms"),
                    opt(m.ops_per_commit, ""),
                    thousands(m.replayed_events),
                    m.catchups,
                    m.too_slow_closes,
                    m.refused_connections
                ),
            ));
        }
        if let Some(g) = self.hub_rss_growth_bytes {
            rows.push((
                "hub RSS growth",
                format!(
                    "{}{}",
                    if g < 0 { "-" } else { "+" },
                    bytes(g.unsigned_abs() as f64)
                ),
            ));
        }
        rows.push((
            "harness",
            format!(
                "RSS {}, CPU {}",
                opt_bytes(self.harness_rss_bytes),
                opt_cpu(self.harness_cpu_percent)
            ),
        ));
        rows.push((
            "streams",
            format!(
                "gaps {} ({} events missing), duplicates {}, incomplete {}, errors {}, 503 retries {}",
                self.gaps,
                self.missing_events,
                self.duplicates,
                self.incomplete_streams,
                self.errors,
                self.connect_retries
            ),
        ));
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<18} {v}");
        }
        for e in &self.error_samples {
            let _ = writeln!(out, "  ! {e}");
        }
        let _ = writeln!(
            out,
            "  {:<18} {}",
            "verdict",
            if self.passed {
                "PASS"
            } else {
                "FAIL (a stream broke or a connection failed)"
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(512_345_678), "512,345,678");
        assert_eq!(bytes(9.0 * 1024.0), "9.0 KiB");
        assert_eq!(bytes(3.5 * (1 << 20) as f64), "3.5 MiB");
    }
}
