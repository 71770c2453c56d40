//! The harness's hot path: reading what it checks from the hub frames it receives
//! ([`Incoming::decode`]). A fan-out follower reads one `event` frame per delivery (a load
//! publish, or a till's sale in `mixed`), a catching-up one `events` batches.
//!
//! Run: `cargo bench -p branchline-load --bench skim`

use std::hint::black_box;

use branchline_load::wire::{Incoming, Payload, publish};
use branchline_protocol::{ClientFrame, Codec, Effect, Epoch, Event, Name};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uuid::Uuid;

/// The event the hub stores for a harness publish of `payload`, as it stores it: the hub
/// splices these bytes into the `event` and `events` frames followers receive.
fn delivered(seq: u64, payload: &Payload) -> Bytes {
    let name = |s: &str| Name::new(s).expect("a valid name");
    let mut buf = Vec::new();
    publish(
        &mut buf,
        &name("bench-b0"),
        &name("pub-0"),
        // A fixed id: its bits choose a sale's basket, and runs must compare.
        Uuid::from_u128(0x0193_5c2e_41a7_7000_8000_0000_0000_0000 | u128::from(seq)),
        seq,
        1_234_567_890,
        payload,
    )
    .expect("a publish encodes");
    let ClientFrame::Publish(p) = Codec::MsgPack
        .decode_client_frame(&buf)
        .expect("it decodes")
    else {
        unreachable!("publish() makes publish frames");
    };
    let event = Event {
        branch: p.branch,
        epoch: Epoch(0x5f3a_9c1e_07b2_44d1),
        seq,
        event_id: p.event_id,
        device: name("pub-0"),
        device_seq: p.device_seq,
        client_time_ms: p.client_time_ms,
        server_time_ms: p.client_time_ms + 1,
        base_seq: None,
        base_version: None,
        body: p.body,
        effect: Effect::default(),
    };
    Codec::MsgPack.encode(&event).expect("an event encodes")
}

fn skim(c: &mut Criterion) {
    let mut group = c.benchmark_group("skim");
    group.throughput(Throughput::Elements(1));
    for (label, payload) in [
        ("load_event", Payload::custom(64)),
        ("sale_event", Payload::Sale),
    ] {
        let stored = delivered(1187, &payload);
        let frame = Codec::MsgPack.event_frame(&stored).expect("an event frame");
        group.bench_function(label, |b| {
            b.iter(|| Incoming::decode(black_box(&frame)).map(|f| f.seq));
        });
    }
    let stored: Vec<Bytes> = (1_000_001..=1_000_100)
        .map(|seq| delivered(seq, &Payload::custom(64)))
        .collect();
    let batch = Codec::MsgPack.encode_event_batch(
        &Name::new("bench-b0").expect("a valid name"),
        Epoch(0x5f3a_9c1e_07b2_44d1),
        &stored,
    );
    group.throughput(Throughput::Elements(100));
    group.bench_function("events_batch_100", |b| {
        b.iter(|| Incoming::decode(black_box(&batch)).map(|f| f.events.len()));
    });
    group.finish();
}

criterion_group!(benches, skim);
criterion_main!(benches);
