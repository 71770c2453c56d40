//! The background task: the one owner of the connection to the hub, split the way
//! async-nats splits its client.
//!
//! - [`connector`]: the outer loop. Picks the transport (WebSocket; HTTP polling after
//!   [`ClientOptions::websocket_failures_before_polling`] sessions that could not be held,
//!   probing the socket to go back), backs off between attempts, waits for a new token
//!   after a refusal.
//! - [`handler`]: the one loop that serves a connection over any [`transport::Transport`]:
//!   applies what arrives, drains the outbox through the publishers, takes snapshots, keeps
//!   the status.
//! - [`transport`]: the trait, with its WebSocket and HTTP polling implementations, and the
//!   [`transport::Remote`] that opens them.
//! - [`apply`]: sequenced events and snapshots into the store, updates out to the streams.
//! - [`snapshot`]: paged snapshot downloads that survive a cut.
//! - [`shared`]: what handles and the task share, and the commands handles send.
//!
//! Handles talk to the task through a bounded command channel and a `Notify`; it talks
//! back through `watch` and `broadcast` channels, which never block it.
//!
//! [`ClientOptions::websocket_failures_before_polling`]: crate::ClientOptions::websocket_failures_before_polling

mod apply;
mod connector;
mod handler;
mod shared;
mod snapshot;
#[cfg(test)]
mod tests;
mod transport;

pub(crate) use connector::Connector;
pub(crate) use shared::{COMMAND_QUEUE, Command, Downloads, Shared};
