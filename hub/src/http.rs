//! The HTTP sync API under `/v1`, the WebSocket upgrade, and the operations endpoints
//! (PROTOCOL.md §11 and §15).
//!
//! Responses are JSON unless the request accepts `application/msgpack`; errors are problem
//! bodies with the protocol's stable codes.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, FromRef, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use branchline_protocol::http::{
    BranchStatus, ConflictsPage, EventsPage, Problem, PushResponse, PushResult, ResolveRequest,
    SnapshotPage, TimeResponse,
};
use branchline_protocol::{
    Codec, ConflictStatus, DecodeError, Devices, Epoch, ErrorCode, Event, Name, Publish, Rejected,
    ResyncReason, ResyncRequired, UnixMillis, codec, now_ms,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use uuid::Uuid;

use crate::auth::{Access, Claims};
use crate::branch::{BranchHandle, writer_gone};
use crate::config::Limits;
use crate::log::BranchKey;
use crate::server::{ConnGuard, Hub};
use crate::snapshot::{Pinned, page_token, parse_page_token};

/// Bytes of WebSocket output gathered before writing to the socket (a flush always writes
/// everything); frames of one round go out in one write.
const WS_WRITE_BUFFER: usize = 64 * 1024;
/// Hard cap on one session's pending output. The buffer never holds more than
/// `WS_WRITE_BUFFER` plus one message (replay frames are at most 1 MiB), so reaching this
/// means a broken peer: the write fails and the session ends.
const WS_MAX_WRITE_BUFFER: usize = 64 << 20;
/// Small per-connection read buffer: ~9 KiB per idle connection instead of ~137 KiB.
const WS_READ_BUFFER: usize = 4 * 1024;

/// The latest `client_time_ms` taken as a clock reading: 9999-12-31T23:59:59.999Z. Readings
/// outside `0..=MAX_CLIENT_TIME_MS` are refused, which keeps every clock offset far from
/// overflowing.
const MAX_CLIENT_TIME_MS: UnixMillis = 253_402_300_799_999;

/// What the handlers share.
#[derive(Clone)]
struct Api {
    hub: Arc<Hub>,
    push_budget: Arc<PushBudget>,
}

impl FromRef<Api> for Arc<Hub> {
    fn from_ref(api: &Api) -> Self {
        api.hub.clone()
    }
}

impl FromRef<Api> for Arc<PushBudget> {
    fn from_ref(api: &Api) -> Self {
        api.push_budget.clone()
    }
}

/// The API's routes.
pub fn router(hub: Arc<Hub>) -> Router {
    let push_budget = Arc::new(PushBudget::new(&hub.config.limits));
    Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .route("/v1/time", get(time))
        .route("/v1/branches/{tenant}/{branch}", get(status))
        .route(
            "/v1/branches/{tenant}/{branch}/events",
            get(events).post(push),
        )
        .route("/v1/branches/{tenant}/{branch}/snapshot", get(snapshot))
        .route("/v1/branches/{tenant}/{branch}/devices", get(devices))
        .route("/v1/branches/{tenant}/{branch}/conflicts", get(conflicts))
        .route(
            "/v1/branches/{tenant}/{branch}/conflicts/{id}/resolve",
            post(resolve),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|headers: HeaderMap| async move {
            ApiError::new(ErrorCode::NotFound, "no such route", &headers)
        })
        .with_state(Api { hub, push_budget })
}

/// What connections over the limit or rate get: 503 and a hint to retry.
pub fn overloaded() -> Router {
    Router::new().fallback(|headers: HeaderMap| async move {
        let mut response = ApiError::new(
            ErrorCode::Overloaded,
            "the hub is at its connection limit; retry shortly",
            &headers,
        )
        .retry_after(Duration::from_secs(1))
        .into_response();
        // The connection is not kept: its slot is what the hub is short of.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    })
}

/// Each device's publish budget over HTTP: per (tenant, device) of the token, the rate and
/// burst a WebSocket session gets (`limits.publish_rate`, `limits.publish_burst`), so a till
/// that pushes cannot out-publish one on a socket. A batch takes one unit per event.
struct PushBudget {
    limiter: RateLimiter<(Name, Name), DefaultKeyedStateStore<(Name, Name)>, DefaultClock>,
    burst: NonZeroU32,
    /// Devices tracked when idle ones are next forgotten: doubling it each time keeps the
    /// forgetting amortised O(1) per push while the map stays within twice the active devices.
    prune_at: AtomicUsize,
}

/// Devices tracked before the push budget first forgets idle ones.
const PUSH_BUDGET_PRUNE_MIN: usize = 1_024;

impl PushBudget {
    fn new(limits: &Limits) -> Self {
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

/// The codec a response should use.
fn response_codec(headers: &HeaderMap) -> Codec {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept
        .split(',')
        .any(|m| Codec::from_content_type(m) == Some(Codec::MsgPack))
    {
        Codec::MsgPack
    } else {
        Codec::Json
    }
}

/// An error answered as a problem body.
pub struct ApiError {
    problem: Problem,
    codec: Codec,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>, headers: &HeaderMap) -> Self {
        Self {
            problem: Problem::new(code, message),
            codec: response_codec(headers),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header (whole seconds, at least 1).
    fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// `resync_required` for a request from seq `after`.
    fn resync(resync: ResyncRequired, after: u64, headers: &HeaderMap) -> Self {
        let message = resync_message(&resync, after);
        let mut err = Self::new(ErrorCode::ResyncRequired, message, headers);
        err.problem.resync = Some(resync);
        err
    }
}

fn resync_message(r: &ResyncRequired, after: u64) -> String {
    match r.reason {
        ResyncReason::EpochMismatch => {
            format!("the branch log is epoch {}; take a snapshot", r.epoch)
        }
        ResyncReason::BelowFloor if after < r.floor => {
            format!(
                "position {after} is below the floor {}; take a snapshot",
                r.floor
            )
        }
        ResyncReason::BelowFloor => {
            format!("the events after {after} are no longer in the log; take a snapshot")
        }
        ResyncReason::AheadOfHead => {
            format!(
                "position {after} is past the head {}; take a snapshot",
                r.head
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let content_type = match self.codec {
            Codec::Json => "application/problem+json",
            Codec::MsgPack => "application/msgpack",
        };
        let mut response = match self.codec.encode(&self.problem) {
            Ok(body) => (status, [(header::CONTENT_TYPE, content_type)], body).into_response(),
            Err(_) => status.into_response(),
        };
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// A body in the response codec.
fn encoded<T: serde::Serialize>(value: &T, headers: &HeaderMap) -> Result<Response, ApiError> {
    let codec = response_codec(headers);
    let body = codec
        .encode(value)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string(), headers))?;
    Ok(([(header::CONTENT_TYPE, codec.content_type())], body).into_response())
}

/// The caller's claims, checked against the path's tenant and branch.
fn authorize(
    hub: &Hub,
    headers: &HeaderMap,
    tenant: &str,
    branch: &str,
) -> Result<(Claims, BranchKey), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send the token as `Authorization: Bearer <token>`",
                headers,
            )
        })?;
    let claims = hub
        .keys
        .verify(token.trim())
        .map_err(|e| ApiError::new(e.code(), e.to_string(), headers))?;
    let name = |s: &str| {
        Name::new(s).map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string(), headers))
    };
    let key = BranchKey::new(name(tenant)?, name(branch)?);
    claims
        .check_branch(&key.tenant, &key.branch)
        .map_err(|e| ApiError::new(e.code(), e.to_string(), headers))?;
    Ok((claims, key))
}

async fn open(
    hub: &Hub,
    key: &BranchKey,
    headers: &HeaderMap,
) -> Result<Arc<BranchHandle>, ApiError> {
    hub.branches
        .get(key)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string(), headers))
}

