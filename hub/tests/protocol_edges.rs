//! The edges of PROTOCOL.md a client author meets first, each as the hub answers it: token
//! expiry (§3), bytes that are not MessagePack against values outside the data model (§1,
//! §12) on every codec path, bodies as the hub reads them and what a retry must repeat (§6,
//! §7), no `caught_up` after `resync_required` (§6), kind rules on envelope fields (§9), what
//! leaves a session going (§4, §5), and the codes of the HTTP edge cases (§11).

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use branchline_hub::auth::{Claims, TokenBranches};
use branchline_hub::protocol::http::{Problem, PushResponse, PushResult};
use branchline_hub::protocol::*;
use branchline_hub::test_util::TestHub;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// A token for till-1 of `b1` that expired two seconds ago.
fn just_expired(hub: &TestHub) -> String {
    let mut claims = Claims::new(
        name("acme"),
        TokenBranches::List(vec![name("b1")]),
        name("till-1"),
        Role::Cashier,
        Duration::ZERO,
    );
    claims.exp -= 2;
    hub.hub().keys().mint(&claims).unwrap()
}

fn hello_frame(token: &str) -> ClientFrame {
    ClientFrame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        token: token.into(),
        tenant: name("acme"),
        device: name("till-1"),
        client_time_ms: now_ms(),
        subscriptions: vec![],
        agent: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_unless_the_operator_allows_a_leeway() {
    let strict = TestHub::start().await;
    let token = just_expired(&strict);
    let mut ws = connect(&strict, Codec::MsgPack).await;
    ws.send(&hello_frame(&token)).await;
    let (error, close) = ws.closed().await;
    assert_eq!(
        (error.map(|e| e.code), close),
        (Some(ErrorCode::TokenExpired), Some(4001))
    );
    let resp = Api::new(&strict, &token)
        .get("/v1/branches/acme/b1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let problem: Problem = resp.json().await.unwrap();
    assert_eq!(problem.code, ErrorCode::TokenExpired);

    let lenient = TestHub::start_with(|c| c.token_leeway = Duration::from_secs(60)).await;
    let token = just_expired(&lenient);
    let mut ws = connect(&lenient, Codec::MsgPack).await;
    ws.hello(&token, "acme", "till-1", vec![]).await;
    let resp = Api::new(&lenient, &token)
        .get("/v1/branches/acme/b1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// MessagePack bytes of `value`.
fn mp(value: &serde_json::Value) -> Vec<u8> {
    Codec::MsgPack.encode(value).unwrap().to_vec()
}

/// A MessagePack binary value.
fn bin(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_bin(&mut out, bytes).unwrap();
    out
}

/// A MessagePack map of `fields`, each value given as its encoded bytes, so that any field
/// can hold a value of any MessagePack type.
fn map(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_map_len(&mut out, fields.len() as u32).unwrap();
    for (key, value) in fields {
        rmp::encode::write_str(&mut out, key).unwrap();
        out.extend_from_slice(value);
    }
    out
}

/// A `publish` (or, without `type`, a push's event) of `kind` with `body`.
fn raw_publish(
    frame: bool,
    event_id: Vec<u8>,
    device_seq: u64,
    kind: &str,
    body: Vec<u8>,
) -> Vec<u8> {
    let mut fields = vec![
        ("branch", mp(&json!("b1"))),
        ("event_id", event_id),
        ("device_seq", mp(&json!(device_seq))),
        ("client_time_ms", mp(&json!(now_ms()))),
        ("kind", mp(&json!(kind))),
        ("body", body),
    ];
    if frame {
        fields.insert(0, ("type", mp(&json!("publish"))));
    }
    map(&fields)
}

fn id_of(id: Uuid) -> Vec<u8> {
    mp(&json!(id.to_string()))
}

/// Custom data `{"v": <value>}`.
fn custom_with(value: Vec<u8>) -> Vec<u8> {
    map(&[
        ("type", mp(&json!("probe"))),
        ("data", map(&[("v", value)])),
    ])
}

/// A one-line sale whose `sale_id` and line `sku` are given as encoded values.
fn sale_with(sale_id: Vec<u8>, sku: Vec<u8>) -> Vec<u8> {
    let line = map(&[
        ("sku", sku),
        ("qty", mp(&json!(1))),
        ("unit_price", mp(&json!(100))),
    ]);
    let mut lines = Vec::new();
    rmp::encode::write_array_len(&mut lines, 1).unwrap();
    lines.extend_from_slice(&line);
    map(&[
        ("sale_id", sale_id),
        ("lines", lines),
        ("total", mp(&json!(100))),
        ("currency", mp(&json!("EUR"))),
    ])
}

/// The publishes outside the data model, each with the event id it can be named by.
fn outside_the_model() -> Vec<(&'static str, Option<Uuid>, bool, Vec<u8>)> {
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let float32 = {
        let mut out = Vec::new();
        rmp::encode::write_f32(&mut out, 1.5).unwrap();
        out
    };
    vec![
        (
            "binary custom data",
            Some(ids[0]),
            true,
            custom_with(bin(b"\x00\x01")),
        ),
        (
            "float32 custom data",
            Some(ids[1]),
            true,
            custom_with(float32),
        ),
        (
            "extension value",
            Some(ids[2]),
            true,
            custom_with(vec![0xd4, 7, 0]),
        ),
        (
            "binary sale_id",
            Some(ids[3]),
            false,
            sale_with(bin(b"T1-0001"), mp(&json!("TEA"))),
        ),
        (
            "binary sku",
            Some(ids[4]),
            false,
            sale_with(mp(&json!("T1-0002")), bin(b"TEA")),
        ),
        (
            "event_id as 16 raw bytes",
            None,
            true,
            custom_with(mp(&json!(1))),
        ),
    ]
}

fn encoded_publish(frame: bool, id: Option<Uuid>, custom: bool, body: Vec<u8>) -> Vec<u8> {
    let event_id = match id {
        Some(id) => id_of(id),
        None => bin(Uuid::now_v7().as_bytes()),
    };
    let kind = if custom { "custom" } else { "sale.recorded" };
    raw_publish(frame, event_id, 1, kind, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_outside_the_data_model_are_invalid_fields_on_every_path() {
    let hub = TestHub::start().await;
    let mut ws = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    for (what, id, custom, body) in outside_the_model() {
        ws.send_raw(Message::Binary(
            encoded_publish(true, id, custom, body).into(),
        ))
        .await;
        let rejected = ws
            .until(|f| match f {
                ServerFrame::Rejected(r) => Some(r.clone()),
                ServerFrame::Accepted(a) => panic!("{what} was accepted: {a:?}"),
                _ => None,
            })
            .await;
        assert_eq!(
            (rejected.code, rejected.event_id),
            (ErrorCode::InvalidField, id),
            "{what}: {}",
            rejected.message
        );
        assert_eq!(rejected.branch, Some(name("b1")), "{what}");
    }
    // A subscribe naming its branch in binary is an error like any other field's.
    ws.send_raw(Message::Binary(
        map(&[("type", mp(&json!("subscribe"))), ("branch", bin(b"b1"))]).into(),
    ))
    .await;
    let error = ws
        .until(|f| match f {
            ServerFrame::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert_eq!((error.code, error.fatal), (ErrorCode::InvalidField, false));
    // None of them used up device_seq 1.
    assert_eq!(ws.publish(publish("b1", 1, note(1))).await.unwrap().seq, 1);

    // The same events in one HTTP push are refused one by one; a good one among them passes.
    let mut events = Vec::new();
    let cases = outside_the_model();
    let good = Uuid::now_v7();
    rmp::encode::write_array_len(&mut events, cases.len() as u32 + 1).unwrap();
    for (_, id, custom, body) in &cases {
        events.extend_from_slice(&encoded_publish(false, *id, *custom, body.clone()));
    }
    // device_seq 2: the WebSocket session above used 1.
    let good_event = raw_publish(false, id_of(good), 2, "custom", custom_with(mp(&json!(2))));
    events.extend_from_slice(&good_event);
    let body = map(&[("client_time_ms", mp(&json!(now_ms()))), ("events", events)]);
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let resp = api
        .post("/v1/branches/acme/b1/events")
        .header("content-type", "application/msgpack")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: PushResponse = resp.json().await.unwrap();
    for ((what, id, ..), result) in cases.iter().zip(&answer.results) {
        match result {
            PushResult::Rejected(r) => assert_eq!(
                (r.code, r.event_id),
                (ErrorCode::InvalidField, *id),
                "{what}: {}",
                r.message
            ),
            PushResult::Accepted(a) => panic!("{what} was accepted: {a:?}"),
        }
    }
    match answer.results.last().unwrap() {
        PushResult::Accepted(a) => assert_eq!((a.event_id, a.seq), (good, 2)),
        PushResult::Rejected(r) => panic!("the good event was refused: {r:?}"),
    }
}

async fn post_body(api: &Api, content_type: &str, body: Vec<u8>) -> (u16, ErrorCode) {
    let resp = api
        .post("/v1/branches/acme/b1/events")
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let problem: Problem = resp.json().await.unwrap();
    (status, problem.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_one_value_are_malformed_and_values_that_are_not_requests_invalid() {
    let hub = TestHub::start().await;
    let mut ws = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    let mut trailing = mp(&json!({"type": "ping", "nonce": 1, "client_time_ms": 1}));
    trailing.push(0x00);
    for (what, bytes) in [
        ("the reserved marker", vec![0xc1]),
        ("a map that ends early", vec![0x81, 0xa4]),
        ("a byte after the value", trailing),
    ] {
        ws.send_raw(Message::Binary(bytes.into())).await;
        let error = ws
            .until(|f| match f {
                ServerFrame::Error(e) => Some(e.clone()),
                _ => None,
            })
            .await;
        assert_eq!(
            (error.code, error.fatal),
            (ErrorCode::Malformed, false),
            "{what}: {}",
            error.message
        );
    }
    assert_eq!(ws.publish(publish("b1", 1, note(1))).await.unwrap().seq, 1);

    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    let msgpack = "application/msgpack";
    let json = "application/json";
    for (what, content_type, body, expected) in [
        ("0xc1", msgpack, vec![0xc1], (400, ErrorCode::Malformed)),
        (
            "garbage",
            msgpack,
            b"\x93garbage".to_vec(),
            (400, ErrorCode::Malformed),
        ),
        (
            "a lone integer",
            msgpack,
            vec![0x05],
            (422, ErrorCode::InvalidField),
        ),
        (
            "a map without events",
            msgpack,
            mp(&json!({"client_time_ms": now_ms()})),
            (422, ErrorCode::InvalidField),
        ),
        (
            "events that are not an array",
            msgpack,
            mp(&json!({"client_time_ms": now_ms(), "events": 3})),
            (422, ErrorCode::InvalidField),
        ),
        (
            "JSON syntax",
            json,
            b"{\"events\": [".to_vec(),
            (400, ErrorCode::Malformed),
        ),
        (
            "a JSON number",
            json,
            b"5".to_vec(),
            (422, ErrorCode::InvalidField),
        ),
    ] {
        assert_eq!(
            post_body(&api, content_type, body).await,
            expected,
            "{what}"
        );
    }
}

/// The body of the event at `seq` of b1, as the hub serves it in JSON.
async fn stored_body(api: &Api, epoch: Epoch, seq: u64) -> serde_json::Value {
    let page: serde_json::Value = api
        .get_json(&format!(
            "/v1/branches/acme/b1/events?epoch={epoch}&after={}",
            seq - 1
        ))
        .await;
    page["events"][0]["body"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_stored_as_the_hub_reads_it_and_a_retry_is_compared_so() {
    let hub = TestHub::start().await;
    let mut ws = session(&hub, Codec::Json, &["b1"], "till-1", Role::Cashier, vec![]).await;
    let id = Uuid::now_v7();
    let time = now_ms();
    let sale = |body: serde_json::Value| {
        json!({
            "type": "publish", "branch": "b1", "event_id": id, "device_seq": 1,
            "client_time_ms": time, "kind": "sale.recorded", "body": body,
        })
    };
    let send = |frame: serde_json::Value| Message::Text(frame.to_string().into());
    let answer = |f: &ServerFrame| match f {
        ServerFrame::Accepted(a) => Some(Ok(a.clone())),
        ServerFrame::Rejected(r) => Some(Err(r.clone())),
        _ => None,
    };

    let terse = json!({
        "sale_id": "T1-1", "total": 100, "currency": "EUR", "till_mood": "sunny",
        "lines": [{"sku": "TEA", "qty": 1, "unit_price": 100}],
    });
    ws.send_raw(send(sale(terse))).await;
    let first = ws.until(answer).await.unwrap();
    let api = Api::new(&hub, &hub.token("acme", &["b1"], "till-1", Role::Cashier));
    assert_eq!(
        stored_body(&api, first.epoch, first.seq).await,
        json!({
            "sale_id": "T1-1", "total": 100, "tax": 0, "currency": "EUR", "payments": [],
            "lines": [{"sku": "TEA", "qty": 1, "unit_price": 100, "discount": 0}],
        }),
        "defaults written out, the unknown field dropped"
    );

    let spelled_out = json!({
        "sale_id": "T1-1", "total": 100, "tax": 0, "currency": "EUR", "payments": [],
        "lines": [{"sku": "TEA", "qty": 1, "unit_price": 100, "discount": 0}],
    });
    ws.send_raw(send(sale(spelled_out))).await;
    let retry = ws.until(answer).await.unwrap();
    assert_eq!((retry.seq, retry.duplicate), (first.seq, true));

    let changed = json!({
        "sale_id": "T1-1", "total": 100, "tax": 7, "currency": "EUR",
        "lines": [{"sku": "TEA", "qty": 1, "unit_price": 100}],
    });
    ws.send_raw(send(sale(changed))).await;
    assert_eq!(
        ws.until(answer).await.unwrap_err().code,
        ErrorCode::IdempotencyMismatch
    );
}

/// Frames up to the `pong` answering a ping sent now.
async fn frames_until_pong(ws: &mut Ws) -> Vec<ServerFrame> {
    ws.send(&ClientFrame::Ping(Ping {
        nonce: 77,
        client_time_ms: now_ms(),
    }))
    .await;
    let mut seen = Vec::new();
    loop {
        match ws.frame().await {
            ServerFrame::Pong(p) if p.nonce == 77 => return seen,
            frame => seen.push(frame),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_needs_a_resync_gets_no_caught_up() {
    let hub = TestHub::start().await;
    let mut till = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    till.publish(publish("b1", 1, note(1))).await.unwrap();
    let stale = || Subscription {
        branch: name("b1"),
        from: Some(Position::new(Epoch(0x0bad), 1)),
    };

    let mut ws = connect(&hub, Codec::MsgPack).await;
    let welcome = ws
        .hello(
            &hub.token("acme", &["b1"], "till-2", Role::Cashier),
            "acme",
            "till-2",
            vec![stale()],
        )
        .await;
    assert_eq!(welcome.branches[0].mode, StartMode::ResyncRequired);
    let mut after_hello = frames_until_pong(&mut ws).await;
    assert!(matches!(
        after_hello.remove(0),
        ServerFrame::ResyncRequired(r) if r.reason == ResyncReason::EpochMismatch
    ));
    assert!(
        after_hello.is_empty(),
        "nothing more for b1: {after_hello:?}"
    );

    ws.send(&ClientFrame::Subscribe(stale())).await;
    let frames = frames_until_pong(&mut ws).await;
    assert!(
        matches!(
            &frames[..],
            [ServerFrame::Subscribed(s), ServerFrame::ResyncRequired(_)]
                if s.mode == StartMode::ResyncRequired
        ),
        "subscribed and resync_required, and no caught_up: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_that_needs_an_envelope_field_refuses_its_absence_as_invalid_event() {
    let hub = TestHub::start().await;
    let mut ws = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        vec![],
    )
    .await;
    let count = publish(
        "b1",
        1,
        EventBody::StockCounted(StockCounted {
            sku: sku("TEA"),
            counted: 3,
        }),
    );
    assert_eq!(
        ws.publish(count).await.unwrap_err().code,
        ErrorCode::InvalidEvent
    );
    let upsert = publish(
        "b1",
        1,
        EventBody::ProductUpserted(ProductUpserted {
            sku: sku("TEA"),
            fields: ProductFields {
                name: Some("Tea".into()),
                ..Default::default()
            },
        }),
    );
    assert_eq!(
        ws.publish(upsert).await.unwrap_err().code,
        ErrorCode::InvalidEvent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscribes_and_messages_of_the_other_kind_leave_the_session_going() {
    let hub = TestHub::start().await;
    let follow_b1 = vec![Subscription {
        branch: name("b1"),
        from: None,
    }];
    let mut ws = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-1",
        Role::Cashier,
        follow_b1,
    )
    .await;
    let error = |f: &ServerFrame| match f {
        ServerFrame::Error(e) => Some(e.clone()),
        _ => None,
    };
    ws.send(&ClientFrame::Subscribe(Subscription {
        branch: name("b2"),
        from: None,
    }))
    .await;
    let e = ws.until(error).await;
    assert_eq!((e.code, e.fatal), (ErrorCode::Forbidden, false));
    ws.send_raw(Message::Text("{\"type\":\"ping\"}".into()))
        .await;
    let e = ws.until(error).await;
    assert_eq!(
        (e.code, e.fatal),
        (ErrorCode::Malformed, false),
        "text on a MessagePack session"
    );
    // Still following b1: another till's event arrives.
    let mut other = session(
        &hub,
        Codec::MsgPack,
        &["b1"],
        "till-2",
        Role::Cashier,
        vec![],
    )
    .await;
    other.publish(publish("b1", 1, note(1))).await.unwrap();
    assert_eq!(ws.events_through("b1", 1).await.len(), 1);

    // Before the hello, a message of the other kind is a bad hello.
    let mut fresh = connect(&hub, Codec::MsgPack).await;
    fresh
        .send_raw(Message::Text(
            serde_json::to_string(&hello_frame("t")).unwrap().into(),
        ))
        .await;
    let (error, close) = fresh.closed().await;
    assert_eq!(
        (error.map(|e| e.code), close),
        (Some(ErrorCode::BadHello), Some(4000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_edge_cases_have_their_codes() {
    let hub = TestHub::start().await;
    let api = Api::new(
        &hub,
        &hub.token("acme", &["b1", "b2"], "till-1", Role::Cashier),
    );
    let elsewhere = publish("b2", 1, note(1));
    let id = elsewhere.event_id;
    let r = api.push("acme", "b1", vec![elsewhere]).await;
    match &r.results[0] {
        PushResult::Rejected(r) => {
            assert_eq!((r.code, r.event_id), (ErrorCode::InvalidField, Some(id)));
        }
        other => panic!("an event of b2 pushed to b1 was {other:?}"),
    }

    for (path, expected) in [
        (
            "/v1/branches/acme/b1/events?after=5",
            (422, ErrorCode::InvalidField),
        ),
        (
            "/v1/branches/acme/b1/snapshot?page_token=not-a-token",
            (410, ErrorCode::SnapshotExpired),
        ),
    ] {
        let resp = api.get(path).send().await.unwrap();
        let status = resp.status().as_u16();
        let problem: Problem = resp.json().await.unwrap();
        assert_eq!((status, problem.code), expected, "{path}");
    }
}
