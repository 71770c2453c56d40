//! Event kinds and their bodies: the immutable facts a branch log is made of.
//!
//! Money is always an integer number of minor units of the branch currency (cents, pence…).
//! Quantities are integers counted in the SKU's [`Unit`]: pieces, or grams, millilitres or
//! millimetres for goods sold by weight, volume or length.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{Name, Sku};
use crate::model::ProductRecord;

/// Most lines one sale may have.
pub const MAX_SALE_LINES: usize = 500;
/// Most payments one sale may have.
pub const MAX_PAYMENTS: usize = 16;
/// Longest free-text field (names, notes, sale ids, custom type names), in bytes.
pub const MAX_TEXT_LEN: usize = 256;

/// The kind of an event; its wire name is the `kind` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    /// A sale (or a return, with negative quantities); decrements stock.
    #[serde(rename = "sale.recorded")]
    SaleRecorded,
    /// A signed stock movement that is not a sale; commutes, never conflicts.
    #[serde(rename = "stock.adjusted")]
    StockAdjusted,
    /// A physical count; applied as the count plus every movement after `base_seq`.
    #[serde(rename = "stock.counted")]
    StockCounted,
    /// A catalog write (create or change fields); may conflict.
    #[serde(rename = "product.upserted")]
    ProductUpserted,
    /// A catalog removal; may conflict.
    #[serde(rename = "product.removed")]
    ProductRemoved,
    /// An opaque application payload: sequenced and delivered, no effect on state.
    #[serde(rename = "custom")]
    Custom,
    /// An admin's resolution of a held catalog conflict. Made by the hub only.
    #[serde(rename = "conflict.resolved")]
    ConflictResolved,
}

impl EventKind {
    /// Every kind, in wire-name order of the documentation.
    pub const ALL: [EventKind; 7] = [
        EventKind::SaleRecorded,
        EventKind::StockAdjusted,
        EventKind::StockCounted,
        EventKind::ProductUpserted,
        EventKind::ProductRemoved,
        EventKind::Custom,
        EventKind::ConflictResolved,
    ];

