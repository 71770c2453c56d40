//! The frames the harness sends and the little it reads of the frames it receives.
//!
//! Sending: `hello` and `ack` use the protocol crate's types (they are rare); a load publish is
//! a `custom` event whose data is `{"t": <harness clock ns>, "pad": "..."}`, encoded from a
//! borrowed struct so the padding is never copied into a JSON value; a till's sale is a real
//! `sale.recorded` whose `sale_id` ends in the stamp.
//!
//! Receiving: [`Incoming::decode`] reads only the fields the harness checks (frame type,
//! branch, epoch, seq, the stamp, answers to publishes, error codes), borrowing strings from
//! the message; everything else in a frame is skipped by length, never built. Markers,
//! lengths and numbers are read with `rmp::decode`, the MessagePack reader the protocol's codec
//! rests on. The harness speaks MessagePack only, the protocol's default and fast path.

use branchline_protocol::{
    Ack, ClientFrame, Codec, EncodeError, Epoch, EventBody, Hello, Name, Payment, PaymentMethod,
    Publish, SaleLine, SaleRecorded, Sku, Subscription, now_ms,
};
use std::io;

use bytes::Bytes;
use rmp::Marker;
use rmp::decode::{self, NumValueReadError, ValueReadError};
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
///
/// `rmp` reads the markers (as [`Marker`]), lengths and numbers; this type chooses what to keep
/// and what to step over. `rmp::decode` reads from the slice itself (`&mut self.buf`) and
/// advances it past what it read, so the strings kept are borrowed from the message. A
/// one-byte form whose marker holds its whole value (nil, booleans, fixints, the lengths of
/// fixstrs and fixmaps) is taken from the marker [`Skim::peek`] read instead: most of a frame
/// is such forms, keys above all, and `rmp`'s readers of every form are not inlined, so a call
/// to one for each cost the hot path about a tenth more time per frame.
struct Skim<'a> {
    buf: &'a [u8],
}

/// The error of an `rmp` read from a message. Reading a slice fails only where it ends, so
/// every read error is [`SkimError::Eof`].
impl From<ValueReadError<io::Error>> for SkimError {
    fn from(e: ValueReadError<io::Error>) -> Self {
        match e {
            ValueReadError::TypeMismatch(marker) => SkimError::Unexpected(marker.to_u8()),
            ValueReadError::InvalidMarkerRead(_) | ValueReadError::InvalidDataRead(_) => {
                SkimError::Eof
            }
        }
    }
}

impl<'a> Skim<'a> {
    /// The next value's marker, left unread.
    fn peek(&self) -> Result<Marker, SkimError> {
        self.buf
            .first()
            .map(|&b| Marker::from_u8(b))
            .ok_or(SkimError::Eof)
    }

    /// Reads a nil if one comes next; whether it did.
    fn nil(&mut self) -> bool {
        self.peek() == Ok(Marker::Null) && self.step().is_ok()
    }

    /// Steps past a marker [`Skim::peek`] has read, whose value it holds in full.
    fn step(&mut self) -> Result<(), SkimError> {
        self.take(1).map(drop)
    }

