//! One WebSocket session: hello, subscriptions, publishes, and delivery.
//!
//! A session is one task. It reads frames, hands publishes to branch writers (keeping up to
//! `max_inflight_publishes` answers pending, in order), and writes: every frame it has to send
//! is fed to the socket and flushed once per round, never per message.
//!
//! **Delivery.** For each followed branch the session keeps `delivered`, the last seq sent.
//! Live batches from the room are sent only if they continue exactly from `delivered`. When
//! they cannot — the subscription starts behind the head, the room cut the session over
//! because its queue was full, or anything else left a gap — the branch is *catching up*: the
//! session reads the log from `delivered` up to the committed head in chunks, drops the live
//! batches that arrive meanwhile (they are in the log too), and when it reaches the head sends
//! `caught_up` and goes back to live batches. Because the committer publishes a head before it
//! fans the events out, and the session joins the room before it reads the head, nothing is
//! lost or repeated in the hand-over (PROTOCOL.md §8).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use branchline_protocol::http::PushResult;
use branchline_protocol::{
    BranchStart, CaughtUp, ClientFrame, CloseCode, Codec, DecodeError, Devices, ErrorCode,
    ErrorFrame, Hello, Name, Pong, Presence, PresenceChange, Publish, Rejected, ResyncReason,
    ResyncRequired, Role, ServerFrame, StartMode, Subscription, Unsubscribe, Welcome, now_ms,
};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use governor::{Quota, RateLimiter};
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{Access, Claims};
use crate::branch::{BranchHandle, BranchShared, writer_gone};
use crate::log::BranchKey;
use crate::room::{FRAME_EVENT_BYTES, Member, Outbound, SessionCtl, events_message};
use crate::server::{ConnGuard, Hub};

/// Outbound messages taken per round before writing, so one busy room cannot starve the
/// socket's reads.
const DRAIN: usize = 256;
/// A client silent for this many heartbeats is closed.
const IDLE_HEARTBEATS: u32 = 3;
/// Deliveries counted before they are added to the shared metric (and at every heartbeat and
/// at the end of the session).
const DELIVERIES_LOT: u64 = 4_096;
/// How long a closing session waits for the client's close frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Last-seen times are refreshed at most this often per session.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A fatal error: sent as an `error` frame, then the matching close code.
struct Fatal {
    code: ErrorCode,
    message: String,
}

impl Fatal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
>;

struct Sub {
    handle: Arc<BranchHandle>,
    member: Arc<Member>,
    /// The last seq sent to the client.
    delivered: u64,
    /// Set while the branch is fed from the log instead of live batches.
    catching_since: Option<Instant>,
    /// When this branch last got a replay chunk: branches catching up take turns.
    last_step: Option<Instant>,
}

/// What to do with a live batch of seqs `first..=last` for one followed branch.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// Nothing new in it, or the branch is catching up (the log has these events too).
    Drop,
    /// It continues exactly from what was delivered.
    Whole,
    /// It overlaps what was delivered: send only the events after it.
    After(u64),
    /// It would leave a gap: catch up from the log instead.
    Gap,
}

/// Decides what a branch that delivered up to `delivered` does with a live batch.
fn take(delivered: u64, catching_up: bool, first: u64, last: u64) -> Take {
    if catching_up || last <= delivered {
        Take::Drop
    } else if first == delivered + 1 {
        Take::Whole
    } else if first <= delivered {
        Take::After(delivered)
    } else {
        Take::Gap
    }
}

struct Session {
    hub: Arc<Hub>,
    codec: Codec,
    claims: Claims,
    ctl: Arc<SessionCtl>,
    tx: mpsc::Sender<Outbound>,
    rx: mpsc::Receiver<Outbound>,
    subs: HashMap<Name, Sub>,
    inflight: FuturesOrdered<BoxFuture<'static, PushResult>>,
    out: Vec<Message>,
    limiter: Limiter,
    offset_ms: i64,
    last_heard: Instant,
    last_touch: Instant,
    delivered_events: u64,
}

/// Serves one upgraded WebSocket until it closes.
pub fn run(
    ws: WebSocket,
    codec: Codec,
    hub: Arc<Hub>,
    conn: ConnGuard,
) -> impl Future<Output = ()> {
    // The hello phase is boxed and the socket moved into it right here: an async fn keeps
    // room for its arguments for its whole life, and this future is part of the task of every
    // idle session.
    let greeting = Box::pin(greet(ws, codec, hub.clone()));
    async move {
        // `greeted` lives only inside the match, so its room is not kept beside the session's.
        let session = match greeting.await {
            Some(greeted) => {
                let span = greeted.span(codec);
                admitted(greeted, codec, hub).instrument(span)
            }
            None => return,
        };
        session.await;
        drop(conn);
    }
}

