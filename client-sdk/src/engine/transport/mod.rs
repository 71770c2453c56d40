//! The [`Transport`] trait: what the handler needs of a connection to the hub, whichever
//! way it goes. A transport turns what comes off its wire into [`Input`]s and takes the
//! outbox in [`Room`]-sized batches; the handler does the rest (applying, publishing,
//! snapshots, status) the same way for both.
//!
//! - [`websocket`]: one WebSocket session. Live events, per-event answers, acks, pings.
//! - [`polling`]: HTTP long polls per branch and one batch push at a time.
//!
//! [`Remote`] is how the engine reaches the hub: open either transport, download a
//! snapshot. The connector's `Network` is the real one; tests put a scripted hub in its
//! place.

pub(super) mod polling;
pub(super) mod websocket;

use branchline_protocol::http::PushResult;
use branchline_protocol::{
    BranchStart, Event, Name, Position, ResyncRequired, UnixMillis, Welcome,
};
use futures::future::BoxFuture;

use super::snapshot::SnapshotFuture;
use crate::error::{Error, Result};
use crate::publisher::FrameLimit;
use crate::status::{ClientEvent, SyncState};
use crate::store::PendingEvent;

/// What a transport delivered, for the handler to act on.
#[derive(Debug)]
pub(crate) enum Input {
    /// Nothing for the handler: the transport served a timer of its own (an ack, a ping).
    /// The handler goes round its loop, which sends what the transport queued.
    Wake,
    /// The hub starts sending a branch (`subscribed`).
    Start(BranchStart),
    /// Sequenced events of a followed branch, in order, and the hub's head with them when
    /// it says (a polled page does).
    Events {
        branch: Name,
        events: Vec<Event>,
        head: Option<u64>,
    },
    /// The branch is at the hub's head.
    CaughtUp { branch: Name, position: Position },
    /// The hub's answer to one publish, which names its branch or event.
    Answer(PushResult),
    /// The answers to a whole batch of `branch`: whatever is still in flight after them
    /// went unanswered.
    Answers {
        branch: Name,
        answers: Vec<PushResult>,
    },
    /// What is in flight on `branch` will not be answered: send it again.
    Resend { branch: Name },
    /// A send of `branch` failed for now: back off, then send it again.
    Unsent { branch: Name, reason: String },
    /// The branch cannot be resumed from the stored position: snapshot it.
    ResyncRequired(ResyncRequired),
    /// A clock round trip, for the offset: device time sent, hub time, device time back.
    Clock {
        sent: UnixMillis,
        server: UnixMillis,
        received: UnixMillis,
    },
    /// Something to tell the app (presence, devices, an error the hub reported).
    Notice(ClientEvent),
    /// A failure the transport retries itself (a poll): the hub is out of reach until it
    /// delivers again.
    Trouble(String),
    /// The hub refused the token or its scope ([`Error::is_auth`]).
    Refused(Error),
    /// The connection is lost.
    Lost(String),
}

/// How much of one branch's outbox a transport takes at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Room {
    /// Most events in flight on the branch.
    pub window: usize,
    /// The largest publish frame it carries, if it has a limit.
    pub limit: Option<FrameLimit>,
}

/// A connection to the hub, as the handler drives it: [`Transport::next`] in its loop,
/// [`Transport::publish`] and [`Transport::send`] for the outbox.
pub(crate) trait Transport: Send {
    /// The state the status shows while it delivers.
    fn state(&self) -> SyncState;

    /// The hub's `welcome`, once, for a connection that opened with one.
    fn welcome(&mut self) -> Option<Welcome>;

    /// How much it takes from a branch's outbox now; `None` while it takes nothing more
    /// (a push is under way).
    fn room(&self) -> Option<Room>;

    /// Takes publishes of one branch, marked sent in the store but not yet synced: they
    /// leave after [`Store::sync_sent`](crate::store::Store::sync_sent).
    fn publish(&mut self, branch: &Name, events: &[PendingEvent]);

    /// Sends what it has queued. `Err(reason)`: the connection is lost.
    fn send(&mut self) -> BoxFuture<'_, Result<(), String>>;

    /// The next input. Cancel-safe: the handler's loop drops it whenever something else
    /// comes first.
    fn next(&mut self) -> BoxFuture<'_, Input>;

    /// A run of `branch`'s events was applied, as far as it followed the stored position:
    /// the replica is at `position`. Returns whether the branch is now caught up and the
    /// app has not heard so yet.
    fn applied(&mut self, branch: &Name, position: Position) -> bool;

    /// Follows `branch` from `position`, where a snapshot left it.
    fn follow(&mut self, branch: Name, position: Position);

    /// Whether a run of events that did not follow the stored position is resumed by the
    /// transport itself (the next poll asks from there), rather than by a new connection
    /// (a socket's stream broke its promise).
    fn resumes_in_place(&self) -> bool;

    /// Closes the connection politely, on shutdown.
    fn close(&mut self) -> BoxFuture<'_, ()>;
}

/// An attempt to open a transport, run while the engine serves commands or polls.
pub(crate) type Opening = BoxFuture<'static, Result<Box<dyn Transport>>>;

/// The hub, as the engine reaches it.
pub(crate) trait Remote: Send + Sync {
    /// Opens a WebSocket session: connect, `hello` resuming every followed branch with a
    /// position, `welcome`, within the connect timeout.
    fn websocket(&self) -> Opening;

    /// Starts HTTP polling, resuming every followed branch with a position.
    fn polling(&self) -> Result<Box<dyn Transport>>;

    /// Downloads the snapshot of `branch`.
    fn snapshot(&self, branch: Name) -> SnapshotFuture;
}

/// Awaits an optional future, for `select!` arms guarded by `is_some()`.
pub(crate) async fn maybe<T>(f: &mut Option<BoxFuture<'static, T>>) -> Option<T> {
    match f.as_mut() {
        Some(f) => Some(f.await),
        None => None,
    }
}
