//! A fleet of devices publishing as fast as they are acknowledged to a hub that keeps dying:
//! the workload of the crash tests (`kill -9`) and the power-loss tests (`kill -9` and a cut
//! of the disk's power). Each device reconnects to wherever the hub now is and resends what
//! was not acknowledged (same ids, same `device_seq`), as the SDK's outbox does; the checks at
//! the end say whether the hub kept its promises across the deaths.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use branchline_hub::auth::TokenBranches;
use branchline_hub::protocol::*;
use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::process::{HubProcess, mint};
use super::{assert_contiguous, name, publish, sale_of};

/// Publishes a device keeps unanswered at most.
const WINDOW: usize = 32;

/// The fleet of the crash and power-loss tests: two tills on each of two branches.
pub const DEVICES: [(&str, &str); 4] = [
    ("b1", "till-1"),
    ("b1", "till-2"),
    ("b2", "till-3"),
    ("b2", "till-4"),
];

/// A token of tenant `acme` for `device` on `branch` (`*`: every branch).
pub fn token(branch: &str, device: &str, role: Role) -> String {
    let branches = if branch == "*" {
        TokenBranches::All
    } else {
        TokenBranches::List(vec![name(branch)])
    };
    mint(branches, device, role)
}

/// What one device saw.
#[derive(Default)]
pub struct DeviceLog {
    /// The device.
    pub device: String,
    /// Every acknowledgement, in order: event id and seq.
    pub acked: Vec<(uuid::Uuid, u64)>,
    /// Every event it ever sent.
    pub published: HashSet<uuid::Uuid>,
    /// Every epoch the hub named.
    pub epochs: HashSet<Epoch>,
    /// Its first publish (to retry at the end: dedup must still know it).
    pub first: Option<Publish>,
    /// For each connection a death of the hub ended: which death, and how many publishes
    /// sent before it were never answered.
    pub in_flight_at_kill: Vec<(usize, usize)>,
}

/// A publish waiting for its answer, and when it was sent on the current connection.
struct Pending {
    publish: Publish,
    sent_at: Option<Instant>,
}

/// When each death was ordered, in order.
type Kills = Arc<Mutex<Vec<Instant>>>;

/// Devices publishing to a hub whose address may change.
pub struct Fleet {
    addr: watch::Sender<String>,
    stop: watch::Sender<bool>,
    kills: Kills,
    tasks: Vec<JoinHandle<DeviceLog>>,
}

impl Fleet {
    /// Starts `(branch, device)` publishers against the hub at `addr` (`host:port`); each
    /// stops after `target` acknowledged events, or when told to [`Fleet::finish`].
    pub fn start(addr: &str, devices: &[(&str, &str)], target: u64) -> Self {
        let (addr, addr_rx) = watch::channel(addr.to_string());
        let (stop, stop_rx) = watch::channel(false);
        let kills = Kills::default();
        let tasks = devices
            .iter()
            .map(|(b, d)| {
                tokio::spawn(device(
                    b.to_string(),
                    d.to_string(),
                    addr_rx.clone(),
                    stop_rx.clone(),
                    target,
                    kills.clone(),
                ))
            })
            .collect();
        Self {
            addr,
            stop,
            kills,
            tasks,
        }
    }

    /// Records that the hub is being killed now.
    pub fn killing(&self) {
        self.kills
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Instant::now());
    }

    /// Points the devices at the hub's new address.
    pub fn moved(&self, addr: &str) {
        let _ = self.addr.send(addr.to_string());
    }

    /// Deaths recorded so far.
    pub fn kills(&self) -> usize {
        self.kills
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Tells the devices to publish nothing new, waits until everything they sent is
    /// answered, and returns what each saw.
    pub async fn finish(self) -> Vec<DeviceLog> {
        let _ = self.stop.send(true);
        let mut logs = Vec::new();
        for task in self.tasks {
            logs.push(task.await.expect("a device task ends"));
        }
        logs
    }

    /// Waits for every device to reach its target.
    pub async fn join(self) -> Vec<DeviceLog> {
        let mut logs = Vec::new();
        for task in self.tasks {
            logs.push(task.await.expect("a device task ends"));
        }
        logs
    }
}

