//! Settings the hub refuses to start with, each named by its TOML key and flag.

use std::fmt;
use std::time::Duration;

use super::{Config, FsyncMode};

impl Config {
    /// Refuses settings the hub cannot run with: values that would panic (a zero heartbeat
    /// or retention interval cannot tick, a zero page limit cannot be clamped to), overflow
    /// clock arithmetic, or leave a hub that starts but serves nobody (zero connections, a
    /// replay chunk of nothing). Reports every problem at once, each by its TOML key and flag.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let mut c = Checks::default();
        let (r, l) = (&self.retention, &self.limits);
        c.at_least(
            "store_cache_bytes",
            "--store-cache-bytes",
            self.store_cache_bytes,
            1 << 20,
            "a smaller page cache re-reads every page from disk",
        );
        if let FsyncMode::Interval(d) = self.fsync {
            c.timer("fsync", "--fsync", d, false);
        }
        c.at_most(
            "token_leeway",
            "--token-leeway",
            self.token_leeway.as_secs(),
            MAX_TOKEN_LEEWAY.as_secs(),
            "a token must expire",
        );
        c.timer(
            "shutdown_grace",
            "--shutdown-grace",
            self.shutdown_grace,
            true,
        );
        c.at_least(
            "retention.max_events",
            "--retention-max-events",
            r.max_events,
            1,
            "0 would trim every event and make every reader resync",
        );
        c.positive(
            "retention.max_age",
            "--retention-max-age",
            r.max_age,
            "0 would trim every event and make every reader resync",
        );
        c.positive(
            "retention.dedup_window",
            "--dedup-window",
            r.dedup_window,
            "0 would forget event ids at once, so a retried publish could not be told from a reused device_seq",
        );
        c.timer(
            "retention.interval",
            "--retention-interval",
            r.interval,
            false,
        );
        c.at_least(
            "limits.max_frame_bytes",
            "--max-frame-bytes",
            l.max_frame_bytes as u64,
            MIN_FRAME_BYTES as u64,
            "a hello with its token must fit in one frame",
        );
        c.at_most(
            "limits.max_frame_bytes",
            "--max-frame-bytes",
            l.max_frame_bytes as u64,
            MAX_FRAME_BYTES as u64,
            "every session may have to buffer one frame of this size",
        );
        c.at_least(
            "limits.max_body_bytes",
            "--max-body-bytes",
            l.max_body_bytes as u64,
            MIN_FRAME_BYTES as u64,
            "a push of one event must fit in a request",
        );
        let counts: [(&'static str, &'static str, u64, &'static str); 12] = [
            (
                "limits.max_batch_events",
                "--max-batch-events",
                l.max_batch_events as u64,
                "0 would refuse every push",
            ),
            (
                "limits.max_sessions_per_device",
                "--max-sessions-per-device",
                l.max_sessions_per_device as u64,
                "0 would leave a device no session",
            ),
            (
                "limits.publish_rate",
                "--publish-rate",
                u64::from(l.publish_rate),
                "0 would refuse every publish",
            ),
            (
                "limits.publish_burst",
                "--publish-burst",
                u64::from(l.publish_burst),
                "0 would refuse every publish",
            ),
            (
                "limits.max_inflight_publishes",
                "--max-inflight-publishes",
                l.max_inflight_publishes as u64,
                "0 would stop every session reading its socket",
            ),
            (
                "limits.session_queue_events",
                "--session-queue-events",
                l.session_queue_events as u64,
                "0 would cut every session over to catch-up on every event",
            ),
            (
                "limits.max_connections",
                "--max-connections",
                l.max_connections as u64,
                "0 would refuse every connection",
            ),
            (
                "limits.connection_rate",
                "--connection-rate",
                u64::from(l.connection_rate),
                "0 would refuse every connection",
            ),
            (
                "limits.connection_burst",
                "--connection-burst",
                u64::from(l.connection_burst),
                "0 would refuse every connection",
            ),
            (
                "limits.max_events_page",
                "--max-events-page",
                l.max_events_page as u64,
                "0 would fail every events request",
            ),
            (
                "limits.max_snapshot_page",
                "--max-snapshot-page",
                l.max_snapshot_page as u64,
                "0 would fail every snapshot request",
            ),
            (
                "limits.replay_chunk_events",
                "--replay-chunk-events",
                l.replay_chunk_events as u64,
                "0 would turn every replay into resync_required",
            ),
        ];
        for (key, flag, value, why) in counts {
            c.at_least(key, flag, value, 1, why);
        }
        c.at_most(
            "limits.max_connections",
            "--max-connections",
            l.max_connections as u64,
            tokio::sync::Semaphore::MAX_PERMITS as u64,
            "the connection semaphore holds no more",
        );
        c.timer(
            "limits.hello_timeout",
            "--hello-timeout",
            l.hello_timeout,
            false,
        );
        c.timer("limits.heartbeat", "--heartbeat", l.heartbeat, false);
        c.timer(
            "limits.too_slow_after",
            "--too-slow-after",
            l.too_slow_after,
            false,
        );
        // 0 is a choice here: no long polls, every poll answers at once.
        c.timer(
            "limits.max_long_poll",
            "--max-long-poll",
            l.max_long_poll,
            true,
        );
        c.timer(
            "limits.snapshot_ttl",
            "--snapshot-ttl",
            l.snapshot_ttl,
            false,
        );
        if let Err(problem) = self.conflicts.validate() {
            c.0.push(InvalidSetting {
                key: "conflicts.merge_fallback",
                flag: "--merge-fallback",
                problem,
            });
        }
        if c.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidConfig(c.0))
        }
    }
}

