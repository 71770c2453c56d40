//! # branchline-client
//!
//! placeholder
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
