//! The WebSocket transport: one session (PROTOCOL.md §4–§6). Frames come in one at a time;
//! publishes are pipelined up to the window and answered one by one; the position is
//! acknowledged now and then and the hub pinged at its heartbeat, which also measures the
//! clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use branchline_protocol::http::PushResult;
use branchline_protocol::{
    Ack, ClientFrame, Codec, Hello, Name, Ping, Position, ServerFrame, StartMode, Subscription,
    Welcome, now_ms,
};
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::time::{Instant, Interval, interval, sleep_until, timeout};

use super::{Input, Opening, Room, Transport};
use crate::engine::shared::Shared;
use crate::error::{Error, Result};
use crate::publisher::FrameLimit;
use crate::status::{ClientEvent, SyncState};
use crate::store::PendingEvent;
use crate::ws::{self, FrameSink, FrameStream};

/// Connects, says hello (resuming every followed branch with a position) and waits for
/// `welcome`, all within the connect timeout. A free future, so that the connector can
/// run it while it serves commands, and as the probe while polling.
pub(crate) fn open(shared: Arc<Shared>) -> Opening {
    async move {
        let limit = shared.opts.connect_timeout;
        timeout(limit, handshake(&shared))
            .await
            .unwrap_or_else(|_| Err(Error::Network(format!("no welcome within {limit:?}"))))
            .map(|(sink, stream, codec, welcome)| {
                Box::new(Socket::new(shared, sink, stream, codec, welcome)) as Box<dyn Transport>
            })
    }
    .boxed()
}

async fn handshake(shared: &Shared) -> Result<(FrameSink, FrameStream, Codec, Welcome)> {
    let opts = &shared.opts;
    let (mut sink, mut stream, codec) = ws::connect(
        &shared.endpoints.ws,
        opts.codec,
        branchline_protocol::DEFAULT_MAX_FRAME_BYTES,
    )
    .await?;
    let mut subscriptions = Vec::new();
    for b in &shared.followed {
        if let Some(pos) = shared.store.cursor(b)? {
            subscriptions.push(Subscription {
                branch: b.clone(),
                from: Some(pos),
            });
        }
    }
    let hello = ClientFrame::Hello(Hello {
        protocol: branchline_protocol::PROTOCOL_VERSION,
        token: shared.token(),
        tenant: shared.tenant.clone(),
        device: shared.device.clone(),
        client_time_ms: shared.clock.now(),
        subscriptions,
        agent: Some(opts.agent.clone()),
    });
    sink.send(hello).await?;
    match ws::next_frame(&mut stream, opts.connect_timeout).await? {
        ServerFrame::Welcome(welcome) => Ok((sink, stream, codec, welcome)),
        ServerFrame::Error(e) => Err(Error::Hub {
            status: e.code.http_status(),
            code: e.code,
            message: e.message,
        }),
        other => Err(Error::Network(format!(
            "expected welcome, got {}",
            other.type_name()
        ))),
    }
}

/// An open WebSocket session.
struct Socket {
    shared: Arc<Shared>,
    sink: FrameSink,
    stream: FrameStream,
    /// The hub's `welcome`, until the handler takes it.
    welcome: Option<Welcome>,
    /// The largest publish frame the hub takes, in the encoding it selected.
    limit: FrameLimit,
    /// A session that hears nothing for this long is dead.
    idle: Duration,
    /// Branches the hub is currently sending us.
    subscribed: HashSet<Name>,
    /// Branches with applied events not yet acknowledged.
    ack_dirty: HashSet<Name>,
    /// Frames to send with the next [`Transport::send`].
    out: Vec<ClientFrame>,
    /// Ping nonce → device time sent.
    pings: HashMap<u64, i64>,
    nonce: u64,
    ack_tick: Interval,
    ping_tick: Interval,
    last_heard: Instant,
}

