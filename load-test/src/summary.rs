//! `branchline-load summary DIR`: one table of every JSON report in a directory against the
//! performance targets of DESIGN.md, matched by the report's label (`make bench` names its
//! runs `fanout`, `light`, `publish`, `idle`, `catchup` and `reconnect-storm`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::report::{Report, bytes, thousands};

/// One target: what it promises and how a report is judged against it.
struct Target {
    label: &'static str,
    promise: &'static str,
    judge: fn(&Report) -> Option<(String, bool)>,
}

fn rate(v: f64) -> String {
    format!("{}/s", thousands(v.round() as u64))
}

fn opt_rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), rate)
}

const TARGETS: &[Target] = &[
    Target {
        label: "fanout",
        promise: ">= 500,000 deliveries/s",
        judge: |r| r.deliveries_per_s.map(|v| (rate(v), v >= 500_000.0)),
    },
    Target {
        label: "fanout",
        promise: "p99 publish->receive <= 25 ms",
        judge: |r| {
            r.latency_ms
                .map(|l| (format!("{:.2} ms", l.p99), l.p99 <= 25.0))
        },
    },
    Target {
        label: "light",
        promise: "100,000 deliveries/s",
        judge: |r| r.deliveries_per_s.map(|v| (rate(v), v >= 95_000.0)),
    },
    Target {
        label: "light",
        promise: "p50 <= 2 ms",
        judge: |r| {
            r.latency_ms
                .map(|l| (format!("{:.2} ms", l.p50), l.p50 <= 2.0))
        },
    },
    Target {
        label: "light",
        promise: "p99 <= 10 ms",
        judge: |r| {
            r.latency_ms
                .map(|l| (format!("{:.2} ms", l.p99), l.p99 <= 10.0))
        },
    },
    Target {
        label: "publish",
        promise: ">= 50,000 acked events/s",
        judge: |r| r.publishes_acked_per_s.map(|v| (rate(v), v >= 50_000.0)),
    },
    Target {
        label: "publish",
        promise: "p99 ack <= 20 ms",
        judge: |r| {
            r.ack_latency_ms
                .map(|l| (format!("{:.2} ms", l.p99), l.p99 <= 20.0))
        },
    },
    Target {
        label: "idle",
        promise: "<= 12 KiB hub RSS/connection",
        judge: |r| {
            r.hub_rss_per_connection_bytes
                .map(|b| (bytes(b), b <= 12.0 * 1024.0))
        },
    },
    Target {
        label: "catchup",
        promise: ">= 300,000 events/s replayed",
        judge: |r| r.catchup_events_per_s.map(|v| (rate(v), v >= 300_000.0)),
    },
    Target {
        label: "reconnect-storm",
        promise: "all caught up <= 5 s",
        judge: |r| {
            Some(match r.storm_catchup_s {
                Some(s) => (format!("{s:.2} s"), s <= 5.0),
                None => ("deadline missed".into(), false),
            })
        },
    },
    Target {
        label: "reconnect-storm",
        promise: "0 gaps, 0 duplicates",
        judge: |r| {
            Some((
                format!("{} gaps, {} dups", r.gaps, r.duplicates),
                r.gaps == 0 && r.duplicates == 0,
            ))
        },
    },
];

/// The outcome of a summary.
pub struct Summary {
    /// The table.
    pub table: String,
    /// Some run failed (a stream broke or a connection failed).
    pub failed_runs: usize,
    /// Targets missed.
    pub missed: usize,
}

/// Reads every `*.json` report in `dir` and judges them.
pub fn summarize(dir: &Path) -> anyhow::Result<Summary> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let reports = paths
        .iter()
        .map(|p| Report::read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(judge(&reports))
}

