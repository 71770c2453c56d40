//! What operators rely on: connection limits answer 503, metrics are served under their
//! documented names, and on the real binary: the CLI (`token`, `serve --print-config`,
//! `serve --dev`, `log inspect`, `log dump`, `log reset-epoch`), refusal of unusable settings,
//! `--fsync interval=…`, and a stop that ends within the shutdown grace.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Output;

use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use futures::{SinkExt, StreamExt};
use support::process::{BIN, HubProcess, SECRET, cashier_of};
use support::*;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

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
    assert_eq!(
        over.headers()["connection"],
        "close",
        "a refused connection does not keep its slot"
    );
    let problem: http::Problem = over.json().await.unwrap();
    assert_eq!(problem.code, ErrorCode::Overloaded);
    let refused = tokio_tungstenite::connect_async(hub.ws_url())
        .await
        .unwrap_err();
    assert!(matches!(refused, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 503));

    // A slot frees up when a session ends.
    a.close().await;
    eventually("the slot is freed", || async {
        let status = reqwest::get(format!("{}/healthz", hub.http_url()))
            .await
            .unwrap()
            .status();
        if status == 200 { Ok(()) } else { Err(status) }
    })
    .await;
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
    let text = eventually("the rate admits a connection again", || async {
        let resp = reqwest::Client::new()
            .get(format!("{}/metrics", hub.http_url()))
            .send()
            .await
            .unwrap();
        match resp.status() {
            reqwest::StatusCode::OK => Ok(resp.text().await.unwrap()),
            other => Err(other),
        }
    })
    .await;
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
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command to its end (within [`WAIT`]: a `serve` that should have refused to start
/// and did not fails the test instead of hanging it).
async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(WAIT, cmd.kill_on_drop(true).output())
        .await
        .expect("the command ends")
        .unwrap()
}

