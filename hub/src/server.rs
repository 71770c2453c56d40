//! The server: the hub's shared state, the accept loop with its limits, and shutdown.
//!
//! [`run`] takes a bound listener, a [`Config`] and a shutdown future: the binary passes
//! Ctrl-C/SIGTERM, tests pass a oneshot. On shutdown the hub stops accepting, tells every
//! session (which answers its pending publishes and closes with `shutting_down`), waits for
//! connections, then for the branch writers to hand over their last commits, and for the
//! committer's final flush.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use branchline_protocol::{ErrorCode, Name, UnixMillis, now_ms};
use dashmap::DashMap;
use governor::{Quota, RateLimiter};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use uuid::Uuid;

use crate::auth::TokenKeys;
use crate::branch::{Branches, WriterCtx};
use crate::commit::{CommitSender, Committer};
use crate::config::{Config, FsyncMode};
use crate::health::StoreHealth;
use crate::log::{EventLog, SledLog, StoreError};
use crate::metrics::Metrics;
use crate::room::{Rooms, SessionCtl};
use crate::snapshot::Snapshots;
use crate::state::Policies;

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// The store could not be opened.
    #[error("cannot open the store in {dir}: {source}{hint}", hint = if source.is_disk_full() {
        "; the disk is full: make room and start again (nothing acknowledged is lost)"
    } else {
        ""
    })]
    Open {
        /// The store directory.
        dir: std::path::PathBuf,
        /// What went wrong.
        source: StoreError,
    },
    /// The store failed while starting.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An I/O failure (starting the committer thread, binding).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A store write or sync failed during the run: the hub stopped, but everything after
    /// the failure was refused, and the disk needs a look before the next start.
    #[error(
        "a store write or sync failed during this run (see the log): nothing after it was \
         acknowledged; check the disk before starting again"
    )]
    StoreFailed,
    /// The shutdown grace ran out with these parts of the hub still busy. Every acknowledged
    /// event is on disk (commits flush before they answer), but the final flush may not have
    /// run.
    #[error("shutdown took longer than the grace of {grace}: {what} unfinished")]
    Unfinished {
        /// The grace, as written in the configuration.
        grace: humantime::FormattedDuration,
        /// What was still busy.
        what: String,
    },
}

/// Everything the parts of a running hub share.
pub struct Hub {
    /// The configuration it was started with.
    pub config: Config,
    /// Token keys.
    pub keys: TokenKeys,
    /// The replay log.
    pub log: Arc<dyn EventLog>,
    /// Open branches and their writers.
    pub branches: Branches,
    /// Live sessions per branch.
    pub rooms: Arc<Rooms>,
    /// Snapshots being paged through.
    pub snapshots: Snapshots,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Whether the store takes writes.
    pub health: Arc<StoreHealth>,
    /// Cancelled when the hub shuts down.
    pub shutdown: CancellationToken,
    /// Connection and session tasks.
    pub conns: TaskTracker,
    writers: TaskTracker,
    device_sessions: DashMap<(Name, Name), Vec<Arc<SessionCtl>>>,
    committer: std::sync::Mutex<Option<Committer>>,
    /// Under `--fsync interval`: the sender the flush ticker uses, until it starts.
    flush_ticks: std::sync::Mutex<Option<(CommitSender, Duration)>>,
    last_dedup_expiry: std::sync::Mutex<UnixMillis>,
}

