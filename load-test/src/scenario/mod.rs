//! Scenarios and what they share: resolved parameters ([`Params`]), the run environment
//! ([`Env`]: the hub, the sessions, the measured window, draining and shutdown) and the
//! report they produce.
//!
//! Every scenario follows the same shape: connect (paced below the hub's connection-rate
//! limit), warm up, open a measured [`Window`], run, close it, stop publishing, drain (every
//! follower must receive every event up to the final head of its branch), stop, report.
//!
//! Rates count what arrived inside the window. Latencies count the events *meant to be sent*
//! inside it, including the answers that arrive only during the drain (see [`crate::stats`]).

mod catchup;
mod fanout;
mod idle;
mod mixed;
mod publish;
mod storm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use branchline_protocol::{Name, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cli::{RunArgs, Scenario};
use crate::client::{self, Link, Plan, Shared, Signal};
use crate::clock;
use crate::connect::{Pacer, Sources};
use crate::follow::Probe;
use crate::hub::Target;
use crate::progress::Progress;
use crate::report::{HubMetrics, LatencySplit, Report, StormDetail, Tick};
use crate::seed::Http;
use crate::stats::{Counters, Latency, Stats};
use crate::usage::{self, ProcWatch, Usage};

/// A run's parameters after defaults, as recorded in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Branches.
    pub branches: usize,
    /// Followers in all (admins in `mixed`/`soak`).
    pub subscribers: usize,
    /// Publishers per branch.
    pub publishers: usize,
    /// Events per second per branch; `None`: as fast as acks allow.
    pub rate: Option<f64>,
    /// Padding bytes per `custom` event.
    pub payload_bytes: usize,
    /// Measured / hold / deadline time, seconds.
    pub duration_s: f64,
    /// Warm-up, seconds.
    pub warmup_s: f64,
    /// Idle sessions.
    pub connections: usize,
    /// Events behind.
    pub behind: u64,
    /// Unanswered publishes per publisher (the load without a rate, a cap with one).
    pub inflight: usize,
    /// Reconnect jitter, seconds.
    pub jitter_s: f64,
    /// New connections per second during setup.
    pub connect_rate: u32,
    /// Idle settle time, seconds.
    pub settle_s: f64,
    /// Drain deadline, seconds.
    pub drain_timeout_s: f64,
    /// Follower ack interval, seconds (0: never).
    pub ack_every_s: f64,
    /// WebSocket read buffer per connection, bytes.
    pub read_buffer: usize,
    /// Loopback source addresses used.
    pub source_ips: usize,
}

