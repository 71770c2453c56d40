//! What the event stream yields.

use std::fmt;

use branchline_protocol::{Event, Name, Position};
use serde::{Deserialize, Serialize};

/// One item of [`Client::events`](crate::Client::events): a sequenced event applied to the
/// replica, or a change that replaced the replica wholesale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Update {
    /// The next sequenced event of its branch (`seq` = previous + 1), already applied to the
    /// local replica.
    Event(Box<Event>),
    /// The branch could not be resumed from the device's position (it was offline past the
    /// hub's retention, or the hub's log was reset), so the replica was replaced by a
    /// snapshot pinned at `position`. Events up to `position` are not delivered one by one;
    /// the stream continues with `position.seq + 1`.
    Resynced {
        /// The branch.
        branch: Name,
        /// Where the snapshot was pinned.
        position: Position,
    },
    /// This stream fell behind the local log's capacity
    /// ([`ClientOptions::local_log_capacity`](crate::ClientOptions::local_log_capacity)) and
    /// `missed` updates were dropped from it. The replica is complete regardless.
    Lagged {
        /// How many updates this stream skipped.
        missed: u64,
    },
}

impl fmt::Display for Update {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Update::Event(e) => write!(
                f,
                "{}@{} {} from {}#{}",
                e.branch,
                e.seq,
                e.body.kind(),
                e.device,
                e.device_seq
            ),
            Update::Resynced { branch, position } => {
                write!(f, "{branch} resynced from a snapshot at {position}")
            }
            Update::Lagged { missed } => write!(f, "stream lagged: {missed} updates skipped"),
        }
    }
}
