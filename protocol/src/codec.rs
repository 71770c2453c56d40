//! The two wire encodings behind one API.
//!
//! MessagePack (the default, binary WebSocket frames) and JSON (text frames) carry the same
//! data model: maps with string keys, strings, integers, booleans, arrays and null. UUIDs and
//! epochs are strings in both, so a MessagePack value converts to JSON and back unchanged.
//! Values are encoded once into [`Bytes`] that can be shared by every connection that sends
//! them.

use std::io::ErrorKind;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{DecodeError, EncodeError};
use crate::event::EventKind;
use crate::frame::{ClientFrame, Publish, ServerFrame};
use crate::ids::{Epoch, Name};
use crate::msgpack;
use crate::{SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK};

/// A wire encoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// MessagePack with maps for structs and strings for UUIDs: binary frames,
    /// `application/msgpack`.
    #[default]
    MsgPack,
    /// JSON: text frames, `application/json`.
    Json,
}

impl Codec {
    /// Both codecs, the default first.
    pub const ALL: [Codec; 2] = [Codec::MsgPack, Codec::Json];

    /// The WebSocket subprotocol that selects this codec.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::MsgPack => SUBPROTOCOL_MSGPACK,
            Codec::Json => SUBPROTOCOL_JSON,
        }
    }

    /// The codec a WebSocket subprotocol selects.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.subprotocol() == name.trim())
    }

    /// The HTTP media type of this codec.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::MsgPack => "application/msgpack",
            Codec::Json => "application/json",
        }
    }

    /// The codec for an HTTP media type (parameters such as `; charset=utf-8` ignored).
    pub fn from_content_type(media: &str) -> Option<Self> {
        let essence = media
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Some(Codec::MsgPack)
            }
            "application/json" | "application/problem+json" | "text/json" => Some(Codec::Json),
            _ => None,
        }
    }

    /// Whether frames of this codec are binary WebSocket messages (text otherwise).
    pub fn is_binary(self) -> bool {
        self == Codec::MsgPack
    }

    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, EncodeError> {
        let mut buf = Vec::with_capacity(256);
        self.encode_into(value, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// Encodes `value`, appending to `buf`.
    pub fn encode_into<T: Serialize + ?Sized>(
        self,
        value: &T,
        buf: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        match self {
            Codec::MsgPack => {
                let mut ser = rmp_serde::Serializer::new(&mut *buf)
                    .with_struct_map()
                    .with_human_readable();
                value
                    .serialize(&mut ser)
                    .map_err(|e| EncodeError(e.to_string()))
            }
            Codec::Json => {
                serde_json::to_writer(buf, value).map_err(|e| EncodeError(e.to_string()))
            }
        }
    }

    /// Decodes one value that must fill `bytes` exactly. Never panics, whatever the input.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, DecodeError> {
        match self {
            Codec::MsgPack => {
                // One value, inside the data model: what rmp-serde alone would let through
                // (binary for strings, float32, trailing bytes) is refused first.
                msgpack::check(bytes)?;
                let mut de = rmp_serde::Deserializer::new(bytes).with_human_readable();
                T::deserialize(&mut de).map_err(from_rmp)
            }
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| from_json(&e)),
        }
    }

    /// Decodes a client frame, telling an unknown frame type or event kind apart from other
    /// field errors.
    pub fn decode_client_frame(self, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        self.decode(bytes)
            .map_err(|e| self.classify(bytes, &ClientFrame::TYPES, e))
    }

    /// Decodes a server frame, telling an unknown frame type or event kind apart from other
    /// field errors.
    pub fn decode_server_frame(self, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        self.decode(bytes)
            .map_err(|e| self.classify(bytes, &ServerFrame::TYPES, e))
    }

    /// What a frame that did not decode says about itself, read leniently: its `type`, and
    /// the `event_id` and `branch` a `publish` is answered with, each only if it is there as
    /// a string of the right form (a UUID sent as sixteen raw bytes names no event).
    pub fn frame_header(self, bytes: &[u8]) -> FrameHeader {
        let mut header = FrameHeader::default();
        let mut take = |key: &str, value: &str| match key {
            "type" => header.frame_type = Some(value.to_owned()),
            "event_id" => header.event_id = Uuid::parse_str(value).ok(),
            "branch" => header.branch = Name::new(value).ok(),
            _ => {}
        };
        match self {
            Codec::Json => {
                if let Ok(serde_json::Value::Object(map)) =
                    serde_json::from_slice::<serde_json::Value>(bytes)
                {
                    for (key, value) in &map {
                        if let Some(value) = value.as_str() {
                            take(key, value);
                        }
                    }
                }
            }
            Codec::MsgPack => {
                let mut rest = bytes;
                let Ok(len) = rmp::decode::read_map_len(&mut rest) else {
                    return header;
                };
                for _ in 0..len {
                    let Ok((key, after_key)) = rmp::decode::read_str_from_slice(rest) else {
                        break;
                    };
                    rest = after_key;
                    if let Ok((value, after_value)) = rmp::decode::read_str_from_slice(rest) {
                        take(key, value);
                        rest = after_value;
                    } else if msgpack::split_value(&mut rest).is_err() {
                        break;
                    }
                }
            }
        }
        header
    }

    /// Makes an `event` frame from an [`Event`](crate::Event) encoded with this codec (as the
    /// log stores it) by putting the `"type": "event"` entry in front, without decoding it.
    /// The result is byte for byte what encoding `ServerFrame::Event` would give.
    pub fn event_frame(self, stored: &[u8]) -> Result<Bytes, DecodeError> {
        let mut buf = Vec::with_capacity(stored.len() + 16);
        match self {
            Codec::MsgPack => {
                let (len, header) = match stored.first() {
                    Some(&m @ 0x80..=0x8f) => (u32::from(m & 0x0f), 1),
                    Some(0xde) if stored.len() >= 3 => {
                        (u32::from(u16::from_be_bytes([stored[1], stored[2]])), 3)
                    }
                    Some(0xdf) if stored.len() >= 5 => (
                        u32::from_be_bytes([stored[1], stored[2], stored[3], stored[4]]),
                        5,
                    ),
                    _ => {
                        return Err(DecodeError::Malformed(
                            "a stored event must be a map".into(),
                        ));
                    }
                };
                // Writing to a Vec cannot fail, so the results carry no information.
                let _ = rmp::encode::write_map_len(&mut buf, len + 1);
                let _ = rmp::encode::write_str(&mut buf, "type");
                let _ = rmp::encode::write_str(&mut buf, "event");
                buf.extend_from_slice(&stored[header..]);
            }
            Codec::Json => {
                let rest = stored
                    .strip_prefix(b"{")
                    .filter(|rest| rest.first().is_some_and(|&b| b != b'}'))
                    .ok_or_else(|| DecodeError::Malformed("a stored event must be a map".into()))?;
                buf.extend_from_slice(b"{\"type\":\"event\",");
                buf.extend_from_slice(rest);
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Encodes an `events` frame from [`Event`](crate::Event)s already encoded with this codec,
    /// without decoding them: replay sends the bytes the log stored.
    pub fn encode_event_batch(self, branch: &Name, epoch: Epoch, events: &[Bytes]) -> Bytes {
        let payload: usize = events.iter().map(Bytes::len).sum();
        let mut buf = Vec::with_capacity(payload + events.len() + 96);
        let epoch = epoch.to_string();
        match self {
            Codec::MsgPack => {
                // Writing to a Vec cannot fail, so the results carry no information.
                let _ = rmp::encode::write_map_len(&mut buf, 4);
                for (key, value) in [
                    ("type", "events"),
                    ("branch", branch.as_str()),
                    ("epoch", epoch.as_str()),
                ] {
                    let _ = rmp::encode::write_str(&mut buf, key);
                    let _ = rmp::encode::write_str(&mut buf, value);
                }
                let _ = rmp::encode::write_str(&mut buf, "events");
                let len = u32::try_from(events.len()).unwrap_or(u32::MAX);
                let _ = rmp::encode::write_array_len(&mut buf, len);
                for e in events {
                    buf.extend_from_slice(e);
                }
            }
            Codec::Json => {
                buf.extend_from_slice(b"{\"type\":\"events\",\"branch\":\"");
                // Names are ASCII letters, digits, '_', '-' and '.': nothing to escape.
                buf.extend_from_slice(branch.as_str().as_bytes());
                buf.extend_from_slice(b"\",\"epoch\":\"");
                buf.extend_from_slice(epoch.as_bytes());
                buf.extend_from_slice(b"\",\"events\":[");
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        buf.push(b',');
                    }
                    buf.extend_from_slice(e);
                }
                buf.extend_from_slice(b"]}");
            }
        }
        Bytes::from(buf)
    }

    /// Re-encodes a value encoded by `from` into this codec, through the shared data model.
    pub fn transcode(self, from: Codec, bytes: &[u8]) -> Result<Bytes, DecodeError> {
        if from == self {
            return Ok(Bytes::copy_from_slice(bytes));
        }
        let value: serde_json::Value = from.decode(bytes)?;
        self.encode(&value)
            .map_err(|e| DecodeError::InvalidField(e.0))
    }

    /// Looks again at bytes that failed to decode as a frame, to report an unknown `type` or
    /// `kind` by name rather than as a generic field error.
    fn classify(self, bytes: &[u8], known_types: &[&str], err: DecodeError) -> DecodeError {
        if !matches!(err, DecodeError::InvalidField(_)) {
            return err;
        }
        match self.decode::<serde_json::Value>(bytes) {
            Ok(value) => classify_value(&value, Some(known_types)).unwrap_or(err),
            Err(_) => err,
        }
    }
}

