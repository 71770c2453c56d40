//! The hub binary as a process, for the tests where the process is the point: `kill -9`,
//! signals, exit statuses and the CLI.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use branchline_hub::auth::{Claims, TokenBranches, TokenKeys};
use branchline_hub::protocol::Role;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{WAIT, name};

/// The `branchline-hub` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_branchline-hub");
/// The token secret the process tests give their hubs.
pub const SECRET: &str = "process-test-secret-0123456789abcdef";

/// A running `branchline-hub serve`.
pub struct HubProcess {
    child: Child,
    /// Where it listens (`host:port`).
    pub addr: String,
    /// What it printed before the line saying where it listens (dev tokens).
    pub banner: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: tokio::task::JoinHandle<()>,
}

impl HubProcess {
    /// Starts `serve` on an ephemeral port with the store `data` and `args` (the token
    /// secret among them, or `--dev`), and waits until it listens. Its output is read for its
    /// whole life, so it never blocks on a full pipe.
    pub async fn start(data: &Path, args: &[&str]) -> Self {
        Self::start_with_env(data, args, &[]).await
    }

    /// [`HubProcess::start`] with environment variables set for the process.
    pub async fn start_with_env(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        match Self::try_start(data, args, env).await {
            Ok(hub) => hub,
            Err((status, output)) => panic!("the hub exited before listening ({status}): {output}"),
        }
    }

    /// Starts the hub like [`HubProcess::start`]; if it exits instead of listening, returns
    /// its exit status and everything it printed.
    pub async fn try_start(
        data: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, (ExitStatus, String)> {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--log", "warn", "--data"])
            .arg(data)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the hub binary starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_done = {
            let (mut pipe, stderr) = (child.stderr.take().expect("piped"), stderr.clone());
            tokio::spawn(async move {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text).await;
                stderr
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_str(&text);
            })
        };
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut banner = Vec::new();
        let addr = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("branchline-hub listening on http://") {
                    return rest.split_whitespace().next().map(str::to_string);
                }
                banner.push(line);
            }
            None
        })
        .await
        .expect("the hub listens or exits in time");
        let Some(addr) = addr else {
            let status = tokio::time::timeout(WAIT, child.wait())
                .await
                .expect("a hub that stopped printing exits")
                .expect("its status");
            let _ = tokio::time::timeout(WAIT, stderr_done).await;
            let stderr = stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            return Err((status, format!("{}\n{stderr}", banner.join("\n"))));
        };
        // The rest of its stdout finds a reader (a hub whose stdout is closed fails when it
        // prints that it stopped).
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            addr,
            banner,
            stderr,
            stderr_done,
        })
    }

    /// `ws://…/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, branchline_hub::protocol::routes::WS)
    }

    /// `http://host:port`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A session of cashier `device` of branch b1, following nothing.
    pub async fn till(&self, device: &str) -> super::Ws {
        let mut ws =
            super::connect_url(&self.ws_url(), branchline_hub::protocol::Codec::MsgPack).await;
        ws.hello(&cashier_of("b1", device), "acme", device, vec![])
            .await;
        ws
    }

    /// Branch b1 of tenant `acme` as an admin sees it.
    pub async fn b1_status(&self) -> branchline_hub::protocol::http::BranchStatus {
        reqwest::Client::new()
            .get(format!("{}/v1/branches/acme/b1", self.http_url()))
            .bearer_auth(admin_of_all("console"))
            .send()
            .await
            .expect("the hub answers")
            .json()
            .await
            .expect("a branch status")
    }

    /// Every event of branch `branch` of tenant `acme`, read page by page (of `page` events)
    /// from the start as an admin; each page must be served.
    pub async fn events(&self, branch: &str, page: usize) -> Vec<branchline_hub::protocol::Event> {
        let client = reqwest::Client::new();
        let (mut events, mut after, mut epoch) = (Vec::new(), 0, None);
        loop {
            let epoch_q = epoch.map_or(String::new(), |e| format!("&epoch={e}"));
            let response = client
                .get(format!(
                    "{}/v1/branches/acme/{branch}/events?after={after}&limit={page}{epoch_q}",
                    self.http_url()
                ))
                .bearer_auth(admin_of_all("console"))
                .send()
                .await
                .expect("the hub answers");
            assert_eq!(response.status(), 200, "every page is served");
            let page: branchline_hub::protocol::http::EventsPage =
                response.json().await.expect("a page of events");
            epoch = Some(page.epoch);
            after = page.next_after;
            events.extend(page.events);
            if !page.has_more {
                return events;
            }
        }
    }

    /// SIGKILL: no shutdown, no final flush.
    pub async fn kill_9(mut self) {
        self.child.kill().await.expect("the hub can be killed");
    }

    /// Sends SIGTERM and waits (at most [`WAIT`]) for the process to end; returns its exit
    /// status and everything it wrote to stderr.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM to {pid}");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the hub ends within the wait after SIGTERM")
            .expect("its status");
        let _ = tokio::time::timeout(WAIT, &mut self.stderr_done).await;
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        (status, stderr)
    }
}

/// A token of tenant `acme` signed with [`SECRET`], valid for an hour.
pub fn mint(branches: TokenBranches, device: &str, role: Role) -> String {
    let claims = Claims::new(
        name("acme"),
        branches,
        name(device),
        role,
        Duration::from_secs(3_600),
    );
    TokenKeys::new(SECRET.as_bytes())
        .mint(&claims)
        .expect("a token")
}

/// A cashier token for `device` on `branch` of tenant `acme`.
pub fn cashier_of(branch: &str, device: &str) -> String {
    mint(
        TokenBranches::List(vec![name(branch)]),
        device,
        Role::Cashier,
    )
}

/// An admin token for every branch of tenant `acme`.
pub fn admin_of_all(device: &str) -> String {
    mint(TokenBranches::All, device, Role::Admin)
}