impl Params {
    /// `args` over the defaults of `scenario`.
    pub fn resolve(scenario: Scenario, args: &RunArgs) -> Self {
        use Scenario::*;
        let secs = |d: Option<Duration>, default: f64| d.map_or(default, |d| d.as_secs_f64());
        let branches = args.branches.unwrap_or(match scenario {
            Fanout | Catchup => 1,
            Publish | ReconnectStorm => 10,
            Idle => 100,
            Mixed => 20,
            Soak => 50,
        });
        let rate = args.rate.or(match scenario {
            Fanout => Some(1_000.0),
            Publish => None,
            ReconnectStorm => Some(5.0),
            Mixed | Soak => Some(2.0),
            Idle | Catchup => None,
        });
        // One publisher keeps well under the hub's 2,000/s per-session publish limit.
        let publishers = args.publishers.unwrap_or(match scenario {
            Publish => 10,
            Mixed | Soak => 4,
            _ => rate.map_or(1, |r| (r / 1_000.0).ceil().max(1.0) as usize),
        });
        let connections = args.connections.unwrap_or(1_000);
        let subscribers = args.subscribers.unwrap_or(match scenario {
            Fanout => 100,
            ReconnectStorm => 1_000,
            Mixed | Soak => 2,
            Catchup => 1,
            Publish | Idle => 0,
        });
        Self {
            branches: branches.max(1),
            subscribers,
            publishers: publishers.max(1),
            rate,
            payload_bytes: args.payload_bytes.unwrap_or(64),
            duration_s: secs(
                args.duration,
                match scenario {
                    Fanout | Publish => 10.0,
                    Idle => 20.0,
                    Catchup | ReconnectStorm => 60.0,
                    Mixed => 60.0,
                    Soak => 600.0,
                },
            ),
            warmup_s: secs(
                args.warmup,
                match scenario {
                    ReconnectStorm => 3.0,
                    Idle | Catchup => 0.0,
                    _ => 2.0,
                },
            ),
            connections,
            behind: args.behind.unwrap_or(match scenario {
                Catchup => 100_000,
                _ => 100,
            }),
            // Without a rate the window is the load; with one it only caps the backlog a slow
            // hub may hold, generously enough that a healthy hub never meets it.
            inflight: args
                .inflight
                .unwrap_or(if rate.is_some() { 128 } else { 8 })
                .max(1),
            jitter_s: secs(args.jitter, 1.0),
            connect_rate: args.connect_rate.unwrap_or(1_500),
            settle_s: secs(args.settle, 5.0),
            drain_timeout_s: secs(args.drain_timeout, 15.0),
            ack_every_s: secs(args.ack_every, if scenario == Idle { 0.0 } else { 1.0 }),
            read_buffer: args.read_buffer.unwrap_or(match scenario {
                Catchup => 256 << 10,
                _ => 4 << 10,
            }),
            source_ips: 0,
        }
    }

    /// Sessions the scenario opens, for spreading source addresses.
    fn sessions(&self, scenario: Scenario) -> usize {
        match scenario {
            Scenario::Idle => self.connections,
            Scenario::Publish => self.branches * self.publishers,
            Scenario::Mixed | Scenario::Soak => self.branches * self.publishers + self.subscribers,
            // Storms reconnect everyone once: twice the sockets.
            Scenario::ReconnectStorm => 2 * self.subscribers + self.branches * self.publishers,
            Scenario::Fanout | Scenario::Catchup => {
                self.subscribers + self.branches * self.publishers
            }
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }
}

/// A measured window's start.
pub struct Window {
    at: Instant,
    counters: Counters,
    hub: Option<Usage>,
    me: Option<Usage>,
    metrics: Option<HashMap<String, f64>>,
    timeline: Arc<Mutex<Vec<Tick>>>,
    sampler: tokio::task::JoinHandle<()>,
}

/// What happened inside a window.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// Its length.
    pub duration: Duration,
    /// The most sessions open at once in it.
    pub connections: u64,
    /// Deliveries in it.
    pub deliveries: u64,
    /// Acks in it.
    pub acked: u64,
    /// Rejections (expected ones) in it.
    pub rejected: u64,
    /// Hub CPU, percent of a core.
    pub hub_cpu: Option<f64>,
    /// Harness CPU, percent of a core.
    pub harness_cpu: Option<f64>,
    /// Hub RSS at the end.
    pub hub_rss: Option<u64>,
    /// Hub RSS at the start.
    pub hub_rss_start: Option<u64>,
    /// The hub's `/metrics` over the window.
    pub hub_metrics: Option<HubMetrics>,
    /// Second by second.
    pub timeline: Vec<Tick>,
}

/// Appends one [`Tick`] per second of the window to `timeline`.
async fn sample_ticks(
    stats: Arc<Stats>,
    hub: Option<Arc<ProcWatch>>,
    start: Instant,
    timeline: Arc<Mutex<Vec<Tick>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (
        Instant::now(),
        stats.counters(),
        hub.as_ref().and_then(|h| h.refresh()),
    );
    loop {
        tick.tick().await;
        let now = (
            Instant::now(),
            stats.counters(),
            hub.as_ref().and_then(|h| h.refresh()),
        );
        let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-9);
        let cpu = match (last.2, now.2) {
            (Some(a), Some(b)) => Some(usage::cpu_percent(a, b, now.0.duration_since(last.0))),
            _ => None,
        };
        let t = Tick {
            t_s: now.0.duration_since(start).as_secs_f64(),
            deliveries_per_s: (now.1.deliveries - last.1.deliveries) as f64 / secs,
            acks_per_s: (now.1.acked - last.1.acked) as f64 / secs,
            latency_ms: stats.take_recent(Latency::Delivery),
            ack_latency_ms: stats.take_recent(Latency::Ack),
            connections: stats.open.load(Ordering::Relaxed),
            hub_rss_bytes: now.2.map(|u| u.rss_bytes),
            hub_cpu_percent: cpu,
        };
        timeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(t);
        last = now;
    }
}

