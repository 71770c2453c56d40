//! Test helpers: a real hub, a TCP fault proxy in front of it, tokens, waiting on conditions.

#![allow(dead_code)] // Each test crate uses a different part of the helpers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use branchline_client::protocol::http::{EventsPage, Problem, SnapshotPage};
use branchline_client::protocol::{
    Custom, Epoch, Event, EventBody, Name, Position, ProductRecord, Role, Sku, StockLevel,
};
use branchline_client::{Backoff, Client, ClientOptions, EventStream, Update};
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
/// The next `n` sequenced events of `events` (other updates skipped); each must come within
/// `limit`, else the test fails saying `what` did not happen.
pub async fn next_events(
    events: &mut EventStream,
    n: usize,
    limit: Duration,
    what: &str,
) -> Vec<Event> {
    use futures::StreamExt;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let update = tokio::time::timeout(limit, events.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no event within {limit:?}"))
            .unwrap_or_else(|| panic!("{what}: the event stream ended"));
        if let Update::Event(e) = update {
            got.push(*e);
        }
    }
    got
}

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

/// Connects, retrying while the store is still locked by a client that is going away
/// (its task or its last handle is being dropped), for at most `limit`.
pub async fn connect_when_unlocked(opts: ClientOptions, url: &str, limit: Duration) -> Client {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match opts.clone().connect(url).await {
            Ok(c) => return c,
            Err(branchline_client::Error::StoreLocked { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connecting: {e}"),
        }
    }
}

/// Every event of the branch, read from the hub over HTTP with an admin token.
pub async fn hub_events(hub: &TestHub, admin_token: &str) -> Vec<Event> {
    hub_events_of(hub, admin_token, BRANCH).await
}

/// The hub's own state of `branch`, from its HTTP snapshot: position, products, stock.
pub async fn hub_snapshot(
    hub: &TestHub,
    admin_token: &str,
    branch: &str,
) -> (Position, Vec<ProductRecord>, Vec<StockLevel>) {
    let http = reqwest::Client::new();
    let (mut products, mut stock) = (Vec::new(), Vec::new());
    let mut token: Option<String> = None;
    loop {
        let mut q = vec![("limit", "10000".to_string())];
        if let Some(t) = &token {
            q.push(("page_token", t.clone()));
        }
        let page: SnapshotPage = http
            .get(format!(
                "{}/v1/branches/{TENANT}/{branch}/snapshot",
                hub.http_url()
            ))
            .bearer_auth(admin_token)
            .query(&q)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for item in page.items {
            products.extend(item.product);
            stock.extend(item.stock);
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return (Position::new(page.epoch, page.at_seq), products, stock),
        }
    }
}

/// A sample of the hub's Prometheus metrics: the value of the line starting `series `.
pub async fn hub_metric(hub: &TestHub, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", hub.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Publishes `events` stock receipts of one unit each, one per SKU `SKU-0000`…, straight to
/// the hub over HTTP as device `seeder` (to give a branch a catalog of stock levels).
pub async fn seed_stock(hub: &TestHub, branch: &str, skus: usize) {
    let token = hub.token(TENANT, &[branch], "seeder", Role::Cashier);
    let http = reqwest::Client::new();
    let mut events = Vec::new();
    for i in 0..skus {
        events.push(serde_json::json!({
            "branch": branch,
            "event_id": uuid::Uuid::now_v7(),
            "device_seq": i + 1,
            "client_time_ms": 0,
            "kind": "stock.adjusted",
            "body": {"sku": sku_n(i).as_str(), "delta": 1, "reason": "receipt"},
        }));
    }
    for chunk in events.chunks(500) {
        let resp = http
            .post(format!(
                "{}/v1/branches/{TENANT}/{branch}/events",
                hub.http_url()
            ))
            .bearer_auth(&token)
            .json(&serde_json::json!({"client_time_ms": 0, "events": chunk}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "seeding: {}", resp.status());
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["type"] == "accepted"),
            "{body}"
        );
    }
}

/// The SKU `seed_stock` uses for item `i`.
pub fn sku_n(i: usize) -> Sku {
    Sku::new(format!("SKU-{i:04}")).unwrap()
}

/// Every event of `branch`, read from the hub over HTTP with an admin token.
pub async fn hub_events_of(hub: &TestHub, admin_token: &str, branch: &str) -> Vec<Event> {
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
                "{}/v1/branches/{TENANT}/{branch}/events",
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
    /// Hold WebSocket upgrade requests open without forwarding or answering them.
    stall_upgrades: AtomicBool,
    stalled_upgrades: AtomicU64,
    /// 0: off; else cut each WebSocket connection this many ms after it opened.
    hold_websockets_ms: AtomicU64,
    refuse_all: AtomicBool,
    /// Swallow everything the hub sends (its answers are lost; what the client sends
    /// still arrives).
    mute: AtomicBool,
    /// 0: off; else cut each connection after a random 0..n bytes from the hub.
    random_cut: AtomicU64,
    /// 0: off; else cut each connection after exactly n bytes from the hub.
    fixed_cut: AtomicU64,
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
            stall_upgrades: AtomicBool::new(false),
            stalled_upgrades: AtomicU64::new(0),
            hold_websockets_ms: AtomicU64::new(0),
            refuse_all: AtomicBool::new(false),
            mute: AtomicBool::new(false),
            random_cut: AtomicU64::new(0),
            fixed_cut: AtomicU64::new(0),
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

    /// Hold new WebSocket upgrade requests open, unanswered, until the next cut (a
    /// middlebox that swallows upgrades); plain HTTP passes.
    pub fn stall_upgrades(&self, on: bool) {
        self.state.stall_upgrades.store(on, Ordering::SeqCst);
    }

    /// Upgrade requests held by [`Proxy::stall_upgrades`] so far.
    pub fn stalled_upgrades(&self) -> u64 {
        self.state.stalled_upgrades.load(Ordering::SeqCst)
    }

    /// Cut each new WebSocket connection `after` it opened (a socket that connects but
    /// cannot be held); `None` turns it off. Plain HTTP passes.
    pub fn hold_websockets_for(&self, after: Option<Duration>) {
        let ms = after.map_or(0, |d| d.as_millis().max(1) as u64);
        self.state.hold_websockets_ms.store(ms, Ordering::SeqCst);
    }

    /// Swallow everything the hub sends, on open and new connections, while `on`.
    pub fn mute(&self, on: bool) {
        self.state.mute.store(on, Ordering::SeqCst);
    }

    /// Cut each new connection after exactly `bytes` bytes from the hub; 0 turns it off.
    pub fn fixed_cuts(&self, bytes: u64) {
        self.state.fixed_cut.store(bytes, Ordering::SeqCst);
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
    let upgrade = String::from_utf8_lossy(&first)
        .to_ascii_lowercase()
        .contains("upgrade: websocket");
    if upgrade && st.stall_upgrades.load(Ordering::SeqCst) {
        st.stalled_upgrades.fetch_add(1, Ordering::SeqCst);
        let _ = cuts.changed().await;
        return;
    }
    if upgrade && st.block_upgrades.load(Ordering::SeqCst) {
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
    let fixed = st.fixed_cut.load(Ordering::SeqCst);
    let mut budget = if fixed > 0 {
        fixed
    } else if max > 0 {
        rand::rng().random_range(0..max)
    } else {
        u64::MAX
    };
    let hold_ms = st.hold_websockets_ms.load(Ordering::SeqCst);
    let hold = async {
        if upgrade && hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        } else {
            std::future::pending::<()>().await;
        }
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
            if !st.mute.load(Ordering::SeqCst) && cw.write_all(&buf[..take]).await.is_err() {
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
        () = hold => false,
        _ = stalls.changed() => true,
    };
    if stalled {
        // Hold both sockets open, forwarding nothing, until a cut.
        let _ = cuts.changed().await;
    }
}
