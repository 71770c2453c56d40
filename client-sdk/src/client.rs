//! [`Client`]: the cheap, clonable handle an app holds.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use branchline_protocol::http::BranchStatus;
use branchline_protocol::{
    ClientFrame, Devices, EventBody, Name, Position, ProductRecord, Publish, Role, Sku, StockLevel,
    TokenBranches,
};
use futures::Stream;
use futures::stream::BoxStream;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::Clock;
use crate::engine::{COMMAND_QUEUE, Command, Connector, Downloads, Shared};
use crate::error::{Error, Result};
use crate::http::HttpApi;
use crate::options::{self, ClientOptions, Endpoints, StorePath};
use crate::replica::{self, BranchState};
use crate::status::{ClientEvent, SyncStatus};
use crate::store::{PendingEvent, QuarantinedEvent, Store};
use crate::update::Update;

/// The envelope fields some kinds need (PROTOCOL.md §5): `base_seq` for `stock.counted`,
/// `base_version` for `product.*`. [`Client::publish_to`] fills them from the replica; give
/// them explicitly with [`Client::publish_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Base {
    /// For `stock.counted`: the last seq the device had applied when it counted.
    pub base_seq: Option<u64>,
    /// For `product.*`: the product version the write is based on (0 for none).
    pub base_version: Option<u64>,
}

struct Inner {
    shared: Arc<Shared>,
    cmds: mpsc::Sender<Command>,
    log: watch::Receiver<u64>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// A connection to a hub with a durable local outbox and replica. Clones share one
/// background task; it stops when [`Client::shutdown`] is called or every clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("tenant", &self.inner.shared.tenant)
            .field("device", &self.inner.shared.device)
            .field("branches", &self.inner.shared.followed)
            .finish()
    }
}

/// Connects to the hub at `url` with the options' defaults and `token`, keeping the store
/// in `./branchline-store`. Shorthand for `ClientOptions::new().token(token).connect(url)`.
pub async fn connect(url: &str, token: impl Into<String>) -> Result<Client> {
    ClientOptions::new().token(token).connect(url).await
}

impl ClientOptions {
    /// Opens the store and starts the background task. `url` is the hub's address:
    /// `http://host:port` or its WebSocket endpoint `ws://host:port/v1/ws`. `https://` and
    /// `wss://` are refused: the SDK is built without TLS (terminate TLS in front of the
    /// hub, or on a local proxy the till talks plain HTTP to).
    ///
    /// Returns at once, even offline: connecting happens in the background. Fails only for
    /// bad settings or a store that cannot be opened.
    pub async fn connect(self, url: &str) -> Result<Client> {
        Client::start(self, url).await
    }
}

impl Client {
    async fn start(opts: ClientOptions, url: &str) -> Result<Self> {
        let endpoints = Endpoints::parse(url)?;
        let token = opts
            .token
            .clone()
            .ok_or_else(|| Error::Config("a token is required".into()))?;
        let claims = options::claims(&token)?;
        if let Some(d) = &opts.device {
            if d != &claims.device {
                return Err(Error::Config(format!(
                    "device {d} is not the token's device {}",
                    claims.device
                )));
            }
        }
        let followed = match (&opts.branches, &claims.branches) {
            (Some(b), _) => b.clone(),
            (None, TokenBranches::List(b)) => b.clone(),
            (None, TokenBranches::All) => {
                return Err(Error::Config(
                    "the token allows every branch (\"*\"): name the branches to follow".into(),
                ));
            }
        };
        let store = match &opts.store {
            StorePath::Dir(p) => Store::open(p, opts.local_log_capacity, opts.durable_publish)?,
            StorePath::Temporary => Store::temporary(opts.local_log_capacity)?,
        };
        for b in store.outbox_branches() {
            if !followed.contains(&b) {
                store.retire_accepted(&b)?;
            }
        }
        let store = Arc::new(store);
        let token = Arc::new(RwLock::new(token));
        let http = HttpApi::new(
            &endpoints.http,
            claims.tenant.clone(),
            Arc::clone(&token),
            opts.codec,
            opts.connect_timeout,
        )?;
        let clock = Clock::with_offset(store.clock_offset()?);
        let (status, _) = watch::channel(SyncStatus::default());
        let (notices, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            store,
            opts,
            endpoints,
            tenant: claims.tenant,
            device: claims.device,
            role: claims.role,
            followed,
            allowed: claims.branches,
            token,
            http,
            status,
            notices,
            outbox_changed: Notify::new(),
            clock,
            downloads: Downloads::default(),
        });
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (log_tx, log_rx) = watch::channel(shared.store.log_end());
        let task = tokio::spawn(Connector::new(Arc::clone(&shared), cmd_rx, log_tx).run());
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                cmds: cmd_tx,
                log: log_rx,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The tenant (from the token).
    pub fn tenant(&self) -> &Name {
        &self.shared().tenant
    }

