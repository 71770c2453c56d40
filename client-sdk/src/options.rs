//! [`ClientOptions`]: every setting with its default; [`ClientOptions::connect`] (in
//! `client`, beside what it starts) opens the client.

use std::path::PathBuf;
use std::time::Duration;

use branchline_protocol::{Claims, Codec, Name, routes};

use crate::backoff::Backoff;
use crate::error::{Error, Result};

/// Which transports the client may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket when it works; HTTP polling after
    /// [`ClientOptions::websocket_failures_before_polling`] consecutive failures, probing the
    /// socket to go back. The default.
    #[default]
    Auto,
    /// WebSocket only: keep retrying it with backoff.
    WebSocketOnly,
    /// HTTP polling only (networks that break WebSockets, such as some proxies).
    HttpOnly,
}

/// Where the local store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorePath {
    /// A directory on disk; survives restarts. What a till needs.
    Dir(PathBuf),
    /// A temporary directory deleted when the client stops: for dashboards and tests only,
    /// as the outbox does not survive a restart.
    Temporary,
}

/// Settings for a [`Client`]. `ClientOptions::new().token(t).store(dir).connect(url)`.
///
/// [`Client`]: crate::Client
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub(crate) token: Option<String>,
    pub(crate) device: Option<Name>,
    pub(crate) branches: Option<Vec<Name>>,
    pub(crate) store: StorePath,
    pub(crate) backoff: Backoff,
    pub(crate) publish_window: usize,
    pub(crate) push_batch: usize,
    pub(crate) poll_limit: usize,
    pub(crate) poll_wait: Duration,
    pub(crate) snapshot_page: usize,
    pub(crate) websocket_failures_before_polling: u32,
    pub(crate) transport: Transport,
    pub(crate) probe_interval: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) codec: Codec,
    pub(crate) local_log_capacity: u64,
    pub(crate) ack_interval: Duration,
    pub(crate) durable_publish: bool,
    pub(crate) max_event_bytes: usize,
    pub(crate) agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: None,
            device: None,
            branches: None,
            store: StorePath::Dir(PathBuf::from("branchline-store")),
            backoff: Backoff::default(),
            publish_window: 256,
            push_batch: 200,
            poll_limit: 500,
            poll_wait: Duration::from_secs(20),
            snapshot_page: 1000,
            websocket_failures_before_polling: 3,
            transport: Transport::Auto,
            probe_interval: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: None,
            codec: Codec::MsgPack,
            local_log_capacity: 10_000,
            ack_interval: Duration::from_millis(250),
            durable_publish: true,
            max_event_bytes: branchline_protocol::DEFAULT_MAX_FRAME_BYTES,
            agent: format!("branchline-client/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl ClientOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token (required): an HS256 JWT from the hub's operator. Its claims give the
    /// tenant, the device, the role and the branches to follow.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The device name. Optional: it must be the token's, which is used when not given.
    pub fn device(mut self, device: Name) -> Self {
        self.device = Some(device);
        self
    }

    /// The branches to follow (replica, event stream). Default: the token's branches; an
    /// admin token with `"*"` must name them. Publishing is allowed to any branch the token
    /// allows, followed or not.
    pub fn branches(mut self, branches: impl IntoIterator<Item = Name>) -> Self {
        self.branches = Some(branches.into_iter().collect());
        self
    }

    /// Where the local store lives. Default: `./branchline-store`.
    pub fn store(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store = StorePath::Dir(dir.into());
        self
    }

    /// Keep the store in a temporary directory that is deleted on shutdown (dashboards and
    /// tests; never for a till: the outbox would not survive a restart).
    pub fn temporary_store(mut self) -> Self {
        self.store = StorePath::Temporary;
        self
    }

    /// The delay policy for reconnects and publish retries. Default:
    /// [`Backoff::exponential`] from 250 ms to 30 s with full jitter, so that a thousand
    /// tills do not reconnect to a restarted hub at the same instant.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Most publishes in flight per branch over the WebSocket before answers come back.
    /// Default 256: enough to fill a link with 1 ms events at 250 ms latency, well under the
    /// hub's 1,024 per session (PROTOCOL.md §14).
    pub fn publish_window(mut self, n: usize) -> Self {
        self.publish_window = n.max(1);
        self
    }

    /// Events per HTTP batch push in polling mode. Default 200; the hub takes at most 1,000.
    pub fn push_batch(mut self, n: usize) -> Self {
        self.push_batch = n.clamp(1, 1000);
        self
    }

    /// Events per HTTP poll page. Default 500; the hub clamps at 5,000.
    pub fn poll_limit(mut self, n: usize) -> Self {
        self.poll_limit = n.clamp(1, 5000);
        self
    }

    /// How long one long poll waits for new events. Default 20 s (the hub clamps at 30 s):
    /// long enough to be cheap, short enough that proxies do not cut idle requests.
    pub fn poll_interval(mut self, wait: Duration) -> Self {
        self.poll_wait = wait.min(Duration::from_secs(30));
        self
    }

    /// Items per snapshot page. Default 1,000 (the hub clamps at 10,000).
    pub fn snapshot_page(mut self, n: usize) -> Self {
        self.snapshot_page = n.clamp(1, 10_000);
        self
    }

    /// Consecutive WebSocket failures before switching to HTTP polling. A failure is a
    /// connection that got no `welcome`, or a session that ended within 10 seconds (a socket
    /// that connects but cannot be held); only a session that lasts longer resets the
    /// count. Default 3.
    pub fn websocket_failures_before_polling(mut self, n: u32) -> Self {
        self.websocket_failures_before_polling = n.max(1);
        self
    }

    /// Which transports to use. Default [`Transport::Auto`].
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// How often polling mode tries the WebSocket again. Default 30 s. Each wait is
    /// jittered to between half and one and a half times this, so that tills that fell back
    /// together do not probe together; polling goes on while a probe is under way.
    pub fn probe_interval(mut self, every: Duration) -> Self {
        self.probe_interval = every;
        self
    }

    /// Limit for opening a connection and getting `welcome` (or an HTTP answer header).
    /// Default 10 s.
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// A session that hears nothing from the hub for this long is considered dead and
    /// resumed on a new connection. Default: three of the hub's heartbeat intervals (from
    /// `welcome`), as the hub does for silent clients.
    pub fn idle_timeout(mut self, limit: Duration) -> Self {
        self.idle_timeout = Some(limit);
        self
    }

    /// The wire encoding. Default MessagePack; JSON for debugging.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How many updates the local log keeps for [`Client::events`] streams that fall behind.
    /// Default 10,000.
    ///
    /// [`Client::events`]: crate::Client::events
    pub fn local_log_capacity(mut self, n: u64) -> Self {
        self.local_log_capacity = n.max(1);
        self
    }

    /// How often applied positions are acknowledged to the hub (for admins' lag view).
    /// Default 250 ms (PROTOCOL.md §5 asks for at most a few per second).
    pub fn ack_interval(mut self, every: Duration) -> Self {
        self.ack_interval = every;
        self
    }

    /// Whether [`Client::publish`] waits until the event is on stable storage before
    /// returning (sled's flush, then `fdatasync` and directory syncs: sled's flush alone does
    /// not survive a power cut). Default true: a returned publish survives a crash and a
    /// power cut. False returns after the in-memory write, and sled flushes within 500 ms:
    /// faster, but a crash can lose the last half second of sales, and a power cut more.
    ///
    /// [`Client::publish`]: crate::Client::publish
    pub fn durable_publish(mut self, durable: bool) -> Self {
        self.durable_publish = durable;
        self
    }

    /// The largest event [`Client::publish`] records, measured as its encoded `publish`
    /// frame in the configured codec, with the largest possible `device_seq` so that no
    /// renumbering can push it over. Bigger events are refused with
    /// [`Error::EventTooBig`] before they take a `device_seq`. Default 1 MiB, the hub's
    /// default frame limit (PROTOCOL.md §14): the frame is the whole WebSocket message,
    /// envelope included, so nothing else needs room. Raise it only for a hub configured
    /// with a larger limit; an event over the hub's limit that reaches the outbox anyway is
    /// quarantined `message_too_big` before it is sent over a WebSocket (the hub announces
    /// its limit in `welcome`, and would close the session on the frame).
    ///
    /// [`Client::publish`]: crate::Client::publish
    pub fn max_event_bytes(mut self, n: usize) -> Self {
        self.max_event_bytes = n;
        self
    }

    /// The client name sent in `hello`, for the hub's logs.
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = agent.into();
        self
    }
}

