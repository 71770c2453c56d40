//! `mixed` and `soak`: `--branches` shops, each with `--publishers` tills that ring up
//! `sale.recorded` events (the branch's `--rate` split over them) while following their own
//! branch, plus `--subscribers` admins watching every branch. Measures deliveries, acks and
//! both latencies; every till's and admin's stream is checked and must reach the final heads.
//! `soak` is the same for a long time and reports how hub memory grew over the window.

use anyhow::Context;

use super::{Env, Outcome};
use crate::client::Plan;
use crate::publish::{Pace, PublishPlan};
use crate::wire::Payload;

pub(super) async fn run(env: &mut Env) -> anyhow::Result<(Outcome, u64)> {
    let p = env.p.clone();
    let all: Vec<_> = (0..p.branches).map(|b| env.branch(b)).collect();
    for i in 0..p.subscribers {
        let device = env.device("admin", i);
        let plan = Plan {
            token: env.admin(&device).context("minting a token")?,
            device,
            follow: all.clone(),
            from: None,
            publish: None,
            read_buffer: p.read_buffer,
            storm: false,
        };
        env.follower(plan, (0..p.branches).collect());
    }
    env.connected("admins").await?;
    let pace = match p.rate {
        Some(rate) => Pace::Rate {
            per_s: rate / p.publishers as f64,
            max_inflight: p.inflight,
        },
        None => Pace::Window(p.inflight),
    };
    for (b, branch) in all.iter().enumerate() {
        for t in 0..p.publishers {
            let device = env.device(&format!("till-b{b}"), t);
            let plan = Plan {
                token: env.cashier(&device, std::slice::from_ref(branch))?,
                device,
                follow: vec![branch.clone()],
                from: None,
                publish: Some(PublishPlan {
                    branch: branch.clone(),
                    pace,
                    payload: Payload::Sale,
                    head: env.heads[b].clone(),
                }),
                read_buffer: p.read_buffer,
                storm: false,
            };
            env.publisher(plan, vec![b]);
        }
    }
    env.connected("tills").await?;
    env.hold("warm-up", p.warmup()).await;
    let window = env.open_window(true).await;
    env.hold("measuring", p.duration()).await;
    let measured = env.close_window(window).await;
    let incomplete = env.drain().await;
    let rss_growth = match (measured.hub_rss_start, measured.hub_rss) {
        (Some(a), Some(b)) => Some(b as i64 - a as i64),
        _ => None,
    };
    Ok((
        Outcome {
            measured,
            deliveries: true,
            acks: true,
            latency: true,
            ack_latency: true,
            rss_growth,
            ..Outcome::default()
        },
        incomplete,
    ))
}