    /// This device (from the token).
    pub fn device(&self) -> &Name {
        &self.shared().device
    }

    /// The token's role.
    pub fn role(&self) -> Role {
        self.shared().role
    }

    /// The branches this client follows.
    pub fn branches(&self) -> &[Name] {
        &self.shared().followed
    }

    /// Records an event on the first followed branch (a till's own branch). See
    /// [`Client::publish_to`].
    pub async fn publish(&self, body: EventBody) -> Result<PendingEvent> {
        let branch = self
            .branches()
            .first()
            .cloned()
            .ok_or_else(|| Error::Config("this client follows no branch".into()))?;
        self.publish_to(&branch, body).await
    }

    /// Records an event for `branch`, filling `base_seq` (`stock.counted`: the replica's
    /// position) and `base_version` (`product.*`: the replica's product version, or 0) from
    /// the local replica.
    ///
    /// Returns once the event is in the local outbox (on disk, unless
    /// [`ClientOptions::durable_publish`] is off), with its `event_id` and `device_seq`
    /// assigned; it works offline. The background task sends it, in order, as soon as it
    /// can. The event is checked against its kind's rules first, so an event the hub would
    /// refuse as invalid is refused here, before it takes a `device_seq`.
    pub async fn publish_to(&self, branch: &Name, body: EventBody) -> Result<PendingEvent> {
        let store = &self.shared().store;
        let base = match &body {
            EventBody::StockCounted(_) => Base {
                base_seq: Some(store.cursor(branch)?.map_or(0, |p| p.seq)),
                base_version: None,
            },
            EventBody::ProductUpserted(p) => Base {
                base_seq: None,
                base_version: Some(
                    store
                        .confirmed_product(branch, &p.sku)?
                        .map_or(0, |p| p.version),
                ),
            },
            EventBody::ProductRemoved(p) => Base {
                base_seq: None,
                base_version: Some(
                    store
                        .confirmed_product(branch, &p.sku)?
                        .map_or(0, |p| p.version),
                ),
            },
            _ => Base::default(),
        };
        self.publish_with(branch, body, base).await
    }

    /// Records an event for `branch` with explicit envelope fields. See
    /// [`Client::publish_to`]. Besides the kind's rules, the event must fit
    /// [`ClientOptions::max_event_bytes`] ([`Error::EventTooBig`]).
    pub async fn publish_with(
        &self,
        branch: &Name,
        body: EventBody,
        base: Base,
    ) -> Result<PendingEvent> {
        body.validate(base.base_seq, base.base_version)
            .map_err(|e| Error::InvalidEvent(e.0))?;
        let shared = self.shared();
        if !shared.allowed.allows(branch) {
            return Err(Error::Config(format!(
                "the token does not allow publishing to branch {branch}"
            )));
        }
        let client_time_ms = shared.clock.now();
        // Measured as the frame that will be sent, with the widest `device_seq` (and any
        // event id, all of one length), so that renumbering cannot take it over the limit.
        let frame = ClientFrame::Publish(Publish {
            branch: branch.clone(),
            event_id: Uuid::nil(),
            device_seq: u64::MAX,
            client_time_ms,
            base_seq: base.base_seq,
            base_version: base.base_version,
            body: body.clone(),
        });
        let size = shared.opts.codec.encode(&frame)?.len();
        let limit = shared.opts.max_event_bytes;
        if size > limit {
            return Err(Error::EventTooBig { size, limit });
        }
        let entry = shared
            .store
            .record(
                branch,
                body,
                base.base_seq,
                base.base_version,
                client_time_ms,
            )
            .await?;
        let (pending, oldest) = shared.store.pending_stats();
        shared.status.send_modify(|s| {
            s.pending = pending;
            s.oldest_pending_ms = oldest;
        });
        shared.outbox_changed.notify_one();
        Ok(entry)
    }

