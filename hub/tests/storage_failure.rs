//! A failed disk write or flush acknowledges nothing (guarantee 2): the publishes it carried
//! are refused, nothing of them is ever shown, reads keep working, and writes stay refused
//! until a restart.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use branchline_hub::auth::{Branches, Claims};
use branchline_hub::config::{Config, FsyncMode};
use branchline_hub::log::{
    BranchKey, DedupEntry, EventLog, LoadedBranch, Op, SledLog, StoreError, StoredEvent,
};
use branchline_hub::protocol::http::EventsPage;
use branchline_hub::protocol::*;
use branchline_hub::server::{Hub, serve};
use support::*;
use uuid::Uuid;

/// The sled store, whose writes or flushes fail while `fail` is set (as a full or failing
/// disk).
struct Faulty {
    inner: SledLog,
    fail: Arc<AtomicBool>,
    fault: Fault,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write,
    Flush,
}

fn injected() -> StoreError {
    StoreError::Engine(sled::Error::Io(std::io::Error::other(
        "injected: no space left on device",
    )))
}

impl EventLog for Faulty {
    fn open_branch(&self, b: &BranchKey) -> Result<LoadedBranch, StoreError> {
        self.inner.open_branch(b)
    }
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        if matches!(self.fault, Fault::Write) && self.fail.load(Ordering::SeqCst) {
            return Err(injected());
        }
        self.inner.apply(ops)
    }
    fn flush(&self) -> Result<(), StoreError> {
        if matches!(self.fault, Fault::Flush) && self.fail.load(Ordering::SeqCst) {
            return Err(injected());
        }
        self.inner.flush()
    }
    fn read_events(
        &self,
        b: &BranchKey,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
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

const SECRET: &str = "storage-failure-secret-0123456789";

struct Running {
    url: String,
    hub: Arc<Hub>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), branchline_hub::HubError>>,
}

async fn start(dir: &std::path::Path, fail: Arc<AtomicBool>, fault: Fault) -> Running {
    let config = Config {
        data_dir: dir.to_path_buf(),
        store_cache_bytes: 16 << 20,
        ..Config::default()
    };
    let log = Faulty {
        inner: SledLog::open(dir, 16 << 20, FsyncMode::Always).unwrap(),
        fail,
        fault,
    };
    let hub = Hub::with_log(config, SECRET, Arc::new(log)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(hub.clone(), listener, async move {
        let _ = stopped.await;
    }));
    Running {
        url,
        hub,
        stop,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_acknowledges_nothing_and_reads_keep_working() {
    failure_acknowledges_nothing(Fault::Write).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_acknowledges_nothing_and_reads_keep_working() {
    failure_acknowledges_nothing(Fault::Flush).await;
}

async fn failure_acknowledges_nothing(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let running = start(dir.path(), fail.clone(), fault).await;
    let claims = Claims::new(
        name("acme"),
        Branches::List(vec![name("b1")]),
        name("till-1"),
        Role::Cashier,
        Duration::from_secs(600),
    );
    let token = running.hub.keys.mint(&claims).unwrap();
    let mut follower = connect_url(&format!("ws://{}/v1/ws", running.url), Codec::MsgPack).await;
    let admin = running
        .hub
        .keys
        .mint(&Claims::new(
            name("acme"),
            Branches::All,
            name("console"),
            Role::Admin,
            Duration::from_secs(600),
        ))
        .unwrap();
    follower
        .hello(
            &admin,
            "acme",
            "console",
            vec![Subscription {
                branch: name("b1"),
                from: None,
            }],
        )
        .await;
    let mut till = connect_url(&format!("ws://{}/v1/ws", running.url), Codec::MsgPack).await;
    till.hello(&token, "acme", "till-1", vec![]).await;
    for i in 1..=3 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }

    fail.store(true, Ordering::SeqCst);
    let mut refused = Vec::new();
    for i in 4..=5 {
        let p = publish("b1", i, note(i));
        refused.push(p.clone());
        let rejection = till.publish(p).await.unwrap_err();
        assert_eq!(rejection.code, ErrorCode::StorageUnavailable);
    }
    // The failure is sticky: the disk "recovers", but nothing more is written until a restart.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(
        till.publish(publish("b1", 4, note(4)))
            .await
            .unwrap_err()
            .code,
        ErrorCode::StorageUnavailable
    );

    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{}/readyz", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let page: EventsPage = http
        .get(format!(
            "http://{}/v1/branches/acme/b1/events?after=0",
            running.url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_contiguous(&page.events, 1, 3);
    assert_eq!(page.head, 3, "refused events are never visible");
    let metrics = http
        .get(format!("http://{}/metrics", running.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("branchline_store_errors_total 1"),
        "{metrics}"
    );

    // The follower saw exactly the three durable events: the next frame after them is the
    // answer to a ping.
    let seen = follower.events_through("b1", 3).await;
    assert_contiguous(&seen, 1, 3);
    follower
        .send(&ClientFrame::Ping(Ping {
            nonce: 5,
            client_time_ms: now_ms(),
        }))
        .await;
    let next = follower.until(|f| match f {
        ServerFrame::Event(_) | ServerFrame::Events(_) | ServerFrame::Pong(_) => Some(f.clone()),
        _ => None,
    });
    assert!(
        matches!(next.await, ServerFrame::Pong(_)),
        "nothing of the failed commit reached a follower"
    );

    drop((till, follower));
    running.stop.send(()).unwrap();
    running
        .task
        .await
        .unwrap()
        .expect("the hub stops within its grace");
    drop(running.hub);

    // After a restart the store holds everything acknowledged. A write that failed left
    // nothing; a flush that failed may or may not have reached the disk (the event was never
    // acknowledged nor shown, as after a crash). Either way, retrying the refused event
    // applies it exactly once, and the device goes on from there.
    let running = start(dir.path(), Arc::new(AtomicBool::new(false)), fault).await;
    let mut till = connect_url(&format!("ws://{}/v1/ws", running.url), Codec::MsgPack).await;
    let live = vec![Subscription {
        branch: name("b1"),
        from: None,
    }];
    let welcome = till.hello(&token, "acme", "till-1", live).await;
    let start = &welcome.branches[0];
    match fault {
        Fault::Write => assert_eq!((start.head, start.last_device_seq), (3, 3)),
        Fault::Flush => assert!(
            [(3, 3), (4, 4)].contains(&(start.head, start.last_device_seq)),
            "{start:?}"
        ),
    }
    let retried = till.publish(refused[0].clone()).await.unwrap();
    assert_eq!((retried.seq, retried.duplicate), (4, start.head == 4));
    let next = till
        .publish(Publish {
            device_seq: 5,
            ..refused[1].clone()
        })
        .await
        .unwrap();
    assert_eq!((next.seq, next.duplicate), (5, false));
    running.stop.send(()).unwrap();
    running
        .task
        .await
        .unwrap()
        .expect("the hub stops within its grace");
}
