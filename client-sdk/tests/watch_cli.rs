// Integration tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use branchline_client::protocol::Role;
use branchline_hub::test_util::TestHub;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_cli_prints_events_presence_and_device_lag() {
    let hub = TestHub::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_branchline-watch"))
        .args([
            "--url",
            &hub.http_url(),
            "--branch",
            BRANCH,
            "--devices-every",
            "300ms",
        ])
        .env("BRANCHLINE_TOKEN", admin_token(&hub))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_matching = async |needle: &str| {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let line = lines.next_line().await.unwrap().unwrap();
                if line.contains(needle) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no line with {needle:?}"))
    };
    next_matching("caught up").await;
    let dir = tempfile::tempdir().unwrap();
    let till = opts(
        hub.token(TENANT, &[BRANCH], "till-9", Role::Cashier),
        dir.path(),
    )
    .connect(&hub.http_url())
    .await
    .unwrap();
    let joined = next_matching("till-9 joined").await;
    assert!(joined.contains(BRANCH));
    till.publish(custom(1)).await.unwrap();
    let line = next_matching("custom test.n").await;
    assert!(line.contains("b1 #1 custom by till-9#1"), "{line}");
    let dev = next_matching("till-9 ").await;
    assert!(dev.contains("online") && dev.contains("lag"), "{dev}");
    till.shutdown().await.unwrap();
    next_matching("till-9 left").await;
    child.kill().await.unwrap();
    hub.stop().await;
}
