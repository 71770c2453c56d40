//! The handler: the one loop that serves a connection, whichever [`Transport`] it goes
//! over, until it ends. It applies what arrives, drains the outbox through the
//! publishers, takes snapshots when a branch must resync, and keeps the status current.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use branchline_protocol::http::PushResult;
use branchline_protocol::{
    BranchStart, ErrorCode, Event, Name, Position, Rejected, ResyncRequired, StartMode,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::apply::Applier;
use super::shared::{Commands, Reply, Shared, Wake};
use super::snapshot::SnapshotFuture;
use super::transport::{Input, Opening, Remote, Transport, maybe};
use crate::error::{Error, Result};
use crate::http::Snapshot;
use crate::publisher::{Outcome, Publisher};
use crate::status::{ClientEvent, SyncState};

/// A connection that lasted this long *lived*: it ends as a success, which resets the
/// reconnect backoff and the count of WebSocket failures. A shorter one (a socket that
/// connects but cannot be held: a proxy cutting upgraded connections, say) counts as a
/// failure towards [`ClientOptions::websocket_failures_before_polling`], like one that
/// never opened.
///
/// [`ClientOptions::websocket_failures_before_polling`]: crate::ClientOptions::websocket_failures_before_polling
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// How a connection ended.
pub(crate) enum End {
    /// Stop, and answer.
    Shutdown(Reply),
    /// Lost; `lived` says whether the connection had been useful for a while.
    Lost { reason: String, lived: bool },
    /// The hub refused the token: wait for a new one.
    Auth { code: ErrorCode, message: String },
    /// The probe found the socket working again.
    Upgrade(Box<dyn Transport>),
}

impl End {
    /// Lost, for `e`.
    pub fn lost(e: impl std::fmt::Display, lived: bool) -> Self {
        End::Lost {
            reason: e.to_string(),
            lived,
        }
    }

    /// A refused token ([`Error::is_auth`]) waits for a new one; anything else is retried.
    pub fn refused_or_lost(e: Error) -> Self {
        match e {
            e if !e.is_auth() => End::lost(e, false),
            Error::Hub { code, message, .. } => End::Auth { code, message },
            other => End::lost(other, false),
        }
    }
}

/// The state the loop keeps across connections.
pub(crate) struct Handler {
    shared: Arc<Shared>,
    remote: Arc<dyn Remote>,
    applier: Applier,
    publishers: BTreeMap<Name, Publisher>,
    /// Followed branches being rebuilt from a snapshot on this connection.
    resyncing: HashSet<Name>,
    snapshots: FuturesUnordered<SnapshotFuture>,
    mode: SyncState,
    last_error: Option<String>,
    last_push_ms: Option<i64>,
    /// When the connection being served opened.
    started: Instant,
}

impl Handler {
    pub fn new(shared: Arc<Shared>, remote: Arc<dyn Remote>, log_tx: watch::Sender<u64>) -> Self {
        Self {
            applier: Applier::new(Arc::clone(&shared), log_tx),
            shared,
            remote,
            publishers: BTreeMap::new(),
            resyncing: HashSet::new(),
            snapshots: FuturesUnordered::new(),
            mode: SyncState::Connecting,
            last_error: None,
            last_push_ms: None,
            started: Instant::now(),
        }
    }

    /// Serves `transport` until it ends, serving commands meanwhile. While polling,
    /// `probe` tries the socket; it ends the run when the socket works again.
    pub async fn serve(
        &mut self,
        mut transport: Box<dyn Transport>,
        mut probe: Option<Opening>,
        cmds: &mut Commands,
    ) -> End {
        self.started = Instant::now();
        let end = self.run(&mut *transport, &mut probe, cmds).await;
        if matches!(end, End::Shutdown(_)) {
            transport.close().await;
        }
        // Unfinished snapshots die with the connection (their pages so far are kept in
        // `Shared::downloads`); the next one resumes them.
        self.snapshots = FuturesUnordered::new();
        self.resyncing.clear();
        end
    }

    async fn run(
        &mut self,
        t: &mut dyn Transport,
        probe: &mut Option<Opening>,
        cmds: &mut Commands,
    ) -> End {
        if let Err(e) = self.open(t) {
            return End::lost(e, false);
        }
        loop {
            if let Err(e) = self.fill(t) {
                return End::lost(e, false);
            }
            if let Err(reason) = t.send().await {
                return End::lost(reason, self.lived());
            }
            self.refresh_status();
            let retry_at = self
                .publishers
                .values()
                .filter_map(Publisher::retry_at)
                .min();
            tokio::select! {
                input = t.next() => {
                    if let Some(end) = self.on_input(t, input) {
                        return end;
                    }
                }
                Some((branch, result)) = self.snapshots.next(), if !self.snapshots.is_empty() => {
                    match result {
                        Ok(snap) => match self.finish_snapshot(&branch, &snap) {
                            Ok(position) => t.follow(branch, position),
                            Err(e) => return End::lost(e, false),
                        },
                        Err(e) => return End::refused_or_lost(e),
                    }
                }
                Some(opened) = maybe(probe), if probe.is_some() => {
                    return match opened {
                        Ok(socket) => End::Upgrade(socket),
                        Err(e) => End::refused_or_lost(e),
                    };
                }
                () = self.shared.outbox_changed.notified() => {}
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
                wake = cmds.recv() => {
                    // A new token is used from the next connection or request on.
                    if let Wake::Stop(reply) = wake {
                        return End::Shutdown(reply);
                    }
                }
            }
        }
    }

    /// Whether the connection being served has lived (see [`HEALTHY_SESSION`]).
    fn lived(&self) -> bool {
        self.started.elapsed() > HEALTHY_SESSION
    }

    /// A new connection: take the hub's `welcome`, start every publisher's new round,
    /// and snapshot the followed branches without a position.
    fn open(&mut self, t: &mut dyn Transport) -> Result<()> {
        let welcome = t.welcome();
        if let Some(w) = &welcome {
            self.clock_sample(w.server_time_ms);
            self.last_error = None;
            self.shared.notify(ClientEvent::Connected {
                session_id: w.session_id,
            });
        }
        self.begin_publishers()?;
        for start in welcome.into_iter().flat_map(|w| w.branches) {
            self.on_start(&start)?;
        }
        for b in self.shared.followed.clone() {
            if self.shared.store.cursor(&b)?.is_none() {
                self.start_snapshot(b);
            }
        }
        self.set_mode(t.state());
        Ok(())
    }

    /// Acts on one input; `Some` if it ends the connection.
    fn on_input(&mut self, t: &mut dyn Transport, input: Input) -> Option<End> {
        let lived = self.lived();
        let result: Result<Option<End>> = match input {
            Input::Wake => Ok(None),
            Input::Start(start) => self.on_start(&start).map(|()| None),
            Input::Events {
                branch,
                events,
                head,
            } => self.on_events(t, &branch, events, head),
            Input::CaughtUp { branch, position } => {
                self.applier.caught_up(&branch, position);
                Ok(None)
            }
            Input::Answer(answer) => self.on_answer(answer, lived),
            Input::Answers { branch, answers } => self.on_answers(&branch, answers).map(|()| None),
            Input::Resend { branch } => self.reset_publisher(&branch).map(|()| None),
            Input::Unsent { branch, reason } => self.on_unsent(&branch, reason).map(|()| None),
            Input::ResyncRequired(r) => {
                self.on_resync_required(&r);
                self.start_snapshot(r.branch);
                Ok(None)
            }
            Input::Clock {
                sent,
                server,
                received,
            } => {
                let offset = self.shared.clock.sample(sent, server, received);
                self.shared.store.set_clock_offset(offset).map(|()| None)
            }
            Input::Notice(notice) => {
                self.shared.notify(notice);
                Ok(None)
            }
            Input::Trouble(reason) => {
                self.last_error = Some(reason);
                self.set_mode(SyncState::Offline);
                Ok(None)
            }
            Input::Refused(e) => Ok(Some(End::refused_or_lost(e))),
            Input::Lost(reason) => Ok(Some(End::Lost { reason, lived })),
        };
        result.unwrap_or_else(|e| Some(End::lost(e, lived)))
    }

    fn on_start(&mut self, start: &BranchStart) -> Result<()> {
        self.applier.set_head(&start.branch, start.head);
        let store = Arc::clone(&self.shared.store);
        self.publisher(&start.branch)
            .set_last_device_seq(&store, start.last_device_seq)?;
        if start.mode == StartMode::ResyncRequired {
            // The resync_required frame follows; start now so publishing holds from here.
            self.start_snapshot(start.branch.clone());
        }
        Ok(())
    }

    fn on_events(
        &mut self,
        t: &mut dyn Transport,
        branch: &Name,
        events: Vec<Event>,
        head: Option<u64>,
    ) -> Result<Option<End>> {
        if self.resyncing.contains(branch) || !self.shared.followed.contains(branch) {
            return Ok(None);
        }
        // A transport that delivers works, whatever trouble it had before.
        self.set_mode(t.state());
        if let Some(head) = head {
            self.applier.set_head(branch, head);
        }
        if let Some(reason) = self.applier.events(branch, events)? {
            if !t.resumes_in_place() {
                return Ok(Some(End::Lost {
                    reason,
                    lived: false,
                }));
            }
            tracing::warn!(%branch, %reason, "events did not follow; asking again");
        }
        if let Some(position) = self.shared.store.cursor(branch)? {
            if t.applied(branch, position) {
                self.applier.caught_up(branch, position);
            }
        }
        Ok(None)
    }

    fn on_resync_required(&mut self, r: &ResyncRequired) {
        self.shared.downloads.forget_other_epoch(&r.branch, r.epoch);
        self.applier.set_head(&r.branch, r.head);
        self.shared.notify(ClientEvent::ResyncRequired {
            branch: r.branch.clone(),
            reason: r.reason,
        });
    }

    fn start_snapshot(&mut self, branch: Name) {
        if !self.resyncing.insert(branch.clone()) {
            return;
        }
        self.snapshots.push(self.remote.snapshot(branch));
        self.refresh_status();
    }

    fn finish_snapshot(&mut self, branch: &Name, snap: &Snapshot) -> Result<Position> {
        self.resyncing.remove(branch);
        let position = self.applier.snapshot(branch, snap)?;
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

    // ---- publishing -------------------------------------------------------------------------

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

    /// Hands the transport what it has room for from every branch with an outbox,
    /// followed or not.
    fn fill(&mut self, t: &mut dyn Transport) -> Result<()> {
        let store = Arc::clone(&self.shared.store);
        let now = Instant::now();
        let held = self.held_branches();
        for b in store.outbox_branches() {
            if held.contains(&b) {
                continue;
            }
            let Some(room) = t.room() else {
                break;
            };
            let (events, outcomes) =
                self.publisher(&b)
                    .take(&store, room.window, now, room.limit)?;
            self.report(&b, outcomes);
            if !events.is_empty() {
                t.publish(&b, &events);
            }
        }
        Ok(())
    }

    /// One answer. A refusal names its branch, or an event in flight.
    fn on_answer(&mut self, answer: PushResult, lived: bool) -> Result<Option<End>> {
        let branch = match &answer {
            PushResult::Accepted(a) => a.branch.clone(),
            PushResult::Rejected(r) => match self.branch_of(r) {
                Some(b) => b,
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
            },
        };
        self.answer(&branch, answer).map(|()| None)
    }

    /// The branch a refusal is about: the one it names, or the one its event is in flight on.
    fn branch_of(&self, r: &Rejected) -> Option<Name> {
        match (&r.branch, r.event_id) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(id)) => self
                .publishers
                .iter()
                .find(|(_, p)| p.is_in_flight(id))
                .map(|(b, _)| b.clone()),
            (None, None) => None,
        }
    }

    /// The answers to a whole batch.
    fn on_answers(&mut self, branch: &Name, answers: Vec<PushResult>) -> Result<()> {
        for a in answers {
            self.answer(branch, a)?;
        }
        // Results for events the hub did not answer (a short list) are unknown: resend them.
        if self.publisher(branch).in_flight() > 0 {
            self.reset_publisher(branch)?;
        }
        Ok(())
    }

    fn answer(&mut self, branch: &Name, answer: PushResult) -> Result<()> {
        let followed = self.shared.followed.contains(branch);
        let backoff = self.shared.opts.backoff.clone();
        let store = Arc::clone(&self.shared.store);
        let outcomes =
            self.publisher(branch)
                .on_answer(&store, answer, followed, &backoff, Instant::now())?;
        self.report(branch, outcomes);
        Ok(())
    }

    /// A send failed for now: back off, then resend.
    fn on_unsent(&mut self, branch: &Name, reason: String) -> Result<()> {
        self.last_error = Some(reason);
        let backoff = self.shared.opts.backoff.clone();
        let store = Arc::clone(&self.shared.store);
        let outcomes = self
            .publisher(branch)
            .fail(&store, &backoff, Instant::now())?;
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

    // ---- status -----------------------------------------------------------------------------

    pub fn set_mode(&mut self, mode: SyncState) {
        self.mode = mode;
        self.refresh_status();
    }

    /// The last error met talking to the hub, for the status.
    pub fn set_error(&mut self, error: String) {
        self.last_error = Some(error);
    }

    /// Recomputes the status and publishes it if it changed.
    pub fn refresh_status(&self) {
        let store = &self.shared.store;
        let (pending, oldest) = store.pending_stats();
        let lag = self.applier.lag();
        let state = if self.resyncing.is_empty() {
            self.mode
        } else {
            SyncState::Resyncing
        };
        let quarantined = store.quarantined_count() as u64;
        let offset = self.shared.clock.offset();
        let last_pull_ms = self.applier.last_pull_ms();
        self.shared.status.send_if_modified(|s| {
            let before = s.clone();
            s.state = state;
            s.pending = pending;
            s.oldest_pending_ms = oldest;
            s.quarantined = quarantined;
            s.last_push_ms = self.last_push_ms;
            s.last_pull_ms = last_pull_ms;
            s.lag = lag;
            s.clock_offset_ms = offset;
            s.last_error.clone_from(&self.last_error);
            if state != SyncState::Resyncing {
                s.snapshot = None;
            }
            *s != before
        });
    }
}
