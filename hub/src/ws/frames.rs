//! What a session writes: frames as WebSocket messages, in the session's codec, and the live
//! batches every follower of a branch shares.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::{Message, Utf8Bytes};
use branchline_protocol::{Codec, DecodeError, Epoch, Name, ServerFrame};
use bytes::Bytes;

use crate::engine::{Publication, StoredEvent, events_frame};

/// One commit's events of one branch as every follower gets them: the MessagePack frame the
/// engine encoded, and the JSON one, made on first need and shared after.
pub struct LiveBatch {
    publication: Arc<Publication>,
    json: OnceLock<Option<Utf8Bytes>>,
}

impl LiveBatch {
    /// The batch of a publication.
    pub fn new(publication: Arc<Publication>) -> Self {
        Self {
            publication,
            json: OnceLock::new(),
        }
    }

    /// The branch's name.
    pub fn branch(&self) -> &Name {
        &self.publication.branch.branch
    }

    /// The first seq.
    pub fn first(&self) -> u64 {
        self.publication.first()
    }

    /// The last seq.
    pub fn last(&self) -> u64 {
        self.publication.last()
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.publication.events.len()
    }

    /// Whether the batch is empty (never, for publications an engine makes).
    pub fn is_empty(&self) -> bool {
        self.publication.events.is_empty()
    }

    /// The whole batch as one frame in `codec`, encoded once and shared.
    pub fn message(&self, codec: Codec) -> Option<Message> {
        let p = &self.publication;
        match codec {
            Codec::MsgPack => Some(Message::Binary(p.frame.clone())),
            Codec::Json => self
                .json
                .get_or_init(|| json_events(&p.branch.branch, p.epoch, &p.events))
                .clone()
                .map(Message::Text),
        }
    }

    /// The events after `delivered` as one frame (for a session that already has some).
    pub fn message_after(&self, delivered: u64, codec: Codec) -> Option<Message> {
        let p = &self.publication;
        let rest: Vec<StoredEvent> = p
            .events
            .iter()
            .filter(|e| e.seq > delivered)
            .cloned()
            .collect();
        events_message(codec, &p.branch.branch, p.epoch, &rest)
    }
}

/// Events as an `event` frame (one) or an `events` frame (several), from their stored bytes.
pub fn events_message(
    codec: Codec,
    branch: &Name,
    epoch: Epoch,
    events: &[StoredEvent],
) -> Option<Message> {
    match codec {
        Codec::MsgPack => Some(Message::Binary(events_frame(
            codec,
            branch,
            epoch,
            events.iter().map(|e| e.bytes.clone()).collect(),
        ))),
        Codec::Json => json_events(branch, epoch, events).map(Message::Text),
    }
}

fn json_events(branch: &Name, epoch: Epoch, events: &[StoredEvent]) -> Option<Utf8Bytes> {
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
    Utf8Bytes::try_from(events_frame(Codec::Json, branch, epoch, json)).ok()
}

/// A frame as a message in `codec` (binary for MessagePack, text for JSON).
pub fn encode(codec: Codec, frame: &ServerFrame) -> Option<Message> {
    match codec.encode(frame) {
        Ok(bytes) if codec.is_binary() => Some(Message::Binary(bytes)),
        Ok(bytes) => Utf8Bytes::try_from(bytes).ok().map(Message::Text),
        Err(e) => {
            tracing::error!(error = %e, frame = frame.type_name(), "cannot encode a frame");
            None
        }
    }
}