/// A session whose hello was accepted.
struct Greeted {
    ws: WebSocket,
    claims: Claims,
    subscriptions: Vec<Subscription>,
    offset_ms: i64,
}

impl Greeted {
    /// The tracing span the session runs in. A debug span: at the default log level it costs
    /// nothing, where an enabled span is entered and left on every poll of every session.
    fn span(&self, codec: Codec) -> tracing::Span {
        let branches: Vec<&str> = self
            .subscriptions
            .iter()
            .map(|s| s.branch.as_str())
            .collect();
        tracing::debug_span!(
            "session",
            tenant = %self.claims.tenant,
            device = %self.claims.device,
            role = ?self.claims.role,
            branches = %branches.join(","),
            codec = ?codec,
        )
    }
}

/// Reads and checks the hello; closes the socket with the right code if it is refused.
async fn greet(mut ws: WebSocket, codec: Codec, hub: Arc<Hub>) -> Option<Greeted> {
    let hello = match read_hello(&mut ws, codec, &hub).await {
        Some(Ok(hello)) => hello,
        Some(Err(fatal)) => {
            tracing::debug!(code = %fatal.code, message = %fatal.message, "hello refused");
            close(&mut ws, codec, &fatal, false).await;
            return None;
        }
        None => return None,
    };
    // Saturating: the client's time is whatever it says.
    let offset_ms = now_ms().saturating_sub(hello.client_time_ms);
    match admit(&hub, &hello) {
        Ok(claims) => Some(Greeted {
            ws,
            claims,
            subscriptions: hello.subscriptions,
            offset_ms,
        }),
        Err(fatal) => {
            tracing::debug!(code = %fatal.code, message = %fatal.message, "hello refused");
            close(&mut ws, codec, &fatal, false).await;
            None
        }
    }
}

/// Serves a session whose hello was accepted, until it ends.
fn admitted(greeted: Greeted, codec: Codec, hub: Arc<Hub>) -> impl Future<Output = ()> {
    // Built outside the async block so that each value is held once by the future (an async
    // fn would keep its argument and the values taken out of it).
    let Greeted {
        mut ws,
        claims,
        subscriptions,
        offset_ms,
    } = greeted;
    let mut session = Session::new(hub, codec, claims, offset_ms);
    async move {
        let hub = session.hub.clone();
        hub.metrics.sessions.increment(1.0);
        hub.register_session(
            &session.claims.tenant,
            &session.claims.device,
            session.ctl.clone(),
        );
        tracing::debug!(session = %session.ctl.id, "session open");
        // Boxed: the hello's subscriptions run once, and their future would otherwise be part
        // of every idle session's task.
        let fatal = match Box::pin(session.start(subscriptions)).await {
            Ok(()) => session.serve(&mut ws).await,
            Err(fatal) => Some(fatal),
        };
        match &fatal {
            Some(fatal) => {
                tracing::debug!(code = %fatal.code, message = %fatal.message, "session closed by the hub");
                session.out.clear();
                Box::pin(close(&mut ws, codec, fatal, true)).await;
            }
            None => tracing::debug!("session closed by the client"),
        }
        session.finish();
        hub.unregister_session(
            &session.claims.tenant,
            &session.claims.device,
            session.ctl.id,
        );
        hub.metrics.sessions.decrement(1.0);
    }
}

/// Reads the first frame, which must be a `hello`; `None` if the client went away.
async fn read_hello(ws: &mut WebSocket, codec: Codec, hub: &Hub) -> Option<Result<Hello, Fatal>> {
    let deadline = tokio::time::sleep(hub.config.limits.hello_timeout);
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => {
                return Some(Err(Fatal::new(ErrorCode::BadHello, "no hello within the deadline")));
            }
            _ = hub.shutdown.cancelled() => {
                return Some(Err(Fatal::new(ErrorCode::ShuttingDown, "the hub is shutting down")));
            }
            msg = ws.next() => msg,
        };
        let bytes = match msg? {
            Ok(Message::Binary(b)) if codec == Codec::MsgPack => b,
            Ok(Message::Text(t)) if codec == Codec::Json => bytes::Bytes::from(t),
            Ok(Message::Binary(_) | Message::Text(_)) => {
                return Some(Err(Fatal::new(
                    ErrorCode::BadHello,
                    wrong_message_kind(codec),
                )));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) => return None,
            Err(e) => return too_big(&e).map(Err),
        };
        return Some(match codec.decode_client_frame(&bytes) {
            Ok(ClientFrame::Hello(hello)) => Ok(hello),
            Ok(other) => Err(Fatal::new(
                ErrorCode::BadHello,
                format!("the first frame must be a hello, not {}", other.type_name()),
            )),
            Err(e) => Err(Fatal::new(
                ErrorCode::BadHello,
                format!("the hello does not decode: {e}"),
            )),
        });
    }
}