/// The fields that name a frame, read from one that did not decode
/// ([`Codec::frame_header`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame's `type`.
    pub frame_type: Option<String>,
    /// A publish's `event_id`.
    pub event_id: Option<Uuid>,
    /// A publish's `branch`.
    pub branch: Option<Name>,
}

/// Decodes one event of an HTTP batch push from its generic value, so that one malformed
/// event is reported on its own while the others are processed.
pub fn publish_from_value(value: serde_json::Value) -> Result<Publish, DecodeError> {
    let probe = classify_value(&value, None);
    serde_json::from_value(value).map_err(|e| probe.unwrap_or_else(|| from_json(&e)))
}

fn classify_value(value: &serde_json::Value, known_types: Option<&[&str]>) -> Option<DecodeError> {
    let map = match value {
        serde_json::Value::Object(map) => map,
        _ => return Some(DecodeError::InvalidField("a frame must be a map".into())),
    };
    if let Some(known) = known_types {
        match map.get("type") {
            None => return Some(DecodeError::InvalidField("missing field `type`".into())),
            Some(serde_json::Value::String(t)) if !known.contains(&t.as_str()) => {
                return Some(DecodeError::UnknownFrameType(t.clone()));
            }
            Some(serde_json::Value::String(_)) => {}
            Some(_) => return Some(DecodeError::InvalidField("`type` must be a string".into())),
        }
    }
    match map.get("kind") {
        Some(serde_json::Value::String(k)) if EventKind::from_wire(k).is_none() => {
            Some(DecodeError::UnknownKind(k.clone()))
        }
        _ => None,
    }
}

