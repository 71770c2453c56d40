//! How sync stands: a [`SyncStatus`] (watched) and a stream of [`ClientEvent`]s.

use std::fmt;
use std::time::Duration;

use branchline_protocol::{ErrorCode, Name, Position, ResyncReason, UnixMillis};
use uuid::Uuid;

/// What the client is doing right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SyncState {
    /// Trying to reach the hub (first connection, or reconnecting after backoff).
    #[default]
    Connecting,
    /// A WebSocket session is open and every followed branch is caught up or catching up.
    Live,
    /// The WebSocket could not be held; events are pulled by HTTP long polling and the
    /// outbox is pushed by HTTP. The socket is probed now and then.
    Polling,
    /// The hub cannot be reached, or refused the token; the client keeps recording and waits
    /// (with backoff, or for a new token).
    Offline,
    /// A followed branch is being rebuilt from a snapshot (see
    /// [`SyncStatus::snapshot`]).
    Resyncing,
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncState::Connecting => "connecting",
            SyncState::Live => "live",
            SyncState::Polling => "polling",
            SyncState::Offline => "offline",
            SyncState::Resyncing => "resyncing",
        })
    }
}

/// Progress of a snapshot download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotProgress {
    /// The branch being rebuilt.
    pub branch: Name,
    /// Items received so far.
    pub received: u64,
    /// Items in the whole snapshot (0 until the first page).
    pub total: u64,
}

/// A summary of how sync stands, for a status bar. Watch it with
/// [`Client::status`](crate::Client::status).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncStatus {
    /// What the client is doing.
    pub state: SyncState,
    /// Events recorded on this device that the hub has not accepted yet.
    pub pending: u64,
    /// When the oldest of them was recorded (device clock); `None` when nothing is pending.
    pub oldest_pending_ms: Option<UnixMillis>,
    /// Events set aside because the hub refused them permanently (see
    /// [`Client::quarantined`](crate::Client::quarantined)).
    pub quarantined: u64,
    /// When the hub last accepted a publish from this device, in hub time.
    pub last_push_ms: Option<UnixMillis>,
    /// When the device last received events or a caught-up from the hub, in hub time.
    pub last_pull_ms: Option<UnixMillis>,
    /// Events the hub has that this device has not applied yet, summed over followed
    /// branches (as of the last word from the hub).
    pub lag: u64,
    /// Measured offset of the hub's clock from the device's, in ms (hub minus device).
    pub clock_offset_ms: Option<i64>,
    /// The snapshot being downloaded, while [`SyncState::Resyncing`].
    pub snapshot: Option<SnapshotProgress>,
    /// The last error met talking to the hub (cleared when live again).
    pub last_error: Option<String>,
}

impl SyncStatus {
    /// How long the oldest pending event has waited, measured on the device clock.
    pub fn oldest_pending_age(&self, now_ms: UnixMillis) -> Option<Duration> {
        self.oldest_pending_ms
            .map(|t| Duration::from_millis(u64::try_from(now_ms.saturating_sub(t)).unwrap_or(0)))
    }
}

impl fmt::Display for SyncStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.state)?;
        if let Some(s) = &self.snapshot {
            write!(f, " ({}: {}/{} items)", s.branch, s.received, s.total)?;
        }
        write!(f, ", {} pending", self.pending)?;
        if let Some(age) = self.oldest_pending_age(branchline_protocol::now_ms()) {
            write!(f, " (oldest {}s)", age.as_secs())?;
        }
        if self.quarantined > 0 {
            write!(f, ", {} quarantined", self.quarantined)?;
        }
        if self.lag > 0 {
            write!(f, ", {} behind", self.lag)?;
        }
        if let Some(e) = &self.last_error {
            write!(f, ", last error: {e}")?;
        }
        Ok(())
    }
}

