//! What a branch log does with a publish (PROTOCOL.md §7), whatever stores it: the rules as a
//! pure state machine that every engine drives.
//!
//! A [`Sequencer`] holds a branch's head, each device's last applied `device_seq` and the
//! branch state. For each publish it validates the event, answers a retry of an accepted
//! event with its original seq, checks `device_seq`, applies the event to the state (the
//! stock ledger, the catalog and its conflict policies) and gives it the next seq. What it
//! decides is returned, never written: the engine stores the [`Sequenced`] event with its
//! state [`Change`]s in one atomic write, and answers only once that write is durable.
//!
//! An engine supplies what only it knows: whether an event id was accepted before (its dedup
//! index), a stock count's movements since the count's base (its log), and whether its store
//! takes writes.

use std::collections::HashMap;
use std::sync::Arc;

use branchline_protocol::http::{PushResult, ResolveRequest, ResolveResponse};
use branchline_protocol::{
    Accepted, BranchKey, Codec, ConflictRecord, Epoch, ErrorCode, Event, EventBody, HUB_DEVICE,
    Name, Publish, Rejected, Sku, UnixMillis, now_ms,
};
use bytes::Bytes;
use serde::Serialize;
use uuid::Uuid;

use super::{StoredEvent, Unwritable};
use crate::state::{BranchState, Change, Policies, Refused, StateSnapshot, WriteCtx};

/// Why a branch whose sequencing failed half-way refuses writes.
pub const POISONED: &str = "sequencing failed after the branch state changed; the branch refuses writes until the hub restarts";

/// What a publish's content is, for idempotency: everything but the envelope's transport
/// fields (`device_seq` may legitimately change when a device renumbers its outbox).
#[derive(Serialize)]
struct Content<'a> {
    body: &'a EventBody,
    client_time_ms: UnixMillis,
    base_seq: Option<u64>,
    base_version: Option<u64>,
}

/// An event given its seq, with everything the engine stores with it.
#[derive(Debug)]
pub struct Sequenced {
    /// The event as stored and sent.
    pub stored: StoredEvent,
    /// Its id.
    pub event_id: Uuid,
    /// Hash of its content (its dedup entry).
    pub hash: u64,
    /// The state changes it made.
    pub changes: Vec<Change>,
    /// The device whose `device_seq` it moved, if a device's (not the hub's).
    pub device_seq: Option<(Name, u64)>,
}

/// What became of a publish.
#[derive(Debug)]
pub enum Outcome {
    /// Sequenced: to store, then answer `answer`.
    Sequenced(Box<Sequenced>, PushResult),
    /// Answered without an event: a duplicate or a refusal. A refused catalog write may still
    /// leave a conflict record to store.
    Answered(PushResult, Option<Box<ConflictRecord>>),
}

/// The engine's answers the rules need.
pub trait Lookups {
    /// The seq and content hash of `event_id` if the branch accepted it before.
    fn known(&mut self, event_id: &Uuid) -> Result<Option<(u64, u64)>, Refused>;

    /// The sum of `sku`'s stock movements after `base_seq`, for a count sequenced now, when
    /// the branch has sequenced up to `head`.
    fn moved_since(&mut self, sku: &Sku, base_seq: u64, head: u64) -> Result<i64, Refused>;

    /// Whether the store takes writes now.
    fn writable(&self) -> Result<(), Unwritable>;
}

/// The sequencing state of one branch.
pub struct Sequencer {
    key: Arc<BranchKey>,
    epoch: Epoch,
    /// The last sequenced seq.
    head: u64,
    last_server_time: UnixMillis,
    devices: HashMap<Name, u64>,
    state: BranchState,
    policies: Policies,
    hash_buf: Vec<u8>,
    /// Set if sequencing failed after the state changed: memory may no longer match the
    /// log, so nothing more is sequenced until a restart reloads it.
    poisoned: bool,
}

