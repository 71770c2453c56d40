//! # branchline-load
//!
//! The load and fault harness of Branchline. Operators use it to decide whether a hub holds
//! their branches; the project proves its performance targets with it (`make bench`). It
//! drives real sockets through the protocol, checks every stream it receives (a gap or a
//! duplicate fails the run), and reports like the load tools people know: a progress line
//! while running, a table at the end, a JSON report.
//!
//! ## Map
//! - [`cli`]: the flags (fixed: scripts use them) and the `summary` subcommand.
//! - [`hub`]: the hub under test — a running one (`--url`) or one spawned on an ephemeral
//!   port (`--spawn-hub`) — and token minting.
//! - [`scenario`]: `fanout`, `publish`, `idle`, `catchup`, `reconnect-storm`, `mixed`/`soak`,
//!   and the environment they share (connect, warm up, measure, drain, stop).
//! - [`client`]: one simulated device: a task owning one WebSocket session that follows
//!   branches, publishes, or both, and drops and resumes in storms.
//! - [`connect`]: TCP (spread over loopback source addresses), the upgrade, `hello`/`welcome`.
//! - [`follow`]: per-branch stream checks, resume positions and latency of one session.
//! - [`stream`]: the gap/duplicate detector.
//! - [`publish`]: pacing (open loop with intended-time stamps, or a closed-loop window),
//!   `device_seq`, and matching answers to publishes.
//! - [`wire`]: frames sent, and the few fields decoded from frames received.
//! - [`seed`]: the HTTP API: batch pushes to put a branch behind fast, branch status.
//! - [`stats`]: shared counters and HdrHistograms. [`clock`]: the harness's monotonic stamps.
//! - [`usage`]: RSS and CPU from `/proc`. [`progress`]: the live line.
//! - [`report`]: JSON and the human table. [`summary`]: reports against the targets.
//!
//! ## How a run flows
//! `main` parses [`cli::Cli`] and calls [`run`] on one tokio runtime → [`hub::Target`] spawns
//! or finds the hub → [`scenario::run`] starts [`client`] tasks (paced below the hub's
//! connection-rate limit), warms up, opens a measured window, drains and stops them → every
//! frame a session reads goes through [`follow::Streams`] / [`publish::Publisher`], counting
//! into [`stats::Stats`] → [`report::Report`] → table, JSON, exit status (non-zero on any
//! gap, duplicate, failed connection or incomplete stream).
//!
//! Errors: the client side uses `thiserror` ([`connect::ConnectError`]); scenarios and
//! setup return `anyhow` errors because they are this binary's edge, where a failure is
//! reported to the operator and the run ends.

pub mod cli;
pub mod client;
pub mod clock;
pub mod connect;
pub mod follow;
pub mod hub;
pub mod progress;
pub mod publish;
pub mod report;
pub mod scenario;
pub mod seed;
pub mod stats;
pub mod stream;
pub mod summary;
pub mod usage;
pub mod wire;

use anyhow::{Context, bail};
use branchline_protocol::Name;

pub use cli::{Cli, RunArgs, Scenario};
pub use report::Report;
pub use stream::{Anomaly, StreamCheck};

/// Runs the scenario `args` name against the hub they name (or spawn) and returns its report.
pub async fn run(args: &RunArgs) -> anyhow::Result<Report> {
    let scenario = args
        .scenario
        .context("--scenario is required (or use the summary subcommand)")?;
    let tenant = Name::new(args.tenant.as_str()).context("--tenant")?;
    clock::origin();
    let target = if args.spawn_hub {
        let bin = hub::find_hub_bin(args.hub_bin.as_deref())?;
        hub::Target::spawn(&bin, &args.hub_args, tenant).await?
    } else if let Some(url) = &args.url {
        let secret = args
            .token_secret
            .as_deref()
            .context("--url needs the hub's --token-secret (or BRANCHLINE_TOKEN_SECRET)")?;
        hub::Target::remote(url, secret, tenant, args.hub_pid).await?
    } else {
        bail!("name a running hub with --url, or pass --spawn-hub");
    };
    scenario::run(scenario, args, target).await
}
