//! The background task: the one owner of the transport. It connects (WebSocket, or HTTP
//! polling when the socket cannot be held), resumes every followed branch from the stored
//! position, applies what arrives to the replica, drains the outbox, takes snapshots when a
//! branch must resync, and reports how it goes. Handles talk to it through a bounded
//! command channel and a [`Notify`]; it talks back through `watch` and `broadcast`
//! channels, which never block it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use branchline_protocol::http::PushResult;
use branchline_protocol::{
    Ack, BranchStart, ClientFrame, Codec, ErrorCode, Event, Hello, Name, Ping, Position, Rejected,
    ResyncRequired, Role, ServerFrame, StartMode, Subscription, TokenBranches, UnixMillis, Welcome,
};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::backoff::jitter;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::http::{HttpApi, Poll, Snapshot};
use crate::options::{ClientOptions, Endpoints, Transport};
use crate::publisher::{FrameLimit, Outcome, Publisher};
use crate::status::{ClientEvent, SnapshotProgress, SyncState, SyncStatus};
use crate::store::Store;
use crate::ws::{self, FrameSink, FrameStream};

/// Capacity of the command channel from handles to the task. Commands are rare (a token
/// change, shutdown) and the task serves them between any two frames, so a few slots are
/// plenty; [`Client::set_token`](crate::Client::set_token) never waits on it (the token
/// itself is written to [`Shared::token`], the command only wakes the task, and a full
/// channel already holds a wake-up), and [`Client::shutdown`](crate::Client::shutdown)
/// waits for a slot.
pub(crate) const COMMAND_QUEUE: usize = 16;

/// What the handles and the task share.
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub opts: ClientOptions,
    pub endpoints: Endpoints,
    pub tenant: Name,
    pub device: Name,
    pub role: Role,
    pub followed: Vec<Name>,
    /// The branches the token allows.
    pub allowed: TokenBranches,
    /// The token for the next connection or request; handles replace it.
    pub token: Arc<RwLock<String>>,
    pub http: HttpApi,
    pub status: watch::Sender<SyncStatus>,
    pub notices: broadcast::Sender<ClientEvent>,
    pub outbox_changed: Notify,
    pub clock: Clock,
    /// Snapshot downloads in progress, by branch. Kept outside the download futures (which
    /// die with their session) so that a download resumes from its last page token after a
    /// cut instead of starting over (PROTOCOL.md §11: a token is good for 10 minutes).
    /// A std mutex: held only to read or add a page, never across an `.await`.
    pub downloads: Mutex<HashMap<Name, Snapshot>>,
}

impl Shared {
    pub fn notify(&self, event: ClientEvent) {
        // No listener is fine: notifications are advisory, the status watch holds the truth.
        let _ = self.notices.send(event);
    }

    fn token(&self) -> String {
        self.token
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn download<T>(&self, branch: &Name, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        let mut downloads = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        f(downloads.entry(branch.clone()).or_default())
    }

    fn drop_download(&self, branch: &Name) -> Option<Snapshot> {
        self.downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(branch)
    }
}

/// Requests from handles.
pub(crate) enum Command {
    /// The token changed (it is already in [`Shared::token`]): end a wait for one.
    TokenChanged,
    /// Stop: close the connection, flush the store, answer.
    Shutdown(oneshot::Sender<()>),
}

/// How a session or a polling run ended.
enum End {
    Shutdown(Option<oneshot::Sender<()>>),
    /// Lost; `lived` says whether the connection had been useful for a while.
    Lost {
        reason: String,
        lived: bool,
    },
    Auth {
        code: ErrorCode,
        message: String,
    },
    /// Polling found the socket working again.
    Probe(Box<Connected>),
}

struct Connected {
    sink: FrameSink,
    stream: FrameStream,
    /// The encoding the hub selected.
    codec: Codec,
    welcome: Welcome,
}

type SnapshotFuture = BoxFuture<'static, (Name, Result<Snapshot>)>;
/// A batch push: (branch, events sent, the results).
type PushFuture = BoxFuture<'static, (Name, usize, Result<Vec<PushResult>>)>;
/// A `GET /v1/time` round trip: (sent, server, received).
type TimeFuture = BoxFuture<'static, Result<(UnixMillis, UnixMillis, UnixMillis)>>;

/// The background task's state.
pub(crate) struct Engine {
    shared: Arc<Shared>,
    cmds: mpsc::Receiver<Command>,
    log_tx: watch::Sender<u64>,
    publishers: BTreeMap<Name, Publisher>,
    heads: HashMap<Name, u64>,
    resyncing: HashSet<Name>,
    mode: SyncState,
    last_error: Option<String>,
    last_push_ms: Option<i64>,
    last_pull_ms: Option<i64>,
}

/// A WebSocket session lasting this long counts as a success: it resets the reconnect
/// backoff and the count of WebSocket failures. A shorter one (a socket that connects but
/// cannot be held: a proxy cutting upgraded connections, say) counts as a failure towards
/// [`ClientOptions::websocket_failures_before_polling`], like one that never opened.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

impl Engine {
    pub fn new(
        shared: Arc<Shared>,
        cmds: mpsc::Receiver<Command>,
        log_tx: watch::Sender<u64>,
    ) -> Self {
        Self {
            shared,
            cmds,
            log_tx,
            publishers: BTreeMap::new(),
            heads: HashMap::new(),
            resyncing: HashSet::new(),
            mode: SyncState::Connecting,
            last_error: None,
            last_push_ms: None,
            last_pull_ms: None,
        }
    }