fn query<T>(q: Result<Query<T>, QueryRejection>, headers: &HeaderMap) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text(), headers))
}

async fn time(headers: HeaderMap) -> Result<Response, ApiError> {
    encoded(
        &TimeResponse {
            server_time_ms: now_ms(),
        },
        &headers,
    )
}

async fn readyz(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Result<Response, ApiError> {
    match hub.ready() {
        Ok(()) => Ok(format!("ready; fsync {}\n", hub.config.fsync).into_response()),
        Err((code, message)) => Err(ApiError::new(code, message, &headers)),
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
        .into_response()
}

async fn status(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let shared = open(&hub, &key, &headers).await?.shared.clone();
    let (devices_online, sessions) = shared.presence_counts();
    encoded(
        &BranchStatus {
            tenant: key.tenant.clone(),
            branch: key.branch.clone(),
            epoch: shared.epoch,
            head: shared.committed(),
            floor: shared.floor(),
            events_per_s: shared.events_per_s(),
            devices_online,
            sessions,
            oversold_skus: shared.oversold_skus(),
            open_conflicts: shared.open_conflicts(),
        },
        &headers,
    )
}

/// The codec of a request body: JSON when no `Content-Type` is given; any type other than
/// JSON or MessagePack is refused rather than guessed.
fn request_codec(headers: &HeaderMap) -> Result<Codec, ApiError> {
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Codec::Json);
    };
    content_type
        .to_str()
        .ok()
        .and_then(Codec::from_content_type)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Malformed,
                "Content-Type must be application/json or application/msgpack",
                headers,
            )
        })
}