    /// The wire name, such as `sale.recorded`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SaleRecorded => "sale.recorded",
            EventKind::StockAdjusted => "stock.adjusted",
            EventKind::StockCounted => "stock.counted",
            EventKind::ProductUpserted => "product.upserted",
            EventKind::ProductRemoved => "product.removed",
            EventKind::Custom => "custom",
            EventKind::ConflictResolved => "conflict.resolved",
        }
    }

    /// The kind with this wire name.
    pub fn from_wire(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether only the hub may create events of this kind.
    pub fn is_hub_only(self) -> bool {
        self == EventKind::ConflictResolved
    }

    /// Whether events of this kind write the catalog and so may conflict.
    pub fn is_catalog(self) -> bool {
        matches!(self, EventKind::ProductUpserted | EventKind::ProductRemoved)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event's kind and body together: `{"kind": "...", "body": {...}}` on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body")]
pub enum EventBody {
    /// `sale.recorded`
    #[serde(rename = "sale.recorded")]
    SaleRecorded(SaleRecorded),
    /// `stock.adjusted`
    #[serde(rename = "stock.adjusted")]
    StockAdjusted(StockAdjusted),
    /// `stock.counted`
    #[serde(rename = "stock.counted")]
    StockCounted(StockCounted),
    /// `product.upserted`
    #[serde(rename = "product.upserted")]
    ProductUpserted(ProductUpserted),
    /// `product.removed`
    #[serde(rename = "product.removed")]
    ProductRemoved(ProductRemoved),
    /// `custom`
    #[serde(rename = "custom")]
    Custom(Custom),
    /// `conflict.resolved` (hub-made only)
    #[serde(rename = "conflict.resolved")]
    ConflictResolved(ConflictResolved),
}

impl EventBody {
    /// This body's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::SaleRecorded(_) => EventKind::SaleRecorded,
            EventBody::StockAdjusted(_) => EventKind::StockAdjusted,
            EventBody::StockCounted(_) => EventKind::StockCounted,
            EventBody::ProductUpserted(_) => EventKind::ProductUpserted,
            EventBody::ProductRemoved(_) => EventKind::ProductRemoved,
            EventBody::Custom(_) => EventKind::Custom,
            EventBody::ConflictResolved(_) => EventKind::ConflictResolved,
        }
    }

    /// The SKU a catalog or stock-count event is about.
    pub fn sku(&self) -> Option<&Sku> {
        match self {
            EventBody::StockAdjusted(b) => Some(&b.sku),
            EventBody::StockCounted(b) => Some(&b.sku),
            EventBody::ProductUpserted(b) => Some(&b.sku),
            EventBody::ProductRemoved(b) => Some(&b.sku),
            EventBody::ConflictResolved(b) => Some(&b.sku),
            EventBody::SaleRecorded(_) | EventBody::Custom(_) => None,
        }
    }

    /// Every stock movement this event makes, as `(sku, signed delta)`.
    ///
    /// A sale line of quantity `q` moves `-q`; a `stock.adjusted` moves its `delta`. A count is
    /// not a movement: it resets the level (see [`StockCounted`]).
    pub fn stock_deltas(&self) -> Vec<(&Sku, i64)> {
        match self {
            EventBody::SaleRecorded(s) => s
                .lines
                .iter()
                .map(|l| (&l.sku, l.qty.saturating_neg()))
                .collect(),
            EventBody::StockAdjusted(a) => vec![(&a.sku, a.delta)],
            _ => Vec::new(),
        }
    }

    /// Checks the rules a well-formed event of this kind must follow, given the envelope's
    /// optional `base_seq` and `base_version`. Business outcomes (stock going negative, a
    /// stale catalog write) are not checked here: they are never reasons to refuse a sale, and
    /// catalog conflicts are the hub's to resolve.
    pub fn validate(
        &self,
        base_seq: Option<u64>,
        base_version: Option<u64>,
    ) -> Result<(), InvalidEvent> {
        match self {
            EventBody::SaleRecorded(s) => s.validate(),
            EventBody::StockAdjusted(a) => {
                if a.delta == 0 {
                    return Err(InvalidEvent::new("stock.adjusted delta must not be 0"));
                }
                check_opt_text("note", a.note.as_deref())
            }
            EventBody::StockCounted(c) => {
                if base_seq.is_none() {
                    return Err(InvalidEvent::new(
                        "stock.counted needs base_seq: the last seq the device had applied",
                    ));
                }
                if c.counted < 0 {
                    return Err(InvalidEvent::new(
                        "stock.counted counted must not be negative",
                    ));
                }
                Ok(())
            }
            EventBody::ProductUpserted(p) => {
                require_base_version(base_version)?;
                p.fields.validate()
            }
            EventBody::ProductRemoved(_) => require_base_version(base_version),
            EventBody::Custom(c) => check_text("custom type", &c.custom_type),
            EventBody::ConflictResolved(_) => Err(InvalidEvent::new(
                "conflict.resolved events are made by the hub; resolve through the conflicts API",
            )),
        }
    }
}

fn require_base_version(base_version: Option<u64>) -> Result<(), InvalidEvent> {
    match base_version {
        Some(_) => Ok(()),
        None => Err(InvalidEvent::new(
            "catalog events need base_version: the product version the device had (0 if none)",
        )),
    }
}

fn check_text(what: &str, s: &str) -> Result<(), InvalidEvent> {
    if s.is_empty() {
        return Err(InvalidEvent::new(format!("{what} must not be empty")));
    }
    check_opt_text(what, Some(s))
}

fn check_opt_text(what: &str, s: Option<&str>) -> Result<(), InvalidEvent> {
    match s {
        Some(s) if s.len() > MAX_TEXT_LEN => Err(InvalidEvent::new(format!(
            "{what} is {} bytes, longer than {MAX_TEXT_LEN}",
            s.len()
        ))),
        _ => Ok(()),
    }
}

/// Why an event was refused as malformed (wire code `invalid_event`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvent(pub String);