impl Sequencer {
    /// A branch at `head` (sequenced at `head_time_ms`), with its devices and state.
    pub fn new(
        key: Arc<BranchKey>,
        epoch: Epoch,
        head: u64,
        head_time_ms: UnixMillis,
        devices: HashMap<Name, u64>,
        state: BranchState,
        policies: Policies,
    ) -> Self {
        Self {
            key,
            epoch,
            head,
            last_server_time: head_time_ms,
            devices,
            state,
            policies,
            hash_buf: Vec::new(),
            poisoned: false,
        }
    }

    /// The last sequenced seq.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Every device with its last applied `device_seq`.
    pub fn devices(&self) -> Vec<(Name, u64)> {
        self.devices
            .iter()
            .map(|(d, seq)| (d.clone(), *seq))
            .collect()
    }

    /// SKUs with negative stock.
    pub fn oversold(&self) -> u64 {
        self.state.oversold_skus()
    }

    /// Conflicts waiting for an admin.
    pub fn open_conflicts(&self) -> u64 {
        self.state.open_conflicts()
    }

    /// The state, and the seq it is at.
    pub fn snapshot(&self) -> (StateSnapshot, u64) {
        (self.state.snapshot(), self.head)
    }

    /// Marks the branch as refusing writes: the engine could not store what was sequenced.
    pub fn poison(&mut self) {
        tracing::error!(branch = %self.key, "{POISONED}");
        self.poisoned = true;
    }

    fn server_time(&mut self) -> UnixMillis {
        // Server times never go backwards within a branch: retention by age relies on it.
        self.last_server_time = now_ms().max(self.last_server_time);
        self.last_server_time
    }

    fn accepted(&self, event_id: Uuid, seq: u64, duplicate: bool) -> PushResult {
        PushResult::Accepted(Accepted {
            event_id,
            branch: self.key.branch.clone(),
            epoch: self.epoch,
            seq,
            duplicate,
        })
    }

    fn content_hash(&mut self, publish: &Publish) -> Result<u64, ErrorCode> {
        self.hash_buf.clear();
        let content = Content {
            body: &publish.body,
            client_time_ms: publish.client_time_ms,
            base_seq: publish.base_seq,
            base_version: publish.base_version,
        };
        Codec::MsgPack
            .encode_into(&content, &mut self.hash_buf)
            .map_err(|_| ErrorCode::InvalidEvent)?;
        Ok(xxhash_rust::xxh3::xxh3_64(&self.hash_buf))
    }

