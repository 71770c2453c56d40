//! One fixed sample of every frame and HTTP body, shared by the golden tests and the check
//! that PROTOCOL.md's examples decode.

#![allow(dead_code)] // each test binary uses part of this module

use branchline_protocol::http::*;
use branchline_protocol::*;
use serde_json::json;
use uuid::Uuid;

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

pub const EPOCH: Epoch = Epoch(0x5f3a_9c1e_07b2_44d1);
pub const T0: i64 = 1_795_000_000_000;

pub fn event_id(n: u8) -> Uuid {
    Uuid::parse_str(&format!("019a6e2c-3b4f-7c1d-8e2a-5b6c7d8e9f{n:02x}")).unwrap()
}

pub fn sale() -> EventBody {
    EventBody::SaleRecorded(SaleRecorded {
        sale_id: "T1-000482".into(),
        lines: vec![
            SaleLine {
                sku: sku("COFFEE-250G"),
                qty: 2,
                unit_price: 899,
                discount: 0,
            },
            SaleLine {
                sku: sku("MILK-1L"),
                qty: 1,
                unit_price: 129,
                discount: 20,
            },
        ],
        total: 1907,
        tax: 174,
        currency: "EUR".into(),
        payments: vec![Payment {
            method: PaymentMethod::Card,
            amount: 1907,
        }],
    })
}

pub fn product() -> ProductRecord {
    ProductRecord {
        sku: sku("COFFEE-250G"),
        version: 4,
        removed: false,
        name: "Ground coffee 250 g".into(),
        price: 899,
        barcode: Some("4006381333931".into()),
        category: Some("coffee".into()),
        tax_code: Some("reduced".into()),
        unit: Unit::Piece,
        updated_at_ms: T0 - 60_000,
        updated_by: name("admin-console"),
    }
}

pub fn publish() -> Publish {
    Publish {
        branch: name("berlin-01"),
        event_id: event_id(1),
        device_seq: 42,
        client_time_ms: T0,
        base_seq: None,
        base_version: None,
        body: sale(),
    }
}

pub fn event() -> Event {
    Event {
        branch: name("berlin-01"),
        epoch: EPOCH,
        seq: 1187,
        event_id: event_id(1),
        device: name("till-1"),
        device_seq: 42,
        client_time_ms: T0,
        server_time_ms: T0 + 35,
        base_seq: None,
        base_version: None,
        body: sale(),
        effect: Effect {
            stock: vec![
                StockLevel::new(sku("COFFEE-250G"), 11),
                StockLevel::new(sku("MILK-1L"), -1),
            ],
            product: None,
            conflict: None,
        },
    }
}

fn device_info() -> DeviceInfo {
    DeviceInfo {
        device: name("till-1"),
        role: Role::Cashier,
        online: true,
        sessions: 1,
        last_seen_ms: T0 + 40,
        acked_seq: Some(1180),
        lag: Some(7),
        last_device_seq: 42,
    }
}

fn conflict_record() -> ConflictRecord {
    ConflictRecord {
        id: event_id(9),
        branch: name("berlin-01"),
        sku: sku("COFFEE-250G"),
        kind: EventKind::ProductUpserted,
        status: ConflictStatus::Open,
        policy: ConflictPolicy::Manual,
        outcome: ConflictOutcome::Held,
        device: name("till-2"),
        event_id: event_id(3),
        seq: Some(1190),
        detected_at_ms: T0 + 500,
        base_version: 3,
        server: Some(product()),
        client: EventBody::ProductUpserted(ProductUpserted {
            sku: sku("COFFEE-250G"),
            fields: ProductFields {
                price: Some(949),
                ..Default::default()
            },
        }),
        contested: vec![ProductField::Price],
        resolution: None,
        resolved_by: None,
        resolved_at_ms: None,
        resolution_seq: None,
    }
}

fn accepted() -> Accepted {
    Accepted {
        event_id: event_id(1),
        branch: name("berlin-01"),
        epoch: EPOCH,
        seq: 1187,
        duplicate: false,
    }
}

fn rejected() -> Rejected {
    Rejected {
        event_id: Some(event_id(2)),
        branch: Some(name("berlin-01")),
        code: ErrorCode::OutOfOrder,
        message: "device_seq 45 skips ahead; expected 43".into(),
        expected_device_seq: Some(43),
        conflict: None,
    }
}