/// A request body of at most `limit` bytes.
async fn read_body(body: Body, limit: usize, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            ErrorCode::MessageTooBig,
            format!("the body is over {limit} bytes"),
            headers,
        )
    })
}

#[derive(Deserialize)]
struct EventsQuery {
    epoch: Option<Epoch>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    #[serde(default)]
    wait_ms: u64,
}

async fn events(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let q = query(q, &headers)?;
    let shared = open(&hub, &key, &headers).await?.shared.clone();
    let limits = &hub.config.limits;
    let resync = |reason, head| {
        let resync = ResyncRequired {
            branch: key.branch.clone(),
            reason,
            epoch: shared.epoch,
            head,
            floor: shared.floor(),
        };
        ApiError::resync(resync, q.after, &headers)
    };
    match q.epoch {
        Some(epoch) if epoch != shared.epoch => {
            return Err(resync(ResyncReason::EpochMismatch, shared.committed()));
        }
        None if q.after > 0 => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "`epoch` is required with `after`",
                &headers,
            ));
        }
        _ => {}
    }
    let limit = q.limit.unwrap_or(500).clamp(1, limits.max_events_page);
    // Subscribed before the head is read: a commit after the read wakes the wait below.
    let mut changes = shared.watch_head();
    let mut head = shared.committed();
    if q.after > head {
        return Err(resync(ResyncReason::AheadOfHead, head));
    }
    if q.after < shared.floor() {
        return Err(resync(ResyncReason::BelowFloor, head));
    }
    // A poll from `after` says the device has applied everything up to it.
    shared.ack(&claims.device, claims.role, q.after);
    if q.after == head && q.wait_ms > 0 {
        let wait = Duration::from_millis(q.wait_ms).min(limits.max_long_poll);
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        while head <= q.after {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = &mut deadline => break,
                _ = hub.shutdown.cancelled() => break,
            }
            head = shared.committed();
        }
    }
    let stored = hub
        .log
        .read_events(&key, q.after, head, limit)
        .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, e.to_string(), &headers))?;
    let contiguous = stored
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == q.after + 1 + i as u64);
    if !contiguous || (stored.is_empty() && q.after < head) {
        // Events the head says exist are not in the log: retention trimmed them after the
        // floor was checked. An empty page here would send the client back to the same spot
        // forever.
        return Err(resync(ResyncReason::BelowFloor, head));
    }
    let events = stored
        .iter()
        .map(|e| Codec::MsgPack.decode::<Event>(&e.bytes))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("stored event unreadable: {e}"),
                &headers,
            )
        })?;
    let next_after = events.last().map_or(q.after, |e| e.seq);
    let page = EventsPage {
        branch: key.branch.clone(),
        epoch: shared.epoch,
        head,
        floor: shared.floor(),
        events,
        next_after,
        has_more: next_after < head,
    };
    encoded(&page, &headers)
}

