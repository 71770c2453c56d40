//! Encode and decode of a typical sale event (two lines, one payment) in both codecs, as an
//! `event` frame and as a `publish` frame.
//!
//! Run: `cargo bench -p branchline-protocol --bench codec`

use branchline_protocol::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use uuid::Uuid;

fn sale() -> EventBody {
    let sku = |s: &str| Sku::new(s).expect("valid sku");
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

fn event_frame() -> ServerFrame {
    let sku = |s: &str| Sku::new(s).expect("valid sku");
    ServerFrame::Event(Box::new(Event {
        branch: Name::new("berlin-01").expect("valid name"),
        epoch: Epoch(0x5f3a_9c1e_07b2_44d1),
        seq: 1187,
        event_id: Uuid::now_v7(),
        device: Name::new("till-1").expect("valid name"),
        device_seq: 42,
        client_time_ms: 1_795_000_000_000,
        server_time_ms: 1_795_000_000_035,
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
    }))
}

fn publish_frame() -> ClientFrame {
    ClientFrame::Publish(Publish {
        branch: Name::new("berlin-01").expect("valid name"),
        event_id: Uuid::now_v7(),
        device_seq: 42,
        client_time_ms: 1_795_000_000_000,
        base_seq: None,
        base_version: None,
        body: sale(),
    })
}

fn bench(c: &mut Criterion) {
    let event = event_frame();
    let publish = publish_frame();
    for codec in Codec::ALL {
        let label = format!("{codec:?}").to_lowercase();
        let mut g = c.benchmark_group(format!("sale_event/{label}"));
        g.throughput(Throughput::Elements(1));
        let encoded = codec.encode(&event).expect("encodes");
        g.bench_function("encode_event", |b| {
            b.iter(|| codec.encode(black_box(&event)));
        });
        g.bench_function("decode_event", |b| {
            b.iter(|| codec.decode_server_frame(black_box(&encoded)));
        });
        let published = codec.encode(&publish).expect("encodes");
        g.bench_function("encode_publish", |b| {
            b.iter(|| codec.encode(black_box(&publish)));
        });
        g.bench_function("decode_publish", |b| {
            b.iter(|| codec.decode_client_frame(black_box(&published)));
        });
        g.finish();
        println!(
            "{label}: event frame {} bytes, publish frame {} bytes",
            encoded.len(),
            published.len()
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
