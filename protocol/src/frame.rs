//! WebSocket frames. Every frame is a map with a `type` field naming it; fields this version
//! does not know are ignored, so newer peers can add fields without breaking older ones.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ErrorCode;
use crate::event::EventBody;
use crate::ids::{Epoch, Name, Position, UnixMillis};
use crate::model::{ConflictDetail, DeviceInfo, Effect, Role};

/// A frame a client sends. (Decoding is hand-written, in `de.rs`, to avoid buffering.)
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Must be the first frame of a session.
    Hello(Hello),
    /// Publish one event.
    Publish(Publish),
    /// Follow one more branch.
    Subscribe(Subscription),
    /// Stop following a branch.
    Unsubscribe(Unsubscribe),
    /// Report the position the client has applied (for lag shown to admins).
    Ack(Ack),
    /// Ask for the devices of a branch (admins only).
    ListDevices(ListDevices),
    /// Application-level ping, answered by `pong`; also used to measure clock offset.
    Ping(Ping),
}

impl ClientFrame {
    /// The frame's wire `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Hello(_) => "hello",
            ClientFrame::Publish(_) => "publish",
            ClientFrame::Subscribe(_) => "subscribe",
            ClientFrame::Unsubscribe(_) => "unsubscribe",
            ClientFrame::Ack(_) => "ack",
            ClientFrame::ListDevices(_) => "list_devices",
            ClientFrame::Ping(_) => "ping",
        }
    }

    /// Every client frame type.
    pub const TYPES: [&'static str; 7] = [
        "hello",
        "publish",
        "subscribe",
        "unsubscribe",
        "ack",
        "list_devices",
        "ping",
    ];
}

/// `hello`: opens a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// The client's token (HS256 JWT).
    pub token: String,
    /// The tenant; must be the token's.
    pub tenant: Name,
    /// The device; must be the token's.
    pub device: Name,
    /// The client's clock now. The hub measures the device's clock offset from it (used by
    /// the `newest_wins` policy).
    pub client_time_ms: UnixMillis,
    /// Branches to follow from the start.
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    /// Free-form client name and version, for logs (such as `branchline-client/0.1.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// Follow a branch, from a position or live from now. Used in `hello` and as the `subscribe`
/// frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The branch.
    pub branch: Name,
    /// The last position the client has; absent to start live from the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Position>,
}

/// `unsubscribe`: stop following a branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribe {
    /// The branch.
    pub branch: Name,
}

/// The envelope of a published event. Shared by the `publish` frame and the HTTP batch push.
/// (Decoding is hand-written, in `de.rs`.)
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Publish {
    /// The branch to publish to.
    pub branch: Name,
    /// Client-made UUID v7, the event's identity for deduplication.
    pub event_id: Uuid,
    /// This device's counter for this branch: 1, 2, 3… over accepted events, kept on the
    /// device across restarts.
    pub device_seq: u64,
    /// When the event happened, on the device's clock.
    pub client_time_ms: UnixMillis,
    /// For `stock.counted`: the last seq the device had applied when it counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_seq: Option<u64>,
    /// For `product.*`: the product version the device based its write on (0 for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// Kind and body.
    #[serde(flatten)]
    pub body: EventBody,
}

/// `ack`: the client has applied every event of `branch` up to `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The branch.
    pub branch: Name,
    /// The epoch of the position.
    pub epoch: Epoch,
    /// The last seq applied.
    pub seq: u64,
}

/// `list_devices`: ask for a branch's devices; answered by `devices`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDevices {
    /// The branch.
    pub branch: Name,
}

/// `ping`: answered by `pong` with the same nonce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Any number; echoed.
    pub nonce: u64,
    /// The client's clock when it sent the ping.
    pub client_time_ms: UnixMillis,
}

