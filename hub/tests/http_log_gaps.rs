//! An events read whose events vanish between the floor check and the read (retention
//! trimming at that moment) answers `resync_required`, never a page that sends the client back
//! to the same position forever (PROTOCOL.md §11).

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use branchline_hub::auth::{Branches, Claims};
use branchline_hub::config::{Config, FsyncMode};
use branchline_hub::log::{
    BranchKey, DedupEntry, EventLog, LoadedBranch, Op, SledLog, StoreError, StoredEvent,
};
use branchline_hub::protocol::http::{EventsPage, Problem};
use branchline_hub::protocol::*;
use branchline_hub::server::{Hub, serve};
use support::*;
use uuid::Uuid;

/// The sled store, which trims the log to `trim_before_read` inside the next events read: the
/// hub has checked the floor, then the events are gone.
struct TrimsDuringRead {
    inner: SledLog,
    trim_before_read: Mutex<Option<u64>>,
}

impl EventLog for TrimsDuringRead {
    fn open_branch(&self, b: &BranchKey) -> Result<LoadedBranch, StoreError> {
        self.inner.open_branch(b)
    }
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        self.inner.apply(ops)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn read_events(
        &self,
        b: &BranchKey,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let trim = self.trim_before_read.lock().unwrap().take();
        if let Some(floor) = trim {
            self.inner.trim(b, floor)?;
        }
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
        s: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        self.inner.conflicts(b, s, limit)
    }
    fn conflict(&self, b: &BranchKey, id: &Uuid) -> Result<Option<ConflictRecord>, StoreError> {
        self.inner.conflict(b, id)
    }
    fn branches(&self) -> Result<Vec<BranchKey>, StoreError> {
        self.inner.branches()
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
    fn position(&self, b: &BranchKey) -> Result<(u64, u64), StoreError> {
        self.inner.position(b)
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
}

const SECRET: &str = "http-log-gaps-secret-0123456789ab";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_trimmed_during_a_read_answer_resync_required() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        store_cache_bytes: 16 << 20,
        ..Config::default()
    };
    let log = Arc::new(TrimsDuringRead {
        inner: SledLog::open(dir.path(), 16 << 20, FsyncMode::Always).unwrap(),
        trim_before_read: Mutex::new(None),
    });
    let hub = Hub::with_log(config, SECRET, log.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(hub.clone(), listener, async move {
        let _ = stopped.await;
    }));
    let claims = Claims::new(
        name("acme"),
        Branches::List(vec![name("b1")]),
        name("till-1"),
        Role::Cashier,
        Duration::from_secs(600),
    );
    let api = Api {
        base,
        token: hub.keys.mint(&claims).unwrap(),
        client: reqwest::Client::new(),
    };
    let pushed = api
        .push(
            "acme",
            "b1",
            (1..=10).map(|i| publish("b1", i, note(i))).collect(),
        )
        .await;
    let read = |after: u64| {
        api.get(&format!(
            "/v1/branches/acme/b1/events?epoch={}&after={after}",
            pushed.epoch
        ))
        .send()
    };

    // Every event after the position vanishes: an empty page with `has_more` would send the
    // client back to the same position forever.
    *log.trim_before_read.lock().unwrap() = Some(10);
    let resp = read(3).await.unwrap();
    assert_eq!(resp.status(), 409);
    let problem: Problem = resp.json().await.unwrap();
    let resync = problem.resync.unwrap();
    assert_eq!(
        (problem.code, resync.reason, resync.head),
        (ErrorCode::ResyncRequired, ResyncReason::BelowFloor, 10)
    );

    // At the head, an empty page is the plain answer.
    let page: EventsPage = read(10).await.unwrap().json().await.unwrap();
    assert!(page.events.is_empty() && !page.has_more);

    let _ = stop.send(());
    server
        .await
        .unwrap()
        .expect("the hub stops within its grace");
}
