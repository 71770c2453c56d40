//! The SDK's errors. Each variant's documentation says whether it is fatal, and to what.

use branchline_protocol::{DecodeError, EncodeError, ErrorCode, IdError};

/// What went wrong in a call on the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local store (sled) failed: the disk is full, unwritable or the database is
    /// corrupt. Fatal to the call that met it: nothing was recorded. The app should tell the
    /// user; the outbox is only as safe as the disk under it.
    #[error("local store: {0}")]
    Store(#[from] sled::Error),
    /// A value held in the local store could not be read back (written by an incompatible
    /// SDK version, or damaged). Fatal to the call; the store needs attention.
    #[error("local store holds an unreadable value at {key}: {reason}")]
    Corrupt {
        /// The key, printed for diagnosis.
        key: String,
        /// Why it did not decode.
        reason: String,
    },
    /// The store is already opened by another `Client` in this or another process. Fatal
    /// to `connect`: one store belongs to one client at a time.
    #[error("the store at {path} is in use by another client")]
    StoreLocked {
        /// The store's path.
        path: String,
    },
    /// An option or argument is invalid (a bad URL, an empty device name…). Fatal to the
    /// call; fix the caller.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A tenant, branch, device name or SKU is not valid. Fatal to the call.
    #[error("invalid name: {0}")]
    Id(#[from] IdError),
    /// The event breaks its kind's rules (PROTOCOL.md §9): the hub would refuse it, so it was
    /// not recorded. Fatal to the call; fix the event.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The event is larger than [`ClientOptions::max_event_bytes`] allows: the hub would
    /// close the connection on it. Fatal to the call; nothing was recorded.
    ///
    /// [`ClientOptions::max_event_bytes`]: crate::ClientOptions::max_event_bytes
    #[error("the event's publish frame is {size} bytes, over the limit of {limit}")]
    EventTooBig {
        /// Its encoded size, as sent (with the largest possible `device_seq`).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A value could not be encoded (a `custom` payload outside the wire data model). Fatal to
    /// the call.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The hub sent bytes that do not decode. Not fatal: the connection is dropped and
    /// resumed.
    #[error("undecodable data from the hub: {0}")]
    Decode(#[from] DecodeError),
    /// The background task has stopped (the client was shut down, or every handle was
    /// dropped). Fatal to the handle: reconnect to use the store again.
    #[error("the client has shut down")]
    Closed,
    /// The hub answered an HTTP request with an error (PROTOCOL.md §11). Whether it is fatal
    /// depends on the code: see [`ErrorCode`].
    #[error("hub refused the request: {code} ({status}): {message}")]
    Hub {
        /// The HTTP status.
        status: u16,
        /// The stable error code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The hub cannot serve the branch from the device's position (PROTOCOL.md §8). Not
    /// fatal: the client takes a snapshot and resumes; only seen from low-level calls.
    #[error("resync required for {}: {:?}", .0.branch, .0.reason)]
    Resync(Box<branchline_protocol::ResyncRequired>),
    /// A network failure talking to the hub. Not fatal: the SDK retries with backoff.
    #[error("network: {0}")]
    Network(String),
    /// No quarantined event has this id. Fatal to the call only.
    #[error("no quarantined event {0}")]
    NotQuarantined(uuid::Uuid),
}

impl Error {
    /// Whether the hub refused the token or the request's scope: retrying with the same
    /// token cannot succeed (PROTOCOL.md §13: do not reconnect after 4001, 4003, 4004). A
    /// batch push refused `forbidden` is not handled as this case by the SDK: it is a
    /// permanent refusal of the events in it, which are quarantined.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Error::Hub {
                code: ErrorCode::Unauthorized
                    | ErrorCode::TokenExpired
                    | ErrorCode::Forbidden
                    | ErrorCode::UnsupportedVersion,
                ..
            }
        )
    }

    pub(crate) fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> Self {
        Error::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        }
    }
}

/// The result type of the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;
