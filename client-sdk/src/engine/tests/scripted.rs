//! A scripted hub: a [`Remote`] whose transports deliver [`Input`]s at scripted instants
//! and record what the engine did with them, and the engine running against it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use branchline_protocol::{Epoch, Name, Position, Role, TokenBranches, Welcome};
use futures::FutureExt;
use futures::future::{self, BoxFuture};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use uuid::Uuid;

use crate::clock::Clock;
use crate::engine::connector::Connector;
use crate::engine::shared::{COMMAND_QUEUE, Command, Downloads, Shared};
use crate::engine::snapshot::SnapshotFuture;
use crate::engine::transport::{Input, Opening, Remote, Room, Transport};
use crate::error::{Error, Result};
use crate::http::{HttpApi, Snapshot};
use crate::options::{ClientOptions, Endpoints};
use crate::status::{ClientEvent, SyncState, SyncStatus};
use crate::store::{PendingEvent, Store};

pub(super) fn branch() -> Name {
    Name::new("b1").unwrap()
}

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Seconds since `start`, to the tenth.
fn at(start: Instant, now: Instant) -> f64 {
    ((now - start).as_millis() as f64 / 100.0).round() / 10.0
}

/// What the scripted hub saw the engine do.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Call {
    WebSocket,
    Polling,
    Snapshot(Name),
    Follow(Name, Position),
    Applied(Name, Position),
}

/// The calls, with when they came (seconds since the start).
pub(super) struct Log {
    start: Instant,
    calls: Mutex<Vec<(f64, Call)>>,
}

impl Log {
    fn record(&self, call: Call) {
        let t = at(self.start, Instant::now());
        self.calls.lock().unwrap().push((t, call));
    }

    pub(super) fn calls(&self) -> Vec<(f64, Call)> {
        self.calls.lock().unwrap().clone()
    }

    /// When the engine opened transports, and which.
    pub(super) fn opened(&self) -> Vec<(f64, Call)> {
        self.calls()
            .into_iter()
            .filter(|(_, c)| matches!(c, Call::WebSocket | Call::Polling))
            .collect()
    }
}

/// Inputs, each delivered the given time after the one before (or after opening).
type Script = Vec<(Duration, Input)>;

/// A transport that delivers its script, then nothing.
struct Scripted {
    log: Arc<Log>,
    state: SyncState,
    welcome: Option<Welcome>,
    script: VecDeque<(Duration, Input)>,
    /// When the next input is due, once the engine has started waiting for it.
    due: Option<Instant>,
}

impl Transport for Scripted {
    fn state(&self) -> SyncState {
        self.state
    }

    fn welcome(&mut self) -> Option<Welcome> {
        self.welcome.take()
    }

    fn room(&self) -> Option<Room> {
        // These tests publish nothing.
        None
    }

    fn publish(&mut self, _branch: &Name, _events: &[PendingEvent]) {}

    fn send(&mut self) -> BoxFuture<'_, Result<(), String>> {
        future::ready(Ok(())).boxed()
    }

    fn next(&mut self) -> BoxFuture<'_, Input> {
        async move {
            let Some((delay, _)) = self.script.front() else {
                return future::pending().await;
            };
            // Kept across cancellations, as the handler drops this future whenever
            // something else comes first.
            let due = *self.due.get_or_insert(Instant::now() + *delay);
            sleep_until(due).await;
            self.due = None;
            self.script
                .pop_front()
                .map_or(Input::Wake, |(_, input)| input)
        }
        .boxed()
    }

    fn applied(&mut self, branch: &Name, position: Position) -> bool {
        self.log.record(Call::Applied(branch.clone(), position));
        false
    }

    fn follow(&mut self, branch: Name, position: Position) {
        self.log.record(Call::Follow(branch, position));
    }

    fn resumes_in_place(&self) -> bool {
        self.state == SyncState::Polling
    }

    fn close(&mut self) -> BoxFuture<'_, ()> {
        future::ready(()).boxed()
    }
}

/// What a WebSocket attempt meets.
pub(super) enum Dial {
    Fail(Error),
    /// A session that opens after `handshake` and delivers `script`.
    Open {
        handshake: Duration,
        script: Script,
    },
}

/// A session opening in 100 ms that is lost after `lives`.
pub(super) fn session(lives: Duration) -> Dial {
    Dial::Open {
        handshake: Duration::from_millis(100),
        script: vec![(lives, Input::Lost("cut".into()))],
    }
}

pub(super) fn refused() -> Dial {
    Dial::Fail(Error::Network("connection refused".into()))
}

/// The scripted hub. WebSocket attempts meet `sockets` in turn (then refusals); polling runs
/// deliver `polls` in turn (then nothing); a snapshot takes `snapshot`.
#[derive(Default)]
pub(super) struct Hub {
    sockets: Mutex<VecDeque<Dial>>,
    pub polls: Mutex<VecDeque<Script>>,
    pub snapshot: Mutex<Option<(Duration, Snapshot)>>,
    log: Mutex<Option<Arc<Log>>>,
}

impl Hub {
    pub(super) fn with_sockets(sockets: impl IntoIterator<Item = Dial>) -> Self {
        Self {
            sockets: Mutex::new(sockets.into_iter().collect()),
            ..Self::default()
        }
    }

