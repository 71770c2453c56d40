//! One simulated device: a task that owns one WebSocket session and plays the roles its
//! [`Plan`] gives it — follower of branches, publisher to one branch, or both (a till) — and
//! reconnects and resumes when a storm tells it to.
//!
//! The loop reads whatever frames are ready, checks and counts them, then writes everything it
//! has to send (due publishes, acks) with one flush: never a flush per message.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use branchline_protocol::{Name, Position, Welcome};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::clock;
use crate::connect::{self, ConnectError, Endpoint, Pacer, Sources, Ws};
use crate::follow::{Arrival, Probe, Streams};
use crate::publish::{PublishPlan, Publisher};
use crate::stats::{OpenGuard, Stats};
use crate::wire::{self, BodyLite, Incoming};

/// Frames handled per wake-up before the session writes; bounds how long output waits.
const DRAIN: usize = 256;
/// Attempts refused with 503 before a connection counts as failed.
const MAX_RETRIES: u32 = 120;

/// Whether followers hold their connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Connected (or reconnecting).
    Up,
    /// Storm followers drop their sockets, all at once.
    Down,
}

/// What the orchestrator tells every session, through a `watch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    /// Publishers emit new events while this is set.
    pub publishing: bool,
    /// See [`Link`].
    pub link: Link,
    /// Every session closes and its task ends.
    pub stop: bool,
}

impl Default for Signal {
    fn default() -> Self {
        Self {
            publishing: true,
            link: Link::Up,
            stop: false,
        }
    }
}

/// What every session shares.
pub struct Shared {
    /// The hub.
    pub endpoint: Endpoint,
    /// The tenant of every token.
    pub tenant: Name,
    /// Counters and histograms.
    pub stats: Arc<Stats>,
    /// Local addresses for sockets.
    pub sources: Sources,
    /// Paces first connections.
    pub pacer: Pacer,
    /// The orchestrator's signal.
    pub signal: watch::Receiver<Signal>,
    /// How often followers ack their position (`None`: never).
    pub ack_every: Option<Duration>,
    /// Storm followers wait a random time up to this before reconnecting.
    pub jitter: Duration,
}

/// One device's role.
pub struct Plan {
    /// The device name (each simulated device has its own).
    pub device: Name,
    /// Its token.
    pub token: String,
    /// Branches it follows.
    pub follow: Vec<Name>,
    /// Where it resumes them from (`None`: live from the head).
    pub from: Option<Vec<Position>>,
    /// The branch it publishes to, if any.
    pub publish: Option<PublishPlan>,
    /// Its WebSocket read buffer, bytes.
    pub read_buffer: usize,
    /// Whether it drops and resumes on [`Link`] signals.
    pub storm: bool,
}

/// How a session ended.
enum Flow {
    /// The orchestrator said stop.
    Stop,
    /// The storm dropped it.
    LinkDown,
    /// It failed: the connection broke or the hub closed it.
    Failed(String),
}

/// Runs one device until the orchestrator stops it or its connection fails.
pub async fn run(shared: Arc<Shared>, plan: Plan, probe: Arc<Probe>) {
    let stats = shared.stats.clone();
    let mut signal = shared.signal.clone();
    let mut streams = Streams::new(
        plan.device.clone(),
        plan.follow.clone(),
        plan.from.clone(),
        stats.clone(),
        probe.clone(),
    );
    let mut publisher: Option<Publisher> = None;
    let mut reconnect = false;
    loop {
        if reconnect && !wait_to_reconnect(&shared, &mut signal).await {
            break;
        }
        let Some((mut ws, welcome)) =
            connect_retrying(&shared, &plan, &streams, &mut signal, !reconnect).await
        else {
            break;
        };
        if let Err(message) = streams.start(&welcome.branches) {
            stats.error(message);
            break;
        }
        if let (None, Some(p)) = (&publisher, &plan.publish) {
            publisher = Some(Publisher::new(
                p.clone(),
                plan.device.clone(),
                last_device_seq(&welcome, &p.branch) + 1,
                stats.clone(),
            ));
        }
        probe.connected.store(true, Ordering::Release);
        let open = OpenGuard::new(&stats);
        let flow = session(
            &shared,
            &plan,
            &mut ws,
            &mut streams,
            publisher.as_mut(),
            &probe,
            &signal,
        )
        .await;
        probe.connected.store(false, Ordering::Release);
        drop(open);
        match flow {
            Flow::Stop => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                break;
            }
            // Dropping the socket without a close frame is the point: a till that lost its
            // network.
            Flow::LinkDown => reconnect = true,
            Flow::Failed(message) => {
                if !signal.borrow().stop {
                    stats.error(format!("{}: {message}", plan.device));
                }
                break;
            }
        }
    }
    streams.flush();
    if let Some(p) = publisher.as_mut() {
        p.flush();
        probe
            .inflight
            .store(p.outstanding() as u64, Ordering::Release);
    }
    probe.done.store(true, Ordering::Release);
}

