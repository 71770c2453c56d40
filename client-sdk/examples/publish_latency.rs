//! Measures how long `Client::publish` takes to record a sale in the local outbox, offline
//! (the hub address refuses connections), with and without waiting for the disk flush.
//!
//! ```text
//! cargo run --release -p branchline-client --example publish_latency
//! ```

use std::time::{Duration, Instant};

use base64::Engine;
use branchline_client::ClientOptions;
use branchline_client::protocol::{EventBody, SaleLine, SaleRecorded, Sku};

const N: usize = 2000;

fn token() -> String {
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        br#"{"tenant":"acme","branches":["b1"],"device":"till-1","role":"cashier","exp":4102444800,"iat":0}"#,
    );
    format!("e30.{claims}.unsigned")
}

fn sale(n: usize) -> anyhow::Result<EventBody> {
    Ok(EventBody::SaleRecorded(SaleRecorded {
        sale_id: format!("T1-{n:06}"),
        lines: vec![SaleLine {
            sku: Sku::new("COFFEE-250G")?,
            qty: 1,
            unit_price: 899,
            discount: 0,
        }],
        total: 899,
        tax: 82,
        currency: "EUR".into(),
        payments: vec![],
    }))
}

async fn run(durable: bool) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let client = ClientOptions::new()
        .token(token())
        .store(dir.path())
        .durable_publish(durable)
        // Port 9 (discard) refuses connections here: the till is offline.
        .connect("http://127.0.0.1:9")
        .await?;
    let mut times = Vec::with_capacity(N);
    for n in 0..N {
        let t = Instant::now();
        client.publish(sale(n)?).await?;
        times.push(t.elapsed());
    }
    client.shutdown().await?;
    times.sort();
    Ok(times)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    for durable in [true, false] {
        let t = run(durable).await?;
        let pct = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
        println!(
            "{N} offline publishes, durable_publish({durable}): p50 {:?}  p99 {:?}  max {:?}",
            pct(0.50),
            pct(0.99),
            t[t.len() - 1]
        );
    }
    Ok(())
}