/// The hub's counters between two scrapes of `/metrics`.
fn hub_metrics(a: &HashMap<String, f64>, b: &HashMap<String, f64>, over: Duration) -> HubMetrics {
    let delta = |name: &str| {
        (b.get(name).copied().unwrap_or(0.0) - a.get(name).copied().unwrap_or(0.0)).max(0.0)
    };
    let commits = delta("branchline_commit_seconds_count");
    let per_commit = |total: f64| (commits > 0.0).then(|| total / commits);
    HubMetrics {
        commits_per_s: commits / over.as_secs_f64().max(1e-9),
        commit_ms_mean: per_commit(delta("branchline_commit_seconds_sum") * 1_000.0),
        ops_per_commit: per_commit(delta("branchline_commit_ops_sum")),
        catchups: delta("branchline_catchups_total") as u64,
        too_slow_closes: delta("branchline_too_slow_closes_total") as u64,
        refused_connections: delta("branchline_refused_connections_total") as u64,
        replayed_events: delta("branchline_replayed_events_total") as u64,
    }
}

/// What a scenario adds to the common report.
#[derive(Default)]
pub struct Outcome {
    measured: Measured,
    /// Whether followers received published events (else `deliveries_per_s` is null).
    deliveries: bool,
    /// Whether the scenario publishes over sessions (else `publishes_acked_per_s` is null).
    acks: bool,
    latency: bool,
    ack_latency: bool,
    catchup_events_per_s: Option<f64>,
    storm: Option<StormDetail>,
    rss_per_connection: Option<f64>,
    harness_rss_per_connection: Option<f64>,
    rss_growth: Option<i64>,
}

struct Follower {
    probe: Arc<Probe>,
    branches: Vec<usize>,
}

impl Follower {
    /// The first followed branch (`(index in the plan, branch index)`) on which it holds less
    /// than `heads` say was acknowledged, whether or not its session is still running.
    fn behind(&self, heads: &[u64]) -> Option<(usize, usize)> {
        self.branches
            .iter()
            .enumerate()
            .find(|&(i, &b)| self.probe.last(i) < heads.get(b).copied().unwrap_or(0))
            .map(|(i, &b)| (i, b))
    }
}

/// Whether some follower is still running and short of a head (worth waiting for). One whose
/// session ended will not move any more.
fn still_draining(followers: &[Follower], heads: &[u64]) -> bool {
    followers
        .iter()
        .any(|f| !f.probe.done.load(Ordering::Acquire) && f.behind(heads).is_some())
}

