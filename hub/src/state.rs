//! Branch state: the stock ledger, the catalog, and how catalog conflicts are settled.
//!
//! Everything here is a pure function of the state and one event, so the branch writer can
//! apply an event, persist the changes in the same atomic write as the event, and tell every
//! reader the [`Effect`]. A refused event changes nothing. The maps are persistent
//! (`imbl`), so a snapshot of a 100,000-SKU branch is a constant-time clone.

use std::collections::HashMap;

use branchline_protocol::{
    ConflictDetail, ConflictNote, ConflictOutcome, ConflictPolicy, ConflictRecord,
    ConflictResolved, ConflictStatus, Effect, ErrorCode, EventBody, Name, ProductField,
    ProductFields, ProductRecord, Resolution, Sku, StockLevel, Unit, UnixMillis,
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

    fn catalog_write(
        &mut self,
        body: &EventBody,
        ctx: &WriteCtx<'_>,
        policies: Policies,
    ) -> Result<Applied, Refused> {
        let (sku, write) = match body {
            EventBody::ProductUpserted(u) => (&u.sku, Write::Fields(&u.fields)),
            EventBody::ProductRemoved(r) => (&r.sku, Write::Remove),
            _ => return Err(Refused::new(ErrorCode::Internal, "not a catalog write")),
        };
        let current = self.products.get(sku).cloned();
        let version = current.as_ref().map_or(0, |p| p.record.version);
        if ctx.base_version == version {
            return self.write_product(sku, current.as_ref(), write, ctx.device, ctx.write_time_ms);
        }
        let conflict = Stale {
            sku,
            body,
            current: current.as_ref(),
            ctx,
        };
        let policy = match write {
            Write::Fields(_) => policies.upserted,
            Write::Remove => policies.removed,
        };
        match (policy, write) {
            (ConflictPolicy::Merge, Write::Fields(fields)) => {
                self.merge(&conflict, fields, policies.merge_fallback)
            }
            (ConflictPolicy::Merge, Write::Remove) => {
                self.settle(&conflict, write, policies.merge_fallback, Vec::new())
            }
            (policy, write) => self.settle(&conflict, write, policy, Vec::new()),
        }
    }

    /// Settles a stale write with a whole-write policy.
    fn settle(
        &mut self,
        stale: &Stale<'_>,
        write: Write<'_>,
        policy: ConflictPolicy,
        contested: Vec<ProductField>,
    ) -> Result<Applied, Refused> {
        let client_wins = match policy {
            ConflictPolicy::ClientWins => true,
            ConflictPolicy::NewestWins => stale.client_is_newer(),
            ConflictPolicy::Manual => {
                let mut applied = Applied::default();
                self.hold(&mut applied, stale, policy, contested);
                return Ok(applied);
            }
            ConflictPolicy::ServerWins | ConflictPolicy::Merge => false,
        };
        if !client_wins {
            return Err(stale.refuse(policy, contested));
        }
        let mut applied = self.write_product(
            stale.sku,
            stale.current,
            write,
            stale.ctx.device,
            stale.ctx.write_time_ms,
        )?;
        stale.record(&mut applied, policy, ConflictOutcome::ClientWon, contested);
        Ok(applied)
    }

    /// `merge`: the fields the write sets that the server did not change since the write's base
    /// are applied; fields both changed are settled by `fallback`.
    fn merge(
        &mut self,
        stale: &Stale<'_>,
        fields: &ProductFields,
        fallback: ConflictPolicy,
    ) -> Result<Applied, Refused> {
        let base = stale.ctx.base_version;
        let contested: Vec<ProductField> = fields
            .present()
            .into_iter()
            .filter(|f| stale.current.is_some_and(|p| p.field_version(*f) > base))
            .collect();
        // The fallback settles the contested fields only, whichever it is: under `manual` the
        // uncontested ones are applied now like under any other fallback, and the admin is
        // asked about exactly the fields in dispute.
        let (keep_client, held) = match fallback {
            _ if contested.is_empty() => (true, false),
            ConflictPolicy::ClientWins => (true, false),
            ConflictPolicy::NewestWins => (stale.client_is_newer(), false),
            ConflictPolicy::Manual => (false, true),
            ConflictPolicy::ServerWins | ConflictPolicy::Merge => (false, false),
        };
        let mut merged = fields.clone();
        if !keep_client {
            for f in &contested {
                merged.clear(*f);
            }
        }
        if merged.is_empty() && !held {
            return Err(stale.refuse(ConflictPolicy::Merge, contested));
        }
        let mut applied = if merged.is_empty() {
            Applied::default()
        } else {
            self.write_product(
                stale.sku,
                stale.current,
                Write::Fields(&merged),
                stale.ctx.device,
                stale.ctx.write_time_ms,
            )?
        };
        if held {
            self.hold(&mut applied, stale, ConflictPolicy::Merge, contested);
        } else {
            stale.record(
                &mut applied,
                ConflictPolicy::Merge,
                ConflictOutcome::Merged,
                contested,
            );
        }
        Ok(applied)
    }

    /// `manual`: accept the event and hold the conflict for an admin; the product keeps what
    /// `applied` already did to it (nothing, unless `merge` applied uncontested fields).
    fn hold(
        &mut self,
        applied: &mut Applied,
        stale: &Stale<'_>,
        policy: ConflictPolicy,
        contested: Vec<ProductField>,
    ) {
        let record = stale.record(applied, policy, ConflictOutcome::Held, contested);
        self.open_conflicts.insert(record.id, record);
    }

    /// Applies a write to the product as it is now (no version check).
    fn write_product(
        &mut self,
        sku: &Sku,
        current: Option<&ProductState>,
        write: Write<'_>,
        by: &Name,
        at_ms: UnixMillis,
    ) -> Result<Applied, Refused> {
        let version = current.map_or(0, |p| p.record.version) + 1;
        let exists = current.is_some_and(|p| !p.record.removed);
        let next = match (write, current) {
            (Write::Remove, _) if !exists => return Ok(Applied::default()),
            (Write::Remove, Some(p)) => {
                let mut record = p.record.clone();
                record.removed = true;
                ProductState {
                    record,
                    field_versions: [version; 6],
                }
            }
            (Write::Fields(fields), Some(p)) if exists => {
                let mut next = p.clone();
                next.record.apply_fields(fields);
                for f in fields.present() {
                    next.field_versions[field_index(f)] = version;
                }
                next
            }
            (Write::Fields(fields), _) => {
                let (Some(name), Some(price)) = (&fields.name, fields.price) else {
                    return Err(Refused::new(
                        ErrorCode::InvalidEvent,
                        format!("creating product {sku} needs a name and a price"),
                    ));
                };
                let mut record = ProductRecord {
                    sku: sku.clone(),
                    version,
                    removed: false,
                    name: name.clone(),
                    price,
                    barcode: None,
                    category: None,
                    tax_code: None,
                    unit: Unit::Piece,
                    updated_at_ms: at_ms,
                    updated_by: by.clone(),
                };
                record.apply_fields(fields);
                ProductState {
                    record,
                    field_versions: [version; 6],
                }
            }
            (Write::Remove, None) => return Ok(Applied::default()),
        };
        let mut next = next;
        next.record.version = version;
        next.record.updated_at_ms = at_ms;
        next.record.updated_by = by.clone();
        self.products.insert(sku.clone(), next.clone());
        Ok(Applied {
            effect: Effect {
                product: Some(next.record.clone()),
                ..Effect::default()
            },
            changes: vec![Change::Product(sku.clone(), Box::new(next))],
        })
    }

    /// Resolves an open conflict. Returns what to persist with the `conflict.resolved` event
    /// and its body.
    pub fn resolve(
        &mut self,
        id: &Uuid,
        resolution: Resolution,
        fields: Option<&ProductFields>,
        admin: &Name,
        now_ms: UnixMillis,
        seq: u64,
    ) -> Result<(Applied, ConflictResolved), Refused> {
        let record =
            self.open_conflicts.get(id).cloned().ok_or_else(|| {
                Refused::new(ErrorCode::NotFound, format!("no open conflict {id}"))
            })?;
        let current = self.products.get(&record.sku).cloned();
        let held;
        let mut applied = match resolution {
            Resolution::Server => Applied::default(),
            Resolution::Local => {
                let write = match &record.client {
                    EventBody::ProductUpserted(u) if record.policy == ConflictPolicy::Merge => {
                        // `merge` applied the uncontested fields when it held the write; only
                        // the contested ones are still waiting.
                        let mut fields = u.fields.clone();
                        for f in fields.present() {
                            if !record.contested.contains(&f) {
                                fields.clear(f);
                            }
                        }
                        held = fields;
                        Write::Fields(&held)
                    }
                    EventBody::ProductUpserted(u) => Write::Fields(&u.fields),
                    EventBody::ProductRemoved(_) => Write::Remove,
                    _ => {
                        return Err(Refused::new(
                            ErrorCode::Internal,
                            "held write is not a catalog write",
                        ));
                    }
                };
                self.write_product(&record.sku, current.as_ref(), write, admin, now_ms)?
            }
            Resolution::Merged => {
                let fields = fields.filter(|f| !f.is_empty()).ok_or_else(|| {
                    Refused::new(
                        ErrorCode::InvalidEvent,
                        "a merged resolution needs the fields to apply",
                    )
                })?;
                fields
                    .validate()
                    .map_err(|e| Refused::new(ErrorCode::InvalidEvent, e.0))?;
                self.write_product(
                    &record.sku,
                    current.as_ref(),
                    Write::Fields(fields),
                    admin,
                    now_ms,
                )?
            }
        };
        self.open_conflicts.remove(id);
        let resolved = ConflictRecord {
            status: ConflictStatus::Resolved,
            outcome: ConflictOutcome::Resolved,
            resolution: Some(resolution),
            resolved_by: Some(admin.clone()),
            resolved_at_ms: Some(now_ms),
            resolution_seq: Some(seq),
            ..record
        };
        applied.effect.conflict = Some(ConflictNote {
            id: *id,
            policy: resolved.policy,
            outcome: ConflictOutcome::Resolved,
            contested: resolved.contested.clone(),
        });
        let body = ConflictResolved {
            conflict_id: *id,
            sku: resolved.sku.clone(),
            resolution,
            resolved_by: admin.clone(),
            product: self.products.get(&resolved.sku).map(|p| p.record.clone()),
        };
        applied.changes.push(Change::Conflict(Box::new(resolved)));
        Ok((applied, body))
    }
}

