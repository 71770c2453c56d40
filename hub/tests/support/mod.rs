//! What the hub's integration tests share: a small WebSocket client speaking the protocol,
//! HTTP helpers, and event builders. Every test runs a real hub on 127.0.0.1:0.

#![allow(dead_code)] // each test crate uses part of this module

use std::time::Duration;

use branchline_hub::protocol::http::{PushRequest, PushResponse};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub mod fleet;
pub mod process;

/// How long a test waits for any one thing before failing.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

/// A sale of `qty` of `sku`.
pub fn sale_of(sku_name: &str, qty: i64) -> EventBody {
    EventBody::SaleRecorded(SaleRecorded {
        sale_id: format!("R-{}", Uuid::now_v7()),
        lines: vec![SaleLine {
            sku: sku(sku_name),
            qty,
            unit_price: 250,
            discount: 0,
        }],
        total: 250 * qty,
        tax: 0,
        currency: "EUR".into(),
        payments: vec![Payment {
            method: PaymentMethod::Cash,
            amount: 250 * qty,
        }],
    })
}

/// A `custom` event carrying `n`, to tell events apart.
pub fn note(n: u64) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: "test.note".into(),
        data: serde_json::json!({ "n": n }),
    })
}

/// A publish with a fresh event id.
pub fn publish(branch: &str, device_seq: u64, body: EventBody) -> Publish {
    Publish {
        branch: name(branch),
        event_id: Uuid::now_v7(),
        device_seq,
        client_time_ms: now_ms(),
        base_seq: None,
        base_version: None,
        body,
    }
}

/// What a test reads from a socket.
#[derive(Debug)]
pub enum Incoming {
    Frame(ServerFrame),
    Closed(Option<CloseFrame>),
}

pub struct Ws {
    inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub codec: Codec,
    /// Event frames read while waiting for a publish's answer (the hub may send a session's
    /// own event before or after its `accepted`), kept for `events_through`.
    stash: Vec<ServerFrame>,
}

/// Opens a WebSocket speaking `codec`.
pub async fn connect(hub: &TestHub, codec: Codec) -> Ws {
    connect_url(&hub.ws_url(), codec).await
}

/// Connects and says hello as `device` of tenant `acme` with a token for `branches`.
pub async fn session(
    hub: &TestHub,
    codec: Codec,
    branches: &[&str],
    device: &str,
    role: Role,
    subscriptions: Vec<Subscription>,
) -> Ws {
    let mut ws = connect(hub, codec).await;
    ws.hello(
        &hub.token("acme", branches, device, role),
        "acme",
        device,
        subscriptions,
    )
    .await;
    ws
}

pub async fn connect_url(url: &str, codec: Codec) -> Ws {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        codec.subprotocol().parse().unwrap(),
    );
    let (inner, response) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some(codec.subprotocol())
    );
    Ws {
        inner,
        codec,
        stash: Vec::new(),
    }
}

