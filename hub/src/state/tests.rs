//! The branch state's rules, case by case.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use super::*;
use branchline_protocol::{
    AdjustReason, ConflictOutcome, ConflictStatus, ProductFields, ProductRemoved, ProductUpserted,
    Resolution, SaleLine, SaleRecorded, StockAdjusted, StockCounted,
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