    /// A string's length.
    fn str_len(&mut self) -> Result<u32, SkimError> {
        if let Marker::FixStr(n) = self.peek()? {
            self.step()?;
            return Ok(u32::from(n));
        }
        Ok(decode::read_str_len(&mut self.buf)?)
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u32) -> Result<&'a [u8], SkimError> {
        let n = usize::try_from(n).map_err(|_| SkimError::Eof)?;
        let (head, rest) = self.buf.split_at_checked(n).ok_or(SkimError::Eof)?;
        self.buf = rest;
        Ok(head)
    }

    /// Steps over the next value, `depth` levels into the frame.
    fn skip(&mut self, depth: u32) -> Result<(), SkimError> {
        if depth > MAX_DEPTH {
            return Err(SkimError::TooDeep);
        }
        let marker = self.peek()?;
        let rd = &mut self.buf;
        match marker {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
                self.step()
            }
            Marker::U8
            | Marker::U16
            | Marker::U32
            | Marker::U64
            | Marker::I8
            | Marker::I16
            | Marker::I32
            | Marker::I64 => match decode::read_int::<i128, _>(rd) {
                Ok(_) => Ok(()),
                Err(NumValueReadError::TypeMismatch(marker)) => {
                    Err(SkimError::Unexpected(marker.to_u8()))
                }
                // Every integer fits an i128: only the end of the message stops it.
                Err(_) => Err(SkimError::Eof),
            },
            Marker::F32 => decode::read_f32(rd).map(drop).map_err(SkimError::from),
            Marker::F64 => decode::read_f64(rd).map(drop).map_err(SkimError::from),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = self.str_len()?;
                self.take(n).map(drop)
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = decode::read_bin_len(rd)?;
                self.take(n).map(drop)
            }
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => {
                let meta = decode::read_ext_meta(rd)?;
                self.take(meta.size).map(drop)
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = decode::read_array_len(rd)?;
                (0..n).try_for_each(|_| self.skip(depth + 1))
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = decode::read_map_len(rd)?;
                (0..n).try_for_each(|_| {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)
                })
            }
            Marker::Reserved => Err(SkimError::Unexpected(marker.to_u8())),
        }
    }

    /// A map's length (`None` for nil).
    fn map(&mut self) -> Result<Option<u32>, SkimError> {
        match self.peek()? {
            Marker::Null => self.step().map(|()| None),
            Marker::FixMap(n) => self.step().map(|()| Some(u32::from(n))),
            _ => Ok(Some(decode::read_map_len(&mut self.buf)?)),
        }
    }

    /// A string's bytes, unchecked (for keys compared against ASCII names).
    fn raw_str(&mut self) -> Result<&'a [u8], SkimError> {
        let n = self.str_len()?;
        self.take(n)
    }

    /// A string (`None` for nil).
    fn str(&mut self) -> Result<Option<&'a str>, SkimError> {
        if self.nil() {
            return Ok(None);
        }
        let bytes = self.raw_str()?;
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| SkimError::Utf8)
    }

    /// A non-negative integer (`None` for nil).
    fn uint(&mut self) -> Result<Option<u64>, SkimError> {
        let marker = self.peek()?;
        match marker {
            Marker::Null => return self.step().map(|()| None),
            Marker::FixPos(v) => return self.step().map(|()| Some(u64::from(v))),
            _ => {}
        }
        match decode::read_int(&mut self.buf) {
            Ok(v) => Ok(Some(v)),
            // A negative number (or another type) where a count or a time belongs.
            Err(NumValueReadError::TypeMismatch(_) | NumValueReadError::OutOfRange) => {
                Err(SkimError::Unexpected(marker.to_u8()))
            }
            Err(
                NumValueReadError::InvalidMarkerRead(_) | NumValueReadError::InvalidDataRead(_),
            ) => Err(SkimError::Eof),
        }
    }

    /// A boolean (nil reads as false).
    fn bool(&mut self) -> Result<bool, SkimError> {
        if self.nil() {
            return Ok(false);
        }
        decode::read_bool(&mut self.buf).map_err(SkimError::from)
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
                b"data" if is_map(self.peek()?) => {
                    for _ in 0..self.map()?.unwrap_or(0) {
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

fn is_map(marker: Marker) -> bool {
    matches!(marker, Marker::FixMap(_) | Marker::Map16 | Marker::Map32)
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
                b"events" => {
                    let len = decode::read_array_len(&mut r.buf)?;
                    // A length the message cannot hold must not reserve memory for it.
                    f.events.reserve(len.min(1 << 16) as usize);
                    for _ in 0..len {
                        let event = r.event()?;
                        f.events.push(event);
                    }
                }
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
    fn the_long_forms_of_maps_strings_and_arrays_read_like_the_short_ones() {
        let mut data = serde_json::json!({"t": 5, "pad": "p".repeat(70_000)});
        let mut frame = serde_json::json!({
            "type": "event", "seq": 70_000, "branch": "b".repeat(300),
            "list": (0..20).collect::<Vec<u32>>(),
        });
        for i in 0..20 {
            data[format!("field-{i}")] = i.into();
            frame[format!("field-{i}")] = i.into();
        }
        frame["body"] = serde_json::json!({"type": "x", "data": data});
        // Maps of more than 15 entries are map16s, strings of 300 and 70,000 bytes str16 and
        // str32, a list of 20 an array16.
        let bytes = Codec::MsgPack.encode(&frame).unwrap();
        let f = Incoming::decode(&bytes).unwrap();
        assert_eq!((f.frame, f.seq), ("event", Some(70_000)));
        assert_eq!(f.branch.map(str::len), Some(300));
        assert_eq!(f.body.unwrap().stamp(), Some(5));
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

    /// Frames as the hub sends them, with every field the skimmer reads or skips drawn at
    /// random, to check it against a full decode.
    mod properties {
        use branchline_protocol::{
            Accepted, CaughtUp, Custom, Effect, ErrorCode, ErrorFrame, Event, EventBatch, Rejected,
            SaleRecorded, ServerFrame, Sku, StockLevel,
        };
        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;
        use proptest::sample::Index;
        use serde_json::Value;

        use super::super::*;

        fn name() -> impl Strategy<Value = Name> {
            "[A-Za-z0-9_.-]{1,64}".prop_map(|s| Name::new(s).unwrap())
        }

        fn uuid() -> impl Strategy<Value = Uuid> {
            any::<u128>().prop_map(Uuid::from_u128)
        }

        /// Any JSON: what `custom` data and stock effects make the skimmer step over.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                "\\PC{0,40}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..4).prop_map(Value::from),
                    btree_map("\\PC{0,8}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A harness event (`data` with the stamp `t` among other fields), a sale, or custom
        /// data of any shape whose top level has no `t` (a `t` that is not a stamp is an error
        /// by design).
        fn body() -> impl Strategy<Value = EventBody> {
            let custom = |data: Value| {
                EventBody::Custom(Custom {
                    custom_type: LOAD_TYPE.into(),
                    data,
                })
            };
            let stamped = (any::<u64>(), btree_map("[a-su-z]{1,8}", json(), 0..3)).prop_map(
                move |(t, mut fields)| {
                    fields.insert("t".into(), Value::from(t));
                    custom(Value::Object(fields.into_iter().collect()))
                },
            );
            let other = prop_oneof![
                json().prop_filter("not a map", |v| !v.is_object()),
                btree_map("[a-su-z]{1,8}", json(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
            .prop_map(custom);
            let sale = ("\\PC{0,40}", any::<i64>()).prop_map(|(sale_id, total)| {
                EventBody::SaleRecorded(SaleRecorded {
                    sale_id,
                    lines: Vec::new(),
                    total,
                    tax: 0,
                    currency: "EUR".into(),
                    payments: Vec::new(),
                })
            });
            prop_oneof![stamped, other, sale]
        }

        fn event(branch: Name, epoch: Epoch) -> impl Strategy<Value = Event> {
            let stock = vec(("[A-Z0-9-]{1,16}", any::<i64>()), 0..3).prop_map(|levels| {
                let stock = levels
                    .into_iter()
                    .map(|(sku, n)| StockLevel::new(Sku::new(sku).unwrap(), n))
                    .collect();
                Effect {
                    stock,
                    ..Effect::default()
                }
            });
            let times = (any::<i64>(), 0..=i64::MAX);
            (any::<u64>(), times, any::<Option<u64>>(), body(), stock).prop_map(
                move |(seq, (client_time_ms, server_time_ms), base, body, effect)| Event {
                    branch: branch.clone(),
                    epoch,
                    seq,
                    client_time_ms,
                    server_time_ms,
                    base_seq: base,
                    base_version: base,
                    body,
                    effect,
                    ..super::event(seq, 0)
                },
            )
        }

        /// A branch and an epoch.
        fn at() -> impl Strategy<Value = (Name, Epoch)> {
            (name(), any::<u64>().prop_map(Epoch))
        }

        fn frame() -> impl Strategy<Value = ServerFrame> {
            let code = proptest::sample::select(ErrorCode::ALL.to_vec());
            prop_oneof![
                at().prop_flat_map(|(b, e)| event(b, e))
                    .prop_map(|e| ServerFrame::Event(Box::new(e))),
                at().prop_flat_map(|(branch, epoch)| {
                    vec(event(branch.clone(), epoch), 0..5).prop_map(move |events| {
                        ServerFrame::Events(EventBatch {
                            branch: branch.clone(),
                            epoch,
                            events,
                        })
                    })
                }),
                (at(), any::<u64>()).prop_map(|((branch, epoch), seq)| {
                    ServerFrame::CaughtUp(CaughtUp { branch, epoch, seq })
                }),
                (uuid(), at(), any::<u64>(), any::<bool>()).prop_map(
                    |(event_id, (branch, epoch), seq, duplicate)| {
                        ServerFrame::Accepted(Accepted {
                            event_id,
                            branch,
                            epoch,
                            seq,
                            duplicate,
                        })
                    }
                ),
                (
                    proptest::option::of((uuid(), name())),
                    code.clone(),
                    "\\PC{0,40}",
                    any::<Option<u64>>(),
                )
                    .prop_map(|(about, code, message, expected)| {
                        let mut r = match about {
                            Some((id, branch)) => Rejected::of(id, branch, code, message),
                            None => Rejected::bare(code, message),
                        };
                        r.expected_device_seq = expected;
                        ServerFrame::Rejected(r)
                    }),
                (code, "\\PC{0,40}", any::<bool>()).prop_map(|(code, message, fatal)| {
                    ServerFrame::Error(ErrorFrame {
                        code,
                        message,
                        fatal,
                    })
                }),
            ]
        }

        /// The stamp fields a full decode of `body` holds.
        fn stamp_fields(body: &EventBody) -> (Option<u64>, Option<&str>) {
            match body {
                EventBody::Custom(c) => (c.data.get("t").and_then(Value::as_u64), None),
                EventBody::SaleRecorded(s) => (None, Some(&s.sale_id)),
                _ => (None, None),
            }
        }

        fn skimmed<'a>(body: Option<&BodyLite<'a>>) -> (Option<u64>, Option<&'a str>) {
            body.map_or((None, None), |b| (b.t, b.sale_id))
        }

        /// The fields the skimmer read from `frame`'s encoding against its full decode.
        fn assert_agrees(full: &ServerFrame, f: &Incoming<'_>) -> Result<(), TestCaseError> {
            prop_assert_eq!(f.frame, full.type_name());
            let epoch = |e: &Epoch| Some(e.to_string());
            match full {
                ServerFrame::Event(e) => {
                    prop_assert_eq!(f.branch, Some(e.branch.as_str()));
                    prop_assert_eq!(f.epoch.map(str::to_owned), epoch(&e.epoch));
                    prop_assert_eq!(f.seq, Some(e.seq));
                    prop_assert_eq!(f.server_time_ms, u64::try_from(e.server_time_ms).ok());
                    prop_assert_eq!(skimmed(f.body.as_ref()), stamp_fields(&e.body));
                }
                ServerFrame::Events(batch) => {
                    prop_assert_eq!(f.branch, Some(batch.branch.as_str()));
                    prop_assert_eq!(f.epoch.map(str::to_owned), epoch(&batch.epoch));
                    prop_assert_eq!(f.events.len(), batch.events.len());
                    for (lite, e) in f.events.iter().zip(&batch.events) {
                        prop_assert_eq!(lite.seq, e.seq);
                        prop_assert_eq!(lite.server_time_ms, u64::try_from(e.server_time_ms).ok());
                        prop_assert_eq!(skimmed(lite.body.as_ref()), stamp_fields(&e.body));
                    }
                }
                ServerFrame::CaughtUp(c) => {
                    prop_assert_eq!(f.branch, Some(c.branch.as_str()));
                    prop_assert_eq!(f.epoch.map(str::to_owned), epoch(&c.epoch));
                    prop_assert_eq!(f.seq, Some(c.seq));
                }
                ServerFrame::Accepted(a) => {
                    prop_assert_eq!(f.event_id.map(str::to_owned), Some(a.event_id.to_string()));
                    prop_assert_eq!(f.branch, Some(a.branch.as_str()));
                    prop_assert_eq!(f.epoch.map(str::to_owned), epoch(&a.epoch));
                    prop_assert_eq!((f.seq, f.duplicate), (Some(a.seq), a.duplicate));
                }
                ServerFrame::Rejected(r) => {
                    let id = r.event_id.map(|id| id.to_string());
                    prop_assert_eq!(f.event_id.map(str::to_owned), id);
                    prop_assert_eq!(f.branch, r.branch.as_ref().map(Name::as_str));
                    prop_assert_eq!(f.code, Some(r.code.as_str()));
                    prop_assert_eq!(f.message, Some(r.message.as_str()));
                    prop_assert_eq!(f.expected_device_seq, r.expected_device_seq);
                }
                ServerFrame::Error(e) => {
                    prop_assert_eq!(f.code, Some(e.code.as_str()));
                    prop_assert_eq!(f.message, Some(e.message.as_str()));
                    prop_assert_eq!(f.fatal, e.fatal);
                }
                other => prop_assert!(false, "not generated: {other:?}"),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn the_skimmer_agrees_with_a_full_decode(frame in frame()) {
                let bytes = Codec::MsgPack.encode(&frame).unwrap();
                let full = Codec::MsgPack.decode_server_frame(&bytes).unwrap();
                assert_agrees(&full, &Incoming::decode(&bytes).unwrap())?;
            }

            #[test]
            fn arbitrary_bytes_never_panic_the_skimmer(bytes in vec(any::<u8>(), 0..512)) {
                let _ = Incoming::decode(&bytes);
            }

            #[test]
            fn damaged_frames_never_panic_the_skimmer(
                frame in frame(),
                flips in vec((any::<Index>(), any::<u8>()), 1..8),
                cut in any::<Index>(),
            ) {
                let mut bytes = Codec::MsgPack.encode(&frame).unwrap().to_vec();
                for (i, b) in &flips {
                    let at = i.index(bytes.len());
                    bytes[at] ^= b;
                }
                let _ = Incoming::decode(&bytes);
                let _ = Incoming::decode(&bytes[..cut.index(bytes.len())]);
            }
        }
    }
}