impl Ws {
    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = self.codec.encode(frame).unwrap();
        self.send_raw(self.message(bytes)).await;
    }

    pub fn message(&self, bytes: bytes::Bytes) -> Message {
        if self.codec.is_binary() {
            Message::Binary(bytes)
        } else {
            Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into())
        }
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.inner.send(msg).await.unwrap();
    }

    /// The next frame or close; fails the test after [`WAIT`].
    pub async fn next(&mut self) -> Incoming {
        loop {
            let msg = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("a frame in time");
            let bytes = match msg {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Text(t))) => bytes::Bytes::copy_from_slice(t.as_bytes()),
                Some(Ok(Message::Close(frame))) => return Incoming::Closed(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Incoming::Closed(None),
            };
            return Incoming::Frame(self.codec.decode_server_frame(&bytes).unwrap());
        }
    }

    /// The next frame; fails the test if the session closes.
    pub async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Incoming::Frame(f) => f,
            Incoming::Closed(c) => panic!("session closed: {c:?}"),
        }
    }

    /// Reads frames until `pick` returns something.
    pub async fn until<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        loop {
            let frame = self.frame().await;
            if let Some(out) = pick(&frame) {
                return out;
            }
        }
    }

    /// Sends a hello and returns the welcome.
    pub async fn hello(
        &mut self,
        token: &str,
        tenant: &str,
        device: &str,
        subscriptions: Vec<Subscription>,
    ) -> Welcome {
        self.send(&ClientFrame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            token: token.into(),
            tenant: name(tenant),
            device: name(device),
            client_time_ms: now_ms(),
            subscriptions,
            agent: Some("hub-tests".into()),
        }))
        .await;
        match self.frame().await {
            ServerFrame::Welcome(w) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Reads until the session closes; returns the last error frame and the close code.
    pub async fn closed(&mut self) -> (Option<ErrorFrame>, Option<u16>) {
        let mut error = None;
        loop {
            match self.next().await {
                Incoming::Frame(ServerFrame::Error(e)) => error = Some(e),
                Incoming::Frame(_) => {}
                Incoming::Closed(frame) => return (error, frame.map(|f| u16::from(f.code))),
            }
        }
    }

    /// Collects the events of `branch` until one with seq ≥ `through` arrived.
    pub async fn events_through(&mut self, branch: &str, through: u64) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        let mut stashed = std::mem::take(&mut self.stash).into_iter();
        while out.last().is_none_or(|e| e.seq < through) {
            let frame = match stashed.next() {
                Some(frame) => frame,
                None => self.frame().await,
            };
            match frame {
                ServerFrame::Event(e) if e.branch.as_str() == branch => out.push(*e),
                ServerFrame::Events(b) if b.branch.as_str() == branch => out.extend(b.events),
                _ => {}
            }
        }
        // Stashed frames not needed yet stay, ahead of anything read later.
        let rest: Vec<ServerFrame> = stashed.collect();
        self.stash.splice(0..0, rest);
        out
    }

    /// Publishes and waits for the answer. Event frames that arrive meanwhile are kept for
    /// [`Ws::events_through`]; other frames are skipped.
    pub async fn publish(&mut self, p: Publish) -> Result<Accepted, Rejected> {
        let id = p.event_id;
        self.send(&ClientFrame::Publish(p)).await;
        loop {
            match self.frame().await {
                ServerFrame::Accepted(a) if a.event_id == id => return Ok(a),
                ServerFrame::Rejected(r) if r.event_id == Some(id) => return Err(r),
                frame @ (ServerFrame::Event(_) | ServerFrame::Events(_)) => self.stash.push(frame),
                _ => {}
            }
        }
    }

    /// Publishes everything pipelined while reading the answers concurrently (a client that
    /// stops reading stalls its own session); returns the answers in order.
    pub async fn publish_all(self, publishes: Vec<Publish>) -> Vec<Result<Accepted, Rejected>> {
        let codec = self.codec;
        let (mut sink, mut stream) = self.inner.split();
        let n = publishes.len();
        let reader = tokio::spawn(async move {
            let mut answers = Vec::with_capacity(n);
            while answers.len() < n {
                let msg = tokio::time::timeout(WAIT * 4, stream.next())
                    .await
                    .expect("answers in time");
                let bytes = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => bytes::Bytes::copy_from_slice(t.as_bytes()),
                    Some(Ok(_)) => continue,
                    other => panic!("session ended before all answers: {other:?}"),
                };
                match codec.decode_server_frame(&bytes).unwrap() {
                    ServerFrame::Accepted(a) => answers.push(Ok(a)),
                    ServerFrame::Rejected(r) => answers.push(Err(r)),
                    _ => {}
                }
            }
            answers
        });
        for p in publishes {
            let bytes = codec.encode(&ClientFrame::Publish(p)).unwrap();
            let msg = if codec.is_binary() {
                Message::Binary(bytes)
            } else {
                Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into())
            };
            sink.feed(msg).await.unwrap();
        }
        sink.flush().await.unwrap();
        reader.await.unwrap()
    }

    pub async fn close(mut self) {
        let _ = self.inner.close(None).await;
    }
}

/// Asserts `events` are `from..=to` in order, once each.
pub fn assert_contiguous(events: &[Event], from: u64, to: u64) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (from..=to).collect();
    assert_eq!(seqs, expected, "events must be exactly {from}..={to}");
}

/// An HTTP client with a bearer token.
pub struct Api {
    pub base: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(hub: &TestHub, token: &str) -> Self {
        Self {
            base: hub.http_url(),
            token: token.into(),
            client: reqwest::Client::new(),
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// GETs `path` and decodes the JSON answer, which must be 200.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let resp = self.get(path).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {path} answered {}", resp.status());
        resp.json().await.unwrap()
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    pub async fn push(&self, tenant: &str, branch: &str, events: Vec<Publish>) -> PushResponse {
        let resp = self
            .post(&format!("/v1/branches/{tenant}/{branch}/events"))
            .json(&PushRequest {
                client_time_ms: now_ms(),
                events,
            })
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "push answered {}", resp.status());
        resp.json().await.unwrap()
    }
}

/// The value of the hub's Prometheus metric `name` (a counter or gauge without labels).
pub async fn metric(hub: &TestHub, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", hub.http_url()))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `probe` until it answers `Ok`, and returns that; fails the test after [`WAIT`],
/// saying `what` it waited for and the last `Err` it saw. Every test that waits on a condition
/// waits through this (never a bare sleep).
pub async fn eventually<T, E: std::fmt::Debug, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match probe().await {
            Ok(done) => return done,
            Err(last) => last,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}; last seen: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the hub's metric `name` satisfies `ok`.
pub async fn wait_for_metric(hub: &TestHub, name: &str, ok: impl Fn(f64) -> bool) {
    eventually(&format!("{name} is as expected"), || async {
        let value = metric(hub, name).await;
        if value.is_some_and(&ok) {
            Ok(())
        } else {
            Err(value)
        }
    })
    .await;
}
