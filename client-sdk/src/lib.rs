//! # branchline-client
//!
//! The Branchline client SDK: what a cashier app links to record sales offline in
//! microseconds, never lose or double one, stay current live over a WebSocket, fall back to
//! HTTP polling when the socket cannot be held, and tell the user honestly how sync stands.
//!
//! ## Example: record a sale offline, come online, see it sequenced
//!
//! ```
//! use branchline_client::protocol::{EventBody, Name, SaleLine, SaleRecorded, Sku};
//! use branchline_client::{ClientOptions, SyncState, Update};
//! use futures::StreamExt;
//! # use branchline_hub::test_util::TestHub;
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let hub = TestHub::start().await;
//! # let token = hub.token("acme", &["berlin-01"], "till-1", branchline_client::protocol::Role::Cashier);
//! # let dir = tempfile::tempdir()?;
//! # let store_dir = dir.path();
//! # let url = hub.http_url();
//!
//! // Options, then connect: returns at once, even with no network.
//! let client = ClientOptions::new()
//!     .token(token)            // its claims name the tenant, device and branches
//!     .store(store_dir)        // the durable outbox and replica live here
//!     .connect(&url)
//!     .await?;
//! let mut updates = client.events();
//!
//! // Recording a sale is a local, durable write: it works offline.
//! let sale = client
//!     .publish(EventBody::SaleRecorded(SaleRecorded {
//!         sale_id: "T1-000482".into(),
//!         lines: vec![SaleLine {
//!             sku: Sku::new("COFFEE-250G")?,
//!             qty: 2,
//!             unit_price: 899,
//!             discount: 0,
//!         }],
//!         total: 1798,
//!         tax: 164,
//!         currency: "EUR".into(),
//!         payments: vec![],
//!     }))
//!     .await?;
//! let branch = Name::new("berlin-01")?;
//! // Read-your-writes: the replica shows the sale before the hub has it.
//! let coffee = client.stock(&branch, &Sku::new("COFFEE-250G")?)?.expect("a level");
//! assert_eq!(coffee.on_hand, -2);
//!
//! // Once online, the background task sends it; it comes back sequenced, in order.
//! loop {
//!     match updates.next().await.expect("the client is running") {
//!         Update::Event(e) if e.event_id == sale.event_id => {
//!             println!("sale sequenced at {}", e.position());
//!             break;
//!         }
//!         other => println!("{other}"),
//!     }
//! }
//! let status = client.status().borrow().clone();
//! println!("{status}"); // e.g. "live, 0 pending"
//! assert_eq!(status.state, SyncState::Live);
//! client.shutdown().await?;
//! # hub.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Map
//! - [`ClientOptions`] (`options`): every setting with its default; [`connect`] is the
//!   shorthand. The token's claims are read with [`protocol::Claims`].
//! - [`Client`] (`client`): the cheap, clonable handle. Publishing writes the local store
//!   directly (under a short mutex) and wakes the background task; everything else reads the
//!   store or talks to the task over channels.
//! - `engine`: the one background task that owns the connection, in the parts async-nats
//!   has:
//!   - `engine::connector`: which transport, and what follows the end of a connection. A
//!     WebSocket first; after [`ClientOptions::websocket_failures_before_polling`] sessions
//!     that could not be held, HTTP polling, probing the socket to go back. Backs off between
//!     attempts ([`Backoff`]) and waits for a new token after a refusal.
//!   - `engine::handler`: the one loop that serves a connection, whichever transport: it
//!     applies what arrives, hands the outbox to the transport, snapshots the branches that
//!     must resync and keeps the status.
//!   - `engine::transport`: the `Transport` trait the handler drives, and its two
//!     implementations: `websocket` (a session: frames over `ws`, pipelined publishes, acks,
//!     pings) and `polling` (long polls per branch and batch pushes over `http`, the hub's
//!     HTTP API). Both resume every followed branch from its stored position.
//!   - `engine::apply`: sequenced events and snapshots into the store; updates out to the
//!     event streams.
//!   - `engine::snapshot`: paged snapshot downloads that resume after a cut.
//! - `publisher`: drains one branch's outbox as a pipelined window, handles the hub's answers
//!   (quarantine, renumbering, backoff) the same way for both transports.
//! - `store`: sled, one tree, key prefixes, a module per part: `outbox` (with the
//!   `device_seq` counters), `quarantine`, `replica` (positions and the confirmed state) and
//!   `log` (the local log of applied updates). A change that crosses parts is one atomic
//!   batch: an applied event moves the position, the replica, the local log and retires its
//!   outbox entry together.
//! - [`replica`]: read-your-writes overlay of pending events on the confirmed replica.
//! - [`status`]: [`SyncStatus`] (a `watch`) and [`ClientEvent`] notifications.
//! - [`Backoff`]: pluggable retry delays; capped exponential with full jitter by default.
//! - `clock`: device-to-hub clock offset, used to stamp events.
//! - [`protocol`]: the wire contract, shared with the hub: frames, token claims, routes.
//!
//! ## Data flow
//! `publish` → outbox (sled, synced) → the handler takes a window of it from the branch's
//! publisher, which marks the entries sent → the transport syncs the marks and sends
//! `publish` frames (or a batch push) → the hub's answers come back as inputs: `accepted`
//! marks the entry → the sequenced `event` comes back as an input → `apply` writes it to the
//! replica by its `effect`, advances the position, appends it to the local log and retires
//! its outbox entry, atomically → [`Client::events`] streams yield it.
//!
//! ## Guarantees and limits
//! - **Nothing lost**: `publish` returns after the outbox write is on stable storage —
//!   sled's flush followed by `fdatasync` and directory syncs, so that a power cut cannot
//!   take it back ([`ClientOptions::durable_publish`]). Entries leave the outbox only when their event is
//!   in the replica (or, for branches not followed, when the hub accepted them). Publishing
//!   to a branch the token allows but the client does not follow works over both
//!   transports.
//! - **Nothing doubled**: retries reuse the `event_id`; the hub answers a retry with the
//!   original seq. Renumbering (after a quarantine, `out_of_order` or `device_seq_reused`)
//!   changes `device_seq` only, never the `event_id`, and never raises the number of an
//!   event that was sent before: the hub may have applied it and, once it left the hub's
//!   log, forgotten it. Such an event is quarantined `device_seq_reused` instead (see
//!   [`Client::retry_quarantined`]).
//! - **In order, gap-free**: events are applied only as `seq = position + 1`; a gap or an
//!   epoch change drops the connection and resumes from the stored position.
//! - **Quarantine**: an event the hub refuses permanently ([`protocol::ErrorCode::is_permanent`],
//!   including a batch push refused `forbidden`, and a publish over the frame limit the
//!   hub's `welcome` announced, quarantined `message_too_big` without being sent) is set
//!   aside; the events behind it are renumbered and go on. The
//!   app lists it with [`Client::quarantined`] and retries or drops it. An event over
//!   [`ClientOptions::max_event_bytes`] is refused by `publish` itself.
//! - **Resync**: a branch the hub cannot resume is rebuilt from a paged snapshot (held in
//!   memory until complete, then written in one batch: sized for catalogs of up to a few
//!   hundred thousand SKUs). A download cut by a lost connection resumes from its last
//!   page. The outbox is kept.
//! - **One store, one client**: a store directory is locked by the client that opened it.
//!   [`EventStream`]s keep the store open until they are dropped.
//! - The replica's pending overlay is an estimate (see [`replica`]); the confirmed state is
//!   exactly the hub's. Reads take the confirmed part and the pending part together.
//! - Plain `http://`/`ws://` only: the SDK is built without TLS, and refuses `https://` and
//!   `wss://` URLs (terminate TLS in front of the hub, or on a local proxy).
#![warn(missing_docs)]

pub mod backoff;
mod client;
mod clock;
mod engine;
pub mod error;
mod http;
pub mod options;
mod publisher;
pub mod replica;
pub mod status;
mod store;
pub mod update;
mod ws;

pub use backoff::Backoff;
pub use branchline_protocol as protocol;
pub use client::{Base, Client, EventStream, connect};
pub use error::{Error, Result};
pub use options::{ClientOptions, StorePath, Transport};
pub use replica::BranchState;
pub use status::{ClientEvent, SnapshotProgress, SyncState, SyncStatus};
pub use store::{PendingEvent, QuarantinedEvent};
pub use update::Update;
