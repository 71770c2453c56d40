//! Bodies of the HTTP sync API under `/v1`. JSON by default; MessagePack when the request says
//! `Accept: application/msgpack` (and, for bodies it sends, `Content-Type: application/msgpack`).

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::event::{ProductFields, Resolution};
use crate::frame::{Accepted, Event, Publish, Rejected, ResyncRequired};
use crate::ids::{Epoch, Name, UnixMillis};
use crate::model::{ConflictRecord, ProductRecord, StockLevel};

/// `GET /v1/branches/{tenant}/{branch}/events`: events after a position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    /// The branch.
    pub branch: Name,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// The head when the page was read.
    pub head: u64,
    /// The floor when the page was read.
    pub floor: u64,
    /// The events, in order, at most `limit`.
    pub events: Vec<Event>,
    /// Pass this as `after` for the next page: the last seq in `events`, or the request's
    /// `after` when there were none.
    pub next_after: u64,
    /// Whether more events were already there past this page.
    pub has_more: bool,
}

/// `POST /v1/branches/{tenant}/{branch}/events`: a batch of publishes, processed in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushRequest {
    /// The client's clock when it sent the request; the hub measures the device's clock offset
    /// from it, as from a `hello`.
    pub client_time_ms: UnixMillis,
    /// The events, each with the fields of a `publish` frame (`type` may be left out). Each
    /// event's `branch` must be the path's.
    pub events: Vec<Publish>,
}

/// The result for one event of a batch push: exactly the frame the WebSocket would have sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PushResult {
    /// Accepted (or a duplicate of an accepted event).
    Accepted(Accepted),
    /// Refused; nothing changed.
    Rejected(Rejected),
}

/// The answer to a batch push: one result per event, in request order. Sent only after every
/// accepted event is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The branch.
    pub branch: Name,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// One per event.
    pub results: Vec<PushResult>,
}

/// `GET /v1/branches/{tenant}/{branch}/snapshot`: one page of branch state, pinned to `at_seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPage {
    /// The branch.
    pub branch: Name,
    /// The epoch of `at_seq`.
    pub epoch: Epoch,
    /// Every page of one snapshot holds the state exactly as it was after this seq. Resume
    /// from `(epoch, at_seq)` once all pages are in.
    pub at_seq: u64,
    /// How many items the whole snapshot has (for progress).
    pub total_items: u64,
    /// This page's items, in SKU order.
    pub items: Vec<SnapshotItem>,
    /// Pass as `page_token` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
    /// After this time the snapshot's page tokens stop working (start again without one).
    pub expires_at_ms: UnixMillis,
}

/// One SKU of a snapshot: its product, its stock level, or both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotItem {
    /// The product, if the SKU is or was in the catalog (removed ones included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<ProductRecord>,
    /// The stock level, if stock of the SKU ever moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock: Option<StockLevel>,
}

/// `GET /v1/time`: the hub's clock, for measuring clock offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeResponse {
    /// The hub's clock now.
    pub server_time_ms: UnixMillis,
}

/// `GET /v1/branches/{tenant}/{branch}`: where a branch stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BranchStatus {
    /// The tenant.
    pub tenant: Name,
    /// The branch.
    pub branch: Name,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// The last sequenced event.
    pub head: u64,
    /// The retention floor.
    pub floor: u64,
    /// Events sequenced per second, averaged over the last minute.
    pub events_per_s: f64,
    /// Devices with at least one live session.
    pub devices_online: u32,
    /// Live sessions following the branch.
    pub sessions: u32,
    /// SKUs whose stock is below zero.
    pub oversold_skus: u64,
    /// Conflicts waiting for an admin.
    pub open_conflicts: u64,
}

/// `GET /v1/branches/{tenant}/{branch}/conflicts`: recorded conflicts, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictsPage {
    /// The branch.
    pub branch: Name,
    /// The conflicts.
    pub conflicts: Vec<ConflictRecord>,
}

/// `POST /v1/branches/{tenant}/{branch}/conflicts/{id}/resolve`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// How to resolve it.
    pub resolution: Resolution,
    /// For `merged`: the fields to apply on top of the server's product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<ProductFields>,
}

/// The answer to a resolve: the updated record and the `conflict.resolved` event's position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResolveResponse {
    /// The conflict, now resolved.
    pub conflict: ConflictRecord,
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// The seq of the `conflict.resolved` event.
    pub seq: u64,
}

/// The body of every HTTP error (`application/problem+json`, or MessagePack).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The HTTP status.
    pub status: u16,
    /// The stable code.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
    /// For `resync_required`: where the log stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncRequired>,
}

impl Problem {
    /// A problem with `code`'s usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.http_status(),
            code,
            message: message.into(),
            resync: None,
        }
    }
}
