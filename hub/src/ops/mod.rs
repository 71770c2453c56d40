//! Operations: the hub's upkeep while it runs, and the offline tools on a stopped hub's store.

pub mod inspect;
pub mod maintenance;
