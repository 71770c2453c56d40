//! Hub configuration: every setting with its default and the reason for it.
//!
//! A setting comes, in order of precedence, from a `serve` flag, its `BRANCHLINE_*`
//! environment variable, the TOML file given with `--config`, or the default here.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use branchline_protocol::ConflictPolicy;
pub use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod validate;

pub use validate::{InvalidConfig, InvalidSetting, MAX_FRAME_BYTES, MAX_TIMER, MIN_FRAME_BYTES};

/// Everything the hub can be told.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on for WebSocket and HTTP. Default `127.0.0.1:7400`: loopback only
    /// until an operator chooses to expose the hub.
    pub listen: SocketAddr,
    /// Directory of the embedded sled store. Default `./data`.
    pub data_dir: PathBuf,
    /// Secret that signs and checks tokens (HS256). No default: `serve` refuses to start
    /// without one unless `--dev` makes one up. At least 32 bytes are recommended.
    #[serde(skip_serializing)]
    pub token_secret: Option<String>,
    /// How long past its `exp` a token is still accepted, for a token issuer whose clock is
    /// ahead of the hub's. Default 0: a token is refused from the second after its expiry, as
    /// PROTOCOL.md §3 says; at most 5 minutes.
    #[serde(with = "humantime_serde")]
    pub token_leeway: Duration,
    /// Memory sled may use as its page cache. Default 256 MiB: the recent part of every
    /// branch log stays in memory for replay, without crowding out connections.
    pub store_cache_bytes: u64,
    /// When a publish counts as durable. Default `always`: acknowledge only after its group
    /// commit is on stable storage (`fdatasync` of every file written, `fsync` of every
    /// directory changed), so neither a crash nor a power cut can take it back.
    pub fsync: FsyncMode,
    /// Free space the store's disk must keep: under it new writes are refused
    /// (`storage_unavailable`, `/readyz` 503) until there is room again, while reads, snapshots
    /// and shutdown go on. Default 256 MiB: room for the commits already under way, sled's
    /// snapshots and the final flush, so that the store never meets a full disk of its own
    /// making (sled 0.34 handles one badly). `0` turns the floor off.
    pub min_free_space: ByteSize,
    /// How long branch logs keep events and deduplication entries.
    pub retention: RetentionConfig,
    /// Bounds on what one client, connection or request may use.
    pub limits: Limits,
    /// How stale catalog writes are settled.
    pub conflicts: ConflictConfig,
    /// How long a graceful shutdown, from the stop signal to the end of the process, waits
    /// for sessions and commits to finish. Past it the binary exits anyway, with status 1:
    /// under `fsync = always` nothing acknowledged is lost; under `interval` up to one interval
    /// may be, as in a crash. Default 10 s: enough for in-flight commits, short enough for an
    /// orchestrator's kill timeout.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            data_dir: PathBuf::from("./data"),
            token_secret: None,
            token_leeway: Duration::ZERO,
            store_cache_bytes: 256 << 20,
            fsync: FsyncMode::Always,
            min_free_space: ByteSize::mib(256),
            retention: RetentionConfig::default(),
            limits: Limits::default(),
            conflicts: ConflictConfig::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Reads a TOML configuration file over the defaults.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

/// When the hub acknowledges a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncMode {
    /// Group commit: many appends, one flush to stable storage, then acknowledge and
    /// deliver. Nothing acknowledged is ever lost, not even to a power cut.
    Always,
    /// Acknowledge and deliver once the write reaches the store's memory; flush to stable
    /// storage at most every interval. Faster, but a crash or a power cut may lose up to
    /// about one interval of acknowledged events, after which every branch gets a new epoch.
    Interval(Duration),
}

impl FromStr for FsyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "always" => Ok(FsyncMode::Always),
            other => {
                let value = other.strip_prefix("interval=").ok_or_else(|| {
                    format!("fsync must be `always` or `interval=<duration>`, not `{other}`")
                })?;
                let interval = match value.parse::<u64>() {
                    Ok(ms) => Duration::from_millis(ms),
                    Err(_) => humantime::parse_duration(value).map_err(|e| e.to_string())?,
                };
                if interval.is_zero() {
                    return Err("fsync interval must be more than 0".into());
                }
                Ok(FsyncMode::Interval(interval))
            }
        }
    }
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncMode::Always => f.write_str("always"),
            FsyncMode::Interval(d) => write!(f, "interval={}", humantime::format_duration(*d)),
        }
    }
}

impl Serialize for FsyncMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Retention of branch logs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Most events a branch log keeps. Default 5,000,000: months of a busy branch, a few GiB
    /// at most on disk. Older events are trimmed and readers below the floor must resync.
    pub max_events: u64,
    /// Oldest event a branch log keeps. Default 30 days: a till offline for weeks still
    /// resumes from the log instead of resyncing.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long an `event_id` is remembered for deduplication, even after its event is
    /// trimmed. Default 7 days: longer than any outbox retry; after it `device_seq` still
    /// refuses replays.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// How often the retention pass runs. Default 1 minute.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_events: 5_000_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(60),
        }
    }
}