/// A push body with each event still undecoded, so that one bad event is refused on its own.
struct PushBatch<'a> {
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

/// Enough of an event to name it in a rejection when the rest does not decode.
#[derive(Deserialize)]
struct EventIdOnly {
    #[serde(default)]
    event_id: Option<Uuid>,
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
                    let id = Codec::MsgPack
                        .decode::<EventIdOnly>(bytes)
                        .ok()
                        .and_then(|e| e.event_id);
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
/// `max` events (the rest are counted and skipped), checking the whole body's syntax.
fn msgpack_push(bytes: &[u8], max: usize) -> Result<PushParts<'_>, DecodeError> {
    let mut rest = bytes;
    let (mut time, mut events, mut count) = (None, None, 0);
    for _ in 0..msgpack_header(&mut rest, Header::Map)? {
        let key: String = msgpack_prefix(&mut rest)?;
        match key.as_str() {
            "client_time_ms" if time.is_none() => time = Some(msgpack_prefix(&mut rest)?),
            "events" if events.is_none() => {
                count = msgpack_header(&mut rest, Header::Array)?;
                let mut kept = Vec::with_capacity(count.min(max));
                for i in 0..count {
                    let start = rest;
                    msgpack_prefix::<IgnoredAny>(&mut rest)?;
                    if i < max {
                        kept.push(RawEvent::MsgPack(&start[..start.len() - rest.len()]));
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
                msgpack_prefix::<IgnoredAny>(&mut rest)?;
            }
        }
    }
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the value",
            rest.len()
        )));
    }
    Ok((time, events, count))
}

#[derive(Clone, Copy)]
enum Header {
    Map,
    Array,
}

/// Reads a MessagePack map or array header; returns its number of entries.
fn msgpack_header(rest: &mut &[u8], want: Header) -> Result<usize, DecodeError> {
    let (fix, b16, b32, what) = match want {
        Header::Map => (0x80, 0xde, 0xdf, "a map"),
        Header::Array => (0x90, 0xdc, 0xdd, "an array"),
    };
    let (&marker, tail) = rest.split_first().ok_or(DecodeError::Truncated)?;
    let width = match marker {
        m if m & 0xf0 == fix => {
            *rest = tail;
            return Ok(usize::from(m & 0x0f));
        }
        m if m == b16 => 2,
        m if m == b32 => 4,
        _ => return Err(DecodeError::InvalidField(format!("expected {what}"))),
    };
    let len = tail.get(..width).ok_or(DecodeError::Truncated)?;
    *rest = &tail[width..];
    Ok(len.iter().fold(0, |n, b| (n << 8) | usize::from(*b)))
}

/// Decodes the MessagePack value at the start of `rest` and moves past it.
fn msgpack_prefix<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Result<T, DecodeError> {
    let mut reader = *rest;
    let decoded = {
        let mut de = rmp_serde::Deserializer::new(&mut reader).with_human_readable();
        T::deserialize(&mut de)
    };
    match decoded {
        Ok(value) => {
            *rest = reader;
            Ok(value)
        }
        // Decoding is deterministic: the codec fails on the same bytes the same way, and
        // reports it with the protocol's error mapping.
        Err(e) => Err(Codec::MsgPack
            .decode::<T>(rest)
            .err()
            .unwrap_or_else(|| DecodeError::Malformed(e.to_string()))),
    }
}

