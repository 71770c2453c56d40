//! The hub: what its parts share (configuration, token keys, the engine, the branches, the
//! rooms, snapshots, metrics), and how it stops.
//!
//! Its state is private; sessions and HTTP handlers reach it through its methods, and a branch
//! through [`Hub::branch`]. The engine's feed ([`HubFeed`]) is where committed events enter the
//! hub: it moves the branch's head, then offers the events to the branch's room.

use std::sync::{Arc, Mutex, Weak};

use branchline_protocol::{BranchKey, ErrorCode, Name, UnixMillis, now_ms};
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::TokenKeys;
use crate::branch::snapshots::Snapshots;
use crate::branch::{Branch, Branches};
use crate::config::Config;
use crate::engine::sled::{SledEngine, StoreError};
use crate::engine::{Committed, Engine, EngineError, Feed, StopError};
use crate::metrics::Metrics;
use crate::ws::room::{Rooms, SessionCtl};

/// Why the hub could not start, or did not stop cleanly.
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
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An I/O failure (binding).
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
    /// event is on disk (commits sync before they answer), but the final flush may not have
    /// run.
    #[error("shutdown took longer than the grace of {grace}: {what} unfinished")]
    Unfinished {
        /// The grace, as written in the configuration.
        grace: humantime::FormattedDuration,
        /// What was still busy.
        what: String,
    },
}

/// Where committed events enter the hub: the branch's head moves, then the room fans out.
///
/// It holds the branches weakly: the branches hold the engine, which holds its feed, and a
/// cycle would keep a stopped engine (and its store's lock) alive.
pub struct HubFeed {
    branches: Weak<Branches>,
    rooms: Arc<Rooms>,
}

impl Feed for HubFeed {
    fn committed(&self, commit: Committed) {
        // Head first: readers that see the new head find the events in the log, and a
        // subscriber that joins after it moved replays them from there.
        if let Some(branches) = self.branches.upgrade() {
            branches.committed(&commit);
        }
        if let Some(publication) = &commit.publication {
            self.rooms.deliver(publication);
        }
    }

    fn trimmed(&self, branch: &BranchKey, floor: u64) {
        if let Some(branches) = self.branches.upgrade() {
            branches.trimmed(branch, floor);
        }
    }
}

/// Everything the parts of a running hub share.
pub struct Hub {
    config: Config,
    keys: TokenKeys,
    engine: Arc<dyn Engine>,
    branches: Arc<Branches>,
    rooms: Arc<Rooms>,
    snapshots: Snapshots,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Connection and session tasks.
    conns: TaskTracker,
    /// The hub's own tasks (upkeep).
    tasks: TaskTracker,
    device_sessions: DashMap<(Name, Name), Vec<Arc<SessionCtl>>>,
    last_dedup_expiry: Mutex<UnixMillis>,
}

/// Builds an engine that reports to `feed`, counting in `metrics`.
pub type EngineBuilder<'a> =
    Box<dyn FnOnce(Arc<dyn Feed>, Arc<Metrics>) -> Result<Arc<dyn Engine>, HubError> + 'a>;

impl Hub {
    /// Opens the configured store with the sled engine and starts the hub. Needs a Tokio
    /// runtime.
    pub fn open(config: Config) -> Result<Arc<Self>, HubError> {
        let dir = config.data_dir.clone();
        let engine_config = config.clone();
        Self::with_engine(
            config,
            Box::new(move |feed, metrics| {
                let engine = SledEngine::open(&engine_config, feed, metrics)
                    .map_err(|source| HubError::Open { dir, source })?;
                Ok(Arc::new(engine) as Arc<dyn Engine>)
            }),
        )
    }

    /// Starts a hub over the engine `build` makes (tests: another engine, or the sled one
    /// over a store that fails on demand).
    pub fn with_engine(config: Config, build: EngineBuilder<'_>) -> Result<Arc<Self>, HubError> {
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
        let metrics = Arc::new(Metrics::new());
        let rooms = Arc::new(Rooms::default());
        let branches = Arc::new(Branches::default());
        let feed = Arc::new(HubFeed {
            branches: Arc::downgrade(&branches),
            rooms: rooms.clone(),
        });
        let engine = build(feed, metrics.clone())?;
        branches.attach(engine.clone());
        Ok(Arc::new(Self {
            keys: TokenKeys::new(secret.as_bytes()).with_leeway(config.token_leeway),
            config,
            engine,
            branches,
            rooms,
            snapshots: Snapshots::default(),
            metrics,
            shutdown: CancellationToken::new(),
            conns: TaskTracker::new(),
            tasks: TaskTracker::new(),
            device_sessions: DashMap::new(),
            last_dedup_expiry: Mutex::new(now_ms()),
        }))
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Token keys.
    pub fn keys(&self) -> &TokenKeys {
        &self.keys
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Live sessions per branch.
    pub fn rooms(&self) -> &Arc<Rooms> {
        &self.rooms
    }

    /// Snapshots being paged through.
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    /// Cancelled when the hub shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Connection and session tasks.
    pub(crate) fn conns(&self) -> &TaskTracker {
        &self.conns
    }

    /// The hub's own tasks.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The branch, opened (its log made) on first use.
    pub async fn branch(&self, key: &BranchKey) -> Result<Arc<Branch>, EngineError> {
        self.branches.get(key).await
    }

    /// Whether the hub accepts writes: its store is healthy, has room, and the hub is not
    /// shutting down.
    pub fn ready(&self) -> Result<(), (ErrorCode, String)> {
        if let Err(why) = self.engine.writable() {
            return Err((why.code(), why.to_string()));
        }
        if self.shutdown.is_cancelled() {
            return Err((ErrorCode::ShuttingDown, "the hub is shutting down".into()));
        }
        Ok(())
    }

    /// Measures the store's free space (writes stop under the floor, resume above it).
    pub fn check_space(&self) {
        self.engine.check_space();
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
    pub async fn run_retention(&self, dedup: bool) -> Result<(), EngineError> {
        self.run_retention_at(now_ms(), dedup).await
    }

    /// A retention pass as if the time were `now` (tests move time forward this way).
    pub async fn run_retention_at(&self, now: UnixMillis, dedup: bool) -> Result<(), EngineError> {
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
        self.engine
            .retain(&self.config.retention, now, expire_dedup)
            .await
    }

    /// Stops everything, in order, within the configured grace; says what was still busy
    /// when it ran out.
    pub(crate) async fn stop(&self) -> Result<(), HubError> {
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
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            unfinished.push("upkeep");
        }
        let stopped = self.engine.stop(deadline).await;
        if let Err(StopError::Unfinished(parts)) = &stopped {
            unfinished.extend(parts);
        }
        if !unfinished.is_empty() {
            return Err(HubError::Unfinished {
                grace: humantime::format_duration(self.config.shutdown_grace),
                what: unfinished.join(", "),
            });
        }
        match stopped {
            Err(StopError::Failed) => Err(HubError::StoreFailed),
            _ => Ok(()),
        }
    }
}