impl InvalidEvent {
    /// An invalid-event error with this explanation.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// `sale.recorded`: one completed sale. Never refused for stock: a sale of goods the hub thinks
/// are not there is accepted and the stock goes negative (flagged oversold).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleRecorded {
    /// The till's own id for this sale (receipt number); free text, at most 256 bytes.
    pub sale_id: String,
    /// What was sold, at least one line. A return is a line with a negative quantity.
    pub lines: Vec<SaleLine>,
    /// Total charged, in minor units, after discounts and including tax.
    pub total: i64,
    /// Tax included in `total`, in minor units.
    #[serde(default)]
    pub tax: i64,
    /// ISO 4217 currency code, three uppercase letters.
    pub currency: String,
    /// How it was paid (may be empty for a zero-total sale).
    #[serde(default)]
    pub payments: Vec<Payment>,
}

impl SaleRecorded {
    fn validate(&self) -> Result<(), InvalidEvent> {
        check_text("sale_id", &self.sale_id)?;
        if self.lines.is_empty() {
            return Err(InvalidEvent::new("a sale needs at least one line"));
        }
        if self.lines.len() > MAX_SALE_LINES {
            return Err(InvalidEvent::new(format!(
                "a sale has at most {MAX_SALE_LINES} lines, this one has {}",
                self.lines.len()
            )));
        }
        if self.payments.len() > MAX_PAYMENTS {
            return Err(InvalidEvent::new(format!(
                "a sale has at most {MAX_PAYMENTS} payments"
            )));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(InvalidEvent::new(
                "currency must be an ISO 4217 code of three uppercase letters",
            ));
        }
        if let Some(line) = self.lines.iter().find(|l| l.qty == 0) {
            return Err(InvalidEvent::new(format!(
                "sale line for {} has quantity 0",
                line.sku
            )));
        }
        Ok(())
    }
}

/// One line of a sale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLine {
    /// What was sold.
    pub sku: Sku,
    /// How many, in the SKU's unit; negative for a return. Decrements stock by this amount.
    pub qty: i64,
    /// Price of one unit, in minor units.
    pub unit_price: i64,
    /// Discount on the whole line, in minor units.
    #[serde(default)]
    pub discount: i64,
}

/// One payment of a sale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// How it was paid.
    pub method: PaymentMethod,
    /// Amount, in minor units.
    pub amount: i64,
}

/// A payment method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentMethod {
    /// Notes and coins.
    Cash,
    /// Debit or credit card.
    Card,
    /// Gift card or voucher.
    Voucher,
    /// Anything else.
    Other,
}

/// `stock.adjusted`: a signed stock movement that is not a sale. Adjustments commute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockAdjusted {
    /// Which SKU.
    pub sku: Sku,
    /// Signed change in the SKU's unit (not 0).
    pub delta: i64,
    /// Why the stock moved.
    pub reason: AdjustReason,
    /// Free text, at most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why stock moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustReason {
    /// Goods received from a supplier.
    Receipt,
    /// Goods damaged or spoiled.
    Damage,
    /// Goods lost or stolen.
    Shrinkage,
    /// Goods arriving from another branch.
    TransferIn,
    /// Goods leaving for another branch.
    TransferOut,
    /// A customer return handled outside a sale.
    Return,
    /// A manual correction.
    Correction,
    /// Anything else (say what in `note`).
    Other,
}

/// `stock.counted`: a physical count of one SKU.
///
/// The envelope's `base_seq` is the last seq the counting device had applied. The hub sets the
/// level to `counted` plus every movement of that SKU sequenced after `base_seq`, so sales rung
/// up while the count was under way are not lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCounted {
    /// Which SKU.
    pub sku: Sku,
    /// How many were counted, in the SKU's unit (not negative).
    pub counted: i64,
}

/// The unit a SKU's quantities are counted in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    /// Whole pieces (the default).
    #[default]
    #[serde(rename = "piece")]
    Piece,
    /// Grams, for goods sold by weight.
    #[serde(rename = "g")]
    Gram,
    /// Millilitres, for goods sold by volume.
    #[serde(rename = "ml")]
    Millilitre,
    /// Millimetres, for goods sold by length.
    #[serde(rename = "mm")]
    Millimetre,
}