fn resync() -> ResyncRequired {
    ResyncRequired {
        branch: name("berlin-01"),
        reason: ResyncReason::BelowFloor,
        epoch: EPOCH,
        head: 1187,
        floor: 1000,
    }
}

fn branch_start(mode: StartMode) -> BranchStart {
    BranchStart {
        branch: name("berlin-01"),
        epoch: EPOCH,
        head: 1187,
        floor: 0,
        mode,
        last_device_seq: 41,
    }
}

/// Every client frame, by wire type.
pub fn client_frames() -> Vec<(&'static str, ClientFrame)> {
    vec![
        (
            "hello",
            ClientFrame::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                token: "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnQiOiJhY21lIn0.c2lnbmF0dXJl".into(),
                tenant: name("acme"),
                device: name("till-1"),
                client_time_ms: T0,
                subscriptions: vec![Subscription {
                    branch: name("berlin-01"),
                    from: Some(Position::new(EPOCH, 1180)),
                }],
                agent: Some("branchline-client/0.1.0".into()),
            }),
        ),
        ("publish", ClientFrame::Publish(publish())),
        (
            "subscribe",
            ClientFrame::Subscribe(Subscription {
                branch: name("berlin-02"),
                from: None,
            }),
        ),
        (
            "unsubscribe",
            ClientFrame::Unsubscribe(Unsubscribe {
                branch: name("berlin-02"),
            }),
        ),
        (
            "ack",
            ClientFrame::Ack(Ack {
                branch: name("berlin-01"),
                epoch: EPOCH,
                seq: 1187,
            }),
        ),
        (
            "list_devices",
            ClientFrame::ListDevices(ListDevices {
                branch: name("berlin-01"),
            }),
        ),
        (
            "ping",
            ClientFrame::Ping(Ping {
                nonce: 17,
                client_time_ms: T0,
            }),
        ),
    ]
}

/// Every server frame, by wire type.
pub fn server_frames() -> Vec<(&'static str, ServerFrame)> {
    vec![
        (
            "welcome",
            ServerFrame::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                session_id: event_id(7),
                server_time_ms: T0 + 12,
                heartbeat_ms: 15_000,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES as u64,
                role: Role::Cashier,
                branches: vec![branch_start(StartMode::Replay)],
            }),
        ),
        (
            "subscribed",
            ServerFrame::Subscribed(branch_start(StartMode::Live)),
        ),
        (
            "unsubscribed",
            ServerFrame::Unsubscribed(Unsubscribe {
                branch: name("berlin-02"),
            }),
        ),
        ("event", ServerFrame::Event(Box::new(event()))),
        (
            "events",
            ServerFrame::Events(EventBatch {
                branch: name("berlin-01"),
                epoch: EPOCH,
                events: vec![event()],
            }),
        ),
        (
            "caught_up",
            ServerFrame::CaughtUp(CaughtUp {
                branch: name("berlin-01"),
                epoch: EPOCH,
                seq: 1187,
            }),
        ),
        ("accepted", ServerFrame::Accepted(accepted())),
        ("rejected", ServerFrame::Rejected(rejected())),
        ("resync_required", ServerFrame::ResyncRequired(resync())),
        (
            "presence",
            ServerFrame::Presence(Presence {
                branch: name("berlin-01"),
                change: PresenceChange::Joined,
                device: device_info(),
            }),
        ),
        (
            "devices",
            ServerFrame::Devices(Devices {
                branch: name("berlin-01"),
                head: 1187,
                devices: vec![device_info()],
            }),
        ),
        (
            "error",
            ServerFrame::Error(ErrorFrame {
                code: ErrorCode::TokenExpired,
                message: "token expired at 1794999000000".into(),
                fatal: true,
            }),
        ),
        (
            "pong",
            ServerFrame::Pong(Pong {
                nonce: 17,
                client_time_ms: T0,
                server_time_ms: T0 + 3,
            }),
        ),
    ]
}

/// The `k`th publish of till-1 after the sale sample (`k` from 1), of `body`.
fn publish_of(k: u8, base_seq: Option<u64>, base_version: Option<u64>, body: EventBody) -> Publish {
    Publish {
        event_id: event_id(0x10 + k),
        device_seq: 42 + u64::from(k),
        client_time_ms: T0 + 60_000 * i64::from(k),
        base_seq,
        base_version,
        body,
        ..publish()
    }
}