/// The device's clock offset from a clock reading it sent: refused when the reading is not a
/// plausible Unix time, so the arithmetic on it can never overflow.
fn clock_offset(client_time_ms: UnixMillis, headers: &HeaderMap) -> Result<i64, ApiError> {
    if !(0..=MAX_CLIENT_TIME_MS).contains(&client_time_ms) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!(
                "client_time_ms {client_time_ms} is not a Unix time in milliseconds \
                 (0 to {MAX_CLIENT_TIME_MS})"
            ),
            headers,
        ));
    }
    Ok(now_ms().saturating_sub(client_time_ms))
}

async fn push(
    State(hub): State<Arc<Hub>>,
    State(budget): State<Arc<PushBudget>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let codec_in = request_codec(&headers)?;
    let limits = &hub.config.limits;
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
    let handle = open(&hub, &key, &headers).await?;
    let mut answers: Vec<BoxFuture<'static, PushResult>> = Vec::with_capacity(batch.count);
    for raw in batch.events {
        let (event_id, decoded) = raw.decode();
        let rejected = |code: ErrorCode, message: String| {
            futures::future::ready(PushResult::Rejected(Rejected {
                event_id,
                branch: Some(key.branch.clone()),
                code,
                message,
                expected_device_seq: None,
                conflict: None,
            }))
            .boxed()
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
            Ok(p) => {
                let rx = handle.submit(p, claims.device.clone(), offset_ms).await;
                let branch = key.branch.clone();
                answers.push(
                    rx.map(move |r| r.unwrap_or_else(|_| writer_gone(event_id, &branch)))
                        .boxed(),
                );
            }
        }
    }
    let results = futures::future::join_all(answers).await;
    for result in &results {
        hub.metrics.publish_answered(result);
    }
    encoded(
        &PushResponse {
            branch: key.branch.clone(),
            epoch: handle.shared.epoch,
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

#[derive(Deserialize)]
struct SnapshotQuery {
    page_token: Option<String>,
    limit: Option<usize>,
}

async fn snapshot(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    q: Result<Query<SnapshotQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (_, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let q = query(q, &headers)?;
    let limits = &hub.config.limits;
    let limit = q.limit.unwrap_or(1_000).clamp(1, limits.max_snapshot_page);
    let (pinned, after) = match q.page_token {
        Some(token) => {
            let expired = || {
                ApiError::new(
                    ErrorCode::SnapshotExpired,
                    "the snapshot expired; start again without a page token",
                    &headers,
                )
            };
            let (id, after) = parse_page_token(&token).ok_or_else(expired)?;
            let pinned = hub.snapshots.get(&key, id, now_ms()).ok_or_else(expired)?;
            (pinned, Some(after))
        }
        None => (pin(&hub, &key, &headers).await?, None),
    };
    let (items, more) = pinned.page(after.as_ref(), limit);
    let last = items.last().and_then(|i| {
        i.product
            .as_ref()
            .map(|p| p.sku.clone())
            .or_else(|| i.stock.as_ref().map(|s| s.sku.clone()))
    });
    let next_page_token = if more {
        last.map(|sku| page_token(pinned.id, &sku))
    } else {
        None
    };
    let page = SnapshotPage {
        branch: key.branch.clone(),
        epoch: pinned.epoch,
        at_seq: pinned.at_seq,
        total_items: pinned.total,
        items,
        next_page_token,
        expires_at_ms: pinned.touch(now_ms(), limits.snapshot_ttl),
    };
    encoded(&page, &headers)
}

/// The snapshot a first page comes from: one already pinned at the committed head, or a new
/// pin of the writer's state.
async fn pin(hub: &Hub, key: &BranchKey, headers: &HeaderMap) -> Result<Arc<Pinned>, ApiError> {
    let ttl = hub.config.limits.snapshot_ttl;
    let handle = open(hub, key, headers).await?;
    let epoch = handle.shared.epoch;
    let committed = handle.shared.committed();
    // Nothing is sequenced past the committed head on an idle branch: its snapshot is pinned
    // already, and asking the writer again would only pin the same state.
    if let Some(pinned) = hub.snapshots.reuse(key, epoch, committed, now_ms(), ttl) {
        return Ok(pinned);
    }
    let (state, at_seq) = handle
        .snapshot()
        .await
        .map_err(|code| ApiError::new(code, code.as_str(), headers))?;
    hub.snapshots
        .pin(key, epoch, at_seq, state, now_ms(), ttl)
        .map_err(|busy| {
            ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "{} snapshots of this branch are being paged; retry after the Retry-After \
                     seconds",
                    crate::snapshot::MAX_PINS_PER_BRANCH
                ),
                headers,
            )
            .retry_after(busy.retry_after)
        })
}

async fn devices(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    claims
        .require_admin()
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    let shared = open(&hub, &key, &headers).await?.shared.clone();
    encoded(
        &Devices {
            branch: key.branch.clone(),
            head: shared.committed(),
            devices: shared.devices(),
        },
        &headers,
    )
}

#[derive(Deserialize)]
struct ConflictsQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn conflicts(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    q: Result<Query<ConflictsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    claims
        .require_admin()
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    let q = query(q, &headers)?;
    let status = match q.status.as_deref().unwrap_or("open") {
        "open" => Some(ConflictStatus::Open),
        "resolved" => Some(ConflictStatus::Resolved),
        "all" => None,
        other => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("status must be open, resolved or all, not {other}"),
                &headers,
            ));
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let conflicts = hub
        .log
        .conflicts(&key, status, limit)
        .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, e.to_string(), &headers))?;
    encoded(
        &ConflictsPage {
            branch: key.branch,
            conflicts,
        },
        &headers,
    )
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    claims
        .require_admin()
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::new(ErrorCode::NotFound, format!("no conflict {id}"), &headers))?;
    let codec_in = request_codec(&headers)?;
    let bytes = read_body(body, hub.config.limits.max_body_bytes, &headers).await?;
    let request: ResolveRequest = codec_in
        .decode(&bytes)
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    let handle = open(&hub, &key, &headers).await?;
    match handle.resolve(id, request, claims.device.clone()).await {
        Ok(resolved) => encoded(&resolved, &headers),
        Err(rejected) => Err(ApiError::new(rejected.code, rejected.message, &headers)),
    }
}

