//! The frames the harness sends and the little it reads of the frames it receives.
//!
//! Sending: `hello` and `ack` use the protocol crate's types (they are rare); a load publish is
//! a `custom` event whose data is `{"t": <harness clock ns>, "pad": "..."}`, encoded from a
//! borrowed struct so the padding is never copied into a JSON value; a till's sale is a real
//! `sale.recorded` whose `sale_id` ends in the stamp.
//!
//! Receiving: [`Incoming`] decodes only the fields the harness checks (frame type, branch,
//! epoch, seq, the stamp, answers to publishes, error codes), borrowing strings from the
//! message; everything else in a frame is skipped, never built. The harness speaks MessagePack
//! only, the protocol's default and fast path.

use branchline_protocol::{
    Ack, ClientFrame, Codec, EncodeError, Epoch, EventBody, Hello, Name, Payment, PaymentMethod,
    Publish, SaleLine, SaleRecorded, Sku, Subscription, now_ms,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The `custom` payload type of harness events.
pub const LOAD_TYPE: &str = "branchline.load";

/// A `hello` for `device` following `subscriptions`.
pub fn hello(
    token: &str,
    tenant: &Name,
    device: &Name,
    subscriptions: Vec<Subscription>,
) -> Result<Bytes, EncodeError> {
    Codec::MsgPack.encode(&ClientFrame::Hello(Hello {
        protocol: branchline_protocol::PROTOCOL_VERSION,
        token: token.to_owned(),
        tenant: tenant.clone(),
        device: device.clone(),
        client_time_ms: now_ms(),
        subscriptions,
        agent: Some(concat!("branchline-load/", env!("CARGO_PKG_VERSION")).into()),
    }))
}

/// An `ack` of everything up to `seq`.
pub fn ack(branch: &Name, epoch: Epoch, seq: u64) -> Result<Bytes, EncodeError> {
    Codec::MsgPack.encode(&ClientFrame::Ack(Ack {
        branch: branch.clone(),
        epoch,
        seq,
    }))
}

#[derive(Serialize)]
struct PublishCustom<'a> {
    #[serde(rename = "type")]
    frame: &'static str,
    branch: &'a str,
    event_id: Uuid,
    device_seq: u64,
    client_time_ms: i64,
    kind: &'static str,
    body: CustomBody<'a>,
}

#[derive(Serialize)]
struct CustomBody<'a> {
    #[serde(rename = "type")]
    custom_type: &'static str,
    data: StampOut<'a>,
}

#[derive(Serialize)]
struct StampOut<'a> {
    t: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pad: &'a str,
}

/// What a harness publish carries.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A `custom` event padded with this many bytes.
    Custom {
        /// The padding (ASCII).
        pad: String,
    },
    /// A realistic `sale.recorded` of one to three lines.
    Sale,
}

impl Payload {
    /// A `custom` payload of about `bytes` bytes of padding.
    pub fn custom(bytes: usize) -> Self {
        Payload::Custom {
            pad: "x".repeat(bytes),
        }
    }
}

/// Appends a `publish` frame of `payload` to `buf`.
pub fn publish(
    buf: &mut Vec<u8>,
    branch: &Name,
    device: &Name,
    event_id: Uuid,
    device_seq: u64,
    stamp_ns: u64,
    payload: &Payload,
) -> Result<(), EncodeError> {
    match payload {
        Payload::Custom { pad } => Codec::MsgPack.encode_into(
            &PublishCustom {
                frame: "publish",
                branch: branch.as_str(),
                event_id,
                device_seq,
                client_time_ms: now_ms(),
                kind: "custom",
                body: CustomBody {
                    custom_type: LOAD_TYPE,
                    data: StampOut { t: stamp_ns, pad },
                },
            },
            buf,
        ),
        Payload::Sale => Codec::MsgPack.encode_into(
            &ClientFrame::Publish(sale(branch, device, event_id, device_seq, stamp_ns)),
            buf,
        ),
    }
}

