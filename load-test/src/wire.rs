//! The frames the harness sends and the little it reads of the frames it receives.
//!
//! Sending: `hello` and `ack` use the protocol crate's types (they are rare); a load publish is
//! a `custom` event whose data is `{"t": <harness clock ns>, "pad": "..."}`, encoded from a
//! borrowed struct so the padding is never copied into a JSON value; a till's sale is a real
//! `sale.recorded` whose `sale_id` ends in the stamp.
//!
//! Receiving: [`Incoming::decode`] reads only the fields the harness checks (frame type,
//! branch, epoch, seq, the stamp, answers to publishes, error codes), borrowing strings from
//! the message; everything else in a frame is skipped by length, never built. The harness
//! speaks MessagePack only, the protocol's default and fast path.

use branchline_protocol::{
    Ack, ClientFrame, Codec, EncodeError, Epoch, EventBody, Hello, Name, Payment, PaymentMethod,
    Publish, SaleLine, SaleRecorded, Sku, Subscription, now_ms,
};
use bytes::Bytes;
use rmp::Marker;
use serde::Serialize;
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
#[derive(Debug, Default)]
pub struct Incoming<'a> {
    /// The frame type.
    pub frame: &'a str,
    /// `event`, `events`, `caught_up`, `accepted`, `rejected`, `resync_required`.
    pub branch: Option<&'a str>,
    /// `event`, `events`, `caught_up`, `accepted`.
    pub epoch: Option<&'a str>,
    /// `event`, `caught_up`, `accepted`.
    pub seq: Option<u64>,
    /// `event`: when the hub sequenced it (its wall clock, ms).
    pub server_time_ms: Option<u64>,
    /// `event`: the event body.
    pub body: Option<BodyLite<'a>>,
    /// `events`: the events.
    pub events: Vec<EventLite<'a>>,
    /// `accepted`, `rejected`.
    pub event_id: Option<&'a str>,
    /// `accepted`: the event id had been accepted before.
    pub duplicate: bool,
    /// `rejected`, `error`.
    pub code: Option<&'a str>,
    /// `rejected`, `error`.
    pub message: Option<&'a str>,
    /// `error`: the hub closes the session next.
    pub fatal: bool,
    /// `rejected` `out_of_order` / `device_seq_reused`: the device_seq the hub expects.
    pub expected_device_seq: Option<u64>,
}

/// One event of an `events` frame: its seq and body.
#[derive(Debug, Default)]
pub struct EventLite<'a> {
    /// The event's seq.
    pub seq: u64,
    /// When the hub sequenced it (its wall clock, ms).
    pub server_time_ms: Option<u64>,
    /// The body.
    pub body: Option<BodyLite<'a>>,
}

/// The part of an event body that carries the harness stamp.
#[derive(Debug, Default)]
pub struct BodyLite<'a> {
    /// `custom`: `data.t`, the harness clock when the event was meant to be published.
    pub t: Option<u64>,
    /// `sale.recorded`: the sale id, ending in `-<stamp>`.
    pub sale_id: Option<&'a str>,
}

impl BodyLite<'_> {
    /// The stamp this body carries, if it is a harness event.
    pub fn stamp(&self) -> Option<u64> {
        if let Some(t) = self.t {
            return Some(t);
        }
        let sale_id = self.sale_id?;
        sale_id.rsplit('-').next()?.parse().ok()
    }
}

/// Why a hub frame could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SkimError {
    /// The message ends inside a value.
    #[error("the frame ends early")]
    Eof,
    /// A value of another type than the field needs, or a reserved marker.
    #[error("unexpected MessagePack marker 0x{0:02x}")]
    Unexpected(u8),
    /// Nesting deeper than any frame has.
    #[error("the frame nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A string the harness keeps is not UTF-8.
    #[error("a string is not UTF-8")]
    Utf8,
    /// The frame has no `type`.
    #[error("the frame has no type")]
    NoType,
}

/// Deepest nesting skipped (frames nest a few levels; custom data could nest more).
const MAX_DEPTH: u32 = 64;

/// A MessagePack reader over one message that decodes only what it is asked for and skips
/// the rest by length, without building values or checking strings it does not keep. This is
/// the harness's hot path (hundreds of thousands of events a second); serde's field matching
/// and UTF-8 checks of every key cost it a third of its CPU.
struct Skim<'a> {
    buf: &'a [u8],
}

