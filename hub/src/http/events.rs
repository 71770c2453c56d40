//! Pages of events after a position (`GET …/events`), with long polls: the HTTP face of
//! delivery, for devices that cannot hold a socket.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use branchline_protocol::http::EventsPage;
use branchline_protocol::{Codec, Epoch, ErrorCode, Event, Position};
use serde::Deserialize;

use super::{ApiError, authorize, encoded, open, query};
use crate::branch::{Page, Resume};
use crate::hub::Hub;

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    epoch: Option<Epoch>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    #[serde(default)]
    wait_ms: u64,
}

pub(super) async fn events(
    State(hub): State<Arc<Hub>>,
    Path((tenant, branch)): Path<(String, String)>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (claims, key) = authorize(&hub, &headers, &tenant, &branch)?;
    let q = query(q, &headers)?;
    let branch = open(&hub, &key, &headers).await?;
    let limits = &hub.config().limits;
    let from = match q.epoch {
        Some(epoch) => Position::new(epoch, q.after),
        None if q.after > 0 => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "`epoch` is required with `after`",
                &headers,
            ));
        }
        None => Position::new(branch.epoch(), 0),
    };
    let limit = q.limit.unwrap_or(500).clamp(1, limits.max_events_page);
    // Subscribed before the head is read: a commit after the read wakes the wait below.
    let mut changes = branch.watch_head();
    let (mut head, resume) = branch.resume(Some(from));
    if let Resume::Resync(resync) = resume {
        return Err(ApiError::resync(resync, q.after, &headers));
    }
    // A poll from `after` says the device has applied everything up to it.
    branch.ack(&claims.device, claims.role, q.after);
    if q.after == head && q.wait_ms > 0 {
        let wait = Duration::from_millis(q.wait_ms).min(limits.max_long_poll);
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        while head <= q.after {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = &mut deadline => break,
                _ = hub.shutdown().cancelled() => break,
            }
            head = branch.head();
        }
    }
    let stored = match branch
        .read(q.after, head, limit)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string(), &headers))?
    {
        Page::Events(stored) => stored,
        Page::Resync(resync) => return Err(ApiError::resync(resync, q.after, &headers)),
    };
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
        epoch: branch.epoch(),
        head,
        floor: branch.floor(),
        events,
        next_after,
        has_more: next_after < head,
    };
    encoded(&page, &headers)
}
