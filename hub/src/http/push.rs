//! Batch pushes (`POST …/events`): a push body is split into its events still undecoded, so
//! that one bad event is refused on its own and the rest go on; each is sequenced like a
//! WebSocket publish and answered in order. A device's pushes share one budget with the rate
//! its WebSocket sessions get.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use branchline_protocol::http::{PushResponse, PushResult};
use branchline_protocol::{
    Codec, DecodeError, ErrorCode, Name, Publish, Rejected, UnixMillis, codec, msgpack,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use rmp::decode::{read_array_len, read_map_len};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use uuid::Uuid;

use super::{ApiError, authorize, clock_offset, encoded, open, read_body, request_codec};
use crate::config::Limits;
use crate::engine::Origin;
use crate::hub::Hub;

/// Each device's publish budget over HTTP: per (tenant, device) of the token, the rate and
/// burst a WebSocket session gets (`limits.publish_rate`, `limits.publish_burst`), so a till
/// that pushes cannot out-publish one on a socket. A batch takes one unit per event.
pub(super) struct PushBudget {
    limiter: RateLimiter<(Name, Name), DefaultKeyedStateStore<(Name, Name)>, DefaultClock>,
    burst: NonZeroU32,
    /// Devices tracked when idle ones are next forgotten: doubling it each time keeps the
    /// forgetting amortised O(1) per push while the map stays within twice the active devices.
    prune_at: AtomicUsize,
}

/// Devices tracked before the push budget first forgets idle ones.
const PUSH_BUDGET_PRUNE_MIN: usize = 1_024;

impl PushBudget {
    pub(super) fn new(limits: &Limits) -> Self {
        let per_second = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let burst = per_second(limits.publish_burst);
        Self {
            limiter: RateLimiter::keyed(
                Quota::per_second(per_second(limits.publish_rate)).allow_burst(burst),
            ),
            burst,
            prune_at: AtomicUsize::new(PUSH_BUDGET_PRUNE_MIN),
        }
    }

    /// Takes `events` units from `device`'s budget, or says how long until they are there.
    fn take(&self, tenant: &Name, device: &Name, events: usize) -> Result<(), Duration> {
        // A batch larger than the burst (only if an operator set the burst below the batch
        // limit) needs a full budget rather than being refused forever.
        let units = u32::try_from(events)
            .unwrap_or(u32::MAX)
            .min(self.burst.get());
        let Some(units) = NonZeroU32::new(units) else {
            return Ok(());
        };
        let outcome = self
            .limiter
            .check_key_n(&(tenant.clone(), device.clone()), units);
        self.prune();
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.limiter.clock().now())),
            // `units` is at most the burst, so the budget can always hold it; were it not,
            // refusing leaves the budget as it was.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    fn prune(&self) {
        if self.limiter.len() < self.prune_at.load(Ordering::Relaxed) {
            return;
        }
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let next = (self.limiter.len() * 2).max(PUSH_BUDGET_PRUNE_MIN);
        self.prune_at.store(next, Ordering::Relaxed);
    }
}

/// A push body with each event still undecoded, so that one bad event is refused on its own.
pub(super) struct PushBatch<'a> {
    client_time_ms: UnixMillis,
    /// At most the batch limit of them.
    events: Vec<RawEvent<'a>>,
    /// How many the body holds.
    count: usize,
}

/// One event of a push body, as sent.
enum RawEvent<'a> {
    Json(serde_json::Value),
    /// The event's MessagePack value, exactly as it is in the body: decoding it on its own
    /// keeps a value outside the data model (binary, extension types) to that event.
    MsgPack(&'a [u8]),
}

