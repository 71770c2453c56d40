//! Rooms: the live sessions following each branch, and fan-out.
//!
//! A room is created when its first member joins and dropped when its last leaves. Each
//! commit's events of a branch (the engine's [`Publication`]) become one [`LiveBatch`],
//! encoded once per codec, and the same bytes are offered to every member with `try_send`. A
//! session's queue is bounded by a budget of events: a member whose session is over budget is
//! marked lagging and gets no more live batches; its session then catches up from the log (see
//! `ws::delivery`). Fan-out never waits for a slow session and never grows memory for
//! it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use branchline_protocol::{BranchKey, Name, Role, ServerFrame};
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::frames::LiveBatch;
use crate::engine::Publication;

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

    /// Offers a committed publication to every member of its branch's room.
    pub fn deliver(&self, publication: &Arc<Publication>) {
        let Some(room) = self.map.get(&publication.branch).map(|r| r.clone()) else {
            return;
        };
        let batch = Arc::new(LiveBatch::new(publication.clone()));
        for member in room.members().iter() {
            member.offer(&batch);
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
