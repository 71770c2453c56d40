//! Opening sessions: where the hub is ([`Endpoint`]), which local address each socket uses
//! ([`Sources`]), how fast connections are opened ([`Pacer`]), and the handshake itself
//! ([`open`]: TCP, WebSocket upgrade with the MessagePack subprotocol, `hello`, `welcome`).
//!
//! Every socket gets a small read buffer (the caller chooses; 4 KiB for idle and fan-out
//! followers) so ten thousand connections cost the harness tens of MiB, not gigabytes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use branchline_protocol::{Codec, SUBPROTOCOL_MSGPACK, ServerFrame, Welcome, routes};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A WebSocket session to the hub.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a connection may take from TCP connect to `welcome`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the hub listens.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The resolved socket address.
    pub addr: SocketAddr,
    /// `ws://host:port/v1/ws`.
    pub ws_url: String,
    /// `http://host:port`.
    pub http_url: String,
}

impl Endpoint {
    /// Parses `ws://host:port[/v1/ws]`, `http://host:port` or `host:port` and resolves the
    /// host. TLS (`wss`, `https`) is not supported: the harness measures the hub, not TLS.
    pub async fn parse(url: &str) -> Result<Self, ConnectError> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .unwrap_or(url);
        if rest.contains("://") {
            return Err(ConnectError::Protocol(format!(
                "{url}: only ws:// and http:// URLs are supported"
            )));
        }
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr = tokio::net::lookup_host(authority)
            .await?
            .next()
            .ok_or_else(|| ConnectError::Protocol(format!("{authority} does not resolve")))?;
        Ok(Self::from_addr(addr, authority))
    }

    /// The endpoint of a hub listening on `addr`.
    pub fn local(addr: SocketAddr) -> Self {
        Self::from_addr(addr, &addr.to_string())
    }

    fn from_addr(addr: SocketAddr, authority: &str) -> Self {
        Self {
            addr,
            ws_url: format!("ws://{authority}{}", routes::WS),
            http_url: format!("http://{authority}"),
        }
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Binding, connecting or name resolution failed. Fatal for this attempt.
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// The hub answered 503 `overloaded` (connection limit or rate): retry after this long.
    /// Expected during storms; not an error.
    #[error("hub overloaded (503), retry after {0:?}")]
    Overloaded(Duration),
    /// The WebSocket upgrade failed otherwise.
    #[error("websocket handshake: {0}")]
    Handshake(String),
    /// The hub answered the `hello` with an `error` frame.
    #[error("hub refused the hello: {code}: {message}")]
    Refused {
        /// The error code.
        code: String,
        /// The hub's message.
        message: String,
    },
    /// The connection closed before `welcome`.
    #[error("connection closed before welcome")]
    Closed,
    /// No `welcome` within the deadline.
    #[error("no welcome within {OPEN_TIMEOUT:?}")]
    Timeout,
    /// Something else that does not follow the protocol.
    #[error("{0}")]
    Protocol(String),
}

/// Local addresses to spread connections over.
///
/// One source address has about 28,000 ephemeral ports towards one hub address, and sockets
/// the harness closes sit in TIME_WAIT for a minute. When the hub is on loopback, connections
/// rotate over `127.a.b.1`, `127.a.b.2`, … (all of `127.0.0.0/8` is local on Linux), with
/// `a.b` drawn afresh for every run: large runs never run out of ports, and the tens of
/// thousands of sockets a previous run (a storm, an idle run) left in TIME_WAIT sit on other
/// addresses, where the kernel's search for a free port does not have to step over them.
#[derive(Debug)]
pub struct Sources {
    ips: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Sources {
    /// Addresses for about `connections` sockets to `target`: `count` loopback addresses
    /// (at least one per 8,000 connections) if `target` is IPv4 loopback, else none (the
    /// kernel chooses).
    pub fn new(target: SocketAddr, connections: usize, count: Option<usize>) -> Self {
        let ips = match target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => {
                let n = count.unwrap_or(connections.div_ceil(8_000)).clamp(1, 250);
                let (a, b) = (rand::random_range(1..=254u8), rand::random_range(1..=254u8));
                (1..=n)
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, a, b, i as u8)))
                    .collect()
            }
            _ => Vec::new(),
        };
        Self {
            ips,
            next: AtomicUsize::new(0),
        }
    }

    /// The address for the next socket (`None`: let the kernel choose).
    pub fn next(&self) -> Option<IpAddr> {
        if self.ips.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.ips[i % self.ips.len()])
    }

    /// How many source addresses are used (1 when the kernel chooses).
    pub fn count(&self) -> usize {
        self.ips.len().max(1)
    }
}

