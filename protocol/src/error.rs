//! Stable error codes, WebSocket close codes, and the codec's error types.
//!
//! Every error that crosses the wire carries one [`ErrorCode`]; its snake_case name is stable
//! and listed in PROTOCOL.md. A session the hub ends is closed with one [`CloseCode`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code. The wire form is the snake_case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bytes are not valid JSON or MessagePack, or end early.
    Malformed,
    /// The frame's `type` is not one this protocol version knows.
    UnknownFrameType,
    /// The event's `kind` is not one this protocol version knows.
    UnknownKind,
    /// A field is missing, has the wrong type, or holds a value its type does not allow.
    InvalidField,
    /// The frame or request body is larger than the hub accepts.
    MessageTooBig,
    /// The client speaks a protocol version the hub does not.
    UnsupportedVersion,
    /// The first frame of a session was not a valid `hello`.
    BadHello,
    /// A frame that is not allowed at this point (a second `hello`, an ack for a branch the
    /// session does not follow…).
    ProtocolViolation,
    /// The token is missing, malformed, or not signed by this hub.
    Unauthorized,
    /// The token has expired.
    TokenExpired,
    /// The token does not allow this tenant, branch, device or action.
    Forbidden,
    /// The event breaks a rule of its kind (see PROTOCOL.md); it will never be accepted as is.
    InvalidEvent,
    /// The event's `device_seq` skips ahead; resend from `expected_device_seq`.
    OutOfOrder,
    /// The event's `device_seq` was already used by another event of this device; continue
    /// numbering from `expected_device_seq`.
    DeviceSeqReused,
    /// An event with this `event_id` was accepted before with different content.
    IdempotencyMismatch,
    /// A catalog write based on a stale version lost under the branch's policy.
    Conflict,
    /// A `stock.counted` whose `base_seq` is outside the log (below its floor or past its head).
    StaleBase,
    /// The position cannot be served (another epoch, older than retention, or past the head);
    /// take a snapshot and resume from it.
    ResyncRequired,
    /// No such branch, conflict or route.
    NotFound,
    /// A snapshot page token outlived the snapshot; start the snapshot again.
    SnapshotExpired,
    /// The conflict was already resolved.
    ConflictAlreadyResolved,
    /// Too many requests or publishes; slow down and retry.
    RateLimited,
    /// The hub is at its connection limit or refusing connections during a storm; retry later.
    Overloaded,
    /// The session could not keep up with its branches and was closed; reconnect and resume.
    TooSlow,
    /// The device opened more sessions than allowed; this, its oldest, was closed.
    SessionReplaced,
    /// The session sent nothing (not even a pong) for too long.
    IdleTimeout,
    /// The hub cannot write to its store; nothing was accepted. Retry later.
    StorageUnavailable,
    /// The hub is shutting down; reconnect (to it or another) shortly.
    ShuttingDown,
    /// A fault in the hub.
    Internal,
    /// A code this version of the protocol crate does not know (sent by a newer hub).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 30] = [
        ErrorCode::Malformed,
        ErrorCode::UnknownFrameType,
        ErrorCode::UnknownKind,
        ErrorCode::InvalidField,
        ErrorCode::MessageTooBig,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadHello,
        ErrorCode::ProtocolViolation,
        ErrorCode::Unauthorized,
        ErrorCode::TokenExpired,
        ErrorCode::Forbidden,
        ErrorCode::InvalidEvent,
        ErrorCode::OutOfOrder,
        ErrorCode::DeviceSeqReused,
        ErrorCode::IdempotencyMismatch,
        ErrorCode::Conflict,
        ErrorCode::StaleBase,
        ErrorCode::ResyncRequired,
        ErrorCode::NotFound,
        ErrorCode::SnapshotExpired,
        ErrorCode::ConflictAlreadyResolved,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::TooSlow,
        ErrorCode::SessionReplaced,
        ErrorCode::IdleTimeout,
        ErrorCode::StorageUnavailable,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownFrameType => "unknown_frame_type",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::MessageTooBig => "message_too_big",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::BadHello => "bad_hello",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::DeviceSeqReused => "device_seq_reused",
            ErrorCode::IdempotencyMismatch => "idempotency_mismatch",
            ErrorCode::Conflict => "conflict",
            ErrorCode::StaleBase => "stale_base",
            ErrorCode::ResyncRequired => "resync_required",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SnapshotExpired => "snapshot_expired",
            ErrorCode::ConflictAlreadyResolved => "conflict_already_resolved",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TooSlow => "too_slow",
            ErrorCode::SessionReplaced => "session_replaced",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status the sync API answers this code with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Malformed
            | ErrorCode::UnknownFrameType
            | ErrorCode::UnsupportedVersion
            | ErrorCode::BadHello
            | ErrorCode::ProtocolViolation => 400,
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::SnapshotExpired => 410,
            ErrorCode::OutOfOrder
            | ErrorCode::DeviceSeqReused
            | ErrorCode::IdempotencyMismatch
            | ErrorCode::Conflict
            | ErrorCode::ResyncRequired
            | ErrorCode::ConflictAlreadyResolved => 409,
            ErrorCode::MessageTooBig => 413,
            ErrorCode::UnknownKind
            | ErrorCode::InvalidField
            | ErrorCode::InvalidEvent
            | ErrorCode::StaleBase => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::Overloaded
            | ErrorCode::TooSlow
            | ErrorCode::SessionReplaced
            | ErrorCode::IdleTimeout
            | ErrorCode::StorageUnavailable
            | ErrorCode::ShuttingDown => 503,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }

    /// Whether a publish refused with this code will be refused again however often it is
    /// retried unchanged: the client should quarantine the event rather than retry it.
    ///
    /// `out_of_order` and `device_seq_reused` are neither: they ask the client to renumber or
    /// resend, and say how.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ErrorCode::Malformed
                | ErrorCode::UnknownFrameType
                | ErrorCode::UnknownKind
                | ErrorCode::InvalidField
                | ErrorCode::MessageTooBig
                | ErrorCode::Forbidden
                | ErrorCode::InvalidEvent
                | ErrorCode::IdempotencyMismatch
                | ErrorCode::Conflict
                | ErrorCode::StaleBase
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The WebSocket close codes the hub uses. 1000–1011 are the standard ones; 4000–4999 are
/// Branchline's own. A close is always preceded by an `error` frame with the matching
/// [`ErrorCode`], except for a normal close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: the session ended normally.
    Normal = 1000,
    /// 1001: the hub is shutting down (`shutting_down`). Reconnect with backoff.
    ShuttingDown = 1001,
    /// 1009: a frame was larger than the hub accepts (`message_too_big`).
    MessageTooBig = 1009,
    /// 1011: a fault in the hub (`internal`, `storage_unavailable`).
    Internal = 1011,
    /// 4000: the first frame was not a valid `hello` (`bad_hello`, `malformed`…).
    BadHello = 4000,
    /// 4001: the token was refused (`unauthorized`, `token_expired`). Do not retry with it.
    AuthFailed = 4001,
    /// 4002: a frame broke the protocol (`protocol_violation`, `malformed`…).
    ProtocolViolation = 4002,
    /// 4003: the token does not allow what was asked (`forbidden`).
    Forbidden = 4003,
    /// 4004: the hub does not speak the client's protocol version (`unsupported_version`).
    UnsupportedVersion = 4004,
    /// 4005: the client was silent past the idle timeout (`idle_timeout`).
    IdleTimeout = 4005,
    /// 4006: the device opened another session past its limit (`session_replaced`).
    SessionReplaced = 4006,
    /// 4008: the session could not keep up (`too_slow`). Reconnect and resume.
    TooSlow = 4008,
    /// 4029: the hub is overloaded or the client exceeded a rate (`overloaded`,
    /// `rate_limited`). Reconnect with backoff.
    Overloaded = 4029,
}

