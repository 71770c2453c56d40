//! The hub under test: a running one given by `--url`, or one the harness spawns itself
//! (`--spawn-hub`) on an ephemeral port with a temporary store and its own token secret.
//! Either way the [`Target`] mints tokens for it, as the hub itself does (PROTOCOL.md §3): an
//! HS256 JWT over the protocol crate's [`Claims`], signed with the hub's secret. The harness
//! signs them itself rather than through the hub crate, so that it speaks to the hub only
//! through the protocol and never links the server it measures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use branchline_protocol::{Claims, Name, Role, TokenBranches};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::connect::Endpoint;

/// How long tokens minted by the harness stay valid.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a spawned hub may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a spawned hub may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The hub under test.
pub struct Target {
    /// Where it listens.
    pub endpoint: Endpoint,
    /// The tenant of every token.
    pub tenant: Name,
    /// Its process, if it runs on this machine and is known.
    pub pid: Option<u32>,
    /// The process the harness started, if it did.
    pub spawned: Option<SpawnedHub>,
    /// The hub's token secret, as a signing key.
    key: EncodingKey,
}

impl Target {
    /// A hub already running at `url`.
    pub async fn remote(
        url: &str,
        secret: &str,
        tenant: Name,
        pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::parse(url).await?;
        Ok(Self {
            endpoint,
            tenant,
            pid,
            spawned: None,
            key: EncodingKey::from_secret(secret.as_bytes()),
        })
    }

    /// Spawns `bin` with `extra` flags.
    pub async fn spawn(bin: &Path, extra: &[String], tenant: Name) -> anyhow::Result<Self> {
        let secret = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        let (hub, addr) = SpawnedHub::start(bin, &secret, extra).await?;
        Ok(Self {
            endpoint: Endpoint::local(addr),
            tenant,
            pid: Some(hub.pid),
            spawned: Some(hub),
            key: EncodingKey::from_secret(secret.as_bytes()),
        })
    }

    /// A token for `device` with `role` on `branches` (`None`: every branch, admins only).
    pub fn token(
        &self,
        device: &Name,
        branches: Option<&[Name]>,
        role: Role,
    ) -> anyhow::Result<String> {
        let branches = match branches {
            Some(list) => TokenBranches::List(list.to_vec()),
            None => TokenBranches::All,
        };
        let claims = Claims::new(
            self.tenant.clone(),
            branches,
            device.clone(),
            role,
            TOKEN_TTL,
        );
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .context("signing a token")
    }

    /// What the report says about the hub.
    pub fn describe(&self) -> String {
        match &self.spawned {
            Some(h) => format!("spawned {} on {}", h.bin.display(), self.endpoint.addr),
            None => self.endpoint.ws_url.clone(),
        }
    }
}

/// Finds the hub binary: `explicit` (`--hub-bin` / `BRANCHLINE_HUB_BIN`), else
/// `branchline-hub` next to this executable (the same target directory; test binaries live one
/// level deeper, in `deps/`).
pub fn find_hub_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("hub binary {} does not exist", path.display());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let name = format!("branchline-hub{}", std::env::consts::EXE_SUFFIX);
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    bail!(
        "no {name} next to {}; build it (cargo build --release -p branchline-hub) or pass \
         --hub-bin",
        exe.display()
    )
}

/// A hub process the harness started.
pub struct SpawnedHub {
    child: Child,
    /// Its process id.
    pub pid: u32,
    bin: PathBuf,
    log: PathBuf,
    /// Holds the store and the log; removed when the hub is dropped.
    _dir: tempfile::TempDir,
}

