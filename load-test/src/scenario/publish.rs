//! `publish`: `--publishers` per branch over `--branches`, each as fast as acks allow
//! (`--inflight` unanswered) or at `--rate` per branch. Measures acknowledged events/s and
//! ack latency. Verifies that answers come in publish order, that nothing is acknowledged
//! twice, and afterwards that each branch's durable head (over HTTP) equals what was
//! acknowledged.

use std::sync::atomic::Ordering;

use super::{Env, Outcome};
use crate::wire::Payload;

pub(super) async fn run(env: &mut Env) -> anyhow::Result<(Outcome, u64)> {
    let p = env.p.clone();
    super::fanout::start_publishers(env, &Payload::custom(p.payload_bytes))?;
    env.connected("publishers").await?;
    env.hold("warm-up", p.warmup()).await;
    let window = env.open_window(true).await;
    env.hold("measuring", p.duration()).await;
    let measured = env.close_window(window).await;
    let incomplete = env.drain().await;
    check_heads(env).await?;
    Ok((
        Outcome {
            measured,
            acks: true,
            ack_latency: true,
            ..Outcome::default()
        },
        incomplete,
    ))
}

/// Each branch's head as the hub reports it must be the highest seq acknowledged, and the
/// heads must add up to every event acknowledged over the whole run.
async fn check_heads(env: &Env) -> anyhow::Result<()> {
    env.progress.phase("checking heads");
    let admin = env.device("admin", 0);
    let token = env.admin(&admin)?;
    let mut sum = 0;
    for (b, acked_head) in env.heads.iter().enumerate() {
        let acked_head = acked_head.load(Ordering::Acquire);
        let status = env.http.status(&token, &env.branch(b)).await?;
        if status.head != acked_head {
            env.stats.error(format!(
                "{}: the hub's head is {} but acks went up to {acked_head}",
                status.branch, status.head
            ));
        }
        sum += status.head;
    }
    let acked = env.stats.acked.load(Ordering::Acquire);
    if sum != acked {
        env.stats.error(format!(
            "{acked} publishes were acknowledged but the branch heads add up to {sum}"
        ));
    }
    Ok(())
}
