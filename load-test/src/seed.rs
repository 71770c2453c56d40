//! The HTTP side: putting events into a branch fast (batch push, 1,000 events a request, from
//! as many seeding devices as it takes to stay within each device's publish budget, so a
//! client can be made 100,000 events behind in a second or two), reading where a branch
//! stands, and reading the hub's Prometheus metrics.

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::time::Duration;

use branchline_protocol::http::{BranchStatus, PushRequest, PushResponse, PushResult};
use branchline_protocol::{Codec, Custom, Epoch, EventBody, Name, Publish, now_ms, routes};
use uuid::Uuid;

use crate::wire::LOAD_TYPE;

/// Most events one push carries (the hub's default batch limit).
const BATCH_EVENTS: usize = 1_000;
/// Most bytes of padding one push carries (the hub's default body limit is 4 MiB).
const BATCH_PAD_BYTES: usize = 3 << 20;
/// Events one seeding device pushes: half the hub's default publish burst (4,000 per
/// device), so that seeding never waits for the device's budget to refill.
const EVENTS_PER_DEVICE: u64 = 2_000;
/// How long seeding keeps retrying pushes the hub refuses with 429.
const RATE_LIMITED_FOR: Duration = Duration::from_secs(120);

/// An HTTP client for the hub's sync API.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
    tenant: Name,
}

/// Where a seeded branch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seeded {
    /// The branch log's epoch.
    pub epoch: Epoch,
    /// The seq of the last seeded event.
    pub head: u64,
}

impl Http {
    /// A client for the hub at `base` (`http://host:port`).
    pub fn new(base: &str, tenant: Name) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder().build()?,
            base: base.trim_end_matches('/').to_owned(),
            tenant,
        })
    }

    /// The URL of `route` (one of the branch routes) for `branch`.
    fn url(&self, route: &str, branch: &Name) -> String {
        let path = routes::branch_path(route, &self.tenant, branch);
        format!("{}{path}", self.base)
    }

    /// `GET /v1/branches/{tenant}/{branch}` (which also creates an empty log).
    pub async fn status(&self, token: &str, branch: &Name) -> anyhow::Result<BranchStatus> {
        let response = self
            .client
            .get(self.url(routes::BRANCH, branch))
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("GET status of {branch}"))?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "GET status of {branch}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// `GET /metrics`: every sample of the hub's Prometheus text, summed over label sets (so a
    /// histogram's `_sum` and `_count` read as totals).
    pub async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let text = self
            .client
            .get(format!("{}{}", self.base, routes::METRICS))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_metrics(&text))
    }

    /// Publishes `count` `custom` events of `pad_bytes` padding to `branch`, from fresh
    /// devices `{seeder}-{branch}-{n}` (a token for each from `token`), each publishing at
    /// most `EVENTS_PER_DEVICE` (2,000). The events carry no stamp: their latency is not
    /// measured. Every event must be accepted; a push refused with 429 is retried after
    /// `Retry-After`.
    pub async fn seed(
        &self,
        token: impl Fn(&Name) -> anyhow::Result<String>,
        branch: &Name,
        seeder: &str,
        count: u64,
        pad_bytes: usize,
    ) -> anyhow::Result<Seeded> {
        let data = serde_json::json!({ "seed": true, "pad": "x".repeat(pad_bytes) });
        let per_batch = (BATCH_PAD_BYTES / (pad_bytes + 200)).clamp(1, BATCH_EVENTS) as u64;
        let mut left = count;
        let mut seeded = None;
        for n in 0.. {
            if left == 0 {
                break;
            }
            let device =
                Name::new(format!("{seeder}-{branch}-{n}")).context("a seeding device name")?;
            let token = token(&device)?;
            let mut device_seq = 0;
            while left > 0 && device_seq < EVENTS_PER_DEVICE {
                let n = left.min(per_batch).min(EVENTS_PER_DEVICE - device_seq);
                let events: Vec<Publish> = (0..n)
                    .map(|i| Publish {
                        branch: branch.clone(),
                        event_id: Uuid::now_v7(),
                        device_seq: device_seq + 1 + i,
                        client_time_ms: now_ms(),
                        base_seq: None,
                        base_version: None,
                        body: EventBody::Custom(Custom {
                            custom_type: LOAD_TYPE.into(),
                            data: data.clone(),
                        }),
                    })
                    .collect();
                let response = self.push(&token, branch, events).await?;
                let mut head = 0;
                for result in &response.results {
                    match result {
                        PushResult::Accepted(a) if !a.duplicate => head = head.max(a.seq),
                        other => bail!("seeding {branch} as {device}: {other:?}"),
                    }
                }
                seeded = Some(Seeded {
                    epoch: response.epoch,
                    head,
                });
                device_seq += n;
                left -= n;
            }
        }
        seeded.context("nothing to seed")
    }

    async fn push(
        &self,
        token: &str,
        branch: &Name,
        events: Vec<Publish>,
    ) -> anyhow::Result<PushResponse> {
        let body = Codec::MsgPack.encode(&PushRequest {
            client_time_ms: now_ms(),
            events,
        })?;
        let give_up = std::time::Instant::now() + RATE_LIMITED_FOR;
        let (status, bytes) = loop {
            let response = self
                .client
                .post(self.url(routes::EVENTS, branch))
                .bearer_auth(token)
                .header("content-type", Codec::MsgPack.content_type())
                .header("accept", Codec::MsgPack.content_type())
                .body(body.clone())
                .send()
                .await
                .with_context(|| format!("POST events to {branch}"))?;
            let status = response.status();
            // A batch refused for the device's rate is refused whole: sending it again is safe.
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS
                && std::time::Instant::now() < give_up
            {
                tokio::time::sleep(retry_after(response.headers())).await;
                continue;
            }
            break (status, response.bytes().await?);
        };
        if !status.is_success() {
            bail!(
                "POST events to {branch}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(Codec::MsgPack.decode(&bytes)?)
    }
}

/// How long a 429 asks to wait (`Retry-After` in seconds; one second if it says nothing).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), |s| {
            Duration::from_secs(s.clamp(1, 30))
        })
}

fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        *samples.entry(name.to_owned()).or_insert(0.0) += value;
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_sums_over_labels() {
        let m = parse_metrics(
            "# HELP x y\n# TYPE branchline_publishes_total counter\n\
             branchline_publishes_total{outcome=\"accepted\"} 10\n\
             branchline_publishes_total{outcome=\"rejected\"} 2\n\
             branchline_commit_seconds_sum 0.5\nbranchline_commit_seconds_count 100\n",
        );
        assert_eq!(m["branchline_publishes_total"], 12.0);
        assert_eq!(m["branchline_commit_seconds_sum"], 0.5);
        assert_eq!(m["branchline_commit_seconds_count"], 100.0);
    }
}