/// The catalog fields of a product. In a write, an absent field is left as it is; the hub's
/// `merge` policy works field by field over exactly these fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductFields {
    /// Display name (required when the product is created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Unit price in minor units (required when the product is created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<i64>,
    /// Barcode (EAN/UPC or in-store code); an empty string clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barcode: Option<String>,
    /// Category; an empty string clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Tax code; an empty string clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax_code: Option<String>,
    /// The unit quantities of this SKU are counted in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
}

/// Names of the catalog fields, for conflict reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductField {
    /// [`ProductFields::name`]
    Name,
    /// [`ProductFields::price`]
    Price,
    /// [`ProductFields::barcode`]
    Barcode,
    /// [`ProductFields::category`]
    Category,
    /// [`ProductFields::tax_code`]
    TaxCode,
    /// [`ProductFields::unit`]
    Unit,
}

impl ProductField {
    /// Every field.
    pub const ALL: [ProductField; 6] = [
        ProductField::Name,
        ProductField::Price,
        ProductField::Barcode,
        ProductField::Category,
        ProductField::TaxCode,
        ProductField::Unit,
    ];
}

impl ProductFields {
    /// The fields this write sets.
    pub fn present(&self) -> Vec<ProductField> {
        ProductField::ALL
            .into_iter()
            .filter(|f| self.has(*f))
            .collect()
    }

    /// Whether this write sets `field`.
    pub fn has(&self, field: ProductField) -> bool {
        match field {
            ProductField::Name => self.name.is_some(),
            ProductField::Price => self.price.is_some(),
            ProductField::Barcode => self.barcode.is_some(),
            ProductField::Category => self.category.is_some(),
            ProductField::TaxCode => self.tax_code.is_some(),
            ProductField::Unit => self.unit.is_some(),
        }
    }

    /// A write holding only `field`, taken from `self`.
    pub fn only(&self, field: ProductField) -> ProductFields {
        let mut out = ProductFields::default();
        match field {
            ProductField::Name => out.name.clone_from(&self.name),
            ProductField::Price => out.price = self.price,
            ProductField::Barcode => out.barcode.clone_from(&self.barcode),
            ProductField::Category => out.category.clone_from(&self.category),
            ProductField::TaxCode => out.tax_code.clone_from(&self.tax_code),
            ProductField::Unit => out.unit = self.unit,
        }
        out
    }

    /// Removes `field` from this write.
    pub fn clear(&mut self, field: ProductField) {
        match field {
            ProductField::Name => self.name = None,
            ProductField::Price => self.price = None,
            ProductField::Barcode => self.barcode = None,
            ProductField::Category => self.category = None,
            ProductField::TaxCode => self.tax_code = None,
            ProductField::Unit => self.unit = None,
        }
    }

    /// Whether the write sets nothing.
    pub fn is_empty(&self) -> bool {
        self.present().is_empty()
    }

    /// Checks lengths and values.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        if self.is_empty() {
            return Err(InvalidEvent::new("product.upserted sets no field"));
        }
        if let Some(name) = &self.name {
            check_text("name", name)?;
        }
        check_opt_text("barcode", self.barcode.as_deref())?;
        check_opt_text("category", self.category.as_deref())?;
        check_opt_text("tax_code", self.tax_code.as_deref())?;
        if self.price.is_some_and(|p| p < 0) {
            return Err(InvalidEvent::new("price must not be negative"));
        }
        Ok(())
    }
}

/// `product.upserted`: create a product or change some of its fields.
///
/// The envelope's `base_version` is the product version the device based this write on (0 if
/// it had never seen the product). A write whose base is not the current version conflicts and
/// is settled by the branch's policy for this kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductUpserted {
    /// Which SKU.
    pub sku: Sku,
    /// The fields to set; absent fields stay as they are.
    pub fields: ProductFields,
}

/// `product.removed`: take a product out of the catalog (its stock ledger stays). Carries
/// `base_version` in the envelope like an upsert, and may conflict the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRemoved {
    /// Which SKU.
    pub sku: Sku,
}

/// `custom`: an opaque, typed application payload. Sequenced and delivered; no state effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Custom {
    /// The application's name for the payload type, such as `loyalty.points_awarded`.
    #[serde(rename = "type")]
    pub custom_type: String,
    /// Any JSON-compatible value (no binary strings, string map keys only).
    #[serde(default)]
    pub data: serde_json::Value,
}