fn last_device_seq(welcome: &Welcome, branch: &Name) -> u64 {
    welcome
        .branches
        .iter()
        .find(|b| &b.branch == branch)
        .map_or(0, |b| b.last_device_seq)
}

/// Waits for the link to come back up, then a random jitter; `false` if told to stop.
async fn wait_to_reconnect(shared: &Shared, signal: &mut watch::Receiver<Signal>) -> bool {
    loop {
        let s = *signal.borrow_and_update();
        if s.stop {
            return false;
        }
        if s.link == Link::Up {
            break;
        }
        if signal.changed().await.is_err() {
            return false;
        }
    }
    let jitter = shared.jitter.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::select! {
        () = tokio::time::sleep(jitter) => true,
        stopped = stop_requested(signal) => !stopped,
    }
}

/// Resolves `true` once the orchestrator says stop (or is gone).
async fn stop_requested(signal: &mut watch::Receiver<Signal>) -> bool {
    loop {
        if signal.borrow_and_update().stop {
            return true;
        }
        if signal.changed().await.is_err() {
            return true;
        }
    }
}

/// Opens the session, retrying while the hub answers 503 `overloaded`. First connections wait
/// for the pacer; storm reconnects do not (they test the hub's limits).
async fn connect_retrying(
    shared: &Shared,
    plan: &Plan,
    streams: &Streams,
    signal: &mut watch::Receiver<Signal>,
    paced: bool,
) -> Option<(Ws, Welcome)> {
    let mut attempt = 0;
    loop {
        if paced {
            shared.pacer.wait().await;
        }
        if signal.borrow().stop {
            return None;
        }
        let hello = match wire::hello(
            &plan.token,
            &shared.tenant,
            &plan.device,
            streams.subscriptions(),
        ) {
            Ok(hello) => hello,
            Err(e) => {
                shared.stats.error(format!("{}: {e}", plan.device));
                return None;
            }
        };
        let source = shared.sources.next();
        match connect::open(&shared.endpoint, source, plan.read_buffer, hello).await {
            Ok(session) => return Some(session),
            Err(ConnectError::Overloaded(after)) if attempt < MAX_RETRIES => {
                attempt += 1;
                shared.stats.connect_retries.fetch_add(1, Ordering::Relaxed);
                // Honour Retry-After, spread so the retries do not come back as one wave.
                let wait = after.mul_f64(rand::rng().random_range(0.5..1.5));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    stopped = stop_requested(signal) => if stopped { return None },
                }
            }
            Err(e) => {
                if !signal.borrow().stop {
                    shared.stats.error(format!("{}: {e}", plan.device));
                }
                return None;
            }
        }
    }
}

/// Resolves when the signal changes, handing the receiver back (`false`: the orchestrator is
/// gone). Boxed and kept across loop turns, so the wait is not re-registered per frame.
fn signal_changed(
    mut rx: watch::Receiver<Signal>,
) -> BoxFuture<'static, (watch::Receiver<Signal>, bool)> {
    async move {
        let alive = rx.changed().await.is_ok();
        (rx, alive)
    }
    .boxed()
}