    fn followed(&self, branch: &Name) -> bool {
        self.shared.followed.contains(branch)
    }

    fn publisher(&mut self, branch: &Name) -> &mut Publisher {
        self.publishers
            .entry(branch.clone())
            .or_insert_with(|| Publisher::new(branch.clone()))
    }

    /// A new connection: every publisher starts a new round (see [`Publisher::begin`]).
    fn begin_publishers(&mut self) -> Result<()> {
        let store = Arc::clone(&self.shared.store);
        let branches: Vec<Name> = self.publishers.keys().cloned().collect();
        for b in branches {
            let outcomes = self.publisher(&b).begin(&store)?;
            self.report(&b, outcomes);
        }
        Ok(())
    }

    /// Nothing in flight on `branch` will be answered: start a new round.
    fn reset_publisher(&mut self, branch: &Name) -> Result<()> {
        let store = Arc::clone(&self.shared.store);
        let outcomes = self.publisher(branch).reset(&store)?;
        self.report(branch, outcomes);
        Ok(())
    }

    /// Followed branches whose outbox waits: while a branch has no position yet or is being
    /// rebuilt from a snapshot, its publishes are held back, so that they are sequenced after
    /// the snapshot and come back through the event stream like every later event.
    fn held_branches(&self) -> HashSet<Name> {
        let mut held = self.resyncing.clone();
        for b in &self.shared.followed {
            if !matches!(self.shared.store.cursor(b), Ok(Some(_))) {
                held.insert(b.clone());
            }
        }
        held
    }

    fn set_mode(&mut self, mode: SyncState) {
        self.mode = mode;
        self.refresh_status();
    }

    /// Recomputes the status and publishes it if it changed.
    fn refresh_status(&self) {
        let store = &self.shared.store;
        let (pending, oldest) = store.pending_stats();
        let mut lag = 0;
        for b in &self.shared.followed {
            if let (Some(head), Ok(Some(c))) = (self.heads.get(b), store.cursor(b)) {
                lag += head.saturating_sub(c.seq);
            }
        }
        let state = if self.resyncing.is_empty() {
            self.mode
        } else {
            SyncState::Resyncing
        };
        let quarantined = store.quarantined_count() as u64;
        let offset = self.shared.clock.offset();
        self.shared.status.send_if_modified(|s| {
            let before = s.clone();
            s.state = state;
            s.pending = pending;
            s.oldest_pending_ms = oldest;
            s.quarantined = quarantined;
            s.last_push_ms = self.last_push_ms;
            s.last_pull_ms = self.last_pull_ms;
            s.lag = lag;
            s.clock_offset_ms = offset;
            s.last_error.clone_from(&self.last_error);
            if state != SyncState::Resyncing {
                s.snapshot = None;
            }
            *s != before
        });
    }

    /// Runs until shutdown or until every handle is dropped.
    pub async fn run(mut self) {
        let mut ws_failures = 0u32;
        let mut attempt = 0u32;
        let mut polling = self.shared.opts.transport == Transport::HttpOnly;
        let mut carried: Option<Box<Connected>> = None;
        self.refresh_status();
        let reply = loop {
            let over_websocket = carried.is_some() || !polling;
            let end = if let Some(conn) = carried.take() {
                self.session(*conn).await
            } else if polling {
                self.set_mode(SyncState::Polling);
                self.shared.notify(ClientEvent::Polling {
                    websocket_failures: ws_failures,
                });
                self.polling().await
            } else {
                self.set_mode(SyncState::Connecting);
                match self.connect_ws().await {
                    Ok(conn) => self.session(conn).await,
                    Err(end) => end,
                }
            };
            // Only a session that lived counts as the socket working: one that opened and
            // died at once fails like one that never opened.
            match &end {
                End::Lost { lived: true, .. } if over_websocket => ws_failures = 0,
                End::Lost { reason, .. } if over_websocket => {
                    ws_failures += 1;
                    if self.shared.opts.transport == Transport::Auto
                        && ws_failures >= self.shared.opts.websocket_failures_before_polling
                    {
                        tracing::info!(ws_failures, %reason, "switching to HTTP polling");
                        polling = true;
                        self.last_error = Some(reason.clone());
                        continue;
                    }
                }
                _ => {}
            }
            match end {
                End::Shutdown(reply) => break reply,
                End::Probe(conn) => {
                    // The failure count stays: the socket must hold for a while to reset it,
                    // and one more short session goes straight back to polling.
                    polling = false;
                    carried = Some(conn);
                }
                End::Lost { reason, lived } => {
                    attempt = if lived { 1 } else { attempt + 1 };
                    let delay = self.shared.opts.backoff.delay(attempt);
                    tracing::debug!(%reason, ?delay, "connection lost");
                    self.last_error = Some(reason.clone());
                    self.shared.notify(ClientEvent::Disconnected {
                        reason,
                        retry_in: delay,
                    });
                    self.set_mode(SyncState::Offline);
                    if let Some(reply) = self.wait(delay).await {
                        break reply;
                    }
                }
                End::Auth { code, message } => {
                    self.last_error = Some(format!("{code}: {message}"));
                    self.shared
                        .notify(ClientEvent::AuthFailed { code, message });
                    self.set_mode(SyncState::Offline);
                    match self.wait_for_token().await {
                        Some(reply) => break reply,
                        None => attempt = 0,
                    }
                }
            }
        };
        if let Err(e) = self.shared.store.flush().await {
            tracing::error!(error = %e, "flushing the store on shutdown");
        }
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }

    /// Sleeps `delay` while serving commands. `Some` if asked to shut down.
    async fn wait(&mut self, delay: Duration) -> Option<Option<oneshot::Sender<()>>> {
        tokio::select! {
            () = sleep(delay) => None,
            cmd = self.cmds.recv() => Self::wake(cmd),
        }
    }

    async fn wait_for_token(&mut self) -> Option<Option<oneshot::Sender<()>>> {
        let cmd = self.cmds.recv().await;
        Self::wake(cmd)
    }

    /// A command while waiting: a new token ends the wait (it deserves a prompt try).
    fn wake(cmd: Option<Command>) -> Option<Option<oneshot::Sender<()>>> {
        match cmd {
            None => Some(None),
            Some(Command::Shutdown(reply)) => Some(Some(reply)),
            Some(Command::TokenChanged) => None,
        }
    }

    /// A command while connected: `Some` if it ends the connection. A new token is used
    /// from the next connection or request on.
    fn handle_command(cmd: Option<Command>) -> Option<End> {
        match cmd {
            None => Some(End::Shutdown(None)),
            Some(Command::Shutdown(reply)) => Some(End::Shutdown(Some(reply))),
            Some(Command::TokenChanged) => None,
        }
    }

    // ---- WebSocket -----------------------------------------------------------------------

    /// Connects, says hello (resuming every branch with a position) and waits for welcome,
    /// serving commands meanwhile.
    async fn connect_ws(&mut self) -> Result<Connected, End> {
        let attempt = ws_attempt(Arc::clone(&self.shared));
        tokio::select! {
            r = attempt => r.map_err(auth_or_lost),
            cmd = self.cmds.recv() => Err(match Self::handle_command(cmd) {
                Some(end) => end,
                None => lost("interrupted by a new token", false),
            }),
        }
    }