    /// Decides what becomes of `publish` from `device` (whose clock is `offset_ms` behind the
    /// hub's).
    pub fn publish(
        &mut self,
        publish: Publish,
        device: &Name,
        offset_ms: i64,
        lookups: &mut dyn Lookups,
    ) -> Outcome {
        let (event_id, branch) = (publish.event_id, publish.branch.clone());
        let refuse = |code: ErrorCode, message: String| {
            Outcome::Answered(
                PushResult::Rejected(Rejected::of(event_id, branch.clone(), code, message)),
                None,
            )
        };
        if let Err(why @ Unwritable::Failed) = lookups.writable() {
            return refuse(why.code(), why.to_string());
        }
        if self.poisoned {
            return refuse(ErrorCode::Internal, POISONED.into());
        }
        if publish.event_id.get_version_num() != 7 {
            return refuse(
                ErrorCode::InvalidEvent,
                "event_id must be a UUID version 7".into(),
            );
        }
        if publish.device_seq == 0 {
            return refuse(ErrorCode::InvalidEvent, "device_seq starts at 1".into());
        }
        if let Err(e) = publish
            .body
            .validate(publish.base_seq, publish.base_version)
        {
            return refuse(ErrorCode::InvalidEvent, e.0);
        }
        let hash = match self.content_hash(&publish) {
            Ok(h) => h,
            Err(code) => return refuse(code, "the event cannot be encoded".into()),
        };
        match lookups.known(&publish.event_id) {
            Ok(Some((seq, known_hash))) if known_hash == hash => {
                return Outcome::Answered(self.accepted(event_id, seq, true), None);
            }
            Ok(Some((seq, _))) => {
                return refuse(
                    ErrorCode::IdempotencyMismatch,
                    format!("event {event_id} was accepted at seq {seq} with other content"),
                );
            }
            Ok(None) => {}
            Err(refused) => return refuse(refused.code, refused.message),
        }
        // A retry of an accepted event is answered above, whatever the disk; a new one is
        // refused while the store cannot take writes (low on space: for a while).
        if let Err(why) = lookups.writable() {
            return refuse(why.code(), why.to_string());
        }
        let last = self.devices.get(device).copied().unwrap_or(0);
        let expected = last + 1;
        if publish.device_seq != expected {
            let (code, why) = if publish.device_seq > expected {
                (ErrorCode::OutOfOrder, "skips ahead")
            } else {
                (ErrorCode::DeviceSeqReused, "was already used")
            };
            let mut rejected = Rejected::of(
                event_id,
                branch.clone(),
                code,
                format!(
                    "device_seq {} {why}; expected {expected}",
                    publish.device_seq
                ),
            );
            rejected.expected_device_seq = Some(expected);
            return Outcome::Answered(PushResult::Rejected(rejected), None);
        }
        let seq = self.head + 1;
        let now = self.server_time();
        let ctx = WriteCtx {
            branch: &self.key.branch,
            device,
            event_id: publish.event_id,
            seq,
            now_ms: now,
            // A device clock still ahead of the hub's after correction cannot make a write
            // newer than its arrival (it would win every `newest_wins` comparison).
            write_time_ms: publish.client_time_ms.saturating_add(offset_ms).min(now),
            base_version: publish.base_version.unwrap_or(0),
        };
        let head = self.head;
        let base_seq = publish.base_seq.unwrap_or(0);
        let applied = self.state.apply(&publish.body, &ctx, self.policies, |sku| {
            lookups.moved_since(sku, base_seq, head)
        });
        let applied = match applied {
            Ok(applied) => applied,
            Err(refused) => {
                let mut rejected =
                    Rejected::of(event_id, branch.clone(), refused.code, refused.message);
                rejected.conflict = refused.conflict;
                // The conflict is recorded although the event is refused.
                return Outcome::Answered(PushResult::Rejected(rejected), refused.record);
            }
        };
        let device_seq = publish.device_seq;
        let event = Event {
            branch: self.key.branch.clone(),
            epoch: self.epoch,
            seq,
            event_id,
            device: device.clone(),
            device_seq,
            client_time_ms: publish.client_time_ms,
            server_time_ms: now,
            base_seq: publish.base_seq,
            base_version: publish.base_version,
            body: publish.body,
            effect: applied.effect,
        };
        let Some(stored) = self.stored(&event) else {
            return refuse(ErrorCode::Internal, POISONED.into());
        };
        self.devices.insert(device.clone(), device_seq);
        let answer = self.accepted(event_id, seq, false);
        Outcome::Sequenced(
            Box::new(Sequenced {
                stored,
                event_id,
                hash,
                changes: applied.changes,
                device_seq: Some((device.clone(), device_seq)),
            }),
            answer,
        )
    }