impl SpawnedHub {
    /// Starts `bin serve` on an ephemeral loopback port with a temporary store, token secret
    /// `secret` and the `extra` flags, and waits until it listens; returns it and its address.
    pub async fn start(
        bin: &Path,
        secret: &str,
        extra: &[String],
    ) -> anyhow::Result<(Self, SocketAddr)> {
        let dir = tempfile::Builder::new()
            .prefix("branchline-load-")
            .tempdir()
            .context("creating the hub's temporary directory")?;
        let log = dir.path().join("hub.log");
        let log_file = std::fs::File::create(&log).context("creating the hub log")?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(extra)
            .env("BRANCHLINE_TOKEN_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the hub exited at once")?;
        let stdout = child.stdout.take().context("the hub's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = listening_addr(&line) {
                    return Ok(Some(addr));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let mut hub = Self {
            child,
            pid,
            bin: bin.to_owned(),
            log,
            _dir: dir,
        };
        let addr = match addr {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = hub.child.wait().await.ok();
                bail!(
                    "the hub exited ({}) before listening:\n{}",
                    status.map_or("unknown status".into(), |s| s.to_string()),
                    hub.log_tail()
                );
            }
            Err(_) => bail!(
                "the hub did not listen within {START_TIMEOUT:?}:\n{}",
                hub.log_tail()
            ),
        };
        // Keep reading stdout so the hub never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((hub, addr))
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        lines[from..].join("\n")
    }

    /// Stops it with SIGTERM (a graceful shutdown), killing it if it does not exit in time.
    /// An error if it had already exited or did not exit cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "the hub exited during the run ({status}):\n{}",
                self.log_tail()
            );
        }
        // `kill` keeps this crate free of unsafe signal calls.
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if !sent {
            self.child.start_kill()?;
        }
        let stopped = tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await;
        match stopped {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!(
                "the hub exited with {status} after SIGTERM:\n{}",
                self.log_tail()
            ),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                self.child.start_kill()?;
                let _ = self.child.wait().await;
                bail!("the hub did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed it")
            }
        }
    }
}

/// The address in `branchline-hub listening on http://ADDR (…)`.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on http://").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_port() {
        assert_eq!(
            listening_addr(
                "branchline-hub listening on http://127.0.0.1:43117 (store /tmp/x, fsync always)"
            ),
            Some("127.0.0.1:43117".parse().unwrap())
        );
        assert_eq!(listening_addr("dev mode: token secret abc"), None);
    }

    #[test]
    fn a_missing_explicit_hub_binary_is_an_error() {
        assert!(find_hub_bin(Some(Path::new("/nonexistent/branchline-hub"))).is_err());
    }

    #[tokio::test]
    async fn tokens_are_hs256_jwts_of_the_protocol_claims_signed_with_the_secret() {
        use jsonwebtoken::{DecodingKey, Validation};

        let secret = "0123456789abcdef0123456789abcdef";
        let name = |s: &str| Name::new(s).unwrap();
        let target = Target::remote("127.0.0.1:9", secret, name("acme"), None)
            .await
            .unwrap();
        let token = target
            .token(&name("till-1"), Some(&[name("b1")]), Role::Cashier)
            .unwrap();
        // Checked as the hub checks them: HS256 with its secret, an expiry required.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        let decode = |secret: &str| {
            let key = DecodingKey::from_secret(secret.as_bytes());
            jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
        };
        let data = decode(secret).unwrap();
        assert_eq!(data.header, Header::new(Algorithm::HS256));
        let mut fields: Vec<&str> = data
            .claims
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["branches", "device", "exp", "iat", "role", "tenant"]
        );
        let claims = Claims::read_unverified(&token).unwrap();
        assert_eq!(
            (claims.tenant, claims.branches, claims.device, claims.role),
            (
                name("acme"),
                TokenBranches::List(vec![name("b1")]),
                name("till-1"),
                Role::Cashier
            )
        );
        assert_eq!(claims.exp - claims.iat, TOKEN_TTL.as_secs());
        assert!(decode("another secret").is_err());

        let admin = target.token(&name("console"), None, Role::Admin).unwrap();
        let claims = Claims::read_unverified(&admin).unwrap();
        assert_eq!(
            (claims.branches, claims.role),
            (TokenBranches::All, Role::Admin)
        );
    }
}