/// A `publish` of every kind a client may publish but `sale.recorded` (that one is the
/// `client_publish` sample), by golden name.
pub fn publish_samples() -> Vec<(&'static str, ClientFrame)> {
    vec![
        (
            "client_publish_stock_adjusted",
            ClientFrame::Publish(publish_of(
                1,
                None,
                None,
                EventBody::StockAdjusted(StockAdjusted {
                    sku: sku("COFFEE-250G"),
                    delta: 24,
                    reason: AdjustReason::Receipt,
                    note: Some("delivery note 2291".into()),
                }),
            )),
        ),
        (
            "client_publish_stock_counted",
            ClientFrame::Publish(publish_of(
                2,
                Some(1180),
                None,
                EventBody::StockCounted(StockCounted {
                    sku: sku("MILK-1L"),
                    counted: 36,
                }),
            )),
        ),
        (
            "client_publish_product_upserted",
            ClientFrame::Publish(publish_of(
                3,
                None,
                Some(4),
                EventBody::ProductUpserted(ProductUpserted {
                    sku: sku("COFFEE-250G"),
                    fields: ProductFields {
                        price: Some(949),
                        barcode: Some(String::new()),
                        ..Default::default()
                    },
                }),
            )),
        ),
        (
            "client_publish_product_removed",
            ClientFrame::Publish(publish_of(
                4,
                None,
                Some(2),
                EventBody::ProductRemoved(ProductRemoved {
                    sku: sku("MILK-1L"),
                }),
            )),
        ),
        (
            "client_publish_custom",
            ClientFrame::Publish(publish_of(
                5,
                None,
                None,
                EventBody::Custom(Custom {
                    custom_type: "loyalty.points_awarded".into(),
                    data: json!({ "card": "L-2291", "points": 19, "rate": 0.5 }),
                }),
            )),
        ),
    ]
}

/// The catalog sample after an admin's merged resolution.
fn resolved_product() -> ProductRecord {
    ProductRecord {
        version: 5,
        price: 929,
        updated_at_ms: T0 + 90_000,
        ..product()
    }
}

/// `event` frames whose bodies and effects the `server_event` sample does not show: a catalog
/// write that met a conflict (merged) and a hub-made `conflict.resolved`, by golden name.
pub fn event_samples() -> Vec<(&'static str, ServerFrame)> {
    let merged = Event {
        seq: 1195,
        event_id: event_id(0x21),
        device: name("till-2"),
        device_seq: 17,
        client_time_ms: T0 + 400,
        server_time_ms: T0 + 500,
        base_version: Some(3),
        body: EventBody::ProductUpserted(ProductUpserted {
            sku: sku("COFFEE-250G"),
            fields: ProductFields {
                price: Some(949),
                category: Some("coffee-beans".into()),
                ..Default::default()
            },
        }),
        effect: Effect {
            stock: vec![],
            product: Some(ProductRecord {
                version: 5,
                category: Some("coffee-beans".into()),
                updated_at_ms: T0 + 400,
                updated_by: name("till-2"),
                ..product()
            }),
            conflict: Some(ConflictNote {
                id: event_id(0x22),
                policy: ConflictPolicy::Merge,
                outcome: ConflictOutcome::Merged,
                contested: vec![ProductField::Price],
            }),
        },
        ..event()
    };
    let resolved = Event {
        seq: 1201,
        event_id: event_id(0x20),
        device: name("hub"),
        device_seq: 0,
        client_time_ms: T0 + 90_000,
        server_time_ms: T0 + 90_000,
        body: EventBody::ConflictResolved(ConflictResolved {
            conflict_id: event_id(9),
            sku: sku("COFFEE-250G"),
            resolution: Resolution::Merged,
            resolved_by: name("admin-console"),
            product: Some(resolved_product()),
        }),
        effect: Effect {
            stock: vec![],
            product: Some(resolved_product()),
            conflict: None,
        },
        ..event()
    };
    vec![
        (
            "server_event_product_merged",
            ServerFrame::Event(Box::new(merged)),
        ),
        (
            "server_event_conflict_resolved",
            ServerFrame::Event(Box::new(resolved)),
        ),
    ]
}

