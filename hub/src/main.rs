//! `branchline-hub`: serve, mint tokens, inspect a store.
//!
//! Every `serve` flag can also be set by its `BRANCHLINE_*` environment variable or in the
//! TOML file given with `--config`; a flag wins over the environment, which wins over the
//! file, which wins over the defaults documented in `config.rs` and the README.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use branchline_hub::Hub;
use branchline_hub::auth::{Claims, TokenBranches, TokenKeys};
use branchline_hub::config::{ByteSize, Config, FsyncMode};
use branchline_hub::ops::inspect;
use branchline_hub::protocol::BranchKey;
use branchline_hub::protocol::{ConflictPolicy, Name, Role};
use clap::{Args, Parser, Subcommand};

// The hub allocates per event on every thread (frames, batches, sled's nodes); glibc's malloc
// spent a quarter of the group committer's time on it under durable-publish load, mimalloc's
// per-thread free lists a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "branchline-hub",
    version,
    about = "Branchline real-time hub and delta-sync service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub.
    Serve(Box<ServeArgs>),
    /// Mint a token.
    Token(TokenArgs),
    /// Inspect (or reset the epochs of) a stopped hub's store.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn policy(s: &str) -> Result<ConflictPolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| "one of server_wins, client_wins, newest_wins, merge, manual".to_string())
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "BRANCHLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Development mode: make up a token secret if none is given and print ready-to-use tokens.
    #[arg(long, env = "BRANCHLINE_DEV")]
    dev: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log filter (tracing's `RUST_LOG` syntax).
    #[arg(long, env = "BRANCHLINE_LOG", default_value = "info")]
    log: String,
    /// Address to listen on [default: 127.0.0.1:7400].
    #[arg(long, env = "BRANCHLINE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Store directory [default: ./data].
    #[arg(long = "data", env = "BRANCHLINE_DATA")]
    data_dir: Option<PathBuf>,
    /// Secret that signs tokens (HS256).
    #[arg(long, env = "BRANCHLINE_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// How long past its expiry a token is still accepted (issuer clock skew), whole seconds,
    /// at most 5m [default: 0s].
    #[arg(long, env = "BRANCHLINE_TOKEN_LEEWAY", value_parser = duration)]
    token_leeway: Option<Duration>,
    /// Store page cache, bytes [default: 256 MiB].
    #[arg(long, env = "BRANCHLINE_STORE_CACHE_BYTES")]
    store_cache_bytes: Option<u64>,
    /// `always` (ack after the commit is on stable storage) or `interval=<duration>`
    /// [default: always].
    #[arg(long, env = "BRANCHLINE_FSYNC")]
    fsync: Option<FsyncMode>,
    /// Free space the store's disk keeps: new writes are refused under it, reads go on;
    /// `0` turns it off [default: 256MiB].
    #[arg(long, env = "BRANCHLINE_MIN_FREE_SPACE")]
    min_free_space: Option<ByteSize>,
    /// Most events a branch log keeps [default: 5000000].
    #[arg(long, env = "BRANCHLINE_RETENTION_MAX_EVENTS")]
    retention_max_events: Option<u64>,
    /// Oldest event a branch log keeps [default: 30days].
    #[arg(long, env = "BRANCHLINE_RETENTION_MAX_AGE", value_parser = duration)]
    retention_max_age: Option<Duration>,
    /// How long event ids are remembered for dedup [default: 7days].
    #[arg(long, env = "BRANCHLINE_DEDUP_WINDOW", value_parser = duration)]
    dedup_window: Option<Duration>,
    /// How often retention runs [default: 1m].
    #[arg(long, env = "BRANCHLINE_RETENTION_INTERVAL", value_parser = duration)]
    retention_interval: Option<Duration>,
    /// Largest WebSocket frame, bytes [default: 1048576].
    #[arg(long, env = "BRANCHLINE_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Largest HTTP body, bytes [default: 4194304].
    #[arg(long, env = "BRANCHLINE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Most events per batch push [default: 1000].
    #[arg(long, env = "BRANCHLINE_MAX_BATCH_EVENTS")]
    max_batch_events: Option<usize>,
    /// Deadline for a new session's hello [default: 10s].
    #[arg(long, env = "BRANCHLINE_HELLO_TIMEOUT", value_parser = duration)]
    hello_timeout: Option<Duration>,
    /// WebSocket ping interval; three silent ones close a session [default: 15s].
    #[arg(long, env = "BRANCHLINE_HEARTBEAT", value_parser = duration)]
    heartbeat: Option<Duration>,
    /// Live sessions per device [default: 4].
    #[arg(long, env = "BRANCHLINE_MAX_SESSIONS_PER_DEVICE")]
    max_sessions_per_device: Option<usize>,
    /// Sustained publishes per second per session [default: 2000].
    #[arg(long, env = "BRANCHLINE_PUBLISH_RATE")]
    publish_rate: Option<u32>,
    /// Publish burst per session [default: 4000].
    #[arg(long, env = "BRANCHLINE_PUBLISH_BURST")]
    publish_burst: Option<u32>,
    /// Publishes awaiting their answer per session [default: 1024].
    #[arg(long, env = "BRANCHLINE_MAX_INFLIGHT_PUBLISHES")]
    max_inflight_publishes: Option<usize>,
    /// Events queued per session before catch-up [default: 4096].
    #[arg(long, env = "BRANCHLINE_SESSION_QUEUE_EVENTS")]
    session_queue_events: Option<usize>,
    /// Catch-up time before a session is closed as too slow [default: 30s].
    #[arg(long, env = "BRANCHLINE_TOO_SLOW_AFTER", value_parser = duration)]
    too_slow_after: Option<Duration>,
    /// Open connections [default: 16384].
    #[arg(long, env = "BRANCHLINE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// New connections per second [default: 2000].
    #[arg(long, env = "BRANCHLINE_CONNECTION_RATE")]
    connection_rate: Option<u32>,
    /// New connection burst [default: 4000].
    #[arg(long, env = "BRANCHLINE_CONNECTION_BURST")]
    connection_burst: Option<u32>,
    /// Most events per HTTP page [default: 5000].
    #[arg(long, env = "BRANCHLINE_MAX_EVENTS_PAGE")]
    max_events_page: Option<usize>,
    /// Longest long poll [default: 30s].
    #[arg(long, env = "BRANCHLINE_MAX_LONG_POLL", value_parser = duration)]
    max_long_poll: Option<Duration>,
    /// Most items per snapshot page [default: 10000].
    #[arg(long, env = "BRANCHLINE_MAX_SNAPSHOT_PAGE")]
    max_snapshot_page: Option<usize>,
    /// Life of a snapshot's page tokens [default: 10m].
    #[arg(long, env = "BRANCHLINE_SNAPSHOT_TTL", value_parser = duration)]
    snapshot_ttl: Option<Duration>,
    /// Events per replay read [default: 512].
    #[arg(long, env = "BRANCHLINE_REPLAY_CHUNK_EVENTS")]
    replay_chunk_events: Option<usize>,
    /// Conflict policy for product.upserted [default: merge].
    #[arg(long, env = "BRANCHLINE_POLICY_PRODUCT_UPSERTED", value_parser = policy)]
    policy_product_upserted: Option<ConflictPolicy>,
    /// Conflict policy for product.removed [default: server_wins].
    #[arg(long, env = "BRANCHLINE_POLICY_PRODUCT_REMOVED", value_parser = policy)]
    policy_product_removed: Option<ConflictPolicy>,
    /// Policy for fields both sides changed under merge [default: server_wins].
    #[arg(long, env = "BRANCHLINE_MERGE_FALLBACK", value_parser = policy)]
    merge_fallback: Option<ConflictPolicy>,
    /// How long shutdown waits for sessions and commits [default: 10s].
    #[arg(long, env = "BRANCHLINE_SHUTDOWN_GRACE", value_parser = duration)]
    shutdown_grace: Option<Duration>,
}