/// `Some(message_too_big)` if a read failed because the frame was over the limit.
fn too_big(e: &axum::Error) -> Option<Fatal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(cap)) = err.downcast_ref::<tungstenite::Error>() {
            return Some(Fatal::new(ErrorCode::MessageTooBig, cap.to_string()));
        }
        source = err.source();
    }
    None
}

use tokio_tungstenite::tungstenite;

fn wrong_message_kind(codec: Codec) -> String {
    match codec {
        Codec::MsgPack => "this session speaks MessagePack: send binary messages".into(),
        Codec::Json => "this session speaks JSON: send text messages".into(),
    }
}

/// Checks version, token, tenant, device and branches of a hello.
fn admit(hub: &Hub, hello: &Hello) -> Result<Claims, Fatal> {
    branchline_protocol::check_version(hello.protocol)
        .map_err(|m| Fatal::new(ErrorCode::UnsupportedVersion, m))?;
    let claims = hub
        .keys
        .verify(&hello.token)
        .map_err(|e| Fatal::new(e.code(), e.to_string()))?;
    if claims.tenant != hello.tenant {
        return Err(Fatal::new(
            ErrorCode::Forbidden,
            format!("the token is for tenant {}", claims.tenant),
        ));
    }
    if claims.device != hello.device {
        return Err(Fatal::new(
            ErrorCode::Forbidden,
            format!("the token is for device {}", claims.device),
        ));
    }
    for sub in &hello.subscriptions {
        claims
            .check_branch(&hello.tenant, &sub.branch)
            .map_err(|e| Fatal::new(e.code(), e.to_string()))?;
    }
    Ok(claims)
}

