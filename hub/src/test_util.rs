//! A real hub on `127.0.0.1:0` with a temporary store, for tests of this and other crates.
//!
//! ```no_run
//! # async fn example() {
//! use branchline_hub::test_util::TestHub;
//! use branchline_hub::protocol::Role;
//!
//! let hub = TestHub::start().await;
//! let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
//! // connect to hub.ws_url() or hub.http_url() …
//! hub.stop().await;
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use branchline_protocol::{Name, Role};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use branchline_protocol::{ConflictRecord, ConflictStatus, UnixMillis};
use uuid::Uuid;

use crate::auth::{Claims, TokenBranches};
use crate::config::Config;
use crate::engine::memory::MemoryEngine;
use crate::engine::sled::log::{DedupEntry, LoadedBranch, Op};
use crate::engine::sled::{EventLog, SledEngine, SledLog, StoreError};
use crate::engine::{Engine, StoredEvent};
use crate::hub::{Hub, HubError};
use crate::state::Policies;
use branchline_protocol::BranchKey;

/// The store argument of a launch that opens the plain store itself.
type NoStore = fn(&Config) -> Arc<dyn EventLog>;

/// Which engine a test hub runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// The embedded sled engine (the default).
    Sled,
    /// The in-memory engine.
    Memory,
}

/// The secret test hubs sign tokens with.
pub const TEST_SECRET: &str = "branchline-test-secret-0123456789abcdef";

/// A running hub for tests. Stop it with [`TestHub::stop`]; dropping it stops it too, and
/// on a multi-threaded runtime waits (up to [`DROP_WAIT`]) until the stop has finished.
pub struct TestHub {
    hub: Arc<Hub>,
    store: Option<Arc<dyn EventLog>>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), HubError>>>,
    /// Told when the hub's serve task ended (its stop finished, or it was cancelled).
    ended: std::sync::mpsc::Receiver<()>,
    dir: Arc<tempfile::TempDir>,
    config: Config,
}

