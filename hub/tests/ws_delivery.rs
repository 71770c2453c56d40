//! Delivery over WebSocket: one ordered stream for every follower of a branch, exact resume,
//! and `resync_required` where a position cannot be served (PROTOCOL.md §8).

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use branchline_hub::protocol::*;
use branchline_hub::test_util::{EngineKind, TestHub};
use rand::{Rng, SeedableRng};
use support::*;

/// Runs each scenario on the sled engine and on the in-memory one: sessions and rooms depend
/// on the engine boundary alone.
macro_rules! on_both_engines {
    ($($scenario:ident),* $(,)?) => {
        mod sled_engine {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(EngineKind::Sled).await;
                }
            )*
        }
        mod memory_engine {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(EngineKind::Memory).await;
                }
            )*
        }
    };
}

on_both_engines!(
    two_cashiers_and_an_admin_see_the_same_ordered_stream,
    foreign_tenants_and_branches_are_refused,
    resume_delivers_exactly_what_was_missed_while_publishing_continues,
    positions_that_cannot_be_served_get_resync_required_and_no_events,
    replay_then_caught_up_then_live_and_subscribe_mid_session,
    admins_see_devices_join_and_leave_and_each_devices_lag,
    live_frames_stay_within_a_mebibyte_of_events,
);

fn live(branch: &str) -> Subscription {
    Subscription {
        branch: name(branch),
        from: None,
    }
}

fn from(branch: &str, epoch: Epoch, seq: u64) -> Subscription {
    Subscription {
        branch: name(branch),
        from: Some(Position::new(epoch, seq)),
    }
}

async fn two_cashiers_and_an_admin_see_the_same_ordered_stream(engine: EngineKind) {
    let hub = TestHub::start_on(engine, |_| {}).await;
    let mut c1 = connect(&hub, Codec::MsgPack).await;
    let mut c2 = connect(&hub, Codec::Json).await;
    let mut admin = connect(&hub, Codec::MsgPack).await;
    c1.hello(
        &hub.token("acme", &["b1"], "till-1", Role::Cashier),
        "acme",
        "till-1",
        vec![live("b1")],
    )
    .await;
    c2.hello(
        &hub.token("acme", &["b1"], "till-2", Role::Cashier),
        "acme",
        "till-2",
        vec![live("b1")],
    )
    .await;
    let welcome = admin
        .hello(
            &hub.token("acme", &["*"], "console", Role::Admin),
            "acme",
            "console",
            vec![live("b1")],
        )
        .await;
    assert_eq!(welcome.role, Role::Admin);
    assert_eq!(welcome.branches[0].mode, StartMode::Live);

    // Both tills publish 50 events each, pipelined, at the same time.
    for i in 1..=50 {
        c1.send(&ClientFrame::Publish(publish("b1", i, sale_of("TEA", 1))))
            .await;
        c2.send(&ClientFrame::Publish(publish("b1", i, note(i))))
            .await;
    }
    let s1 = c1.events_through("b1", 100).await;
    let s2 = c2.events_through("b1", 100).await;
    let sa = admin.events_through("b1", 100).await;
    assert_contiguous(&s1, 1, 100);
    let ids = |s: &[Event]| s.iter().map(|e| (e.seq, e.event_id)).collect::<Vec<_>>();
    assert_eq!(
        ids(&s1),
        ids(&s2),
        "MessagePack and JSON followers see the same stream"
    );
    assert_eq!(ids(&s1), ids(&sa), "the admin sees the same stream");
    for device in ["till-1", "till-2"] {
        let seqs: Vec<u64> = s1
            .iter()
            .filter(|e| e.device.as_str() == device)
            .map(|e| e.device_seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=50).collect::<Vec<_>>(),
            "{device}'s events keep their device order"
        );
    }
    let last_sale = s1
        .iter()
        .rev()
        .find(|e| e.device.as_str() == "till-1")
        .unwrap();
    assert_eq!(
        last_sale.effect.stock,
        vec![StockLevel::new(sku("TEA"), -50)],
        "effects ride on events"
    );
}