async fn session(
    shared: &Shared,
    plan: &Plan,
    ws: &mut Ws,
    streams: &mut Streams,
    mut publisher: Option<&mut Publisher>,
    probe: &Probe,
    signal: &watch::Receiver<Signal>,
) -> Flow {
    let mut out: Vec<Bytes> = Vec::new();
    let mut acks = shared
        .ack_every
        .filter(|_| !plan.follow.is_empty())
        .map(|every| {
            let mut i = tokio::time::interval_at(Instant::now() + every, every);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
    let mut acked: Vec<u64> = vec![0; plan.follow.len()];
    // A publisher created by an earlier session of a storm follower keeps its state; the
    // signal may have changed while it was away.
    if !signal.borrow().publishing {
        if let Some(p) = publisher.as_deref_mut() {
            p.stop();
        }
    }
    let mut changed = signal_changed(signal.clone());
    // One timer for the publisher's next due event, re-armed only when that time changes.
    let mut armed: Option<u64> = None;
    let timer = tokio::time::sleep_until(Instant::now() + Duration::from_secs(3_600));
    tokio::pin!(timer);
    loop {
        if let Some(p) = publisher.as_deref_mut() {
            if let Err(e) = p.fill(clock::now_ns(), &mut out) {
                return Flow::Failed(format!("cannot encode a publish: {e}"));
            }
            probe
                .inflight
                .store(p.outstanding() as u64, Ordering::Release);
        }
        if !out.is_empty() {
            for frame in out.drain(..) {
                if let Err(e) = ws.feed(Message::Binary(frame)).await {
                    return Flow::Failed(format!("write failed: {e}"));
                }
            }
            if let Err(e) = ws.flush().await {
                return Flow::Failed(format!("write failed: {e}"));
            }
        }
        let due = publisher.as_deref().and_then(Publisher::next_due);
        if due.is_some() && due != armed {
            if let Some(ns) = due {
                timer
                    .as_mut()
                    .reset(Instant::from_std(clock::instant_of(ns)));
            }
        }
        armed = due;
        tokio::select! {
            biased;
            (rx, alive) = &mut changed => {
                if !alive {
                    return Flow::Stop;
                }
                let s = *rx.borrow();
                if s.stop {
                    return Flow::Stop;
                }
                if plan.storm && s.link == Link::Down {
                    return Flow::LinkDown;
                }
                if !s.publishing {
                    if let Some(p) = publisher.as_deref_mut() {
                        p.stop();
                    }
                }
                changed = signal_changed(rx);
            }
            msg = ws.next() => {
                let mut flow = handle(msg, shared, streams, publisher.as_deref_mut());
                let mut n = 1;
                // Take what else is ready, so a publisher answers a burst of acks with one
                // flush.
                while flow.is_none() && n < DRAIN && publisher.is_some() {
                    match ws.next().now_or_never() {
                        Some(msg) => flow = handle(msg, shared, streams, publisher.as_deref_mut()),
                        None => break,
                    }
                    n += 1;
                }
                streams.publish_progress();
                if let Some(flow) = flow {
                    return flow;
                }
            }
            () = &mut timer, if armed.is_some() => armed = None,
            _ = async {
                match acks.as_mut() {
                    Some(i) => i.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                for (i, (branch, epoch, seq)) in streams.positions().enumerate() {
                    if acked.get(i).is_some_and(|&a| seq > a) {
                        match wire::ack(branch, epoch, seq) {
                            Ok(frame) => out.push(frame),
                            Err(e) => return Flow::Failed(format!("cannot encode an ack: {e}")),
                        }
                        acked[i] = seq;
                    }
                }
            }
        }
    }
}

/// Handles one read; `Some` when the session is over.
fn handle(
    msg: Option<Result<Message, WsError>>,
    shared: &Shared,
    streams: &mut Streams,
    publisher: Option<&mut Publisher>,
) -> Option<Flow> {
    let bytes = match msg {
        None => return Some(Flow::Failed("the hub closed the connection".into())),
        Some(Err(e)) => return Some(Flow::Failed(format!("connection lost: {e}"))),
        Some(Ok(Message::Binary(bytes))) => bytes,
        Some(Ok(Message::Close(frame))) => {
            let why = frame.map_or_else(
                || "no close code".to_owned(),
                |f| format!("{} {}", u16::from(f.code), f.reason),
            );
            return Some(Flow::Failed(format!("the hub closed the session: {why}")));
        }
        Some(Ok(Message::Text(_))) => {
            shared
                .stats
                .error("a text frame on a MessagePack session".to_owned());
            return None;
        }
        Some(Ok(_)) => return None,
    };
    frame(&bytes, shared, streams, publisher)
}

fn frame(
    bytes: &[u8],
    shared: &Shared,
    streams: &mut Streams,
    publisher: Option<&mut Publisher>,
) -> Option<Flow> {
    let now = clock::now_ns();
    let stats = &shared.stats;
    let f = match Incoming::decode(bytes) {
        Ok(f) => f,
        Err(e) => {
            stats.error(format!("a frame does not decode: {e}"));
            return None;
        }
    };
    match f.frame {
        "event" => match f.seq {
            Some(seq) => streams.event(
                f.branch,
                f.epoch,
                Arrival {
                    seq,
                    stamp: f.body.as_ref().and_then(BodyLite::stamp),
                    server_time_ms: f.server_time_ms,
                },
                now,
            ),
            None => stats.error("an event frame without seq".to_owned()),
        },
        "events" => streams.events(
            f.branch,
            f.epoch,
            f.events.iter().map(|e| Arrival {
                seq: e.seq,
                stamp: e.body.as_ref().and_then(BodyLite::stamp),
                server_time_ms: e.server_time_ms,
            }),
            now,
        ),
        "caught_up" => streams.caught_up(f.branch, f.seq.unwrap_or(0), now),
        "accepted" => match publisher {
            Some(p) => p.accepted(f.event_id, f.seq.unwrap_or(0), f.duplicate, now),
            None => stats.error("accepted without a publish".to_owned()),
        },
        "rejected" => match publisher {
            Some(p) => p.rejected(
                f.event_id,
                f.code.unwrap_or("?"),
                f.expected_device_seq,
                f.message.unwrap_or(""),
                now,
            ),
            None => stats.error("rejected without a publish".to_owned()),
        },
        "error" => {
            let what = format!(
                "error {}: {}",
                f.code.unwrap_or("?"),
                f.message.unwrap_or("")
            );
            if f.fatal {
                return Some(Flow::Failed(what));
            }
            stats.error(what);
        }
        "resync_required" => stats.error(format!(
            "resync_required on {} for a position the hub should serve",
            f.branch.unwrap_or("?")
        )),
        // welcome came before; subscribed, presence, devices, pong carry nothing to check.
        _ => {}
    }
    None
}
