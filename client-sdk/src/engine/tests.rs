//! The connector and the handler on paused time, over a scripted hub: a [`Remote`] whose
//! transports deliver [`Input`]s at scripted instants and record what the engine did with
//! them. Time only moves when the engine waits, so every instant below is exact.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use branchline_protocol::{
    Custom, Effect, Epoch, ErrorCode, Event, EventBody, Name, Position, ResyncReason,
    ResyncRequired, Role, Sku, StockLevel, TokenBranches, Welcome,
};
use futures::FutureExt;
use futures::future::{self, BoxFuture};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use uuid::Uuid;

use super::connector::Connector;
use super::shared::{COMMAND_QUEUE, Command, Shared};
use super::snapshot::{Downloads, SnapshotFuture};
use super::transport::{Input, Opening, Remote, Room, Transport};
use crate::Backoff;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::http::{HttpApi, Snapshot};
use crate::options::{self, ClientOptions, Endpoints};
use crate::status::{ClientEvent, SyncState, SyncStatus};
use crate::store::{PendingEvent, Store};

fn branch() -> Name {
    Name::new("b1").unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Seconds since `start`, to the tenth.
fn at(start: Instant, now: Instant) -> f64 {
    ((now - start).as_millis() as f64 / 100.0).round() / 10.0
}

/// What the scripted hub saw the engine do.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    WebSocket,
    Polling,
    Snapshot(Name),
    Follow(Name, Position),
    Applied(Name, Position),
}

/// The calls, with when they came (seconds since the start).
struct Log {
    start: Instant,
    calls: Mutex<Vec<(f64, Call)>>,
}

impl Log {
    fn record(&self, call: Call) {
        let t = at(self.start, Instant::now());
        self.calls.lock().unwrap().push((t, call));
    }

    fn calls(&self) -> Vec<(f64, Call)> {
        self.calls.lock().unwrap().clone()
    }