impl<'a> Skim<'a> {
    fn byte(&mut self) -> Result<u8, SkimError> {
        let (&b, rest) = self.buf.split_first().ok_or(SkimError::Eof)?;
        self.buf = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SkimError> {
        if self.buf.len() < n {
            return Err(SkimError::Eof);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn be(&mut self, n: usize) -> Result<u64, SkimError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn len(&mut self, n: usize) -> Result<usize, SkimError> {
        usize::try_from(self.be(n)?).map_err(|_| SkimError::Eof)
    }

    /// The next value's marker, and its length for strings, binaries, arrays and maps.
    fn head(&mut self) -> Result<(u8, Marker, usize), SkimError> {
        let b = self.byte()?;
        let m = Marker::from_u8(b);
        let n = match m {
            Marker::FixStr(n) | Marker::FixArray(n) | Marker::FixMap(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => self.len(1)?,
            Marker::Str16 | Marker::Bin16 | Marker::Array16 | Marker::Map16 => self.len(2)?,
            Marker::Str32 | Marker::Bin32 | Marker::Array32 | Marker::Map32 => self.len(4)?,
            _ => 0,
        };
        Ok((b, m, n))
    }

    fn skip(&mut self, depth: u32) -> Result<(), SkimError> {
        if depth > MAX_DEPTH {
            return Err(SkimError::TooDeep);
        }
        let (b, m, n) = self.head()?;
        let data = match m {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => n,
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => n,
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::Ext8 => self.len(1)? + 1,
            Marker::Ext16 => self.len(2)? + 1,
            Marker::Ext32 => self.len(4)? + 1,
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
                0
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                for _ in 0..2 * n {
                    self.skip(depth + 1)?;
                }
                0
            }
            Marker::Reserved => return Err(SkimError::Unexpected(b)),
        };
        self.take(data).map(|_| ())
    }

    /// A map's length (`None` for nil).
    fn map(&mut self) -> Result<Option<usize>, SkimError> {
        match self.head()? {
            (_, Marker::FixMap(_) | Marker::Map16 | Marker::Map32, n) => Ok(Some(n)),
            (_, Marker::Null, _) => Ok(None),
            (b, ..) => Err(SkimError::Unexpected(b)),
        }
    }

    /// A string's bytes, unchecked (for keys compared against ASCII names).
    fn raw_str(&mut self) -> Result<&'a [u8], SkimError> {
        match self.head()? {
            (_, Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32, n) => {
                self.take(n)
            }
            (b, ..) => Err(SkimError::Unexpected(b)),
        }
    }

    /// A string (`None` for nil).
    fn str(&mut self) -> Result<Option<&'a str>, SkimError> {
        if self.buf.first() == Some(&0xc0) {
            self.buf = &self.buf[1..];
            return Ok(None);
        }
        let bytes = self.raw_str()?;
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| SkimError::Utf8)
    }

    /// A non-negative integer (`None` for nil).
    fn uint(&mut self) -> Result<Option<u64>, SkimError> {
        let b = self.byte()?;
        let v = match Marker::from_u8(b) {
            Marker::FixPos(v) => u64::from(v),
            Marker::U8 => self.be(1)?,
            Marker::U16 => self.be(2)?,
            Marker::U32 => self.be(4)?,
            Marker::U64 => self.be(8)?,
            Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
                let width = match Marker::from_u8(b) {
                    Marker::I8 => 1,
                    Marker::I16 => 2,
                    Marker::I32 => 4,
                    _ => 8,
                };
                let raw = self.be(width)?;
                let shift = 64 - 8 * width as u32;
                let signed = ((raw << shift) as i64) >> shift;
                u64::try_from(signed).map_err(|_| SkimError::Unexpected(b))?
            }
            Marker::Null => return Ok(None),
            _ => return Err(SkimError::Unexpected(b)),
        };
        Ok(Some(v))
    }

    fn bool(&mut self) -> Result<bool, SkimError> {
        match self.byte()? {
            0xc3 => Ok(true),
            0xc2 | 0xc0 => Ok(false),
            b => Err(SkimError::Unexpected(b)),
        }
    }

    /// An event body: `data.t` and `sale_id`; anything else (including `data` that is not
    /// a map) is skipped.
    fn body(&mut self) -> Result<Option<BodyLite<'a>>, SkimError> {
        let Some(n) = self.map()? else {
            return Ok(None);
        };
        let mut body = BodyLite::default();
        for _ in 0..n {
            match self.raw_str()? {
                b"data" if matches!(self.buf.first(), Some(0x80..=0x8f | 0xde | 0xdf)) => {
                    let fields = self.map()?.unwrap_or(0);
                    for _ in 0..fields {
                        match self.raw_str()? {
                            b"t" => body.t = self.uint()?,
                            _ => self.skip(2)?,
                        }
                    }
                }
                b"sale_id" => body.sale_id = self.str()?,
                _ => self.skip(1)?,
            }
        }
        Ok(Some(body))
    }

    fn event(&mut self) -> Result<EventLite<'a>, SkimError> {
        let n = self.map()?.unwrap_or(0);
        let mut event = EventLite::default();
        for _ in 0..n {
            match self.raw_str()? {
                b"seq" => event.seq = self.uint()?.unwrap_or(0),
                b"server_time_ms" => event.server_time_ms = self.uint()?,
                b"body" => event.body = self.body()?,
                _ => self.skip(1)?,
            }
        }
        Ok(event)
    }
}

