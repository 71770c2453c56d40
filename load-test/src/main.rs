//! The `branchline-load` binary. Filled in by the load harness issue.

fn main() {
    println!("branchline-load {}", env!("CARGO_PKG_VERSION"));
}