    /// Serves one WebSocket session until it ends.
    async fn session(&mut self, conn: Connected) -> End {
        let Connected {
            mut sink,
            mut stream,
            codec,
            welcome,
        } = conn;
        let started = Instant::now();
        let opts = self.shared.opts.clone();
        let store = Arc::clone(&self.shared.store);
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(100));
        let idle = opts.idle_timeout.unwrap_or(heartbeat * 3);
        self.clock_sample(welcome.server_time_ms);
        self.last_error = None;
        self.shared.notify(ClientEvent::Connected {
            session_id: welcome.session_id,
        });
        let mut s = Session {
            subscribed: HashSet::new(),
            ack_dirty: HashSet::new(),
            snapshots: FuturesUnordered::new(),
            out: Vec::new(),
            pings: HashMap::new(),
            nonce: 0,
            codec,
            max_frame_bytes: welcome.max_frame_bytes,
        };
        if let Err(e) = self.begin_publishers() {
            return lost(e, false);
        }
        for start in welcome.branches {
            if let Err(e) = self.on_start(&mut s, &start) {
                return lost(e, false);
            }
        }
        for b in self.shared.followed.clone() {
            match store.cursor(&b) {
                Ok(None) if !self.resyncing.contains(&b) => self.start_snapshot(&mut s, b),
                Ok(_) => {}
                Err(e) => return lost(e, false),
            }
        }
        self.set_mode(SyncState::Live);
        let mut ack_tick = tokio::time::interval(opts.ack_interval);
        let mut ping_tick = tokio::time::interval(heartbeat);
        let mut last_heard = Instant::now();
        let end = loop {
            // Fill the publish windows of every branch with an outbox, followed or not.
            let now = Instant::now();
            let held = self.held_branches();
            for b in store.outbox_branches() {
                if held.contains(&b) {
                    continue;
                }
                // The hub closes the session on a frame over the limit its welcome gave
                // (PROTOCOL.md §4); such a publish is quarantined instead of sent.
                let limit = FrameLimit {
                    codec: s.codec,
                    max_bytes: s.max_frame_bytes,
                };
                match self
                    .publisher(&b)
                    .take(&store, opts.publish_window, now, Some(limit))
                {
                    Ok((events, outcomes)) => {
                        self.report(&b, outcomes);
                        s.out
                            .extend(events.iter().map(|e| ClientFrame::Publish(e.to_publish())));
                    }
                    Err(e) => return lost(e, false),
                }
            }
            if !s.out.is_empty() {
                let frames = std::mem::take(&mut s.out);
                let send = async {
                    // Sent marks are on disk before a publish they cover leaves.
                    store.sync_sent().await?;
                    for f in frames {
                        sink.feed(f).await?;
                    }
                    sink.flush().await
                };
                match timeout(idle, send).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break lost(e, started.elapsed() > HEALTHY_SESSION),
                    Err(_) => {
                        break End::Lost {
                            reason: format!("sending stalled for {idle:?}"),
                            lived: started.elapsed() > HEALTHY_SESSION,
                        };
                    }
                }
            }
            self.refresh_status();
            let retry_at = self
                .publishers
                .values()
                .filter_map(Publisher::retry_at)
                .min();
            tokio::select! {
                frame = stream.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(frame)) => {
                            if let Some(end) = self.on_frame(&mut s, frame, started) {
                                break end;
                            }
                        }
                        Some(Err(e)) => break lost(e, started.elapsed() > HEALTHY_SESSION),
                        None => break End::Lost { reason: "connection closed".into(), lived: started.elapsed() > HEALTHY_SESSION },
                    }
                }
                () = self.shared.outbox_changed.notified() => {}
                _ = ack_tick.tick() => {
                    for b in std::mem::take(&mut s.ack_dirty) {
                        if s.subscribed.contains(&b) {
                            if let Ok(Some(pos)) = store.cursor(&b) {
                                s.out.push(ClientFrame::Ack(Ack { branch: b, epoch: pos.epoch, seq: pos.seq }));
                            }
                        }
                    }
                }
                _ = ping_tick.tick() => {
                    s.nonce += 1;
                    let sent = branchline_protocol::now_ms();
                    s.pings.insert(s.nonce, sent);
                    s.out.push(ClientFrame::Ping(Ping { nonce: s.nonce, client_time_ms: sent }));
                }
                () = sleep_until(last_heard + idle) => {
                    break End::Lost { reason: format!("nothing from the hub for {idle:?}"), lived: started.elapsed() > HEALTHY_SESSION };
                }
                () = sleep_until(retry_at.unwrap_or(now)), if retry_at.is_some() => {}
                Some((branch, result)) = s.snapshots.next(), if !s.snapshots.is_empty() => {
                    match result {
                        Ok(snap) => match self.apply_snapshot(&branch, &snap) {
                            Ok(pos) => {
                                s.subscribed.insert(branch.clone());
                                s.out.push(ClientFrame::Subscribe(Subscription { branch, from: Some(pos) }));
                            }
                            Err(e) => break lost(e, false),
                        },
                        Err(e) => break auth_or_lost(e),
                    }
                }
                cmd = self.cmds.recv() => {
                    if let Some(end) = Self::handle_command(cmd) {
                        break end;
                    }
                }
            }
        };
        if matches!(end, End::Shutdown(_)) {
            let _ = timeout(Duration::from_secs(1), sink.close()).await;
        }
        // Unfinished snapshots die with the session (their pages so far are kept in
        // `Shared::downloads`); the next session resumes them.
        self.resyncing.clear();
        end
    }

    fn on_start(&mut self, s: &mut Session, start: &BranchStart) -> Result<()> {
        let branch = start.branch.clone();
        self.heads.insert(branch.clone(), start.head);
        let store = Arc::clone(&self.shared.store);
        self.publisher(&branch)
            .set_last_device_seq(&store, start.last_device_seq)?;
        if start.mode == StartMode::ResyncRequired {
            // The resync_required frame follows; start now so publishing holds from here.
            self.start_snapshot(s, branch);
        } else {
            s.subscribed.insert(branch);
        }
        Ok(())
    }

    fn on_frame(&mut self, s: &mut Session, frame: ServerFrame, started: Instant) -> Option<End> {
        let lived = started.elapsed() > HEALTHY_SESSION;
        let result: Result<Option<End>> = (|| {
            match frame {
                ServerFrame::Event(e) => {
                    let branch = e.branch.clone();
                    return self.on_events(s, &branch, vec![*e]);
                }
                ServerFrame::Events(batch) => {
                    return self.on_events(s, &batch.branch, batch.events);
                }
                ServerFrame::CaughtUp(c) => {
                    let pos = Position::new(c.epoch, c.seq);
                    let head = self.heads.entry(c.branch.clone()).or_insert(0);
                    *head = (*head).max(c.seq);
                    self.last_pull_ms = Some(self.shared.clock.now());
                    s.ack_dirty.insert(c.branch.clone());
                    self.shared.notify(ClientEvent::CaughtUp {
                        branch: c.branch,
                        position: pos,
                    });
                }
                ServerFrame::Accepted(a) => {
                    let branch = a.branch.clone();
                    self.on_answer(&branch, PushResult::Accepted(a))?;
                }
                ServerFrame::Rejected(r) => {
                    let branch = match (&r.branch, r.event_id) {
                        (Some(b), _) => Some(b.clone()),
                        (None, Some(id)) => self
                            .publishers
                            .iter()
                            .find(|(_, p)| p.is_in_flight(id))
                            .map(|(b, _)| b.clone()),
                        (None, None) => None,
                    };
                    match branch {
                        Some(b) => self.on_answer(&b, PushResult::Rejected(r))?,
                        None => {
                            // Not tied to an event we sent: report, and resend everything on a
                            // fresh connection to be safe.
                            return Ok(Some(End::Lost {
                                reason: format!(
                                    "hub refused an unidentified publish: {} {}",
                                    r.code, r.message
                                ),
                                lived,
                            }));
                        }
                    }
                }
                ServerFrame::ResyncRequired(r) => {
                    s.subscribed.remove(&r.branch);
                    self.on_resync_required(&r);
                    self.start_snapshot(s, r.branch);
                }
                ServerFrame::Subscribed(start) => self.on_start(s, &start)?,
                ServerFrame::Unsubscribed(u) => {
                    s.subscribed.remove(&u.branch);
                }
                ServerFrame::Presence(p) => self.shared.notify(ClientEvent::Presence(p)),
                ServerFrame::Devices(d) => self.shared.notify(ClientEvent::Devices(d)),
                ServerFrame::Pong(p) => {
                    if let Some(sent) = s.pings.remove(&p.nonce) {
                        let offset = self.shared.clock.sample(
                            sent,
                            p.server_time_ms,
                            branchline_protocol::now_ms(),
                        );
                        self.shared.store.set_clock_offset(offset)?;
                    }
                }
                ServerFrame::Error(e) => {
                    if !e.fatal {
                        self.shared.notify(ClientEvent::Error {
                            message: format!("{}: {}", e.code, e.message),
                        });
                    } else if matches!(
                        e.code,
                        ErrorCode::Unauthorized
                            | ErrorCode::TokenExpired
                            | ErrorCode::Forbidden
                            | ErrorCode::UnsupportedVersion
                    ) {
                        return Ok(Some(End::Auth {
                            code: e.code,
                            message: e.message,
                        }));
                    } else {
                        return Ok(Some(End::Lost {
                            reason: format!("{}: {}", e.code, e.message),
                            lived,
                        }));
                    }
                }
                ServerFrame::Welcome(_) => {}
            }
            Ok(None)
        })();
        result.unwrap_or_else(|e| Some(lost(e, lived)))
    }

    fn on_events(
        &mut self,
        s: &mut Session,
        branch: &Name,
        events: Vec<Event>,
    ) -> Result<Option<End>> {
        if self.resyncing.contains(branch) || !self.followed(branch) {
            return Ok(None);
        }
        if let Some(reason) = self.apply_events(branch, events)? {
            return Ok(Some(End::Lost {
                reason,
                lived: false,
            }));
        }
        s.ack_dirty.insert(branch.clone());
        Ok(None)
    }

    /// Applies events; `Some(reason)` if the stream broke its promise and must be resumed.
    fn apply_events(&mut self, branch: &Name, events: Vec<Event>) -> Result<Option<String>> {
        let last_seq = events.last().map(|e| e.seq);
        let applied = self.shared.store.apply_events(branch, events)?;
        if applied.applied > 0 {
            let end = self.shared.store.log_end();
            self.log_tx.send_replace(end);
        }
        if let Some(seq) = last_seq {
            let head = self.heads.entry(branch.clone()).or_insert(0);
            *head = (*head).max(seq);
        }
        self.last_pull_ms = Some(self.shared.clock.now());
        if let Some((want, got)) = applied.gap {
            tracing::error!(%branch, want, got, "the hub skipped events; resuming");
            return Ok(Some(format!(
                "gap in {branch}: expected seq {want}, got {got}; resuming"
            )));
        }
        if applied.epoch_mismatch {
            return Ok(Some(format!(
                "{branch} changed epoch without resync_required; resuming"
            )));
        }
        Ok(None)
    }

    fn on_answer(&mut self, branch: &Name, answer: PushResult) -> Result<()> {
        let followed = self.followed(branch);
        let backoff = self.shared.opts.backoff.clone();
        let store = Arc::clone(&self.shared.store);
        let outcomes =
            self.publisher(branch)
                .on_answer(&store, answer, followed, &backoff, Instant::now())?;
        self.report(branch, outcomes);
        Ok(())
    }

    fn report(&mut self, branch: &Name, outcomes: Vec<Outcome>) {
        for o in outcomes {
            match o {
                Outcome::Accepted {
                    event_id,
                    position,
                    duplicate,
                } => {
                    self.last_push_ms = Some(self.shared.clock.now());
                    self.shared.notify(ClientEvent::Accepted {
                        event_id,
                        position,
                        duplicate,
                    });
                }
                Outcome::Quarantined(q) => {
                    tracing::warn!(%branch, event_id = %q.event.event_id, code = %q.code, "event quarantined");
                    self.shared.notify(ClientEvent::Quarantined {
                        event_id: q.event.event_id,
                        code: q.code,
                        message: q.message,
                    });
                }
                Outcome::Renumbered { from } => self.shared.notify(ClientEvent::Renumbered {
                    branch: branch.clone(),
                    from,
                }),
                Outcome::Backoff { code, delay } => {
                    tracing::debug!(%branch, %code, ?delay, "publish refused for now; backing off");
                }
            }
        }
    }

    fn on_resync_required(&mut self, r: &ResyncRequired) {
        // A half-downloaded snapshot of another epoch is of no use any more.
        if self.shared.download(&r.branch, |d| {
            d.position.is_some_and(|p| p.epoch != r.epoch)
        }) {
            self.shared.drop_download(&r.branch);
        }
        self.heads.insert(r.branch.clone(), r.head);
        self.shared.notify(ClientEvent::ResyncRequired {
            branch: r.branch.clone(),
            reason: r.reason,
        });
    }

    fn start_snapshot(&mut self, s: &mut Session, branch: Name) {
        if !self.resyncing.insert(branch.clone()) {
            return;
        }
        s.snapshots
            .push(snapshot_future(Arc::clone(&self.shared), branch));
        self.refresh_status();
    }

    fn apply_snapshot(&mut self, branch: &Name, snap: &Snapshot) -> Result<Position> {
        self.resyncing.remove(branch);
        let position = snap
            .position
            .ok_or_else(|| Error::Network("snapshot without pages".into()))?;
        self.shared
            .store
            .apply_snapshot(branch, position, &snap.products, &snap.stock)?;
        self.log_tx.send_replace(self.shared.store.log_end());
        let head = self.heads.entry(branch.clone()).or_insert(0);
        *head = (*head).max(position.seq);
        self.shared.notify(ClientEvent::Resynced {
            branch: branch.clone(),
            position,
        });
        self.refresh_status();
        Ok(position)
    }

    fn clock_sample(&self, server_time_ms: i64) {
        // A welcome gives a one-way sample only; use it until a ping measures better.
        if self.shared.clock.offset().is_none() {
            let now = branchline_protocol::now_ms();
            let offset = self.shared.clock.sample(now, server_time_ms, now);
            let _ = self.shared.store.set_clock_offset(offset);
        }
    }

    // ---- HTTP polling --------------------------------------------------------------------

    /// Polls every followed branch and pushes the outbox over HTTP until the WebSocket
    /// probe succeeds (in [`Transport::Auto`]), shutdown, or an auth failure.
    async fn polling(&mut self) -> End {
        let end = self.polling_inner().await;
        // Unfinished snapshots die with the polling run (their pages so far are kept in
        // `Shared::downloads`); the next run resumes them.
        self.resyncing.clear();
        end
    }

    async fn polling_inner(&mut self) -> End {
        let opts = self.shared.opts.clone();
        let http = self.shared.http.clone();
        let store = Arc::clone(&self.shared.store);
        if let Err(e) = self.begin_publishers() {
            return lost(e, false);
        }
        let mut polls: FuturesUnordered<BoxFuture<'static, (Name, Result<Poll>)>> =
            FuturesUnordered::new();
        let mut snapshots: FuturesUnordered<SnapshotFuture> = FuturesUnordered::new();
        let mut push: Option<PushFuture> = None;
        // The clock is measured at the start and after each failed probe; the probe is a
        // WebSocket attempt. Both run inside the select below, so neither holds up polling,
        // pushing or shutdown.
        let mut clock: Option<TimeFuture> = Some(time_future(&http));
        let mut probe: Option<BoxFuture<'static, Result<Connected>>> = None;
        let mut poll_attempts: HashMap<Name, u32> = HashMap::new();
        let mut caught_up: HashSet<Name> = HashSet::new();
        let probing = opts.transport == Transport::Auto;
        // Jittered, so that tills that fell back together do not probe together.
        let mut next_probe = Instant::now() + jitter(opts.probe_interval);
        let mut push_single = false;

        let poll = |branch: Name, from: Position, wait: Duration, delay: Duration| {
            let http = http.clone();
            let limit = opts.poll_limit;
            async move {
                if !delay.is_zero() {
                    sleep(delay).await;
                }
                let r = http.events(&branch, from, limit, wait).await;
                (branch, r)
            }
            .boxed()
        };

        for b in self.shared.followed.clone() {
            match store.cursor(&b) {
                Ok(Some(pos)) => polls.push(poll(b, pos, Duration::ZERO, Duration::ZERO)),
                Ok(None) => {
                    self.resyncing.insert(b.clone());
                    snapshots.push(snapshot_future(Arc::clone(&self.shared), b));
                }
                Err(e) => return lost(e, false),
            }
        }
        loop {
            if push.is_none() {
                let now = Instant::now();
                let batch = if push_single { 1 } else { opts.push_batch };
                let held = self.held_branches();
                for branch in store.outbox_branches() {
                    if held.contains(&branch) {
                        continue;
                    }
                    // No frame limit: a push is bounded by the hub's body limit, and a
                    // single event over it is refused `message_too_big` (quarantined).
                    let events = match self.publisher(&branch).take(&store, batch, now, None) {
                        Ok((events, outcomes)) => {
                            self.report(&branch, outcomes);
                            events
                        }
                        Err(e) => return lost(e, false),
                    };
                    if !events.is_empty() {
                        let n = events.len();
                        let http = http.clone();
                        let store = Arc::clone(&store);
                        let time = self.shared.clock.now();
                        let publishes: Vec<_> = events.iter().map(|e| e.to_publish()).collect();
                        push = Some(
                            async move {
                                // Sent marks are on disk before the push leaves.
                                let r = match store.sync_sent().await {
                                    Ok(()) => {
                                        http.push(&branch, time, publishes).await.map(|r| r.results)
                                    }
                                    Err(e) => Err(e),
                                };
                                (branch, n, r)
                            }
                            .boxed(),
                        );
                        break;
                    }
                }
            }
            self.refresh_status();
            let retry_at = self
                .publishers
                .values()
                .filter_map(Publisher::retry_at)
                .min();
            tokio::select! {
                Some((branch, result)) = polls.next(), if !polls.is_empty() => {
                    match result {
                        Ok(Poll::Page(page)) => {
                            self.set_mode(SyncState::Polling);
                            self.heads.insert(branch.clone(), page.head);
                            poll_attempts.remove(&branch);
                            let empty = page.events.is_empty();
                            match self.apply_events(&branch, page.events) {
                                Ok(None) => {}
                                Ok(Some(reason)) => tracing::warn!(%branch, %reason, "polled page did not follow; polling again"),
                                Err(e) => return lost(e, false),
                            }
                            let pos = match store.cursor(&branch) {
                                Ok(Some(p)) => p,
                                Ok(None) => continue,
                                Err(e) => return lost(e, false),
                            };
                            if !page.has_more && pos.seq >= page.head {
                                if caught_up.insert(branch.clone()) || !empty {
                                    self.shared.notify(ClientEvent::CaughtUp { branch: branch.clone(), position: pos });
                                }
                            } else {
                                caught_up.remove(&branch);
                            }
                            let wait = if page.has_more { Duration::ZERO } else { opts.poll_wait };
                            polls.push(poll(branch, pos, wait, Duration::ZERO));
                        }
                        Ok(Poll::Resync(r)) => {
                            self.on_resync_required(&r);
                            caught_up.remove(&branch);
                            self.resyncing.insert(branch.clone());
                            snapshots.push(snapshot_future(Arc::clone(&self.shared), branch));
                            self.refresh_status();
                        }
                        Err(e) if e.is_auth() => return auth_or_lost(e),
                        Err(e) => {
                            let attempt = poll_attempts.entry(branch.clone()).or_insert(0);
                            *attempt += 1;
                            let delay = opts.backoff.delay(*attempt);
                            self.last_error = Some(e.to_string());
                            self.set_mode(SyncState::Offline);
                            match store.cursor(&branch) {
                                Ok(Some(pos)) => polls.push(poll(branch, pos, Duration::ZERO, delay)),
                                Ok(None) => {}
                                Err(e) => return lost(e, false),
                            }
                        }
                    }
                }
                Some((branch, result)) = snapshots.next(), if !snapshots.is_empty() => {
                    match result {
                        Ok(snap) => match self.apply_snapshot(&branch, &snap) {
                            Ok(pos) => polls.push(poll(branch, pos, Duration::ZERO, Duration::ZERO)),
                            Err(e) => return lost(e, false),
                        },
                        Err(e) => return auth_or_lost(e),
                    }
                }
                Some((branch, n, result)) = maybe(&mut push), if push.is_some() => {
                    push = None;
                    if let Err(e) = self.on_push(&branch, n, result, &mut push_single) {
                        return e;
                    }
                }
                Some(sample) = maybe(&mut clock), if clock.is_some() => {
                    clock = None;
                    if let Ok((sent, server, received)) = sample {
                        let offset = self.shared.clock.sample(sent, server, received);
                        let _ = store.set_clock_offset(offset);
                    }
                }
                () = sleep_until(next_probe), if probing && probe.is_none() => {
                    probe = Some(ws_attempt(Arc::clone(&self.shared)));
                }
                Some(attempt) = maybe(&mut probe), if probe.is_some() => {
                    probe = None;
                    match attempt {
                        Ok(conn) => return End::Probe(Box::new(conn)),
                        Err(e) if e.is_auth() => return auth_or_lost(e),
                        Err(e) => {
                            tracing::debug!(reason = %e, "WebSocket probe failed; still polling");
                            next_probe = Instant::now() + jitter(opts.probe_interval);
                            clock = Some(time_future(&http));
                        }
                    }
                }
                () = self.shared.outbox_changed.notified() => {}
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
                cmd = self.cmds.recv() => {
                    if let Some(end) = Self::handle_command(cmd) {
                        return end;
                    }
                }
            }
        }
    }

    /// Handles the outcome of a batch push. `Err` ends the polling run.
    fn on_push(
        &mut self,
        branch: &Name,
        n: usize,
        result: Result<Vec<PushResult>>,
        push_single: &mut bool,
    ) -> Result<(), End> {
        let store = Arc::clone(&self.shared.store);
        match result {
            Ok(results) => {
                *push_single = false;
                for r in results {
                    self.on_answer(branch, r).map_err(|e| lost(e, false))?;
                }
                // Results for events the hub did not answer (a short list) are unknown:
                // resend them.
                if self.publisher(branch).in_flight() > 0 {
                    self.reset_publisher(branch).map_err(|e| lost(e, false))?;
                }
            }
            // A permanent refusal of the whole request is a refusal of the events in it
            // (`forbidden`: the token does not allow the branch; `message_too_big`…): they
            // are quarantined, one at a time to find each culprit. This comes before the
            // credentials case, which is only `unauthorized`/`token_expired` here.
            Err(Error::Hub { code, message, .. }) if code.is_permanent() && n > 1 => {
                tracing::warn!(%branch, %code, %message, "batch push refused; pushing one by one");
                *push_single = true;
                self.reset_publisher(branch).map_err(|e| lost(e, false))?;
            }
            Err(Error::Hub { code, message, .. }) if code.is_permanent() => {
                let sent = self.publisher(branch).in_flight_ids();
                if let Some(id) = sent.first() {
                    let rejected = Rejected::of(*id, branch.clone(), code, message);
                    self.on_answer(branch, PushResult::Rejected(rejected))
                        .map_err(|e| lost(e, false))?;
                }
                *push_single = false;
            }
            Err(e) if e.is_auth() => return Err(auth_or_lost(e)),
            Err(e) => {
                self.last_error = Some(e.to_string());
                let backoff = self.shared.opts.backoff.clone();
                let outcomes = self
                    .publisher(branch)
                    .fail(&store, &backoff, Instant::now())
                    .map_err(|e| lost(e, false))?;
                self.report(branch, outcomes);
            }
        }
        Ok(())
    }
}

