//! Prometheus metrics, served at `/metrics`.
//!
//! Each hub has its own recorder (several hubs can run in one process, as tests do) and holds
//! its metric handles, so the hot path updates an atomic rather than looking a name up.

use std::time::Duration;

use branchline_protocol::http::PushResult;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// The hub's metrics.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Registers the counters made on first use (rejections by code).
    recorder: PrometheusRecorder,
    /// Open connections (WebSocket and HTTP).
    pub connections: Gauge,
    /// Live WebSocket sessions.
    pub sessions: Gauge,
    /// Rooms (branches with at least one live session).
    pub rooms: Gauge,
    /// Events queued for sessions (bounded by the per-session budget).
    pub queued_events: Gauge,
    publishes_accepted: Counter,
    publishes_duplicate: Counter,
    /// Events written to sessions.
    pub deliveries: Counter,
    /// Sessions cut over to catch-up from the log.
    pub catchups: Counter,
    /// Sessions closed as too slow.
    pub too_slow: Counter,
    /// Events read from the log for replay and catch-up.
    pub replayed: Counter,
    /// Connections refused with 503 (limit or storm).
    pub refused_connections: Counter,
    commit_ops: Histogram,
    commit_seconds: Histogram,
    store_errors: Counter,
}

const METRIC: Metadata<'static> = Metadata::new("branchline_hub", Level::INFO, None);
const PUBLISHES: &str = "branchline_publishes_total";

impl Metrics {
    /// A fresh set of metrics with its own recorder.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("branchline_commit_seconds".into()),
                &[
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("branchline_commit_ops".into()),
                    &[
                        1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
                    ],
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(e) => {
                tracing::warn!(error = %e, "metric buckets refused; using summaries");
                PrometheusBuilder::new().build_recorder()
            }
        };
        let counter =
            |name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)]| {
                describe(&recorder, name, help, Kind::Counter);
                recorder.register_counter(&key(name, labels), &METRIC)
            };
        let gauge = |name: &'static str, help: &'static str| {
            describe(&recorder, name, help, Kind::Gauge);
            recorder.register_gauge(&key(name, &[]), &METRIC)
        };
        let histogram = |name: &'static str, help: &'static str| {
            describe(&recorder, name, help, Kind::Histogram);
            recorder.register_histogram(&key(name, &[]), &METRIC)
        };
        let publishes = PUBLISHES;
        let help = "Publishes answered, by result (and, for rejections, by code)";
        Self {
            connections: gauge(
                "branchline_connections",
                "Open connections (WebSocket and HTTP)",
            ),
            sessions: gauge("branchline_sessions", "Live WebSocket sessions"),
            queued_events: gauge(
                "branchline_queued_events",
                "Events waiting in session queues",
            ),
            rooms: gauge(
                "branchline_rooms",
                "Branches with at least one live session",
            ),
            publishes_accepted: counter(publishes, help, &[("result", "accepted")]),
            publishes_duplicate: counter(publishes, help, &[("result", "duplicate")]),
            deliveries: counter(
                "branchline_deliveries_total",
                "Events written to sessions",
                &[],
            ),
            catchups: counter(
                "branchline_catchups_total",
                "Sessions cut over to catch-up from the log",
                &[],
            ),
            too_slow: counter(
                "branchline_too_slow_closes_total",
                "Sessions closed as too slow",
                &[],
            ),
            replayed: counter(
                "branchline_replayed_events_total",
                "Events read from the log for replay and catch-up",
                &[],
            ),
            refused_connections: counter(
                "branchline_refused_connections_total",
                "Connections answered 503 (connection limit or rate)",
                &[],
            ),
            commit_ops: histogram("branchline_commit_ops", "Writes per group commit"),
            commit_seconds: histogram(
                "branchline_commit_seconds",
                "Time to write and flush one group commit",
            ),
            store_errors: counter(
                "branchline_store_errors_total",
                "Failed store writes or flushes",
                &[],
            ),
            handle: recorder.handle(),
            recorder,
        }
    }

    /// Counts a publish as it is answered: `accepted` only once it is durable, `duplicate`,
    /// or `rejected` with its code.
    pub fn publish_answered(&self, answer: &PushResult) {
        match answer {
            PushResult::Accepted(a) if a.duplicate => self.publishes_duplicate.increment(1),
            PushResult::Accepted(_) => self.publishes_accepted.increment(1),
            PushResult::Rejected(r) => self
                .recorder
                .register_counter(
                    &key(
                        PUBLISHES,
                        &[("result", "rejected"), ("code", r.code.as_str())],
                    ),
                    &METRIC,
                )
                .increment(1),
        }
    }

    /// Records one group commit.
    pub fn commit(&self, took: Duration, ops: usize) {
        self.commit_seconds.record(took.as_secs_f64());
        self.commit_ops.record(ops as f64);
    }

    /// Counts a failed store write.
    pub fn store_error(&self) {
        self.store_errors.increment(1);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; run every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, *v))
            .collect::<Vec<_>>(),
    )
}

fn describe(recorder: &PrometheusRecorder, name: &'static str, help: &'static str, kind: Kind) {
    let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
    match kind {
        Kind::Counter => recorder.describe_counter(name, None::<Unit>, help),
        Kind::Gauge => recorder.describe_gauge(name, None, help),
        Kind::Histogram => recorder.describe_histogram(name, None, help),
    }
}