/// A sale of one to three lines from a catalog of 100 SKUs; its `sale_id` ends in the stamp.
fn sale(branch: &Name, device: &Name, event_id: Uuid, device_seq: u64, stamp_ns: u64) -> Publish {
    // The event id's random bits choose the basket, so no RNG is needed here.
    let r = event_id.as_u128();
    let lines: Vec<SaleLine> = (0..1 + (r % 3) as usize)
        .map(|i| {
            let n = (r >> (8 + 16 * i)) as u16 % 100;
            SaleLine {
                sku: Sku::new(format!("SKU-{n:04}")).expect("SKU-nnnn is a valid SKU"),
                qty: 1 + i64::from(n % 3),
                unit_price: 99 + i64::from(n) * 25,
                discount: 0,
            }
        })
        .collect();
    let total = lines.iter().map(|l| l.qty * l.unit_price).sum();
    Publish {
        branch: branch.clone(),
        event_id,
        device_seq,
        client_time_ms: now_ms(),
        base_seq: None,
        base_version: None,
        body: EventBody::SaleRecorded(SaleRecorded {
            sale_id: format!("{device}-{device_seq}-{stamp_ns}"),
            lines,
            total,
            tax: total / 11,
            currency: "EUR".into(),
            payments: vec![Payment {
                method: PaymentMethod::Card,
                amount: total,
            }],
        }),
    }
}

/// The fields of a hub frame the harness looks at. Absent fields are `None`/empty; every
/// other field is skipped.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    /// The frame type.
    #[serde(rename = "type", borrow)]
    pub frame: &'a str,
    /// `event`, `events`, `caught_up`, `accepted`, `rejected`, `resync_required`.
    #[serde(default, borrow)]
    pub branch: Option<&'a str>,
    /// `event`, `events`, `caught_up`, `accepted`.
    #[serde(default, borrow)]
    pub epoch: Option<&'a str>,
    /// `event`, `caught_up`, `accepted`.
    #[serde(default)]
    pub seq: Option<u64>,
    /// `event`: the event body.
    #[serde(default, borrow)]
    pub body: Option<BodyLite<'a>>,
    /// `events`: the events.
    #[serde(default, borrow)]
    pub events: Vec<EventLite<'a>>,
    /// `accepted`, `rejected`.
    #[serde(default, borrow)]
    pub event_id: Option<&'a str>,
    /// `accepted`: the event id had been accepted before.
    #[serde(default)]
    pub duplicate: bool,
    /// `rejected`, `error`.
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
    /// `rejected`, `error`.
    #[serde(default, borrow)]
    pub message: Option<&'a str>,
    /// `error`: the hub closes the session next.
    #[serde(default)]
    pub fatal: bool,
    /// `rejected` `out_of_order` / `device_seq_reused`: the device_seq the hub expects.
    #[serde(default)]
    pub expected_device_seq: Option<u64>,
}

/// One event of an `events` frame: its seq and body.
#[derive(Debug, Deserialize)]
pub struct EventLite<'a> {
    /// The event's seq.
    pub seq: u64,
    /// The body.
    #[serde(default, borrow)]
    pub body: Option<BodyLite<'a>>,
}

/// The part of an event body that carries the harness stamp.
#[derive(Debug, Deserialize)]
pub struct BodyLite<'a> {
    /// `custom`: the data map.
    #[serde(default)]
    pub data: Option<StampLite>,
    /// `sale.recorded`: the sale id, ending in `-<stamp>`.
    #[serde(default, borrow)]
    pub sale_id: Option<&'a str>,
}

/// `custom` data of a harness event.
#[derive(Debug, Deserialize)]
pub struct StampLite {
    /// The harness clock when the event was meant to be published.
    #[serde(default)]
    pub t: Option<u64>,
}

impl BodyLite<'_> {
    /// The stamp this body carries, if it is a harness event.
    pub fn stamp(&self) -> Option<u64> {
        if let Some(t) = self.data.as_ref().and_then(|d| d.t) {
            return Some(t);
        }
        let sale_id = self.sale_id?;
        sale_id.rsplit('-').next()?.parse().ok()
    }
}

