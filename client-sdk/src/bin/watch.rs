//! `branchline-watch`: a live, readable feed of one or more branches for admins: every
//! sequenced event, devices joining and leaving, and each device's lag.
//!
//! ```text
//! branchline-watch --url http://127.0.0.1:7400 --token "$ADMIN_TOKEN" --branch berlin-01
//! ```

use std::time::Duration;

use anyhow::Context;
use branchline_client::protocol::{Event, EventBody, Name, now_ms};
use branchline_client::{ClientEvent, ClientOptions, Update};
use clap::Parser;
use futures::StreamExt;

/// Watch Branchline branches live.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The hub: http://host:port or ws://host:port/v1/ws.
    #[arg(long, env = "BRANCHLINE_URL", default_value = "http://127.0.0.1:7400")]
    url: String,
    /// An admin token (a cashier token works for its own branch, without device lists).
    #[arg(long, env = "BRANCHLINE_TOKEN")]
    token: String,
    /// A branch to watch; repeat for several. Default: the token's branches.
    #[arg(long = "branch")]
    branches: Vec<String>,
    /// How often to print the devices and their lag.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    devices_every: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut opts = ClientOptions::new()
        .token(args.token)
        .temporary_store()
        .agent(format!("branchline-watch/{}", env!("CARGO_PKG_VERSION")));
    if !args.branches.is_empty() {
        let names = args
            .branches
            .iter()
            .map(|b| Name::new(b.as_str()).with_context(|| format!("branch {b:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        opts = opts.branches(names);
    }
    let client = opts
        .connect(&args.url)
        .await
        .context("starting the client")?;
    println!(
        "watching {} of {} as {} ({:?})",
        client
            .branches()
            .iter()
            .map(Name::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        client.tenant(),
        client.device(),
        client.role()
    );
    let mut events = client.events();
    let mut notes = client.notifications();
    let mut tick = tokio::time::interval(args.devices_every);
    loop {
        tokio::select! {
            u = events.next() => match u {
                Some(u) => print_update(&u),
                None => break,
            },
            n = notes.next() => match n {
                // Acceptances are this watcher's own publishes: it makes none.
                Some(ClientEvent::Accepted { .. }) => {}
                Some(ClientEvent::Devices(d)) => print_devices(&d),
                Some(n) => println!("{} -- {n}", clock()),
                None => break,
            },
            _ = tick.tick() => {
                for b in client.branches() {
                    match client.devices(b).await {
                        Ok(d) => print_devices(&d),
                        Err(e) => println!("{} -- devices of {b}: {e}", clock()),
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.shutdown().await?;
    Ok(())
}

fn clock() -> String {
    let ms = now_ms();
    let secs = ms.div_euclid(1000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs.div_euclid(3600).rem_euclid(24),
        secs.div_euclid(60).rem_euclid(60),
        secs.rem_euclid(60),
        ms.rem_euclid(1000)
    )
}

fn print_update(u: &Update) {
    match u {
        Update::Event(e) => println!("{} {}", clock(), describe(e)),
        other => println!("{} -- {other}", clock()),
    }
}

fn describe(e: &Event) -> String {
    let what = match &e.body {
        EventBody::SaleRecorded(s) => format!(
            "sale {} {} lines, total {} {}",
            s.sale_id,
            s.lines.len(),
            money(s.total),
            s.currency
        ),
        EventBody::StockAdjusted(a) => format!("stock {} {:+} ({:?})", a.sku, a.delta, a.reason),
        EventBody::StockCounted(c) => format!("count {} = {}", c.sku, c.counted),
        EventBody::ProductUpserted(p) => format!("product {} updated", p.sku),
        EventBody::ProductRemoved(p) => format!("product {} removed", p.sku),
        EventBody::Custom(c) => format!("custom {}", c.custom_type),
        EventBody::ConflictResolved(c) => {
            format!("conflict on {} resolved ({:?})", c.sku, c.resolution)
        }
    };
    let oversold: Vec<String> = e
        .effect
        .stock
        .iter()
        .filter(|s| s.oversold)
        .map(|s| format!("{} at {}", s.sku, s.on_hand))
        .collect();
    let mut line = format!(
        "{} #{} {} by {}#{}: {what}",
        e.branch,
        e.seq,
        e.body.kind(),
        e.device,
        e.device_seq
    );
    if !oversold.is_empty() {
        line.push_str(&format!(" [oversold: {}]", oversold.join(", ")));
    }
    if let Some(c) = &e.effect.conflict {
        line.push_str(&format!(" [conflict {:?}: {:?}]", c.policy, c.outcome));
    }
    line
}

/// Minor units as `units.cents`, with the sign in front also when the units are 0
/// (-0.50, not 0.50).
fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

fn print_devices(d: &branchline_client::protocol::Devices) {
    println!("{} -- {} devices (head {}):", clock(), d.branch, d.head);
    for dev in &d.devices {
        println!(
            "      {:<20} {:<8} {:<7} sessions {}  acked {}  lag {}  last device_seq {}",
            dev.device.as_str(),
            format!("{:?}", dev.role).to_lowercase(),
            if dev.online { "online" } else { "offline" },
            dev.sessions,
            dev.acked_seq.map_or("-".into(), |s| s.to_string()),
            dev.lag.map_or("-".into(), |l| l.to_string()),
            dev.last_device_seq
        );
    }
}

#[cfg(test)]
mod tests {
    use super::money;

    #[test]
    fn money_keeps_the_sign_of_amounts_under_one_unit() {
        assert_eq!(money(1907), "19.07");
        assert_eq!(money(0), "0.00");
        assert_eq!(money(-1), "-0.01");
        assert_eq!(money(-99), "-0.99");
        assert_eq!(money(-100), "-1.00");
        assert_eq!(money(-1907), "-19.07");
        assert_eq!(money(i64::MIN), "-92233720368547758.08");
    }
}
