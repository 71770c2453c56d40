//! Short, small runs of the `branchline-load` binary against a real hub, through its real flags
//! and JSON report: the scenarios run end to end, streams come out whole, and the numbers are in
//! a sane range. And against a fake hub that breaks a stream, the harness must fail: a gap or a
//! duplicate is never a footnote.
//!
//! The real hub is the `branchline-hub` binary of this build, started as a process as
//! `--spawn-hub` starts it: the harness depends on the hub only through the protocol, so
//! these tests do too. `cargo test --workspace` builds that binary; to run these tests alone,
//! build it first (`cargo build -p branchline-hub`).
//!
//! These are functional checks with loose bounds, never timed benchmarks (`make bench` is).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::process::Output;
use std::time::Duration;

use branchline_load::Report;
use branchline_load::hub::{SpawnedHub, find_hub_bin};
use branchline_load::report::REQUIRED_FIELDS;
use branchline_load::stats::Percentiles;
use branchline_protocol::{
    Accepted, BranchStart, CaughtUp, ClientFrame, Codec, Custom, Epoch, Event, EventBody, Hello,
    Name, Publish, Role, ServerFrame, StartMode, Welcome, routes,
};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use uuid::Uuid;

/// The token secret of the test hubs.
const SECRET: &str = "branchline-load-test-secret-0123456789abcdef";

/// A real hub on an ephemeral port with a temporary store, and its WebSocket URL.
async fn real_hub() -> (SpawnedHub, String) {
    let bin = find_hub_bin(None)
        .unwrap_or_else(|e| panic!("{e:#}\n(for these tests: cargo build -p branchline-hub)"));
    // A small store cache: the smoke runs are small, and several hubs run at once.
    let cache = ["--store-cache-bytes".to_owned(), (16 << 20).to_string()];
    let (hub, addr) = SpawnedHub::start(&bin, SECRET, &cache)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    (hub, format!("ws://{addr}{}", routes::WS))
}