impl<'a> Incoming<'a> {
    /// Decodes the fields the harness uses from one MessagePack frame.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use branchline_protocol::{Custom, Event, ServerFrame};

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn load_publishes_are_valid_custom_events_carrying_the_stamp() {
        let mut buf = Vec::new();
        let id = Uuid::now_v7();
        let payload = Payload::custom(16);
        publish(&mut buf, &name("b1"), &name("p1"), id, 7, 123_456, &payload).unwrap();
        let ClientFrame::Publish(p) = Codec::MsgPack.decode_client_frame(&buf).unwrap() else {
            panic!("not a publish");
        };
        assert_eq!((p.event_id, p.device_seq), (id, 7));
        let EventBody::Custom(c) = &p.body else {
            panic!("not custom");
        };
        assert_eq!(c.custom_type, LOAD_TYPE);
        assert_eq!(c.data["t"], 123_456);
        assert_eq!(c.data["pad"].as_str().unwrap().len(), 16);
        p.body.validate(None, None).unwrap();
    }

    #[test]
    fn sales_are_valid_and_carry_the_stamp_in_their_id() {
        let mut buf = Vec::new();
        publish(
            &mut buf,
            &name("b1"),
            &name("till-3"),
            Uuid::now_v7(),
            9,
            987_654_321,
            &Payload::Sale,
        )
        .unwrap();
        let ClientFrame::Publish(p) = Codec::MsgPack.decode_client_frame(&buf).unwrap() else {
            panic!("not a publish");
        };
        p.body.validate(None, None).unwrap();
        let EventBody::SaleRecorded(s) = &p.body else {
            panic!("not a sale");
        };
        let lite = BodyLite {
            data: None,
            sale_id: Some(&s.sale_id),
        };
        assert_eq!(lite.stamp(), Some(987_654_321));
        assert_eq!(s.total, s.payments[0].amount);
    }

    fn event(seq: u64, t: u64) -> Event {
        Event {
            branch: name("b1"),
            epoch: Epoch(0xabc),
            seq,
            event_id: Uuid::now_v7(),
            device: name("p1"),
            device_seq: seq,
            client_time_ms: 1,
            server_time_ms: 2,
            base_seq: None,
            base_version: None,
            body: EventBody::Custom(Custom {
                custom_type: LOAD_TYPE.into(),
                data: serde_json::json!({"t": t, "pad": "xxxx"}),
            }),
            effect: Default::default(),
        }
    }

    #[test]
    fn hub_event_frames_decode_to_seq_and_stamp() {
        let one = Codec::MsgPack
            .encode(&ServerFrame::Event(Box::new(event(5, 77))))
            .unwrap();
        let f = Incoming::decode(&one).unwrap();
        assert_eq!((f.frame, f.seq, f.branch), ("event", Some(5), Some("b1")));
        assert_eq!(f.epoch, Some("0000000000000abc"));
        assert_eq!(f.body.unwrap().stamp(), Some(77));

        let stored: Vec<Bytes> = (6..9)
            .map(|s| Codec::MsgPack.encode(&event(s, s * 10)).unwrap())
            .collect();
        let batch = Codec::MsgPack.encode_event_batch(&name("b1"), Epoch(0xabc), &stored);
        let f = Incoming::decode(&batch).unwrap();
        assert_eq!(f.frame, "events");
        let got: Vec<(u64, Option<u64>)> = f
            .events
            .iter()
            .map(|e| (e.seq, e.body.as_ref().and_then(BodyLite::stamp)))
            .collect();
        assert_eq!(got, vec![(6, Some(60)), (7, Some(70)), (8, Some(80))]);
    }

    #[test]
    fn answers_and_errors_decode() {
        let accepted = Codec::MsgPack
            .encode(&ServerFrame::Accepted(branchline_protocol::Accepted {
                event_id: Uuid::nil(),
                branch: name("b1"),
                epoch: Epoch(1),
                seq: 42,
                duplicate: false,
            }))
            .unwrap();
        let f = Incoming::decode(&accepted).unwrap();
        assert_eq!((f.frame, f.seq, f.duplicate), ("accepted", Some(42), false));
        assert_eq!(f.event_id, Some("00000000-0000-0000-0000-000000000000"));
    }
}
