//! # branchline-hub
//!
//! The Branchline hub: cashier tills and admin consoles connect over WebSocket (or poll over
//! HTTP); every event a till publishes is sequenced per branch, made durable, and delivered in
//! order to every follower of the branch.
//!
//! ## Map
//! - [`server`]: the accept loop, connection limits, the shared [`Hub`] and graceful shutdown
//!   ([`run`] is the entry point).
//! - [`http`]: routes of the HTTP sync API, the WebSocket upgrade, health and metrics.
//! - [`session`]: one WebSocket connection: hello, subscriptions, publishes, delivery and
//!   catch-up.
//! - [`room`]: the live sessions of each branch and fan-out of committed events.
//! - [`branch`]: a branch's shared handle and its single writer (sequencing, dedup,
//!   `device_seq`, state).
//! - [`state`]: the stock ledger, the catalog and conflict policies.
//! - [`dedup`]: the in-memory "certainly new" filter in front of the dedup index.
//! - [`commit`]: the group committer: one atomic write and one sync for many appends.
//! - [`log`]: the replay log behind the [`EventLog`](log::EventLog) engine boundary, in sled,
//!   made durable by `branchline-durable` (fdatasync and directory syncs after sled's flush).
//! - [`health`]: whether the store takes writes (not failed, free space above the floor).
//! - [`snapshot`]: paged snapshots pinned to one seq.
//! - [`auth`]: tokens. [`config`]: every setting. [`metrics`]: Prometheus metrics.
//! - [`inspect`]: the `log inspect`, `log dump` and `log reset-epoch` tools.
//!
//! ## How a publish flows
//! session (or HTTP push) → branch [`Writer`](branch) validates, deduplicates, checks
//! `device_seq`, applies it to [`state`], assigns `seq` → [`commit`] writes the event, its
//! dedup entry, device counter and state changes in one atomic batch with many others and
//! syncs it to stable storage → the branch head moves → [`room`] offers the event's shared
//! frame to every follower → the publisher gets `accepted`.

pub mod auth;
pub mod branch;
pub mod commit;
pub mod config;
pub mod dedup;
pub mod health;
pub mod http;
pub mod inspect;
pub mod log;
pub mod metrics;
pub mod room;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod state;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use branchline_protocol as protocol;
pub use config::Config;
pub use server::{Hub, HubError, run};
