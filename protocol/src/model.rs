//! What the hub derives from events: product and stock state, the effect of each event,
//! catalog conflicts, and connected devices.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{EventBody, EventKind, ProductField, ProductFields, Resolution, Unit};
use crate::ids::{Name, Sku, UnixMillis};

/// A product as the hub holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRecord {
    /// Which SKU.
    pub sku: Sku,
    /// Incremented by every applied catalog write; 0 is never used (0 means "no product").
    pub version: u64,
    /// Whether the product was removed. A removed product keeps its version history, so a
    /// write based on an older version still conflicts.
    #[serde(default)]
    pub removed: bool,
    /// Display name.
    pub name: String,
    /// Unit price in minor units.
    pub price: i64,
    /// Barcode, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barcode: Option<String>,
    /// Category, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Tax code, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax_code: Option<String>,
    /// The unit quantities of this SKU are counted in.
    #[serde(default)]
    pub unit: Unit,
    /// When the write that made this version was made: the writer's clock, corrected by its
    /// measured offset from the hub's clock. `newest_wins` compares these.
    pub updated_at_ms: UnixMillis,
    /// The device whose write made this version.
    pub updated_by: Name,
}

impl ProductRecord {
    /// The product's fields, as a write that would set all of them.
    pub fn fields(&self) -> ProductFields {
        ProductFields {
            name: Some(self.name.clone()),
            price: Some(self.price),
            barcode: self.barcode.clone(),
            category: self.category.clone(),
            tax_code: self.tax_code.clone(),
            unit: Some(self.unit),
        }
    }

    /// Sets the fields a write carries. Empty strings clear optional text fields.
    pub fn apply_fields(&mut self, f: &ProductFields) {
        fn opt(text: &Option<String>, into: &mut Option<String>) {
            if let Some(t) = text {
                *into = if t.is_empty() { None } else { Some(t.clone()) };
            }
        }
        if let Some(name) = &f.name {
            self.name.clone_from(name);
        }
        if let Some(price) = f.price {
            self.price = price;
        }
        opt(&f.barcode, &mut self.barcode);
        opt(&f.category, &mut self.category);
        opt(&f.tax_code, &mut self.tax_code);
        if let Some(unit) = f.unit {
            self.unit = unit;
        }
    }
}

/// One SKU's stock level: the result of its ledger of movements and counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// Which SKU.
    pub sku: Sku,
    /// Units on hand; negative when more was sold than the hub knew of.
    pub on_hand: i64,
    /// Whether `on_hand` is below zero: sold stock the hub has no record of receiving.
    pub oversold: bool,
}

impl StockLevel {
    /// A level of `on_hand` units, flagged oversold when negative.
    pub fn new(sku: Sku, on_hand: i64) -> Self {
        Self {
            sku,
            on_hand,
            oversold: on_hand < 0,
        }
    }
}

/// What an event did to branch state, computed by the hub when it sequenced the event.
///
/// A replica that applies the effects of all events in `seq` order, starting from a snapshot,
/// holds exactly the hub's state: it never has to re-run stock or conflict rules itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// New stock levels of every SKU the event moved or counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stock: Vec<StockLevel>,
    /// The product as it is after the event, for catalog events that changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<ProductRecord>,
    /// The conflict this event met, if it was a catalog write based on a stale version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<ConflictNote>,
}

impl Effect {
    /// Whether the event changed nothing and met no conflict.
    pub fn is_empty(&self) -> bool {
        self.stock.is_empty() && self.product.is_none() && self.conflict.is_none()
    }
}

/// The policy that settles a stale catalog write, configured per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The stale write is rejected (code `conflict`) with the server's product.
    ServerWins,
    /// The stale write is applied as if it were based on the current version.
    ClientWins,
    /// The write whose corrected client time is newer by more than 1 s wins; a tie goes to
    /// the server (the write is rejected with code `conflict`).
    NewestWins,
    /// Fields the device changed go on top of the server's; a field both changed is settled
    /// by the fallback policy.
    Merge,
    /// The write is accepted and held in the conflict queue; the product is unchanged until
    /// an admin resolves it.
    Manual,
}