    /// When the engine opened transports, and which.
    fn opened(&self) -> Vec<(f64, Call)> {
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
enum Dial {
    Fail(Error),
    /// A session that opens after `handshake` and delivers `script`.
    Open {
        handshake: Duration,
        script: Script,
    },
}

/// A session opening in 100 ms that is lost after `lives`.
fn session(lives: Duration) -> Dial {
    Dial::Open {
        handshake: Duration::from_millis(100),
        script: vec![(lives, Input::Lost("cut".into()))],
    }
}

fn refused() -> Dial {
    Dial::Fail(Error::Network("connection refused".into()))
}

/// The scripted hub. WebSocket attempts meet `sockets` in turn (then refusals); polling runs
/// deliver `polls` in turn (then nothing); a snapshot takes `snapshot`.
#[derive(Default)]
struct Hub {
    sockets: Mutex<VecDeque<Dial>>,
    polls: Mutex<VecDeque<Script>>,
    snapshot: Mutex<Option<(Duration, Snapshot)>>,
    log: Mutex<Option<Arc<Log>>>,
}

impl Hub {
    fn with_sockets(sockets: impl IntoIterator<Item = Dial>) -> Self {
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
struct Engine {
    shared: Arc<Shared>,
    log: Arc<Log>,
    notes: broadcast::Receiver<ClientEvent>,
    cmds: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    /// Every state the status went through, with when.
    states: Arc<Mutex<Vec<(f64, SyncState)>>>,
}

impl Engine {
    fn start(opts: ClientOptions, hub: Hub) -> Self {
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
    fn notes(&mut self) -> Vec<ClientEvent> {
        std::iter::from_fn(|| self.notes.try_recv().ok()).collect()
    }

    fn states(&self) -> Vec<(f64, SyncState)> {
        self.states.lock().unwrap().clone()
    }

    async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Command::Shutdown(tx)).await.unwrap();
        rx.await.unwrap();
        self.task.await.unwrap();
    }
}

fn opts() -> ClientOptions {
    ClientOptions::new()
        .temporary_store()
        .probe_interval(Duration::from_secs(3600))
}

#[tokio::test(start_paused = true)]
async fn reconnects_wait_the_backoff_curve_and_a_session_that_lived_starts_it_over() {
    // Attempt n waits n seconds.
    let opts = opts()
        .transport(options::Transport::WebSocketOnly)
        .backoff(Backoff::from_fn(|attempt| secs(u64::from(attempt))));
    let hub = Hub::with_sockets([refused(), refused(), refused(), session(secs(11))]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(21)).await;
    let opened: Vec<f64> = engine.log.opened().iter().map(|(t, _)| *t).collect();
    // Fails at 0, 1, 3; opens at 6 (live at 6.1), lost at 17.1 after living 11 s: the
    // curve starts over, 1 s, 2 s, 3 s.
    assert_eq!(opened, [0.0, 1.0, 3.0, 6.0, 18.1, 20.1]);
    let waits: Vec<Duration> = engine
        .notes()
        .into_iter()
        .filter_map(|n| match n {
            ClientEvent::Disconnected { retry_in, .. } => Some(retry_in),
            _ => None,
        })
        .collect();
    assert_eq!(
        waits,
        [secs(1), secs(2), secs(3), secs(1), secs(2), secs(3)]
    );
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_socket_that_cannot_be_held_falls_back_to_polling_at_once() {
    let opts = opts()
        .websocket_failures_before_polling(2)
        .backoff(Backoff::constant(secs(5)));
    // Short sessions count as failures; the one that lives 11 s sets the count back to 0.
    let hub = Hub::with_sockets([
        session(secs(1)),
        session(secs(11)),
        session(secs(1)),
        session(secs(1)),
    ]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(60)).await;
    use Call::{Polling, WebSocket};
    assert_eq!(
        engine.log.opened(),
        [
            (0.0, WebSocket),
            (6.1, WebSocket),
            (22.2, WebSocket),
            (28.3, WebSocket),
            // Lost at 29.4: the second short session in a row, and no backoff before polling.
            (29.4, Polling),
        ]
    );
    assert!(
        engine.notes().contains(&ClientEvent::Polling {
            websocket_failures: 2
        }),
        "the app is told why"
    );
    let status = engine.shared.status.borrow().clone();
    assert_eq!(status.state, SyncState::Polling);
    assert_eq!(status.last_error.as_deref(), Some("cut"));
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn polling_probes_the_socket_and_one_more_short_session_goes_back_to_polling() {
    let opts = opts()
        .websocket_failures_before_polling(1)
        .probe_interval(secs(30));
    // The first session is cut at once; the first probe is refused, the second opens a
    // session that is cut after 2 s.
    let hub = Hub::with_sockets([session(secs(1)), refused(), session(secs(2))]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(200)).await;
    let opened = engine.log.opened();
    let kinds: Vec<&Call> = opened.iter().map(|(_, c)| c).collect();
    use Call::{Polling, WebSocket};
    assert_eq!(
        kinds[..5],
        [&WebSocket, &Polling, &WebSocket, &WebSocket, &Polling],
        "{opened:?}"
    );
    assert!(
        kinds[5..].iter().all(|c| **c == WebSocket),
        "then probes again: {opened:?}"
    );
    let t: Vec<f64> = opened.iter().map(|(t, _)| *t).collect();
    // Probes every 30 s, jittered to between 15 and 45 s.
    assert_eq!(t[1], 1.1);
    assert!((16.1..=46.1).contains(&t[2]), "first probe at {}", t[2]);
    assert!(
        (15.0..=45.0).contains(&(t[3] - t[2])),
        "second probe at {}",
        t[3]
    );
    // The socket the probe opened is served at once; cut after 2 s, it does not get the
    // failures it takes to fall back again: it goes straight back to polling.
    assert_eq!(t[4], ((t[3] + 2.1) * 10.0).round() / 10.0);
    let live = engine
        .states()
        .into_iter()
        .filter(|(_, s)| *s == SyncState::Live)
        .count();
    assert_eq!(live, 2, "live in both sessions: {:?}", engine.states());
    let connected = engine
        .notes()
        .iter()
        .filter(|n| matches!(n, ClientEvent::Connected { .. }))
        .count();
    assert_eq!(connected, 2);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn resync_required_takes_a_snapshot_and_follows_the_branch_from_it() {
    let resync = ResyncRequired {
        branch: branch(),
        reason: ResyncReason::BelowFloor,
        epoch: Epoch(9),
        head: 40,
        floor: 30,
    };
    let hub = Hub::with_sockets([Dial::Open {
        handshake: Duration::ZERO,
        script: vec![(secs(1), Input::ResyncRequired(resync))],
    }]);
    let coffee = Sku::new("COFFEE").unwrap();
    let pinned = Position::new(Epoch(9), 40);
    *hub.snapshot.lock().unwrap() = Some((
        secs(2),
        Snapshot {
            position: Some(pinned),
            stock: vec![StockLevel::new(coffee.clone(), 5)],
            received: 1,
            total: 1,
            ..Snapshot::default()
        },
    ));
    let mut engine = Engine::start(opts(), hub);
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(engine.shared.status.borrow().state, SyncState::Resyncing);
    assert_eq!(engine.shared.status.borrow().lag, 40, "the head is 40");
    sleep(secs(10)).await;
    assert_eq!(
        engine.log.calls(),
        [
            (0.0, Call::WebSocket),
            (1.0, Call::Snapshot(branch())),
            (3.0, Call::Follow(branch(), pinned)),
        ]
    );
    let store = &engine.shared.store;
    assert_eq!(store.cursor(&branch()).unwrap(), Some(pinned));
    assert_eq!(
        store.confirmed_stock(&branch(), &coffee).unwrap(),
        Some(StockLevel::new(coffee.clone(), 5))
    );
    let notes = engine.notes();
    let told = |n: &ClientEvent| notes.iter().position(|m| m == n);
    let asked = told(&ClientEvent::ResyncRequired {
        branch: branch(),
        reason: ResyncReason::BelowFloor,
    });
    let done = told(&ClientEvent::Resynced {
        branch: branch(),
        position: pinned,
    });
    assert!(asked.is_some() && asked < done, "{notes:?}");
    let status = engine.shared.status.borrow().clone();
    assert_eq!((status.state, status.lag), (SyncState::Live, 0));
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn status_goes_connecting_live_offline_then_polling_and_offline_while_polls_fail() {
    let opts = opts()
        .websocket_failures_before_polling(2)
        .backoff(Backoff::constant(secs(1)));
    let hub = Hub::with_sockets([session(secs(1)), session(secs(1))]);
    hub.polls.lock().unwrap().push_back(vec![
        (secs(1), Input::Trouble("poll failed".into())),
        (
            secs(1),
            Input::Events {
                branch: branch(),
                events: Vec::new(),
                head: Some(0),
            },
        ),
    ]);
    let engine = Engine::start(opts, hub);
    sleep(secs(10)).await;
    use SyncState::{Connecting, Live, Offline, Polling};
    assert_eq!(
        engine.states(),
        [
            (0.0, Connecting),
            (0.1, Live),
            (1.1, Offline),
            (2.1, Connecting),
            (2.2, Live),
            (3.2, Polling),
            (4.2, Offline),
            (5.2, Polling),
        ]
    );
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_waits_for_a_new_one_and_is_then_tried_at_once() {
    let expired = Error::Hub {
        status: 401,
        code: ErrorCode::TokenExpired,
        message: "old".into(),
    };
    let hub = Hub::with_sockets([Dial::Fail(expired), session(secs(3600))]);
    let mut engine = Engine::start(opts(), hub);
    sleep(secs(600)).await;
    assert_eq!(engine.log.opened(), [(0.0, Call::WebSocket)], "no retries");
    assert!(engine.notes().contains(&ClientEvent::AuthFailed {
        code: ErrorCode::TokenExpired,
        message: "old".into(),
    }));
    assert_eq!(engine.shared.status.borrow().state, SyncState::Offline);
    engine.cmds.send(Command::TokenChanged).await.unwrap();
    sleep(secs(1)).await;
    assert_eq!(engine.log.opened().last(), Some(&(600.0, Call::WebSocket)));
    assert_eq!(engine.shared.status.borrow().state, SyncState::Live);
    engine.stop().await;
}

/// An event of `b1` at `(7, seq)` that changes nothing.
fn event(seq: u64) -> Event {
    Event {
        branch: branch(),
        epoch: Epoch(7),
        seq,
        event_id: Uuid::now_v7(),
        device: Name::new("till-2").unwrap(),
        device_seq: seq,
        client_time_ms: 0,
        server_time_ms: 0,
        base_seq: None,
        base_version: None,
        body: EventBody::Custom(Custom {
            custom_type: "t".into(),
            data: serde_json::Value::Null,
        }),
        effect: Effect {
            stock: Vec::new(),
            product: None,
            conflict: None,
        },
    }
}

#[tokio::test(start_paused = true)]
async fn a_gap_drops_a_socket_but_polling_asks_again_from_the_stored_position() {
    let gap = |seqs: &[u64]| Input::Events {
        branch: branch(),
        events: seqs.iter().map(|s| event(*s)).collect(),
        head: None,
    };
    let opts = opts().transport(options::Transport::WebSocketOnly);
    let hub = Hub::with_sockets([Dial::Open {
        handshake: Duration::ZERO,
        script: vec![(secs(1), gap(&[1, 3]))],
    }]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(2)).await;
    let at_1 = Position::new(Epoch(7), 1);
    assert_eq!(engine.shared.store.cursor(&branch()).unwrap(), Some(at_1));
    let lost = engine.notes().into_iter().find_map(|n| match n {
        ClientEvent::Disconnected { reason, .. } => Some(reason),
        _ => None,
    });
    assert_eq!(
        lost.as_deref(),
        Some("gap in b1: expected seq 2, got 3; resuming")
    );
    engine.stop().await;

    let opts = self::opts().transport(options::Transport::HttpOnly);
    let hub = Hub::default();
    hub.polls
        .lock()
        .unwrap()
        .push_back(vec![(secs(1), gap(&[1, 3]))]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(2)).await;
    assert_eq!(
        engine.log.calls(),
        [(0.0, Call::Polling), (1.0, Call::Applied(branch(), at_1))],
        "the run is applied as far as it follows, and polled again from there"
    );
    assert!(
        !engine
            .notes()
            .iter()
            .any(|n| matches!(n, ClientEvent::Disconnected { .. }))
    );
    engine.stop().await;
}