impl Hub {
    /// Opens the store and starts the committer.
    pub fn open(config: Config) -> Result<Arc<Self>, HubError> {
        let secret = config
            .token_secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                HubError::Config(
                    "a token secret is required (BRANCHLINE_TOKEN_SECRET, or --dev)".into(),
                )
            })?;
        config
            .validate()
            .map_err(|e| HubError::Config(e.to_string()))?;
        let opened = std::fs::create_dir_all(&config.data_dir)
            .map_err(StoreError::from)
            .and_then(|()| SledLog::open(&config.data_dir, config.store_cache_bytes));
        let log: Arc<dyn EventLog> = Arc::new(opened.map_err(|source| HubError::Open {
            dir: config.data_dir.clone(),
            source,
        })?);
        Self::with_log(config, &secret, log)
    }

    /// A hub over an already opened log (tests wrap the store to inject faults).
    pub fn with_log(
        config: Config,
        secret: &str,
        log: Arc<dyn EventLog>,
    ) -> Result<Arc<Self>, HubError> {
        let metrics = Arc::new(Metrics::new());
        let rooms = Arc::new(Rooms::default());
        let health = Arc::new(StoreHealth::new(config.min_free_space.as_u64()));
        health.note_free(log.free_bytes()?);
        if let Err(why) = health.writable() {
            tracing::warn!("{why}: serving reads only until there is room");
        }
        let durable = config.fsync == FsyncMode::Always;
        let reset = log.begin_run(durable)?;
        if reset > 0 {
            tracing::warn!(
                branches = reset,
                "the last run acknowledged before flushing (--fsync interval) and did not stop \
                 cleanly: every branch has a new epoch, and clients resync from a snapshot"
            );
        }
        let (committer, sender) = Committer::start(
            log.clone(),
            rooms.clone(),
            metrics.clone(),
            config.fsync,
            health.clone(),
        )?;
        let flush_ticks = match config.fsync {
            FsyncMode::Interval(d) => Some((sender.clone(), d)),
            FsyncMode::Always => None,
        };
        let writers = TaskTracker::new();
        let branches = Branches::new(WriterCtx {
            log: log.clone(),
            committer: sender,
            policies: Policies::from(&config.conflicts),
            health: health.clone(),
            metrics: metrics.clone(),
            tracker: writers.clone(),
        });
        if let FsyncMode::Interval(d) = config.fsync {
            tracing::warn!(
                interval = %humantime::format_duration(d),
                "fsync is by interval: a crash may lose up to one interval of acknowledged events"
            );
        }
        Ok(Arc::new(Self {
            keys: TokenKeys::new(secret.as_bytes()),
            config,
            log,
            branches,
            rooms,
            snapshots: Snapshots::default(),
            metrics,
            health,
            shutdown: CancellationToken::new(),
            conns: TaskTracker::new(),
            writers,
            device_sessions: DashMap::new(),
            committer: std::sync::Mutex::new(Some(committer)),
            flush_ticks: std::sync::Mutex::new(flush_ticks),
            last_dedup_expiry: std::sync::Mutex::new(now_ms()),
        }))
    }

    /// Whether the hub accepts writes: its store is healthy, has room, and the hub is not
    /// shutting down.
    pub fn ready(&self) -> Result<(), (ErrorCode, String)> {
        if let Err(why) = self.health.writable() {
            return Err((why.code(), why.to_string()));
        }
        if self.shutdown.is_cancelled() {
            return Err((ErrorCode::ShuttingDown, "the hub is shutting down".into()));
        }
        Ok(())
    }

    /// Measures the store's free space (writes stop under the floor, resume above it).
    fn check_space(&self) {
        self.health.measured(self.log.free_bytes());
    }

    /// Records a new session of `device`; closes the device's oldest sessions past the limit.
    pub fn register_session(&self, tenant: &Name, device: &Name, ctl: Arc<SessionCtl>) {
        let max = self.config.limits.max_sessions_per_device.max(1);
        let mut list = self
            .device_sessions
            .entry((tenant.clone(), device.clone()))
            .or_default();
        list.push(ctl);
        while list.len() > max {
            let oldest = list.remove(0);
            oldest.close(
                ErrorCode::SessionReplaced,
                "the device opened a newer session",
            );
        }
    }

    /// Forgets a session of `device`.
    pub fn unregister_session(&self, tenant: &Name, device: &Name, id: Uuid) {
        let key = (tenant.clone(), device.clone());
        if let Some(mut list) = self.device_sessions.get_mut(&key) {
            list.retain(|c| c.id != id);
        }
        self.device_sessions
            .remove_if(&key, |_, list| list.is_empty());
    }

    /// One retention pass over every branch: trims by count and age, and (at most hourly, or
    /// when `dedup` is set) expires old dedup entries.
    pub async fn run_retention(self: &Arc<Self>, dedup: bool) -> Result<(), StoreError> {
        self.run_retention_at(now_ms(), dedup).await
    }

    /// A retention pass as if the time were `now` (tests move time forward this way).
    pub async fn run_retention_at(
        self: &Arc<Self>,
        now: UnixMillis,
        dedup: bool,
    ) -> Result<(), StoreError> {
        let hub = self.clone();
        let expire_dedup = {
            let mut last = self
                .last_dedup_expiry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = dedup || now - *last >= 3_600_000;
            if due {
                *last = now;
            }
            due
        };
        let opened = self.branches.opened();
        tokio::task::spawn_blocking(move || {
            let retention = &hub.config.retention;
            let age = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            let mut result = Ok(());
            for key in hub.log.branches()? {
                let handle = opened.iter().find(|h| *h.shared.key == key);
                let pass = || -> Result<(), StoreError> {
                    let (head, floor) = match handle {
                        Some(h) => (h.shared.committed(), h.shared.floor()),
                        None => hub.log.position(&key)?,
                    };
                    let by_count = head.saturating_sub(retention.max_events);
                    let by_age = hub
                        .log
                        .last_seq_before(&key, now.saturating_sub(age(retention.max_age)))?
                        .unwrap_or(0);
                    let new_floor = by_count.max(by_age).min(head).max(floor);
                    if new_floor > floor {
                        if let Some(h) = handle {
                            h.shared.set_floor(new_floor);
                        }
                        let removed = hub.log.trim(&key, new_floor)?;
                        tracing::info!(branch = %key, floor = new_floor, removed, "retention trimmed the log");
                    }
                    if expire_dedup {
                        let cutoff = now.saturating_sub(age(retention.dedup_window));
                        hub.log.expire_dedup(&key, cutoff, new_floor)?;
                    }
                    Ok(())
                };
                // One branch's failure does not stop the pass for the others.
                if let Err(e) = pass() {
                    tracing::error!(branch = %key, error = %e, "retention failed for a branch");
                    result = Err(e);
                }
            }
            result
        })
        .await
        .map_err(|_| StoreError::Failed)?
    }

    /// Stops everything, in order, within the configured grace; says what was still busy
    /// when it ran out.
    async fn stop(&self) -> Result<(), HubError> {
        // One deadline for every phase: the whole stop fits in the grace.
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        let mut unfinished = Vec::new();
        self.shutdown.cancel();
        self.conns.close();
        if tokio::time::timeout_at(deadline, self.conns.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the shutdown grace");
            unfinished.push("connections");
        }
        self.branches.close();
        self.writers.close();
        if tokio::time::timeout_at(deadline, self.writers.wait())
            .await
            .is_err()
        {
            tracing::warn!("branch writers still busy after the shutdown grace");
            unfinished.push("branch writers");
        }
        let committer = self
            .committer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(committer) = committer {
            let join = tokio::task::spawn_blocking(move || committer.join());
            if tokio::time::timeout_at(deadline, join).await.is_err() {
                tracing::warn!("the committer did not finish within the shutdown grace");
                unfinished.push("the committer");
            }
        }
        // A store that failed, or whose committer may still write, is left marked as not
        // stopped cleanly. The last flush gets what is left of the grace: on a disk that
        // cannot take it, it is abandoned (its thread left behind) rather than waited for.
        if !self.health.failed() {
            let (log, clean) = (self.log.clone(), unfinished.is_empty());
            let last = tokio::task::spawn_blocking(move || {
                log.flush()?;
                if clean { log.end_run() } else { Ok(()) }
            });
            match tokio::time::timeout_at(deadline, last).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %e, "the final flush failed");
                    unfinished.push("the final flush (failed)");
                }
                Ok(Err(_)) => unfinished.push("the final flush (panicked)"),
                Err(_) => {
                    tracing::error!("the final flush did not finish within the shutdown grace");
                    unfinished.push("the final flush");
                }
            }
        }
        if unfinished.is_empty() {
            if self.health.failed() {
                return Err(HubError::StoreFailed);
            }
            Ok(())
        } else {
            Err(HubError::Unfinished {
                grace: humantime::format_duration(self.config.shutdown_grace),
                what: unfinished.join(", "),
            })
        }
    }
}

