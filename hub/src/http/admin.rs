//! What admins ask of a branch: its status (everyone may), its devices and conflicts, and the
//! resolution of a held conflict.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use branchline_protocol::http::{ConflictsPage, ResolveRequest};
use branchline_protocol::{ConflictStatus, Devices, ErrorCode};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, authorize, encoded, open, query, read_body, request_codec};
use crate::auth::Access;
use crate::hub::Hub;

pub(super) async fn status(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let branch = open(&hub, &key, &headers).await?;
    encoded(&branch.status(), &headers)
}

pub(super) async fn devices(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    claims
        .require_admin()
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    let branch = open(&hub, &key, &headers).await?;
    encoded(
        &Devices {
            branch: key.branch.clone(),
            head: branch.head(),
            devices: branch.devices(),
        },
        &headers,
    )
}

#[derive(Deserialize)]
pub(super) struct ConflictsQuery {
    status: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn conflicts(
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
    let conflicts = open(&hub, &key, &headers)
        .await?
        .conflicts(status, limit)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    encoded(
        &ConflictsPage {
            branch: key.branch,
            conflicts,
        },
        &headers,
    )
}

pub(super) async fn resolve(
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
    let bytes = read_body(body, hub.config().limits.max_body_bytes, &headers).await?;
    let request: ResolveRequest = codec_in
        .decode(&bytes)
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?;
    let branch = open(&hub, &key, &headers).await?;
    match branch.resolve(id, request, claims.device.clone()).await {
        Ok(resolved) => encoded(&resolved, &headers),
        Err(rejected) => Err(ApiError::new(rejected.code, rejected.message, &headers)),
    }
}
