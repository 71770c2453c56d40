//! The HTTP polling transport (PROTOCOL.md §11), for networks that cannot hold a socket: a
//! long poll per followed branch, one batch push at a time, and the clock measured by
//! `GET /v1/time` since there is no ping.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use branchline_protocol::http::PushResult;
use branchline_protocol::{Name, Position, Rejected, UnixMillis, Welcome};
use futures::future::{self, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::time::{Instant, sleep, sleep_until};
use uuid::Uuid;

use super::{Input, Room, Transport, maybe};
use crate::backoff::jitter;
use crate::engine::shared::Shared;
use crate::error::{Error, Result};
use crate::http::{HttpApi, Poll};
use crate::status::SyncState;
use crate::store::PendingEvent;

/// A poll of a branch: the branch, where it asked from, what came.
type PollFuture = BoxFuture<'static, (Name, Position, Result<Poll>)>;
/// A batch push: the branch, the events sent, the results.
type PushFuture = BoxFuture<'static, (Name, Vec<Uuid>, Result<Vec<PushResult>>)>;
/// A `GET /v1/time` round trip: (sent, server, received).
type TimeFuture = BoxFuture<'static, Result<(UnixMillis, UnixMillis, UnixMillis)>>;

/// A page delivered to the handler and not yet applied: what the branch's next poll
/// depends on.
struct Delivered {
    /// The hub's head with the page.
    head: u64,
    /// More events wait behind the page.
    has_more: bool,
    /// The page had no events (the long poll ran out).
    empty: bool,
}

/// HTTP polling of every followed branch.
pub(crate) struct Polling {
    shared: Arc<Shared>,
    http: HttpApi,
    polls: FuturesUnordered<PollFuture>,
    push: Option<PushFuture>,
    /// The clock measurement under way, or when the next one starts.
    clock: Option<TimeFuture>,
    next_clock: Instant,
    /// Failed polls in a row, by branch, for their backoff.
    attempts: HashMap<Name, u32>,
    /// Branches whose catching up the app has heard of.
    caught_up: HashSet<Name>,
    delivered: HashMap<Name, Delivered>,
    /// A batch push was refused as a whole: push one event at a time to find the culprit.
    one_at_a_time: bool,
}

impl Polling {
    /// Starts polling every followed branch with a position, and measures the clock.
    pub fn start(shared: Arc<Shared>) -> Result<Self> {
        let http = shared.http.clone();
        let mut polling = Self {
            clock: Some(time(&http)),
            next_clock: Instant::now(),
            http,
            polls: FuturesUnordered::new(),
            push: None,
            attempts: HashMap::new(),
            caught_up: HashSet::new(),
            delivered: HashMap::new(),
            one_at_a_time: false,
            shared,
        };
        for b in polling.shared.followed.clone() {
            if let Some(pos) = polling.shared.store.cursor(&b)? {
                polling.poll(b, pos, Duration::ZERO, Duration::ZERO);
            }
        }
        Ok(polling)
    }

    /// Polls `branch` for events after `from`, after `delay`, waiting up to `wait` for them.
    fn poll(&mut self, branch: Name, from: Position, wait: Duration, delay: Duration) {
        let http = self.http.clone();
        let limit = self.shared.opts.poll_limit;
        self.polls.push(
            async move {
                if !delay.is_zero() {
                    sleep(delay).await;
                }
                let r = http.events(&branch, from, limit, wait).await;
                (branch, from, r)
            }
            .boxed(),
        );
    }

    fn on_poll(&mut self, branch: Name, from: Position, result: Result<Poll>) -> Input {
        match result {
            Ok(Poll::Page(page)) => {
                self.attempts.remove(&branch);
                self.delivered.insert(
                    branch.clone(),
                    Delivered {
                        head: page.head,
                        has_more: page.has_more,
                        empty: page.events.is_empty(),
                    },
                );
                Input::Events {
                    branch,
                    events: page.events,
                    head: Some(page.head),
                }
            }
            Ok(Poll::Resync(r)) => {
                self.caught_up.remove(&branch);
                Input::ResyncRequired(r)
            }
            Err(e) if e.is_auth() => Input::Refused(e),
            Err(e) => {
                let attempt = self.attempts.entry(branch.clone()).or_insert(0);
                *attempt += 1;
                let delay = self.shared.opts.backoff.delay(*attempt);
                self.poll(branch, from, Duration::ZERO, delay);
                Input::Trouble(e.to_string())
            }
        }
    }

    fn on_push(&mut self, branch: Name, sent: &[Uuid], result: Result<Vec<PushResult>>) -> Input {
        match result {
            Ok(answers) => {
                self.one_at_a_time = false;
                Input::Answers { branch, answers }
            }
            // A permanent refusal of the whole request is a refusal of the events in it
            // (`forbidden`: the token does not allow the branch; `message_too_big`…): they
            // are quarantined, one at a time to find each culprit. This comes before the
            // credentials case, which is only `unauthorized`/`token_expired` here.
            Err(Error::Hub { code, message, .. }) if code.is_permanent() && sent.len() > 1 => {
                tracing::warn!(%branch, %code, %message, "batch push refused; pushing one by one");
                self.one_at_a_time = true;
                Input::Resend { branch }
            }
            Err(Error::Hub { code, message, .. }) if code.is_permanent() => {
                self.one_at_a_time = false;
                let answers = sent
                    .iter()
                    .map(|id| {
                        PushResult::Rejected(Rejected::of(*id, branch.clone(), code, &message))
                    })
                    .collect();
                Input::Answers { branch, answers }
            }
            Err(e) if e.is_auth() => Input::Refused(e),
            Err(e) => Input::Unsent {
                branch,
                reason: e.to_string(),
            },
        }
    }
}

impl Transport for Polling {
    fn state(&self) -> SyncState {
        SyncState::Polling
    }

    fn welcome(&mut self) -> Option<Welcome> {
        None
    }

    fn room(&self) -> Option<Room> {
        self.push.is_none().then_some(Room {
            window: if self.one_at_a_time {
                1
            } else {
                self.shared.opts.push_batch
            },
            // No frame limit: a push is bounded by the hub's body limit, and a single
            // event over it is refused `message_too_big` (quarantined).
            limit: None,
        })
    }

    fn publish(&mut self, branch: &Name, events: &[PendingEvent]) {
        let (http, store) = (self.http.clone(), Arc::clone(&self.shared.store));
        let (branch, time) = (branch.clone(), self.shared.clock.now());
        let sent: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let publishes: Vec<_> = events.iter().map(PendingEvent::to_publish).collect();
        self.push = Some(
            async move {
                // Sent marks are on disk before the push leaves.
                let r = match store.sync_sent().await {
                    Ok(()) => http.push(&branch, time, publishes).await.map(|r| r.results),
                    Err(e) => Err(e),
                };
                (branch, sent, r)
            }
            .boxed(),
        );
    }

    fn send(&mut self) -> BoxFuture<'_, Result<(), String>> {
        // The push left in `publish`: it runs inside `next`.
        future::ready(Ok(())).boxed()
    }

    fn next(&mut self) -> BoxFuture<'_, Input> {
        async move {
            tokio::select! {
                Some((branch, from, result)) = self.polls.next(), if !self.polls.is_empty() => {
                    self.on_poll(branch, from, result)
                }
                Some((branch, sent, result)) = maybe(&mut self.push), if self.push.is_some() => {
                    self.push = None;
                    self.on_push(branch, &sent, result)
                }
                Some(sample) = maybe(&mut self.clock), if self.clock.is_some() => {
                    self.clock = None;
                    // Jittered, so that tills polling together do not measure together.
                    self.next_clock = Instant::now() + jitter(self.shared.opts.probe_interval);
                    match sample {
                        Ok((sent, server, received)) => Input::Clock { sent, server, received },
                        Err(e) => {
                            tracing::debug!(error = %e, "measuring the clock failed");
                            Input::Wake
                        }
                    }
                }
                () = sleep_until(self.next_clock), if self.clock.is_none() => {
                    self.clock = Some(time(&self.http));
                    Input::Wake
                }
            }
        }
        .boxed()
    }

    fn applied(&mut self, branch: &Name, position: Position) -> bool {
        let Some(page) = self.delivered.remove(branch) else {
            return false;
        };
        let news = if !page.has_more && position.seq >= page.head {
            // Once per catching up, and again with each page that brought events.
            self.caught_up.insert(branch.clone()) || !page.empty
        } else {
            self.caught_up.remove(branch);
            false
        };
        let wait = if page.has_more {
            Duration::ZERO
        } else {
            self.shared.opts.poll_wait
        };
        self.poll(branch.clone(), position, wait, Duration::ZERO);
        news
    }

    fn follow(&mut self, branch: Name, position: Position) {
        self.poll(branch, position, Duration::ZERO, Duration::ZERO);
    }

    fn resumes_in_place(&self) -> bool {
        true
    }

    fn close(&mut self) -> BoxFuture<'_, ()> {
        future::ready(()).boxed()
    }
}

fn time(http: &HttpApi) -> TimeFuture {
    let http = http.clone();
    async move { http.time().await }.boxed()
}