    /// A stream of updates applied after this call: every sequenced event of the followed
    /// branches, in order, once, across reconnects and transport changes (and
    /// [`Update::Resynced`] where a snapshot replaced a run of events).
    pub fn events(&self) -> EventStream {
        self.events_from(self.shared().store.log_end())
    }

    /// Like [`Client::events`], from local log offset `offset` (see [`EventStream::offset`]):
    /// an app that remembers the offset of the last update it handled resumes after a restart
    /// without missing one, as long as the local log still holds it
    /// ([`ClientOptions::local_log_capacity`]).
    pub fn events_from(&self, offset: u64) -> EventStream {
        let store = Arc::clone(&self.shared().store);
        let rx = self.inner.log.clone();
        let stream = futures::stream::unfold(
            (store, rx, offset),
            |(store, mut rx, mut next)| async move {
                loop {
                    let start = store.log_start();
                    if next < start {
                        let missed = start - next;
                        next = start;
                        // Reported at the offset just before the first one still held.
                        return Some(((start - 1, Update::Lagged { missed }), (store, rx, next)));
                    }
                    if next < store.log_end() {
                        match store.log_entry(next) {
                            Ok(Some(u)) => {
                                let at = next;
                                next += 1;
                                return Some(((at, u), (store, rx, next)));
                            }
                            // Trimmed between the two reads: loop to report the lag.
                            Ok(None) => continue,
                            Err(e) => {
                                tracing::error!(error = %e, "reading the local log; ending the event stream");
                                return None;
                            }
                        }
                    }
                    if rx.changed().await.is_err() && next >= store.log_end() {
                        return None;
                    }
                }
            },
        );
        EventStream {
            inner: Box::pin(stream),
            offset,
        }
    }