/// How a conflict ended (or that it has not yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictOutcome {
    /// The device's write was rejected; the server's product stands.
    ServerWon,
    /// The device's write was applied over the server's.
    ClientWon,
    /// Disjoint field changes were merged (and any field both changed settled by fallback).
    Merged,
    /// Held for an admin (status `open`).
    Held,
    /// An admin resolved it; see the conflict's `resolution`.
    Resolved,
}

/// A conflict as reported on the event that met it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictNote {
    /// The conflict's id (for the conflicts API).
    pub id: Uuid,
    /// The policy that settled it.
    pub policy: ConflictPolicy,
    /// How it was settled.
    pub outcome: ConflictOutcome,
    /// Fields both sides changed since the device's base version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contested: Vec<ProductField>,
}

/// The detail of a conflict in a rejection: what the server has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictDetail {
    /// The recorded conflict (see the conflicts API).
    pub conflict_id: Uuid,
    /// Which SKU.
    pub sku: Sku,
    /// The version the device based its write on.
    pub base_version: u64,
    /// The version the server has.
    pub server_version: u64,
    /// The server's product (absent if it never existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ProductRecord>,
}

/// Whether a conflict still waits for an admin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictStatus {
    /// Held by the `manual` policy; an admin must resolve it.
    Open,
    /// Settled, by a policy or by an admin.
    Resolved,
}

/// A recorded catalog conflict: who, when, both versions and the outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// The conflict's id.
    pub id: Uuid,
    /// The branch.
    pub branch: Name,
    /// Which SKU.
    pub sku: Sku,
    /// The kind of the stale write.
    pub kind: EventKind,
    /// Open or resolved.
    pub status: ConflictStatus,
    /// The policy that applied.
    pub policy: ConflictPolicy,
    /// How it ended (`held` while open).
    pub outcome: ConflictOutcome,
    /// The device that made the stale write.
    pub device: Name,
    /// The stale write's event id.
    pub event_id: Uuid,
    /// The seq the stale write got, if it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// When the hub met the conflict.
    pub detected_at_ms: UnixMillis,
    /// The version the device based its write on.
    pub base_version: u64,
    /// The server's product when the conflict was met (absent if none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ProductRecord>,
    /// The device's write.
    pub client: EventBody,
    /// Fields both sides changed since the base version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contested: Vec<ProductField>,
    /// How an admin resolved it (manual conflicts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// The admin device that resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<Name>,
    /// When it was resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at_ms: Option<UnixMillis>,
    /// The seq of the `conflict.resolved` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution_seq: Option<u64>,
}

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A till: publishes to and reads its own branch(es).
    Cashier,
    /// A branch admin: watches any branch of its tenant, sees devices, resolves conflicts.
    Admin,
}

/// A device as admins see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device.
    pub device: Name,
    /// Its role (of its most recent session).
    pub role: Role,
    /// Whether it has at least one live session.
    pub online: bool,
    /// How many live sessions it has.
    pub sessions: u32,
    /// When the hub last heard from it.
    pub last_seen_ms: UnixMillis,
    /// The last seq it acknowledged having applied, if it ever did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_seq: Option<u64>,
    /// How many events it is behind the head (head minus its acknowledged seq).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// The last `device_seq` the hub applied from it (0 if none).
    pub last_device_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product() -> ProductRecord {
        ProductRecord {
            sku: Sku::new("A").unwrap(),
            version: 1,
            removed: false,
            name: "Tea".into(),
            price: 250,
            barcode: Some("123".into()),
            category: None,
            tax_code: None,
            unit: Unit::Piece,
            updated_at_ms: 0,
            updated_by: Name::new("till-1").unwrap(),
        }
    }

    #[test]
    fn applying_fields_sets_present_ones_and_empty_strings_clear() {
        let mut p = product();
        p.apply_fields(&ProductFields {
            price: Some(300),
            barcode: Some(String::new()),
            category: Some("drinks".into()),
            ..Default::default()
        });
        assert_eq!(p.price, 300);
        assert_eq!(p.name, "Tea");
        assert_eq!(p.barcode, None);
        assert_eq!(p.category.as_deref(), Some("drinks"));
    }

    #[test]
    fn oversold_follows_the_sign_of_on_hand() {
        assert!(StockLevel::new(Sku::new("A").unwrap(), -1).oversold);
        assert!(!StockLevel::new(Sku::new("A").unwrap(), 0).oversold);
    }
}
