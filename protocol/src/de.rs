//! Decoding frames without buffering them.
//!
//! serde's derived decoding of an internally tagged enum (`{"type": "publish", ...}`) first
//! buffers the whole map in a generic form, because the tag could be anywhere; and a
//! flattened `kind`/`body` pair is buffered again. Every encoder of this protocol writes
//! `type` first and `kind` before `body`, so these impls take the fast path when they can —
//! read `type`, then decode the variant straight from the rest of the map; read `kind`, then
//! decode `body` straight into its type — and fall back to buffering only when the order is
//! different. Both paths accept exactly the same input (the round-trip and golden tests run
//! every frame through them).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::event::{
    ConflictResolved, Custom, EventBody, EventKind, ProductRemoved, ProductUpserted, SaleRecorded,
    StockAdjusted, StockCounted,
};
use crate::frame::{ClientFrame, Event, Publish, ServerFrame};
use crate::model::Effect;

/// An enum tagged by a `type` field.
trait Tagged: Sized {
    const NAME: &'static str;
    const VARIANTS: &'static [&'static str];
    /// Decodes the variant `ty` from the rest of a map.
    fn variant<'de, D: Deserializer<'de>>(ty: &str, rest: D) -> Result<Self, D::Error>;
}

struct TaggedVisitor<T>(PhantomData<T>);

impl<'de, T: Tagged> Visitor<'de> for TaggedVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} map with a `type` field", T::NAME)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Some(first) = map.next_key::<Cow<'de, str>>()? else {
            return Err(de::Error::missing_field("type"));
        };
        if first == "type" {
            let ty: Cow<'de, str> = map.next_value()?;
            return T::variant(&ty, MapAccessDeserializer::new(map));
        }
        // Slow path: buffer the map, find `type`, decode the variant from the buffer.
        let mut entries = serde_json::Map::new();
        entries.insert(first.into_owned(), map.next_value()?);
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value()?;
            entries.insert(key, value);
        }
        let ty = match entries.remove("type") {
            Some(serde_json::Value::String(ty)) => ty,
            Some(_) => return Err(de::Error::custom("`type` must be a string")),
            None => return Err(de::Error::missing_field("type")),
        };
        T::variant(&ty, serde_json::Value::Object(entries)).map_err(de::Error::custom)
    }
}

fn unknown<E: de::Error>(ty: &str, types: &'static [&'static str]) -> E {
    E::unknown_variant(ty, types)
}

impl Tagged for ClientFrame {
    const NAME: &'static str = "client frame";
    const VARIANTS: &'static [&'static str] = &ClientFrame::TYPES;

    fn variant<'de, D: Deserializer<'de>>(ty: &str, rest: D) -> Result<Self, D::Error> {
        Ok(match ty {
            "hello" => ClientFrame::Hello(Deserialize::deserialize(rest)?),
            "publish" => ClientFrame::Publish(Deserialize::deserialize(rest)?),
            "subscribe" => ClientFrame::Subscribe(Deserialize::deserialize(rest)?),
            "unsubscribe" => ClientFrame::Unsubscribe(Deserialize::deserialize(rest)?),
            "ack" => ClientFrame::Ack(Deserialize::deserialize(rest)?),
            "list_devices" => ClientFrame::ListDevices(Deserialize::deserialize(rest)?),
            "ping" => ClientFrame::Ping(Deserialize::deserialize(rest)?),
            other => return Err(unknown(other, Self::VARIANTS)),
        })
    }
}

impl Tagged for ServerFrame {
    const NAME: &'static str = "server frame";
    const VARIANTS: &'static [&'static str] = &ServerFrame::TYPES;

    fn variant<'de, D: Deserializer<'de>>(ty: &str, rest: D) -> Result<Self, D::Error> {
        Ok(match ty {
            "welcome" => ServerFrame::Welcome(Deserialize::deserialize(rest)?),
            "subscribed" => ServerFrame::Subscribed(Deserialize::deserialize(rest)?),
            "unsubscribed" => ServerFrame::Unsubscribed(Deserialize::deserialize(rest)?),
            "event" => ServerFrame::Event(Deserialize::deserialize(rest)?),
            "events" => ServerFrame::Events(Deserialize::deserialize(rest)?),
            "caught_up" => ServerFrame::CaughtUp(Deserialize::deserialize(rest)?),
            "accepted" => ServerFrame::Accepted(Deserialize::deserialize(rest)?),
            "rejected" => ServerFrame::Rejected(Deserialize::deserialize(rest)?),
            "resync_required" => ServerFrame::ResyncRequired(Deserialize::deserialize(rest)?),
            "presence" => ServerFrame::Presence(Deserialize::deserialize(rest)?),
            "devices" => ServerFrame::Devices(Deserialize::deserialize(rest)?),
            "error" => ServerFrame::Error(Deserialize::deserialize(rest)?),
            "pong" => ServerFrame::Pong(Deserialize::deserialize(rest)?),
            other => return Err(unknown(other, Self::VARIANTS)),
        })
    }
}

impl<'de> Deserialize<'de> for ClientFrame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TaggedVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for ServerFrame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TaggedVisitor(PhantomData))
    }
}

/// Decodes the body of an event of `kind`.
struct BodySeed(EventKind);

