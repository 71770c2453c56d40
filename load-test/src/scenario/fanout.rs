//! `fanout`: `--publishers` per branch publish at `--rate` events/s per branch (open loop,
//! stamped with intended send times), `--subscribers` followers spread over the branches
//! receive them. Measures deliveries/s and publish→receive latency; every follower's stream is
//! checked event by event and must reach the final head.

use anyhow::Context;

use super::{Env, Outcome};
use crate::client::Plan;
use crate::publish::{Pace, PublishPlan};
use crate::wire::Payload;

pub(super) async fn run(env: &mut Env) -> anyhow::Result<(Outcome, u64)> {
    let p = env.p.clone();
    env.spread_followers("sub", p.subscribers, false)?;
    env.connected("followers").await?;
    start_publishers(env, &Payload::custom(p.payload_bytes))?;
    env.connected("publishers").await?;
    env.hold("warm-up", p.warmup()).await;
    let window = env.open_window(true).await;
    env.hold("measuring", p.duration()).await;
    let measured = env.close_window(window).await;
    let incomplete = env.drain().await;
    Ok((
        Outcome {
            measured,
            deliveries: true,
            acks: true,
            latency: true,
            ack_latency: true,
            ..Outcome::default()
        },
        incomplete,
    ))
}

/// `--publishers` per branch, splitting the branch's `--rate` (or each keeping `--inflight`
/// unanswered without a rate).
pub(super) fn start_publishers(env: &mut Env, payload: &Payload) -> anyhow::Result<()> {
    let p = env.p.clone();
    let pace = match p.rate {
        Some(rate) => Pace::Rate {
            per_s: rate / p.publishers as f64,
            max_inflight: p.inflight,
        },
        None => Pace::Window(p.inflight),
    };
    for b in 0..p.branches {
        let branch = env.branch(b);
        for i in 0..p.publishers {
            let device = env.device(&format!("pub-b{b}"), i);
            let token = env
                .cashier(&device, std::slice::from_ref(&branch))
                .context("minting a token")?;
            let plan = Plan {
                device,
                token,
                follow: Vec::new(),
                from: None,
                publish: Some(PublishPlan {
                    branch: branch.clone(),
                    pace,
                    payload: payload.clone(),
                    head: env.heads[b].clone(),
                }),
                read_buffer: p.read_buffer,
                storm: false,
            };
            env.publisher(plan, Vec::new());
        }
    }
    Ok(())
}