/// How an admin settled a held conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Apply the device's write, as it was made.
    Local,
    /// Keep the server's product; the device's write is dropped.
    Server,
    /// Apply a body the admin merged by hand.
    Merged,
}

/// `conflict.resolved`: made by the hub when an admin resolves a conflict held by the `manual`
/// policy, so that every device sees the outcome in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictResolved {
    /// The conflict that was resolved.
    pub conflict_id: Uuid,
    /// The SKU it was about.
    pub sku: Sku,
    /// How it was resolved.
    pub resolution: Resolution,
    /// The admin device that resolved it.
    pub resolved_by: Name,
    /// The product after the resolution (absent if it was removed or never existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<ProductRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn sale(lines: Vec<SaleLine>) -> EventBody {
        EventBody::SaleRecorded(SaleRecorded {
            sale_id: "R-1".into(),
            lines,
            total: 100,
            tax: 0,
            currency: "EUR".into(),
            payments: vec![],
        })
    }

    fn line(s: &str, qty: i64) -> SaleLine {
        SaleLine {
            sku: sku(s),
            qty,
            unit_price: 100,
            discount: 0,
        }
    }

    #[test]
    fn kinds_round_trip_their_wire_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_wire(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
        assert_eq!(EventKind::from_wire("sale.voided"), None);
    }

    #[test]
    fn sales_are_validated_for_shape_not_for_stock() {
        assert!(sale(vec![line("A", 3)]).validate(None, None).is_ok());
        assert!(
            sale(vec![line("A", -1)]).validate(None, None).is_ok(),
            "returns are sales"
        );
        assert!(sale(vec![]).validate(None, None).is_err());
        assert!(sale(vec![line("A", 0)]).validate(None, None).is_err());
        let many = (0..=MAX_SALE_LINES)
            .map(|i| line(&format!("S{i}"), 1))
            .collect();
        assert!(sale(many).validate(None, None).is_err());
    }

    #[test]
    fn counts_need_a_base_seq_and_catalog_writes_a_base_version() {
        let count = EventBody::StockCounted(StockCounted {
            sku: sku("A"),
            counted: 4,
        });
        assert!(count.validate(None, None).is_err());
        assert!(count.validate(Some(0), None).is_ok());
        let up = EventBody::ProductUpserted(ProductUpserted {
            sku: sku("A"),
            fields: ProductFields {
                price: Some(5),
                ..Default::default()
            },
        });
        assert!(up.validate(None, None).is_err());
        assert!(up.validate(None, Some(0)).is_ok());
        let empty = EventBody::ProductUpserted(ProductUpserted {
            sku: sku("A"),
            fields: ProductFields::default(),
        });
        assert!(empty.validate(None, Some(0)).is_err());
    }

    #[test]
    fn hub_only_kinds_cannot_be_published() {
        let body = EventBody::ConflictResolved(ConflictResolved {
            conflict_id: Uuid::nil(),
            sku: sku("A"),
            resolution: Resolution::Server,
            resolved_by: Name::new("admin").unwrap(),
            product: None,
        });
        assert!(body.kind().is_hub_only());
        assert!(body.validate(None, Some(1)).is_err());
    }

    #[test]
    fn stock_deltas_are_negative_for_sales() {
        let s = sale(vec![line("A", 2), line("B", -1)]);
        let d: Vec<(String, i64)> = s
            .stock_deltas()
            .into_iter()
            .map(|(s, q)| (s.to_string(), q))
            .collect();
        assert_eq!(d, vec![("A".to_string(), -2), ("B".to_string(), 1)]);
    }

    #[test]
    fn product_field_helpers_agree() {
        let f = ProductFields {
            name: Some("Tea".into()),
            price: Some(250),
            ..Default::default()
        };
        assert_eq!(f.present(), vec![ProductField::Name, ProductField::Price]);
        assert_eq!(
            f.only(ProductField::Price).present(),
            vec![ProductField::Price]
        );
        let mut g = f;
        g.clear(ProductField::Name);
        assert_eq!(g.present(), vec![ProductField::Price]);
    }
}
