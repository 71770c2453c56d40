//! A connection's place in the hub's count of connections.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::hub::Hub;

/// Held by a connection (and, after an upgrade, by its session) for as long as it is open:
/// its permit under the connection limit, and its part of the `connections` gauge.
#[derive(Clone)]
pub struct ConnGuard {
    _inner: Arc<ConnInner>,
}

struct ConnInner {
    _permit: Option<OwnedSemaphorePermit>,
    hub: Arc<Hub>,
}

impl ConnGuard {
    /// Counts a new connection, holding `permit` if it was admitted under the limit.
    pub fn new(permit: Option<OwnedSemaphorePermit>, hub: Arc<Hub>) -> Self {
        hub.metrics().connections.increment(1.0);
        Self {
            _inner: Arc::new(ConnInner {
                _permit: permit,
                hub,
            }),
        }
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.hub.metrics().connections.decrement(1.0);
    }
}
