//! Rooms: the live sessions following each branch, and fan-out.
//!
//! A room is created when its first member joins and dropped when its last leaves. Each
//! commit's events of a branch become one [`LiveBatch`], encoded once per codec, and the same
//! bytes are offered to every member with `try_send`. A session's queue is bounded by a budget
//! of events: a member whose session is over budget is marked lagging and gets no more live
//! batches; its session then catches up from the log (see [`crate::session`]). Fan-out never
//! waits for a slow session and never grows memory for it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use axum::extract::ws::{Message, Utf8Bytes};
use branchline_protocol::{Codec, DecodeError, Epoch, Name, Role, ServerFrame};
use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::log::{BranchKey, StoredEvent};

/// Consecutive events of one branch from one commit, shared by every member of its room.
pub struct LiveBatch {
    /// The branch.
    pub branch: Arc<BranchKey>,
    /// Its epoch.
    pub epoch: Epoch,
    /// The events, in seq order, without gaps.
    pub events: Vec<StoredEvent>,
    msgpack: Bytes,
    json: OnceLock<Option<Utf8Bytes>>,
}

impl LiveBatch {
    /// A batch of `events` (at least one).
    pub fn new(branch: Arc<BranchKey>, epoch: Epoch, events: Vec<StoredEvent>) -> Self {
        let msgpack = encode_events(
            Codec::MsgPack,
            &branch.branch,
            epoch,
            events.iter().map(|e| e.bytes.clone()).collect(),
        );
        Self {
            branch,
            epoch,
            events,
            msgpack,
            json: OnceLock::new(),
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

    /// How many events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch is empty (never, for batches the writer makes).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The whole batch as one frame in `codec`, encoded once and shared.
    pub fn message(&self, codec: Codec) -> Option<Message> {
        match codec {
            Codec::MsgPack => Some(Message::Binary(self.msgpack.clone())),
            Codec::Json => self
                .json
                .get_or_init(|| events_message_json(&self.branch.branch, self.epoch, &self.events))
                .clone()
                .map(Message::Text),
        }
    }

    /// The events after `delivered` as one frame (for a session that already has some).
    pub fn message_after(&self, delivered: u64, codec: Codec) -> Option<Message> {
        let rest: Vec<StoredEvent> = self
            .events
            .iter()
            .filter(|e| e.seq > delivered)
            .cloned()
            .collect();
        events_message(codec, &self.branch.branch, self.epoch, &rest)
    }
}

/// Most bytes of events one `events` frame carries, live or replayed (a single larger event
/// still goes alone): well within what clients read in one message.
pub const FRAME_EVENT_BYTES: usize = 1 << 20;

/// Events as an `event` frame (one) or an `events` frame (several), from their stored bytes.
pub fn events_message(
    codec: Codec,
    branch: &Name,
    epoch: Epoch,
    events: &[StoredEvent],
) -> Option<Message> {
    match codec {
        Codec::MsgPack => Some(Message::Binary(encode_events(
            codec,
            branch,
            epoch,
            events.iter().map(|e| e.bytes.clone()).collect(),
        ))),
        Codec::Json => events_message_json(branch, epoch, events).map(Message::Text),
    }
}

fn events_message_json(branch: &Name, epoch: Epoch, events: &[StoredEvent]) -> Option<Utf8Bytes> {
    let json: Result<Vec<Bytes>, DecodeError> = events
        .iter()
        .map(|e| Codec::Json.transcode(Codec::MsgPack, &e.bytes))
        .collect();
    let json = match json {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(error = %e, "a stored event does not transcode to JSON");
            return None;
        }
    };
    Utf8Bytes::try_from(encode_events(Codec::Json, branch, epoch, json)).ok()
}

fn encode_events(codec: Codec, branch: &Name, epoch: Epoch, mut stored: Vec<Bytes>) -> Bytes {
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

/// What a session's writer is sent.
pub enum Outbound {
    /// Live events of a followed branch.
    Live(Arc<LiveBatch>),
    /// A frame for this session (presence, for admins).
    Frame(Box<ServerFrame>),
    /// A member of this session was cut over to catch-up: look at it even if nothing else is
    /// queued (a single batch larger than the budget leaves the queue empty).
    Wake,
}

/// What the rest of the hub can do to a session from outside it.
pub struct SessionCtl {
    /// The session.
    pub id: Uuid,
    queued: AtomicUsize,
    budget: usize,
    cancel: CancellationToken,
    reason: OnceLock<(branchline_protocol::ErrorCode, String)>,
}

impl SessionCtl {
    /// A control block for session `id` whose queue holds at most `budget` events, cancelled
    /// with `parent` (the hub's shutdown).
    pub fn new(id: Uuid, budget: usize, parent: &CancellationToken) -> Self {
        Self {
            id,
            queued: AtomicUsize::new(0),
            budget,
            cancel: parent.child_token(),
            reason: OnceLock::new(),
        }
    }

    /// Asks the session to close with `code`.
    pub fn close(&self, code: branchline_protocol::ErrorCode, message: impl Into<String>) {
        let _ = self.reason.set((code, message.into()));
        self.cancel.cancel();
    }

    /// Resolves when the session is asked to close.
    pub fn cancelled_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }

    /// Why the session was asked to close (`shutting_down` when the hub stops).
    pub fn reason(&self) -> (branchline_protocol::ErrorCode, String) {
        self.reason.get().cloned().unwrap_or((
            branchline_protocol::ErrorCode::ShuttingDown,
            "the hub is shutting down".into(),
        ))
    }

    /// Events queued for the session now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The session consumed `n` queued events.
    pub fn consumed(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One session's membership of one room.
pub struct Member {
    /// The session.
    pub ctl: Arc<SessionCtl>,
    /// The session's device.
    pub device: Name,
    /// The session's role.
    pub role: Role,
    tx: mpsc::Sender<Outbound>,
    lagging: AtomicBool,
}

impl Member {
    /// A member that sends to `tx`.
    pub fn new(ctl: Arc<SessionCtl>, device: Name, role: Role, tx: mpsc::Sender<Outbound>) -> Self {
        Self {
            ctl,
            device,
            role,
            tx,
            lagging: AtomicBool::new(false),
        }
    }

    /// Whether the member was cut over to catch-up; clears the mark (live batches flow again).
    pub fn take_lagging(&self) -> bool {
        self.lagging.swap(false, Ordering::AcqRel)
    }

    fn offer(&self, batch: &Arc<LiveBatch>) {
        if self.lagging.load(Ordering::Acquire) {
            return;
        }
        let n = batch.len();
        let queued = self.ctl.queued.fetch_add(n, Ordering::AcqRel) + n;
        if queued > self.ctl.budget || self.tx.try_send(Outbound::Live(batch.clone())).is_err() {
            self.ctl.queued.fetch_sub(n, Ordering::AcqRel);
            if !self.lagging.swap(true, Ordering::AcqRel) {
                // If this fails the queue is full, and the session is busy with it anyway.
                let _ = self.tx.try_send(Outbound::Wake);
            }
        }
    }

    /// Sends a frame if the session's queue has room; presence is advisory, and an admin
    /// that misses some can ask for `list_devices`.
    pub fn send_frame(&self, frame: ServerFrame) -> bool {
        self.tx.try_send(Outbound::Frame(Box::new(frame))).is_ok()
    }
}

#[derive(Default)]
struct Room {
    members: RwLock<Vec<Arc<Member>>>,
}

impl Room {
    fn members(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Member>>> {
        self.members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn members_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Member>>> {
        self.members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Every room, by branch.
#[derive(Default)]
pub struct Rooms {
    map: DashMap<Arc<BranchKey>, Arc<Room>>,
}

impl Rooms {
    /// Adds `member` to the room of `branch`, creating the room.
    pub fn join(&self, branch: &Arc<BranchKey>, member: Arc<Member>) {
        // The entry guard is held while the member is added, so a concurrent `leave` cannot
        // drop the room in between.
        let room = self.map.entry(branch.clone()).or_default();
        room.members_mut().push(member);
    }

    /// Removes session `id` from the room of `branch`, dropping the room if it is empty.
    pub fn leave(&self, branch: &BranchKey, id: Uuid) {
        if let Some(room) = self.map.get(branch) {
            room.members_mut().retain(|m| m.ctl.id != id);
        }
        self.map
            .remove_if(branch, |_, room| room.members().is_empty());
    }

    /// Offers a committed batch to every member of its room.
    pub fn deliver(&self, branch: &BranchKey, batch: &Arc<LiveBatch>) {
        let Some(room) = self.map.get(branch).map(|r| r.clone()) else {
            return;
        };
        for member in room.members().iter() {
            member.offer(batch);
        }
    }

    /// The admin members of a branch's room.
    pub fn admins(&self, branch: &BranchKey) -> Vec<Arc<Member>> {
        self.map.get(branch).map_or_else(Vec::new, |room| {
            room.members()
                .iter()
                .filter(|m| m.role == Role::Admin)
                .cloned()
                .collect()
        })
    }

    /// Events waiting in the queues of every session of every room (each session counted
    /// once): what slow consumers currently cost.
    pub fn queued_events(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for room in self.map.iter() {
            for member in room.members().iter() {
                if seen.insert(member.ctl.id) {
                    total += member.ctl.queued();
                }
            }
        }
        total
    }

    /// How many rooms exist.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no room exists.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