impl RawEvent<'_> {
    /// The event, or why it does not decode, with its id when that much is readable.
    fn decode(self) -> (Option<Uuid>, Result<Publish, DecodeError>) {
        match self {
            RawEvent::Json(value) => {
                let id = value
                    .get("event_id")
                    .and_then(|v| v.as_str())
                    .and_then(|s| Uuid::parse_str(s).ok());
                (id, codec::publish_from_value(value))
            }
            RawEvent::MsgPack(bytes) => match Codec::MsgPack.decode::<Publish>(bytes) {
                Ok(publish) => (Some(publish.event_id), Ok(publish)),
                Err(err) => {
                    let id = Codec::MsgPack.frame_header(bytes).event_id;
                    // Within the data model, the generic form tells an unknown `kind` apart
                    // from other field errors.
                    let err = match Codec::MsgPack.decode::<serde_json::Value>(bytes) {
                        Ok(value) => codec::publish_from_value(value).err().unwrap_or(err),
                        Err(_) => err,
                    };
                    (id, Err(err))
                }
            },
        }
    }
}

impl<'a> PushBatch<'a> {
    /// The body's clock reading and events; only the first `max` events are kept.
    fn decode(codec: Codec, bytes: &'a [u8], max: usize) -> Result<Self, DecodeError> {
        let (time, events, count) = match codec {
            Codec::Json => json_push(bytes, max)?,
            Codec::MsgPack => msgpack_push(bytes, max)?,
        };
        let missing = |field: &str| DecodeError::InvalidField(format!("missing field `{field}`"));
        Ok(Self {
            client_time_ms: time.ok_or_else(|| missing("client_time_ms"))?,
            events: events.ok_or_else(|| missing("events"))?,
            count,
        })
    }
}

/// A push body's clock reading, its first events, and how many events it has.
type PushParts<'a> = (Option<UnixMillis>, Option<Vec<RawEvent<'a>>>, usize);

/// Decodes a JSON push body, each event as a generic value.
fn json_push(bytes: &[u8], max: usize) -> Result<PushParts<'static>, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parts = PushVisitor { max }
        .deserialize(&mut de)
        .and_then(|parts| de.end().map(|()| parts))
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Eof => DecodeError::Truncated,
            serde_json::error::Category::Io | serde_json::error::Category::Syntax => {
                DecodeError::Malformed(e.to_string())
            }
            serde_json::error::Category::Data => DecodeError::InvalidField(e.to_string()),
        })?;
    Ok(parts)
}

/// The top of a JSON push body.
struct PushVisitor {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for PushVisitor {
    type Value = PushParts<'static>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PushVisitor {
    type Value = PushParts<'static>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a push request map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut time, mut events, mut count) = (None, None, 0);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "client_time_ms" if time.is_none() => time = Some(map.next_value()?),
                "events" if events.is_none() => {
                    let (kept, n) = map.next_value_seed(JsonEvents { max: self.max })?;
                    events = Some(kept);
                    count = n;
                }
                "client_time_ms" | "events" => {
                    return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((time, events, count))
    }
}

/// The events of a JSON push: the first `max` as generic values, the rest only counted.
struct JsonEvents {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for JsonEvents {
    type Value = (Vec<RawEvent<'static>>, usize);

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for JsonEvents {
    type Value = (Vec<RawEvent<'static>>, usize);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut kept = Vec::new();
        let mut count = 0;
        while count < self.max {
            match seq.next_element()? {
                Some(value) => kept.push(RawEvent::Json(value)),
                None => return Ok((kept, count)),
            }
            count += 1;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok((kept, count))
    }
}

/// Splits a MessagePack push body into its clock reading and the bytes of each of its first
/// `max` events (the rest are counted and skipped). Bytes that are not one MessagePack value
/// are `malformed`; a value that is not a push request is `invalid_field`. A value outside the
/// data model inside an event is left for that event's own decoding to refuse.
fn msgpack_push(bytes: &[u8], max: usize) -> Result<PushParts<'_>, DecodeError> {
    let mut whole = bytes;
    msgpack::split_value(&mut whole)?;
    if !whole.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the value",
            whole.len()
        )));
    }
    let mut rest = bytes;
    let (mut time, mut events, mut count) = (None, None, 0);
    let not_a_push = |what: &str| DecodeError::InvalidField(format!("a push request {what}"));
    let entries = read_map_len(&mut rest).map_err(|_| not_a_push("must be a map"))?;
    for _ in 0..entries {
        let key: String = msgpack_value(&mut rest)?;
        match key.as_str() {
            "client_time_ms" if time.is_none() => time = Some(msgpack_value(&mut rest)?),
            "events" if events.is_none() => {
                count = read_array_len(&mut rest)
                    .map_err(|_| not_a_push("has an array of `events`"))?
                    as usize;
                let mut kept = Vec::with_capacity(count.min(max));
                for i in 0..count {
                    let (event, _) = msgpack::split_value(&mut rest)?;
                    if i < max {
                        kept.push(RawEvent::MsgPack(event));
                    }
                }
                events = Some(kept);
            }
            "client_time_ms" | "events" => {
                return Err(DecodeError::InvalidField(format!(
                    "duplicate field `{key}`"
                )));
            }
            _ => {
                msgpack::split_value(&mut rest)?;
            }
        }
    }
    Ok((time, events, count))
}