async fn foreign_tenants_and_branches_are_refused(engine: EngineKind) {
    let hub = TestHub::start_on(engine, |_| {}).await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);

    let mut other_branch = connect(&hub, Codec::MsgPack).await;
    other_branch
        .send(&hello_frame(&token, "acme", "till-1", vec![live("b2")]))
        .await;
    let (error, code) = other_branch.closed().await;
    assert_eq!(
        (error.unwrap().code, code),
        (ErrorCode::Forbidden, Some(4003))
    );

    let mut other_tenant = connect(&hub, Codec::MsgPack).await;
    other_tenant
        .send(&hello_frame(&token, "globex", "till-1", vec![live("b1")]))
        .await;
    let (error, code) = other_tenant.closed().await;
    assert_eq!(
        (error.unwrap().code, code),
        (ErrorCode::Forbidden, Some(4003))
    );

    let mut other_device = connect(&hub, Codec::MsgPack).await;
    other_device
        .send(&hello_frame(&token, "acme", "till-9", vec![]))
        .await;
    let (error, _) = other_device.closed().await;
    assert_eq!(error.unwrap().code, ErrorCode::Forbidden);

    // A good session may not publish to, subscribe to, or list another branch.
    let mut till = connect(&hub, Codec::MsgPack).await;
    till.hello(&token, "acme", "till-1", vec![live("b1")]).await;
    let refused = till.publish(publish("b2", 1, note(1))).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Forbidden);
    till.send(&ClientFrame::Subscribe(live("b2"))).await;
    let error = till
        .until(|f| match f {
            ServerFrame::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert_eq!((error.code, error.fatal), (ErrorCode::Forbidden, false));
    till.send(&ClientFrame::ListDevices(ListDevices {
        branch: name("b1"),
    }))
    .await;
    let error = till
        .until(|f| match f {
            ServerFrame::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        error.code,
        ErrorCode::Forbidden,
        "listing devices is for admins"
    );
    // …and the session still works.
    let accepted = till.publish(publish("b1", 1, note(1))).await.unwrap();
    assert_eq!(accepted.seq, 1);

    let admin = hub.token("globex", &["*"], "console", Role::Admin);
    let mut foreign_admin = connect(&hub, Codec::MsgPack).await;
    foreign_admin
        .send(&hello_frame(&admin, "acme", "console", vec![live("b1")]))
        .await;
    let (error, _) = foreign_admin.closed().await;
    assert_eq!(
        error.unwrap().code,
        ErrorCode::Forbidden,
        "admins do not cross tenants either"
    );
}

pub fn hello_frame(
    token: &str,
    tenant: &str,
    device: &str,
    subscriptions: Vec<Subscription>,
) -> ClientFrame {
    ClientFrame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        token: token.into(),
        tenant: name(tenant),
        device: name(device),
        client_time_ms: now_ms(),
        subscriptions,
        agent: None,
    })
}

/// A reader that disconnects and resumes many times, at random moments, while a writer keeps
/// publishing, receives every event exactly once, in order.
async fn resume_delivers_exactly_what_was_missed_while_publishing_continues(engine: EngineKind) {
    // Each seed is another interleaving of bursts, pauses and reconnects.
    for seed in [7, 1_001, 90_210] {
        resume_while_publishing(engine, seed).await;
    }
}

