//! The hub's HTTP sync API (PROTOCOL.md §11): events pages with long poll, batch push,
//! paged snapshots, server time, branch status and devices.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use branchline_protocol::http::{
    BranchStatus, EventsPage, Problem, PushRequest, PushResponse, SnapshotPage, TimeResponse,
};
use branchline_protocol::{
    Codec, Devices, ErrorCode, Name, Position, ProductRecord, Publish, ResyncRequired, StockLevel,
    UnixMillis, routes,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// What a poll for events found.
#[derive(Debug)]
pub(crate) enum Poll {
    /// A page of events (maybe empty after the long-poll wait).
    Page(EventsPage),
    /// The position cannot be served: snapshot, then resume.
    Resync(ResyncRequired),
}

/// A snapshot of a branch, assembled from its pages: complete once the last page is in.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Where every page is pinned (`None` before the first page).
    pub position: Option<Position>,
    pub products: Vec<ProductRecord>,
    pub stock: Vec<StockLevel>,
    /// The token of the next page; `None` before the first page and after the last.
    pub next_page: Option<String>,
    /// Items received so far.
    pub received: u64,
    /// Items in the whole snapshot (0 before the first page).
    pub total: u64,
}

impl Snapshot {
    /// Adds the next page. A page pinned elsewhere than those before it (the hub broke its
    /// pinning promise) starts the snapshot over rather than mix two states.
    pub fn add(&mut self, page: SnapshotPage) {
        let pos = Position::new(page.epoch, page.at_seq);
        if self.position.is_some_and(|p| p != pos) {
            tracing::warn!(branch = %page.branch, "snapshot pages disagree on at_seq; restarting");
            *self = Snapshot::default();
            return;
        }
        self.position = Some(pos);
        self.received += page.items.len() as u64;
        self.total = page.total_items;
        for item in page.items {
            self.products.extend(item.product);
            self.stock.extend(item.stock);
        }
        self.next_page = page.next_page_token;
    }

    /// Whether every page is in.
    pub fn is_complete(&self) -> bool {
        self.position.is_some() && self.next_page.is_none()
    }
}

/// An HTTP client for one hub, tenant and token. Cheap to clone.
#[derive(Clone)]
pub(crate) struct HttpApi {
    client: reqwest::Client,
    base: Arc<str>,
    tenant: Name,
    token: Arc<RwLock<String>>,
    codec: Codec,
    timeout: Duration,
}

impl HttpApi {
    pub fn new(
        base: &str,
        tenant: Name,
        token: Arc<RwLock<String>>,
        codec: Codec,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            base: base.into(),
            tenant,
            token,
            codec,
            timeout: connect_timeout,
        })
    }

    fn token(&self) -> String {
        self.token
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The URL of `route` (one of [`routes`]' branch routes) for `branch`.
    fn branch_url(&self, route: &str, branch: &Name) -> String {
        format!(
            "{}{}",
            self.base,
            routes::branch_path(route, &self.tenant, branch)
        )
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        extra_wait: Duration,
    ) -> Result<T> {
        let resp = req
            .header(reqwest::header::ACCEPT, self.codec.content_type())
            .timeout(self.timeout + extra_wait)
            .send()
            .await
            .map_err(|e| Error::Network(e.to_string()))?;
        let status = resp.status().as_u16();
        let codec = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(Codec::from_content_type)
            .unwrap_or(self.codec);
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::Network(e.to_string()))?;
        if (200..300).contains(&status) {
            return Ok(codec.decode(&body)?);
        }
        Err(problem_error(status, codec, &body))
    }

    fn encode_body<T: Serialize>(
        &self,
        req: reqwest::RequestBuilder,
        body: &T,
    ) -> Result<reqwest::RequestBuilder> {
        let bytes = self.codec.encode(body)?;
        Ok(req
            .header(reqwest::header::CONTENT_TYPE, self.codec.content_type())
            .body(bytes))
    }

    /// `GET /v1/time`, with the device clock before and after: `(sent, server, received)`.
    pub async fn time(&self) -> Result<(UnixMillis, UnixMillis, UnixMillis)> {
        let sent = branchline_protocol::now_ms();
        let t: TimeResponse = self
            .send(
                self.client.get(format!("{}{}", self.base, routes::TIME)),
                Duration::ZERO,
            )
            .await?;
        Ok((sent, t.server_time_ms, branchline_protocol::now_ms()))
    }

    /// `GET …/events`: events after `from`, waiting up to `wait` for the first.
    pub async fn events(
        &self,
        branch: &Name,
        from: Position,
        limit: usize,
        wait: Duration,
    ) -> Result<Poll> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let req = self
            .client
            .get(self.branch_url(routes::EVENTS, branch))
            .bearer_auth(self.token())
            .query(&[
                ("epoch", from.epoch.to_string()),
                ("after", from.seq.to_string()),
                ("limit", limit.to_string()),
                ("wait_ms", wait_ms.to_string()),
            ]);
        match self.send::<EventsPage>(req, wait).await {
            Ok(page) => Ok(Poll::Page(page)),
            Err(Error::Resync(r)) => Ok(Poll::Resync(*r)),
            Err(e) => Err(e),
        }
    }

    /// `POST …/events`: a batch push with one result per event.
    pub async fn push(
        &self,
        branch: &Name,
        client_time_ms: UnixMillis,
        events: Vec<Publish>,
    ) -> Result<PushResponse> {
        let body = PushRequest {
            client_time_ms,
            events,
        };
        let req = self
            .client
            .post(self.branch_url(routes::EVENTS, branch))
            .bearer_auth(self.token());
        let req = self.encode_body(req, &body)?;
        self.send(req, Duration::from_secs(10)).await
    }

    /// `GET …/snapshot`: one page.
    pub async fn snapshot_page(
        &self,
        branch: &Name,
        page_token: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(t) = page_token {
            query.push(("page_token", t.to_string()));
        }
        let req = self
            .client
            .get(self.branch_url(routes::SNAPSHOT, branch))
            .bearer_auth(self.token())
            .query(&query);
        self.send(req, Duration::from_secs(10)).await
    }

    /// `GET …/branches/{tenant}/{branch}`.
    pub async fn branch_status(&self, branch: &Name) -> Result<BranchStatus> {
        let req = self
            .client
            .get(self.branch_url(routes::BRANCH, branch))
            .bearer_auth(self.token());
        self.send(req, Duration::ZERO).await
    }

    /// `GET …/devices` (admins only).
    pub async fn devices(&self, branch: &Name) -> Result<Devices> {
        let req = self
            .client
            .get(self.branch_url(routes::DEVICES, branch))
            .bearer_auth(self.token());
        self.send(req, Duration::ZERO).await
    }
}

