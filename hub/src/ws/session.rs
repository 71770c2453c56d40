//! The session loop: subscriptions, frames from the client, answers to its publishes, and
//! writing, over any [`Socket`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Message;
use branchline_protocol::http::PushResult;
use branchline_protocol::{
    BranchKey, BranchStart, CaughtUp, ClientFrame, Codec, DecodeError, Devices, ErrorCode,
    ErrorFrame, Name, Pong, Presence, PresenceChange, Publish, Rejected, ResyncRequired, Role,
    ServerFrame, StartMode, Subscription, Unsubscribe, Welcome, now_ms,
};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use governor::{Quota, RateLimiter};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Socket;
use super::frames::encode;
use super::hello::{CLOSE_WAIT, Fatal, Greeted, close, too_big, wrong_message_kind};
use super::room::{Member, Outbound, SessionCtl};
use crate::auth::{Access, Claims};
use crate::branch::{Branch, Resume};
use crate::engine::Origin;
use crate::hub::Hub;

/// Outbound messages taken per round before writing, so one busy room cannot starve the
/// socket's reads.
const DRAIN: usize = 256;
/// A client silent for this many heartbeats is closed.
const IDLE_HEARTBEATS: u32 = 3;
/// Deliveries counted before they are added to the shared metric (and at every heartbeat and
/// at the end of the session).
pub(super) const DELIVERIES_LOT: u64 = 4_096;
/// Last-seen times are refreshed at most this often per session.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
>;

/// A followed branch.
pub(super) struct Sub {
    pub(super) branch: Arc<Branch>,
    pub(super) member: Arc<Member>,
    /// The last seq sent to the client.
    pub(super) delivered: u64,
    /// Set while the branch is fed from the log instead of live batches.
    pub(super) catching_since: Option<Instant>,
    /// When this branch last got a replay chunk: branches catching up take turns.
    pub(super) last_step: Option<Instant>,
}

/// One session.
pub(super) struct Session {
    pub(super) hub: Arc<Hub>,
    pub(super) codec: Codec,
    claims: Claims,
    pub(super) ctl: Arc<SessionCtl>,
    tx: mpsc::Sender<Outbound>,
    rx: mpsc::Receiver<Outbound>,
    pub(super) subs: HashMap<Name, Sub>,
    inflight: FuturesOrdered<BoxFuture<'static, PushResult>>,
    pub(super) out: Vec<Message>,
    limiter: Limiter,
    offset_ms: i64,
    last_heard: Instant,
    last_touch: Instant,
    pub(super) delivered_events: u64,
}

/// Serves a session whose hello was accepted, until it ends.
pub(super) fn admitted<S: Socket>(
    greeted: Greeted<S>,
    codec: Codec,
    hub: Arc<Hub>,
) -> impl Future<Output = ()> {
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
        hub.metrics().sessions.increment(1.0);
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
        hub.metrics().sessions.decrement(1.0);
    }
}

fn per_second(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n.max(1)).unwrap_or(std::num::NonZeroU32::MIN)
}

impl Session {
    fn new(hub: Arc<Hub>, codec: Codec, claims: Claims, offset_ms: i64) -> Self {
        let limits = &hub.config().limits;
        let ctl = Arc::new(SessionCtl::new(
            Uuid::now_v7(),
            limits.session_queue_events,
            hub.shutdown(),
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

    pub(super) fn push(&mut self, frame: &ServerFrame) {
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
        let limits = &self.hub.config().limits;
        let welcome = ServerFrame::Welcome(Welcome {
            protocol: branchline_protocol::PROTOCOL_VERSION,
            session_id: self.ctl.id,
            server_time_ms: now_ms(),
            heartbeat_ms: u64::try_from(limits.heartbeat.as_millis()).unwrap_or(u64::MAX),
            max_frame_bytes: limits.max_frame_bytes as u64,
            role: self.claims.role,
            branches,
        });
        self.push(&welcome);
        for (start, resync) in starts {
            self.after_start(&start, resync);
        }
        Ok(())
    }

    /// Starts following a branch: joins its room first, then asks the branch how the client
    /// is brought up to date from where it is.
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
        let branch = self
            .hub
            .branch(&key)
            .await
            .map_err(|e| (e.code(), e.to_string()))?;
        let member = Arc::new(Member::new(
            self.ctl.clone(),
            self.claims.device.clone(),
            self.claims.role,
            self.tx.clone(),
        ));
        self.hub.rooms().join(branch.key(), member.clone());
        let (head, resume) = branch.resume(sub.from);
        let (mode, delivered, resync) = match resume {
            Resume::After(seq) if seq == head => (StartMode::Live, seq, None),
            Resume::After(seq) => (StartMode::Replay, seq, None),
            Resume::Resync(resync) => (StartMode::ResyncRequired, 0, Some(resync)),
        };
        let start = BranchStart {
            branch: sub.branch.clone(),
            epoch: branch.epoch(),
            head,
            floor: branch.floor(),
            mode,
            last_device_seq: branch.last_device_seq(&self.claims.device),
        };
        if resync.is_some() {
            self.hub.rooms().leave(branch.key(), self.ctl.id);
            return Ok((start, resync));
        }
        let catching_since = (mode == StartMode::Replay).then(Instant::now);
        if catching_since.is_some() {
            self.hub.metrics().catchups.increment(1);
        }
        if branch.session_joined(&self.claims.device, self.claims.role) {
            self.presence(&branch, PresenceChange::Joined);
        }
        self.subs.insert(
            sub.branch,
            Sub {
                branch,
                member,
                delivered,
                catching_since,
                last_step: None,
            },
        );
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
                let devices = ServerFrame::Devices(Devices {
                    branch: start.branch.clone(),
                    head: sub.branch.head(),
                    devices: sub.branch.devices(),
                });
                self.push(&devices);
            }
        }
    }