#[derive(Clone, Copy)]
enum Write<'a> {
    Fields(&'a ProductFields),
    Remove,
}

/// A catalog write whose base is not the current version.
struct Stale<'a> {
    sku: &'a Sku,
    body: &'a EventBody,
    current: Option<&'a ProductState>,
    ctx: &'a WriteCtx<'a>,
}

impl Stale<'_> {
    fn client_is_newer(&self) -> bool {
        self.current.is_none_or(|p| {
            self.ctx.write_time_ms
                > p.record
                    .updated_at_ms
                    .saturating_add(NEWEST_WINS_TOLERANCE_MS)
        })
    }

    fn conflict_record(
        &self,
        policy: ConflictPolicy,
        outcome: ConflictOutcome,
        contested: Vec<ProductField>,
        seq: Option<u64>,
    ) -> ConflictRecord {
        let held = outcome == ConflictOutcome::Held;
        ConflictRecord {
            id: Uuid::now_v7(),
            branch: self.ctx.branch.clone(),
            sku: self.sku.clone(),
            kind: self.body.kind(),
            status: if held {
                ConflictStatus::Open
            } else {
                ConflictStatus::Resolved
            },
            policy,
            outcome,
            device: self.ctx.device.clone(),
            event_id: self.ctx.event_id,
            seq,
            detected_at_ms: self.ctx.now_ms,
            base_version: self.ctx.base_version,
            server: self.current.map(|p| p.record.clone()),
            client: self.body.clone(),
            contested,
            resolution: None,
            resolved_by: None,
            resolved_at_ms: None,
            resolution_seq: None,
        }
    }

    /// Adds the conflict to an accepted event's effect and changes; returns the record.
    fn record(
        &self,
        applied: &mut Applied,
        policy: ConflictPolicy,
        outcome: ConflictOutcome,
        contested: Vec<ProductField>,
    ) -> ConflictRecord {
        let record = self.conflict_record(policy, outcome, contested, Some(self.ctx.seq));
        applied.effect.conflict = Some(ConflictNote {
            id: record.id,
            policy,
            outcome,
            contested: record.contested.clone(),
        });
        applied
            .changes
            .push(Change::Conflict(Box::new(record.clone())));
        record
    }

    fn refuse(&self, policy: ConflictPolicy, contested: Vec<ProductField>) -> Refused {
        let record = self.conflict_record(policy, ConflictOutcome::ServerWon, contested, None);
        let server_version = self.current.map_or(0, |p| p.record.version);
        Refused {
            code: ErrorCode::Conflict,
            message: format!(
                "{} of {} is based on version {} but the hub has version {server_version}",
                self.body.kind(),
                self.sku,
                self.ctx.base_version
            ),
            conflict: Some(Box::new(ConflictDetail {
                conflict_id: record.id,
                sku: self.sku.clone(),
                base_version: self.ctx.base_version,
                server_version,
                server: record.server.clone(),
            })),
            record: Some(Box::new(record)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchline_protocol::{
        AdjustReason, ProductRemoved, ProductUpserted, SaleLine, SaleRecorded, StockAdjusted,
        StockCounted,
    };

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }
    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    const POLICIES: Policies = Policies {
        upserted: ConflictPolicy::ServerWins,
        removed: ConflictPolicy::ServerWins,
        merge_fallback: ConflictPolicy::ServerWins,
    };

    struct Harness {
        state: BranchState,
        branch: Name,
        seq: u64,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                state: BranchState::default(),
                branch: name("b1"),
                seq: 0,
            }
        }

        fn apply_as(
            &mut self,
            device: &str,
            body: &EventBody,
            base_version: u64,
            time: i64,
            policies: Policies,
        ) -> Result<Applied, Refused> {
            let device = name(device);
            let ctx = WriteCtx {
                branch: &self.branch,
                device: &device,
                event_id: Uuid::now_v7(),
                seq: self.seq + 1,
                now_ms: 1_000_000,
                write_time_ms: time,
                base_version,
            };
            let out = self.state.apply(body, &ctx, policies, |_| Ok(0));
            if out.is_ok() {
                self.seq += 1;
            }
            out
        }

        fn upsert(
            &mut self,
            base: u64,
            fields: ProductFields,
            time: i64,
            p: Policies,
        ) -> Result<Applied, Refused> {
            let body = EventBody::ProductUpserted(ProductUpserted {
                sku: sku("TEA"),
                fields,
            });
            self.apply_as("till-1", &body, base, time, p)
        }
    }

    fn price(p: i64) -> ProductFields {
        ProductFields {
            price: Some(p),
            ..Default::default()
        }
    }

    fn create() -> ProductFields {
        ProductFields {
            name: Some("Tea".into()),
            price: Some(250),
            ..Default::default()
        }
    }

    fn sale(lines: &[(&str, i64)]) -> EventBody {
        EventBody::SaleRecorded(SaleRecorded {
            sale_id: "R1".into(),
            lines: lines
                .iter()
                .map(|(s, q)| SaleLine {
                    sku: sku(s),
                    qty: *q,
                    unit_price: 100,
                    discount: 0,
                })
                .collect(),
            total: 0,
            tax: 0,
            currency: "EUR".into(),
            payments: vec![],
        })
    }

    #[test]
    fn sales_beyond_stock_go_negative_and_are_flagged_oversold() {
        let mut h = Harness::new();
        let adj = EventBody::StockAdjusted(StockAdjusted {
            sku: sku("A"),
            delta: 2,
            reason: AdjustReason::Receipt,
            note: None,
        });
        h.apply_as("t", &adj, 0, 0, POLICIES).unwrap();
        let applied = h
            .apply_as("t", &sale(&[("A", 3), ("A", 1), ("B", 1)]), 0, 0, POLICIES)
            .unwrap();
        assert_eq!(
            applied.effect.stock,
            vec![StockLevel::new(sku("A"), -2), StockLevel::new(sku("B"), -1)],
            "one level per SKU, after all its lines"
        );
        assert!(applied.effect.stock[0].oversold);
        assert_eq!(h.state.oversold_skus(), 2);
        let back = EventBody::StockAdjusted(StockAdjusted {
            sku: sku("A"),
            delta: 5,
            reason: AdjustReason::Receipt,
            note: None,
        });
        h.apply_as("t", &back, 0, 0, POLICIES).unwrap();
        assert_eq!(h.state.oversold_skus(), 1);
    }

    #[test]
    fn a_count_adds_the_movements_made_after_its_base() {
        let mut state = BranchState::default();
        let (b, d) = (name("b1"), name("t"));
        let ctx = WriteCtx {
            branch: &b,
            device: &d,
            event_id: Uuid::now_v7(),
            seq: 9,
            now_ms: 0,
            write_time_ms: 0,
            base_version: 0,
        };
        let count = EventBody::StockCounted(StockCounted {
            sku: sku("A"),
            counted: 10,
        });
        let applied = state.apply(&count, &ctx, POLICIES, |s| {
            assert_eq!(s, &sku("A"));
            Ok(-3)
        });
        assert_eq!(
            applied.unwrap().effect.stock,
            vec![StockLevel::new(sku("A"), 7)]
        );
        let refused = state.apply(&count, &ctx, POLICIES, |_| {
            Err(Refused::new(ErrorCode::StaleBase, "old"))
        });
        assert_eq!(refused.unwrap_err().code, ErrorCode::StaleBase);
        assert_eq!(
            state.stock_of(&sku("A")),
            7,
            "a refused count changes nothing"
        );
    }

    #[test]
    fn creating_a_product_needs_name_and_price_and_versions_count_from_one() {
        let mut h = Harness::new();
        assert_eq!(
            h.upsert(0, price(5), 0, POLICIES).unwrap_err().code,
            ErrorCode::InvalidEvent
        );
        let applied = h.upsert(0, create(), 0, POLICIES).unwrap();
        assert_eq!(applied.effect.product.as_ref().unwrap().version, 1);
        let applied = h.upsert(1, price(300), 0, POLICIES).unwrap();
        let p = applied.effect.product.unwrap();
        assert_eq!((p.version, p.price, p.name.as_str()), (2, 300, "Tea"));
    }

    #[test]
    fn server_wins_refuses_stale_writes_with_the_servers_product_and_records_it() {
        let mut h = Harness::new();
        h.upsert(0, create(), 0, POLICIES).unwrap();
        h.upsert(1, price(300), 0, POLICIES).unwrap();
        let refused = h.upsert(1, price(400), 0, POLICIES).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Conflict);
        let detail = refused.conflict.unwrap();
        assert_eq!((detail.base_version, detail.server_version), (1, 2));
        assert_eq!(detail.server.unwrap().price, 300);
        let record = refused.record.unwrap();
        assert_eq!(
            (record.outcome, record.status, record.seq),
            (ConflictOutcome::ServerWon, ConflictStatus::Resolved, None)
        );
        assert_eq!(h.state.product(&sku("TEA")).unwrap().price, 300);
    }

    #[test]
    fn client_wins_applies_stale_writes_on_top() {
        let p = Policies {
            upserted: ConflictPolicy::ClientWins,
            ..POLICIES
        };
        let mut h = Harness::new();
        h.upsert(0, create(), 0, p).unwrap();
        h.upsert(1, price(300), 0, p).unwrap();
        let applied = h.upsert(1, price(400), 0, p).unwrap();
        assert_eq!(applied.effect.product.unwrap().price, 400);
        assert_eq!(
            applied.effect.conflict.unwrap().outcome,
            ConflictOutcome::ClientWon
        );
    }

    #[test]
    fn newest_wins_needs_more_than_the_tolerance_and_ties_go_to_the_server() {
        let p = Policies {
            upserted: ConflictPolicy::NewestWins,
            ..POLICIES
        };
        let mut h = Harness::new();
        h.upsert(0, create(), 10_000, p).unwrap();
        h.upsert(1, price(300), 20_000, p).unwrap();
        let tie = h.upsert(1, price(400), 21_000, p).unwrap_err();
        assert_eq!(
            tie.code,
            ErrorCode::Conflict,
            "exactly 1 s newer is within tolerance"
        );
        let older = h.upsert(1, price(400), 5_000, p).unwrap_err();
        assert_eq!(older.code, ErrorCode::Conflict);
        let newer = h.upsert(1, price(400), 21_001, p).unwrap();
        assert_eq!(newer.effect.product.unwrap().price, 400);
    }

    #[test]
    fn merge_keeps_disjoint_field_changes_and_settles_contested_ones_by_fallback() {
        let p = Policies {
            upserted: ConflictPolicy::Merge,
            ..POLICIES
        };
        let mut h = Harness::new();
        h.upsert(0, create(), 0, p).unwrap(); // v1
        h.upsert(1, price(300), 0, p).unwrap(); // v2: server changed price
        let barcode = ProductFields {
            barcode: Some("123".into()),
            ..Default::default()
        };
        let merged = h.upsert(1, barcode, 0, p).unwrap(); // based on v1, changes barcode only
        let product = merged.effect.product.unwrap();
        assert_eq!(
            (product.price, product.barcode.as_deref(), product.version),
            (300, Some("123"), 3)
        );
        let note = merged.effect.conflict.unwrap();
        assert_eq!(
            (note.outcome, note.contested.len()),
            (ConflictOutcome::Merged, 0)
        );

        let both = ProductFields {
            price: Some(999),
            category: Some("hot".into()),
            ..Default::default()
        };
        let merged = h.upsert(1, both.clone(), 0, p).unwrap(); // price contested, category not
        let product = merged.effect.product.unwrap();
        assert_eq!(
            (product.price, product.category.as_deref()),
            (300, Some("hot"))
        );
        assert_eq!(
            merged.effect.conflict.unwrap().contested,
            vec![ProductField::Price]
        );

        let only_contested = h.upsert(1, price(999), 0, p).unwrap_err();
        assert_eq!(
            only_contested.code,
            ErrorCode::Conflict,
            "nothing of the write survives"
        );

        let client = Policies {
            merge_fallback: ConflictPolicy::ClientWins,
            ..p
        };
        let won = h.upsert(1, both, 0, client).unwrap();
        assert_eq!(won.effect.product.unwrap().price, 999);
    }

    #[test]
    fn manual_holds_the_write_until_an_admin_resolves_it() {
        let p = Policies {
            upserted: ConflictPolicy::Manual,
            ..POLICIES
        };
        let mut h = Harness::new();
        h.upsert(0, create(), 0, p).unwrap();
        h.upsert(1, price(300), 0, p).unwrap();
        let held = h.upsert(1, price(400), 0, p).unwrap();
        assert!(held.effect.product.is_none(), "the product does not change");
        let note = held.effect.conflict.unwrap();
        assert_eq!(note.outcome, ConflictOutcome::Held);
        assert_eq!(h.state.open_conflicts(), 1);
        assert_eq!(h.state.product(&sku("TEA")).unwrap().price, 300);

        let admin = name("admin");
        let missing = h
            .state
            .resolve(&note.id, Resolution::Merged, None, &admin, 5, 10)
            .unwrap_err();
        assert_eq!(missing.code, ErrorCode::InvalidEvent);
        let (applied, body) = h
            .state
            .resolve(&note.id, Resolution::Local, None, &admin, 5, 10)
            .unwrap();
        assert_eq!(body.product.unwrap().price, 400);
        assert_eq!(applied.effect.product.unwrap().updated_by, admin);
        assert_eq!(h.state.open_conflicts(), 0);
        let Change::Conflict(record) = applied.changes.last().unwrap() else {
            panic!("record last")
        };
        assert_eq!(
            (record.status, record.resolution_seq),
            (ConflictStatus::Resolved, Some(10))
        );
        let again = h
            .state
            .resolve(&note.id, Resolution::Server, None, &admin, 5, 11)
            .unwrap_err();
        assert_eq!(again.code, ErrorCode::NotFound);
    }

    #[test]
    fn merge_with_a_manual_fallback_applies_uncontested_fields_and_holds_only_contested_ones() {
        let p = Policies {
            upserted: ConflictPolicy::Merge,
            merge_fallback: ConflictPolicy::Manual,
            ..POLICIES
        };
        let mut h = Harness::new();
        h.upsert(0, create(), 0, p).unwrap(); // v1
        h.upsert(1, price(300), 0, p).unwrap(); // v2: the server changed the price
        let write = ProductFields {
            price: Some(999),
            category: Some("hot".into()),
            ..Default::default()
        };
        let held = h.upsert(1, write, 0, p).unwrap(); // based on v1: price contested
        let product = held
            .effect
            .product
            .expect("the uncontested field is applied now");
        assert_eq!(
            (product.price, product.category.as_deref(), product.version),
            (300, Some("hot"), 3)
        );
        let note = held.effect.conflict.unwrap();
        assert_eq!(
            (note.policy, note.outcome, note.contested),
            (
                ConflictPolicy::Merge,
                ConflictOutcome::Held,
                vec![ProductField::Price]
            )
        );
        assert_eq!(h.state.open_conflicts(), 1);

        // Meanwhile the category changes again; resolving `local` applies only the held price.
        let cold = ProductFields {
            category: Some("cold".into()),
            ..Default::default()
        };
        h.upsert(3, cold, 0, p).unwrap();
        let admin = name("admin");
        let (applied, _) = h
            .state
            .resolve(&note.id, Resolution::Local, None, &admin, 5, 10)
            .unwrap();
        let product = applied.effect.product.unwrap();
        assert_eq!(
            (product.price, product.category.as_deref()),
            (999, Some("cold"))
        );

        // Nothing uncontested: the product is unchanged while held.
        let held = h.upsert(1, price(111), 0, p).unwrap();
        assert!(held.effect.product.is_none());
        assert_eq!(held.effect.conflict.unwrap().outcome, ConflictOutcome::Held);
    }

    #[test]
    fn removals_conflict_like_upserts_and_stale_updates_of_removed_products_conflict() {
        let p = Policies {
            upserted: ConflictPolicy::Merge,
            ..POLICIES
        };
        let mut h = Harness::new();
        h.upsert(0, create(), 0, p).unwrap();
        let remove = EventBody::ProductRemoved(ProductRemoved { sku: sku("TEA") });
        assert_eq!(
            h.apply_as("t", &remove.clone(), 0, 0, p).unwrap_err().code,
            ErrorCode::Conflict
        );
        let removed = h.apply_as("t", &remove.clone(), 1, 0, p).unwrap();
        let product = removed.effect.product.unwrap();
        assert!(product.removed);
        assert_eq!(product.version, 2);
        let stale = h.upsert(1, price(1), 0, p).unwrap_err();
        assert_eq!(
            stale.code,
            ErrorCode::Conflict,
            "the removal changed every field"
        );
        let again = h.apply_as("t", &remove, 2, 0, p).unwrap();
        assert!(
            again.effect.is_empty(),
            "removing a removed product changes nothing"
        );
        let recreate = h.upsert(2, create(), 0, p).unwrap();
        assert!(!recreate.effect.product.unwrap().removed);
    }
}