/// Judges `reports` against the targets.
pub fn judge(reports: &[Report]) -> Summary {
    let header = [
        "run",
        "target",
        "measured",
        "",
        "streams",
        "hub CPU",
        "hub RSS",
        "harness CPU",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    let (mut failed_runs, mut missed) = (0, 0);
    let cpu = |c: Option<f64>| c.map_or_else(|| "-".into(), |c| format!("{c:.0}%"));
    for r in reports {
        if !r.passed {
            failed_runs += 1;
        }
        let streams = if r.passed {
            "ok".to_owned()
        } else {
            format!(
                "FAIL g{} d{} e{} i{}",
                r.gaps, r.duplicates, r.errors, r.incomplete_streams
            )
        };
        let common = [
            streams,
            cpu(r.hub_cpu_percent),
            r.hub_rss_bytes
                .map_or_else(|| "-".into(), |b| bytes(b as f64)),
            cpu(r.harness_cpu_percent),
        ];
        let mut any = false;
        for t in TARGETS.iter().filter(|t| t.label == r.label) {
            any = true;
            let (measured, ok) = (t.judge)(r).unwrap_or_else(|| ("not measured".into(), false));
            if !ok {
                missed += 1;
            }
            let [a, b, c, d] = common.clone();
            rows.push([
                r.label.clone(),
                t.promise.into(),
                measured,
                if ok { "ok" } else { "MISS" }.into(),
                a,
                b,
                c,
                d,
            ]);
        }
        if !any {
            let [a, b, c, d] = common;
            rows.push([
                r.label.clone(),
                "(no target)".into(),
                format!(
                    "{} deliveries, {} acks",
                    opt_rate(r.deliveries_per_s),
                    opt_rate(r.publishes_acked_per_s)
                ),
                String::new(),
                a,
                b,
                c,
                d,
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    let line = |cells: &[String], out: &mut String| {
        let mut s = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(s, "{cell:<w$}  ");
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(&header.map(String::from), &mut table);
    line(&widths.map(|w| "-".repeat(w)), &mut table);
    for row in &rows {
        line(row, &mut table);
    }
    Summary {
        table,
        failed_runs,
        missed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{RunArgs, Scenario};
    use crate::report::REQUIRED_FIELDS;
    use crate::scenario::Params;
    use crate::stats::Percentiles;
    use clap::Parser;

    fn report(label: &str) -> Report {
        let args: RunArgs =
            crate::cli::Cli::parse_from(["branchline-load", "--scenario", "fanout"]).run;
        Report {
            scenario: label.into(),
            label: label.into(),
            passed: true,
            hub: "test".into(),
            duration_s: 10.0,
            connections: 1_001,
            deliveries: 6_000_000,
            deliveries_per_s: Some(600_000.0),
            publishes_acked: 6_000,
            publishes_acked_per_s: Some(600.0),
            publishes_rejected: 0,
            latency_ms: Some(Percentiles {
                p50: 1.0,
                p90: 5.0,
                p99: 30.0,
                p999: 40.0,
                max: 50.0,
                count: 6_000_000,
            }),
            ack_latency_ms: None,
            latency_split_ms: None,
            gaps: 0,
            missing_events: 0,
            duplicates: 0,
            errors: 0,
            incomplete_streams: 0,
            connect_retries: 0,
            hub_rss_bytes: Some(100 << 20),
            hub_rss_baseline_bytes: None,
            hub_rss_peak_bytes: None,
            hub_rss_per_connection_bytes: None,
            hub_rss_growth_bytes: None,
            harness_rss_per_connection_bytes: None,
            hub_cpu_percent: Some(120.0),
            harness_cpu_percent: Some(60.0),
            harness_rss_bytes: None,
            hub_metrics: None,
            catchup_events_per_s: None,
            storm_catchup_s: None,
            storm: None,
            timeline: Vec::new(),
            params: Params::resolve(Scenario::Fanout, &args),
            error_samples: Vec::new(),
        }
    }

    #[test]
    fn reports_are_judged_against_their_targets() {
        let s = judge(&[report("fanout")]);
        assert_eq!(
            s.missed, 1,
            "throughput met, p99 30 ms > 25 ms missed:\n{}",
            s.table
        );
        assert_eq!(s.failed_runs, 0);
        assert!(s.table.contains("600,000/s"), "{}", s.table);
        assert!(s.table.contains("MISS"));
    }

    #[test]
    fn broken_streams_fail_the_summary_and_unmeasured_targets_miss() {
        let mut storm = report("reconnect-storm");
        storm.passed = false;
        storm.gaps = 2;
        let s = judge(&[storm]);
        assert_eq!(s.failed_runs, 1);
        assert_eq!(s.missed, 2, "no storm time, and gaps:\n{}", s.table);
        assert!(s.table.contains("FAIL g2"));
    }

    #[test]
    fn reports_round_trip_through_json_with_nulls_for_what_was_not_measured() {
        let r = report("fanout");
        let json = serde_json::to_value(&r).unwrap();
        for field in REQUIRED_FIELDS.into_iter().chain(["harness_cpu_percent"]) {
            assert!(json.get(field).is_some(), "{field} missing");
        }
        assert!(json["storm_catchup_s"].is_null());
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(json["latency_ms"][p].is_number(), "{p}");
        }
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}
