//! The connector and the handler on paused time, over a scripted hub ([`scripted`]): its
//! transports deliver inputs at scripted instants and record what the engine did with
//! them. Time only moves when the engine waits, so every instant below is exact.

mod scripted;

use std::time::Duration;

use branchline_protocol::{
    Epoch, ErrorCode, Position, ResyncReason, ResyncRequired, Sku, StockLevel,
};
use tokio::time::sleep;
use uuid::Uuid;

use self::scripted::{Call, Dial, Engine, Hub, branch, opts, refused, secs, session};
use super::shared::Command;
use super::transport::Input;
use crate::Backoff;
use crate::error::Error;
use crate::http::Snapshot;
use crate::options;
use crate::status::{ClientEvent, SyncState};
use crate::store::tests::event;

#[tokio::test(start_paused = true)]
async fn reconnects_wait_the_backoff_curve_and_a_session_that_lived_starts_it_over() {
    // Attempt n waits n seconds.
    let opts = opts()
        .transport(options::Transport::WebSocketOnly)
        .backoff(Backoff::from_fn(|attempt| secs(u64::from(attempt))));
    let hub = Hub::with_sockets([refused(), refused(), refused(), session(secs(11))]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(21)).await;
    let opened: Vec<f64> = engine.log.opened().iter().map(|(t, _)| *t).collect();
    // Fails at 0, 1, 3; opens at 6 (live at 6.1), lost at 17.1 after living 11 s: the
    // curve starts over, 1 s, 2 s, 3 s.
    assert_eq!(opened, [0.0, 1.0, 3.0, 6.0, 18.1, 20.1]);
    let waits: Vec<Duration> = engine
        .notes()
        .into_iter()
        .filter_map(|n| match n {
            ClientEvent::Disconnected { retry_in, .. } => Some(retry_in),
            _ => None,
        })
        .collect();
    assert_eq!(
        waits,
        [secs(1), secs(2), secs(3), secs(1), secs(2), secs(3)]
    );
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_socket_that_cannot_be_held_falls_back_to_polling_at_once() {
    let opts = opts()
        .websocket_failures_before_polling(2)
        .backoff(Backoff::constant(secs(5)));
    // Short sessions count as failures; the one that lives 11 s sets the count back to 0.
    let hub = Hub::with_sockets([
        session(secs(1)),
        session(secs(11)),
        session(secs(1)),
        session(secs(1)),
    ]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(60)).await;
    use Call::{Polling, WebSocket};
    assert_eq!(
        engine.log.opened(),
        [
            (0.0, WebSocket),
            (6.1, WebSocket),
            (22.2, WebSocket),
            (28.3, WebSocket),
            // Lost at 29.4: the second short session in a row, and no backoff before polling.
            (29.4, Polling),
        ]
    );
    assert!(
        engine.notes().contains(&ClientEvent::Polling {
            websocket_failures: 2
        }),
        "the app is told why"
    );
    let status = engine.shared.status.borrow().clone();
    assert_eq!(status.state, SyncState::Polling);
    assert_eq!(status.last_error.as_deref(), Some("cut"));
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn polling_probes_the_socket_and_one_more_short_session_goes_back_to_polling() {
    let opts = opts()
        .websocket_failures_before_polling(1)
        .probe_interval(secs(30));
    // The first session is cut at once; the first probe is refused, the second opens a
    // session that is cut after 2 s.
    let hub = Hub::with_sockets([session(secs(1)), refused(), session(secs(2))]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(200)).await;
    let opened = engine.log.opened();
    let kinds: Vec<&Call> = opened.iter().map(|(_, c)| c).collect();
    use Call::{Polling, WebSocket};
    assert_eq!(
        kinds[..5],
        [&WebSocket, &Polling, &WebSocket, &WebSocket, &Polling],
        "{opened:?}"
    );
    assert!(
        kinds[5..].iter().all(|c| **c == WebSocket),
        "then probes again: {opened:?}"
    );
    let t: Vec<f64> = opened.iter().map(|(t, _)| *t).collect();
    // Probes every 30 s, jittered to between 15 and 45 s.
    assert_eq!(t[1], 1.1);
    assert!((16.1..=46.1).contains(&t[2]), "first probe at {}", t[2]);
    assert!(
        (15.0..=45.0).contains(&(t[3] - t[2])),
        "second probe at {}",
        t[3]
    );
    // The socket the probe opened is served at once; cut after 2 s, it does not get the
    // failures it takes to fall back again: it goes straight back to polling.
    assert_eq!(t[4], ((t[3] + 2.1) * 10.0).round() / 10.0);
    let live = engine
        .states()
        .into_iter()
        .filter(|(_, s)| *s == SyncState::Live)
        .count();
    assert_eq!(live, 2, "live in both sessions: {:?}", engine.states());
    let connected = engine
        .notes()
        .iter()
        .filter(|n| matches!(n, ClientEvent::Connected { .. }))
        .count();
    assert_eq!(connected, 2);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn resync_required_takes_a_snapshot_and_follows_the_branch_from_it() {
    let resync = ResyncRequired {
        branch: branch(),
        reason: ResyncReason::BelowFloor,
        epoch: Epoch(9),
        head: 40,
        floor: 30,
    };
    let hub = Hub::with_sockets([Dial::Open {
        handshake: Duration::ZERO,
        script: vec![(secs(1), Input::ResyncRequired(resync))],
    }]);
    let coffee = Sku::new("COFFEE").unwrap();
    let pinned = Position::new(Epoch(9), 40);
    *hub.snapshot.lock().unwrap() = Some((
        secs(2),
        Snapshot {
            position: Some(pinned),
            stock: vec![StockLevel::new(coffee.clone(), 5)],
            received: 1,
            total: 1,
            ..Snapshot::default()
        },
    ));
    let mut engine = Engine::start(opts(), hub);
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(engine.shared.status.borrow().state, SyncState::Resyncing);
    assert_eq!(engine.shared.status.borrow().lag, 40, "the head is 40");
    sleep(secs(10)).await;
    assert_eq!(
        engine.log.calls(),
        [
            (0.0, Call::WebSocket),
            (1.0, Call::Snapshot(branch())),
            (3.0, Call::Follow(branch(), pinned)),
        ]
    );
    let store = &engine.shared.store;
    assert_eq!(store.cursor(&branch()).unwrap(), Some(pinned));
    assert_eq!(
        store.confirmed_stock(&branch(), &coffee).unwrap(),
        Some(StockLevel::new(coffee.clone(), 5))
    );
    let notes = engine.notes();
    let told = |n: &ClientEvent| notes.iter().position(|m| m == n);
    let asked = told(&ClientEvent::ResyncRequired {
        branch: branch(),
        reason: ResyncReason::BelowFloor,
    });
    let done = told(&ClientEvent::Resynced {
        branch: branch(),
        position: pinned,
    });
    assert!(asked.is_some() && asked < done, "{notes:?}");
    let status = engine.shared.status.borrow().clone();
    assert_eq!((status.state, status.lag), (SyncState::Live, 0));
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn status_goes_connecting_live_offline_then_polling_and_offline_while_polls_fail() {
    let opts = opts()
        .websocket_failures_before_polling(2)
        .backoff(Backoff::constant(secs(1)));
    let hub = Hub::with_sockets([session(secs(1)), session(secs(1))]);
    hub.polls.lock().unwrap().push_back(vec![
        (secs(1), Input::Trouble("poll failed".into())),
        (
            secs(1),
            Input::Events {
                branch: branch(),
                events: Vec::new(),
                head: Some(0),
            },
        ),
    ]);
    let engine = Engine::start(opts, hub);
    sleep(secs(10)).await;
    use SyncState::{Connecting, Live, Offline, Polling};
    assert_eq!(
        engine.states(),
        [
            (0.0, Connecting),
            (0.1, Live),
            (1.1, Offline),
            (2.1, Connecting),
            (2.2, Live),
            (3.2, Polling),
            (4.2, Offline),
            (5.2, Polling),
        ]
    );
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_waits_for_a_new_one_and_is_then_tried_at_once() {
    let expired = Error::Hub {
        status: 401,
        code: ErrorCode::TokenExpired,
        message: "old".into(),
    };
    let hub = Hub::with_sockets([Dial::Fail(expired), session(secs(3600))]);
    let mut engine = Engine::start(opts(), hub);
    sleep(secs(600)).await;
    assert_eq!(engine.log.opened(), [(0.0, Call::WebSocket)], "no retries");
    assert!(engine.notes().contains(&ClientEvent::AuthFailed {
        code: ErrorCode::TokenExpired,
        message: "old".into(),
    }));
    assert_eq!(engine.shared.status.borrow().state, SyncState::Offline);
    engine.cmds.send(Command::TokenChanged).await.unwrap();
    sleep(secs(1)).await;
    assert_eq!(engine.log.opened().last(), Some(&(600.0, Call::WebSocket)));
    assert_eq!(engine.shared.status.borrow().state, SyncState::Live);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_gap_drops_a_socket_but_polling_asks_again_from_the_stored_position() {
    let gap = |seqs: &[u64]| Input::Events {
        branch: branch(),
        events: seqs
            .iter()
            .map(|s| event(7, *s, &[], Uuid::now_v7()))
            .collect(),
        head: None,
    };
    let opts = opts().transport(options::Transport::WebSocketOnly);
    let hub = Hub::with_sockets([Dial::Open {
        handshake: Duration::ZERO,
        script: vec![(secs(1), gap(&[1, 3]))],
    }]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(2)).await;
    let at_1 = Position::new(Epoch(7), 1);
    assert_eq!(engine.shared.store.cursor(&branch()).unwrap(), Some(at_1));
    let lost = engine.notes().into_iter().find_map(|n| match n {
        ClientEvent::Disconnected { reason, .. } => Some(reason),
        _ => None,
    });
    assert_eq!(
        lost.as_deref(),
        Some("gap in b1: expected seq 2, got 3; resuming")
    );
    engine.stop().await;

    let opts = self::opts().transport(options::Transport::HttpOnly);
    let hub = Hub::default();
    hub.polls
        .lock()
        .unwrap()
        .push_back(vec![(secs(1), gap(&[1, 3]))]);
    let mut engine = Engine::start(opts, hub);
    sleep(secs(2)).await;
    assert_eq!(
        engine.log.calls(),
        [(0.0, Call::Polling), (1.0, Call::Applied(branch(), at_1))],
        "the run is applied as far as it follows, and polled again from there"
    );
    assert!(
        !engine
            .notes()
            .iter()
            .any(|n| matches!(n, ClientEvent::Disconnected { .. }))
    );
    engine.stop().await;
}