macro_rules! set {
    ($($arg:expr => $field:expr),* $(,)?) => {
        $(if let Some(v) = $arg { $field = v; })*
    };
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Config::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Config::default(),
        };
        let (l, r, p) = (&mut c.limits, &mut c.retention, &mut c.conflicts);
        set! {
            self.retention_max_events => r.max_events,
            self.retention_max_age => r.max_age,
            self.dedup_window => r.dedup_window,
            self.retention_interval => r.interval,
            self.max_frame_bytes => l.max_frame_bytes,
            self.max_body_bytes => l.max_body_bytes,
            self.max_batch_events => l.max_batch_events,
            self.hello_timeout => l.hello_timeout,
            self.heartbeat => l.heartbeat,
            self.max_sessions_per_device => l.max_sessions_per_device,
            self.publish_rate => l.publish_rate,
            self.publish_burst => l.publish_burst,
            self.max_inflight_publishes => l.max_inflight_publishes,
            self.session_queue_events => l.session_queue_events,
            self.too_slow_after => l.too_slow_after,
            self.max_connections => l.max_connections,
            self.connection_rate => l.connection_rate,
            self.connection_burst => l.connection_burst,
            self.max_events_page => l.max_events_page,
            self.max_long_poll => l.max_long_poll,
            self.max_snapshot_page => l.max_snapshot_page,
            self.snapshot_ttl => l.snapshot_ttl,
            self.replay_chunk_events => l.replay_chunk_events,
            self.policy_product_upserted => p.product_upserted,
            self.policy_product_removed => p.product_removed,
            self.merge_fallback => p.merge_fallback,
        }
        set! {
            self.listen => c.listen,
            self.data_dir.clone() => c.data_dir,
            self.store_cache_bytes => c.store_cache_bytes,
            self.fsync => c.fsync,
            self.min_free_space => c.min_free_space,
            self.shutdown_grace => c.shutdown_grace,
            self.token_leeway => c.token_leeway,
        }
        if self.token_secret.is_some() {
            c.token_secret.clone_from(&self.token_secret);
        }
        Ok(c)
    }
}