/// Runs the harness with `args` against `url` and returns its output, its report and the
/// report's raw JSON.
async fn harness(url: &str, args: &[&str]) -> (Output, Report, Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_branchline-load"))
        .args(["--url", url, "--token-secret", SECRET, "--threads", "2"])
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let json: Value = std::fs::read_to_string(&report)
        .map_err(anyhow::Error::from)
        .and_then(|text| Ok(serde_json::from_str(&text)?))
        .unwrap_or_else(|e| panic!("no report ({e:#})\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    let report = Report::read(&report).unwrap();
    (output, report, json)
}

/// Every required field is present; those in `nulls` (not measured by the run) are null and
/// every other one holds a measurement.
fn assert_fields(json: &Value, nulls: &[&str]) {
    for field in REQUIRED_FIELDS {
        let v = json
            .get(field)
            .unwrap_or_else(|| panic!("{field} missing from the report"));
        if nulls.contains(&field) {
            assert!(v.is_null(), "{field} is not measured here, so null: {v}");
            continue;
        }
        match field {
            "scenario" => assert!(v.is_string(), "{field}: {v}"),
            "latency_ms" | "ack_latency_ms" => {
                for p in ["p50", "p90", "p99", "p999", "max"] {
                    assert!(v[p].is_number(), "{field}.{p}: {v}");
                }
            }
            _ => assert!(v.is_number(), "{field}: {v}"),
        }
    }
}

/// Percentiles that read in order, with a bound no healthy run on this machine comes near
/// (the smoke loads are light; seconds would mean a stalled hub or harness).
fn assert_sane(p: &Percentiles, bound_ms: f64) {
    assert!(
        p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max,
        "percentiles out of order: {p:?}"
    );
    assert!(p.max < bound_ms, "max above {bound_ms} ms: {p:?}");
}

fn assert_whole(output: &Output, r: &Report) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && r.passed,
        "the run failed ({:?}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        (r.gaps, r.duplicates, r.errors, r.incomplete_streams),
        (0, 0, 0, 0),
        "{stdout}"
    );
    assert!(stdout.contains("PASS"), "the table says so too:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_event_to_every_follower() {
    let (hub, url) = real_hub().await;
    let (output, r, json) = harness(
        &url,
        &[
            "--scenario",
            "fanout",
            "--branches",
            "2",
            "--subscribers",
            "20",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
        ],
    )
    .await;
    assert_whole(&output, &r);
    assert_eq!(
        r.connections, 22,
        "20 followers and one publisher per branch opened"
    );
    // 2 branches × 200 events/s × 10 followers each = 4,000 deliveries/s.
    let deliveries_per_s = r.deliveries_per_s.unwrap();
    assert!(
        (2_000.0..6_000.0).contains(&deliveries_per_s),
        "deliveries/s {deliveries_per_s}"
    );
    let acks_per_s = r.publishes_acked_per_s.unwrap();
    assert!((200.0..600.0).contains(&acks_per_s), "acks/s {acks_per_s}");
    let latency = r.latency_ms.unwrap();
    let ack = r.ack_latency_ms.unwrap();
    // Every event meant to be published in the window reached each of its branch's 10
    // followers (the drain saw to that), with one sample per delivery: the latency samples
    // are exactly ten per acknowledged publish of the window, late arrivals included.
    assert_eq!(latency.count, 10 * ack.count, "{latency:?} {ack:?}");
    // By send time or by arrival, the window holds about the same deliveries: they differ
    // only by the events in flight at its two edges.
    let deliveries = r.deliveries as f64;
    assert!(
        (latency.count as f64 - deliveries).abs() <= 0.25 * deliveries,
        "{} samples for {} deliveries",
        latency.count,
        r.deliveries
    );
    assert!(latency.p99 < 1_000.0, "{latency:?}");
    assert_sane(&latency, 5_000.0);
    assert_sane(&ack, 5_000.0);
    assert!(r.harness_cpu_percent.is_some());
    // A hub named by --url without --hub-pid has no pid to read, so no hub RSS or CPU.
    assert_fields(
        &json,
        &[
            "hub_rss_bytes",
            "hub_rss_per_connection_bytes",
            "hub_cpu_percent",
            "catchup_events_per_s",
            "storm_catchup_s",
        ],
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_resumes_every_follower_without_gaps() {
    let (hub, url) = real_hub().await;
    let (output, r, json) = harness(
        &url,
        &[
            "--scenario",
            "reconnect-storm",
            "--branches",
            "2",
            "--subscribers",
            "20",
            "--behind",
            "50",
            "--rate",
            "20",
            "--jitter",
            "200ms",
            "--warmup",
            "500ms",
            "--duration",
            "20s",
        ],
    )
    .await;
    assert_whole(&output, &r);
    assert_eq!(
        r.connections, 22,
        "20 followers and one publisher per branch"
    );
    let storm = r.storm.clone().unwrap();
    assert_eq!((storm.followers, storm.reconnected), (20, 20));
    assert!(storm.min_behind.unwrap() >= 50, "{storm:?}");
    let secs = r.storm_catchup_s.unwrap();
    assert!(secs > 0.0 && secs < 10.0, "storm took {secs} s");
    // Each follower replayed at least the 50 pushed while it was away.
    assert!(r.deliveries >= 20 * 50, "deliveries {}", r.deliveries);
    assert_fields(
        &json,
        &[
            "latency_ms",
            "ack_latency_ms",
            "hub_rss_bytes",
            "hub_rss_per_connection_bytes",
            "hub_cpu_percent",
            "catchup_events_per_s",
        ],
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_replays_exactly_the_missed_events() {
    let (hub, url) = real_hub().await;
    let (output, r, json) = harness(
        &url,
        &[
            "--scenario",
            "catchup",
            "--behind",
            "3000",
            "--duration",
            "20s",
        ],
    )
    .await;
    assert_whole(&output, &r);
    assert_eq!(r.deliveries, 3_000);
    assert_eq!(r.connections, 1);
    assert!(r.catchup_events_per_s.unwrap() > 0.0);
    assert_fields(
        &json,
        &[
            "publishes_acked_per_s",
            "latency_ms",
            "ack_latency_ms",
            "hub_rss_bytes",
            "hub_rss_per_connection_bytes",
            "hub_cpu_percent",
            "storm_catchup_s",
        ],
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_acks_match_the_durable_heads() {
    let (hub, url) = real_hub().await;
    let (output, r, json) = harness(
        &url,
        &[
            "--scenario",
            "publish",
            "--branches",
            "2",
            "--publishers",
            "2",
            "--inflight",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ],
    )
    .await;
    assert_whole(&output, &r);
    assert!(r.publishes_acked > 0);
    assert_eq!(r.connections, 4, "2 publishers on each of 2 branches");
    let ack = r.ack_latency_ms.unwrap();
    // Closed loop: at most 4 × 4 publishes are unanswered at any moment, so counting acks by
    // send time instead of arrival moves at most that many across either edge of the window.
    assert!(
        ack.count.abs_diff(r.publishes_acked) <= 16,
        "{} samples for {} acks",
        ack.count,
        r.publishes_acked
    );
    assert_sane(&ack, 5_000.0);
    assert_fields(
        &json,
        &[
            "deliveries_per_s",
            "latency_ms",
            "hub_rss_bytes",
            "hub_rss_per_connection_bytes",
            "hub_cpu_percent",
            "catchup_events_per_s",
            "storm_catchup_s",
        ],
    );
    hub.stop().await.unwrap();
}

type FakeWs = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The epoch of every fake hub's branches.
const FAKE_EPOCH: Epoch = Epoch(0x5eed);

fn encoded(frame: &ServerFrame) -> Message {
    Message::Binary(Codec::MsgPack.encode(frame).unwrap())
}

/// Listens on an ephemeral port and runs `session` for every connection; returns the URL.
async fn fake_hub<F, Fut>(session: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(session(stream));
        }
    });
    format!("ws://{addr}{}", routes::WS)
}

/// Accepts the upgrade, reads `hello` and answers `welcome`, every subscription live at head
/// 0. `None` for a peer that is not a WebSocket session (the harness's `/metrics` scrape).
// tungstenite's handshake callback type returns its large `ErrorResponse`; not ours to shrink.
#[allow(clippy::result_large_err)]
async fn fake_welcome(stream: TcpStream) -> Option<(FakeWs, Hello)> {
    let select_msgpack = |_: &Request, mut response: Response| {
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            branchline_protocol::SUBPROTOCOL_MSGPACK.parse().unwrap(),
        );
        Ok(response)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, select_msgpack)
        .await
        .ok()?;
    let Some(Ok(Message::Binary(bytes))) = ws.next().await else {
        return None;
    };
    let ClientFrame::Hello(hello) = Codec::MsgPack.decode_client_frame(&bytes).unwrap() else {
        panic!("the harness must say hello first");
    };
    let branches = hello
        .subscriptions
        .iter()
        .map(|s| BranchStart {
            branch: s.branch.clone(),
            epoch: FAKE_EPOCH,
            head: 0,
            floor: 0,
            mode: StartMode::Live,
            last_device_seq: 0,
        })
        .collect();
    let welcome = ServerFrame::Welcome(Welcome {
        protocol: 1,
        session_id: Uuid::now_v7(),
        server_time_ms: 0,
        heartbeat_ms: 15_000,
        max_frame_bytes: 1 << 20,
        role: Role::Cashier,
        branches,
    });
    ws.send(encoded(&welcome)).await.ok()?;
    if let Some(sub) = hello.subscriptions.first() {
        let caught_up = ServerFrame::CaughtUp(CaughtUp {
            branch: sub.branch.clone(),
            epoch: FAKE_EPOCH,
            seq: 0,
        });
        ws.send(encoded(&caught_up)).await.ok()?;
    }
    Some((ws, hello))
}

fn event(branch: &Name, seq: u64, device: &Name, body: EventBody) -> ServerFrame {
    ServerFrame::Event(Box::new(Event {
        branch: branch.clone(),
        epoch: FAKE_EPOCH,
        seq,
        event_id: Uuid::now_v7(),
        device: device.clone(),
        device_seq: seq,
        client_time_ms: 0,
        server_time_ms: 0,
        base_seq: None,
        base_version: None,
        body,
        effect: Default::default(),
    }))
}

/// Answers `accepted` to every publish, in order, numbering them from 1; `then` gets each
/// publish and its seq.
async fn accept_publishes(ws: &mut FakeWs, mut then: impl FnMut(Publish, u64)) {
    let mut seq = 0;
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Binary(bytes) = msg else {
            continue;
        };
        if let Ok(ClientFrame::Publish(p)) = Codec::MsgPack.decode_client_frame(&bytes) {
            seq += 1;
            let accepted = ServerFrame::Accepted(Accepted {
                event_id: p.event_id,
                branch: p.branch.clone(),
                epoch: FAKE_EPOCH,
                seq,
                duplicate: false,
            });
            if ws.send(encoded(&accepted)).await.is_err() {
                return;
            }
            then(p, seq);
        }
    }
}

/// A hub that answers like the real one, except that it sends followers seqs 1, 2, 4, 4, 5:
/// event 3 is missing and event 4 comes twice.
async fn broken_hub() -> String {
    fake_hub(broken_session).await
}

async fn broken_session(stream: TcpStream) {
    let Some((mut ws, hello)) = fake_welcome(stream).await else {
        return;
    };
    if let Some(sub) = hello.subscriptions.first() {
        for seq in [1, 2, 4, 4, 5] {
            let body = EventBody::Custom(Custom {
                custom_type: "branchline.load".into(),
                data: serde_json::json!({ "t": 1 }),
            });
            let e = event(&sub.branch, seq, &Name::new("pub-0").unwrap(), body);
            ws.feed(encoded(&e)).await.unwrap();
        }
        ws.flush().await.unwrap();
    }
    // Answer publishes in order; hold followers open until the harness leaves.
    accept_publishes(&mut ws, |_, _| {}).await;
}

/// A hub that accepts every publish at once but hands each event to its followers only
/// `delay` later, in order, as an overloaded hub would: the events published in the last
/// `delay` of a measured window arrive after the window has closed.
async fn slow_hub(delay: Duration) -> String {
    let (fanout, _) = broadcast::channel::<Message>(4_096);
    let (queue, mut due) = mpsc::unbounded_channel::<(Instant, Message)>();
    let out = fanout.clone();
    tokio::spawn(async move {
        while let Some((at, frame)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            let _ = out.send(frame);
        }
    });
    fake_hub(move |stream| slow_session(stream, fanout.clone(), queue.clone(), delay)).await
}

async fn slow_session(
    stream: TcpStream,
    fanout: broadcast::Sender<Message>,
    queue: mpsc::UnboundedSender<(Instant, Message)>,
    delay: Duration,
) {
    let mut events = fanout.subscribe();
    let Some((mut ws, hello)) = fake_welcome(stream).await else {
        return;
    };
    if hello.subscriptions.is_empty() {
        // A publisher (the harness's publishers follow nothing in `fanout`).
        accept_publishes(&mut ws, |p, seq| {
            let e = event(&p.branch, seq, &hello.device, p.body);
            let _ = queue.send((Instant::now() + delay, encoded(&e)));
        })
        .await;
        return;
    }
    loop {
        tokio::select! {
            frame = events.recv() => match frame {
                Ok(frame) => if ws.send(frame).await.is_err() { return },
                Err(_) => return,
            },
            msg = ws.next() => if !matches!(msg, Some(Ok(_))) { return },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_count_events_meant_for_the_window_that_arrive_after_it() {
    let url = slow_hub(Duration::from_millis(700)).await;
    let (output, r, _) = harness(
        &url,
        &[
            "--scenario",
            "fanout",
            "--subscribers",
            "2",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--drain-timeout",
            "5s",
        ],
    )
    .await;
    assert_whole(&output, &r);
    let ack = r.ack_latency_ms.unwrap();
    assert!(ack.count >= 10, "about 20 publishes in the window: {ack:?}");
    let latency = r
        .latency_ms
        .unwrap_or_else(|| panic!("no latency recorded: {:?}", r.error_samples));
    // Each publish of the window reached both followers 700 ms later — the last ones after
    // the window closed; none of the warm-up's late arrivals counts instead.
    assert_eq!(latency.count, 2 * ack.count, "{latency:?} {ack:?}");
    assert!(latency.p50 >= 700.0, "{latency:?}");
    assert_sane(&latency, 5_000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_gap_or_a_duplicate_fails_the_run() {
    let url = broken_hub().await;
    let (output, r, _) = harness(
        &url,
        &[
            "--scenario",
            "fanout",
            "--subscribers",
            "1",
            "--rate",
            "5",
            "--duration",
            "500ms",
            "--warmup",
            "0s",
            "--drain-timeout",
            "500ms",
        ],
    )
    .await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit status 1 on a broken stream"
    );
    assert!(!r.passed);
    assert_eq!(r.gaps, 1, "{:?}", r.error_samples);
    assert_eq!(r.missing_events, 1, "event 3");
    assert_eq!(r.duplicates, 1, "the second 4");
    assert!(
        r.error_samples
            .iter()
            .any(|e| e.contains("gap: after seq 2 came 4")),
        "{:?}",
        r.error_samples
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("FAIL"));
}
