//! The server: the accept loop with its limits, each connection, and the shutdown.
//!
//! [`run`] takes a bound listener, a [`Config`] and a shutdown future: the binary passes
//! Ctrl-C/SIGTERM, tests pass a oneshot. On shutdown the hub stops accepting, tells every
//! session (which answers its pending publishes and closes with `shutting_down`), waits for
//! connections, then for the engine to finish its last commits and sync (see [`Hub`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use governor::{Quota, RateLimiter};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::Config;
use crate::conn::ConnGuard;
use crate::hub::{Hub, HubError};

/// Runs a hub on `listener` until `shutdown` resolves, then shuts it down gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HubError> {
    let hub = Hub::open(config)?;
    serve(hub, listener, shutdown).await
}

/// Serves an opened hub until `shutdown` resolves, then stops it; an error says the stop ran
/// out of grace.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HubError> {
    let app = crate::http::router(hub.clone());
    let overloaded = crate::http::overloaded();
    let limits = &hub.config().limits;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_second =
        |n: u32| std::num::NonZeroU32::new(n.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let rate = RateLimiter::direct(
        Quota::per_second(per_second(limits.connection_rate))
            .allow_burst(per_second(limits.connection_burst)),
    );
    hub.tasks().spawn(crate::ops::maintenance::run(hub.clone()));
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(5);
                    conn
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, backoff = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let permit = permits.clone().try_acquire_owned().ok();
        let admitted = permit.is_some() && rate.check().is_ok();
        let guard = ConnGuard::new(permit, hub.clone());
        let router = if admitted {
            app.clone()
        } else {
            hub.metrics().refused_connections.increment(1);
            overloaded.clone()
        };
        hub.conns()
            .spawn(connection(stream, router, guard, hub.shutdown().clone()));
    }
    drop(listener);
    hub.stop().await
}

async fn connection(
    stream: TcpStream,
    router: axum::Router,
    guard: ConnGuard,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(guard.clone());
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Some(Duration::from_secs(10)))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