async fn ws_upgrade(
    State(hub): State<Arc<Hub>>,
    Extension(guard): Extension<ConnGuard>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect();
    let codec = if offered.is_empty() {
        Codec::MsgPack
    } else if let Some(codec) = Codec::ALL
        .into_iter()
        .find(|c| offered.iter().any(|o| o == c.subprotocol()))
    {
        codec
    } else {
        let message = format!(
            "none of the offered subprotocols {offered:?} is spoken here; this hub speaks {} and {}",
            Codec::MsgPack.subprotocol(),
            Codec::Json.subprotocol()
        );
        return ApiError::new(ErrorCode::UnsupportedVersion, message, &headers).into_response();
    };
    let limits = &hub.config.limits;
    let tracker = hub.conns.clone();
    ws.protocols([codec.subprotocol()])
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(crate::session::run(socket, codec, hub, guard))
        })
}

#[cfg(test)]
mod tests {
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
    fn the_documented_resync_problem_is_what_the_hub_says() {
        // PROTOCOL.md §11, the problem example.
        let resync = ResyncRequired {
            branch: Name::new("berlin-01").unwrap(),
            reason: ResyncReason::BelowFloor,
            epoch: Epoch(0x5f3a_9c1e_07b2_44d1),
            head: 1187,
            floor: 1000,
        };
        assert_eq!(
            resync_message(&resync, 900),
            "position 900 is below the floor 1000; take a snapshot"
        );
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
    fn clock_readings_outside_unix_millis_are_refused() {
        let headers = HeaderMap::new();
        for bad in [i64::MIN, -1, MAX_CLIENT_TIME_MS + 1, i64::MAX] {
            assert!(clock_offset(bad, &headers).is_err(), "{bad}");
        }
        assert!(clock_offset(0, &headers).is_ok_and(|o| o > 0));
        assert!(clock_offset(MAX_CLIENT_TIME_MS, &headers).is_ok_and(|o| o < 0));
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
