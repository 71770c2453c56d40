//! `reconnect-storm`: `--subscribers` followers over `--branches` while publishers keep
//! publishing at `--rate` per branch. The followers drop their sockets together (no close
//! frame, like tills losing the network); `--behind` more events are pushed to every branch
//! while they are away; then they reconnect after a random wait up to `--jitter`, resume from
//! the last event they hold, and must catch up. Measures the time from the reconnect signal
//! until the last follower got `caught_up`, within the `--duration` deadline. Streams are
//! checked across the drop: a resume that loses or repeats an event is a gap or duplicate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use hdrhistogram::Histogram;

use super::{Env, Outcome};
use crate::client::Link;
use crate::clock;
use crate::follow::Probe;
use crate::report::StormDetail;
use crate::stats::Percentiles;
use crate::wire::Payload;

/// How long the followers get to close their sockets after the drop signal.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);

/// Followers whose session is still open.
fn still_connected(probes: &[Arc<Probe>]) -> usize {
    probes
        .iter()
        .filter(|p| p.connected.load(Ordering::Acquire))
        .count()
}

pub(super) async fn run(env: &mut Env) -> anyhow::Result<(Outcome, u64)> {
    let p = env.p.clone();
    env.spread_followers("sub", p.subscribers, true)?;
    env.connected("followers").await?;
    super::fanout::start_publishers(env, &Payload::custom(p.payload_bytes))?;
    env.connected("publishers").await?;
    env.hold("live", p.warmup()).await;
    let probes: Vec<Arc<Probe>> = env.followers.iter().map(|f| f.probe.clone()).collect();

    let window = env.open_window(false).await;
    env.progress.phase("dropping followers");
    env.set_signal(|s| s.link = Link::Down);
    env.wait_until(DROP_TIMEOUT, |_| still_connected(&probes) == 0)
        .await;
    // Followers that never dropped would receive the missed events live, and the storm would
    // measure nothing; the run fails, and the rest still runs so the report shows the effect.
    let undropped = still_connected(&probes);
    if undropped > 0 {
        env.stats.error(format!(
            "{undropped} of {} followers did not drop within {} s",
            probes.len(),
            DROP_TIMEOUT.as_secs()
        ));
    }

    env.progress
        .phase(format!("publishing {} per branch while away", p.behind));
    seed_all(env).await?;

    env.progress.phase("reconnecting");
    let t0 = clock::now_ns();
    env.set_signal(|s| s.link = Link::Up);
    let all = env
        .wait_until(p.duration(), |_| {
            probes.iter().all(|p| {
                p.caught_up_ns.load(Ordering::Acquire) > t0 || p.done.load(Ordering::Acquire)
            })
        })
        .await;
    let measured = env.close_window(window).await;

    let mut times = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .expect("constant histogram bounds are valid");
    let mut last = 0;
    let mut min_behind = u64::MAX;
    let mut reconnected: u64 = 0;
    for probe in &probes {
        let at = probe.caught_up_ns.load(Ordering::Acquire);
        if at > t0 {
            reconnected += 1;
            last = last.max(at);
            times.saturating_record(clock::micros_between(t0, at).max(1));
            min_behind = min_behind.min(probe.behind.load(Ordering::Acquire));
        }
    }
    let caught_up = all && reconnected == probes.len() as u64;
    if !caught_up {
        env.stats.error(format!(
            "{} of {} followers caught up within {:?}",
            reconnected,
            probes.len(),
            p.duration()
        ));
    }
    if reconnected > 0 && min_behind < p.behind {
        env.stats.error(format!(
            "a follower resumed only {min_behind} events behind, less than --behind {}",
            p.behind
        ));
    }
    let storm = StormDetail {
        catchup_s: caught_up.then(|| (last - t0) as f64 / 1e9),
        followers: probes.len() as u64,
        reconnected,
        min_behind: (reconnected > 0).then_some(min_behind),
        catchup_ms: Percentiles::of(&times),
    };
    // Keep publishing a little so the resumed streams are checked live too.
    env.hold("live again", Duration::from_secs(1)).await;
    let incomplete = env.drain().await;
    Ok((
        Outcome {
            measured,
            deliveries: true,
            acks: true,
            storm: Some(storm),
            ..Outcome::default()
        },
        incomplete,
    ))
}

/// Pushes `--behind` events to every branch, eight branches at a time.
async fn seed_all(env: &Env) -> anyhow::Result<()> {
    let branches: Vec<_> = (0..env.p.branches).map(|b| env.branch(b)).collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(branches.iter().enumerate())
        .map(|(b, branch)| {
            let http = &env.http;
            let token = move |device: &_| env.cashier(device, std::slice::from_ref(branch));
            async move {
                let seeded = http
                    .seed(token, branch, "seed", env.p.behind, env.p.payload_bytes)
                    .await?;
                env.heads[b].fetch_max(seeded.head, Ordering::AcqRel);
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_still_open_are_counted() {
        let probes: Vec<Arc<Probe>> = (0..3).map(|_| Arc::new(Probe::new(1))).collect();
        assert_eq!(still_connected(&probes), 0);
        probes[0].connected.store(true, Ordering::Release);
        probes[2].connected.store(true, Ordering::Release);
        assert_eq!(still_connected(&probes), 2);
    }
}
