//! Crash safety (guarantee 6): `kill -9` the real hub binary at random moments while clients
//! publish as fast as they are acknowledged; after every restart on the same store, each
//! acknowledged event is there exactly once, seqs are gap-free, the epoch is unchanged and
//! dedup still recognises events from before the crash. Each kill's count of publishes in
//! flight (sent, never answered) shows that the kills landed inside the crash window.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use branchline_hub::auth::Branches;
use branchline_hub::protocol::http::EventsPage;
use branchline_hub::protocol::*;
use futures::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use support::process::{HubProcess, SECRET, mint};
use support::*;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const WINDOW: usize = 32;

/// The hub binary on `data` with the process tests' secret.
async fn spawn_hub(data: &std::path::Path) -> HubProcess {
    HubProcess::start(data, &["--token-secret", SECRET]).await
}

fn token(branch: &str, device: &str, role: Role) -> String {
    let branches = if branch == "*" {
        Branches::All
    } else {
        Branches::List(vec![name(branch)])
    };
    mint(branches, device, role)
}

/// When each kill was ordered, in order: a publish sent before its kill and never answered
/// was in flight when the hub died.
type Kills = Arc<Mutex<Vec<Instant>>>;

#[derive(Default)]
struct DeviceLog {
    acked: Vec<(uuid::Uuid, u64)>,
    published: HashSet<uuid::Uuid>,
    epochs: HashSet<Epoch>,
    first: Option<Publish>,
    /// For each connection the hub's death ended: the kill, and the publishes sent before it
    /// that were never answered.
    in_flight_at_kill: Vec<(usize, usize)>,
}

/// A publish waiting for its answer, and when it was sent on the current connection.
struct Pending {
    publish: Publish,
    sent_at: Option<Instant>,
}

/// A device that publishes `target` events, reconnecting to wherever the hub is and resending
/// what was not acknowledged (same ids, same device_seq), as the SDK's outbox does.
async fn device(
    branch: String,
    device: String,
    mut addr: watch::Receiver<String>,
    target: u64,
    kills: Kills,
) -> DeviceLog {
    let token = token(&branch, &device, Role::Cashier);
    let mut log = DeviceLog::default();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut next_ds = 1;
    while (log.acked.len() as u64) < target {
        let url = format!("ws://{}/v1/ws", addr.borrow_and_update().clone());
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            Codec::MsgPack.subprotocol().parse().unwrap(),
        );
        let Ok(Ok((ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(req),
        )
        .await
        else {
            // The hub is down: wait for the next one.
            let _ = tokio::time::timeout(Duration::from_millis(50), addr.changed()).await;
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        let hello = ClientFrame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            token: token.clone(),
            tenant: name("acme"),
            device: name(&device),
            client_time_ms: now_ms(),
            subscriptions: vec![Subscription {
                branch: name(&branch),
                from: None,
            }],
            agent: None,
        });
        let encode = |f: &ClientFrame| Message::Binary(Codec::MsgPack.encode(f).unwrap());
        if sink.send(encode(&hello)).await.is_err() {
            continue;
        }
        // Resend everything unacknowledged, in order.
        let mut alive = true;
        for p in &pending {
            if sink
                .feed(encode(&ClientFrame::Publish(p.publish.clone())))
                .await
                .is_err()
            {
                alive = false;
                break;
            }
        }
        alive = alive && sink.flush().await.is_ok();
        if alive {
            let now = Instant::now();
            for p in &mut pending {
                p.sent_at = Some(now);
            }
        }
        while alive && (log.acked.len() as u64) < target {
            let room = pending.len() < WINDOW && next_ds <= target;
            tokio::select! {
                msg = stream.next() => {
                    let Some(Ok(Message::Binary(bytes))) = msg else {
                        if matches!(msg, Some(Ok(_))) { continue; }
                        break;
                    };
                    match Codec::MsgPack.decode_server_frame(&bytes).unwrap() {
                        ServerFrame::Welcome(w) => { log.epochs.insert(w.branches[0].epoch); }
                        ServerFrame::Accepted(a) => {
                            let front = pending.pop_front().expect("an answer for a sent event");
                            assert_eq!(a.event_id, front.publish.event_id, "answers come in publish order");
                            log.epochs.insert(a.epoch);
                            log.acked.push((a.event_id, a.seq));
                        }
                        ServerFrame::Rejected(r) => panic!("{device}: unexpected rejection {r:?}"),
                        _ => {}
                    }
                }
                sent_ok = async {
                    let p = publish(&branch, next_ds, sale_of("TEA", 1));
                    log.published.insert(p.event_id);
                    if log.first.is_none() { log.first = Some(p.clone()); }
                    pending.push_back(Pending { publish: p.clone(), sent_at: None });
                    next_ds += 1;
                    sink.send(encode(&ClientFrame::Publish(p))).await.is_ok()
                }, if room => {
                    if !sent_ok { break; }
                    if let Some(p) = pending.back_mut() {
                        p.sent_at = Some(Instant::now());
                    }
                }
            }
        }
        if (log.acked.len() as u64) < target {
            // The connection died: if a kill ended it, count what it cut off in flight.
            let last_kill = {
                let kills = kills.lock().unwrap();
                kills.last().map(|at| (kills.len() - 1, *at))
            };
            if let Some((kill, at)) = last_kill {
                let cut = pending
                    .iter()
                    .filter(|p| p.sent_at.is_some_and(|sent| sent < at))
                    .count();
                log.in_flight_at_kill.push((kill, cut));
            }
        }
        for p in &mut pending {
            p.sent_at = None;
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_event() {
    const TARGET: u64 = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut hub = spawn_hub(&data).await;
    let (addr_tx, addr_rx) = watch::channel(hub.addr.clone());
    let kills = Kills::default();
    let devices = [
        ("b1", "till-1"),
        ("b1", "till-2"),
        ("b2", "till-3"),
        ("b2", "till-4"),
    ];
    let tasks: Vec<_> = devices
        .iter()
        .map(|(b, d)| {
            tokio::spawn(device(
                b.to_string(),
                d.to_string(),
                addr_rx.clone(),
                TARGET,
                kills.clone(),
            ))
        })
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        kills.lock().unwrap().push(Instant::now());
        hub.kill_9().await;
        hub = spawn_hub(&data).await;
        eprintln!("round {round}: killed and restarted on {}", hub.addr);
        addr_tx.send(hub.addr.clone()).unwrap();
    }
    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.unwrap());
    }
    let mut in_flight = [0usize; 4];
    for (kill, cut) in logs.iter().flat_map(|l| &l.in_flight_at_kill) {
        in_flight[*kill] += cut;
    }
    eprintln!("publishes in flight at each kill: {in_flight:?}");
    assert!(
        in_flight.iter().any(|&n| n > 0),
        "no kill landed while publishes were in flight, so the crash window was never hit"
    );

    let addr = addr_tx.borrow().clone();
    let admin = token("*", "console", Role::Admin);
    let client = reqwest::Client::new();
    let mut by_id: HashMap<uuid::Uuid, u64> = HashMap::new();
    let mut epochs = HashSet::new();
    for branch in ["b1", "b2"] {
        let page: EventsPage = client
            .get(format!(
                "http://{addr}/v1/branches/acme/{branch}/events?after=0&limit=5000"
            ))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(!page.has_more);
        assert_contiguous(&page.events, 1, 2 * TARGET);
        epochs.insert(page.epoch);
        for e in &page.events {
            assert!(
                by_id.insert(e.event_id, e.seq).is_none(),
                "event {} logged twice",
                e.event_id
            );
        }
    }
    for log in &logs {
        assert_eq!(log.acked.len() as u64, TARGET);
        for (id, seq) in &log.acked {
            assert_eq!(
                by_id.get(id),
                Some(seq),
                "acknowledged event {id} is in the log at its seq"
            );
        }
        assert!(
            log.epochs.iter().all(|e| epochs.contains(e)),
            "the epoch never changed across restarts"
        );
    }
    let published: usize = logs.iter().map(|l| l.published.len()).sum();
    assert_eq!(
        by_id.len(),
        published,
        "nothing was logged that was not published"
    );

    // Dedup still knows events from before the crashes.
    let first = logs[0].first.clone().unwrap();
    let mut ws = hub.till("till-1").await;
    let again = ws.publish(first.clone()).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (by_id[&first.event_id], true));
    hub.kill_9().await;
}

