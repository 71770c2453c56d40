//! `idle`: `--connections` sessions, each following one of `--branches` branches, doing
//! nothing. The branches are opened first so the hub's memory baseline includes them; once
//! every session is open and `--settle` has passed, the growth over the baseline divided by
//! the sessions is the hub's memory per connection. The sessions are then held for
//! `--duration` (longer than the hub's 15 s heartbeat, so pings and pongs are exercised) and
//! must all still be open at the end.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Env, Outcome};

pub(super) async fn run(env: &mut Env) -> anyhow::Result<(Outcome, u64)> {
    let p = env.p.clone();
    env.progress.phase("opening branches");
    let admin = env.admin(&env.device("admin", 0))?;
    for b in 0..p.branches {
        env.http.status(&admin, &env.branch(b)).await?;
    }
    // Let the allocator settle after the branch logs opened.
    env.hold("baseline", Duration::from_secs(1)).await;
    let baseline = env
        .hub
        .as_ref()
        .and_then(|h| h.refresh())
        .map(|u| u.rss_bytes);
    env.baseline_rss = baseline;
    let harness_before = crate::usage::sample(std::process::id()).ok();

    env.spread_followers("idle", p.connections, false)?;
    env.connected("idle sessions").await?;
    env.hold("settling", Duration::from_secs_f64(p.settle_s))
        .await;
    let settled = env
        .hub
        .as_ref()
        .and_then(|h| h.refresh())
        .map(|u| u.rss_bytes);
    // Memory per connection is over the sessions that actually opened.
    let opened = env.stats.open.load(Ordering::Acquire);

    let window = env.open_window(false).await;
    env.hold("holding", p.duration()).await;
    let measured = env.close_window(window).await;
    let open = env.stats.open.load(Ordering::Acquire);
    let planned = p.connections as u64;
    if open < planned {
        env.stats.error(format!(
            "{} of {planned} idle sessions were not open at the end ({} never opened, {} lost \
             while holding)",
            planned - open,
            planned.saturating_sub(opened),
            opened.saturating_sub(open)
        ));
    }
    let per_connection = match (baseline, settled.max(measured.hub_rss)) {
        (Some(base), Some(after)) if opened > 0 => {
            Some(after.saturating_sub(base) as f64 / opened as f64)
        }
        _ => None,
    };
    let harness_per_connection = match (harness_before, crate::usage::sample(std::process::id())) {
        (Some(before), Ok(after)) if opened > 0 => {
            Some(after.rss_bytes.saturating_sub(before.rss_bytes) as f64 / opened as f64)
        }
        _ => None,
    };
    Ok((
        Outcome {
            measured,
            rss_per_connection: per_connection,
            harness_rss_per_connection: harness_per_connection,
            ..Outcome::default()
        },
        0,
    ))
}