impl TestHub {
    /// A hub with the default configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A hub whose configuration `adjust` changes first (the store directory and secret are
    /// set by the test hub).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(EngineKind::Sled, adjust).await
    }

    /// A hub on the engine `kind`, its configuration changed by `adjust` first.
    pub async fn start_on(kind: EngineKind, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = Self::config();
        adjust(&mut config);
        match kind {
            EngineKind::Sled => Self::launch(config, Self::temp_dir(), None::<NoStore>).await,
            EngineKind::Memory => Self::launch_in_memory(config).await,
        }
    }

    /// A hub whose store (the real sled one) first runs `hooks` on the calls it watches: a
    /// disk that fails on demand, a log trimmed at an awkward moment. A restart reopens the
    /// plain store.
    pub async fn start_hooked(hooks: impl StoreHooks) -> Self {
        let store = |config: &Config| -> Arc<dyn EventLog> {
            let inner =
                SledLog::open(&config.data_dir, config.store_cache_bytes).expect("the store opens");
            Arc::new(Hooked { inner, hooks })
        };
        Self::launch(Self::config(), Self::temp_dir(), Some(store)).await
    }

    /// The test hubs' configuration before a test adjusts it.
    fn config() -> Config {
        Config {
            shutdown_grace: Duration::from_secs(5),
            store_cache_bytes: 16 << 20,
            ..Config::default()
        }
    }

    fn temp_dir() -> Arc<tempfile::TempDir> {
        Arc::new(tempfile::tempdir().expect("a temporary directory"))
    }

    async fn launch(
        mut config: Config,
        dir: Arc<tempfile::TempDir>,
        store: Option<impl FnOnce(&Config) -> Arc<dyn EventLog>>,
    ) -> Self {
        config.data_dir = dir.path().join("data");
        config.token_secret = Some(TEST_SECRET.into());
        std::fs::create_dir_all(&config.data_dir).expect("the store directory");
        let log = match store {
            Some(store) => store(&config),
            None => Arc::new(
                SledLog::open(&config.data_dir, config.store_cache_bytes).expect("the store opens"),
            ),
        };
        let (engine_log, engine_config) = (log.clone(), config.clone());
        let hub = Hub::with_engine(
            config.clone(),
            Box::new(move |feed, metrics| {
                let dir = engine_config.data_dir.clone();
                let engine = SledEngine::with_log(engine_log, &engine_config, feed, metrics)
                    .map_err(|source| HubError::Open { dir, source })?;
                Ok(Arc::new(engine) as Arc<dyn Engine>)
            }),
        )
        .expect("the test hub starts");
        Self::serve(hub, Some(log), dir, config).await
    }

    /// A hub on the in-memory engine (nothing survives its stop).
    async fn launch_in_memory(mut config: Config) -> Self {
        let dir = Self::temp_dir();
        config.data_dir = dir.path().join("data");
        config.token_secret = Some(TEST_SECRET.into());
        let policies = Policies::from(&config.conflicts);
        let hub = Hub::with_engine(
            config.clone(),
            Box::new(move |feed, _| {
                Ok(Arc::new(MemoryEngine::new(feed, policies)) as Arc<dyn Engine>)
            }),
        )
        .expect("the test hub starts");
        Self::serve(hub, None, dir, config).await
    }

    async fn serve(
        hub: Arc<Hub>,
        store: Option<Arc<dyn EventLog>>,
        dir: Arc<tempfile::TempDir>,
        config: Config,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("a local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let (end, ended) = std::sync::mpsc::channel();
        let serving = crate::server::serve(hub.clone(), listener, async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            // Dropped with the task, whichever way it ends: the receiver then learns it.
            let _end = end;
            serving.await
        });
        Self {
            hub,
            store,
            addr,
            stop: Some(stop),
            task: Some(task),
            ended,
            dir,
            config,
        }
    }

    /// The hub's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT/v1/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, branchline_protocol::routes::WS)
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The store directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The temporary directory holding the store (for tests that restart on it).
    pub fn temp_root(&self) -> &Path {
        self.dir.path()
    }

    /// The running hub's shared state.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The hub's store, as its engine writes it (for tests of what is stored). Panics on a
    /// hub without one (the in-memory engine).
    pub fn store(&self) -> &Arc<dyn EventLog> {
        self.store
            .as_ref()
            .expect("a hub on the sled engine has a store")
    }

    /// A token for `device` with `role` on `branches` of `tenant` (`["*"]` for every branch),
    /// valid for an hour.
    pub fn token(&self, tenant: &str, branches: &[&str], device: &str, role: Role) -> String {
        let branches = if branches == ["*"] {
            TokenBranches::All
        } else {
            TokenBranches::List(
                branches
                    .iter()
                    .map(|b| Name::new(*b).expect("a valid branch name"))
                    .collect(),
            )
        };
        let claims = Claims::new(
            Name::new(tenant).expect("a valid tenant name"),
            branches,
            Name::new(device).expect("a valid device name"),
            role,
            Duration::from_secs(3600),
        );
        self.hub.keys().mint(&claims).expect("tokens sign")
    }

    /// Runs one retention pass now (dedup expiry included).
    pub async fn run_retention(&self) {
        self.hub.run_retention(true).await.expect("retention runs");
    }

    /// Runs one retention pass as if the clock read `now_ms` (dedup expiry included).
    pub async fn run_retention_at(&self, now_ms: UnixMillis) {
        self.hub
            .run_retention_at(now_ms, true)
            .await
            .expect("retention runs");
    }

    /// Stops the hub gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                // A test that makes the store fail expects to hear of it at the stop.
                Ok(Err(HubError::StoreFailed)) => {}
                Ok(Err(e)) => panic!("the test hub did not stop cleanly: {e}"),
                _ => {}
            }
        }
    }

    /// Stops the hub gracefully and starts it again on the same store (on a new port).
    pub async fn restart(mut self) -> Self {
        assert!(
            self.store.is_some(),
            "only a hub on the sled engine keeps its store across a restart"
        );
        self.shutdown().await;
        let (config, dir) = (self.config.clone(), self.dir.clone());
        drop(self);
        Self::launch(config, dir, None::<NoStore>).await
    }
}

