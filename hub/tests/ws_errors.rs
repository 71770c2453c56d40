//! Bad input over WebSocket gets the documented error and close codes (PROTOCOL.md §12, §13),
//! publishes past the rate limit are refused (§14), and the hub keeps serving everyone else.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use branchline_hub::auth::{Claims, TokenBranches};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use futures::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
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
            TokenBranches::List(vec![name("b1")]),
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
        TokenBranches::List(vec![name("b1")]),
        name("till-1"),
        Role::Cashier,
        Duration::ZERO,
    );
    expired.exp -= 3_600;
    let expired = hub.hub().keys().mint(&expired).unwrap();
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

    // This client says hello, then goes silent: it reads on, but nothing it writes (its
    // answers to the hub's pings included) reaches the hub any more.
    let (mut idle, mute) = muted_session(&hub, "till-1").await;
    mute.store(true, Ordering::Release);
    let (error, code) = closed(&mut idle).await;
    let error = error.expect("an error frame before the close");
    assert_eq!(
        (error.code, error.fatal, code),
        (ErrorCode::IdleTimeout, true, Some(4005))
    );
    still_serves(&hub, 1).await;
}

/// A client socket whose writes can be silenced: once muted, whatever it writes (pongs
/// included) is dropped, like the packets of a till that vanished without closing.
struct Mutable {
    inner: tokio::net::TcpStream,
    muted: Arc<AtomicBool>,
}

impl AsyncRead for Mutable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Mutable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.muted.load(Ordering::Acquire) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.muted.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A session of `device` on a [`Mutable`] socket, welcomed; returns it and its mute switch.
async fn muted_session(hub: &TestHub, device: &str) -> (WebSocketStream<Mutable>, Arc<AtomicBool>) {
    let muted = Arc::new(AtomicBool::new(false));
    let inner = tokio::net::TcpStream::connect(hub.addr()).await.unwrap();
    let mut req = hub.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        Codec::MsgPack.subprotocol().parse().unwrap(),
    );
    let stream = Mutable {
        inner,
        muted: muted.clone(),
    };
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let token = hub.token("acme", &["b1"], device, Role::Cashier);
    let frame = Codec::MsgPack
        .encode(&hello(&token, PROTOCOL_VERSION))
        .unwrap();
    ws.send(Message::Binary(frame)).await.unwrap();
    match next_frame(&mut ws).await {
        Some(ServerFrame::Welcome(_)) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
    (ws, muted)
}

/// The next hub frame, or `None` once the session is closed.
async fn next_frame(ws: &mut WebSocketStream<Mutable>) -> Option<ServerFrame> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        match msg {
            Some(Ok(Message::Binary(bytes))) => {
                return Some(Codec::MsgPack.decode_server_frame(&bytes).unwrap());
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Reads until the hub closes; returns its last error frame and the close code.
async fn closed(ws: &mut WebSocketStream<Mutable>) -> (Option<ErrorFrame>, Option<u16>) {
    let mut error = None;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the close in time");
        match msg {
            Some(Ok(Message::Binary(bytes))) => {
                if let ServerFrame::Error(e) = Codec::MsgPack.decode_server_frame(&bytes).unwrap() {
                    error = Some(e);
                }
            }
            Some(Ok(Message::Close(frame))) => return (error, frame.map(|f| u16::from(f.code))),
            Some(Err(_)) | None => return (error, None),
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_the_rate_are_rejected_rate_limited_and_change_nothing() {
    let hub = TestHub::start_with(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 3;
    })
    .await;
    let live = vec![Subscription {
        branch: name("b1"),
        from: None,
    }];
    let mut follower = session(&hub, Codec::MsgPack, &["b1"], "till-2", Role::Cashier, live).await;
    let mut till = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;

    // Ten publishes at once: the burst is three, and one more is allowed per second.
    let sent: Vec<Publish> = (1..=10).map(|i| publish("b1", i, note(i))).collect();
    for p in &sent {
        till.send(&ClientFrame::Publish(p.clone())).await;
    }
    let mut answers = Vec::new();
    while answers.len() < sent.len() {
        answers.push(
            till.until(|f| match f {
                ServerFrame::Accepted(a) => Some(Ok(a.clone())),
                ServerFrame::Rejected(r) => Some(Err(r.clone())),
                _ => None,
            })
            .await,
        );
    }
    for (p, answer) in sent.iter().zip(&answers) {
        let id = match answer {
            Ok(a) => a.event_id,
            Err(r) => r.event_id.unwrap(),
        };
        assert_eq!(id, p.event_id, "answers come in publish order");
    }
    let accepted = answers.iter().take_while(|a| a.is_ok()).count();
    assert!(accepted >= 3, "the burst is served: {answers:?}");
    for (i, answer) in answers[..accepted].iter().enumerate() {
        assert_eq!(answer.as_ref().unwrap().seq, i as u64 + 1);
    }
    let limited = answers[accepted].as_ref().unwrap_err();
    assert_eq!(
        (limited.code, limited.expected_device_seq),
        (ErrorCode::RateLimited, None)
    );
    // A token may come back during the flood; a publish after the limited one then skips its
    // device_seq and is refused for that. Nothing after the limited one is applied.
    for answer in &answers[accepted..] {
        let r = answer.as_ref().unwrap_err();
        assert!(
            r.code == ErrorCode::RateLimited
                || (r.code == ErrorCode::OutOfOrder
                    && r.expected_device_seq == Some(accepted as u64 + 1)),
            "{r:?}"
        );
    }

    // Others publish as before, and the log holds exactly what was accepted.
    let mut other = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-3",
        Role::Cashier,
        vec![],
    )
    .await;
    let theirs = other.publish(publish("b1", 1, note(100))).await.unwrap();
    assert_eq!(theirs.seq, accepted as u64 + 1);
    // The limited session goes on: once the rate allows, its refused event is accepted.
    let retry = sent[accepted].clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    let again = loop {
        match till.publish(retry.clone()).await {
            Ok(a) => break a,
            Err(r) if r.code == ErrorCode::RateLimited => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the rate never allowed a publish"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(r) => panic!("{r:?}"),
        }
    };
    assert_eq!((again.seq, again.duplicate), (accepted as u64 + 2, false));
    let seen = follower.events_through("b1", again.seq).await;
    assert_contiguous(&seen, 1, again.seq);
    let mut ids: Vec<uuid::Uuid> = answers[..accepted]
        .iter()
        .map(|a| a.as_ref().unwrap().event_id)
        .collect();
    ids.extend([theirs.event_id, again.event_id]);
    assert_eq!(seen.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
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