/// Bounds on clients, connections and requests. Every queue and rate in the hub is one of
/// these.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket frame accepted. Default 1 MiB: a 500-line sale is ~40 KiB; the limit
    /// stops a client from making the hub buffer arbitrary amounts.
    pub max_frame_bytes: usize,
    /// Largest HTTP request body. Default 4 MiB, for batch pushes of up to 1,000 events.
    pub max_body_bytes: usize,
    /// Most events in one batch push. Default 1,000.
    pub max_batch_events: usize,
    /// How long a new WebSocket may take to send its `hello`. Default 10 s: slow links, but no
    /// idle sockets held open by clients that never identify.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// How often the hub pings each session. Default 15 s. A session silent for three of these
    /// is closed (`idle_timeout`), which frees sockets of tills that vanished without a FIN.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Live sessions one device may hold; opening one more closes its oldest. Default 4: a till
    /// reconnecting before the hub noticed its old connection died is never locked out.
    pub max_sessions_per_device: usize,
    /// Sustained publishes per second one session may make. Default 2,000: far above any till,
    /// low enough that one client cannot starve a branch's writer.
    pub publish_rate: u32,
    /// Burst of publishes above the rate. Default 4,000 (an outbox draining after a day
    /// offline).
    pub publish_burst: u32,
    /// Publishes one session may have waiting for their answer. Default 1,024; past it the hub
    /// stops reading the socket (TCP backpressure) instead of buffering.
    pub max_inflight_publishes: usize,
    /// Events queued for one session. Default 4,096. When full the session is cut over to
    /// catch-up from the log, so a slow consumer never grows hub memory.
    pub session_queue_events: usize,
    /// How long a session may stay in catch-up without reaching the head before it is closed
    /// as too slow. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub too_slow_after: Duration,
    /// Open connections (WebSocket and HTTP). Default 16,384: under a 20,000 descriptor limit
    /// with room for the store's files.
    pub max_connections: usize,
    /// New connections per second. Default 2,000: a reconnect storm of thousands of tills is
    /// served in seconds rather than melting the accept loop; the excess gets 503.
    pub connection_rate: u32,
    /// Burst of new connections above the rate. Default 4,000.
    pub connection_burst: u32,
    /// Most events in one HTTP events page. Default 5,000 (larger requests are clamped).
    pub max_events_page: usize,
    /// Longest long poll. Default 30 s (longer requests are clamped), under common proxy
    /// timeouts.
    #[serde(with = "humantime_serde")]
    pub max_long_poll: Duration,
    /// Most items in one snapshot page. Default 10,000 (larger requests are clamped).
    pub max_snapshot_page: usize,
    /// How long a snapshot's page tokens stay valid after the last page served. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub snapshot_ttl: Duration,
    /// Events read from the log per replay frame. Default 512: big enough to stream fast, small
    /// enough to keep each session's replay memory to a few hundred KiB.
    pub replay_chunk_events: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: branchline_protocol::DEFAULT_MAX_FRAME_BYTES,
            max_body_bytes: 4 << 20,
            max_batch_events: 1_000,
            hello_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(15),
            max_sessions_per_device: 4,
            publish_rate: 2_000,
            publish_burst: 4_000,
            max_inflight_publishes: 1_024,
            session_queue_events: 4_096,
            too_slow_after: Duration::from_secs(30),
            max_connections: 16_384,
            connection_rate: 2_000,
            connection_burst: 4_000,
            max_events_page: 5_000,
            max_long_poll: Duration::from_secs(30),
            max_snapshot_page: 10_000,
            snapshot_ttl: Duration::from_secs(600),
            replay_chunk_events: 512,
        }
    }
}

/// How stale catalog writes are settled (see PROTOCOL.md §10).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConflictConfig {
    /// Policy for `product.upserted`. Default `merge`: two tills changing different fields of
    /// a product (price here, barcode there) both keep their change.
    pub product_upserted: ConflictPolicy,
    /// Policy for `product.removed`. Default `server_wins`: a removal based on an outdated
    /// product is refused rather than deleting changes the till never saw.
    pub product_removed: ConflictPolicy,
    /// Policy for fields both sides changed under `merge` (not `merge` itself). Default
    /// `server_wins`.
    pub merge_fallback: ConflictPolicy,
}

impl Default for ConflictConfig {
    fn default() -> Self {
        Self {
            product_upserted: ConflictPolicy::Merge,
            product_removed: ConflictPolicy::ServerWins,
            merge_fallback: ConflictPolicy::ServerWins,
        }
    }
}