impl Socket {
    fn new(
        shared: Arc<Shared>,
        sink: FrameSink,
        stream: FrameStream,
        codec: Codec,
        welcome: Welcome,
    ) -> Self {
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(100));
        let subscribed = welcome
            .branches
            .iter()
            .filter(|s| s.mode != StartMode::ResyncRequired)
            .map(|s| s.branch.clone())
            .collect();
        Self {
            idle: shared.opts.idle_timeout.unwrap_or(heartbeat * 3),
            ack_tick: interval(shared.opts.ack_interval),
            ping_tick: interval(heartbeat),
            shared,
            sink,
            stream,
            // The hub closes the session on a frame over the limit its welcome gave
            // (PROTOCOL.md §4): the publisher quarantines such a publish instead.
            limit: FrameLimit {
                codec,
                max_bytes: welcome.max_frame_bytes,
            },
            welcome: Some(welcome),
            subscribed,
            ack_dirty: HashSet::new(),
            out: Vec::new(),
            pings: HashMap::new(),
            nonce: 0,
            last_heard: Instant::now(),
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) -> Input {
        match frame {
            ServerFrame::Event(e) => Input::Events {
                branch: e.branch.clone(),
                events: vec![*e],
                head: None,
            },
            ServerFrame::Events(batch) => Input::Events {
                branch: batch.branch,
                events: batch.events,
                head: None,
            },
            ServerFrame::CaughtUp(c) => {
                self.ack_dirty.insert(c.branch.clone());
                Input::CaughtUp {
                    position: Position::new(c.epoch, c.seq),
                    branch: c.branch,
                }
            }
            ServerFrame::Accepted(a) => Input::Answer(PushResult::Accepted(a)),
            ServerFrame::Rejected(r) => Input::Answer(PushResult::Rejected(r)),
            ServerFrame::ResyncRequired(r) => {
                self.subscribed.remove(&r.branch);
                Input::ResyncRequired(r)
            }
            ServerFrame::Subscribed(start) => {
                // A branch to resync is not sent until a snapshot is in and it is followed
                // again.
                if start.mode != StartMode::ResyncRequired {
                    self.subscribed.insert(start.branch.clone());
                }
                Input::Start(start)
            }
            ServerFrame::Unsubscribed(u) => {
                self.subscribed.remove(&u.branch);
                Input::Wake
            }
            ServerFrame::Presence(p) => Input::Notice(ClientEvent::Presence(p)),
            ServerFrame::Devices(d) => Input::Notice(ClientEvent::Devices(d)),
            ServerFrame::Pong(p) => match self.pings.remove(&p.nonce) {
                Some(sent) => Input::Clock {
                    sent,
                    server: p.server_time_ms,
                    received: now_ms(),
                },
                None => Input::Wake,
            },
            ServerFrame::Error(e) if !e.fatal => Input::Notice(ClientEvent::Error {
                message: format!("{}: {}", e.code, e.message),
            }),
            ServerFrame::Error(e) => {
                let reason = format!("{}: {}", e.code, e.message);
                let error = Error::Hub {
                    status: e.code.http_status(),
                    code: e.code,
                    message: e.message,
                };
                if error.is_auth() {
                    Input::Refused(error)
                } else {
                    Input::Lost(reason)
                }
            }
            ServerFrame::Welcome(_) => Input::Wake,
        }
    }

    /// Queues an `ack` of every subscribed branch with events applied since the last one.
    fn queue_acks(&mut self) {
        for b in std::mem::take(&mut self.ack_dirty) {
            if self.subscribed.contains(&b) {
                if let Ok(Some(pos)) = self.shared.store.cursor(&b) {
                    self.out.push(ClientFrame::Ack(Ack {
                        branch: b,
                        epoch: pos.epoch,
                        seq: pos.seq,
                    }));
                }
            }
        }
    }

    fn queue_ping(&mut self) {
        self.nonce += 1;
        let sent = now_ms();
        self.pings.insert(self.nonce, sent);
        self.out.push(ClientFrame::Ping(Ping {
            nonce: self.nonce,
            client_time_ms: sent,
        }));
    }
}

impl Transport for Socket {
    fn state(&self) -> SyncState {
        SyncState::Live
    }

    fn welcome(&mut self) -> Option<Welcome> {
        self.welcome.take()
    }

    fn room(&self) -> Option<Room> {
        Some(Room {
            window: self.shared.opts.publish_window,
            limit: Some(self.limit),
        })
    }

    fn publish(&mut self, _branch: &Name, events: &[PendingEvent]) {
        self.out
            .extend(events.iter().map(|e| ClientFrame::Publish(e.to_publish())));
    }

    fn send(&mut self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            if self.out.is_empty() {
                return Ok(());
            }
            let frames = std::mem::take(&mut self.out);
            let (store, sink) = (&self.shared.store, &mut self.sink);
            let send = async {
                // Sent marks are on disk before a publish they cover leaves.
                store.sync_sent().await?;
                for f in frames {
                    sink.feed(f).await?;
                }
                sink.flush().await
            };
            match timeout(self.idle, send).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("sending stalled for {:?}", self.idle)),
            }
        }
        .boxed()
    }

    fn next(&mut self) -> BoxFuture<'_, Input> {
        async move {
            tokio::select! {
                frame = self.stream.next() => {
                    self.last_heard = Instant::now();
                    match frame {
                        Some(Ok(frame)) => self.on_frame(frame),
                        Some(Err(e)) => Input::Lost(e.to_string()),
                        None => Input::Lost("connection closed".into()),
                    }
                }
                _ = self.ack_tick.tick() => {
                    self.queue_acks();
                    Input::Wake
                }
                _ = self.ping_tick.tick() => {
                    self.queue_ping();
                    Input::Wake
                }
                () = sleep_until(self.last_heard + self.idle) => {
                    Input::Lost(format!("nothing from the hub for {:?}", self.idle))
                }
            }
        }
        .boxed()
    }

    fn applied(&mut self, branch: &Name, _position: Position) -> bool {
        // Caught up is the hub's to say, in a `caught_up` frame.
        self.ack_dirty.insert(branch.clone());
        false
    }

    fn follow(&mut self, branch: Name, position: Position) {
        self.subscribed.insert(branch.clone());
        self.out.push(ClientFrame::Subscribe(Subscription {
            branch,
            from: Some(position),
        }));
    }

    fn resumes_in_place(&self) -> bool {
        false
    }

    fn close(&mut self) -> BoxFuture<'_, ()> {
        async move {
            let _ = timeout(Duration::from_secs(1), self.sink.close()).await;
        }
        .boxed()
    }
}