impl<'de> DeserializeSeed<'de> for BodySeed {
    type Value = EventBody;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<EventBody, D::Error> {
        Ok(match self.0 {
            EventKind::SaleRecorded => EventBody::SaleRecorded(SaleRecorded::deserialize(d)?),
            EventKind::StockAdjusted => EventBody::StockAdjusted(StockAdjusted::deserialize(d)?),
            EventKind::StockCounted => EventBody::StockCounted(StockCounted::deserialize(d)?),
            EventKind::ProductUpserted => {
                EventBody::ProductUpserted(ProductUpserted::deserialize(d)?)
            }
            EventKind::ProductRemoved => EventBody::ProductRemoved(ProductRemoved::deserialize(d)?),
            EventKind::Custom => EventBody::Custom(Custom::deserialize(d)?),
            EventKind::ConflictResolved => {
                EventBody::ConflictResolved(ConflictResolved::deserialize(d)?)
            }
        })
    }
}

/// The `kind` and `body` fields of a map, decoded straight when `kind` comes first.
#[derive(Default)]
struct KindBody {
    kind: Option<EventKind>,
    body: Option<EventBody>,
    early_body: Option<serde_json::Value>,
}

impl KindBody {
    /// Handles `key` if it is `kind` or `body`; returns whether it did.
    fn take<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "kind" => set(&mut self.kind, map.next_value()?, "kind")?,
            "body" => match self.kind {
                Some(kind) => set(&mut self.body, map.next_value_seed(BodySeed(kind))?, "body")?,
                None => set(&mut self.early_body, map.next_value()?, "body")?,
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish<E: de::Error>(self) -> Result<EventBody, E> {
        let kind = self.kind.ok_or_else(|| E::missing_field("kind"))?;
        match (self.body, self.early_body) {
            (Some(body), _) => Ok(body),
            (None, Some(value)) => BodySeed(kind).deserialize(value).map_err(E::custom),
            (None, None) => Err(E::missing_field("body")),
        }
    }
}

fn set<T, E: de::Error>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(value);
    Ok(())
}

fn required<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| E::missing_field(name))
}

struct PublishVisitor;

impl<'de> Visitor<'de> for PublishVisitor {
    type Value = Publish;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a publish map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Publish, A::Error> {
        let (mut branch, mut event_id, mut device_seq, mut client_time_ms) =
            (None, None, None, None);
        let (mut base_seq, mut base_version) = (None, None);
        let mut kind_body = KindBody::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if kind_body.take(&key, &mut map)? {
                continue;
            }
            match key.as_ref() {
                "branch" => set(&mut branch, map.next_value()?, "branch")?,
                "event_id" => set(&mut event_id, map.next_value()?, "event_id")?,
                "device_seq" => set(&mut device_seq, map.next_value()?, "device_seq")?,
                "client_time_ms" => set(&mut client_time_ms, map.next_value()?, "client_time_ms")?,
                "base_seq" => set(&mut base_seq, map.next_value::<Option<u64>>()?, "base_seq")?,
                "base_version" => set(
                    &mut base_version,
                    map.next_value::<Option<u64>>()?,
                    "base_version",
                )?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Publish {
            branch: required(branch, "branch")?,
            event_id: required(event_id, "event_id")?,
            device_seq: required(device_seq, "device_seq")?,
            client_time_ms: required(client_time_ms, "client_time_ms")?,
            base_seq: base_seq.flatten(),
            base_version: base_version.flatten(),
            body: kind_body.finish()?,
        })
    }
}

impl<'de> Deserialize<'de> for Publish {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PublishVisitor)
    }
}

struct EventVisitor;

impl<'de> Visitor<'de> for EventVisitor {
    type Value = Event;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
        let (mut branch, mut epoch, mut seq, mut event_id) = (None, None, None, None);
        let (mut device, mut device_seq, mut client_time_ms, mut server_time_ms) =
            (None, None, None, None);
        let (mut base_seq, mut base_version, mut effect) = (None, None, None);
        let mut kind_body = KindBody::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if kind_body.take(&key, &mut map)? {
                continue;
            }
            match key.as_ref() {
                "branch" => set(&mut branch, map.next_value()?, "branch")?,
                "epoch" => set(&mut epoch, map.next_value()?, "epoch")?,
                "seq" => set(&mut seq, map.next_value()?, "seq")?,
                "event_id" => set(&mut event_id, map.next_value()?, "event_id")?,
                "device" => set(&mut device, map.next_value()?, "device")?,
                "device_seq" => set(&mut device_seq, map.next_value()?, "device_seq")?,
                "client_time_ms" => set(&mut client_time_ms, map.next_value()?, "client_time_ms")?,
                "server_time_ms" => set(&mut server_time_ms, map.next_value()?, "server_time_ms")?,
                "base_seq" => set(&mut base_seq, map.next_value::<Option<u64>>()?, "base_seq")?,
                "base_version" => set(
                    &mut base_version,
                    map.next_value::<Option<u64>>()?,
                    "base_version",
                )?,
                "effect" => set(&mut effect, map.next_value::<Option<Effect>>()?, "effect")?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Event {
            branch: required(branch, "branch")?,
            epoch: required(epoch, "epoch")?,
            seq: required(seq, "seq")?,
            event_id: required(event_id, "event_id")?,
            device: required(device, "device")?,
            device_seq: required(device_seq, "device_seq")?,
            client_time_ms: required(client_time_ms, "client_time_ms")?,
            server_time_ms: required(server_time_ms, "server_time_ms")?,
            base_seq: base_seq.flatten(),
            base_version: base_version.flatten(),
            body: kind_body.finish()?,
            effect: effect.flatten().unwrap_or_default(),
        })
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor)
    }
}