    /// Encodes a sequenced event and moves the head to it; `None` (and the branch poisoned)
    /// if it cannot be encoded: the state has already changed.
    fn stored(&mut self, event: &Event) -> Option<StoredEvent> {
        match Codec::MsgPack.encode(event) {
            Ok(bytes) => {
                self.head = event.seq;
                Some(StoredEvent {
                    seq: event.seq,
                    server_time_ms: event.server_time_ms,
                    bytes,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an event");
                self.poison();
                None
            }
        }
    }

    /// Resolves conflict `id` for `admin` with a `conflict.resolved` event. `recorded`
    /// answers whether a conflict with that id was ever recorded (every open one is in
    /// memory, so a recorded one that is not there has been resolved).
    pub fn resolve(
        &mut self,
        id: &Uuid,
        request: &ResolveRequest,
        admin: &Name,
        writable: Result<(), Unwritable>,
        recorded: impl FnOnce(&Uuid) -> Result<bool, Refused>,
    ) -> Result<(Box<Sequenced>, ResolveResponse), Rejected> {
        let fail = |code: ErrorCode, message: String| Rejected::bare(code, message);
        if let Err(why) = writable {
            return Err(fail(why.code(), why.to_string()));
        }
        if self.poisoned {
            return Err(fail(ErrorCode::Internal, POISONED.into()));
        }
        let seq = self.head + 1;
        let now = self.server_time();
        let (applied, body) = match self.state.resolve(
            id,
            request.resolution,
            request.fields.as_ref(),
            admin,
            now,
            seq,
        ) {
            Ok(done) => done,
            Err(refused) if refused.code == ErrorCode::NotFound => {
                return Err(match recorded(id) {
                    Ok(true) => fail(
                        ErrorCode::ConflictAlreadyResolved,
                        format!("conflict {id} was already resolved"),
                    ),
                    Ok(false) => fail(ErrorCode::NotFound, refused.message),
                    Err(refused) => fail(refused.code, refused.message),
                });
            }
            Err(refused) => return Err(fail(refused.code, refused.message)),
        };
        let record = applied.changes.iter().rev().find_map(|c| match c {
            Change::Conflict(r) => Some((**r).clone()),
            _ => None,
        });
        let hub = Name::new(HUB_DEVICE).map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        let event = Event {
            branch: self.key.branch.clone(),
            epoch: self.epoch,
            seq,
            event_id: Uuid::now_v7(),
            device: hub,
            device_seq: 0,
            client_time_ms: now,
            server_time_ms: now,
            base_seq: None,
            base_version: None,
            body: EventBody::ConflictResolved(body),
            effect: applied.effect,
        };
        let conflict =
            record.ok_or_else(|| fail(ErrorCode::Internal, "resolution lost its record".into()))?;
        let stored = self
            .stored(&event)
            .ok_or_else(|| fail(ErrorCode::Internal, POISONED.into()))?;
        Ok((
            Box::new(Sequenced {
                stored,
                event_id: event.event_id,
                hash: 0,
                changes: applied.changes,
                device_seq: None,
            }),
            ResolveResponse {
                conflict,
                epoch: self.epoch,
                seq,
            },
        ))
    }
}

/// What one stored event moved `sku` by.
pub fn sku_delta(bytes: &[u8], sku: &Sku) -> Result<i64, Refused> {
    let event: Event = Codec::MsgPack
        .decode(bytes)
        .map_err(|e| Refused::new(ErrorCode::Internal, format!("stored event unreadable: {e}")))?;
    Ok(event
        .body
        .stock_deltas()
        .into_iter()
        .filter(|(s, _)| *s == sku)
        .fold(0i64, |sum, (_, d)| sum.saturating_add(d)))
}

/// The answer to the publish `event_id` on `branch` when its branch's writer is gone.
pub fn shutting_down(event_id: Option<Uuid>, branch: &Name) -> PushResult {
    let mut rejected = Rejected::bare(ErrorCode::ShuttingDown, "the hub is shutting down");
    rejected.event_id = event_id;
    rejected.branch = Some(branch.clone());
    PushResult::Rejected(rejected)
}

/// The message of a failure that says only its code.
pub fn code_message(code: ErrorCode) -> String {
    match code {
        ErrorCode::StorageUnavailable => {
            "the hub cannot write to its store; nothing was accepted".into()
        }
        ErrorCode::ShuttingDown => "the hub is shutting down".into(),
        other => other.as_str().replace('_', " "),
    }
}

/// What a commit failure turns an answer into.
pub fn failed_answer(answer: PushResult, code: ErrorCode) -> PushResult {
    let (event_id, branch) = match answer {
        PushResult::Rejected(r) => (r.event_id, r.branch),
        PushResult::Accepted(a) => (Some(a.event_id), Some(a.branch)),
    };
    let mut rejected = Rejected::bare(code, code_message(code));
    rejected.event_id = event_id;
    rejected.branch = branch;
    PushResult::Rejected(rejected)
}

/// The bytes of a conflict record as stored.
pub fn encode_record(record: &ConflictRecord) -> Result<Bytes, ErrorCode> {
    Codec::MsgPack.encode(record).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a conflict record");
        ErrorCode::Internal
    })
}

#[cfg(test)]
mod tests;