/// A frame the hub sends. (Decoding is hand-written, in `de.rs`, to avoid buffering.)
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The answer to a good `hello`.
    Welcome(Welcome),
    /// The answer to `subscribe`.
    Subscribed(BranchStart),
    /// The answer to `unsubscribe`.
    Unsubscribed(Unsubscribe),
    /// One sequenced event.
    Event(Box<Event>),
    /// Several consecutive events of one branch (replay and catch-up).
    Events(EventBatch),
    /// Everything up to `seq` was delivered; from here on events arrive live.
    CaughtUp(CaughtUp),
    /// A publish was accepted (or was a duplicate of an accepted one).
    Accepted(Accepted),
    /// A publish was refused.
    Rejected(Rejected),
    /// The branch position cannot be served: take a snapshot and resume from it.
    ResyncRequired(ResyncRequired),
    /// A device joined or left a branch (sent to admins).
    Presence(Presence),
    /// The devices of a branch (the answer to `list_devices`, and sent to admins when they
    /// subscribe).
    Devices(Devices),
    /// An error not tied to one publish. Fatal ones are followed by a close.
    Error(ErrorFrame),
    /// The answer to `ping`.
    Pong(Pong),
}

impl ServerFrame {
    /// The frame's wire `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerFrame::Welcome(_) => "welcome",
            ServerFrame::Subscribed(_) => "subscribed",
            ServerFrame::Unsubscribed(_) => "unsubscribed",
            ServerFrame::Event(_) => "event",
            ServerFrame::Events(_) => "events",
            ServerFrame::CaughtUp(_) => "caught_up",
            ServerFrame::Accepted(_) => "accepted",
            ServerFrame::Rejected(_) => "rejected",
            ServerFrame::ResyncRequired(_) => "resync_required",
            ServerFrame::Presence(_) => "presence",
            ServerFrame::Devices(_) => "devices",
            ServerFrame::Error(_) => "error",
            ServerFrame::Pong(_) => "pong",
        }
    }

    /// Every server frame type.
    pub const TYPES: [&'static str; 13] = [
        "welcome",
        "subscribed",
        "unsubscribed",
        "event",
        "events",
        "caught_up",
        "accepted",
        "rejected",
        "resync_required",
        "presence",
        "devices",
        "error",
        "pong",
    ];
}

/// `welcome`: the session is open.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the hub will speak (the client's).
    pub protocol: u32,
    /// This session's id, for logs.
    pub session_id: Uuid,
    /// The hub's clock now.
    pub server_time_ms: UnixMillis,
    /// The hub pings this often; a client silent for 3 such intervals is closed.
    pub heartbeat_ms: u64,
    /// The largest frame the hub accepts, in bytes.
    pub max_frame_bytes: u64,
    /// The role the token grants.
    pub role: Role,
    /// How each subscribed branch starts.
    pub branches: Vec<BranchStart>,
}

/// How a followed branch starts: where its log is and how the client will be brought up to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchStart {
    /// The branch.
    pub branch: Name,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// The last sequenced event (0 if none).
    pub head: u64,
    /// The oldest seq still in the log is `floor + 1`; positions below `floor` must resync.
    pub floor: u64,
    /// What happens next for this branch.
    pub mode: StartMode,
    /// The last `device_seq` the hub applied from this device on this branch (0 if none): a
    /// device that lost its counter continues from here.
    pub last_device_seq: u64,
}

/// How a followed branch is brought up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Nothing to replay: events arrive live (after a `caught_up`).
    Live,
    /// Missed events are replayed in `events` frames, then `caught_up`, then live.
    Replay,
    /// The position cannot be served; a `resync_required` frame follows and nothing else is
    /// sent for this branch.
    ResyncRequired,
}

