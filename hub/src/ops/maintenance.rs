//! The hub's periodic upkeep: free space, metrics, expired snapshots, and retention.

use std::sync::Arc;
use std::time::Duration;

use crate::hub::Hub;

/// Periodic upkeep: free space, metrics, snapshot expiry and retention.
pub async fn run(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut retention = tokio::time::interval(hub.config().retention.interval);
    loop {
        tokio::select! {
            _ = hub.shutdown().cancelled() => return,
            _ = tick.tick() => {
                hub.check_space();
                hub.metrics().upkeep();
                hub.metrics().rooms.set(hub.rooms().len() as f64);
                hub.metrics().queued_events.set(hub.rooms().queued_events() as f64);
                hub.snapshots().sweep();
            }
            _ = retention.tick() => {
                if let Err(e) = hub.run_retention(false).await {
                    tracing::error!(error = %e, "retention pass failed");
                }
            }
        }
    }
}