impl CloseCode {
    /// Every close code.
    pub const ALL: [CloseCode; 13] = [
        CloseCode::Normal,
        CloseCode::ShuttingDown,
        CloseCode::MessageTooBig,
        CloseCode::Internal,
        CloseCode::BadHello,
        CloseCode::AuthFailed,
        CloseCode::ProtocolViolation,
        CloseCode::Forbidden,
        CloseCode::UnsupportedVersion,
        CloseCode::IdleTimeout,
        CloseCode::SessionReplaced,
        CloseCode::TooSlow,
        CloseCode::Overloaded,
    ];

    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The close code with this number, if the hub uses it.
    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    /// Whether a client may reconnect after this close (with backoff) and expect to succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            CloseCode::Normal
                | CloseCode::ShuttingDown
                | CloseCode::Internal
                | CloseCode::IdleTimeout
                | CloseCode::SessionReplaced
                | CloseCode::TooSlow
                | CloseCode::Overloaded
        )
    }

    /// The close code that ends a session after a fatal error with `code`, given whether the
    /// session had finished its hello.
    pub fn for_error(code: ErrorCode, after_hello: bool) -> Self {
        match code {
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => CloseCode::AuthFailed,
            ErrorCode::Forbidden => CloseCode::Forbidden,
            ErrorCode::UnsupportedVersion => CloseCode::UnsupportedVersion,
            ErrorCode::MessageTooBig => CloseCode::MessageTooBig,
            ErrorCode::TooSlow => CloseCode::TooSlow,
            ErrorCode::SessionReplaced => CloseCode::SessionReplaced,
            ErrorCode::IdleTimeout => CloseCode::IdleTimeout,
            ErrorCode::ShuttingDown => CloseCode::ShuttingDown,
            ErrorCode::Overloaded | ErrorCode::RateLimited => CloseCode::Overloaded,
            ErrorCode::Internal | ErrorCode::StorageUnavailable | ErrorCode::Unknown => {
                CloseCode::Internal
            }
            _ if !after_hello => CloseCode::BadHello,
            _ => CloseCode::ProtocolViolation,
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// Why bytes could not be decoded into a frame or body. Never fatal to the decoder: each
/// variant maps to a wire [`ErrorCode`] through [`DecodeError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended in the middle of a value.
    #[error("input ends early")]
    Truncated,
    /// The input is not valid JSON or MessagePack, or has bytes after the value.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// The frame's `type` is missing from this protocol version.
    #[error("unknown frame type {0:?}")]
    UnknownFrameType(String),
    /// The event's `kind` is missing from this protocol version.
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    /// A field is missing, mistyped or out of range.
    #[error("invalid field: {0}")]
    InvalidField(String),
    /// The input is larger than allowed.
    #[error("{size} bytes is more than the limit of {limit}")]
    TooLarge {
        /// The input's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl DecodeError {
    /// The wire code this error is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Truncated | DecodeError::Malformed(_) => ErrorCode::Malformed,
            DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrameType,
            DecodeError::UnknownKind(_) => ErrorCode::UnknownKind,
            DecodeError::InvalidField(_) => ErrorCode::InvalidField,
            DecodeError::TooLarge { .. } => ErrorCode::MessageTooBig,
        }
    }
}