/// Sends an `error` frame and a close frame, best effort and bounded: a client that reads
/// nothing gets neither and is dropped after [`CLOSE_WAIT`].
async fn close(ws: &mut WebSocket, codec: Codec, fatal: &Fatal, after_hello: bool) {
    let frame = ServerFrame::Error(ErrorFrame {
        code: fatal.code,
        message: fatal.message.clone(),
        fatal: true,
    });
    let mut reason = fatal.message.clone();
    // A close reason is at most 123 bytes.
    while reason.len() > 120 {
        reason.pop();
    }
    let close = CloseFrame {
        code: CloseCode::for_error(fatal.code, after_hello).as_u16(),
        reason: reason.into(),
    };
    let sent = tokio::time::timeout(CLOSE_WAIT, async {
        if let Some(msg) = encode(codec, &frame) {
            ws.feed(msg).await?;
        }
        ws.feed(Message::Close(Some(close))).await?;
        ws.flush().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // Finish the closing handshake: wait (briefly) for the client's close before dropping the
    // connection. Dropping at once can reset it while the client still has our error and close
    // frames unread, and they would be lost.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn encode(codec: Codec, frame: &ServerFrame) -> Option<Message> {
    match codec.encode(frame) {
        Ok(bytes) if codec.is_binary() => Some(Message::Binary(bytes)),
        Ok(bytes) => axum::extract::ws::Utf8Bytes::try_from(bytes)
            .ok()
            .map(Message::Text),
        Err(e) => {
            tracing::error!(error = %e, frame = frame.type_name(), "cannot encode a frame");
            None
        }
    }
}

fn per_second(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n.max(1)).unwrap_or(std::num::NonZeroU32::MIN)
}

impl Session {
    fn new(hub: Arc<Hub>, codec: Codec, claims: Claims, offset_ms: i64) -> Self {
        let limits = &hub.config.limits;
        let ctl = Arc::new(SessionCtl::new(
            Uuid::now_v7(),
            limits.session_queue_events,
            &hub.shutdown,
        ));
        let (tx, rx) = mpsc::channel(limits.session_queue_events.max(1));
        let quota = Quota::per_second(per_second(limits.publish_rate))
            .allow_burst(per_second(limits.publish_burst));
        Self {
            codec,
            claims,
            ctl,
            tx,
            rx,
            subs: HashMap::new(),
            inflight: FuturesOrdered::new(),
            out: Vec::new(),
            limiter: RateLimiter::direct(quota),
            offset_ms,
            last_heard: Instant::now(),
            last_touch: Instant::now(),
            delivered_events: 0,
            hub,
        }
    }

    fn push(&mut self, frame: &ServerFrame) {
        if let Some(msg) = encode(self.codec, frame) {
            self.out.push(msg);
        }
    }

    fn key(&self, branch: &Name) -> BranchKey {
        BranchKey::new(self.claims.tenant.clone(), branch.clone())
    }

    /// Subscribes the hello's branches and sends `welcome`.
    async fn start(&mut self, subscriptions: Vec<Subscription>) -> Result<(), Fatal> {
        let mut starts = Vec::with_capacity(subscriptions.len());
        for sub in subscriptions {
            starts.push(
                self.subscribe(sub)
                    .await
                    .map_err(|(code, m)| Fatal::new(code, m))?,
            );
        }
        let branches = starts.iter().map(|(start, _)| start.clone()).collect();
        let welcome = ServerFrame::Welcome(Welcome {
            protocol: branchline_protocol::PROTOCOL_VERSION,
            session_id: self.ctl.id,
            server_time_ms: now_ms(),
            heartbeat_ms: u64::try_from(self.hub.config.limits.heartbeat.as_millis())
                .unwrap_or(u64::MAX),
            max_frame_bytes: self.hub.config.limits.max_frame_bytes as u64,
            role: self.claims.role,
            branches,
        });
        self.push(&welcome);
        for (start, resync) in starts {
            self.after_start(&start, resync);
        }
        Ok(())
    }

    /// Starts following a branch: joins its room first, then decides from the committed head
    /// how the client is brought up to date.
    async fn subscribe(
        &mut self,
        sub: Subscription,
    ) -> Result<(BranchStart, Option<ResyncRequired>), (ErrorCode, String)> {
        self.claims
            .check_branch(&self.claims.tenant, &sub.branch)
            .map_err(|e| (e.code(), e.to_string()))?;
        if self.subs.contains_key(&sub.branch) {
            self.unsubscribe(&sub.branch);
        }
        let key = self.key(&sub.branch);
        let handle = self
            .hub
            .branches
            .get(&key)
            .await
            .map_err(|e| (e.code(), e.to_string()))?;
        let shared = handle.shared.clone();
        let member = Arc::new(Member::new(
            self.ctl.clone(),
            self.claims.device.clone(),
            self.claims.role,
            self.tx.clone(),
        ));
        self.hub.rooms.join(&shared.key, member.clone());
        let committed = shared.committed();
        let floor = shared.floor();
        let (mode, delivered) = match sub.from {
            None => (StartMode::Live, committed),
            Some(p) if p.epoch != shared.epoch => (StartMode::ResyncRequired, 0),
            Some(p) if p.seq > committed || p.seq < floor => (StartMode::ResyncRequired, 0),
            Some(p) if p.seq == committed => (StartMode::Live, p.seq),
            Some(p) => (StartMode::Replay, p.seq),
        };
        let start = BranchStart {
            branch: sub.branch.clone(),
            epoch: shared.epoch,
            head: committed,
            floor,
            mode,
            last_device_seq: shared.last_device_seq(&self.claims.device),
        };
        if mode == StartMode::ResyncRequired {
            self.hub.rooms.leave(&shared.key, self.ctl.id);
            let reason = match sub.from {
                Some(p) if p.epoch != shared.epoch => ResyncReason::EpochMismatch,
                Some(p) if p.seq > committed => ResyncReason::AheadOfHead,
                _ => ResyncReason::BelowFloor,
            };
            let resync = ResyncRequired {
                branch: sub.branch,
                reason,
                epoch: shared.epoch,
                head: committed,
                floor,
            };
            return Ok((start, Some(resync)));
        }
        let catching_since = (mode == StartMode::Replay).then(Instant::now);
        self.subs.insert(
            sub.branch.clone(),
            Sub {
                handle,
                member,
                delivered,
                catching_since,
                last_step: None,
            },
        );
        if catching_since.is_some() {
            self.hub.metrics.catchups.increment(1);
        }
        if shared.session_joined(&self.claims.device, self.claims.role) {
            self.presence(&shared, PresenceChange::Joined);
        }
        Ok((start, None))
    }

    /// The frames that follow a branch start.
    fn after_start(&mut self, start: &BranchStart, resync: Option<ResyncRequired>) {
        match start.mode {
            StartMode::ResyncRequired => {
                if let Some(resync) = resync {
                    self.push(&ServerFrame::ResyncRequired(resync));
                }
            }
            StartMode::Live => {
                self.push(&ServerFrame::CaughtUp(CaughtUp {
                    branch: start.branch.clone(),
                    epoch: start.epoch,
                    seq: start.head,
                }));
            }
            StartMode::Replay => {}
        }
        if start.mode != StartMode::ResyncRequired && self.claims.role == Role::Admin {
            if let Some(sub) = self.subs.get(&start.branch) {
                let shared = &sub.handle.shared;
                let devices = ServerFrame::Devices(Devices {
                    branch: start.branch.clone(),
                    head: shared.committed(),
                    devices: shared.devices(),
                });
                self.push(&devices);
            }
        }
    }

    fn unsubscribe(&mut self, branch: &Name) -> bool {
        let Some(sub) = self.subs.remove(branch) else {
            return false;
        };
        let shared = &sub.handle.shared;
        self.hub.rooms.leave(&shared.key, self.ctl.id);
        if shared.session_left(&self.claims.device) {
            self.presence(shared, PresenceChange::Left);
        }
        true
    }

    /// Tells the admins following `branch` that this device joined or left it.
    fn presence(&self, shared: &BranchShared, change: PresenceChange) {
        let Some(device) = shared.device_info(&self.claims.device) else {
            return;
        };
        let frame = ServerFrame::Presence(Presence {
            branch: shared.key.branch.clone(),
            change,
            device,
        });
        for admin in self.hub.rooms.admins(&shared.key) {
            if admin.ctl.id != self.ctl.id {
                admin.send_frame(frame.clone());
            }
        }
    }

    /// The main loop; returns the fatal error that ended it, if any.
    async fn serve(&mut self, ws: &mut WebSocket) -> Option<Fatal> {
        let heartbeat = self.hub.config.limits.heartbeat;
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let max_inflight = self.hub.config.limits.max_inflight_publishes;
        let mut closing = false;
        // Made once: a fresh one per round would check the token under its lock every time.
        let cancelled = self.ctl.cancelled_owned();
        tokio::pin!(cancelled);
        loop {
            if !self.out.is_empty() {
                // A client that stops reading fills its socket and stalls this write; it is
                // given as long as a catching-up branch (or, once the hub stops, as long as a
                // close), then closed as too slow. Nothing else of the session runs meanwhile,
                // and nothing else of the hub waits for it.
                let stopping = self.hub.shutdown.is_cancelled();
                let deadline = if stopping {
                    CLOSE_WAIT
                } else {
                    self.hub.config.limits.too_slow_after
                };
                // The write is boxed: inline, it would grow every idle session's task.
                match tokio::time::timeout(deadline, Box::pin(self.write(ws))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "session write failed");
                        return None;
                    }
                    Err(_) if stopping => return None,
                    Err(_) => {
                        self.hub.metrics.too_slow.increment(1);
                        return Some(Fatal::new(
                            ErrorCode::TooSlow,
                            "the client read nothing for too long; reconnect and resume",
                        ));
                    }
                }
            }
            if closing && self.inflight.is_empty() {
                let (code, message) = self.ctl.reason();
                return Some(Fatal::new(code, message));
            }
            let catching = self.subs.values().any(|s| s.catching_since.is_some());
            let can_read = !closing && self.inflight.len() < max_inflight;
            tokio::select! {
                biased;
                _ = &mut cancelled, if !closing => closing = true,
                Some(answer) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.answer(answer);
                    // Answers of one commit are ready together: take them all, so that one
                    // write carries them instead of one write each. (Polled with this task's
                    // context: a no-op waker would be the one woken for later answers.)
                    while let std::task::Poll::Ready(Some(answer)) = futures::poll!(self.inflight.next()) {
                        self.answer(answer);
                    }
                }
                msg = ws.next(), if can_read => match msg {
                    Some(Ok(msg)) => {
                        self.last_heard = Instant::now();
                        // Boxed: handling a frame (a publish holds a whole event across its awaits) is
                        // short-lived; inline, its future would be part of every idle session's task.
                        match Box::pin(self.incoming(msg)).await {
                            Ok(true) => {}
                            Ok(false) => return None,
                            Err(fatal) => return Some(fatal),
                        }
                    }
                    Some(Err(e)) => return too_big(&e),
                    None => return None,
                },
                Some(out) = self.rx.recv() => {
                    self.outbound(out);
                    for _ in 0..DRAIN {
                        match self.rx.try_recv() {
                            Ok(out) => self.outbound(out),
                            Err(_) => break,
                        }
                    }
                }
                _ = ticker.tick() => {
                    if self.last_heard.elapsed() > heartbeat * IDLE_HEARTBEATS {
                        self.ctl.close(ErrorCode::IdleTimeout, "nothing heard from the client for three heartbeats");
                    } else {
                        self.out.push(Message::Ping(bytes::Bytes::new()));
                    }
                    self.flush_deliveries();
                }
                _ = std::future::ready(()), if catching => self.catch_up_step(),
            }
            self.check_lagging();
        }
    }

    async fn write(&mut self, ws: &mut WebSocket) -> Result<(), axum::Error> {
        for msg in self.out.drain(..) {
            ws.feed(msg).await?;
        }
        ws.flush().await?;
        // Counted locally and added to the shared counter in lots: one contended atomic per
        // write to every socket would cost more than the count is worth.
        if self.delivered_events >= DELIVERIES_LOT {
            self.flush_deliveries();
        }
        Ok(())
    }

    /// Handles one message from the client; `Ok(false)` when it closed.
    async fn incoming(&mut self, msg: Message) -> Result<bool, Fatal> {
        let bytes = match msg {
            Message::Binary(b) if self.codec == Codec::MsgPack => b,
            Message::Text(t) if self.codec == Codec::Json => bytes::Bytes::from(t),
            Message::Binary(_) | Message::Text(_) => {
                let frame = ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::Malformed,
                    message: wrong_message_kind(self.codec),
                    fatal: false,
                });
                self.push(&frame);
                return Ok(true);
            }
            Message::Ping(_) | Message::Pong(_) => return Ok(true),
            Message::Close(_) => return Ok(false),
        };
        self.touch();
        let frame = match self.codec.decode_client_frame(&bytes) {
            Ok(frame) => frame,
            Err(e) => {
                self.undecodable(&bytes, &e);
                return Ok(true);
            }
        };
        match frame {
            ClientFrame::Publish(publish) => self.publish(publish).await,
            ClientFrame::Subscribe(sub) => match self.subscribe(sub).await {
                Ok((start, resync)) => {
                    self.push(&ServerFrame::Subscribed(start.clone()));
                    self.after_start(&start, resync);
                }
                Err((code, message)) => self.error(code, message),
            },
            ClientFrame::Unsubscribe(u) => {
                self.unsubscribe(&u.branch);
                self.push(&ServerFrame::Unsubscribed(Unsubscribe { branch: u.branch }));
            }
            ClientFrame::Ack(ack) => match self.subs.get(&ack.branch) {
                Some(sub) if sub.handle.shared.epoch == ack.epoch => {
                    sub.handle.shared.ack(
                        &self.claims.device,
                        self.claims.role,
                        ack.seq.min(sub.delivered),
                    );
                }
                Some(_) => self.error(ErrorCode::ProtocolViolation, "ack of another epoch"),
                None => self.error(
                    ErrorCode::ProtocolViolation,
                    format!("ack for {}, which this session does not follow", ack.branch),
                ),
            },
            ClientFrame::ListDevices(list) => self.list_devices(&list.branch).await,
            ClientFrame::Ping(ping) => {
                let now = now_ms();
                self.offset_ms = now.saturating_sub(ping.client_time_ms);
                self.push(&ServerFrame::Pong(Pong {
                    nonce: ping.nonce,
                    client_time_ms: ping.client_time_ms,
                    server_time_ms: now,
                }));
            }
            ClientFrame::Hello(_) => self.error(
                ErrorCode::ProtocolViolation,
                "the session already said hello",
            ),
        }
        Ok(true)
    }

    fn answer(&mut self, answer: PushResult) {
        self.hub.metrics.publish_answered(&answer);
        let frame = match answer {
            PushResult::Accepted(a) => ServerFrame::Accepted(a),
            PushResult::Rejected(r) => ServerFrame::Rejected(r),
        };
        self.push(&frame);
    }

    fn error(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.push(&ServerFrame::Error(ErrorFrame {
            code,
            message: message.into(),
            fatal: false,
        }));
    }

    /// A frame that did not decode: a publish gets a `rejected` (in order with the other
    /// answers), anything else a non-fatal `error`.
    fn undecodable(&mut self, bytes: &[u8], e: &DecodeError) {
        let value: Option<serde_json::Value> = self.codec.decode(bytes).ok();
        let field = |name: &str| {
            value
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(|v| v.as_str())
        };
        if field("type") == Some("publish") {
            let rejected = PushResult::Rejected(Rejected {
                event_id: field("event_id").and_then(|s| Uuid::parse_str(s).ok()),
                branch: field("branch").and_then(|s| Name::new(s).ok()),
                code: e.code(),
                message: e.to_string(),
                expected_device_seq: None,
                conflict: None,
            });
            self.inflight
                .push_back(futures::future::ready(rejected).boxed());
        } else {
            self.error(e.code(), e.to_string());
        }
    }

    async fn publish(&mut self, publish: Publish) {
        let refuse = |code: ErrorCode, message: String, p: &Publish| {
            futures::future::ready(PushResult::Rejected(Rejected {
                event_id: Some(p.event_id),
                branch: Some(p.branch.clone()),
                code,
                message,
                expected_device_seq: None,
                conflict: None,
            }))
            .boxed()
        };
        if self.limiter.check().is_err() {
            let answer = refuse(
                ErrorCode::RateLimited,
                "too many publishes; slow down".into(),
                &publish,
            );
            self.inflight.push_back(answer);
            return;
        }
        if let Err(e) = self
            .claims
            .check_branch(&self.claims.tenant, &publish.branch)
        {
            let answer = refuse(e.code(), e.to_string(), &publish);
            self.inflight.push_back(answer);
            return;
        }
        let handle = match self.hub.branches.get(&self.key(&publish.branch)).await {
            Ok(handle) => handle,
            Err(e) => {
                let answer = refuse(e.code(), e.to_string(), &publish);
                self.inflight.push_back(answer);
                return;
            }
        };
        let (event_id, branch) = (publish.event_id, publish.branch.clone());
        let rx = handle
            .submit(publish, self.claims.device.clone(), self.offset_ms)
            .await;
        self.inflight.push_back(
            rx.map(move |r| r.unwrap_or_else(|_| writer_gone(Some(event_id), &branch)))
                .boxed(),
        );
    }

    async fn list_devices(&mut self, branch: &Name) {
        if let Err(e) = self
            .claims
            .require_admin()
            .and_then(|()| self.claims.check_branch(&self.claims.tenant, branch))
        {
            self.error(e.code(), e.to_string());
            return;
        }
        match self.hub.branches.get(&self.key(branch)).await {
            Ok(handle) => {
                let frame = ServerFrame::Devices(Devices {
                    branch: branch.clone(),
                    head: handle.shared.committed(),
                    devices: handle.shared.devices(),
                });
                self.push(&frame);
            }
            Err(e) => self.error(e.code(), e.to_string()),
        }
    }

    fn touch(&mut self) {
        if self.last_touch.elapsed() >= TOUCH_EVERY {
            self.last_touch = Instant::now();
            for sub in self.subs.values() {
                sub.handle.shared.touch(&self.claims.device);
            }
        }
    }

    fn outbound(&mut self, out: Outbound) {
        match out {
            Outbound::Frame(frame) => self.push(&frame),
            // The lagging member is picked up by `check_lagging` after this round.
            Outbound::Wake => {}
            Outbound::Live(batch) => {
                self.ctl.consumed(batch.len());
                let codec = self.codec;
                let Some(sub) = self.subs.get_mut(&batch.branch.branch) else {
                    return;
                };
                let msg = match take(
                    sub.delivered,
                    sub.catching_since.is_some(),
                    batch.first(),
                    batch.last(),
                ) {
                    Take::Drop => return,
                    Take::Whole => batch.message(codec),
                    Take::After(delivered) => batch.message_after(delivered, codec),
                    Take::Gap => {
                        sub.catching_since = Some(Instant::now());
                        self.hub.metrics.catchups.increment(1);
                        return;
                    }
                };
                if let Some(msg) = msg {
                    self.delivered_events += batch.last() - sub.delivered;
                    sub.delivered = batch.last();
                    self.out.push(msg);
                }
            }
        }
    }

    /// Branches the room cut over (queue full) start catching up from the log.
    fn check_lagging(&mut self) {
        for sub in self.subs.values_mut() {
            if sub.member.take_lagging() && sub.catching_since.is_none() {
                sub.catching_since = Some(Instant::now());
                self.hub.metrics.catchups.increment(1);
            }
        }
    }

    /// Sends one chunk of the log to the branch catching up that waited longest for one.
    fn catch_up_step(&mut self) {
        let limits = &self.hub.config.limits;
        let (chunk, too_slow_after) = (limits.replay_chunk_events, limits.too_slow_after);
        let Some(name) = self
            .subs
            .iter()
            .filter(|(_, s)| s.catching_since.is_some())
            .min_by_key(|(_, s)| s.last_step)
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        let codec = self.codec;
        let Some(sub) = self.subs.get_mut(&name) else {
            return;
        };
        sub.last_step = Some(Instant::now());
        let shared = sub.handle.shared.clone();
        let committed = shared.committed();
        if sub.delivered >= committed {
            sub.catching_since = None;
            let caught = ServerFrame::CaughtUp(CaughtUp {
                branch: name,
                epoch: shared.epoch,
                seq: sub.delivered,
            });
            self.push(&caught);
            return;
        }
        if sub
            .catching_since
            .is_some_and(|t| t.elapsed() > too_slow_after)
        {
            self.hub.metrics.too_slow.increment(1);
            self.ctl.close(
                ErrorCode::TooSlow,
                "the session could not keep up with its branches; reconnect and resume",
            );
            sub.catching_since = None;
            return;
        }
        let delivered = sub.delivered;
        let events = if delivered < shared.floor() {
            Ok(Vec::new())
        } else {
            self.hub
                .log
                .read_events(&shared.key, delivered, committed, chunk)
        };
        let mut events = match events {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, branch = %shared.key, "replay read failed");
                self.ctl
                    .close(ErrorCode::Internal, "the log cannot be read");
                return;
            }
        };
        // One replay frame carries at most FRAME_EVENT_BYTES (and at least one event).
        let mut bytes = 0;
        if let Some(cut) = events.iter().position(|e| {
            bytes += e.bytes.len();
            bytes > FRAME_EVENT_BYTES
        }) {
            events.truncate(cut.max(1));
        }
        let contiguous = events.first().is_some_and(|e| e.seq == delivered + 1)
            && events.windows(2).all(|w| w[1].seq == w[0].seq + 1);
        if !contiguous {
            // Retention trimmed what this session still needed.
            self.unsubscribe(&name);
            let resync = ServerFrame::ResyncRequired(ResyncRequired {
                branch: name,
                reason: ResyncReason::BelowFloor,
                epoch: shared.epoch,
                head: committed,
                floor: shared.floor(),
            });
            self.push(&resync);
            return;
        }
        let last = events.last().map_or(delivered, |e| e.seq);
        if let Some(msg) = events_message(codec, &name, shared.epoch, &events) {
            self.out.push(msg);
            sub.delivered = last;
            let n = last - delivered;
            self.delivered_events += n;
            self.hub.metrics.replayed.increment(n);
        }
    }

    fn flush_deliveries(&mut self) {
        if self.delivered_events > 0 {
            self.hub.metrics.deliveries.increment(self.delivered_events);
            self.delivered_events = 0;
        }
    }

    /// Leaves every room and tells admins.
    fn finish(&mut self) {
        self.flush_deliveries();
        let branches: Vec<Name> = self.subs.keys().cloned().collect();
        for branch in branches {
            self.unsubscribe(&branch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_batches_continue_the_stream_exactly_once() {
        assert_eq!(take(10, false, 11, 15), Take::Whole);
        assert_eq!(
            take(10, false, 5, 10),
            Take::Drop,
            "already delivered (late after a catch-up)"
        );
        assert_eq!(
            take(10, false, 8, 12),
            Take::After(10),
            "overlap: only 11 and 12"
        );
        assert_eq!(
            take(10, false, 12, 15),
            Take::Gap,
            "never skip: catch up instead"
        );
        assert_eq!(
            take(10, true, 11, 15),
            Take::Drop,
            "catch-up reads these from the log"
        );
    }
}
#[cfg(test)]
mod task_size {
    use super::*;

    fn future_size<F: Future>(_: impl FnOnce() -> F) -> usize {
        size_of::<F>()
    }

    /// Every connection's task holds the session future for its whole life, so its size is
    /// part of what an idle connection costs (DESIGN.md: at most 12 KiB in all). Rare, deep
    /// work (the hello, branch opening, handling a frame) is boxed to keep it out; this fails
    /// if a change pulls it back in.
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn the_session_future_stays_small() {
        let run = future_size(|| {
            run(
                unreachable!(),
                Codec::MsgPack,
                unreachable!(),
                unreachable!(),
            )
        });
        let serve = future_size(|| Session::serve(unreachable!(), unreachable!()));
        assert!(run <= 2048, "the session future is {run} bytes");
        assert!(serve <= 512, "the session loop future is {serve} bytes");
    }
}
