//! The outbox through power cuts (guarantee 9): `publish` returns once the event is durable
//! in the device's store, so after a power cut every publish that returned is still in the
//! outbox, or was already sequenced by the hub.
//!
//! A child process (this test binary again) opens a client whose store is on a disk that
//! loses, at a cut, everything not made durable by `fsync` (the `branchline-powercut` FUSE
//! filesystem), and publishes as fast as it can, printing each event id as `publish`
//! returns. The test kills it with `kill -9` at random moments, cuts the power, and starts
//! it again on what survived. At the end a last child drains the outbox, and the hub's log
//! must hold every printed event exactly once, in `device_seq` order. The hub runs in this
//! process, on an ordinary disk: only the device loses its power.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use branchline_client::protocol::Role;
use branchline_hub::test_util::TestHub;
use branchline_powercut::{Cut, PowerCutFs};
use rand::{Rng, SeedableRng};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const TEST: &str = "every_publish_that_returned_survives_power_cuts";
const CHILD_STORE: &str = "SDK_POWER_TEST_STORE";
const CHILD_URL: &str = "SDK_POWER_TEST_URL";
const CHILD_TOKEN: &str = "SDK_POWER_TEST_TOKEN";
const CHILD_DRAIN: &str = "SDK_POWER_TEST_DRAIN";

/// The child: publishes until killed, printing each id as `publish` returns; or, told to
/// drain, waits until the outbox is empty and says so.
async fn child(store: &Path, url: &str, token: String, drain: bool) -> ! {
    let client = connect_when_unlocked(opts(token, store), url, Duration::from_secs(10)).await;
    // The test harness has printed a line's beginning; ours start on lines of their own.
    println!();
    if drain {
        wait_for("the outbox to drain", Duration::from_secs(60), || async {
            client.pending().is_empty()
        })
        .await;
        println!("drained");
        std::future::pending::<()>().await;
    }
    let mut n = 0u64;
    loop {
        n += 1;
        let event = client.publish(custom(n)).await.unwrap();
        println!("published {}", event.event_id);
    }
}

/// A running child and the lines it prints.
struct Device {
    process: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Device {
    fn start(store: &Path, hub: &TestHub, token: &str, drain: bool) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_STORE, store)
            .env(CHILD_URL, hub.http_url())
            .env(CHILD_TOKEN, token)
            .env(CHILD_DRAIN, if drain { "1" } else { "0" })
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(process.stdout.take().unwrap()).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { process, lines }
    }

    /// Lets it publish for `run`, kills it, and adds every id it printed to `published`.
    async fn kill_after(mut self, run: Duration, published: &mut Vec<uuid::Uuid>) {
        let mut take = |line: &str| {
            if let Some(id) = line.strip_prefix("published ") {
                published.push(id.parse().unwrap());
            }
        };
        let deadline = tokio::time::sleep(run);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                line = self.lines.recv() => match line {
                    Some(line) => take(&line),
                    None => panic!("the device died"),
                },
                () = &mut deadline => break,
            }
        }
        self.process.kill().await.unwrap();
        // Everything it printed before it died had returned from `publish`.
        while let Some(line) = self.lines.recv().await {
            take(&line);
        }
    }

    /// Waits until it has drained its outbox, then kills it.
    async fn drained(mut self) {
        let drained = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = self.lines.recv().await {
                if line == "drained" {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(drained, Ok(true), "the outbox drains");
        self.process.kill().await.unwrap();
    }
}

fn child_mode() -> Option<(std::path::PathBuf, String, String, bool)> {
    Some((
        std::env::var_os(CHILD_STORE)?.into(),
        std::env::var(CHILD_URL).ok()?,
        std::env::var(CHILD_TOKEN).ok()?,
        std::env::var(CHILD_DRAIN).is_ok_and(|v| v == "1"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_that_returned_survives_power_cuts() {
    if let Some((store, url, token, drain)) = child_mode() {
        child(&store, &url, token, drain).await;
    }
    let cuts = 16;
    let seed: u64 = rand::random();
    eprintln!("{cuts} power cuts, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let hub = TestHub::start().await;
    let token = hub.token(TENANT, &[BRANCH], "till-1", Role::Cashier);
    let mnt = tempfile::tempdir().unwrap();
    let mut disk = PowerCutFs::mount(mnt.path()).unwrap();
    let store = disk.path().join("till");
    let mut published = Vec::new();
    let mut bytes_lost = 0;
    for cut in 0..cuts {
        let device = Device::start(&store, &hub, &token, false);
        device
            .kill_after(
                Duration::from_millis(rng.random_range(100..400)),
                &mut published,
            )
            .await;
        let how = if cut % 2 == 0 {
            Cut::DropUnsynced
        } else {
            Cut::Torn { seed: rng.random() }
        };
        bytes_lost += tokio::task::block_in_place(|| disk.cut(how))
            .unwrap()
            .bytes_lost;
    }
    Device::start(&store, &hub, &token, true).drained().await;

    eprintln!(
        "{} publishes returned; the cuts took back {bytes_lost} bytes of dirty pages",
        published.len()
    );
    assert!(bytes_lost > 0, "the cuts took back unsynced writes");
    assert!(!published.is_empty());
    let events = hub_events(&hub, &admin_token(&hub)).await;
    let logged: HashSet<_> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(logged.len(), events.len(), "each event is logged once");
    for id in &published {
        assert!(logged.contains(id), "returned publish {id} reached the hub");
    }
    let device_seqs: Vec<u64> = events.iter().map(|e| e.device_seq).collect();
    assert_eq!(
        device_seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "the device's events are sequenced in device_seq order, none skipped"
    );
}