async fn resume_while_publishing(engine: EngineKind, seed: u64) {
    const TOTAL: u64 = 3_000;
    let hub = TestHub::start_on(engine, |_| {}).await;
    let writer_token = hub.token("acme", &["b1"], "till-w", Role::Cashier);
    let mut writer = connect(&hub, Codec::MsgPack).await;
    let epoch = writer.hello(&writer_token, "acme", "till-w", vec![]).await;
    let _ = epoch;
    let publishing = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut seq = 0;
        while seq < TOTAL {
            let burst = rng.random_range(1..=40).min(TOTAL - seq);
            for _ in 0..burst {
                seq += 1;
                writer
                    .send(&ClientFrame::Publish(publish("b1", seq, note(seq))))
                    .await;
            }
            tokio::time::sleep(std::time::Duration::from_micros(rng.random_range(0..3_000))).await;
        }
        writer
            .until(|f| matches!(f, ServerFrame::Accepted(a) if a.seq == TOTAL).then_some(()))
            .await;
    });

    let token = hub.token("acme", &["b1"], "till-r", Role::Cashier);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let mut received: Vec<Event> = Vec::new();
    let mut position: Option<Position> = None;
    let mut rounds = 0;
    while received.last().is_none_or(|e| e.seq < TOTAL) {
        rounds += 1;
        let mut reader = connect(
            &hub,
            if rounds % 2 == 0 {
                Codec::Json
            } else {
                Codec::MsgPack
            },
        )
        .await;
        let sub = Subscription {
            branch: name("b1"),
            from: position,
        };
        let welcome = reader.hello(&token, "acme", "till-r", vec![sub]).await;
        assert_ne!(welcome.branches[0].mode, StartMode::ResyncRequired);
        let have = position.map_or(0, |p| p.seq);
        let stop_at = (have + rng.random_range(1..400)).min(TOTAL);
        let batch = reader.events_through("b1", stop_at).await;
        // A reader that starts live (no position) begins at the head; later rounds resume.
        if let Some(p) = position {
            assert_eq!(
                batch[0].seq,
                p.seq + 1,
                "round {rounds} resumes right after its position"
            );
        }
        let last = batch.last().unwrap().position();
        received.extend(batch);
        position = Some(last);
        reader.close().await;
        tokio::time::sleep(std::time::Duration::from_micros(rng.random_range(0..5_000))).await;
    }
    publishing.await.unwrap();
    let first = received[0].seq;
    assert_contiguous(&received, first, TOTAL);
    assert!(
        rounds > 5,
        "seed {seed}: the reader resumed several times ({rounds})"
    );
}

async fn positions_that_cannot_be_served_get_resync_required_and_no_events(engine: EngineKind) {
    let hub = TestHub::start_on(engine, |c| c.retention.max_events = 5).await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
    let mut till = connect(&hub, Codec::MsgPack).await;
    let epoch = till
        .hello(&token, "acme", "till-1", vec![live("b1")])
        .await
        .branches[0]
        .epoch;
    for i in 1..=20 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }
    hub.run_retention().await;
    // Another till keeps publishing while the readers are refused.
    let mut other = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-2",
        Role::Cashier,
        vec![],
    )
    .await;
    let mut head = 20;

    let cases = [
        (Epoch(epoch.0 ^ 1), 5, ResyncReason::EpochMismatch),
        (epoch, 2, ResyncReason::BelowFloor),
        (epoch, 1_000, ResyncReason::AheadOfHead),
    ];
    for (e, seq, reason) in cases {
        let mut reader = connect(&hub, Codec::MsgPack).await;
        let welcome = reader
            .hello(&token, "acme", "till-1", vec![from("b1", e, seq)])
            .await;
        let start = &welcome.branches[0];
        assert_eq!(
            (start.mode, start.head, start.floor),
            (StartMode::ResyncRequired, head, 15)
        );
        match reader.frame().await {
            ServerFrame::ResyncRequired(r) => assert_eq!(
                (r.reason, r.epoch, r.head, r.floor),
                (reason, epoch, head, 15)
            ),
            other => panic!("expected resync_required, got {other:?}"),
        }
        // Nothing else is sent for the branch: the next frame is the answer to a ping, even after
        // more events are published.
        let accepted = other
            .publish(publish("b1", head - 19, note(head)))
            .await
            .unwrap();
        head += 1;
        assert_eq!(accepted.seq, head);
        reader
            .send(&ClientFrame::Ping(Ping {
                nonce: 9,
                client_time_ms: now_ms(),
            }))
            .await;
        match reader.frame().await {
            ServerFrame::Pong(p) => assert_eq!(p.nonce, 9),
            other => panic!("no partial replay, but got {other:?}"),
        }
    }

    // The floor itself can still be served.
    let mut reader = connect(&hub, Codec::MsgPack).await;
    let welcome = reader
        .hello(&token, "acme", "till-1", vec![from("b1", epoch, 15)])
        .await;
    assert_eq!(welcome.branches[0].mode, StartMode::Replay);
    let events = reader.events_through("b1", head).await;
    assert_contiguous(&events, 16, head);
}