/// Per-session state of the WebSocket loop.
struct Session {
    /// Branches the hub is currently sending us.
    subscribed: HashSet<Name>,
    /// Branches with applied events not yet acknowledged.
    ack_dirty: HashSet<Name>,
    snapshots: FuturesUnordered<SnapshotFuture>,
    out: Vec<ClientFrame>,
    /// Ping nonce → device time sent.
    pings: HashMap<u64, i64>,
    nonce: u64,
    /// The encoding the hub selected.
    codec: Codec,
    /// The largest frame the hub takes (from `welcome`).
    max_frame_bytes: u64,
}

/// Awaits an optional future (for `select!` arms guarded by `is_some()`).
async fn maybe<T>(f: &mut Option<BoxFuture<'static, T>>) -> Option<T> {
    match f.as_mut() {
        Some(f) => Some(f.await),
        None => None,
    }
}

fn time_future(http: &HttpApi) -> TimeFuture {
    let http = http.clone();
    async move { http.time().await }.boxed()
}

/// One WebSocket attempt: connect, say hello (resuming every followed branch with a
/// position) and wait for `welcome`, all within the connect timeout. A free future, so
/// that polling can run it as its probe without holding the engine.
fn ws_attempt(shared: Arc<Shared>) -> BoxFuture<'static, Result<Connected>> {
    async move {
        let opts = &shared.opts;
        let limit = opts.connect_timeout;
        let attempt = async {
            let (mut sink, mut stream, codec) = ws::connect(
                &shared.endpoints.ws,
                opts.codec,
                branchline_protocol::DEFAULT_MAX_FRAME_BYTES,
            )
            .await?;
            let mut subscriptions = Vec::new();
            for b in &shared.followed {
                if let Some(pos) = shared.store.cursor(b)? {
                    subscriptions.push(Subscription {
                        branch: b.clone(),
                        from: Some(pos),
                    });
                }
            }
            let hello = ClientFrame::Hello(Hello {
                protocol: branchline_protocol::PROTOCOL_VERSION,
                token: shared.token(),
                tenant: shared.tenant.clone(),
                device: shared.device.clone(),
                client_time_ms: shared.clock.now(),
                subscriptions,
                agent: Some(opts.agent.clone()),
            });
            sink.send(hello).await?;
            match ws::next_frame(&mut stream, limit).await? {
                ServerFrame::Welcome(welcome) => Ok(Connected {
                    sink,
                    stream,
                    codec,
                    welcome,
                }),
                ServerFrame::Error(e) => Err(Error::Hub {
                    status: e.code.http_status(),
                    code: e.code,
                    message: e.message,
                }),
                other => Err(Error::Network(format!(
                    "expected welcome, got {}",
                    other.type_name()
                ))),
            }
        };
        timeout(limit, attempt)
            .await
            .unwrap_or_else(|_| Err(Error::Network(format!("no welcome within {limit:?}"))))
    }
    .boxed()
}

