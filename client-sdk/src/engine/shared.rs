//! What the handles and the background task share, and the commands handles send it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use branchline_protocol::{Epoch, Name, Role, TokenBranches};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::http::{HttpApi, Snapshot};
use crate::options::{ClientOptions, Endpoints};
use crate::status::{ClientEvent, SyncStatus};
use crate::store::Store;

/// Capacity of the command channel from handles to the task. Commands are rare (a token
/// change, shutdown) and the task serves them between any two inputs, so a few slots are
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
    pub downloads: Downloads,
}

impl Shared {
    pub fn notify(&self, event: ClientEvent) {
        // No listener is fine: notifications are advisory, the status watch holds the truth.
        let _ = self.notices.send(event);
    }

    pub fn token(&self) -> String {
        self.token
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Snapshot downloads in progress, by branch. Outside the download futures, which die with
/// their connection, so that a download resumes from its last page token after a cut
/// instead of starting over (PROTOCOL.md §11: a token is good for 10 minutes). A std mutex:
/// held only to read or add a page, never across an `.await`.
#[derive(Default)]
pub(crate) struct Downloads(Mutex<HashMap<Name, Snapshot>>);

impl Downloads {
    /// Runs `f` on the download of `branch`, started empty if there is none.
    pub fn with<T>(&self, branch: &Name, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        let mut downloads = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(downloads.entry(branch.clone()).or_default())
    }

    /// Ends the download of `branch`, returning what it has.
    pub fn take(&self, branch: &Name) -> Option<Snapshot> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(branch)
    }

    /// Drops a half-done download of `branch` pinned in another epoch than `epoch`: it is
    /// of no use any more.
    pub fn forget_other_epoch(&self, branch: &Name, epoch: Epoch) {
        if self.with(branch, |d| d.position.is_some_and(|p| p.epoch != epoch)) {
            self.take(branch);
        }
    }
}

/// Requests from handles.
pub(crate) enum Command {
    /// The token changed (it is already in [`Shared::token`]): end a wait for one.
    TokenChanged,
    /// Stop: close the connection, flush the store, answer.
    Shutdown(oneshot::Sender<()>),
}

/// Who to answer once the task has stopped: the handle that asked for it, or nobody when
/// every handle was dropped.
pub(crate) type Reply = Option<oneshot::Sender<()>>;

/// A command as the task acts on it.
pub(crate) enum Wake {
    /// Stop.
    Stop(Reply),
    /// A new token: used from the next connection or request on, and worth a prompt try
    /// when the task is waiting.
    TokenChanged,
}

/// The task's end of the command channel.
pub(crate) struct Commands(mpsc::Receiver<Command>);

impl Commands {
    pub fn new(rx: mpsc::Receiver<Command>) -> Self {
        Self(rx)
    }

    /// The next command; every handle gone reads as a stop. Cancel-safe.
    pub async fn recv(&mut self) -> Wake {
        match self.0.recv().await {
            None => Wake::Stop(None),
            Some(Command::Shutdown(reply)) => Wake::Stop(Some(reply)),
            Some(Command::TokenChanged) => Wake::TokenChanged,
        }
    }
}
