//! The replica's confirmed part: per branch, the position it is at and the products and
//! stock levels as the hub last confirmed them (the pending overlay is [`crate::replica`]).

use branchline_protocol::{Effect, Name, Position, ProductRecord, Sku, StockLevel};

use super::{Store, branch_prefix, enc, key};
use crate::error::Result;

/// `c/{branch}`: the position `(epoch, seq)` the replica of the branch is at.
fn position_key(branch: &Name) -> Vec<u8> {
    key("c", branch, b"")
}

/// `p/{branch}/{sku}`: a product of the replica.
fn product_key(branch: &Name, sku: &Sku) -> Vec<u8> {
    key("p", branch, sku.as_str().as_bytes())
}

/// `s/{branch}/{sku}`: a stock level of the replica.
fn stock_key(branch: &Name, sku: &Sku) -> Vec<u8> {
    key("s", branch, sku.as_str().as_bytes())
}

/// Adds to `batch` that the replica of `branch` is at `position`.
pub(super) fn set_position(
    batch: &mut sled::Batch,
    branch: &Name,
    position: Position,
) -> Result<()> {
    batch.insert(position_key(branch), enc(&position)?);
    Ok(())
}

/// Adds to `batch` the products and stock levels of `branch` given, replacing the ones
/// of the same SKUs.
pub(super) fn put<'a>(
    batch: &mut sled::Batch,
    branch: &Name,
    products: impl IntoIterator<Item = &'a ProductRecord>,
    stock: impl IntoIterator<Item = &'a StockLevel>,
) -> Result<()> {
    for p in products {
        batch.insert(product_key(branch, &p.sku), enc(p)?);
    }
    for s in stock {
        batch.insert(stock_key(branch, &s.sku), enc(s)?);
    }
    Ok(())
}

/// Adds to `batch` what an event did to the replica of `branch`: its `effect`, the new
/// values of what it touched (PROTOCOL.md §10).
pub(super) fn put_effect(batch: &mut sled::Batch, branch: &Name, effect: &Effect) -> Result<()> {
    put(batch, branch, &effect.product, &effect.stock)
}

impl Store {
    /// Adds to `batch` the removal of every product and stock level of `branch`.
    pub(super) fn clear_replica(&self, batch: &mut sled::Batch, branch: &Name) -> Result<()> {
        for prefix in ["p", "s"] {
            for k in self.db.scan_prefix(branch_prefix(prefix, branch)).keys() {
                batch.remove(k?);
            }
        }
        Ok(())
    }

    /// The position the replica of `branch` is at (`None` before the first snapshot).
    pub fn cursor(&self, branch: &Name) -> Result<Option<Position>> {
        self.read(&position_key(branch))
    }

    /// The replica's product `sku` on `branch`, as the hub last confirmed it.
    pub fn confirmed_product(&self, branch: &Name, sku: &Sku) -> Result<Option<ProductRecord>> {
        self.read(&product_key(branch, sku))
    }

    /// The replica's stock level of `sku` on `branch`, as the hub last confirmed it.
    pub fn confirmed_stock(&self, branch: &Name, sku: &Sku) -> Result<Option<StockLevel>> {
        self.read(&stock_key(branch, sku))
    }

    /// Every product of the replica of `branch`, in SKU order.
    pub fn confirmed_products(&self, branch: &Name) -> Result<Vec<ProductRecord>> {
        self.scan_values(&branch_prefix("p", branch))
    }

    /// Every stock level of the replica of `branch`, in SKU order.
    pub fn confirmed_stock_levels(&self, branch: &Name) -> Result<Vec<StockLevel>> {
        self.scan_values(&branch_prefix("s", branch))
    }
}