/// Publishes in order on `branch` as `device` until `target` events are acknowledged, or
/// `stop` is set and nothing sent is left unanswered.
async fn device(
    branch: String,
    device: String,
    mut addr: watch::Receiver<String>,
    stop: watch::Receiver<bool>,
    target: u64,
    kills: Kills,
) -> DeviceLog {
    let token = token(&branch, &device, Role::Cashier);
    let mut log = DeviceLog {
        device: device.clone(),
        ..DeviceLog::default()
    };
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut next_ds = 1;
    let done = |log: &DeviceLog, pending: &VecDeque<Pending>| {
        (log.acked.len() as u64) >= target || (*stop.borrow() && pending.is_empty())
    };
    while !done(&log, &pending) {
        let url = format!("ws://{}/v1/ws", addr.borrow_and_update().clone());
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .expect("a request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            Codec::MsgPack
                .subprotocol()
                .parse()
                .expect("a header value"),
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
        let encode =
            |f: &ClientFrame| Message::Binary(Codec::MsgPack.encode(f).expect("frames encode"));
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
        while alive && !done(&log, &pending) {
            let room = pending.len() < WINDOW && next_ds <= target && !*stop.borrow();
            tokio::select! {
                msg = stream.next() => {
                    let Some(Ok(Message::Binary(bytes))) = msg else {
                        if matches!(msg, Some(Ok(_))) { continue; }
                        break;
                    };
                    match Codec::MsgPack.decode_server_frame(&bytes).expect("frames decode") {
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
                // Told to stop while waiting for nothing: re-check.
                _ = tokio::time::sleep(Duration::from_millis(20)), if !room => {}
            }
        }
        if !done(&log, &pending) {
            // The connection died: if a kill ended it, count what it cut off in flight.
            let last_kill = {
                let kills = kills
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// Publishes in flight (sent, never answered) at each of `kills` deaths of the hub.
pub fn in_flight_at_each_kill(logs: &[DeviceLog], kills: usize) -> Vec<usize> {
    let mut in_flight = vec![0usize; kills];
    for (kill, cut) in logs.iter().flat_map(|l| &l.in_flight_at_kill) {
        if let Some(n) = in_flight.get_mut(*kill) {
            *n += cut;
        }
    }
    in_flight
}

/// Checks what the hub at `addr` holds against what the devices saw: on each of `branches`
/// the log runs gap-free from seq 1 with each event once; every acknowledged event is in it
/// at the seq it was acknowledged with; exactly the published events are in it (the devices
/// resend until everything is answered); the epoch never changed; and dedup still knows the
/// first event of the first device. Returns each branch's head.
pub async fn check_logs(hub: &HubProcess, branches: &[&str], logs: &[DeviceLog]) -> Vec<u64> {
    let mut by_id: HashMap<uuid::Uuid, u64> = HashMap::new();
    let mut epochs = HashSet::new();
    let mut heads = Vec::new();
    for branch in branches {
        let events = hub.events(branch, 5_000).await;
        if let Some(e) = events.first() {
            epochs.insert(e.epoch);
        }
        let last = events.last().map_or(0, |e| e.seq);
        assert_contiguous(&events, 1, last);
        heads.push(last);
        for e in &events {
            assert!(
                by_id.insert(e.event_id, e.seq).is_none(),
                "event {} logged twice",
                e.event_id
            );
        }
    }
    for log in logs {
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
    let published: HashSet<_> = logs.iter().flat_map(|l| &l.published).collect();
    assert!(
        by_id.keys().all(|id| published.contains(id)),
        "nothing was logged that was not published"
    );
    assert_eq!(
        by_id.len(),
        published.len(),
        "everything published was logged"
    );

    // Dedup still knows events from before the deaths.
    let first = logs[0].first.clone().expect("the first device published");
    let mut ws = super::connect_url(&hub.ws_url(), Codec::MsgPack).await;
    let device = &logs[0].device;
    ws.hello(
        &token(first.branch.as_str(), device, Role::Cashier),
        "acme",
        device,
        vec![],
    )
    .await;
    let again = ws
        .publish(first.clone())
        .await
        .expect("a retry is answered");
    assert_eq!(
        (again.seq, again.duplicate),
        (by_id[&first.event_id], true),
        "a retry of an event from before the deaths is a duplicate"
    );
    heads
}
