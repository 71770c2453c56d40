//! The hub's clock, and the operations endpoints: readiness and metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use branchline_protocol::http::TimeResponse;
use branchline_protocol::now_ms;

use super::{ApiError, encoded};
use crate::hub::Hub;

pub(super) async fn time(headers: HeaderMap) -> Result<Response, ApiError> {
    encoded(
        &TimeResponse {
            server_time_ms: now_ms(),
        },
        &headers,
    )
}

pub(super) async fn readyz(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match hub.ready() {
        Ok(()) => Ok(format!("ready; fsync {}\n", hub.config().fsync).into_response()),
        Err((code, message)) => Err(ApiError::new(code, message, &headers)),
    }
}

pub(super) async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics().render(),
    )
        .into_response()
}
