//! Short, small runs of the `branchline-load` binary against an in-process hub, through its
//! real flags and JSON report: the scenarios run end to end, streams come out whole, and the
//! numbers are in a sane range. And against a fake hub that breaks a stream, the harness must
//! fail: a gap or a duplicate is never a footnote.
//!
//! These are functional checks with loose bounds, never timed benchmarks (`make bench` is).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Output;

use branchline_hub::test_util::{TEST_SECRET, TestHub};
use branchline_load::Report;
use branchline_protocol::{
    Accepted, BranchStart, CaughtUp, ClientFrame, Codec, Custom, Epoch, Event, EventBody, Name,
    Role, ServerFrame, StartMode, Welcome,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use uuid::Uuid;

/// Runs the harness with `args` against `url` and returns its output and report.
async fn harness(url: &str, args: &[&str]) -> (Output, Report) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_branchline-load"))
        .args([
            "--url",
            url,
            "--token-secret",
            TEST_SECRET,
            "--threads",
            "2",
        ])
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = Report::read(&report)
        .unwrap_or_else(|e| panic!("no report ({e:#})\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    (output, report)
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
    let hub = TestHub::start().await;
    let (output, r) = harness(
        &hub.ws_url(),
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
        "20 followers and one publisher per branch"
    );
    // 2 branches × 200 events/s × 10 followers each = 4,000 deliveries/s.
    assert!(
        (2_000.0..6_000.0).contains(&r.deliveries_per_s),
        "deliveries/s {}",
        r.deliveries_per_s
    );
    assert!(
        (200.0..600.0).contains(&r.publishes_acked_per_s),
        "acks/s {}",
        r.publishes_acked_per_s
    );
    let latency = r.latency_ms.unwrap();
    assert!(latency.p50 > 0.0 && latency.p99 < 1_000.0, "{latency:?}");
    assert!(latency.count > 1_000, "{latency:?}");
    assert!(r.ack_latency_ms.is_some());
    assert!(r.harness_cpu_percent.is_some());
    assert_eq!(r.storm_catchup_s, None, "not measured by fanout");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_resumes_every_follower_without_gaps() {
    let hub = TestHub::start().await;
    let (output, r) = harness(
        &hub.ws_url(),
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
    let storm = r.storm.clone().unwrap();
    assert_eq!((storm.followers, storm.reconnected), (20, 20));
    assert!(storm.min_behind.unwrap() >= 50, "{storm:?}");
    let secs = r.storm_catchup_s.unwrap();
    assert!(secs > 0.0 && secs < 10.0, "storm took {secs} s");
    // Each follower replayed at least the 50 pushed while it was away.
    assert!(r.deliveries >= 20 * 50, "deliveries {}", r.deliveries);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_replays_exactly_the_missed_events() {
    let hub = TestHub::start().await;
    let (output, r) = harness(
        &hub.ws_url(),
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
    assert!(r.catchup_events_per_s.unwrap() > 0.0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_acks_match_the_durable_heads() {
    let hub = TestHub::start().await;
    let (output, r) = harness(
        &hub.ws_url(),
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
    assert!(r.ack_latency_ms.unwrap().p50 > 0.0);
    assert_eq!(r.latency_ms, None, "nobody follows in publish");
    hub.stop().await;
}

/// A hub that answers like the real one, except that it sends followers seqs 1, 2, 4, 4, 5:
/// event 3 is missing and event 4 comes twice.
async fn broken_hub() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(broken_session(stream));
        }
    });
    format!("ws://{addr}/v1/ws")
}

// tungstenite's handshake callback type returns its large `ErrorResponse`; not ours to shrink.
#[allow(clippy::result_large_err)]
async fn broken_session(stream: tokio::net::TcpStream) {
    let select_msgpack = |_: &Request, mut response: Response| {
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            branchline_protocol::SUBPROTOCOL_MSGPACK.parse().unwrap(),
        );
        Ok(response)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, select_msgpack)
        .await
        .unwrap();
    let send = |frame: ServerFrame| Message::Binary(Codec::MsgPack.encode(&frame).unwrap());
    let Some(Ok(Message::Binary(bytes))) = ws.next().await else {
        return;
    };
    let ClientFrame::Hello(hello) = Codec::MsgPack.decode_client_frame(&bytes).unwrap() else {
        panic!("the harness must say hello first");
    };
    let epoch = Epoch(0x5eed);
    let branches = hello
        .subscriptions
        .iter()
        .map(|s| BranchStart {
            branch: s.branch.clone(),
            epoch,
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
    ws.send(send(welcome)).await.unwrap();
    if let Some(sub) = hello.subscriptions.first() {
        ws.feed(send(ServerFrame::CaughtUp(CaughtUp {
            branch: sub.branch.clone(),
            epoch,
            seq: 0,
        })))
        .await
        .unwrap();
        for seq in [1, 2, 4, 4, 5] {
            let event = Event {
                branch: sub.branch.clone(),
                epoch,
                seq,
                event_id: Uuid::now_v7(),
                device: Name::new("pub-0").unwrap(),
                device_seq: seq,
                client_time_ms: 0,
                server_time_ms: 0,
                base_seq: None,
                base_version: None,
                body: EventBody::Custom(Custom {
                    custom_type: "branchline.load".into(),
                    data: serde_json::json!({ "t": 1 }),
                }),
                effect: Default::default(),
            };
            ws.feed(send(ServerFrame::Event(Box::new(event))))
                .await
                .unwrap();
        }
        ws.flush().await.unwrap();
    }
    // Answer publishes in order; hold followers open until the harness leaves.
    let mut seq = 0;
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Binary(bytes) = msg else {
            continue;
        };
        if let Ok(ClientFrame::Publish(p)) = Codec::MsgPack.decode_client_frame(&bytes) {
            seq += 1;
            let accepted = ServerFrame::Accepted(Accepted {
                event_id: p.event_id,
                branch: p.branch,
                epoch,
                seq,
                duplicate: false,
            });
            if ws.send(send(accepted)).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_gap_or_a_duplicate_fails_the_run() {
    let url = broken_hub().await;
    let (output, r) = harness(
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
