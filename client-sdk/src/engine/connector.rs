//! The connector: the background task's outer loop. It picks the transport (a WebSocket,
//! or HTTP polling once the socket cannot be held), hands each connection to the
//! [`Handler`] and decides what follows its end: a backoff, a switch to polling, waiting
//! for a new token, or going back to the socket a polling probe found working.

use std::sync::Arc;
use std::time::Duration;

use branchline_protocol::Name;
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep;

use super::handler::{End, Handler};
use super::shared::{Command, Commands, Reply, Shared, Wake};
use super::snapshot::{self, SnapshotFuture};
use super::transport::polling::Polling;
use super::transport::{Opening, Remote, Transport, websocket};
use crate::backoff::jitter;
use crate::error::Result;
use crate::options;
use crate::status::{ClientEvent, SyncState};

/// The background task.
pub(crate) struct Connector {
    shared: Arc<Shared>,
    remote: Arc<dyn Remote>,
    handler: Handler,
    cmds: Commands,
}

impl Connector {
    pub fn new(
        shared: Arc<Shared>,
        cmds: mpsc::Receiver<Command>,
        log_tx: watch::Sender<u64>,
    ) -> Self {
        let remote = Arc::new(Network(Arc::clone(&shared)));
        Self::with_remote(shared, remote, cmds, log_tx)
    }

    /// A task that reaches the hub through `remote`.
    pub(super) fn with_remote(
        shared: Arc<Shared>,
        remote: Arc<dyn Remote>,
        cmds: mpsc::Receiver<Command>,
        log_tx: watch::Sender<u64>,
    ) -> Self {
        Self {
            handler: Handler::new(Arc::clone(&shared), Arc::clone(&remote), log_tx),
            shared,
            remote,
            cmds: Commands::new(cmds),
        }
    }

    /// Runs until shutdown or until every handle is dropped; then flushes the store.
    pub async fn run(mut self) {
        let opts = self.shared.opts.clone();
        let mut ws_failures = 0u32;
        let mut attempt = 0u32;
        let mut polling = opts.transport == options::Transport::HttpOnly;
        let mut carried: Option<Box<dyn Transport>> = None;
        self.handler.refresh_status();
        let reply = loop {
            let over_websocket = carried.is_some() || !polling;
            let end = if let Some(socket) = carried.take() {
                self.handler.serve(socket, None, &mut self.cmds).await
            } else if polling {
                self.handler.set_mode(SyncState::Polling);
                self.shared.notify(ClientEvent::Polling {
                    websocket_failures: ws_failures,
                });
                match self.remote.polling() {
                    Ok(t) => {
                        let probe = (opts.transport == options::Transport::Auto)
                            .then(|| probe(Arc::clone(&self.remote), opts.probe_interval));
                        self.handler.serve(t, probe, &mut self.cmds).await
                    }
                    Err(e) => End::lost(e, false),
                }
            } else {
                self.handler.set_mode(SyncState::Connecting);
                match self.dial().await {
                    Ok(socket) => self.handler.serve(socket, None, &mut self.cmds).await,
                    Err(end) => end,
                }
            };
            // Only a session that lived counts as the socket working: one that opened and
            // died at once fails like one that never opened.
            match &end {
                End::Lost { lived: true, .. } if over_websocket => ws_failures = 0,
                End::Lost { reason, .. } if over_websocket => {
                    ws_failures += 1;
                    if opts.transport == options::Transport::Auto
                        && ws_failures >= opts.websocket_failures_before_polling
                    {
                        tracing::info!(ws_failures, %reason, "switching to HTTP polling");
                        polling = true;
                        self.handler.set_error(reason.clone());
                        continue;
                    }
                }
                _ => {}
            }
            match end {
                End::Shutdown(reply) => break reply,
                End::Upgrade(socket) => {
                    // The failure count stays: the socket must hold for a while to reset it,
                    // and one more short session goes straight back to polling.
                    polling = false;
                    carried = Some(socket);
                }
                End::Lost { reason, lived } => {
                    // A polling run ends only on failures of its own (the store), which say
                    // nothing of how long the hub stayed reachable.
                    attempt = if lived && over_websocket {
                        1
                    } else {
                        attempt + 1
                    };
                    let delay = opts.backoff.delay(attempt);
                    tracing::debug!(%reason, ?delay, "connection lost");
                    self.handler.set_error(reason.clone());
                    self.shared.notify(ClientEvent::Disconnected {
                        reason,
                        retry_in: delay,
                    });
                    self.handler.set_mode(SyncState::Offline);
                    if let Some(reply) = self.wait(delay).await {
                        break reply;
                    }
                }
                End::Auth { code, message } => {
                    self.handler.set_error(format!("{code}: {message}"));
                    self.shared
                        .notify(ClientEvent::AuthFailed { code, message });
                    self.handler.set_mode(SyncState::Offline);
                    match self.cmds.recv().await {
                        Wake::Stop(reply) => break reply,
                        Wake::TokenChanged => attempt = 0,
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

    /// Opens a WebSocket session, serving commands meanwhile.
    async fn dial(&mut self) -> Result<Box<dyn Transport>, End> {
        tokio::select! {
            opened = self.remote.websocket() => opened.map_err(End::refused_or_lost),
            wake = self.cmds.recv() => Err(match wake {
                Wake::Stop(reply) => End::Shutdown(reply),
                Wake::TokenChanged => End::lost("interrupted by a new token", false),
            }),
        }
    }

    /// Sleeps `delay` while serving commands. `Some` if asked to stop; a new token ends the
    /// wait (it deserves a prompt try).
    async fn wait(&mut self, delay: Duration) -> Option<Reply> {
        tokio::select! {
            () = sleep(delay) => None,
            wake = self.cmds.recv() => match wake {
                Wake::Stop(reply) => Some(reply),
                Wake::TokenChanged => None,
            },
        }
    }
}

/// Tries the socket again while polling, every `every` jittered (so that tills that fell
/// back together do not probe together), until it works or the token is refused. It runs
/// inside the handler's loop, so neither polling, pushing nor shutdown waits for it.
fn probe(remote: Arc<dyn Remote>, every: Duration) -> Opening {
    async move {
        loop {
            sleep(jitter(every)).await;
            match remote.websocket().await {
                Ok(socket) => return Ok(socket),
                Err(e) if e.is_auth() => return Err(e),
                Err(e) => tracing::debug!(reason = %e, "WebSocket probe failed; still polling"),
            }
        }
    }
    .boxed()
}

/// The hub over the network.
struct Network(Arc<Shared>);

impl Remote for Network {
    fn websocket(&self) -> Opening {
        websocket::open(Arc::clone(&self.0))
    }

    fn polling(&self) -> Result<Box<dyn Transport>> {
        Ok(Box::new(Polling::start(Arc::clone(&self.0))?))
    }

    fn snapshot(&self, branch: Name) -> SnapshotFuture {
        snapshot::download(Arc::clone(&self.0), branch)
    }
}