/// Spaces connection attempts at most `rate` per second, so the harness does not trip the
/// hub's connection-rate limit during setup (a storm does that on purpose instead).
pub struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    /// A pacer of `rate` attempts per second (0: unpaced).
    pub fn new(rate: u32) -> Self {
        let interval = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / rate
        };
        Self {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for the next slot.
    pub async fn wait(&self) {
        if self.interval.is_zero() {
            return;
        }
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            tokio::net::TcpSocket::from_std_stream(socket.into())
                .connect(addr)
                .await?
        }
    };
    // Publishes and acks are small and latency is measured: never wait for Nagle.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a session: TCP from `source`, the upgrade, `hello`, and waits for `welcome`.
pub async fn open(
    endpoint: &Endpoint,
    source: Option<IpAddr>,
    read_buffer: usize,
    hello: Bytes,
) -> Result<(Ws, Welcome), ConnectError> {
    tokio::time::timeout(
        OPEN_TIMEOUT,
        open_inner(endpoint, source, read_buffer, hello),
    )
    .await
    .unwrap_or(Err(ConnectError::Timeout))
}

async fn open_inner(
    endpoint: &Endpoint,
    source: Option<IpAddr>,
    read_buffer: usize,
    hello: Bytes,
) -> Result<(Ws, Welcome), ConnectError> {
    let stream = tcp(endpoint.addr, source).await?;
    let mut request = endpoint
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL_MSGPACK),
    );
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(handshake_error)?;
    ws.send(Message::Binary(hello))
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    loop {
        let msg = match ws.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(ConnectError::Closed),
            Some(Err(e)) => return Err(ConnectError::Handshake(e.to_string())),
            Some(Ok(msg)) => msg,
        };
        let Message::Binary(bytes) = msg else {
            continue;
        };
        return match Codec::MsgPack.decode_server_frame(&bytes) {
            Ok(ServerFrame::Welcome(welcome)) => Ok((ws, welcome)),
            Ok(ServerFrame::Error(e)) => Err(ConnectError::Refused {
                code: e.code.to_string(),
                message: e.message,
            }),
            Ok(other) => Err(ConnectError::Protocol(format!(
                "expected welcome, got {}",
                other.type_name()
            ))),
            Err(e) => Err(ConnectError::Protocol(format!(
                "welcome does not decode: {e}"
            ))),
        };
    }
}

fn handshake_error(e: WsError) -> ConnectError {
    match e {
        WsError::Http(response) if response.status().as_u16() == 503 => {
            let secs = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
            ConnectError::Overloaded(Duration::from_secs(secs))
        }
        WsError::Http(response) => {
            ConnectError::Handshake(format!("HTTP {} instead of an upgrade", response.status()))
        }
        WsError::Io(e) => ConnectError::Io(e),
        other => ConnectError::Handshake(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_spread_over_loopback_sources() {
        let hub: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let s = Sources::new(hub, 20_000, None);
        assert_eq!(s.count(), 3);
        let picked: Vec<_> = (0..4).map(|_| s.next().unwrap()).collect();
        let IpAddr::V4(first) = picked[0] else {
            panic!("{picked:?}")
        };
        assert!(first.is_loopback() && first.octets()[3] == 1, "{first}");
        assert_eq!(picked[3], picked[0], "round robin");
        assert_ne!(picked[1], picked[0]);
        let small = Sources::new(hub, 100, None);
        assert_eq!(small.count(), 1, "one is enough");
        assert!(small.next().is_some_and(|ip| ip.is_loopback()));
        let remote: SocketAddr = "10.1.2.3:7400".parse().unwrap();
        assert!(Sources::new(remote, 50_000, None).next().is_none());
    }

    #[tokio::test]
    async fn urls_of_every_accepted_form_resolve() {
        for url in [
            "ws://127.0.0.1:9/v1/ws",
            "http://127.0.0.1:9",
            "127.0.0.1:9",
        ] {
            let e = Endpoint::parse(url).await.unwrap();
            assert_eq!(e.ws_url, "ws://127.0.0.1:9/v1/ws");
            assert_eq!(e.http_url, "http://127.0.0.1:9");
        }
        assert!(Endpoint::parse("wss://127.0.0.1:9").await.is_err());
    }
}