/// How long dropping a [`TestHub`] waits for its stop.
pub const DROP_WAIT: Duration = Duration::from_secs(30);

impl Drop for TestHub {
    /// Stops the hub, and waits for it where the runtime can run the stop meanwhile: a store
    /// left to close by itself as the test's runtime goes away can hang sled 0.34's
    /// process-wide locks for the other tests of the process.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if multi_thread {
                let _ = self.ended.recv_timeout(DROP_WAIT);
            }
        }
    }
}

/// What a [`TestHub::start_hooked`] store does before the calls it watches reach the real
/// store: `Ok(())` lets the call through, an error is what the call returns.
pub trait StoreHooks: Send + Sync + 'static {
    /// Before a commit's write.
    fn before_apply(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Before a flush.
    fn before_flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Before a read of `branch`'s events, with the real store at hand.
    fn before_read(&self, _store: &SledLog, _branch: &BranchKey) -> Result<(), StoreError> {
        Ok(())
    }

    /// The free space to report instead of the disk's, if any (a disk filling up).
    fn free_bytes(&self) -> Option<u64> {
        None
    }
}

/// The sled store behind [`StoreHooks`].
struct Hooked<H> {
    inner: SledLog,
    hooks: H,
}

impl<H: StoreHooks> EventLog for Hooked<H> {
    fn open_branch(&self, b: &BranchKey) -> Result<LoadedBranch, StoreError> {
        self.inner.open_branch(b)
    }
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        self.hooks.before_apply()?;
        self.inner.apply(ops)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.hooks.before_flush()?;
        self.inner.flush()
    }
    fn read_events(
        &self,
        b: &BranchKey,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.hooks.before_read(&self.inner, b)?;
        self.inner.read_events(b, after, until, limit)
    }
    fn dedup(&self, b: &BranchKey, id: &Uuid) -> Result<Option<DedupEntry>, StoreError> {
        self.inner.dedup(b, id)
    }
    fn dedup_ids(&self, b: &BranchKey, visit: &mut dyn FnMut(Uuid)) -> Result<(), StoreError> {
        self.inner.dedup_ids(b, visit)
    }
    fn conflicts(
        &self,
        b: &BranchKey,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        self.inner.conflicts(b, status, limit)
    }
    fn conflict(&self, b: &BranchKey, id: &Uuid) -> Result<Option<ConflictRecord>, StoreError> {
        self.inner.conflict(b, id)
    }
    fn branches(&self) -> Result<Vec<BranchKey>, StoreError> {
        self.inner.branches()
    }
    fn position(&self, b: &BranchKey) -> Result<(u64, u64), StoreError> {
        self.inner.position(b)
    }
    fn last_seq_before(
        &self,
        b: &BranchKey,
        cutoff: UnixMillis,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.last_seq_before(b, cutoff)
    }
    fn trim(&self, b: &BranchKey, floor: u64) -> Result<u64, StoreError> {
        self.inner.trim(b, floor)
    }
    fn expire_dedup(
        &self,
        b: &BranchKey,
        cutoff: UnixMillis,
        floor: u64,
    ) -> Result<u64, StoreError> {
        self.inner.expire_dedup(b, cutoff, floor)
    }
    fn begin_run(&self, durable: bool) -> Result<usize, StoreError> {
        self.inner.begin_run(durable)
    }
    fn end_run(&self) -> Result<(), StoreError> {
        self.inner.end_run()
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
    fn free_bytes(&self) -> Result<u64, StoreError> {
        match self.hooks.free_bytes() {
            Some(free) => Ok(free),
            None => self.inner.free_bytes(),
        }
    }
}
