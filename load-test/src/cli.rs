//! Command-line flags. Their names are fixed: scripts and `make bench` use them.
//!
//! Every sizing flag is optional; each scenario fills in its own defaults
//! ([`crate::scenario::Params`]) and the report records the values used.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Load and fault harness for the Branchline hub.
#[derive(Debug, Parser)]
#[command(
    name = "branchline-load",
    version,
    about = "Load and fault harness for the Branchline hub: real sockets, verified streams, \
             k6-style reports",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  branchline-load --spawn-hub --scenario fanout --subscribers 1000 --rate 500 --duration 20s --report fanout.json\n  branchline-load --url ws://127.0.0.1:7400 --token-secret $SECRET --scenario publish --branches 100 --publishers 10\n  branchline-load summary target/bench"
)]
pub struct Cli {
    /// A subcommand instead of a run.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// A run's flags.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one table of the JSON reports in a directory against the DESIGN.md targets.
    Summary {
        /// Directory of `*.json` reports.
        #[arg(default_value = "target/bench")]
        dir: PathBuf,
        /// Exit non-zero when a target is missed, not only when a run failed.
        #[arg(long)]
        strict: bool,
    },
}

/// A scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Publishers at `--rate` per branch, `--subscribers` followers: deliveries/s and
    /// publish→receive latency, every stream checked.
    Fanout,
    /// `--publishers` per branch publishing as fast as acks allow (`--inflight` unanswered
    /// each) or at `--rate`: acknowledged events/s and ack latency.
    Publish,
    /// `--connections` idle sessions: hub RSS per connection once they settle.
    Idle,
    /// One client `--behind` events behind resumes: events/s replayed until caught up.
    Catchup,
    /// `--subscribers` followers drop together, `--behind` events are published while they are
    /// away, they reconnect with `--jitter` and resume: time until all are caught up.
    ReconnectStorm,
    /// Tills publishing sales at realistic rates while following their branch, plus admins
    /// watching every branch.
    Mixed,
    /// `mixed` for a long, bounded time, watching hub memory.
    Soak,
}

impl Scenario {
    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Publish => "publish",
            Scenario::Idle => "idle",
            Scenario::Catchup => "catchup",
            Scenario::ReconnectStorm => "reconnect-storm",
            Scenario::Mixed => "mixed",
            Scenario::Soak => "soak",
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Flags of a run.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// The scenario to run (required for a run).
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,

    /// A running hub: `ws://host:port`, `http://host:port` or `host:port`.
    #[arg(long, conflicts_with = "spawn_hub")]
    pub url: Option<String>,
    /// The hub's token secret, to mint tokens (with `--url`).
    #[arg(long, env = "BRANCHLINE_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Tenant of every token.
    #[arg(long, default_value = "load")]
    pub tenant: String,
    /// Start the `branchline-hub` binary on an ephemeral port with a temporary store, watch
    /// its RSS and CPU, and stop it with SIGTERM at the end.
    #[arg(long)]
    pub spawn_hub: bool,
    /// The hub binary for `--spawn-hub` [default: `branchline-hub` next to this binary].
    #[arg(long, env = "BRANCHLINE_HUB_BIN")]
    pub hub_bin: Option<PathBuf>,
    /// An extra flag for the spawned hub, such as `--hub-arg=--publish-rate=100000`
    /// (repeatable).
    #[arg(long = "hub-arg", allow_hyphen_values = true)]
    pub hub_args: Vec<String>,
    /// Watch RSS and CPU of a hub started elsewhere on this machine (with `--url`).
    #[arg(long)]
    pub hub_pid: Option<u32>,

    /// Branches.
    #[arg(long)]
    pub branches: Option<usize>,
    /// Followers in all (spread over the branches); admins in `mixed`/`soak`.
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Publishers (tills in `mixed`/`soak`) per branch.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Events per second per branch (split over its publishers).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Padding bytes in each `custom` event.
    #[arg(long)]
    pub payload_bytes: Option<usize>,
    /// Measured time (`fanout`, `publish`, `mixed`, `soak`), idle hold time (`idle`), or the
    /// deadline to catch up (`catchup`, `reconnect-storm`). Such as `20s`, `2m`.
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Time running before measuring starts.
    #[arg(long, value_parser = duration)]
    pub warmup: Option<Duration>,
    /// Idle sessions (`idle`).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Events the resuming clients are behind (`catchup`, `reconnect-storm`).
    #[arg(long)]
    pub behind: Option<u64>,
    /// Unanswered publishes per publisher: the load without `--rate` [default: 8]; with
    /// `--rate`, a cap on the backlog a slow hub may hold [default: 128].
    #[arg(long)]
    pub inflight: Option<usize>,
    /// Storm followers reconnect after a random wait up to this.
    #[arg(long, value_parser = duration)]
    pub jitter: Option<Duration>,
    /// New connections per second while setting up (the hub's default limit is 2,000/s).
    #[arg(long)]
    pub connect_rate: Option<u32>,
    /// Wait after the idle sessions connected before reading hub memory (`idle`).
    #[arg(long, value_parser = duration)]
    pub settle: Option<Duration>,
    /// How long followers may take to receive everything after publishing stops.
    #[arg(long, value_parser = duration)]
    pub drain_timeout: Option<Duration>,
    /// How often followers ack their position (`0s`: never).
    #[arg(long, value_parser = duration)]
    pub ack_every: Option<Duration>,
    /// WebSocket read buffer per connection, bytes.
    #[arg(long)]
    pub read_buffer: Option<usize>,
    /// Loopback source addresses to spread connections over [default: one per 8,000].
    #[arg(long)]
    pub source_ips: Option<usize>,
    /// Harness runtime threads [default: available cores].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// A name for this run in the report and the summary [default: the scenario].
    #[arg(long)]
    pub label: Option<String>,
}
