//! What operators rely on: connection limits answer 503, metrics are served under their
//! documented names, and the CLI (`token`, `serve --print-config`, `log inspect`, `log dump`)
//! works on the real binary.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_branchline-hub");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503_and_a_retry_hint() {
    let hub = TestHub::start_with(|c| c.limits.max_connections = 2).await;
    let a = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    let _b = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-2",
        Role::Cashier,
        vec![],
    )
    .await;
    let over = reqwest::get(format!("{}/healthz", hub.http_url()))
        .await
        .unwrap();
    assert_eq!(over.status(), 503);
    assert_eq!(over.headers()["retry-after"], "1");
    let problem: http::Problem = over.json().await.unwrap();
    assert_eq!(problem.code, ErrorCode::Overloaded);
    let refused = tokio_tungstenite::connect_async(hub.ws_url())
        .await
        .unwrap_err();
    assert!(matches!(refused, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 503));

    // A slot frees up when a session ends.
    a.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = reqwest::get(format!("{}/healthz", hub.http_url()))
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_past_the_rate_is_refused_not_queued() {
    let hub = TestHub::start_with(|c| {
        c.limits.connection_rate = 1;
        c.limits.connection_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        // A fresh client each time: a new connection per request.
        statuses.push(
            reqwest::Client::new()
                .get(format!("{}/healthz", hub.http_url()))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "the burst is served");
    assert!(
        statuses[3..].contains(&503),
        "past the rate the hub refuses: {statuses:?}"
    );
    // Once the rate admits a connection again, the metrics show the refusals.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let resp = reqwest::Client::new()
            .get(format!("{}/metrics", hub.http_url()))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            break resp.text().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rate never admitted a connection again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert!(
        text.lines()
            .any(|l| l.starts_with("branchline_refused_connections_total") && !l.ends_with(" 0")),
        "{refused} refused:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_under_their_documented_names() {
    let hub = TestHub::start().await;
    let mut till = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![Subscription {
            branch: name("b1"),
            from: None,
        }],
    )
    .await;
    till.publish(publish("b1", 1, note(1))).await.unwrap();
    till.events_through("b1", 1).await;
    let text = reqwest::get(format!("{}/metrics", hub.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "branchline_connections",
        "branchline_sessions",
        "branchline_rooms",
        "branchline_queued_events",
        "branchline_publishes_total{result=\"accepted\"} 1",
        "branchline_deliveries_total",
        "branchline_catchups_total",
        "branchline_too_slow_closes_total",
        "branchline_replayed_events_total",
        "branchline_refused_connections_total",
        "branchline_commit_ops",
        "branchline_commit_seconds",
        "branchline_store_errors_total 0",
    ] {
        assert!(
            text.contains(name),
            "{name} is missing from /metrics:\n{text}"
        );
    }
    assert_eq!(
        reqwest::get(format!("{}/healthz", hub.http_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
    assert_eq!(
        reqwest::get(format!("{}/readyz", hub.http_url()))
            .await
            .unwrap()
            .status(),
        200
    );
}

async fn output(cmd: &mut Command) -> String {
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        "[limits]\nheartbeat = \"5s\"\nhello_timeout = \"3s\"\npublish_rate = 10\n",
    )
    .unwrap();
    let printed = output(
        Command::new(BIN)
            .args(["serve", "--print-config", "--config"])
            .arg(&file)
            .args(["--heartbeat", "9s"])
            .env("BRANCHLINE_HEARTBEAT", "7s")
            .env("BRANCHLINE_HELLO_TIMEOUT", "4s"),
    )
    .await;
    assert!(
        printed.contains("heartbeat = \"9s\""),
        "a flag wins:\n{printed}"
    );
    assert!(
        printed.contains("hello_timeout = \"4s\""),
        "the environment wins over the file:\n{printed}"
    );
    assert!(
        printed.contains("publish_rate = 10"),
        "the file wins over the default:\n{printed}"
    );
    assert!(
        printed.contains("max_sessions_per_device = 4"),
        "defaults fill the rest:\n{printed}"
    );
    assert!(
        !printed.contains("token_secret"),
        "secrets are never printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_work_and_the_log_tools_read_a_stopped_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secret = "ops-test-secret-0123456789abcdef";
    let token = output(Command::new(BIN).args([
        "token", "--tenant", "acme", "--branch", "b1", "--device", "till-1", "--role", "cashier",
        "--ttl", "1h", "--secret", secret,
    ]))
    .await;
    let mut hub = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "warn"])
        .arg("--data")
        .arg(&data)
        .env("BRANCHLINE_TOKEN_SECRET", secret)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(hub.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the hub prints where it listens");
        if let Some(rest) = line.strip_prefix("branchline-hub listening on http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let mut till = connect_url(&format!("ws://{addr}/v1/ws"), Codec::Json).await;
    till.hello(token.trim(), "acme", "till-1", vec![]).await;
    for i in 1..=5 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }
    drop(till);
    // SIGTERM: a graceful stop, exit code 0.
    let pid = hub.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(WAIT, hub.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "a graceful stop exits 0");

    let inspect = output(
        Command::new(BIN)
            .args(["log", "inspect", "--data"])
            .arg(&data),
    )
    .await;
    let row = inspect
        .lines()
        .find(|l| l.starts_with("acme/b1"))
        .unwrap_or_else(|| panic!("{inspect}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (cols[2], cols[3], cols[4]),
        ("5", "0", "5"),
        "head, floor and event count:\n{inspect}"
    );
    assert!(inspect.contains("store size on disk"));

    let dump = output(
        Command::new(BIN)
            .args([
                "log", "dump", "--branch", "acme/b1", "--after", "2", "--limit", "2", "--data",
            ])
            .arg(&data),
    )
    .await;
    let events: Vec<Event> = dump
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
}
