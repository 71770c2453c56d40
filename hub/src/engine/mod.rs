//! The engine boundary: what stores and sequences branch logs, shaped like a message broker
//! (centrifuge's `Broker`: a publish returns its stream position, history is read by
//! position, and a handler receives every committed publication).
//!
//! The rest of the hub sees only [`Engine`]: publish an event (the engine validates it,
//! deduplicates it, checks its `device_seq`, applies it to the branch state, gives it the next
//! `seq` and makes it durable, then answers), read committed events after a position, take a
//! snapshot, list conflicts, resolve one, run retention. Every commit is reported, in commit
//! order, to the [`Feed`] the engine was built with: the hub moves the branch's head and fans
//! the publication out from there, so delivery does not care which engine committed an
//! event, or on which node.
//!
//! - [`sled`]: the embedded engine (the default), a sled store with a single writer per
//!   branch and a group committer.
//! - `memory` (tests): a second engine, all in memory, proving that nothing of sled crosses
//!   the boundary.
//! - [`sequence`]: the rules every engine applies to a publish (PROTOCOL.md §7), as a pure
//!   state machine.
//! - [`health`]: whether an engine takes writes.

pub mod health;
#[cfg(any(test, feature = "test-util"))]
pub mod memory;
pub mod sequence;
pub mod sled;

use std::sync::Arc;

use branchline_protocol::http::{PushResult, ResolveRequest, ResolveResponse};
use branchline_protocol::{
    BranchKey, Codec, ConflictRecord, ConflictStatus, Epoch, ErrorCode, Name, Publish, Rejected,
    ResyncReason, UnixMillis,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::config::RetentionConfig;
use crate::state::StateSnapshot;
pub use health::Unwritable;

/// Most bytes of events one `events` frame carries, live or replayed (a single larger event
/// still goes alone): well within what clients read in one message. An engine's commit
/// publishes at most this much per branch, so that a publication is one frame.
pub const FRAME_EVENT_BYTES: usize = 1 << 20;

/// A stored event: its seq, when it was sequenced, and its MessagePack encoding.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// The event's seq.
    pub seq: u64,
    /// When the hub sequenced it.
    pub server_time_ms: UnixMillis,
    /// The `Event` as MessagePack, exactly as sent to MessagePack clients.
    pub bytes: Bytes,
}

/// What a branch is when it is opened.
#[derive(Clone, Debug)]
pub struct Opened {
    /// Its log's epoch.
    pub epoch: Epoch,
    /// The last committed seq.
    pub head: u64,
    /// The retention floor.
    pub floor: u64,
    /// Each device's last applied `device_seq`.
    pub devices: Vec<(Name, u64)>,
    /// SKUs with negative stock.
    pub oversold: u64,
    /// Conflicts waiting for an admin.
    pub open_conflicts: u64,
}

/// Who published, and how far its clock is from the hub's.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The device (from its token).
    pub device: Name,
    /// Hub time minus device time, in ms (for `newest_wins`).
    pub offset_ms: i64,
}

/// The answer to a read of committed events.
#[derive(Debug)]
pub enum Read {
    /// The events after the position, in order and without gaps (empty at the head).
    Events(Vec<StoredEvent>),
    /// The position cannot be served: resync from a snapshot.
    Resync(ResyncReason),
}

/// Consecutive events of one branch made durable by one commit, encoded once and shared by
/// every follower.
#[derive(Debug)]
pub struct Publication {
    /// The branch.
    pub branch: Arc<BranchKey>,
    /// Its epoch.
    pub epoch: Epoch,
    /// The events, in seq order, without gaps (at least one).
    pub events: Vec<StoredEvent>,
    /// The events as one MessagePack `event` or `events` frame.
    pub frame: Bytes,
}

impl Publication {
    /// A publication of `events` (at least one), with its frame encoded now.
    pub fn new(branch: Arc<BranchKey>, epoch: Epoch, events: Vec<StoredEvent>) -> Self {
        let frame = events_frame(
            Codec::MsgPack,
            &branch.branch,
            epoch,
            events.iter().map(|e| e.bytes.clone()).collect(),
        );
        Self {
            branch,
            epoch,
            events,
            frame,
        }
    }

    /// The first seq.
    pub fn first(&self) -> u64 {
        self.events.first().map_or(0, |e| e.seq)
    }

    /// The last seq.
    pub fn last(&self) -> u64 {
        self.events.last().map_or(0, |e| e.seq)
    }
}