/// Runs a command that must fail; returns what it said on stderr.
async fn failure(cmd: &mut Command) -> String {
    let out = run(cmd).await;
    assert!(
        !out.status.success(),
        "expected a failure, got {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
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

/// The hub binary, running on an ephemeral port.
/// Starts `serve` on the store `data` with `args`, and waits until it listens.
async fn start_hub(data: &Path, args: &[&str]) -> HubProcess {
    HubProcess::start(data, args).await
}

fn cashier(device: &str) -> String {
    cashier_of("b1", device)
}

fn follow(branch: &str, from: Option<Position>) -> Vec<Subscription> {
    vec![Subscription {
        branch: name(branch),
        from,
    }]
}

/// `log inspect`'s row for `branch`: epoch, head, floor and event count.
fn inspected(table: &str, branch: &str) -> (String, u64, u64, u64) {
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(branch))
        .unwrap_or_else(|| panic!("no row for {branch}:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    (
        cols[1].to_string(),
        cols[2].parse().unwrap(),
        cols[3].parse().unwrap(),
        cols[4].parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_work_and_the_log_tools_read_a_stopped_store_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let minted = output(Command::new(BIN).args([
        "token", "--tenant", "acme", "--branch", "b1", "--device", "till-1", "--role", "cashier",
        "--ttl", "1h", "--secret", SECRET,
    ]))
    .await;
    // The secret comes from the environment here.
    let hub = HubProcess::start_with_env(&data, &[], &[("BRANCHLINE_TOKEN_SECRET", SECRET)]).await;
    let mut till = connect_url(&hub.ws_url(), Codec::Json).await;
    till.hello(minted.trim(), "acme", "till-1", vec![]).await;
    for i in 1..=5 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }
    drop(till);
    // SIGTERM: a graceful stop, exit code 0.
    let (status, stderr) = hub.terminate().await;
    assert!(status.success(), "a graceful stop exits 0: {stderr}");

    let inspect = || {
        let mut cmd = Command::new(BIN);
        cmd.args(["log", "inspect", "--data"]).arg(&data);
        cmd
    };
    let table = output(&mut inspect()).await;
    let (_, head, floor, events) = inspected(&table, "acme/b1");
    assert_eq!(
        (head, floor, events),
        (5, 0, 5),
        "head, floor and event count:\n{table}"
    );
    assert!(table.contains("store size on disk"));

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

    // Asking about a branch without a log is an error, and creates nothing.
    let said = failure(
        Command::new(BIN)
            .args(["log", "dump", "--branch", "acme/nope", "--data"])
            .arg(&data),
    )
    .await;
    assert!(said.contains("no log for branch acme/nope"), "{said}");
    let said = failure(inspect().args(["--branch", "acme/nope"])).await;
    assert!(said.contains("no log for branch acme/nope"), "{said}");
    let after = output(&mut inspect()).await;
    let rows: Vec<&str> = after.lines().filter(|l| l.starts_with("acme/")).collect();
    assert_eq!(rows.len(), 1, "only acme/b1 has a log:\n{after}");
    let missing = dir.path().join("elsewhere");
    let said = failure(
        Command::new(BIN)
            .args(["log", "inspect", "--data"])
            .arg(&missing),
    )
    .await;
    assert!(said.contains("no branchline store at"), "{said}");
    assert!(!missing.exists(), "no store was made where there was none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_epoch_makes_devices_on_the_old_epoch_resync() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let hub = start_hub(&data, &["--token-secret", SECRET]).await;
    let mut till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    till.hello(&cashier("till-1"), "acme", "till-1", vec![])
        .await;
    let first = publish("b1", 1, note(1));
    let old = till.publish(first.clone()).await.unwrap().epoch;
    for i in 2..=3 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }
    drop(till);

    // sled locks the store: the tool refuses to touch a running hub's.
    let reset = |which: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["log", "reset-epoch", "--data"])
            .arg(&data)
            .args(which);
        cmd
    };
    let said = failure(&mut reset(&["--branch", "acme/b1"])).await;
    assert!(
        said.contains("locked by a running hub; stop the hub first"),
        "{said}"
    );
    let (status, _) = hub.terminate().await;
    assert!(status.success());

    let said = failure(&mut reset(&["--branch", "acme/nope"])).await;
    assert!(said.contains("no log for branch acme/nope"), "{said}");
    let printed = output(&mut reset(&["--branch", "acme/b1"])).await;
    let line = printed
        .lines()
        .find_map(|l| l.strip_prefix("acme/b1: "))
        .unwrap_or_else(|| panic!("{printed}"));
    let (was, now) = line.split_once(" → ").unwrap();
    assert_eq!(was, old.to_string());
    let new: Epoch = serde_json::from_value(serde_json::json!(now)).unwrap();
    assert_ne!(new, old);
    let table = output(
        Command::new(BIN)
            .args(["log", "inspect", "--data"])
            .arg(&data),
    )
    .await;
    assert_eq!(
        inspected(&table, "acme/b1"),
        (now.to_string(), 3, 3, 0),
        "the new epoch starts at the head, with nothing of the old one to replay:\n{table}"
    );

    let hub = start_hub(&data, &["--token-secret", SECRET]).await;
    // A device resuming from the old epoch is told to resync, with no events.
    let mut stale = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let welcome = stale
        .hello(
            &cashier("till-2"),
            "acme",
            "till-2",
            follow("b1", Some(Position::new(old, 3))),
        )
        .await;
    assert_eq!(
        (welcome.branches[0].mode, welcome.branches[0].epoch),
        (StartMode::ResyncRequired, new)
    );
    match stale.frame().await {
        ServerFrame::ResyncRequired(r) => {
            assert_eq!(
                (r.reason, r.epoch, r.head),
                (ResyncReason::EpochMismatch, new, 3)
            );
        }
        other => panic!("expected resync_required, got {other:?}"),
    }
    // From the new epoch's head a device is live at once, and new events carry the epoch.
    let mut fresh = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let welcome = fresh
        .hello(
            &cashier("till-3"),
            "acme",
            "till-3",
            follow("b1", Some(Position::new(new, 3))),
        )
        .await;
    assert_eq!(welcome.branches[0].mode, StartMode::Live);
    // Dedup and device_seq are the store's, not the epoch's: a retry is still a duplicate.
    let mut till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    till.hello(&cashier("till-1"), "acme", "till-1", vec![])
        .await;
    let again = till.publish(first).await.unwrap();
    assert_eq!((again.seq, again.duplicate, again.epoch), (1, true, new));
    assert_eq!(
        till.publish(publish("b1", 4, note(4))).await.unwrap().seq,
        4
    );
    let live = fresh.events_through("b1", 4).await;
    assert_eq!(
        live.iter().map(|e| (e.seq, e.epoch)).collect::<Vec<_>>(),
        [(4, new)]
    );
    let (status, _) = hub.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_would_break_the_hub_are_refused_at_start_up_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("hub.toml");
    std::fs::write(&file, "[limits]\nreplay_chunk_events = 0\n").unwrap();
    let serve = || {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--token-secret", SECRET])
            .arg("--data")
            .arg(&data);
        cmd
    };
    let said = failure(serve().args(["--heartbeat", "0s"])).await;
    assert!(
        said.contains("limits.heartbeat (--heartbeat) must be more than 0"),
        "{said}"
    );
    let said = failure(serve().env("BRANCHLINE_RETENTION_INTERVAL", "0s")).await;
    assert!(
        said.contains("retention.interval (--retention-interval) must be more than 0"),
        "{said}"
    );
    let said = failure(serve().arg("--config").arg(&file)).await;
    assert!(
        said.contains("limits.replay_chunk_events (--replay-chunk-events) must be at least 1"),
        "{said}"
    );
    let said = failure(serve().args(["--max-events-page", "0", "--max-connections", "0"])).await;
    assert!(
        said.contains("limits.max_connections") && said.contains("limits.max_events_page"),
        "every problem is named at once: {said}"
    );
    assert!(!data.exists(), "refused before the store was opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dev_prints_a_cashier_and_an_admin_token_that_work() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&dir.path().join("data"), &["--dev"]).await;
    let after = |label: &str| {
        let at = hub
            .banner
            .iter()
            .position(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in {:?}", hub.banner));
        hub.banner[at + 1].trim().to_string()
    };
    let (cashier, admin) = (after("cashier token"), after("admin token"));

    let mut console = connect_url(&hub.ws_url(), Codec::Json).await;
    let welcome = console
        .hello(&admin, "demo", "admin-console", follow("main", None))
        .await;
    assert_eq!(welcome.role, Role::Admin);
    let mut till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let welcome = till
        .hello(&cashier, "demo", "till-1", follow("main", None))
        .await;
    assert_eq!(welcome.role, Role::Cashier);
    let accepted = till
        .publish(publish("main", 1, sale_of("TEA", 1)))
        .await
        .unwrap();
    assert_eq!(accepted.seq, 1);
    let seen = console.events_through("main", 1).await;
    assert_eq!(
        seen[0].event_id, accepted.event_id,
        "the admin sees it live"
    );
    let (status, _) = hub.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_by_interval_serves_and_acknowledges_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let hub = start_hub(
        &data,
        &["--token-secret", SECRET, "--fsync", "interval=50ms"],
    )
    .await;
    let ready = reqwest::get(format!("http://{}/readyz", hub.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        ready.text().await.unwrap().contains("fsync interval=50ms"),
        "the hub says how it is durable"
    );
    let mut follower = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    follower
        .hello(&cashier("till-2"), "acme", "till-2", follow("b1", None))
        .await;
    let till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let mut till = till;
    till.hello(&cashier("till-1"), "acme", "till-1", vec![])
        .await;
    let answers = till
        .publish_all((1..=20).map(|i| publish("b1", i, note(i))).collect())
        .await;
    let seqs: Vec<u64> = answers.into_iter().map(|a| a.unwrap().seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_contiguous(&follower.events_through("b1", 20).await, 1, 20);
    let (status, _) = hub.terminate().await;
    assert!(status.success());
    // A graceful stop flushes: everything acknowledged is in the store.
    let table = output(
        Command::new(BIN)
            .args(["log", "inspect", "--data"])
            .arg(&data),
    )
    .await;
    assert_eq!(inspected(&table, "acme/b1").1, 20, "{table}");
}

/// A custom event of `kib` KiB.
fn heavy(n: u64, kib: usize) -> EventBody {
    EventBody::Custom(Custom {
        custom_type: "test.heavy".into(),
        data: serde_json::json!({ "n": n, "pad": "x".repeat(kib << 10) }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_within_the_grace_even_with_a_session_stuck_writing() {
    const EVENTS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--token-secret",
        SECRET,
        "--shutdown-grace",
        "1s",
        "--too-slow-after",
        "10m",
    ];
    let hub = start_hub(&data, &args).await;

    // A follower that says hello and then never reads: behind a 4 KiB receive buffer, the
    // hub's writes to it block once its socket buffers are full, and stay blocked. Its session
    // then never ends, so neither do the branch writer it holds nor the committer's join.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(hub.addr.parse().unwrap()).await.unwrap();
    let mut req = hub.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        Codec::MsgPack.subprotocol().parse().unwrap(),
    );
    let (mut stuck, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let hello = ClientFrame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        token: cashier("till-stuck"),
        tenant: name("acme"),
        device: name("till-stuck"),
        client_time_ms: now_ms(),
        subscriptions: follow("b1", None),
        agent: None,
    });
    stuck
        .send(Message::Binary(Codec::MsgPack.encode(&hello).unwrap()))
        .await
        .unwrap();
    let welcomed = tokio::time::timeout(WAIT, stuck.next()).await.unwrap();
    let Some(Ok(Message::Binary(bytes))) = welcomed else {
        panic!("{welcomed:?}")
    };
    assert!(matches!(
        Codec::MsgPack.decode_server_frame(&bytes).unwrap(),
        ServerFrame::Welcome(_)
    ));

    // 100 events of 128 KiB: 13 MB for the follower, several times what its socket buffers
    // and the hub's (at most 4 MiB here) can hold.
    let mut till = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    till.hello(&cashier("till-1"), "acme", "till-1", vec![])
        .await;
    let answers = till
        .publish_all(
            (1..=EVENTS)
                .map(|i| publish("b1", i, heavy(i, 128)))
                .collect(),
        )
        .await;
    assert!(answers.iter().all(Result::is_ok));
    // The hub has been writing to the follower, which holds it all unread.
    let mut peeked = [0u8; 1024];
    assert!(stuck.get_ref().peek(&mut peeked).await.unwrap() > 0);

    let (status, stderr) = hub.terminate().await;
    assert!(
        !status.success(),
        "a stop that ran out of grace says so in its exit status: {stderr}"
    );
    assert!(
        stderr.contains("shutdown took longer than the grace of 1s"),
        "{stderr}"
    );
    drop(stuck);

    // Nothing acknowledged was lost by exiting with work unfinished.
    let hub = start_hub(&data, &["--token-secret", SECRET]).await;
    assert_eq!(hub.b1_status().await.head, EVENTS);
    let (status, _) = hub.terminate().await;
    assert!(status.success());
}