async fn replay_then_caught_up_then_live_and_subscribe_mid_session(engine: EngineKind) {
    let hub = TestHub::start_on(engine, |_| {}).await;
    let token = hub.token("acme", &["*"], "console", Role::Admin);
    let mut admin = connect(&hub, Codec::MsgPack).await;
    let epoch = admin
        .hello(&token, "acme", "console", vec![live("b1")])
        .await
        .branches[0]
        .epoch;
    for i in 1..=1_200 {
        admin
            .send(&ClientFrame::Publish(publish("b1", i, note(i))))
            .await;
    }
    admin.events_through("b1", 1_200).await;

    let mut late = connect(&hub, Codec::Json).await;
    let welcome = late
        .hello(&token, "acme", "console", vec![from("b1", epoch, 100)])
        .await;
    assert_eq!(welcome.branches[0].mode, StartMode::Replay);
    let replayed = late.events_through("b1", 1_200).await;
    assert_contiguous(&replayed, 101, 1_200);
    let caught_up = late
        .until(|f| match f {
            ServerFrame::CaughtUp(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    assert_eq!(caught_up.seq, 1_200);
    admin
        .publish(publish("b1", 1_201, note(1_201)))
        .await
        .unwrap();
    assert_contiguous(&late.events_through("b1", 1_201).await, 1_201, 1_201);

    // An admin follows another branch on the same socket.
    late.send(&ClientFrame::Subscribe(live("b2"))).await;
    let start = late
        .until(|f| match f {
            ServerFrame::Subscribed(s) => Some(s.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (start.branch.as_str(), start.mode, start.head),
        ("b2", StartMode::Live, 0)
    );
    admin.publish(publish("b2", 1, note(1))).await.unwrap();
    assert_eq!(late.events_through("b2", 1).await[0].branch.as_str(), "b2");
    late.send(&ClientFrame::Unsubscribe(Unsubscribe {
        branch: name("b2"),
    }))
    .await;
    late.until(|f| matches!(f, ServerFrame::Unsubscribed(_)).then_some(()))
        .await;
    admin.publish(publish("b2", 2, note(2))).await.unwrap();
    admin
        .publish(publish("b1", 1_202, note(1_202)))
        .await
        .unwrap();
    let next = late
        .until(|f| match f {
            ServerFrame::Event(e) => Some(e.branch.clone()),
            ServerFrame::Events(b) => Some(b.branch.clone()),
            _ => None,
        })
        .await;
    assert_eq!(next.as_str(), "b1", "nothing of b2 after unsubscribing");
}

async fn admins_see_devices_join_and_leave_and_each_devices_lag(engine: EngineKind) {
    let hub = TestHub::start_on(engine, |_| {}).await;
    let mut admin = session(
        &hub,
        Codec::Json,
        &["*"],
        "console",
        Role::Admin,
        vec![live("b1")],
    )
    .await;
    let devices = admin
        .until(|f| match f {
            ServerFrame::Devices(d) => Some(d.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        devices
            .devices
            .iter()
            .map(|d| d.device.as_str())
            .collect::<Vec<_>>(),
        vec!["console"]
    );

    let mut till = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![live("b1")],
    )
    .await;
    let joined = admin
        .until(|f| match f {
            ServerFrame::Presence(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (
            joined.change,
            joined.device.device.as_str(),
            joined.device.online
        ),
        (PresenceChange::Joined, "till-1", true)
    );

    for i in 1..=5 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }
    admin.events_through("b1", 5).await;
    let epoch = hub
        .hub()
        .branch(&BranchKey::new(name("acme"), name("b1")))
        .await
        .unwrap()
        .epoch();
    till.send(&ClientFrame::Ack(Ack {
        branch: name("b1"),
        epoch,
        seq: 3,
    }))
    .await;
    // The ack is processed before the next frame of the same session.
    till.send(&ClientFrame::Ping(Ping {
        nonce: 1,
        client_time_ms: now_ms(),
    }))
    .await;
    till.until(|f| matches!(f, ServerFrame::Pong(_)).then_some(()))
        .await;
    admin
        .send(&ClientFrame::ListDevices(ListDevices {
            branch: name("b1"),
        }))
        .await;
    let listed = admin
        .until(|f| match f {
            ServerFrame::Devices(d) => Some(d.clone()),
            _ => None,
        })
        .await;
    let t = listed
        .devices
        .iter()
        .find(|d| d.device.as_str() == "till-1")
        .unwrap();
    assert_eq!(
        (
            listed.head,
            t.acked_seq,
            t.lag,
            t.last_device_seq,
            t.sessions
        ),
        (5, Some(3), Some(2), 5, 1)
    );

    till.close().await;
    let left = admin
        .until(|f| match f {
            ServerFrame::Presence(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (left.change, left.device.device.as_str(), left.device.online),
        (PresenceChange::Left, "till-1", false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_by_interval_serves_and_says_so() {
    let hub = TestHub::start_with(|c| {
        c.fsync = branchline_hub::config::FsyncMode::Interval(std::time::Duration::from_millis(20));
    })
    .await;
    let mut till = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![live("b1")],
    )
    .await;
    for i in 1..=50 {
        till.send(&ClientFrame::Publish(publish("b1", i, note(i))))
            .await;
    }
    assert_contiguous(&till.events_through("b1", 50).await, 1, 50);
    let ready = reqwest::get(format!("{}/readyz", hub.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ready.contains("fsync interval=20ms"), "{ready}");
    let hub = hub.restart().await;
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let page: http::EventsPage = api.get_json("/v1/branches/acme/b1/events?after=0").await;
    assert_eq!(page.head, 50, "a graceful stop flushes everything");
}

/// A writer round ends once its events fill a frame: a burst of large events reaches
/// followers in several frames, none carrying more than 1 MiB of events plus the one that
/// filled it, every event once and in order.
async fn live_frames_stay_within_a_mebibyte_of_events(engine: EngineKind) {
    const EVENTS: u64 = 8;
    let hub = TestHub::start_on(engine, |c| {
        c.limits.publish_rate = 1_000_000;
        c.limits.publish_burst = 1_000_000;
    })
    .await;
    let mut follower = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-2",
        Role::Cashier,
        vec![live("b1")],
    )
    .await;
    let big = |i: u64| {
        EventBody::Custom(Custom {
            custom_type: "test.big".into(),
            data: serde_json::json!({ "n": i, "pad": "x".repeat(400_000) }),
        })
    };
    // One push: the writer takes all eight in one go.
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let pushed = api
        .push(
            "acme",
            "b1",
            (1..=EVENTS).map(|i| publish("b1", i, big(i))).collect(),
        )
        .await;
    assert_eq!(pushed.results.len(), EVENTS as usize);
    let (mut seqs, mut frames) = (Vec::new(), 0);
    while seqs.len() < EVENTS as usize {
        let events = match follower.frame().await {
            ServerFrame::Event(e) => vec![*e],
            ServerFrame::Events(batch) => batch.events,
            _ => continue,
        };
        frames += 1;
        let sizes: Vec<usize> = events
            .iter()
            .map(|e| Codec::MsgPack.encode(e).unwrap().len())
            .collect();
        let before_last: usize = sizes[..sizes.len() - 1].iter().sum();
        assert!(
            before_last < 1 << 20,
            "a frame went on past 1 MiB of events: {sizes:?}"
        );
        seqs.extend(events.iter().map(|e| e.seq));
    }
    assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>());
    assert!(frames >= 3, "3.2 MB of events in {frames} frames");
    hub.stop().await;
}