/// The hub's two base URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoints {
    /// `ws://host:port/v1/ws`
    pub ws: String,
    /// `http://host:port` (no trailing slash)
    pub http: String,
}

impl Endpoints {
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim().trim_end_matches('/');
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| Error::Config(format!("{url:?} is not a URL")))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(Error::Config(format!("{url:?} has no host")));
        }
        match scheme {
            "ws" | "http" => Ok(Self {
                ws: format!("ws://{authority}{}", routes::WS),
                http: format!("http://{authority}"),
            }),
            "wss" | "https" => Err(Error::Config(format!(
                "{url:?} needs TLS, which this SDK is built without: terminate TLS in front \
                 of the hub (or on a local proxy) and connect with http:// or ws://"
            ))),
            other => Err(Error::Config(format!(
                "unsupported scheme {other:?}: use http:// or ws://"
            ))),
        }
    }
}

/// The claims of `token`, read without checking its signature (the hub checks it): the
/// client only needs its tenant, device, role and branches.
pub(crate) fn claims(token: &str) -> Result<Claims> {
    Claims::read_unverified(token).map_err(|e| Error::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_accept_http_or_ws_urls_and_refuse_tls_ones() {
        let want = Endpoints {
            ws: "ws://127.0.0.1:7400/v1/ws".into(),
            http: "http://127.0.0.1:7400".into(),
        };
        assert_eq!(Endpoints::parse("http://127.0.0.1:7400").unwrap(), want);
        assert_eq!(Endpoints::parse("http://127.0.0.1:7400/").unwrap(), want);
        assert_eq!(Endpoints::parse("ws://127.0.0.1:7400/v1/ws").unwrap(), want);
        assert!(Endpoints::parse("127.0.0.1:7400").is_err());
        // No TLS in this build: refused with a reason, not failing later at connect.
        for url in ["https://hub.example:7400", "wss://hub.example:7400/v1/ws"] {
            match Endpoints::parse(url) {
                Err(Error::Config(why)) => assert!(why.contains("TLS"), "{why}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert!(Endpoints::parse("ftp://x").is_err());
        assert!(Endpoints::parse("http://").is_err());
    }

    #[test]
    fn claims_are_read_from_the_token_payload() {
        use base64::Engine;
        use branchline_protocol::TokenBranches;

        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            br#"{"tenant":"acme","branches":["berlin-01"],"device":"till-1","role":"cashier","exp":1,"iat":0}"#,
        );
        let c = claims(&format!("h.{payload}.s")).unwrap();
        assert_eq!(c.tenant.as_str(), "acme");
        assert_eq!(c.device.as_str(), "till-1");
        match &c.branches {
            TokenBranches::List(list) => assert_eq!(list[0].as_str(), "berlin-01"),
            TokenBranches::All => panic!("a list of branches read as \"*\""),
        }
        let star = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            br#"{"tenant":"acme","branches":"*","device":"a","role":"admin","exp":1,"iat":0}"#,
        );
        assert_eq!(
            claims(&format!("h.{star}.s")).unwrap().branches,
            TokenBranches::All
        );
        assert!(matches!(claims("garbage"), Err(Error::Config(_))));
    }
}