/// Decodes the MessagePack value at the start of `rest` and moves past it.
fn msgpack_value<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Result<T, DecodeError> {
    let (value, _) = msgpack::split_value(rest)?;
    Codec::MsgPack.decode(value)
}

pub(super) async fn push(
    State(hub): State<Arc<Hub>>,
    State(budget): State<Arc<PushBudget>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let codec_in = request_codec(&headers)?;
    let limits = &hub.config().limits;
    let bytes = read_body(body, limits.max_body_bytes, &headers).await?;
    let batch = PushBatch::decode(codec_in, &bytes, limits.max_batch_events)
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    if batch.count > limits.max_batch_events {
        return Err(ApiError::new(
            ErrorCode::MessageTooBig,
            format!(
                "a batch has at most {} events, this one {}",
                limits.max_batch_events, batch.count
            ),
            &headers,
        ));
    }
    let offset_ms = clock_offset(batch.client_time_ms, &headers)?;
    budget
        .take(&claims.tenant, &claims.device, batch.count)
        .map_err(|wait| {
            ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many publishes from {}; none of this batch was processed, retry after \
                     the Retry-After seconds",
                    claims.device
                ),
                &headers,
            )
            .retry_after(wait)
        })?;
    let branch = open(&hub, &key, &headers).await?;
    let origin = Origin {
        device: claims.device.clone(),
        offset_ms,
    };
    let mut answers: Vec<BoxFuture<'static, PushResult>> = Vec::with_capacity(batch.count);
    for raw in batch.events {
        let (event_id, decoded) = raw.decode();
        let rejected = |code: ErrorCode, message: String| {
            let mut rejected = Rejected::bare(code, message);
            rejected.event_id = event_id;
            rejected.branch = Some(key.branch.clone());
            futures::future::ready(PushResult::Rejected(rejected)).boxed()
        };
        match decoded {
            Err(e) => answers.push(rejected(e.code(), e.to_string())),
            Ok(p) if p.branch != key.branch => answers.push(rejected(
                ErrorCode::InvalidField,
                format!(
                    "event for branch {} pushed to branch {}",
                    p.branch, key.branch
                ),
            )),
            // What a WebSocket would refuse as a frame is refused here too: both transports
            // take the same events.
            Ok(p) if publish_bytes(&p) > limits.max_frame_bytes => answers.push(rejected(
                ErrorCode::MessageTooBig,
                format!(
                    "the event is over {} bytes (the hub's frame limit)",
                    limits.max_frame_bytes
                ),
            )),
            // Queued one by one, in the batch's order.
            Ok(p) => answers.push(branch.publish(p, origin.clone()).await),
        }
    }
    let results = futures::future::join_all(answers).await;
    for result in &results {
        hub.metrics().publish_answered(result);
    }
    encoded(
        &PushResponse {
            branch: key.branch.clone(),
            epoch: branch.epoch(),
            results,
        },
        &headers,
    )
}