/// The followers short of a head, running or not, with where: `(follower, index in its plan,
/// branch)`.
fn incomplete_streams<'a>(
    followers: &'a [Follower],
    heads: &'a [u64],
) -> impl Iterator<Item = (&'a Follower, usize, usize)> + 'a {
    followers
        .iter()
        .filter_map(|f| f.behind(heads).map(|(i, b)| (f, i, b)))
}

/// The environment of one run.
pub struct Env {
    scenario: Scenario,
    label: String,
    p: Params,
    target: Target,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    signal: watch::Sender<Signal>,
    progress: Progress,
    hub: Option<Arc<ProcWatch>>,
    http: Http,
    run_id: String,
    tasks: JoinSet<()>,
    heads: Vec<Arc<AtomicU64>>,
    followers: Vec<Follower>,
    publishers: Vec<Arc<Probe>>,
    baseline_rss: Option<u64>,
    hub_gone: AtomicBool,
}

impl Env {
    fn new(scenario: Scenario, args: &RunArgs, target: Target) -> anyhow::Result<Self> {
        let mut p = Params::resolve(scenario, args);
        let stats = Arc::new(Stats::new());
        let sources = Sources::new(target.endpoint.addr, p.sessions(scenario), args.source_ips);
        p.source_ips = sources.count();
        let (signal, rx) = watch::channel(Signal::default());
        let shared = Arc::new(Shared {
            endpoint: target.endpoint.clone(),
            tenant: target.tenant.clone(),
            stats: stats.clone(),
            sources,
            pacer: Pacer::new(p.connect_rate),
            signal: rx,
            ack_every: (p.ack_every_s > 0.0).then(|| Duration::from_secs_f64(p.ack_every_s)),
            jitter: Duration::from_secs_f64(p.jitter_s),
        });
        let hub = target.pid.map(ProcWatch::spawn);
        let progress = Progress::start(scenario.name(), stats.clone(), hub.clone());
        let http = Http::new(&target.endpoint.http_url, target.tenant.clone())?;
        let heads = (0..p.branches)
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        Ok(Self {
            scenario,
            label: args
                .label
                .clone()
                .unwrap_or_else(|| scenario.name().to_owned()),
            baseline_rss: hub.as_ref().map(|h| h.rss()),
            p,
            target,
            stats,
            shared,
            signal,
            progress,
            hub,
            http,
            run_id: format!("{:08x}", rand::random::<u32>()),
            tasks: JoinSet::new(),
            heads,
            followers: Vec::new(),
            publishers: Vec::new(),
            hub_gone: AtomicBool::new(false),
        })
    }

    /// The name of branch `i` of this run (fresh per run, so runs never collide on one hub).
    fn branch(&self, i: usize) -> Name {
        Name::new(format!("r{}-b{i}", self.run_id)).expect("run branch names are valid")
    }

    fn device(&self, kind: &str, i: usize) -> Name {
        Name::new(format!("{kind}-{i}")).expect("device names are valid")
    }

    /// A cashier token for `device` on `branches`.
    fn cashier(&self, device: &Name, branches: &[Name]) -> anyhow::Result<String> {
        self.target.token(device, Some(branches), Role::Cashier)
    }

    /// An admin token for every branch.
    fn admin(&self, device: &Name) -> anyhow::Result<String> {
        self.target.token(device, None, Role::Admin)
    }

    /// Starts a session following `follows` (branch indices) as planned.
    fn follower(&mut self, plan: Plan, follows: Vec<usize>) -> Arc<Probe> {
        let probe = Arc::new(Probe::new(plan.follow.len()));
        self.followers.push(Follower {
            probe: probe.clone(),
            branches: follows,
        });
        self.tasks
            .spawn(client::run(self.shared.clone(), plan, probe.clone()));
        probe
    }

    /// Starts a session that publishes (and may follow `follows` too).
    fn publisher(&mut self, plan: Plan, follows: Vec<usize>) -> Arc<Probe> {
        let probe = if follows.is_empty() {
            let probe = Arc::new(Probe::new(0));
            self.tasks
                .spawn(client::run(self.shared.clone(), plan, probe.clone()));
            probe
        } else {
            self.follower(plan, follows)
        };
        self.publishers.push(probe.clone());
        probe
    }

    fn set_signal(&self, f: impl FnOnce(&mut Signal)) {
        self.signal.send_modify(f);
    }

    /// Whether the spawned hub died; counted once as an error.
    fn hub_died(&self) -> bool {
        match &self.hub {
            Some(h) if !h.alive() => {
                if !self.hub_gone.swap(true, Ordering::Relaxed) {
                    self.stats
                        .error(format!("the hub process {} is gone", h.pid));
                }
                true
            }
            _ => false,
        }
    }

    /// Polls `done` every 50 ms until it holds, `timeout` passes or the hub dies.
    async fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline || self.hub_died() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sleeps `d`, showing `phase` (returns early if the hub dies).
    async fn hold(&self, phase: &str, d: Duration) {
        self.progress.phase(phase);
        self.wait_until(d, |_| false).await;
    }

    /// Waits until every session started so far is open (or has failed).
    async fn connected(&self, what: &str) -> anyhow::Result<()> {
        let probes: Vec<Arc<Probe>> = self
            .followers
            .iter()
            .map(|f| f.probe.clone())
            .chain(self.publishers.iter().cloned())
            .collect();
        let n = probes.len();
        let timeout = Duration::from_secs_f64(n as f64 / f64::from(self.p.connect_rate.max(1)))
            + Duration::from_secs(30);
        let progress = &self.progress;
        let ok = self
            .wait_until(timeout, |_| {
                let up = probes
                    .iter()
                    .filter(|p| p.connected.load(Ordering::Acquire))
                    .count();
                let failed = probes
                    .iter()
                    .filter(|p| p.done.load(Ordering::Acquire))
                    .count();
                progress.phase(format!("connecting {what} {up}/{n}"));
                up + failed >= n
            })
            .await;
        if !ok {
            anyhow::bail!("{what}: not every session connected within {timeout:?}");
        }
        Ok(())
    }

    fn usage_now(&self) -> (Option<Usage>, Option<Usage>) {
        let hub = self.hub.as_ref().and_then(|h| h.refresh());
        let me = usage::sample(std::process::id()).ok();
        (hub, me)
    }

    /// Starts measuring (and recording the latencies of events meant to be sent from now on
    /// if `latencies`).
    async fn open_window(&self, latencies: bool) -> Window {
        let metrics = self.http.metrics().await.ok();
        let (hub, me) = self.usage_now();
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let at = Instant::now();
        if latencies {
            self.stats.open_latency_window(clock::ns_at(at));
        }
        let _ = self.stats.take_recent(Latency::Delivery);
        let _ = self.stats.take_recent(Latency::Ack);
        self.stats.reset_peak_open();
        let sampler = tokio::spawn(sample_ticks(
            self.stats.clone(),
            self.hub.clone(),
            at,
            timeline.clone(),
        ));
        Window {
            at,
            counters: self.stats.counters(),
            hub,
            me,
            metrics,
            timeline,
            sampler,
        }
    }

    /// Stops measuring. Events meant to be sent before now still have their latencies
    /// recorded when their answers arrive later, until the sessions stop.
    async fn close_window(&self, w: Window) -> Measured {
        w.sampler.abort();
        let end = Instant::now();
        self.stats.close_latency_window(clock::ns_at(end));
        let duration = end.duration_since(w.at);
        let counters = self.stats.counters();
        let connections = self.stats.peak_open.load(Ordering::Acquire);
        let (hub, me) = self.usage_now();
        let hub_metrics = match (&w.metrics, self.http.metrics().await.ok()) {
            (Some(a), Some(b)) => Some(hub_metrics(a, &b, duration)),
            _ => None,
        };
        let cpu = |a: Option<Usage>, b: Option<Usage>| Some(usage::cpu_percent(a?, b?, duration));
        Measured {
            duration,
            connections,
            deliveries: counters.deliveries - w.counters.deliveries,
            acked: counters.acked - w.counters.acked,
            rejected: counters.rejected - w.counters.rejected,
            hub_cpu: cpu(w.hub, hub),
            harness_cpu: cpu(w.me, me),
            hub_rss: hub.map(|u| u.rss_bytes),
            hub_rss_start: w.hub.map(|u| u.rss_bytes),
            hub_metrics,
            timeline: std::mem::take(
                &mut *w.timeline.lock().unwrap_or_else(PoisonError::into_inner),
            ),
        }
    }

    /// Stops publishing, waits for the last answers, then for every follower to receive every
    /// event up to its branches' final heads. Followers that do not — including those whose
    /// session ended short of a head — are incomplete streams (errors).
    async fn drain(&self) -> u64 {
        self.progress.phase("draining");
        self.set_signal(|s| s.publishing = false);
        let publishers = self.publishers.clone();
        let answered = self
            .wait_until(Duration::from_secs(30), |_| {
                publishers.iter().all(|p| {
                    p.inflight.load(Ordering::Acquire) == 0 || p.done.load(Ordering::Acquire)
                })
            })
            .await;
        if !answered {
            let unanswered: u64 = publishers
                .iter()
                .map(|p| p.inflight.load(Ordering::Acquire))
                .sum();
            self.stats.error(format!(
                "{unanswered} publishes still unanswered 30 s after publishing stopped"
            ));
        }
        let heads: Vec<u64> = self
            .heads
            .iter()
            .map(|h| h.load(Ordering::Acquire))
            .collect();
        let timeout = Duration::from_secs_f64(self.p.drain_timeout_s);
        self.wait_until(timeout, |env| !still_draining(&env.followers, &heads))
            .await;
        let mut incomplete = 0;
        for (f, i, b) in incomplete_streams(&self.followers, &heads) {
            incomplete += 1;
            let ended = if f.probe.done.load(Ordering::Acquire) {
                " (its session ended)"
            } else {
                ""
            };
            self.stats.error(format!(
                "incomplete stream on {}: received up to {} of {} within {timeout:?}{ended}",
                self.branch(b),
                f.probe.last(i),
                heads[b]
            ));
        }
        incomplete
    }

    /// Tells every session to stop and waits for them.
    async fn stop_sessions(&mut self) {
        self.progress.phase("stopping");
        self.set_signal(|s| {
            s.stop = true;
            s.publishing = false;
            s.link = Link::Up;
        });
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(15), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }

    /// Builds the report, stops the hub if the harness started it.
    async fn finish(mut self, outcome: Outcome, incomplete: u64) -> anyhow::Result<Report> {
        self.stop_sessions().await;
        let hub_peak = self.hub.as_ref().map(|h| h.peak());
        let harness_rss = usage::sample(std::process::id()).ok().map(|u| u.rss_bytes);
        let hub_description = self.target.describe();
        if let Some(hub) = self.target.spawned.take() {
            if let Err(e) = hub.stop().await {
                self.stats.error(format!("{e:#}"));
            }
        }
        self.progress.finish();
        let s = &self.stats;
        let m = outcome.measured;
        let hub_metrics = m.hub_metrics.clone();
        let timeline = m.timeline.clone();
        let secs = m.duration.as_secs_f64().max(1e-9);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let passed = s.failures() == 0 && incomplete == 0;
        Ok(Report {
            scenario: self.scenario.name().to_owned(),
            label: self.label,
            passed,
            hub: hub_description,
            duration_s: m.duration.as_secs_f64(),
            connections: m.connections,
            deliveries: m.deliveries,
            deliveries_per_s: outcome.deliveries.then(|| m.deliveries as f64 / secs),
            publishes_acked: m.acked,
            publishes_acked_per_s: outcome.acks.then(|| m.acked as f64 / secs),
            publishes_rejected: m.rejected,
            latency_ms: outcome
                .latency
                .then(|| s.percentiles(Latency::Delivery))
                .flatten(),
            ack_latency_ms: outcome
                .ack_latency
                .then(|| s.percentiles(Latency::Ack))
                .flatten(),
            latency_split_ms: (outcome.latency && self.target.endpoint.addr.ip().is_loopback())
                .then(|| LatencySplit {
                    send_lag: s.percentiles(Latency::SendLag),
                    to_sequenced: s.percentiles(Latency::ToSequenced),
                    from_sequenced: s.percentiles(Latency::FromSequenced),
                }),
            gaps: load(&s.gaps),
            missing_events: load(&s.missing),
            duplicates: load(&s.duplicates),
            errors: load(&s.errors),
            incomplete_streams: incomplete,
            connect_retries: load(&s.connect_retries),
            hub_rss_bytes: m.hub_rss,
            hub_rss_baseline_bytes: self.baseline_rss,
            hub_rss_peak_bytes: hub_peak,
            hub_rss_per_connection_bytes: outcome.rss_per_connection,
            hub_rss_growth_bytes: outcome.rss_growth,
            harness_rss_per_connection_bytes: outcome.harness_rss_per_connection,
            hub_cpu_percent: m.hub_cpu,
            harness_cpu_percent: m.harness_cpu,
            harness_rss_bytes: harness_rss,
            hub_metrics,
            catchup_events_per_s: outcome.catchup_events_per_s,
            storm_catchup_s: outcome.storm.as_ref().and_then(|d| d.catchup_s),
            storm: outcome.storm,
            timeline,
            params: self.p,
            error_samples: s.error_samples(),
        })
    }
}

/// Runs `scenario` against `target`.
pub async fn run(scenario: Scenario, args: &RunArgs, target: Target) -> anyhow::Result<Report> {
    let mut env = Env::new(scenario, args, target)?;
    let running = async {
        match scenario {
            Scenario::Fanout => fanout::run(&mut env).await,
            Scenario::Publish => publish::run(&mut env).await,
            Scenario::Idle => idle::run(&mut env).await,
            Scenario::Catchup => catchup::run(&mut env).await,
            Scenario::ReconnectStorm => storm::run(&mut env).await,
            Scenario::Mixed | Scenario::Soak => mixed::run(&mut env).await,
        }
    };
    // Ctrl-C still closes the sessions and stops a spawned hub (and removes its store).
    let result = tokio::select! {
        result = running => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok((outcome, incomplete)) => env.finish(outcome, incomplete).await,
        Err(e) => {
            let samples = env.stats.error_samples();
            // Stop the sessions and the hub either way; the setup error is what matters.
            let _ = env.finish(Outcome::default(), 0).await;
            let detail = if samples.is_empty() {
                String::new()
            } else {
                format!("; first errors:\n  {}", samples.join("\n  "))
            };
            Err(e.context(format!("{} did not complete{detail}", scenario.name())))
        }
    }
}

/// Helpers scenarios share.
impl Env {
    /// Followers spread round-robin over the branches, each following one.
    fn spread_followers(&mut self, kind: &str, n: usize, storm: bool) -> anyhow::Result<()> {
        for i in 0..n {
            let b = i % self.p.branches;
            let branch = self.branch(b);
            let device = self.device(kind, i);
            let token = self
                .cashier(&device, std::slice::from_ref(&branch))
                .context("minting a token")?;
            let plan = Plan {
                device,
                token,
                follow: vec![branch],
                from: None,
                publish: None,
                read_buffer: self.p.read_buffer,
                storm,
            };
            self.follower(plan, vec![b]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower(branches: Vec<usize>, last: &[u64], done: bool) -> Follower {
        let probe = Arc::new(Probe::new(branches.len()));
        for (slot, &seq) in probe.last.iter().zip(last) {
            slot.store(seq, Ordering::Release);
        }
        probe.done.store(done, Ordering::Release);
        Follower { probe, branches }
    }

    #[test]
    fn a_follower_whose_session_ended_short_of_a_head_is_incomplete() {
        let heads = [5, 0, 7];
        let followers = [
            follower(vec![0, 2], &[5, 7], false),
            follower(vec![0, 2], &[5, 6], true),
            follower(vec![2], &[7], true),
        ];
        assert!(
            !still_draining(&followers, &heads),
            "nothing left to wait for: the one behind has ended"
        );
        let incomplete: Vec<(usize, usize)> = incomplete_streams(&followers, &heads)
            .map(|(_, i, b)| (i, b))
            .collect();
        assert_eq!(incomplete, [(1, 2)], "but it still counts as incomplete");
        let running = [follower(vec![0], &[4], false)];
        assert!(still_draining(&running, &heads));
        assert_eq!(incomplete_streams(&running, &heads).count(), 1);
    }
}