impl<'a> Incoming<'a> {
    /// Reads the fields the harness uses from one MessagePack frame.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, SkimError> {
        let mut r = Skim { buf: bytes };
        let n = r.map()?.ok_or(SkimError::NoType)?;
        let mut f = Incoming::default();
        let mut typed = false;
        for _ in 0..n {
            match r.raw_str()? {
                b"type" => {
                    f.frame = r.str()?.ok_or(SkimError::NoType)?;
                    typed = true;
                }
                b"branch" => f.branch = r.str()?,
                b"epoch" => f.epoch = r.str()?,
                b"seq" => f.seq = r.uint()?,
                b"server_time_ms" => f.server_time_ms = r.uint()?,
                b"body" => f.body = r.body()?,
                b"events" => match r.head()? {
                    (_, Marker::FixArray(_) | Marker::Array16 | Marker::Array32, len) => {
                        f.events.reserve(len.min(1 << 16));
                        for _ in 0..len {
                            let event = r.event()?;
                            f.events.push(event);
                        }
                    }
                    (b, ..) => return Err(SkimError::Unexpected(b)),
                },
                b"event_id" => f.event_id = r.str()?,
                b"duplicate" => f.duplicate = r.bool()?,
                b"code" => f.code = r.str()?,
                b"message" => f.message = r.str()?,
                b"fatal" => f.fatal = r.bool()?,
                b"expected_device_seq" => f.expected_device_seq = r.uint()?,
                _ => r.skip(1)?,
            }
        }
        if typed { Ok(f) } else { Err(SkimError::NoType) }
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
            t: None,
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
        assert_eq!(f.server_time_ms, Some(2));
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
    fn truncated_and_arbitrary_bytes_are_errors_never_panics() {
        let frame = Codec::MsgPack
            .encode(&ServerFrame::Event(Box::new(event(5, 77))))
            .unwrap();
        for cut in 0..frame.len() {
            assert!(Incoming::decode(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..2_000 {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = Incoming::decode(&bytes);
        }
        let deep = [vec![0x91u8; 10_000], vec![0xc0]].concat();
        assert_eq!(
            Incoming::decode(&[&[0x81, 0xa1, b'x'][..], &deep].concat()).unwrap_err(),
            SkimError::TooDeep
        );
    }

    #[test]
    fn frames_without_a_type_or_with_odd_data_are_handled() {
        let no_type = Codec::MsgPack
            .encode(&serde_json::json!({"seq": 1}))
            .unwrap();
        assert_eq!(Incoming::decode(&no_type).unwrap_err(), SkimError::NoType);
        let odd = Codec::MsgPack
            .encode(&serde_json::json!({
                "type": "event", "seq": 9, "branch": "b1",
                "body": {"type": "other", "data": [1, {"t": 5}, "x"]},
                "effect": {"stock": [{"sku": "A", "on_hand": -3}]},
            }))
            .unwrap();
        let f = Incoming::decode(&odd).unwrap();
        assert_eq!((f.frame, f.seq), ("event", Some(9)));
        assert_eq!(
            f.body.unwrap().stamp(),
            None,
            "data that is not a map carries no stamp"
        );
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