impl ConflictConfig {
    /// Refuses a `merge` fallback of `merge`.
    pub fn validate(&self) -> Result<(), String> {
        if self.merge_fallback == ConflictPolicy::Merge {
            return Err("conflicts.merge_fallback cannot be `merge`".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_modes_parse_and_print() {
        assert_eq!("always".parse(), Ok(FsyncMode::Always));
        assert_eq!(
            "interval=50".parse(),
            Ok(FsyncMode::Interval(Duration::from_millis(50)))
        );
        assert_eq!(
            "interval=2s".parse(),
            Ok(FsyncMode::Interval(Duration::from_secs(2)))
        );
        assert!("interval=0".parse::<FsyncMode>().is_err());
        assert!("sometimes".parse::<FsyncMode>().is_err());
        assert_eq!(
            FsyncMode::Interval(Duration::from_millis(50)).to_string(),
            "interval=50ms"
        );
    }

    fn refused(adjust: impl FnOnce(&mut Config)) -> Vec<&'static str> {
        let mut c = Config::default();
        adjust(&mut c);
        match c.validate() {
            Ok(()) => Vec::new(),
            Err(InvalidConfig(problems)) => problems.iter().map(|p| p.key).collect(),
        }
    }

    #[test]
    fn defaults_are_valid_and_deliberate_zeros_are_allowed() {
        assert_eq!(Config::default().validate(), Ok(()));
        assert!(refused(|c| c.limits.max_long_poll = Duration::ZERO).is_empty());
        assert!(refused(|c| c.shutdown_grace = Duration::ZERO).is_empty());
    }

    #[test]
    fn settings_that_would_panic_or_serve_nobody_are_refused_by_name() {
        type Adjust = fn(&mut Config);
        let cases: [(&str, Adjust); 30] = [
            ("store_cache_bytes", |c| c.store_cache_bytes = 0),
            ("retention.max_events", |c| c.retention.max_events = 0),
            ("retention.max_age", |c| {
                c.retention.max_age = Duration::ZERO;
            }),
            ("retention.dedup_window", |c| {
                c.retention.dedup_window = Duration::ZERO;
            }),
            ("retention.interval", |c| {
                c.retention.interval = Duration::ZERO;
            }),
            ("limits.max_frame_bytes", |c| c.limits.max_frame_bytes = 0),
            ("limits.max_frame_bytes", |c| {
                c.limits.max_frame_bytes = 1 << 30;
            }),
            ("limits.max_body_bytes", |c| c.limits.max_body_bytes = 10),
            ("limits.max_batch_events", |c| c.limits.max_batch_events = 0),
            ("limits.hello_timeout", |c| {
                c.limits.hello_timeout = Duration::ZERO;
            }),
            ("limits.heartbeat", |c| c.limits.heartbeat = Duration::ZERO),
            ("limits.heartbeat", |c| c.limits.heartbeat = Duration::MAX),
            ("limits.max_sessions_per_device", |c| {
                c.limits.max_sessions_per_device = 0;
            }),
            ("limits.publish_rate", |c| c.limits.publish_rate = 0),
            ("limits.publish_burst", |c| c.limits.publish_burst = 0),
            ("limits.max_inflight_publishes", |c| {
                c.limits.max_inflight_publishes = 0;
            }),
            ("limits.session_queue_events", |c| {
                c.limits.session_queue_events = 0;
            }),
            ("limits.too_slow_after", |c| {
                c.limits.too_slow_after = Duration::ZERO;
            }),
            ("limits.max_connections", |c| c.limits.max_connections = 0),
            ("limits.max_connections", |c| {
                c.limits.max_connections = usize::MAX;
            }),
            ("limits.connection_rate", |c| c.limits.connection_rate = 0),
            ("limits.connection_burst", |c| c.limits.connection_burst = 0),
            ("limits.max_events_page", |c| c.limits.max_events_page = 0),
            ("limits.max_long_poll", |c| {
                c.limits.max_long_poll = Duration::MAX;
            }),
            ("limits.max_snapshot_page", |c| {
                c.limits.max_snapshot_page = 0;
            }),
            ("limits.snapshot_ttl", |c| {
                c.limits.snapshot_ttl = Duration::ZERO;
            }),
            ("limits.replay_chunk_events", |c| {
                c.limits.replay_chunk_events = 0;
            }),
            ("shutdown_grace", |c| c.shutdown_grace = Duration::MAX),
            ("fsync", |c| c.fsync = FsyncMode::Interval(Duration::MAX)),
            ("conflicts.merge_fallback", |c| {
                c.conflicts.merge_fallback = ConflictPolicy::Merge;
            }),
        ];
        for (key, adjust) in cases {
            assert_eq!(refused(adjust), [key], "{key}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_flag() {
        let mut c = Config::default();
        c.limits.heartbeat = Duration::ZERO;
        c.retention.interval = Duration::ZERO;
        let message = c.validate().unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid configuration: retention.interval (--retention-interval) must be more \
             than 0; limits.heartbeat (--heartbeat) must be more than 0"
        );
    }

    #[test]
    fn toml_overrides_only_what_it_names() {
        let cfg = Config::from_toml(
            "fsync = \"interval=20ms\"\n[limits]\nheartbeat = \"5s\"\n[conflicts]\nproduct_upserted = \"manual\"\n",
        )
        .unwrap();
        assert_eq!(cfg.fsync, FsyncMode::Interval(Duration::from_millis(20)));
        assert_eq!(cfg.limits.heartbeat, Duration::from_secs(5));
        assert_eq!(cfg.limits.max_sessions_per_device, 4);
        assert_eq!(cfg.conflicts.product_upserted, ConflictPolicy::Manual);
        assert!(
            Config::from_toml("lissen = \"x\"").is_err(),
            "unknown keys are errors"
        );
    }
}