    /// The sync status, as a `watch` (`borrow()` for now, `changed()` to wait).
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.shared().status.subscribe()
    }

    /// Connection and sync notifications from now on, in order. A listener that falls more
    /// than 1,024 behind misses the oldest (the status watch always has the current state).
    pub fn notifications(&self) -> BoxStream<'static, ClientEvent> {
        let rx = self.shared().notices.subscribe();
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => return Some((e, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }))
    }

    /// Where the replica of `branch` is (`None` before its first snapshot).
    pub fn position(&self, branch: &Name) -> Result<Option<Position>> {
        self.shared().store.cursor(branch)
    }

    /// The state of `branch` as this device sees it: confirmed by the hub, with this
    /// device's pending events laid on top (read-your-writes). The two parts are read
    /// together, so an event applied meanwhile shows once, never twice or not at all.
    pub fn state(&self, branch: &Name) -> Result<BranchState> {
        let (mut state, pending) = self.view(branch)?;
        state.overlay(self.device(), &pending);
        Ok(state)
    }

    /// The state of `branch` exactly as the hub confirmed it up to [`Client::position`].
    pub fn confirmed_state(&self, branch: &Name) -> Result<BranchState> {
        Ok(self.view(branch)?.0)
    }

    /// The confirmed state and the pending events, read at one instant.
    fn view(&self, branch: &Name) -> Result<(BranchState, Vec<PendingEvent>)> {
        let view = self.shared().store.branch_view(branch)?;
        let state = BranchState {
            position: view.position,
            products: view
                .products
                .into_iter()
                .map(|p| (p.sku.clone(), p))
                .collect(),
            stock: view.stock.into_iter().map(|s| (s.sku.clone(), s)).collect(),
            pending: 0,
        };
        Ok((state, view.pending))
    }

    /// One stock level, with pending local events applied (read consistently, as
    /// [`Client::state`]).
    pub fn stock(&self, branch: &Name, sku: &Sku) -> Result<Option<StockLevel>> {
        Ok(self.sku_state(branch, sku)?.1.remove(sku))
    }

    /// One product, with pending local events applied (read consistently, as
    /// [`Client::state`]).
    pub fn product(&self, branch: &Name, sku: &Sku) -> Result<Option<ProductRecord>> {
        Ok(self.sku_state(branch, sku)?.0.remove(sku))
    }

    fn sku_state(
        &self,
        branch: &Name,
        sku: &Sku,
    ) -> Result<(BTreeMap<Sku, ProductRecord>, BTreeMap<Sku, StockLevel>)> {
        let (product, stock, pending) = self.shared().store.sku_view(branch, sku)?;
        let mut products: BTreeMap<_, _> = product.map(|p| (sku.clone(), p)).into_iter().collect();
        let mut stock: BTreeMap<_, _> = stock.map(|s| (sku.clone(), s)).into_iter().collect();
        for e in &pending {
            replica::apply_pending(&mut products, &mut stock, self.device(), e);
        }
        Ok((products, stock))
    }

    /// Every event in the outbox (not yet seen sequenced), by branch and publish order.
    pub fn pending(&self) -> Vec<PendingEvent> {
        self.shared().store.all_pending()
    }

    /// Every quarantined event.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedEvent>> {
        self.shared().store.quarantined()
    }

    /// Sends a quarantined event again, at the end of its branch's outbox, with the next
    /// `device_seq` (after the app fixed what made the hub refuse it: a permission, say).
    ///
    /// An event quarantined `device_seq_reused` was sent before and the hub can no longer
    /// say whether it applied it: retrying it applies it again if it did. Check the
    /// branch's events first (drop it with [`Client::drop_quarantined`] if they hold it).
    pub fn retry_quarantined(&self, event_id: Uuid) -> Result<PendingEvent> {
        let e = self.shared().store.retry_quarantined(event_id)?;
        self.shared().outbox_changed.notify_one();
        Ok(e)
    }

    /// Deletes a quarantined event for good; returns it.
    pub fn drop_quarantined(&self, event_id: Uuid) -> Result<QuarantinedEvent> {
        let q = self.shared().store.drop_quarantined(event_id)?;
        let n = self.shared().store.quarantined_count() as u64;
        self.shared().status.send_modify(|s| s.quarantined = n);
        Ok(q)
    }

    /// Replaces the token (after `AuthFailed`, or before the old one expires). Used from the
    /// next connection or request on; a client waiting for a token after `AuthFailed`
    /// retries at once. Never blocks: the latest token wins.
    pub fn set_token(&self, token: impl Into<String>) -> Result<()> {
        let shared = self.shared();
        match shared.token.write() {
            Ok(mut t) => *t = token.into(),
            Err(p) => *p.into_inner() = token.into(),
        }
        match self.inner.cmds.try_send(Command::TokenChanged) {
            // A full queue already holds commands the task will wake for, and it reads the
            // token when it uses it: this one would say nothing more.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::Closed),
        }
    }

    /// Where `branch` stands on the hub (HTTP).
    pub async fn branch_status(&self, branch: &Name) -> Result<BranchStatus> {
        self.shared().http.branch_status(branch).await
    }

    /// The devices of `branch`, with presence and lag (HTTP; admins only).
    pub async fn devices(&self, branch: &Name) -> Result<Devices> {
        self.shared().http.devices(branch).await
    }

    /// Waits until every write to the local store so far is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.shared().store.flush().await
    }

    /// Stops the background task: closes the connection and flushes the store. Other clones
    /// stop working ([`Error::Closed`] where a call needs the task). Dropping every clone
    /// does the same without waiting.
    pub async fn shutdown(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        // Waits for a slot if the command queue is full (the task drains it promptly).
        if self.inner.cmds.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }
}

/// The stream of [`Update`]s returned by [`Client::events`]. Ends when the client shuts
/// down (after yielding what was applied).
pub struct EventStream {
    inner: BoxStream<'static, (u64, Update)>,
    offset: u64,
}

impl EventStream {
    /// The local log offset of the next update this stream will yield: store it with what
    /// the app did with the previous ones, and resume with [`Client::events_from`].
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Stream for EventStream {
    type Item = Update;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Update>> {
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some((at, u))) => {
                self.offset = at + 1;
                Poll::Ready(Some(u))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
