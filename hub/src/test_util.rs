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

use crate::auth::{Branches, Claims};
use crate::config::Config;
use crate::server::Hub;

/// The secret test hubs sign tokens with.
pub const TEST_SECRET: &str = "branchline-test-secret-0123456789abcdef";

/// A running hub for tests. Stop it with [`TestHub::stop`]; dropping it stops it too, and
/// on a multi-threaded runtime waits (up to [`DROP_WAIT`]) until the stop has finished.
pub struct TestHub {
    hub: Arc<Hub>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), crate::HubError>>>,
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
        let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
        let mut config = Config {
            shutdown_grace: Duration::from_secs(5),
            store_cache_bytes: 16 << 20,
            ..Config::default()
        };
        adjust(&mut config);
        Self::launch(config, dir).await
    }

    async fn launch(mut config: Config, dir: Arc<tempfile::TempDir>) -> Self {
        config.data_dir = dir.path().join("data");
        config.token_secret = Some(TEST_SECRET.into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("a local address");
        let hub = Hub::open(config.clone()).expect("the test hub starts");
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
        format!("ws://{}/v1/ws", self.addr)
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

    /// A token for `device` with `role` on `branches` of `tenant` (`["*"]` for every branch),
    /// valid for an hour.
    pub fn token(&self, tenant: &str, branches: &[&str], device: &str, role: Role) -> String {
        let branches = if branches == ["*"] {
            Branches::All
        } else {
            Branches::List(
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
        self.hub.keys.mint(&claims).expect("tokens sign")
    }

    /// Runs one retention pass now (dedup expiry included).
    pub async fn run_retention(&self) {
        self.hub.run_retention(true).await.expect("retention runs");
    }

    /// Runs one retention pass as if the clock read `now_ms` (dedup expiry included).
    pub async fn run_retention_at(&self, now_ms: branchline_protocol::UnixMillis) {
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
            if let Ok(Err(e)) = task.await {
                panic!("the test hub did not stop cleanly: {e}");
            }
        }
    }

    /// Stops the hub gracefully and starts it again on the same store (on a new port).
    pub async fn restart(mut self) -> Self {
        self.shutdown().await;
        let (config, dir) = (self.config.clone(), self.dir.clone());
        drop(self);
        Self::launch(config, dir).await
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
