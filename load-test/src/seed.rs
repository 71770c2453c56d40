//! The HTTP side: putting events into a branch fast (batch push, 1,000 events a request, so a
//! client can be made 100,000 events behind in a second or two without tripping the
//! per-session publish rate), reading where a branch stands, and reading the hub's Prometheus
//! metrics.

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::time::Duration;

use branchline_protocol::http::{BranchStatus, PushRequest, PushResponse, PushResult};
use branchline_protocol::{Codec, Custom, Epoch, EventBody, Name, Publish, now_ms};
use uuid::Uuid;

use crate::wire::LOAD_TYPE;

/// Most events one push carries (the hub's default batch limit).
const BATCH_EVENTS: usize = 1_000;
/// Most bytes of padding one push carries (the hub's default body limit is 4 MiB).
const BATCH_PAD_BYTES: usize = 3 << 20;

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

    fn url(&self, branch: &Name, rest: &str) -> String {
        format!("{}/v1/branches/{}/{branch}{rest}", self.base, self.tenant)
    }

    /// `GET /v1/branches/{tenant}/{branch}` (which also creates an empty log).
    pub async fn status(&self, token: &str, branch: &Name) -> anyhow::Result<BranchStatus> {
        let response = self
            .client
            .get(self.url(branch, ""))
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
            .get(format!("{}/metrics", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_metrics(&text))
    }

    /// Publishes `count` `custom` events of `pad_bytes` padding to `branch` as `device`,
    /// whose `device_seq`s continue after `last_device_seq`. The events carry no stamp: their
    /// latency is not measured. Every event must be accepted.
    pub async fn seed(
        &self,
        token: &str,
        branch: &Name,
        device_last_seq: (&Name, u64),
        count: u64,
        pad_bytes: usize,
    ) -> anyhow::Result<Seeded> {
        let (device, mut device_seq) = device_last_seq;
        let data = serde_json::json!({ "seed": true, "pad": "x".repeat(pad_bytes) });
        let per_batch = (BATCH_PAD_BYTES / (pad_bytes + 200)).clamp(1, BATCH_EVENTS) as u64;
        let mut left = count;
        let mut seeded = None;
        while left > 0 {
            let n = left.min(per_batch);
            let events: Vec<Publish> = (0..n)
                .map(|_| {
                    device_seq += 1;
                    Publish {
                        branch: branch.clone(),
                        event_id: Uuid::now_v7(),
                        device_seq,
                        client_time_ms: now_ms(),
                        base_seq: None,
                        base_version: None,
                        body: EventBody::Custom(Custom {
                            custom_type: LOAD_TYPE.into(),
                            data: data.clone(),
                        }),
                    }
                })
                .collect();
            let response = self.push(token, branch, events).await?;
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
            left -= n;
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
        let response = self
            .client
            .post(self.url(branch, "/events"))
            .bearer_auth(token)
            .header("content-type", Codec::MsgPack.content_type())
            .header("accept", Codec::MsgPack.content_type())
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST events to {branch}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "POST events to {branch}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(Codec::MsgPack.decode(&bytes)?)
    }
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