/// A value could not be encoded. Only possible for values outside the wire data model (a
/// `custom` payload holding a map with non-string keys, say); fatal for that value only.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode: {0}")]
pub struct EncodeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_wire_names() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn unknown_codes_from_a_newer_hub_still_decode() {
        let c: ErrorCode = serde_json::from_str("\"quota_exceeded\"").unwrap();
        assert_eq!(c, ErrorCode::Unknown);
    }

    #[test]
    fn close_codes_round_trip_and_are_unique() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(c.as_u16()), Some(c));
        }
        let mut nums: Vec<u16> = CloseCode::ALL.iter().map(|c| c.as_u16()).collect();
        nums.sort_unstable();
        nums.dedup();
        assert_eq!(nums.len(), CloseCode::ALL.len());
        assert_eq!(CloseCode::from_u16(4999), None);
    }

    #[test]
    fn fatal_errors_map_to_the_documented_close_codes() {
        assert_eq!(
            CloseCode::for_error(ErrorCode::TokenExpired, false),
            CloseCode::AuthFailed
        );
        assert_eq!(
            CloseCode::for_error(ErrorCode::Malformed, false),
            CloseCode::BadHello
        );
        assert_eq!(
            CloseCode::for_error(ErrorCode::Malformed, true),
            CloseCode::ProtocolViolation
        );
        assert_eq!(
            CloseCode::for_error(ErrorCode::MessageTooBig, true),
            CloseCode::MessageTooBig
        );
        assert_eq!(
            CloseCode::for_error(ErrorCode::ShuttingDown, true),
            CloseCode::ShuttingDown
        );
    }

    #[test]
    fn ordering_codes_are_not_permanent_but_invalid_events_are() {
        assert!(!ErrorCode::OutOfOrder.is_permanent());
        assert!(!ErrorCode::DeviceSeqReused.is_permanent());
        assert!(!ErrorCode::StorageUnavailable.is_permanent());
        assert!(ErrorCode::InvalidEvent.is_permanent());
        assert!(ErrorCode::Conflict.is_permanent());
    }
}