/// Something that happened to the client's connection or sync, in order. Listen with
/// [`Client::notifications`](crate::Client::notifications).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A WebSocket session opened.
    Connected {
        /// The hub's session id.
        session_id: Uuid,
    },
    /// The connection was lost or closed; the client will retry after `retry_in`.
    Disconnected {
        /// Why, for people.
        reason: String,
        /// The backoff delay before the next attempt.
        retry_in: Duration,
    },
    /// Switched to HTTP polling (the WebSocket failed this many times in a row, or
    /// polling was configured).
    Polling {
        /// Consecutive WebSocket failures that led here (0 when configured).
        websocket_failures: u32,
    },
    /// A followed branch is caught up at `position`.
    CaughtUp {
        /// The branch.
        branch: Name,
        /// Where it is.
        position: Position,
    },
    /// A branch cannot be resumed from the device's position; a snapshot follows.
    ResyncRequired {
        /// The branch.
        branch: Name,
        /// Why.
        reason: ResyncReason,
    },
    /// A branch's replica was rebuilt from a snapshot.
    Resynced {
        /// The branch.
        branch: Name,
        /// Where the snapshot was pinned.
        position: Position,
    },
    /// The hub accepted a publish.
    Accepted {
        /// The event.
        event_id: Uuid,
        /// Where it was sequenced.
        position: Position,
        /// The hub had accepted it before (a retry after a lost answer); nothing changed.
        duplicate: bool,
    },
    /// The hub refused an event permanently; it was moved to quarantine and the events
    /// behind it carry on.
    Quarantined {
        /// The event.
        event_id: Uuid,
        /// Why.
        code: ErrorCode,
        /// The hub's explanation.
        message: String,
    },
    /// The hub said this device's `device_seq` counter was behind (its store was lost or
    /// restored); pending events were renumbered from `from`.
    Renumbered {
        /// The branch.
        branch: Name,
        /// The first new number.
        from: u64,
    },
    /// The hub refused the token (`unauthorized`, `token_expired`, `forbidden`). The client
    /// waits for [`Client::set_token`](crate::Client::set_token).
    AuthFailed {
        /// The code.
        code: ErrorCode,
        /// The hub's explanation.
        message: String,
    },
    /// A device joined or left a followed branch (admin sessions only).
    Presence(branchline_protocol::Presence),
    /// The devices of a followed branch (admin sessions, on subscribing).
    Devices(branchline_protocol::Devices),
    /// A non-fatal error worth showing in a log.
    Error {
        /// What happened.
        message: String,
    },
}

impl fmt::Display for ClientEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientEvent::Connected { session_id } => write!(f, "connected (session {session_id})"),
            ClientEvent::Disconnected { reason, retry_in } => {
                write!(f, "disconnected: {reason}; retrying in {retry_in:?}")
            }
            ClientEvent::Polling { websocket_failures } => {
                write!(
                    f,
                    "polling over HTTP after {websocket_failures} WebSocket failures"
                )
            }
            ClientEvent::CaughtUp { branch, position } => {
                write!(f, "{branch} caught up at {position}")
            }
            ClientEvent::ResyncRequired { branch, reason } => {
                write!(f, "{branch} needs a resync ({reason:?})")
            }
            ClientEvent::Resynced { branch, position } => {
                write!(f, "{branch} resynced from a snapshot at {position}")
            }
            ClientEvent::Accepted {
                event_id,
                position,
                duplicate,
            } => {
                write!(f, "event {event_id} sequenced at {position}")?;
                if *duplicate {
                    f.write_str(" (a retry; already accepted)")?;
                }
                Ok(())
            }
            ClientEvent::Quarantined {
                event_id,
                code,
                message,
            } => write!(f, "event {event_id} quarantined: {code}: {message}"),
            ClientEvent::Renumbered { branch, from } => {
                write!(
                    f,
                    "{branch}: pending events renumbered from device_seq {from}"
                )
            }
            ClientEvent::AuthFailed { code, message } => {
                write!(f, "the hub refused the token: {code}: {message}")
            }
            ClientEvent::Presence(p) => write!(
                f,
                "{}: {} {} ({} sessions)",
                p.branch,
                p.device.device,
                match p.change {
                    branchline_protocol::PresenceChange::Joined => "joined",
                    branchline_protocol::PresenceChange::Left => "left",
                },
                p.device.sessions
            ),
            ClientEvent::Devices(d) => {
                write!(
                    f,
                    "{}: {} devices at head {}",
                    d.branch,
                    d.devices.len(),
                    d.head
                )
            }
            ClientEvent::Error { message } => write!(f, "error: {message}"),
        }
    }
}