/// Longest timer setting accepted (30 days): a longer one is a slip of the unit rather than a
/// choice, and deadlines that far ahead can overflow the clock's arithmetic.
pub const MAX_TIMER: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest a token may be honoured past its expiry.
const MAX_TOKEN_LEEWAY: Duration = Duration::from_secs(300);
/// Smallest frame and body limit accepted (4 KiB): a `hello` with its token must fit.
pub const MIN_FRAME_BYTES: usize = 4 << 10;
/// Largest frame limit accepted (16 MiB): a session may have to buffer a frame this big, and
/// a point-of-sale event is a few KiB.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// One setting the hub cannot run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSetting {
    /// Its key in the TOML file, such as `limits.heartbeat`.
    pub key: &'static str,
    /// Its `serve` flag, such as `--heartbeat` (the environment variable is the flag's name
    /// in capitals after `BRANCHLINE_`).
    pub flag: &'static str,
    /// What is wrong with its value.
    pub problem: String,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) {}", self.key, self.flag, self.problem)
    }
}

/// Settings the hub refuses to start with, every one found. Fatal: fix the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig(pub Vec<InvalidSetting>);

impl std::error::Error for InvalidConfig {}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration: ")?;
        for (i, setting) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{setting}")?;
        }
        Ok(())
    }
}

/// Collects the problems [`Config::validate`] finds.
#[derive(Default)]
struct Checks(Vec<InvalidSetting>);

impl Checks {
    fn refuse(&mut self, key: &'static str, flag: &'static str, problem: String) {
        self.0.push(InvalidSetting { key, flag, problem });
    }

    fn at_least(&mut self, key: &'static str, flag: &'static str, value: u64, min: u64, why: &str) {
        if value < min {
            self.refuse(
                key,
                flag,
                format!("must be at least {min}, not {value}: {why}"),
            );
        }
    }

    fn at_most(&mut self, key: &'static str, flag: &'static str, value: u64, max: u64, why: &str) {
        if value > max {
            self.refuse(
                key,
                flag,
                format!("must be at most {max}, not {value}: {why}"),
            );
        }
    }

    fn positive(&mut self, key: &'static str, flag: &'static str, value: Duration, why: &str) {
        if value.is_zero() {
            self.refuse(key, flag, format!("must be more than 0: {why}"));
        }
    }

    /// A duration between 0 (excluded unless `zero_ok`) and [`MAX_TIMER`].
    fn timer(&mut self, key: &'static str, flag: &'static str, value: Duration, zero_ok: bool) {
        if value.is_zero() && !zero_ok {
            self.refuse(key, flag, "must be more than 0".into());
        } else if value > MAX_TIMER {
            self.refuse(
                key,
                flag,
                format!(
                    "must be at most {}, not {}",
                    humantime::format_duration(MAX_TIMER),
                    humantime::format_duration(value)
                ),
            );
        }
    }
}
