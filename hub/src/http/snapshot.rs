//! `GET …/snapshot`: paged snapshots of branch state, each page from the pin its token names
//! (see `branch::snapshots`), the first one pinning the branch's state at its durable head.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use branchline_protocol::http::SnapshotPage;
use branchline_protocol::{BranchKey, ErrorCode, now_ms};
use serde::Deserialize;

use super::{ApiError, authorize, encoded, open, query};
use crate::branch::snapshots::{MAX_PINS_PER_BRANCH, Pinned, page_token, parse_page_token};
use crate::hub::Hub;

#[derive(Deserialize)]
pub(super) struct SnapshotQuery {
    page_token: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn snapshot(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    q: Result<Query<SnapshotQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (_, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let q = query(q, &headers)?;
    let limits = &hub.config().limits;
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
            let pinned = hub
                .snapshots()
                .get(&key, id, now_ms())
                .ok_or_else(expired)?;
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
    let ttl = hub.config().limits.snapshot_ttl;
    let branch = open(hub, key, headers).await?;
    let epoch = branch.epoch();
    let committed = branch.head();
    // Nothing is sequenced past the committed head on an idle branch: its snapshot is pinned
    // already, and asking the writer again would only pin the same state.
    if let Some(pinned) = hub.snapshots().reuse(key, epoch, committed, now_ms(), ttl) {
        return Ok(pinned);
    }
    let (state, at_seq) = branch
        .snapshot()
        .await
        .map_err(|code| ApiError::new(code, code.as_str(), headers))?;
    hub.snapshots()
        .pin(key, epoch, at_seq, state, now_ms(), ttl)
        .map_err(|busy| {
            ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "{} snapshots of this branch are being paged; retry after the Retry-After \
                     seconds",
                    MAX_PINS_PER_BRANCH
                ),
                headers,
            )
            .retry_after(busy.retry_after)
        })
}
