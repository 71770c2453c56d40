//! The HTTP sync API under `/v1`, the WebSocket upgrade, and the operations endpoints
//! (PROTOCOL.md §11 and §15).
//!
//! Responses are JSON unless the request accepts `application/msgpack`; errors are problem
//! bodies with the protocol's stable codes. Every handler reaches its branch through the same
//! [`Branch`] methods as the WebSocket sessions.
//!
//! - `events`: pages of events after a position, with long polls.
//! - `push`: batch pushes, each event answered on its own.
//! - [`snapshot`]: paged snapshots pinned to one seq.
//! - `admin`: a branch's status, devices and conflicts, and resolving one.
//! - `ops`: the hub's clock, readiness and metrics.

mod admin;
mod events;
mod ops;
mod push;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, FromRef, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use branchline_protocol::http::Problem;
use branchline_protocol::{
    BranchKey, Codec, ErrorCode, Name, ResyncReason, ResyncRequired, UnixMillis, now_ms, routes,
};

use self::push::PushBudget;
use crate::auth::{Access, Claims};
use crate::branch::Branch;
use crate::conn::ConnGuard;
use crate::hub::Hub;

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
pub(super) const MAX_CLIENT_TIME_MS: UnixMillis = 253_402_300_799_999;

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
    let push_budget = Arc::new(PushBudget::new(&hub.config().limits));
    Router::new()
        .route(routes::WS, get(ws_upgrade))
        .route(routes::TIME, get(ops::time))
        .route(routes::BRANCH, get(admin::status))
        .route(routes::EVENTS, get(events::events).post(push::push))
        .route(routes::SNAPSHOT, get(snapshot::snapshot))
        .route(routes::DEVICES, get(admin::devices))
        .route(routes::CONFLICTS, get(admin::conflicts))
        .route(routes::RESOLVE, post(admin::resolve))
        .route(routes::HEALTHZ, get(|| async { "ok" }))
        .route(routes::READYZ, get(ops::readyz))
        .route(routes::METRICS, get(ops::metrics))
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

/// The codec a response should use.
pub(super) fn response_codec(headers: &HeaderMap) -> Codec {
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

pub(super) fn resync_message(r: &ResyncRequired, after: u64) -> String {
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
pub(super) fn encoded<T: serde::Serialize>(
    value: &T,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let codec = response_codec(headers);
    let body = codec
        .encode(value)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string(), headers))?;
    Ok(([(header::CONTENT_TYPE, codec.content_type())], body).into_response())
}

/// The caller's claims, checked against the path's tenant and branch.
pub(super) fn authorize(
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
        .keys()
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

/// The branch a request is about, opened on first use.
pub(super) async fn open(
    hub: &Hub,
    key: &BranchKey,
    headers: &HeaderMap,
) -> Result<Arc<Branch>, ApiError> {
    hub.branch(key)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string(), headers))
}

pub(super) fn query<T>(
    q: Result<Query<T>, QueryRejection>,
    headers: &HeaderMap,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text(), headers))
}

/// The codec of a request body: JSON when no `Content-Type` is given; any type other than
/// JSON or MessagePack is refused rather than guessed.
pub(super) fn request_codec(headers: &HeaderMap) -> Result<Codec, ApiError> {
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
pub(super) async fn read_body(
    body: Body,
    limit: usize,
    headers: &HeaderMap,
) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            ErrorCode::MessageTooBig,
            format!("the body is over {limit} bytes"),
            headers,
        )
    })
}

/// The device's clock offset from a clock reading it sent: refused when the reading is not a
/// plausible Unix time, so the arithmetic on it can never overflow.
pub(super) fn clock_offset(
    client_time_ms: UnixMillis,
    headers: &HeaderMap,
) -> Result<i64, ApiError> {
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
    let limits = &hub.config().limits;
    let tracker = hub.conns().clone();
    ws.protocols([codec.subprotocol()])
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| tracker.track_future(crate::ws::run(socket, codec, hub, guard)))
}

#[cfg(test)]
mod tests {
    // In tests a panic is the failure report.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use branchline_protocol::Epoch;

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
    fn clock_readings_outside_unix_millis_are_refused() {
        let headers = HeaderMap::new();
        for bad in [i64::MIN, -1, MAX_CLIENT_TIME_MS + 1, i64::MAX] {
            assert!(clock_offset(bad, &headers).is_err(), "{bad}");
        }
        assert!(clock_offset(0, &headers).is_ok_and(|o| o > 0));
        assert!(clock_offset(MAX_CLIENT_TIME_MS, &headers).is_ok_and(|o| o < 0));
    }
}
