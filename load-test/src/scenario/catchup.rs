//! `catchup`: a branch is filled with `--behind` events (HTTP batch push), then one client
//! resumes from the position just before them. Measures events/s replayed from the hello to
//! `caught_up`; the client must receive exactly those events, in order, once.

use std::sync::atomic::Ordering;

use anyhow::Context;
use branchline_protocol::Position;

use super::{Env, Outcome};
use crate::client::Plan;
use crate::clock;

pub(super) async fn run(env: &mut Env) -> anyhow::Result<(Outcome, u64)> {
    let p = env.p.clone();
    let branch = env.branch(0);
    env.progress.phase(format!("seeding {} events", p.behind));
    let token = |device: &_| env.cashier(device, std::slice::from_ref(&branch));
    let seeded = env
        .http
        .seed(token, &branch, "seed", p.behind, p.payload_bytes)
        .await
        .context("seeding the branch")?;
    env.heads[0].store(seeded.head, Ordering::Release);
    let from = Position::new(seeded.epoch, seeded.head.saturating_sub(p.behind));

    let device = env.device("catchup", 0);
    let plan = Plan {
        token: env.cashier(&device, std::slice::from_ref(&branch))?,
        device,
        follow: vec![branch],
        from: Some(vec![from]),
        publish: None,
        read_buffer: p.read_buffer,
        storm: false,
    };
    env.progress.phase("catching up");
    let window = env.open_window(false).await;
    let started = clock::now_ns();
    let probe = env.follower(plan, vec![0]);
    let caught_up = env
        .wait_until(p.duration(), |_| {
            probe.caught_up_ns.load(Ordering::Acquire) > 0 || probe.done.load(Ordering::Acquire)
        })
        .await;
    let mut measured = env.close_window(window).await;
    let done_ns = probe.caught_up_ns.load(Ordering::Acquire);
    let rate = if caught_up && done_ns > 0 {
        let secs = (done_ns.saturating_sub(started)) as f64 / 1e9;
        measured.duration = std::time::Duration::from_secs_f64(secs);
        Some(p.behind as f64 / secs.max(1e-9))
    } else {
        env.stats.error(format!(
            "the client did not catch up within {:?} ({} of {} events)",
            p.duration(),
            probe.last(0).saturating_sub(from.seq),
            p.behind
        ));
        None
    };
    let incomplete = env.drain().await;
    Ok((
        Outcome {
            measured,
            deliveries: true,
            catchup_events_per_s: rate,
            ..Outcome::default()
        },
        incomplete,
    ))
}