/// Publishes `from..=to` to b1 as till-1; the last answer.
async fn publish_through(hub: &HubProcess, from: u64, to: u64) -> Accepted {
    let mut till = hub.till("till-1").await;
    let mut last = None;
    for i in from..=to {
        last = Some(till.publish(publish("b1", i, note(i))).await.unwrap());
    }
    last.unwrap()
}

/// `--fsync interval` acknowledges and delivers before the flush, so a crash can take back
/// events that clients saw, and the hub would hand their seqs to other events. After a
/// `kill -9` the hub gives every branch a new epoch, with nothing of the old one to replay:
/// a device resuming from the old epoch is told to resync. A clean stop keeps the epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_in_interval_mode_devices_resync_instead_of_diverging() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--token-secret", SECRET, "--fsync", "interval=10s"];
    let hub = HubProcess::start(&data, &args).await;
    let first = publish_through(&hub, 1, 20).await;
    let (stopped, stderr) = hub.terminate().await;
    assert!(stopped.success(), "{stderr}");
    let hub = HubProcess::start(&data, &args).await;
    let kept = hub.b1_status().await;
    assert_eq!(
        (kept.epoch, kept.head),
        (first.epoch, 20),
        "a clean stop keeps the epoch"
    );

    let seen = publish_through(&hub, 21, 25).await;
    assert_eq!(seen.seq, 25);
    hub.kill_9().await;
    let hub = HubProcess::start(&data, &args).await;
    let after = hub.b1_status().await;
    assert_ne!(after.epoch, first.epoch, "a new epoch after the crash");
    assert!(after.head <= 25, "head {}", after.head);
    assert_eq!(
        after.floor, after.head,
        "nothing of the old epoch to replay"
    );

    let mut reader = connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let welcome = reader
        .hello(
            &token("b1", "till-2", Role::Cashier),
            "acme",
            "till-2",
            vec![Subscription {
                branch: name("b1"),
                from: Some(Position::new(seen.epoch, seen.seq)),
            }],
        )
        .await;
    assert_eq!(
        (welcome.branches[0].mode, welcome.branches[0].epoch),
        (StartMode::ResyncRequired, after.epoch)
    );
    hub.kill_9().await;
}