/// `event`: one sequenced event, as stored in the log. (Decoding is hand-written, in `de.rs`.)
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// The branch.
    pub branch: Name,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// Position in the branch: previous + 1, from 1.
    pub seq: u64,
    /// The publisher's event id.
    pub event_id: Uuid,
    /// The publishing device (`hub` for hub-made events).
    pub device: Name,
    /// The publisher's device counter (0 for hub-made events).
    pub device_seq: u64,
    /// When it happened, on the publisher's clock.
    pub client_time_ms: UnixMillis,
    /// When the hub sequenced it.
    pub server_time_ms: UnixMillis,
    /// As published (`stock.counted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_seq: Option<u64>,
    /// As published (`product.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// Kind and body, as published.
    #[serde(flatten)]
    pub body: EventBody,
    /// What the event did to branch state.
    #[serde(default, skip_serializing_if = "Effect::is_empty")]
    pub effect: Effect,
}

impl Event {
    /// The event's position.
    pub fn position(&self) -> Position {
        Position::new(self.epoch, self.seq)
    }
}

/// `events`: consecutive events of one branch, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// The branch.
    pub branch: Name,
    /// The epoch of every event in the batch.
    pub epoch: Epoch,
    /// The events, each as in an `event` frame (including its `"type": "event"`).
    pub events: Vec<Event>,
}

/// `caught_up`: every event up to `seq` was delivered; the branch is live from here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaughtUp {
    /// The branch.
    pub branch: Name,
    /// The epoch.
    pub epoch: Epoch,
    /// The last seq delivered.
    pub seq: u64,
}

/// `accepted`: the publish is durable and sequenced at `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The event id that was published.
    pub event_id: Uuid,
    /// The branch.
    pub branch: Name,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// The seq the event has (the original one for a duplicate).
    pub seq: u64,
    /// Whether this event id had already been accepted; nothing changed this time.
    pub duplicate: bool,
}

/// `rejected`: the publish was refused and changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The event id, if the frame was readable enough to have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    /// The branch, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<Name>,
    /// Why.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
    /// For `out_of_order` and `device_seq_reused`: the `device_seq` the hub expects next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_device_seq: Option<u64>,
    /// For `conflict`: what the server has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Box<ConflictDetail>>,
}

impl Rejected {
    /// A refusal of the publish `event_id` on `branch`, with no further detail.
    pub fn of(event_id: Uuid, branch: Name, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            event_id: Some(event_id),
            branch: Some(branch),
            ..Self::bare(code, message)
        }
    }

    /// A refusal of a publish too unreadable to name its event or branch (or of something
    /// that is not a publish, such as a resolution).
    pub fn bare(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            event_id: None,
            branch: None,
            code,
            message: message.into(),
            expected_device_seq: None,
            conflict: None,
        }
    }
}

/// `resync_required`: the branch cannot be resumed from the client's position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequired {
    /// The branch.
    pub branch: Name,
    /// Why.
    pub reason: ResyncReason,
    /// The branch log's epoch now.
    pub epoch: Epoch,
    /// The head now.
    pub head: u64,
    /// The floor now.
    pub floor: u64,
}

/// Why a position cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// The position is of another epoch (the log was reset or restored).
    EpochMismatch,
    /// Events after the position were trimmed by retention.
    BelowFloor,
    /// The position is past the head (the hub lost events it had acknowledged, which a
    /// restored backup can cause).
    AheadOfHead,
}

/// `presence`: a device joined or left a branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The branch.
    pub branch: Name,
    /// Joined or left.
    pub change: PresenceChange,
    /// The device as it is now.
    pub device: DeviceInfo,
}

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceChange {
    /// The device's first session on the branch opened.
    Joined,
    /// The device's last session on the branch closed.
    Left,
}

/// `devices`: the devices of a branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// The branch.
    pub branch: Name,
    /// Its head seq, for computing lag.
    pub head: u64,
    /// Devices known to the branch: online ones and those seen recently.
    pub devices: Vec<DeviceInfo>,
}

/// `error`: an error not tied to a single publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Why.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
    /// Whether the hub closes the session after this frame.
    pub fatal: bool,
}

/// `pong`: the answer to `ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
    /// The ping's client time, echoed.
    pub client_time_ms: UnixMillis,
    /// The hub's clock when it answered.
    pub server_time_ms: UnixMillis,
}
