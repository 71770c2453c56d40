//! Bad input over WebSocket gets the documented error and close codes (PROTOCOL.md §12, §13),
//! and the hub keeps serving everyone else.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_hub::auth::{Branches, Claims};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn hello(token: &str, protocol: u32) -> ClientFrame {
    ClientFrame::Hello(Hello {
        protocol,
        token: token.into(),
        tenant: name("acme"),
        device: name("till-1"),
        client_time_ms: now_ms(),
        subscriptions: vec![Subscription {
            branch: name("b1"),
            from: None,
        }],
        agent: None,
    })
}

/// A healthy session publishes and gets its answer: the hub still serves.
async fn still_serves(hub: &TestHub, device_seq: u64) {
    let mut ok = connect(hub, Codec::MsgPack).await;
    ok.hello(
        &hub.token("acme", &["b1"], "till-ok", Role::Cashier),
        "acme",
        "till-ok",
        vec![],
    )
    .await;
    let accepted = ok
        .publish(publish("b1", device_seq, note(device_seq)))
        .await
        .unwrap();
    assert_eq!(accepted.branch.as_str(), "b1");
}

async fn expect_close(ws: &mut Ws, code: ErrorCode, close: u16) {
    let (error, got) = ws.closed().await;
    let error = error.expect("an error frame before the close");
    assert_eq!(
        (error.code, error.fatal, got),
        (code, true, Some(close)),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_first_frame_closes_with_bad_hello() {
    let hub = TestHub::start().await;
    let mut ws = connect(&hub, Codec::MsgPack).await;
    ws.send(&ClientFrame::Ping(Ping {
        nonce: 1,
        client_time_ms: 0,
    }))
    .await;
    expect_close(&mut ws, ErrorCode::BadHello, 4000).await;

    let mut ws = connect(&hub, Codec::MsgPack).await;
    ws.send_raw(Message::Binary(vec![0xc1, 0x00, 0x17].into()))
        .await;
    expect_close(&mut ws, ErrorCode::BadHello, 4000).await;

    let mut ws = connect(&hub, Codec::Json).await;
    ws.send_raw(Message::Text("{\"type\":\"hello\",\"protocol\":1}".into()))
        .await;
    expect_close(&mut ws, ErrorCode::BadHello, 4000).await;
    still_serves(&hub, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_versions_and_bad_tokens_are_refused_with_their_codes() {
    let hub = TestHub::start().await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
    let mut ws = connect(&hub, Codec::MsgPack).await;
    ws.send(&hello(&token, 2)).await;
    expect_close(&mut ws, ErrorCode::UnsupportedVersion, 4004).await;

    let mut ws = connect(&hub, Codec::MsgPack).await;
    ws.send(&hello("not-a-token", PROTOCOL_VERSION)).await;
    expect_close(&mut ws, ErrorCode::Unauthorized, 4001).await;

    let foreign = branchline_hub::auth::TokenKeys::new(b"some-other-hub-secret-0123456789")
        .mint(&Claims::new(
            name("acme"),
            Branches::List(vec![name("b1")]),
            name("till-1"),
            Role::Cashier,
            Duration::from_secs(60),
        ))
        .unwrap();
    let mut ws = connect(&hub, Codec::MsgPack).await;
    ws.send(&hello(&foreign, PROTOCOL_VERSION)).await;
    expect_close(&mut ws, ErrorCode::Unauthorized, 4001).await;

    let mut expired = Claims::new(
        name("acme"),
        Branches::List(vec![name("b1")]),
        name("till-1"),
        Role::Cashier,
        Duration::ZERO,
    );
    expired.exp -= 3_600;
    let expired = hub.hub().keys.mint(&expired).unwrap();
    let mut ws = connect(&hub, Codec::Json).await;
    ws.send(&hello(&expired, PROTOCOL_VERSION)).await;
    expect_close(&mut ws, ErrorCode::TokenExpired, 4001).await;
    still_serves(&hub, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_with_message_too_big() {
    let hub = TestHub::start_with(|c| c.limits.max_frame_bytes = 16 * 1024).await;
    let mut ws = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    let mut big = publish("b1", 1, note(1));
    big.body = EventBody::Custom(Custom {
        custom_type: "blob".into(),
        data: serde_json::json!("x".repeat(64 * 1024)),
    });
    ws.send(&ClientFrame::Publish(big)).await;
    let (_, code) = ws.closed().await;
    assert_eq!(code, Some(1009));
    still_serves(&hub, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_after_the_hello_are_answered_and_the_session_goes_on() {
    let hub = TestHub::start().await;
    let mut ws = session(&hub, Codec::Json, &["b1"], "till-1", Role::Cashier, vec![]).await;
    let error = |f: &ServerFrame| match f {
        ServerFrame::Error(e) => Some(e.clone()),
        _ => None,
    };

    ws.send_raw(Message::Text("{not json".into())).await;
    let e = ws.until(error).await;
    assert_eq!((e.code, e.fatal), (ErrorCode::Malformed, false));

    ws.send_raw(Message::Text("{\"type\":\"teleport\"}".into()))
        .await;
    assert_eq!(ws.until(error).await.code, ErrorCode::UnknownFrameType);

    ws.send_raw(Message::Binary(vec![0x80].into())).await;
    assert_eq!(
        ws.until(error).await.code,
        ErrorCode::Malformed,
        "binary on a JSON session"
    );

    let mut bad = serde_json::to_value(ClientFrame::Publish(publish("b1", 1, note(1)))).unwrap();
    bad["kind"] = "sale.voided".into();
    let id: uuid::Uuid = bad["event_id"].as_str().unwrap().parse().unwrap();
    ws.send_raw(Message::Text(bad.to_string().into())).await;
    let rejected = ws
        .until(|f| match f {
            ServerFrame::Rejected(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (rejected.code, rejected.event_id),
        (ErrorCode::UnknownKind, Some(id))
    );

    let invalid = publish(
        "b1",
        1,
        EventBody::SaleRecorded(SaleRecorded {
            sale_id: "R".into(),
            lines: vec![],
            total: 0,
            tax: 0,
            currency: "EUR".into(),
            payments: vec![],
        }),
    );
    assert_eq!(
        ws.publish(invalid).await.unwrap_err().code,
        ErrorCode::InvalidEvent
    );

    ws.send(&hello(
        &hub.token("acme", &["b1"], "till-1", Role::Cashier),
        PROTOCOL_VERSION,
    ))
    .await;
    assert_eq!(ws.until(error).await.code, ErrorCode::ProtocolViolation);

    // Rejections used no device_seq: the next event is still number 1.
    assert_eq!(ws.publish(publish("b1", 1, note(1))).await.unwrap().seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_is_closed_by_deadlines() {
    let hub = TestHub::start_with(|c| {
        c.limits.hello_timeout = Duration::from_millis(300);
        c.limits.heartbeat = Duration::from_millis(100);
    })
    .await;
    let mut mute = connect(&hub, Codec::MsgPack).await;
    expect_close(&mut mute, ErrorCode::BadHello, 4000).await;

    // This client says hello, then neither reads (so it never answers pings) nor writes.
    let mut idle = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    expect_close(&mut idle, ErrorCode::IdleTimeout, 4005).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_session_limit_loses_its_oldest_session() {
    let hub = TestHub::start_with(|c| c.limits.max_sessions_per_device = 2).await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
    let mut first = connect(&hub, Codec::MsgPack).await;
    first.hello(&token, "acme", "till-1", vec![]).await;
    let mut second = connect(&hub, Codec::MsgPack).await;
    second.hello(&token, "acme", "till-1", vec![]).await;
    let mut third = connect(&hub, Codec::MsgPack).await;
    third.hello(&token, "acme", "till-1", vec![]).await;
    expect_close(&mut first, ErrorCode::SessionReplaced, 4006).await;
    assert_eq!(
        third.publish(publish("b1", 1, note(1))).await.unwrap().seq,
        1
    );
    assert_eq!(
        second.publish(publish("b1", 2, note(2))).await.unwrap().seq,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_subprotocol_is_refused_before_the_upgrade() {
    let hub = TestHub::start().await;
    let mut req = hub.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "branchline.v2.msgpack".parse().unwrap(),
    );
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal: {err}")
    };
    assert_eq!(response.status(), 400);
    let problem: http::Problem =
        serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(problem.code, ErrorCode::UnsupportedVersion);
}
