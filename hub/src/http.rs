//! The HTTP sync API under `/v1`, the WebSocket upgrade, and the operations endpoints
//! (PROTOCOL.md §11 and §15).
//!
//! Responses are JSON unless the request accepts `application/msgpack`; errors are problem
//! bodies with the protocol's stable codes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use branchline_protocol::http::{
    BranchStatus, ConflictsPage, EventsPage, Problem, PushResponse, PushResult, ResolveRequest,
    SnapshotPage, TimeResponse,
};
use branchline_protocol::{
    Codec, ConflictStatus, Devices, Epoch, ErrorCode, Event, Name, Rejected, ResyncReason,
    ResyncRequired, codec, now_ms,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::Claims;
use crate::branch::{BranchHandle, writer_gone};
use crate::log::BranchKey;
use crate::server::{ConnGuard, Hub};
use crate::snapshot::{page_token, parse_page_token};

/// Bytes of WebSocket output gathered before writing to the socket (a flush always writes
/// everything); frames of one round go out in one write.
const WS_WRITE_BUFFER: usize = 64 * 1024;
/// Hard cap on one session's pending output. The buffer never holds more than
/// `WS_WRITE_BUFFER` plus one message (replay frames are at most 1 MiB), so reaching this
/// means a broken peer: the write fails and the session ends.
const WS_MAX_WRITE_BUFFER: usize = 64 << 20;
/// Small per-connection read buffer: ~9 KiB per idle connection instead of ~137 KiB.
const WS_READ_BUFFER: usize = 4 * 1024;

/// The API's routes.
pub fn router(hub: Arc<Hub>) -> Router {
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
        .with_state(hub)
}

/// What connections over the limit or rate get: 503 and a hint to retry.
pub fn overloaded() -> Router {
    Router::new().fallback(|headers: HeaderMap| async move {
        let mut response = ApiError::new(
            ErrorCode::Overloaded,
            "the hub is at its connection limit; retry shortly",
            &headers,
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    })
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
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>, headers: &HeaderMap) -> Self {
        Self {
            problem: Problem::new(code, message),
            codec: response_codec(headers),
        }
    }

    fn resync(resync: ResyncRequired, headers: &HeaderMap) -> Self {
        let mut err = Self::new(ErrorCode::ResyncRequired, resync_message(&resync), headers);
        err.problem.resync = Some(resync);
        err
    }
}

fn resync_message(r: &ResyncRequired) -> String {
    match r.reason {
        ResyncReason::EpochMismatch => {
            format!("the branch log is epoch {}; take a snapshot", r.epoch)
        }
        ResyncReason::BelowFloor => {
            format!("events up to {} were trimmed; take a snapshot", r.floor)
        }
        ResyncReason::AheadOfHead => {
            format!("the position is past the head {}; take a snapshot", r.head)
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
        match self.codec.encode(&self.problem) {
            Ok(body) => (status, [(header::CONTENT_TYPE, content_type)], body).into_response(),
            Err(_) => status.into_response(),
        }
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
    let resync = |reason, head| ResyncRequired {
        branch: key.branch.clone(),
        reason,
        epoch: shared.epoch,
        head,
        floor: shared.floor(),
    };
    match q.epoch {
        Some(epoch) if epoch != shared.epoch => {
            return Err(ApiError::resync(
                resync(ResyncReason::EpochMismatch, shared.committed()),
                &headers,
            ));
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
    let mut head = shared.committed();
    if q.after > head {
        return Err(ApiError::resync(
            resync(ResyncReason::AheadOfHead, head),
            &headers,
        ));
    }
    if q.after < shared.floor() {
        return Err(ApiError::resync(
            resync(ResyncReason::BelowFloor, head),
            &headers,
        ));
    }
    // A poll from `after` says the device has applied everything up to it.
    shared.ack(&claims.device, claims.role, q.after);
    if q.after == head && q.wait_ms > 0 {
        let wait = Duration::from_millis(q.wait_ms).min(limits.max_long_poll);
        let mut changes = shared.watch_head();
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
    if stored
        .iter()
        .enumerate()
        .any(|(i, e)| e.seq != q.after + 1 + i as u64)
    {
        return Err(ApiError::resync(
            resync(ResyncReason::BelowFloor, head),
            &headers,
        ));
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

#[derive(Deserialize)]
struct RawPush {
    client_time_ms: i64,
    events: Vec<serde_json::Value>,
}

async fn push(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let codec_in = Codec::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Malformed,
            "Content-Type must be application/json or application/msgpack",
            &headers,
        )
    })?;
    let limits = &hub.config.limits;
    let bytes = axum::body::to_bytes(body, limits.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::MessageTooBig,
                format!("the body is over {} bytes", limits.max_body_bytes),
                &headers,
            )
        })?;
    let raw: RawPush = codec_in
        .decode(&bytes)
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    if raw.events.len() > limits.max_batch_events {
        return Err(ApiError::new(
            ErrorCode::MessageTooBig,
            format!(
                "a batch has at most {} events, this one {}",
                limits.max_batch_events,
                raw.events.len()
            ),
            &headers,
        ));
    }
    let offset_ms = now_ms() - raw.client_time_ms;
    let handle = open(&hub, &key, &headers).await?;
    let mut answers: Vec<BoxFuture<'static, PushResult>> = Vec::with_capacity(raw.events.len());
    for value in raw.events {
        let event_id = value
            .get("event_id")
            .and_then(|v| v.as_str())
            .and_then(|s| Uuid::parse_str(s).ok());
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
        match codec::publish_from_value(value) {
            Err(e) => answers.push(rejected(e.code(), e.to_string())),
            Ok(p) if p.branch != key.branch => answers.push(rejected(
                ErrorCode::InvalidField,
                format!(
                    "event for branch {} pushed to branch {}",
                    p.branch, key.branch
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
    encoded(
        &PushResponse {
            branch: key.branch.clone(),
            epoch: handle.shared.epoch,
            results,
        },
        &headers,
    )
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
    let expired = || {
        ApiError::new(
            ErrorCode::SnapshotExpired,
            "the snapshot expired; start again without a page token",
            &headers,
        )
    };
    let (id, pinned, after) = match q.page_token {
        Some(token) => {
            let (id, after) = parse_page_token(&token).ok_or_else(expired)?;
            (
                id,
                hub.snapshots.get(id, &key).ok_or_else(expired)?,
                Some(after),
            )
        }
        None => {
            let handle = open(&hub, &key, &headers).await?;
            let (state, at_seq) = handle
                .snapshot()
                .await
                .map_err(|code| ApiError::new(code, code.as_str(), &headers))?;
            let (id, pinned) =
                hub.snapshots
                    .insert(key.clone(), handle.shared.epoch, at_seq, state);
            (id, pinned, None)
        }
    };
    let (items, more) = pinned.page(after.as_ref(), limit);
    let last = items.last().and_then(|i| {
        i.product
            .as_ref()
            .map(|p| p.sku.clone())
            .or_else(|| i.stock.as_ref().map(|s| s.sku.clone()))
    });
    let next_page_token = if more {
        last.map(|sku| page_token(id, &sku))
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
        expires_at_ms: pinned.touch(limits.snapshot_ttl),
    };
    encoded(&page, &headers)
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
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let codec_in = Codec::from_content_type(content_type).unwrap_or(Codec::Json);
    let bytes = axum::body::to_bytes(body, hub.config.limits.max_body_bytes)
        .await
        .map_err(|_| ApiError::new(ErrorCode::MessageTooBig, "the body is too large", &headers))?;
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