fn lost(e: impl std::fmt::Display, lived: bool) -> End {
    End::Lost {
        reason: e.to_string(),
        lived,
    }
}

/// A refused token ([`Error::is_auth`]) waits for a new one; anything else is retried.
fn auth_or_lost(e: Error) -> End {
    if !e.is_auth() {
        return lost(e, false);
    }
    match e {
        Error::Hub { code, message, .. } => End::Auth { code, message },
        other => lost(other, false),
    }
}

/// Downloads a whole snapshot, retrying network failures with backoff; progress goes to the
/// status watch. Pages are added to the branch's entry in [`Shared::downloads`] as they
/// come, so a download that is cut (this future dropped with its session, or a request
/// failing) resumes from the last page token; only an expired token (410
/// `snapshot_expired`) starts it over.
fn snapshot_future(shared: Arc<Shared>, branch: Name) -> SnapshotFuture {
    async move {
        let progress = |(received, total): (u64, u64)| {
            let branch = branch.clone();
            shared.status.send_modify(|s| {
                s.state = SyncState::Resyncing;
                s.snapshot = Some(SnapshotProgress {
                    branch,
                    received,
                    total,
                });
            });
        };
        let mut attempt = 0;
        loop {
            let (token, counts) =
                shared.download(&branch, |d| (d.next_page.clone(), (d.received, d.total)));
            progress(counts);
            match shared
                .http
                .snapshot_page(&branch, token.as_deref(), shared.opts.snapshot_page)
                .await
            {
                Ok(page) => {
                    attempt = 0;
                    let (done, counts) = shared.download(&branch, |d| {
                        d.add(page);
                        (d.is_complete(), (d.received, d.total))
                    });
                    progress(counts);
                    if done {
                        let snap = shared.drop_download(&branch).unwrap_or_default();
                        return (branch.clone(), Ok(snap));
                    }
                }
                Err(Error::Hub {
                    code: ErrorCode::SnapshotExpired,
                    ..
                }) => {
                    tracing::info!(%branch, "snapshot page token expired; starting over");
                    shared.drop_download(&branch);
                }
                Err(e) if e.is_auth() => return (branch.clone(), Err(e)),
                Err(e) => {
                    attempt += 1;
                    shared.notify(ClientEvent::Error {
                        message: format!("snapshot of {branch}: {e}"),
                    });
                    sleep(shared.opts.backoff.delay(attempt)).await;
                }
            }
        }
    }
    .boxed()
}
