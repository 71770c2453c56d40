//! WebSocket sessions: hello, subscriptions, publishes, and delivery.
//!
//! A session is one task. It reads frames, hands publishes to their branch (keeping up to
//! `max_inflight_publishes` answers pending, in order), and writes: every frame it has to send
//! is fed to the socket and flushed once per round, never per message.
//!
//! - `hello`: the first frame, checked (version, token, tenant, device, branches), and the
//!   closing of a session with an error frame and a close code.
//! - `session`: the session loop, generic over the socket ([`Socket`]: any sink and stream
//!   of WebSocket messages, so its logic runs in tests without a network).
//! - `delivery`: live batches and catch-up from the log, per followed branch.
//! - [`room`]: the sessions following each branch, and fan-out.
//! - [`frames`]: frames as messages, and the live batches every follower shares.
//!
//! **Delivery.** For each followed branch the session keeps `delivered`, the last seq sent.
//! Live batches from the room are sent only if they continue exactly from `delivered`. When
//! they cannot — the subscription starts behind the head, the room cut the session over
//! because its queue was full, or anything else left a gap — the branch is *catching up*: the
//! session reads the log from `delivered` up to the committed head in chunks, drops the live
//! batches that arrive meanwhile (they are in the log too), and when it reaches the head sends
//! `caught_up` and goes back to live batches. Because the feed moves a head before it fans the
//! events out, and the session joins the room before it reads the head, nothing is lost or
//! repeated in the hand-over (PROTOCOL.md §8).

mod delivery;
pub mod frames;
mod hello;
pub mod room;
mod session;

use std::future::Future;
use std::sync::Arc;

use axum::extract::ws::Message;
use branchline_protocol::Codec;
use futures::{Sink, Stream};
use tracing::Instrument;

use crate::conn::ConnGuard;
use crate::hub::Hub;

/// A WebSocket as a session uses it: the messages the client sends, and a sink for those the
/// hub sends. axum's socket is one; tests use an in-memory pipe.
pub trait Socket:
    Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin + Send
{
}

impl<T> Socket for T where
    T: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Unpin
        + Send
{
}

/// Serves one upgraded WebSocket until it closes.
pub fn run<S: Socket + 'static>(
    ws: S,
    codec: Codec,
    hub: Arc<Hub>,
    conn: ConnGuard,
) -> impl Future<Output = ()> {
    // The hello phase is boxed and the socket moved into it right here: an async fn keeps
    // room for its arguments for its whole life, and this future is part of the task of every
    // idle session.
    let greeting = Box::pin(hello::greet(ws, codec, hub.clone()));
    async move {
        // `greeted` lives only inside the match, so its room is not kept beside the session's.
        let session = match greeting.await {
            Some(greeted) => {
                let span = greeted.span(codec);
                session::admitted(greeted, codec, hub).instrument(span)
            }
            None => return,
        };
        session.await;
        drop(conn);
    }
}

#[cfg(test)]
mod task_size {
    use super::*;

    fn future_size<F: Future>(_: impl FnOnce() -> F) -> usize {
        size_of::<F>()
    }

    /// Every connection's task holds the session future for its whole life, so its size is
    /// part of what an idle connection costs (at most 12 KiB in all, of which this future is
    /// a part). Rare, deep work (the hello, branch opening, handling a frame, a catch-up
    /// step) is boxed to keep it out; this fails if a change pulls it back in.
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn the_session_future_stays_small() {
        let run = future_size(|| {
            run::<axum::extract::ws::WebSocket>(
                unreachable!(),
                Codec::MsgPack,
                unreachable!(),
                unreachable!(),
            )
        });
        let serve = future_size(|| {
            session::Session::serve::<axum::extract::ws::WebSocket>(unreachable!(), unreachable!())
        });
        assert!(run <= 2048, "the session future is {run} bytes");
        assert!(serve <= 512, "the session loop future is {serve} bytes");
    }
}