/// Stored events (their MessagePack bytes, or those transcoded) as one frame in `codec`: an
/// `event` frame for one, an `events` frame for several.
pub fn events_frame(codec: Codec, branch: &Name, epoch: Epoch, mut stored: Vec<Bytes>) -> Bytes {
    if stored.len() == 1 {
        let one = stored.remove(0);
        match codec.event_frame(&one) {
            Ok(frame) => return frame,
            Err(e) => tracing::error!(error = %e, "a stored event is not a map"),
        }
        stored.push(one);
    }
    codec.encode_event_batch(branch, epoch, &stored)
}

/// A commit, as the [`Feed`] hears of it.
#[derive(Debug)]
pub struct Committed {
    /// The branch.
    pub branch: Arc<BranchKey>,
    /// Its head after the commit.
    pub head: u64,
    /// The events the commit added, if any.
    pub publication: Option<Arc<Publication>>,
    /// Devices whose last applied `device_seq` moved, and to what.
    pub device_seqs: Vec<(Name, u64)>,
    /// SKUs with negative stock after the commit.
    pub oversold: u64,
    /// Conflicts waiting for an admin after the commit.
    pub open_conflicts: u64,
}

/// Hears of every commit, in commit order, from one engine thread: it must not block.
pub trait Feed: Send + Sync + 'static {
    /// A commit is durable (under `--fsync interval`: written).
    fn committed(&self, commit: Committed);

    /// Retention moved a branch's floor (before it deleted anything below it).
    fn trimmed(&self, branch: &BranchKey, floor: u64);
}

/// An engine's failure.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store cannot be read or written.
    #[error("store: {0}")]
    Store(String),
    /// The store cannot be written now.
    #[error(transparent)]
    Unwritable(#[from] Unwritable),
    /// The engine is stopping.
    #[error("the hub is shutting down")]
    Closed,
}

impl EngineError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Store(_) | EngineError::Unwritable(_) => ErrorCode::StorageUnavailable,
            EngineError::Closed => ErrorCode::ShuttingDown,
        }
    }
}

/// Why a stop did not finish everything.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// These parts were still busy when the deadline came.
    #[error("{} unfinished", .0.join(", "))]
    Unfinished(Vec<&'static str>),
    /// A write or sync failed during the run.
    #[error("a store write or sync failed during the run")]
    Failed,
}

/// The answer to a queued publish, once its outcome is durable.
pub type Answer = BoxFuture<'static, PushResult>;

/// What stores and sequences branch logs.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Opens `branch`, making its log (with a fresh epoch) if it has none.
    async fn open(&self, branch: &BranchKey) -> Result<Opened, EngineError>;

    /// Queues `publish` on `branch` behind every publish queued before on it (a device's
    /// publishes are sequenced in the order it sent them) and returns its answer: a future
    /// that resolves once the outcome is durable — accepted with its seq, a duplicate with the
    /// original seq, or rejected.
    async fn publish(&self, branch: &BranchKey, publish: Publish, origin: Origin) -> Answer;

    /// Resolves conflict `id`; answers once the `conflict.resolved` event is durable.
    async fn resolve(
        &self,
        branch: &BranchKey,
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
    ) -> Result<ResolveResponse, Rejected>;

    /// The branch state and the seq it is exactly at, once that seq is durable.
    async fn snapshot(&self, branch: &BranchKey) -> Result<(StateSnapshot, u64), ErrorCode>;

    /// Committed events after `after` of `epoch`, up to `until` (a head the caller saw), at
    /// most `limit`: all of them in order, or why the position cannot be served.
    async fn read(
        &self,
        branch: &BranchKey,
        epoch: Epoch,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Read, EngineError>;

    /// Conflict records of a branch, newest first, filtered by status.
    async fn conflicts(
        &self,
        branch: &BranchKey,
        status: Option<ConflictStatus>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, EngineError>;

    /// One retention pass over every branch as if the time were `now`: trims by count and
    /// age, and (when `dedup`) forgets old event ids; reports floors to the feed.
    async fn retain(
        &self,
        retention: &RetentionConfig,
        now: UnixMillis,
        dedup: bool,
    ) -> Result<(), EngineError>;

    /// `Ok` if a write may be taken now.
    fn writable(&self) -> Result<(), Unwritable>;

    /// Measures what [`Engine::writable`] depends on (free space) now.
    fn check_space(&self);

    /// Stops taking writes, finishes (or, past `deadline`, abandons) what was taken, and
    /// makes everything durable.
    async fn stop(&self, deadline: tokio::time::Instant) -> Result<(), StopError>;
}

/// Whether `events` run from `after + 1` without gaps (an empty read is contiguous).
pub fn contiguous(after: u64, events: &[StoredEvent]) -> bool {
    events
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == after + 1 + i as u64)
}