    fn log(&self) -> Arc<Log> {
        Arc::clone(self.log.lock().unwrap().as_ref().unwrap())
    }

    fn scripted(&self, state: SyncState, welcome: Option<Welcome>, script: Script) -> Scripted {
        Scripted {
            log: self.log(),
            state,
            welcome,
            script: script.into(),
            due: None,
        }
    }
}

fn welcome() -> Welcome {
    Welcome {
        protocol: branchline_protocol::PROTOCOL_VERSION,
        session_id: Uuid::now_v7(),
        server_time_ms: branchline_protocol::now_ms(),
        heartbeat_ms: 10_000,
        max_frame_bytes: 1 << 20,
        role: Role::Cashier,
        branches: Vec::new(),
    }
}

impl Remote for Hub {
    fn websocket(&self) -> Opening {
        self.log().record(Call::WebSocket);
        let dial = self
            .sockets
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(refused);
        let socket = match dial {
            Dial::Fail(e) => Err(e),
            Dial::Open { handshake, script } => Ok((
                handshake,
                self.scripted(SyncState::Live, Some(welcome()), script),
            )),
        };
        async move {
            let (handshake, socket) = socket?;
            sleep(handshake).await;
            Ok(Box::new(socket) as Box<dyn Transport>)
        }
        .boxed()
    }

    fn polling(&self) -> Result<Box<dyn Transport>> {
        self.log().record(Call::Polling);
        let script = self.polls.lock().unwrap().pop_front().unwrap_or_default();
        Ok(Box::new(self.scripted(SyncState::Polling, None, script)))
    }

    fn snapshot(&self, branch: Name) -> SnapshotFuture {
        self.log().record(Call::Snapshot(branch.clone()));
        let snapshot = self.snapshot.lock().unwrap().take();
        async move {
            match snapshot {
                Some((takes, snap)) => {
                    sleep(takes).await;
                    (branch, Ok(snap))
                }
                None => future::pending().await,
            }
        }
        .boxed()
    }
}

/// The engine running against a scripted hub, following `b1` from `(7, 0)`.
pub(super) struct Engine {
    pub shared: Arc<Shared>,
    pub log: Arc<Log>,
    notes: broadcast::Receiver<ClientEvent>,
    pub cmds: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    /// Every state the status went through, with when.
    states: Arc<Mutex<Vec<(f64, SyncState)>>>,
}

impl Engine {
    pub(super) fn start(opts: ClientOptions, hub: Hub) -> Self {
        let start = Instant::now();
        let log = Arc::new(Log {
            start,
            calls: Mutex::new(Vec::new()),
        });
        *hub.log.lock().unwrap() = Some(Arc::clone(&log));
        let store = Store::temporary(100).unwrap();
        store
            .apply_snapshot(&branch(), Position::new(Epoch(7), 0), &[], &[])
            .unwrap();
        let token = Arc::new(RwLock::new(String::from("token")));
        let endpoints = Endpoints::parse("http://127.0.0.1:9").unwrap();
        let tenant = Name::new("acme").unwrap();
        let http = HttpApi::new(
            &endpoints.http,
            tenant.clone(),
            Arc::clone(&token),
            opts.codec,
            opts.connect_timeout,
        )
        .unwrap();
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            opts,
            endpoints,
            tenant,
            device: Name::new("till-1").unwrap(),
            role: Role::Cashier,
            followed: vec![branch()],
            allowed: TokenBranches::List(vec![branch()]),
            token,
            http,
            status: watch::channel(SyncStatus::default()).0,
            notices: broadcast::channel(1024).0,
            outbox_changed: Notify::new(),
            clock: Clock::default(),
            downloads: Downloads::default(),
        });
        let states = Arc::new(Mutex::new(Vec::new()));
        let mut status = shared.status.subscribe();
        let seen = Arc::clone(&states);
        tokio::spawn(async move {
            loop {
                let state = status.borrow_and_update().state;
                {
                    let mut seen = seen.lock().unwrap();
                    if seen.last().is_none_or(|(_, s)| *s != state) {
                        seen.push((at(start, Instant::now()), state));
                    }
                }
                if status.changed().await.is_err() {
                    return;
                }
            }
        });
        let notes = shared.notices.subscribe();
        let (cmds, rx) = mpsc::channel(COMMAND_QUEUE);
        let (log_tx, _) = watch::channel(0);
        let connector = Connector::with_remote(Arc::clone(&shared), Arc::new(hub), rx, log_tx);
        Self {
            task: tokio::spawn(connector.run()),
            shared,
            log,
            notes,
            cmds,
            states,
        }
    }

    /// The notifications since the last call.
    pub(super) fn notes(&mut self) -> Vec<ClientEvent> {
        std::iter::from_fn(|| self.notes.try_recv().ok()).collect()
    }

    pub(super) fn states(&self) -> Vec<(f64, SyncState)> {
        self.states.lock().unwrap().clone()
    }

    pub(super) async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Command::Shutdown(tx)).await.unwrap();
        rx.await.unwrap();
        self.task.await.unwrap();
    }
}

pub(super) fn opts() -> ClientOptions {
    ClientOptions::new()
        .temporary_store()
        .probe_interval(Duration::from_secs(3600))
}
