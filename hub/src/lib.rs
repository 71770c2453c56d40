//! # branchline-hub
//!
//! The Branchline hub. Filled in by the hub issues.

pub use branchline_protocol as protocol;