    pub(super) fn unsubscribe(&mut self, branch: &Name) -> bool {
        let Some(sub) = self.subs.remove(branch) else {
            return false;
        };
        self.hub.rooms().leave(sub.branch.key(), self.ctl.id);
        if sub.branch.session_left(&self.claims.device) {
            self.presence(&sub.branch, PresenceChange::Left);
        }
        true
    }

    /// Tells the admins following `branch` that this device joined or left it.
    fn presence(&self, branch: &Branch, change: PresenceChange) {
        let Some(device) = branch.device_info(&self.claims.device) else {
            return;
        };
        let frame = ServerFrame::Presence(Presence {
            branch: branch.key().branch.clone(),
            change,
            device,
        });
        for admin in self.hub.rooms().admins(branch.key()) {
            if admin.ctl.id != self.ctl.id {
                admin.send_frame(frame.clone());
            }
        }
    }

    /// The main loop; returns the fatal error that ended it, if any.
    pub(super) async fn serve<S: Socket>(&mut self, ws: &mut S) -> Option<Fatal> {
        let heartbeat = self.hub.config().limits.heartbeat;
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let max_inflight = self.hub.config().limits.max_inflight_publishes;
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
                let stopping = self.hub.shutdown().is_cancelled();
                let deadline = if stopping {
                    CLOSE_WAIT
                } else {
                    self.hub.config().limits.too_slow_after
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
                        self.hub.metrics().too_slow.increment(1);
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
                // Boxed: a catch-up step reads the log; inline, its future would be part of
                // every idle session's task.
                _ = std::future::ready(()), if catching => Box::pin(self.catch_up_step()).await,
            }
            self.check_lagging();
        }
    }

    async fn write<S: Socket>(&mut self, ws: &mut S) -> Result<(), axum::Error> {
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
                self.error(ErrorCode::Malformed, wrong_message_kind(self.codec));
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
                Some(sub) if sub.branch.epoch() == ack.epoch => {
                    sub.branch.ack(
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
        self.hub.metrics().publish_answered(&answer);
        let frame = match answer {
            PushResult::Accepted(a) => ServerFrame::Accepted(a),
            PushResult::Rejected(r) => ServerFrame::Rejected(r),
        };
        self.push(&frame);
    }

    pub(super) fn error(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.push(&ServerFrame::Error(ErrorFrame {
            code,
            message: message.into(),
            fatal: false,
        }));
    }

    /// A frame that did not decode: a publish gets a `rejected` (in order with the other
    /// answers), anything else a non-fatal `error`.
    fn undecodable(&mut self, bytes: &[u8], e: &DecodeError) {
        let header = self.codec.frame_header(bytes);
        if header.frame_type.as_deref() == Some("publish") {
            let mut rejected = Rejected::bare(e.code(), e.to_string());
            rejected.event_id = header.event_id;
            rejected.branch = header.branch;
            self.answer_later(PushResult::Rejected(rejected));
        } else {
            self.error(e.code(), e.to_string());
        }
    }

    /// Queues an answer decided now behind the answers still pending, so that answers keep
    /// the order of the publishes.
    fn answer_later(&mut self, answer: PushResult) {
        self.inflight
            .push_back(futures::future::ready(answer).boxed());
    }

    async fn publish(&mut self, publish: Publish) {
        let refuse = |code: ErrorCode, message: String, p: &Publish| {
            PushResult::Rejected(Rejected::of(p.event_id, p.branch.clone(), code, message))
        };
        if self.limiter.check().is_err() {
            let answer = refuse(
                ErrorCode::RateLimited,
                "too many publishes; slow down".into(),
                &publish,
            );
            self.answer_later(answer);
            return;
        }
        if let Err(e) = self
            .claims
            .check_branch(&self.claims.tenant, &publish.branch)
        {
            self.answer_later(refuse(e.code(), e.to_string(), &publish));
            return;
        }
        let branch = match self.hub.branch(&self.key(&publish.branch)).await {
            Ok(branch) => branch,
            Err(e) => {
                self.answer_later(refuse(e.code(), e.to_string(), &publish));
                return;
            }
        };
        let origin = Origin {
            device: self.claims.device.clone(),
            offset_ms: self.offset_ms,
        };
        // Queued here, in the order the frames came; answered in that order too.
        let answer = branch.publish(publish, origin).await;
        self.inflight.push_back(answer);
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
        match self.hub.branch(&self.key(branch)).await {
            Ok(b) => {
                let frame = ServerFrame::Devices(Devices {
                    branch: branch.clone(),
                    head: b.head(),
                    devices: b.devices(),
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
                sub.branch.touch(&self.claims.device);
            }
        }
    }

    pub(super) fn flush_deliveries(&mut self) {
        if self.delivered_events > 0 {
            self.hub
                .metrics()
                .deliveries
                .increment(self.delivered_events);
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