/// Held by a connection (and, after an upgrade, by its session) for as long as it is open.
#[derive(Clone)]
pub struct ConnGuard {
    _inner: Arc<ConnInner>,
}

struct ConnInner {
    _permit: Option<OwnedSemaphorePermit>,
    metrics: Arc<Metrics>,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.metrics.connections.decrement(1.0);
    }
}

/// Runs a hub on `listener` until `shutdown` resolves, then shuts it down gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HubError> {
    let hub = Hub::open(config)?;
    serve(hub, listener, shutdown).await
}

/// Serves an opened hub until `shutdown` resolves, then stops it; an error says the stop ran
/// out of grace.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HubError> {
    let app = crate::http::router(hub.clone());
    let overloaded = crate::http::overloaded();
    let limits = &hub.config.limits;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_second =
        |n: u32| std::num::NonZeroU32::new(n.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let rate = RateLimiter::direct(
        Quota::per_second(per_second(limits.connection_rate))
            .allow_burst(per_second(limits.connection_burst)),
    );
    hub.writers.spawn(maintenance(hub.clone()));
    let ticks = hub
        .flush_ticks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some((sender, every)) = ticks {
        hub.writers
            .spawn(flush_ticker(sender, every, hub.shutdown.clone()));
    }
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(5);
                    conn
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, backoff = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let permit = permits.clone().try_acquire_owned().ok();
        let admitted = permit.is_some() && rate.check().is_ok();
        hub.metrics.connections.increment(1.0);
        let guard = ConnGuard {
            _inner: Arc::new(ConnInner {
                _permit: permit,
                metrics: hub.metrics.clone(),
            }),
        };
        let router = if admitted {
            app.clone()
        } else {
            hub.metrics.refused_connections.increment(1);
            overloaded.clone()
        };
        hub.conns
            .spawn(connection(stream, router, guard, hub.shutdown.clone()));
    }
    drop(listener);
    hub.stop().await
}

async fn connection(
    stream: TcpStream,
    router: axum::Router,
    guard: ConnGuard,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(guard.clone());
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Some(Duration::from_secs(10)))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Under `--fsync interval`: asks the committer for a flush every interval, so that the last
/// writes before a quiet spell are flushed too. Ends (dropping its sender) at shutdown.
async fn flush_ticker(sender: CommitSender, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => sender.flush(),
        }
    }
}

/// Periodic upkeep: free space, metrics, snapshot expiry and retention.
async fn maintenance(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut retention = tokio::time::interval(hub.config.retention.interval);
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = tick.tick() => {
                hub.check_space();
                hub.metrics.upkeep();
                hub.metrics.rooms.set(hub.rooms.len() as f64);
                hub.metrics.queued_events.set(hub.rooms.queued_events() as f64);
                hub.snapshots.sweep();
            }
            _ = retention.tick() => {
                if let Err(e) = hub.run_retention(false).await {
                    tracing::error!(error = %e, "retention pass failed");
                }
            }
        }
    }
}
