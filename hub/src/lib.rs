//! # branchline-hub
//!
//! The Branchline hub: cashier tills and admin consoles connect over WebSocket (or poll over
//! HTTP); every event a till publishes is sequenced per branch, made durable, and delivered in
//! order to every follower of the branch.
//!
//! ## Map
//! - [`server`]: the accept loop, connection limits and shutdown ([`run`] is the entry
//!   point), each connection counted by a [`conn::ConnGuard`]; [`hub`]: the [`Hub`] its parts
//!   share, and the engine's feed into it.
//! - [`ws`]: WebSocket sessions: hello, subscriptions, publishes, delivery and catch-up, and
//!   the rooms that fan events out.
//! - [`http`]: the HTTP sync API (events, push, snapshots, admin) and the operations
//!   endpoints.
//! - [`branch`]: one handle per branch, the methods sessions and HTTP share (publish,
//!   resume, read, status, devices, conflicts, resolve, snapshot), presence, and the
//!   snapshots being paged.
//! - [`engine`]: the boundary to what stores and sequences logs, shaped like a broker;
//!   [`engine::sled`] is the embedded engine (single writer per branch, group commit, the
//!   sled store made durable), [`engine::sequence`] the rules every engine applies.
//! - [`state`]: the stock ledger, the catalog and its conflict policies (pure).
//! - [`ops`]: upkeep while running, and the `log inspect|dump|reset-epoch` tools.
//! - [`auth`]: tokens. [`config`]: every setting. [`metrics`]: Prometheus metrics.
//!
//! ## How a publish flows
//! [`ws`] session (or [`http`] push) → [`branch::Branch::publish`] → the engine's writer of
//! the branch runs it through the [`engine::sequence::Sequencer`] (validation, dedup,
//! `device_seq`, [`state`], `seq`) → the group committer writes the event, its dedup entry,
//! device counter and state changes in one atomic batch with many others and syncs it to
//! stable storage → the feed ([`hub::HubFeed`]) moves the branch head and offers the events'
//! shared frame to every follower in the [`ws::room`] → the publisher gets `accepted`.

pub mod auth;
pub mod branch;
pub mod config;
pub mod conn;
pub mod engine;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod state;
#[cfg(feature = "test-util")]
pub mod test_util;
pub mod ws;

pub use branchline_protocol as protocol;
pub use config::Config;
pub use hub::{Hub, HubError};
pub use server::run;
