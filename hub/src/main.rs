//! The `branchline-hub` binary.

fn main() {
    println!(
        "branchline-hub {}: protocol v{}",
        env!("CARGO_PKG_VERSION"),
        branchline_hub::protocol::PROTOCOL_VERSION
    );
}