/// Bytes of `publish` as a MessagePack `publish` frame (as a WebSocket would carry it).
fn publish_bytes(publish: &Publish) -> usize {
    // The frame's `"type": "publish"` entry: two short strings of 4 and 7 bytes.
    const TYPE_ENTRY: usize = 1 + 4 + 1 + 7;
    Codec::MsgPack
        .encode(publish)
        .map_or(usize::MAX, |b| b.len() + TYPE_ENTRY)
}

#[cfg(test)]
mod tests {
    // In tests a panic is the failure report.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use branchline_protocol::http::PushRequest;
    use branchline_protocol::{Custom, EventBody};

    fn note(n: u64) -> Publish {
        Publish {
            branch: Name::new("b1").unwrap(),
            event_id: Uuid::now_v7(),
            device_seq: n,
            client_time_ms: 1_795_000_000_000,
            base_seq: None,
            base_version: None,
            body: EventBody::Custom(Custom {
                custom_type: "note".into(),
                data: serde_json::json!({ "n": n }),
            }),
        }
    }

    fn msgpack_body(events: &[Publish]) -> Vec<u8> {
        let request = PushRequest {
            client_time_ms: 1_795_000_000_000,
            events: events.to_vec(),
        };
        Codec::MsgPack.encode(&request).unwrap().to_vec()
    }

    #[test]
    fn a_msgpack_push_splits_into_the_bytes_of_each_event() {
        let events = [note(1), note(2), note(3)];
        let body = msgpack_body(&events);
        let batch = PushBatch::decode(Codec::MsgPack, &body, 10).unwrap();
        assert_eq!((batch.client_time_ms, batch.count), (1_795_000_000_000, 3));
        let decoded: Vec<Publish> = batch
            .events
            .into_iter()
            .map(|e| e.decode().1.unwrap())
            .collect();
        assert_eq!(decoded, events);

        let kept = PushBatch::decode(Codec::MsgPack, &body, 2).unwrap();
        assert_eq!(
            (kept.events.len(), kept.count),
            (2, 3),
            "events past the limit are counted, not kept"
        );
        let json = Codec::Json
            .encode(&PushRequest {
                client_time_ms: 7,
                events: events.to_vec(),
            })
            .unwrap();
        let kept = PushBatch::decode(Codec::Json, &json, 2).unwrap();
        assert_eq!(
            (kept.client_time_ms, kept.events.len(), kept.count),
            (7, 2, 3)
        );

        let code = |bytes: &[u8]| {
            PushBatch::decode(Codec::MsgPack, bytes, 10)
                .err()
                .map(|e| e.code())
        };
        assert_eq!(code(&body[..body.len() - 1]), Some(ErrorCode::Malformed));
        let mut trailing = body.clone();
        trailing.push(0xc0);
        assert_eq!(code(&trailing), Some(ErrorCode::Malformed));
        assert_eq!(code(&[0x93, 1, 2, 3]), Some(ErrorCode::InvalidField));
        assert_eq!(code(&[0x80]), Some(ErrorCode::InvalidField), "no fields");
    }

    #[test]
    fn the_push_budget_is_per_device_and_counts_events() {
        let limits = Limits {
            publish_rate: 1,
            publish_burst: 5,
            ..Limits::default()
        };
        let budget = PushBudget::new(&limits);
        let (t, a, b) = (
            Name::new("t").unwrap(),
            Name::new("a").unwrap(),
            Name::new("b").unwrap(),
        );
        assert!(budget.take(&t, &a, 5).is_ok());
        let wait = budget.take(&t, &a, 3).unwrap_err();
        assert!(
            wait > Duration::from_secs(1),
            "three units take ~3 s: {wait:?}"
        );
        assert!(budget.take(&t, &b, 1).is_ok(), "another device has its own");
        assert!(
            budget.take(&t, &a, 0).is_ok(),
            "an empty batch takes nothing"
        );
        assert!(
            budget.take(&t, &b, 50).is_err(),
            "a batch over the burst needs a full budget"
        );
    }
}
