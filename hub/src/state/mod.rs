//! Branch state: the stock ledger, the catalog, and how catalog conflicts are settled.
//!
//! Everything here is a pure function of the state and one event, so the branch writer can
//! apply an event, persist the changes in the same atomic write as the event, and tell every
//! reader the [`Effect`]. A refused event changes nothing. The maps are persistent
//! (`imbl`), so a snapshot of a 100,000-SKU branch is a constant-time clone.

use std::collections::HashMap;

use branchline_protocol::{
    ConflictDetail, ConflictPolicy, ConflictRecord, Effect, ErrorCode, EventBody, Name,
    ProductField, ProductRecord, Sku, StockLevel, UnixMillis,
};
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How much newer a write must be to win under `newest_wins`.
pub const NEWEST_WINS_TOLERANCE_MS: i64 = 1_000;

/// A product and, for each field, the version at which it last changed (for `merge`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductState {
    /// The product.
    pub record: ProductRecord,
    /// Version of the last change of each field, in [`ProductField::ALL`] order.
    pub field_versions: [u64; 6],
}

impl ProductState {
    fn field_version(&self, field: ProductField) -> u64 {
        self.field_versions[field_index(field)]
    }
}

fn field_index(field: ProductField) -> usize {
    ProductField::ALL
        .iter()
        .position(|f| *f == field)
        .unwrap_or(0)
}

/// The conflict policy for each catalog kind.
#[derive(Clone, Copy, Debug)]
pub struct Policies {
    /// For `product.upserted`.
    pub upserted: ConflictPolicy,
    /// For `product.removed`.
    pub removed: ConflictPolicy,
    /// For fields both sides changed under `merge`.
    pub merge_fallback: ConflictPolicy,
}

impl From<&crate::config::ConflictConfig> for Policies {
    fn from(c: &crate::config::ConflictConfig) -> Self {
        Self {
            upserted: c.product_upserted,
            removed: c.product_removed,
            merge_fallback: c.merge_fallback,
        }
    }
}

/// What the writer knows about the event being applied.
#[derive(Clone, Copy, Debug)]
pub struct WriteCtx<'a> {
    /// The branch.
    pub branch: &'a Name,
    /// The publishing device.
    pub device: &'a Name,
    /// The event's id.
    pub event_id: Uuid,
    /// The seq the event gets if it is accepted.
    pub seq: u64,
    /// The hub's clock.
    pub now_ms: UnixMillis,
    /// The event's client time corrected by the device's measured clock offset.
    pub write_time_ms: UnixMillis,
    /// The envelope's `base_version` (catalog events).
    pub base_version: u64,
}

/// A change to persist with the event.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A SKU's new stock on hand.
    Stock(Sku, i64),
    /// A product's new state.
    Product(Sku, Box<ProductState>),
    /// A new or updated conflict record.
    Conflict(Box<ConflictRecord>),
}

/// An event the state accepted: what it did, and what to persist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// What readers are told.
    pub effect: Effect,
    /// What to persist in the event's atomic write.
    pub changes: Vec<Change>,
}

/// An event the state refused. Nothing changed, except that a conflict is recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    /// Why.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
    /// For `conflict`: what the server has.
    pub conflict: Option<Box<ConflictDetail>>,
    /// A conflict record to persist although the event is refused.
    pub record: Option<Box<ConflictRecord>>,
}

impl Refused {
    /// A refusal with no conflict.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            conflict: None,
            record: None,
        }
    }
}

/// A branch's products, stock levels and open conflicts.
#[derive(Clone, Debug, Default)]
pub struct BranchState {
    products: OrdMap<Sku, ProductState>,
    stock: OrdMap<Sku, i64>,
    oversold: u64,
    open_conflicts: HashMap<Uuid, ConflictRecord>,
}

/// A consistent copy of the catalog and stock, as of one seq.
#[derive(Clone, Debug)]
pub struct StateSnapshot {
    /// Products by SKU.
    pub products: OrdMap<Sku, ProductState>,
    /// Stock on hand by SKU.
    pub stock: OrdMap<Sku, i64>,
}