/// One HTTP body encoded in both codecs: `(name, json, msgpack)`.
pub type Encoded = (&'static str, bytes::Bytes, bytes::Bytes);

/// Encodes `value` with both codecs, checking on the way that each decodes back to it.
fn enc<T>(name: &'static str, value: &T) -> Encoded
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = Codec::Json.encode(value).unwrap();
    let msgpack = Codec::MsgPack.encode(value).unwrap();
    assert_eq!(
        &Codec::Json.decode::<T>(&json).unwrap(),
        value,
        "{name} via JSON"
    );
    assert_eq!(
        &Codec::MsgPack.decode::<T>(&msgpack).unwrap(),
        value,
        "{name} via MessagePack"
    );
    (name, json, msgpack)
}

/// Every HTTP body, encoded (and round-tripped) in both codecs.
pub fn http_bodies() -> Vec<Encoded> {
    vec![
        enc(
            "http_events_page",
            &EventsPage {
                branch: name("berlin-01"),
                epoch: EPOCH,
                head: 1187,
                floor: 0,
                events: vec![event()],
                next_after: 1187,
                has_more: false,
            },
        ),
        enc(
            "http_push_request",
            &PushRequest {
                client_time_ms: T0,
                events: vec![publish()],
            },
        ),
        enc(
            "http_push_response",
            &PushResponse {
                branch: name("berlin-01"),
                epoch: EPOCH,
                results: vec![
                    PushResult::Accepted(accepted()),
                    PushResult::Rejected(rejected()),
                ],
            },
        ),
        enc(
            "http_snapshot_page",
            &SnapshotPage {
                branch: name("berlin-01"),
                epoch: EPOCH,
                at_seq: 1187,
                total_items: 2,
                items: vec![
                    SnapshotItem {
                        product: Some(product()),
                        stock: Some(StockLevel::new(sku("COFFEE-250G"), 11)),
                    },
                    SnapshotItem {
                        product: None,
                        stock: Some(StockLevel::new(sku("MILK-1L"), -1)),
                    },
                ],
                next_page_token: Some("AAAAAAAAAAFDT0ZGRUUtMjUwRw".into()),
                expires_at_ms: T0 + 600_000,
            },
        ),
        enc("http_time", &TimeResponse { server_time_ms: T0 }),
        enc(
            "http_branch_status",
            &BranchStatus {
                tenant: name("acme"),
                branch: name("berlin-01"),
                epoch: EPOCH,
                head: 1187,
                floor: 0,
                events_per_s: 3.5,
                devices_online: 3,
                sessions: 4,
                oversold_skus: 1,
                open_conflicts: 1,
            },
        ),
        enc(
            "http_devices",
            &Devices {
                branch: name("berlin-01"),
                head: 1187,
                devices: vec![device_info()],
            },
        ),
        enc(
            "http_conflicts",
            &ConflictsPage {
                branch: name("berlin-01"),
                conflicts: vec![conflict_record()],
            },
        ),
        enc(
            "http_resolve_request",
            &ResolveRequest {
                resolution: Resolution::Merged,
                fields: Some(ProductFields {
                    price: Some(929),
                    ..Default::default()
                }),
            },
        ),
        enc(
            "http_resolve_response",
            &ResolveResponse {
                conflict: ConflictRecord {
                    status: ConflictStatus::Resolved,
                    outcome: ConflictOutcome::Resolved,
                    resolution: Some(Resolution::Merged),
                    resolved_by: Some(name("admin-console")),
                    resolved_at_ms: Some(T0 + 90_000),
                    resolution_seq: Some(1201),
                    ..conflict_record()
                },
                epoch: EPOCH,
                seq: 1201,
            },
        ),
        enc(
            "http_problem",
            &Problem {
                status: 409,
                code: ErrorCode::ResyncRequired,
                message: "position 900 is below the floor 1000; take a snapshot".into(),
                resync: Some(resync()),
            },
        ),
    ]
}

/// A JSON value a client in another language might send, for tests of lenient decoding.
pub fn publish_json_with_unknown_field() -> serde_json::Value {
    json!({
        "type": "publish", "branch": "berlin-01", "event_id": event_id(1).to_string(),
        "device_seq": 42, "client_time_ms": T0, "kind": "custom",
        "body": {"type": "note", "data": {"text": "hi"}}, "x_future_field": [1, 2, 3]
    })
}