#[derive(Args)]
struct TokenArgs {
    /// Tenant.
    #[arg(long)]
    tenant: Name,
    /// Branch (repeat for several; `*` for every branch, admins only).
    #[arg(long = "branch", required = true)]
    branches: Vec<String>,
    /// Device.
    #[arg(long)]
    device: Name,
    /// `cashier` or `admin`.
    #[arg(long, value_parser = role)]
    role: Role,
    /// Validity, such as `12h` or `30days`.
    #[arg(long, default_value = "12h", value_parser = duration)]
    ttl: Duration,
    /// The hub's token secret.
    #[arg(long, env = "BRANCHLINE_TOKEN_SECRET", hide_env_values = true)]
    secret: String,
}

fn role(s: &str) -> Result<Role, String> {
    match s {
        "cashier" => Ok(Role::Cashier),
        "admin" => Ok(Role::Admin),
        _ => Err("cashier or admin".into()),
    }
}

#[derive(Subcommand)]
enum LogCommand {
    /// Per-branch epoch, head, floor, event count and size.
    Inspect {
        /// Store directory.
        #[arg(long = "data", default_value = "./data")]
        data_dir: PathBuf,
        /// Only this branch (`tenant/branch`).
        #[arg(long)]
        branch: Option<String>,
    },
    /// A branch's events as JSON lines.
    Dump {
        /// Store directory.
        #[arg(long = "data", default_value = "./data")]
        data_dir: PathBuf,
        /// The branch (`tenant/branch`).
        #[arg(long)]
        branch: String,
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most events to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Give branch logs a new random epoch, after restoring the store from a backup: devices
    /// resuming from the old epoch are told to resync. Stop the hub first.
    ResetEpoch {
        /// Store directory.
        #[arg(long = "data", default_value = "./data")]
        data_dir: PathBuf,
        /// The branch (`tenant/branch`).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        branch: Option<String>,
        /// Every branch of the store.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Token(args) => {
            let branches = if args.branches.iter().any(|b| b == "*") {
                TokenBranches::All
            } else {
                TokenBranches::List(
                    args.branches
                        .iter()
                        .map(|b| Name::new(b.as_str()))
                        .collect::<Result<_, _>>()?,
                )
            };
            if branches == TokenBranches::All && args.role == Role::Cashier {
                bail!("a cashier token must list its branches");
            }
            let claims = Claims::new(args.tenant, branches, args.device, args.role, args.ttl);
            println!("{}", TokenKeys::new(args.secret.as_bytes()).mint(&claims)?);
            Ok(())
        }
        Command::Log {
            command: LogCommand::Inspect { data_dir, branch },
        } => {
            let only = branch.as_deref().map(BranchKey::parse).transpose()?;
            inspect::inspect(&data_dir, only.as_ref(), &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Log {
            command:
                LogCommand::Dump {
                    data_dir,
                    branch,
                    after,
                    limit,
                },
        } => {
            let branch = BranchKey::parse(&branch)?;
            inspect::dump(
                &data_dir,
                &branch,
                after,
                limit,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            )?;
            Ok(())
        }
        Command::Log {
            command:
                LogCommand::ResetEpoch {
                    data_dir,
                    branch,
                    all: _,
                },
        } => {
            // clap requires exactly one of --branch and --all.
            let which = match branch {
                Some(branch) => inspect::Branches::One(BranchKey::parse(&branch)?),
                None => inspect::Branches::All,
            };
            let resets = inspect::reset_epoch(&data_dir, &which, &mut std::io::stdout().lock())?;
            if resets.is_empty() {
                println!("no branch logs in {}", data_dir.display());
            } else {
                println!(
                    "devices resuming from an old epoch will be told resync_required; start the hub"
                );
            }
            Ok(())
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let mut config = args.config()?;
    // Before anything opens: a bad setting is refused with its name, not met as a panic later.
    config.validate()?;
    if args.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    if args.dev && config.token_secret.is_none() {
        config.token_secret = Some(format!("{:032x}", rand::random::<u128>()));
    }
    let grace = config.shutdown_grace;
    // When the stop signal came: the whole shutdown, runtime included, fits in the grace.
    let stopping: Arc<OnceLock<Instant>> = Arc::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on({
        let stopping = stopping.clone();
        async move {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let addr = listener.local_addr()?;
            // "listening" is said once the hub can serve: the store open, the socket bound.
            let (data_dir, fsync) = (config.data_dir.clone(), config.fsync);
            if args.dev {
                print_dev_tokens(&config, addr)?;
            }
            let hub = tokio::task::spawn_blocking(move || Hub::open(config))
                .await
                .context("opening the store")??;
            println!(
                "branchline-hub listening on http://{addr} (store {}, fsync {fsync})",
                data_dir.display(),
            );
            let signalled = Arc::new(tokio::sync::Notify::new());
            let signal = {
                let (signalled, stopping) = (signalled.clone(), stopping.clone());
                async move {
                    shutdown_signal().await;
                    let _ = stopping.set(Instant::now());
                    signalled.notify_one();
                }
            };
            tokio::select! {
                served = branchline_hub::server::serve(hub, listener, signal) => served?,
                () = async {
                    signalled.notified().await;
                    tokio::time::sleep(grace).await;
                } => bail!(
                    "shutdown took longer than the grace of {}: exiting with sessions or commits \
                     unfinished",
                    humantime::format_duration(grace)
                ),
            }
            println!("branchline-hub stopped");
            Ok(())
        }
    });
    // Dropping the runtime would wait for every blocking task, however stuck (a committer join
    // that already timed out, say); give them only what is left of the grace.
    let left = stopping.get().map_or(grace, |at| {
        (*at + grace).saturating_duration_since(Instant::now())
    });
    runtime.shutdown_timeout(left);
    result
}

fn print_dev_tokens(config: &Config, addr: SocketAddr) -> anyhow::Result<()> {
    let secret = config.token_secret.as_deref().unwrap_or_default();
    let keys = TokenKeys::new(secret.as_bytes());
    let ttl = Duration::from_secs(24 * 3600);
    let cashier = Claims::new(
        Name::new("demo")?,
        TokenBranches::List(vec![Name::new("main")?]),
        Name::new("till-1")?,
        Role::Cashier,
        ttl,
    );
    let admin = Claims::new(
        Name::new("demo")?,
        TokenBranches::All,
        Name::new("admin-console")?,
        Role::Admin,
        ttl,
    );
    println!("dev mode: token secret {secret}");
    println!(
        "cashier token (tenant demo, branch main, device till-1, 24h):\n  {}",
        keys.mint(&cashier)?
    );
    println!(
        "admin token (tenant demo, every branch, device admin-console, 24h):\n  {}",
        keys.mint(&admin)?
    );
    println!("WebSocket: ws://{addr}/v1/ws   HTTP: http://{addr}/v1/");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}
