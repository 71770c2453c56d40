//! Read-your-writes: the replica as the hub confirmed it, with this device's pending events
//! laid on top until they come back sequenced.
//!
//! The confirmed replica only ever changes by the hub's `effect`s and snapshots
//! (PROTOCOL.md §10). Pending events are projected with simple local rules so a till sees its
//! own sale at once; the projection is discarded event by event as the sequenced versions
//! arrive, so the hub's answer always wins. The projection is an estimate: a pending
//! `stock.counted` sets the level to the counted quantity (the hub adds movements sequenced
//! after the count's `base_seq`, which the device may not know of), and a pending catalog
//! write shows as applied even if it will conflict.

use std::collections::BTreeMap;

use branchline_protocol::{
    EventBody, Name, Position, ProductRecord, Sku, StockLevel, Unit, now_ms,
};

use crate::store::PendingEvent;

/// A branch's state as this device sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BranchState {
    /// The position the confirmed part is at (`None` before the first snapshot).
    pub position: Option<Position>,
    /// Products by SKU (removed ones included, flagged).
    pub products: BTreeMap<Sku, ProductRecord>,
    /// Stock levels by SKU.
    pub stock: BTreeMap<Sku, StockLevel>,
    /// How many pending local events are laid on top (0 for the confirmed state).
    pub pending: usize,
}

impl BranchState {
    /// Lays `pending` events (in publish order) on top of this state.
    pub fn overlay(&mut self, device: &Name, pending: &[PendingEvent]) {
        for e in pending {
            apply_pending(&mut self.products, &mut self.stock, device, e);
        }
        self.pending += pending.len();
    }
}

/// Projects one pending event onto products and stock.
pub(crate) fn apply_pending(
    products: &mut BTreeMap<Sku, ProductRecord>,
    stock: &mut BTreeMap<Sku, StockLevel>,
    device: &Name,
    e: &PendingEvent,
) {
    let mut moved = |sku: &Sku, f: &dyn Fn(i64) -> i64| {
        let level = stock
            .entry(sku.clone())
            .or_insert_with(|| StockLevel::new(sku.clone(), 0));
        *level = StockLevel::new(sku.clone(), f(level.on_hand));
    };
    match &e.body {
        EventBody::SaleRecorded(_) | EventBody::StockAdjusted(_) => {
            for (sku, delta) in e.body.stock_deltas() {
                moved(sku, &|on_hand| on_hand.saturating_add(delta));
            }
        }
        EventBody::StockCounted(c) => moved(&c.sku, &|_| c.counted),
        EventBody::ProductUpserted(u) => match products.get_mut(&u.sku) {
            Some(p) if !p.removed => p.apply_fields(&u.fields),
            _ => {
                if let (Some(name), Some(price)) = (&u.fields.name, u.fields.price) {
                    let mut p = ProductRecord {
                        sku: u.sku.clone(),
                        // Not confirmed yet: the hub assigns the real version.
                        version: 0,
                        removed: false,
                        name: name.clone(),
                        price,
                        barcode: None,
                        category: None,
                        tax_code: None,
                        unit: Unit::Piece,
                        updated_at_ms: now_ms(),
                        updated_by: device.clone(),
                    };
                    p.apply_fields(&u.fields);
                    products.insert(u.sku.clone(), p);
                }
            }
        },
        EventBody::ProductRemoved(r) => {
            if let Some(p) = products.get_mut(&r.sku) {
                p.removed = true;
            }
        }
        EventBody::Custom(_) | EventBody::ConflictResolved(_) => {}
    }
}