fn from_rmp(e: rmp_serde::decode::Error) -> DecodeError {
    use rmp_serde::decode::Error as E;
    match e {
        E::InvalidMarkerRead(io) | E::InvalidDataRead(io)
            if io.kind() == ErrorKind::UnexpectedEof =>
        {
            DecodeError::Truncated
        }
        E::InvalidMarkerRead(io) | E::InvalidDataRead(io) => DecodeError::Malformed(io.to_string()),
        E::Utf8Error(u) => DecodeError::Malformed(format!("invalid UTF-8: {u}")),
        E::DepthLimitExceeded => DecodeError::Malformed("nesting too deep".into()),
        E::TypeMismatch(marker) => DecodeError::InvalidField(format!("unexpected {marker:?}")),
        E::OutOfRange => DecodeError::InvalidField("number out of range".into()),
        E::LengthMismatch(n) => DecodeError::InvalidField(format!("unexpected length {n}")),
        E::Uncategorized(msg) | E::Syntax(msg) => DecodeError::InvalidField(msg),
    }
}

fn from_json(e: &serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => DecodeError::Truncated,
        Category::Io | Category::Syntax => DecodeError::Malformed(e.to_string()),
        Category::Data => DecodeError::InvalidField(e.to_string()),
    }
}

/// Refuses input longer than `limit` bytes.
pub fn check_size(len: usize, limit: usize) -> Result<(), DecodeError> {
    if len > limit {
        Err(DecodeError::TooLarge { size: len, limit })
    } else {
        Ok(())
    }
}