impl BranchState {
    /// State as loaded from the store.
    pub fn load(
        products: Vec<(Sku, ProductState)>,
        stock: Vec<(Sku, i64)>,
        open_conflicts: Vec<ConflictRecord>,
    ) -> Self {
        let stock: OrdMap<Sku, i64> = stock.into_iter().collect();
        let oversold = stock.values().filter(|v| **v < 0).count() as u64;
        Self {
            products: products.into_iter().collect(),
            stock,
            oversold,
            open_conflicts: open_conflicts.into_iter().map(|c| (c.id, c)).collect(),
        }
    }

    /// A constant-time copy of the catalog and stock.
    pub fn snapshot(&self) -> StateSnapshot {
        StateSnapshot {
            products: self.products.clone(),
            stock: self.stock.clone(),
        }
    }

    /// Units of `sku` on hand (0 if its stock never moved).
    pub fn stock_of(&self, sku: &Sku) -> i64 {
        self.stock.get(sku).copied().unwrap_or(0)
    }

    /// The product `sku`, if the catalog has or had it.
    pub fn product(&self, sku: &Sku) -> Option<&ProductRecord> {
        self.products.get(sku).map(|p| &p.record)
    }

    /// SKUs with negative stock.
    pub fn oversold_skus(&self) -> u64 {
        self.oversold
    }

    /// Conflicts waiting for an admin.
    pub fn open_conflicts(&self) -> u64 {
        self.open_conflicts.len() as u64
    }

    /// Whether conflict `id` is open.
    pub fn is_open_conflict(&self, id: &Uuid) -> bool {
        self.open_conflicts.contains_key(id)
    }

    /// Applies one published event. `moved_since` gives, for a `stock.counted`, the sum of
    /// the SKU's movements after the count's `base_seq` (or refuses when the log cannot tell).
    pub fn apply(
        &mut self,
        body: &EventBody,
        ctx: &WriteCtx<'_>,
        policies: Policies,
        moved_since: impl FnOnce(&Sku) -> Result<i64, Refused>,
    ) -> Result<Applied, Refused> {
        match body {
            EventBody::SaleRecorded(_) | EventBody::StockAdjusted(_) => {
                Ok(self.move_stock(&body.stock_deltas()))
            }
            EventBody::StockCounted(count) => {
                let level = count.counted.saturating_add(moved_since(&count.sku)?);
                Ok(self.set_stock(&[(&count.sku, level)]))
            }
            EventBody::ProductUpserted(_) | EventBody::ProductRemoved(_) => {
                self.catalog_write(body, ctx, policies)
            }
            EventBody::Custom(_) => Ok(Applied::default()),
            EventBody::ConflictResolved(_) => Err(Refused::new(
                ErrorCode::InvalidEvent,
                "conflict.resolved events are made by the hub",
            )),
        }
    }

    fn move_stock(&mut self, deltas: &[(&Sku, i64)]) -> Applied {
        let mut levels: Vec<(&Sku, i64)> = Vec::with_capacity(deltas.len());
        for (sku, delta) in deltas {
            match levels.iter_mut().find(|(s, _)| s == sku) {
                Some((_, level)) => *level = level.saturating_add(*delta),
                None => levels.push((sku, self.stock_of(sku).saturating_add(*delta))),
            }
        }
        self.set_stock(&levels)
    }

    fn set_stock(&mut self, levels: &[(&Sku, i64)]) -> Applied {
        let mut applied = Applied::default();
        for (sku, level) in levels {
            let before = self.stock.insert((*sku).clone(), *level).unwrap_or(0);
            match (before < 0, *level < 0) {
                (false, true) => self.oversold += 1,
                (true, false) => self.oversold -= 1,
                _ => {}
            }
            applied
                .effect
                .stock
                .push(StockLevel::new((*sku).clone(), *level));
            applied.changes.push(Change::Stock((*sku).clone(), *level));
        }
        applied
    }
}

mod catalog;
#[cfg(test)]
mod tests;