fn problem_error(status: u16, codec: Codec, body: &[u8]) -> Error {
    match codec.decode::<Problem>(body) {
        Ok(p) => match (p.code, p.resync) {
            (ErrorCode::ResyncRequired, Some(r)) => Error::Resync(Box::new(r)),
            (code, _) => Error::Hub {
                status,
                code,
                message: p.message,
            },
        },
        Err(_) => Error::Hub {
            status,
            code: code_for_status(status),
            message: String::from_utf8_lossy(body).chars().take(200).collect(),
        },
    }
}

/// The code to assume for an HTTP error without a problem body (a proxy's page, say).
fn code_for_status(status: u16) -> ErrorCode {
    match status {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        413 => ErrorCode::MessageTooBig,
        429 => ErrorCode::RateLimited,
        503 => ErrorCode::Overloaded,
        _ => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(at_seq: u64, skus: &[&str], next: Option<&str>) -> SnapshotPage {
        SnapshotPage {
            branch: Name::new("b1").unwrap(),
            epoch: branchline_protocol::Epoch(7),
            at_seq,
            total_items: 3,
            items: skus
                .iter()
                .map(|s| branchline_protocol::http::SnapshotItem {
                    product: None,
                    stock: Some(StockLevel::new(
                        branchline_protocol::Sku::new(*s).unwrap(),
                        1,
                    )),
                })
                .collect(),
            next_page_token: next.map(str::to_string),
            expires_at_ms: 0,
        }
    }

    #[test]
    fn a_snapshot_is_assembled_page_by_page_and_starts_over_if_the_pin_moves() {
        let mut snap = Snapshot::default();
        assert!(!snap.is_complete());
        snap.add(page(40, &["A", "B"], Some("t1")));
        assert_eq!((snap.received, snap.total), (2, 3));
        assert_eq!(snap.next_page.as_deref(), Some("t1"));
        assert!(!snap.is_complete());
        // A page pinned elsewhere: never mixed in.
        snap.add(page(41, &["C"], None));
        assert_eq!(snap.position, None);
        assert!(snap.stock.is_empty() && snap.next_page.is_none());
        snap.add(page(41, &["A", "B"], Some("t2")));
        snap.add(page(41, &["C"], None));
        assert!(snap.is_complete());
        assert_eq!(snap.stock.len(), 3);
        assert_eq!(snap.position.map(|p| p.seq), Some(41));
    }

    #[test]
    fn problems_become_typed_errors() {
        let body = br#"{"status":409,"code":"resync_required","message":"below","resync":{"branch":"b","reason":"below_floor","epoch":"00000000000000aa","head":10,"floor":5}}"#;
        match problem_error(409, Codec::Json, body) {
            Error::Resync(r) => assert_eq!((r.head, r.floor), (10, 5)),
            other => panic!("unexpected {other:?}"),
        }
        let body = br#"{"status":401,"code":"token_expired","message":"old"}"#;
        assert!(matches!(
            problem_error(401, Codec::Json, body),
            Error::Hub {
                code: ErrorCode::TokenExpired,
                ..
            }
        ));
        assert!(matches!(
            problem_error(503, Codec::Json, b"<html>bad gateway</html>"),
            Error::Hub {
                code: ErrorCode::Overloaded,
                ..
            }
        ));
    }
}
