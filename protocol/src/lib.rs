//! # branchline-protocol
//!
//! The Branchline wire protocol, version 1: what cashier tills, admin consoles and the hub say
//! to each other. `PROTOCOL.md` at the repository root is the normative description; this
//! crate is its Rust form, shared by the hub, the client SDK and the load harness.
//!
//! ## Map
//! - [`ids`]: names (tenant, branch, device), SKUs, the log [`Epoch`] and [`Position`].
//! - [`event`]: the event kinds and their bodies — the facts a branch log is made of.
//! - [`model`]: what the hub derives from events: products, stock levels, each event's
//!   [`Effect`], conflicts, devices.
//! - [`frame`]: WebSocket frames, [`ClientFrame`] (hello, publish…) and [`ServerFrame`]
//!   (welcome, event, accepted…).
//! - [`http`]: bodies of the HTTP sync API (events page, batch push, snapshot…), and
//!   [`routes`]: its paths.
//! - [`token`]: what a token's [`Claims`] say (tenant, branches, device, role).
//! - [`error`]: stable [`ErrorCode`]s, WebSocket [`CloseCode`]s, [`DecodeError`].
//! - [`codec`]: [`Codec`], MessagePack (default) or JSON over one API, encoding once into
//!   shareable `Bytes`; [`msgpack`]: MessagePack held to the data model.
//!
//! ## Data flow
//! A till sends [`Hello`] then [`Publish`] frames; the hub sequences each event into the
//! branch log and answers [`Accepted`] or [`Rejected`]; every follower of the branch receives
//! the stored [`Event`] (live, or replayed as [`EventBatch`]es after a resume).
//!
//! ```
//! use branchline_protocol::{ClientFrame, Codec, Ping};
//!
//! let frame = ClientFrame::Ping(Ping { nonce: 7, client_time_ms: 1_700_000_000_000 });
//! for codec in Codec::ALL {
//!     let bytes = codec.encode(&frame).unwrap();
//!     assert_eq!(codec.decode_client_frame(&bytes).unwrap(), frame);
//! }
//! ```

pub mod codec;
mod de;
pub mod error;
pub mod event;
pub mod frame;
pub mod http;
pub mod ids;
pub mod model;
pub mod msgpack;
pub mod routes;
pub mod token;

pub use codec::Codec;
pub use error::{CloseCode, DecodeError, EncodeError, ErrorCode};
pub use event::{
    AdjustReason, ConflictResolved, Custom, EventBody, EventKind, InvalidEvent, Payment,
    PaymentMethod, ProductField, ProductFields, ProductRemoved, ProductUpserted, Resolution,
    SaleLine, SaleRecorded, StockAdjusted, StockCounted, Unit,
};
pub use frame::{
    Accepted, Ack, BranchStart, CaughtUp, ClientFrame, Devices, ErrorFrame, Event, EventBatch,
    Hello, ListDevices, Ping, Pong, Presence, PresenceChange, Publish, Rejected, ResyncReason,
    ResyncRequired, ServerFrame, StartMode, Subscription, Unsubscribe, Welcome,
};
pub use ids::{BranchKey, Epoch, IdError, Name, Position, Sku, UnixMillis, now_ms};
pub use model::{
    ConflictDetail, ConflictNote, ConflictOutcome, ConflictPolicy, ConflictRecord, ConflictStatus,
    DeviceInfo, Effect, ProductRecord, Role, StockLevel,
};
pub use token::{Claims, ClaimsError, TokenBranches};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Protocol versions a hub built from this crate accepts.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// WebSocket subprotocol for MessagePack frames (binary messages). The default.
pub const SUBPROTOCOL_MSGPACK: &str = "branchline.v1.msgpack";

/// WebSocket subprotocol for JSON frames (text messages), for browsers and debugging.
pub const SUBPROTOCOL_JSON: &str = "branchline.v1.json";

/// The largest frame or request body a hub accepts unless configured otherwise: 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// The device name the hub uses for events it makes itself (`conflict.resolved`).
pub const HUB_DEVICE: &str = "hub";

/// Checks that the hub speaks `version`; the error says which versions it does.
pub fn check_version(version: u32) -> Result<(), String> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(format!(
            "protocol version {version} is not supported; this hub speaks {SUPPORTED_VERSIONS:?}"
        ))
    }
}
