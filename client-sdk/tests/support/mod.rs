//! Test helpers: a real hub, a TCP fault proxy in front of it, tokens, waiting on conditions.

#![allow(dead_code)] // Each test crate uses a different part of the helpers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use branchline_client::protocol::http::{EventsPage, Problem};
use branchline_client::protocol::{Custom, Epoch, Event, EventBody, Name, Role};
use branchline_client::{Backoff, ClientOptions};
use branchline_hub::test_util::TestHub;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const TENANT: &str = "acme";
pub const BRANCH: &str = "b1";

pub fn branch() -> Name {
    Name::new(BRANCH).unwrap()
}

/// Waits for `cond` to hold, polling every 20 ms, failing the test after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Client options for tests: a quick, small backoff so reconnects do not dominate the run.
pub fn opts(token: String, dir: &std::path::Path) -> ClientOptions {
    ClientOptions::new()
        .token(token)
        .store(dir)
        .backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(100),
        ))
        .connect_timeout(Duration::from_secs(3))
        .probe_interval(Duration::from_millis(300))
        .poll_interval(Duration::from_secs(1))
}

pub fn custom(n: u64) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: "test.n".into(),
        data: serde_json::json!({ "n": n }),
    })
}

/// Every event of the branch, read from the hub over HTTP with an admin token.
pub async fn hub_events(hub: &TestHub, admin_token: &str) -> Vec<Event> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    let mut after = 0;
    let mut epoch: Option<Epoch> = None;
    loop {
        let mut q = vec![("after", after.to_string()), ("limit", "5000".to_string())];
        if let Some(e) = epoch {
            q.push(("epoch", e.to_string()));
        }
        let resp = http
            .get(format!(
                "{}/v1/branches/{TENANT}/{BRANCH}/events",
                hub.http_url()
            ))
            .bearer_auth(admin_token)
            .query(&q)
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() == 409 {
            // Trimmed by retention: read what is still held, from the floor.
            let p: Problem = resp.json().await.unwrap();
            let r = p.resync.unwrap();
            epoch = Some(r.epoch);
            after = r.floor;
            continue;
        }
        let page: EventsPage = resp.json().await.unwrap();
        epoch = Some(page.epoch);
        let done = page.events.is_empty();
        after = page.next_after;
        out.extend(page.events);
        if done {
            return out;
        }
    }
}

pub fn admin_token(hub: &TestHub) -> String {
    hub.token(TENANT, &["*"], "admin-1", Role::Admin)
}

/// A TCP proxy in front of the hub that can cut, block WebSocket upgrades, or cut each
/// connection after a random number of bytes from the hub (so an answer can be lost after
/// the hub made it durable).
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    target: std::sync::Mutex<SocketAddr>,
    block_upgrades: AtomicBool,
    refuse_all: AtomicBool,
    /// 0: off; else cut each connection after a random 0..n bytes from the hub.
    random_cut: AtomicU64,
    cuts: watch::Sender<u64>,
    stalls: watch::Sender<u64>,
    connections: AtomicU64,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cuts, _) = watch::channel(0);
        let (stalls, _) = watch::channel(0);
        let state = Arc::new(ProxyState {
            target: std::sync::Mutex::new(target),
            block_upgrades: AtomicBool::new(false),
            refuse_all: AtomicBool::new(false),
            random_cut: AtomicU64::new(0),
            cuts,
            stalls,
            connections: AtomicU64::new(0),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(handle(conn, Arc::clone(&st)));
            }
        });
        Self { addr, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Points the proxy at another hub address (after a hub restart).
    pub fn retarget(&self, target: SocketAddr) {
        *self.state.target.lock().unwrap() = target;
    }

    /// Drops every open connection now.
    pub fn cut_all(&self) {
        self.state.cuts.send_modify(|g| *g += 1);
    }

    /// Open connections stop forwarding in both directions but stay open, like a NAT that
    /// silently forgot them; new connections work.
    pub fn stall_all(&self) {
        self.state.stalls.send_modify(|g| *g += 1);
    }

    /// Refuse (close) connections that ask for a WebSocket upgrade; plain HTTP passes.
    pub fn block_upgrades(&self, on: bool) {
        self.state.block_upgrades.store(on, Ordering::SeqCst);
        if on {
            self.cut_all();
        }
    }

    /// Close every new connection at once (the hub looks down).
    pub fn refuse_all(&self, on: bool) {
        self.state.refuse_all.store(on, Ordering::SeqCst);
        if on {
            self.cut_all();
        }
    }

    /// Cut each connection after a random number (below `max_bytes`) of bytes from the hub;
    /// 0 turns it off.
    pub fn random_cuts(&self, max_bytes: u64) {
        self.state.random_cut.store(max_bytes, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }
}

async fn handle(mut client: TcpStream, st: Arc<ProxyState>) {
    st.connections.fetch_add(1, Ordering::SeqCst);
    if st.refuse_all.load(Ordering::SeqCst) {
        return;
    }
    let mut cuts = st.cuts.subscribe();
    let mut stalls = st.stalls.subscribe();
    let mut first = vec![0u8; 16 * 1024];
    let n = match client.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    first.truncate(n);
    if st.block_upgrades.load(Ordering::SeqCst)
        && String::from_utf8_lossy(&first)
            .to_ascii_lowercase()
            .contains("upgrade: websocket")
    {
        let _ = client
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return;
    }
    let target = *st.target.lock().unwrap();
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let max = st.random_cut.load(Ordering::SeqCst);
    let mut budget = if max == 0 {
        u64::MAX
    } else {
        rand::rng().random_range(0..max)
    };
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let up = tokio::io::copy(&mut cr, &mut uw);
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let take = (n as u64).min(budget) as usize;
            if cw.write_all(&buf[..take]).await.is_err() {
                return;
            }
            budget -= take as u64;
            if budget == 0 {
                return;
            }
        }
    };
    let stalled = tokio::select! {
        _ = up => false,
        () = down => false,
        _ = cuts.changed() => false,
        _ = stalls.changed() => true,
    };
    if stalled {
        // Hold both sockets open, forwarding nothing, until a cut.
        let _ = cuts.changed().await;
    }
}
