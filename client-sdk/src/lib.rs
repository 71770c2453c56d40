//! # branchline-client
//!
//! The Branchline client SDK. Filled in by the SDK issue.

pub use branchline_protocol as protocol;
