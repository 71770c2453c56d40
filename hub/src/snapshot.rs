//! Paged snapshots of branch state, each pinned to one seq.
//!
//! The first page asks the branch writer for a copy of its state (constant time: the maps are
//! persistent) once that state's seq is durable, and keeps it here under a random id. Later
//! pages read the same copy, so every page is exactly the state after `at_seq`, however many
//! publishes happen between requests. A page token is the snapshot id and the last SKU sent;
//! a snapshot is dropped when its pages have not been asked for within the TTL.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use branchline_protocol::http::SnapshotItem;
use branchline_protocol::{Epoch, Sku, StockLevel, UnixMillis, now_ms};
use dashmap::DashMap;

use crate::log::BranchKey;
use crate::state::StateSnapshot;

/// A snapshot being paged through.
pub struct Pinned {
    /// The branch.
    pub branch: BranchKey,
    /// The log's epoch.
    pub epoch: Epoch,
    /// The seq the state is exactly at.
    pub at_seq: u64,
    /// SKUs in the snapshot (products and stock together).
    pub total: u64,
    state: StateSnapshot,
    expires_ms: AtomicI64,
}

impl Pinned {
    /// Up to `limit` items after `after` (from the start if `None`), and whether more follow.
    pub fn page(&self, after: Option<&Sku>, limit: usize) -> (Vec<SnapshotItem>, bool) {
        use std::ops::Bound::{Excluded, Unbounded};
        let bound = after.map_or(Unbounded, |s| Excluded(s.clone()));
        let mut products = self
            .state
            .products
            .range((bound.clone(), Unbounded))
            .peekable();
        let mut stock = self.state.stock.range((bound, Unbounded)).peekable();
        let mut items = Vec::with_capacity(limit.min(self.total as usize));
        while items.len() < limit {
            let next = match (products.peek(), stock.peek()) {
                (None, None) => break,
                (Some((p, _)), Some((s, _))) => p.cmp(s),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
            };
            let item = match next {
                std::cmp::Ordering::Less => SnapshotItem {
                    product: products.next().map(|(_, p)| p.record.clone()),
                    stock: None,
                },
                std::cmp::Ordering::Greater => SnapshotItem {
                    product: None,
                    stock: stock
                        .next()
                        .map(|(sku, n)| StockLevel::new(sku.clone(), *n)),
                },
                std::cmp::Ordering::Equal => SnapshotItem {
                    product: products.next().map(|(_, p)| p.record.clone()),
                    stock: stock
                        .next()
                        .map(|(sku, n)| StockLevel::new(sku.clone(), *n)),
                },
            };
            items.push(item);
        }
        let more = products.peek().is_some() || stock.peek().is_some();
        (items, more)
    }

    /// Extends the snapshot's life by `ttl` from now; returns the new expiry.
    pub fn touch(&self, ttl: Duration) -> UnixMillis {
        let expires = now_ms() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.expires_ms.store(expires, Ordering::Relaxed);
        expires
    }

    fn expired(&self, now: UnixMillis) -> bool {
        self.expires_ms.load(Ordering::Relaxed) < now
    }
}

/// Snapshots being paged through, by id.
#[derive(Default)]
pub struct Snapshots {
    map: DashMap<u64, Arc<Pinned>>,
}

impl Snapshots {
    /// Keeps a new snapshot; returns its id.
    pub fn insert(
        &self,
        branch: BranchKey,
        epoch: Epoch,
        at_seq: u64,
        state: StateSnapshot,
    ) -> (u64, Arc<Pinned>) {
        let total = count_items(&state);
        let pinned = Arc::new(Pinned {
            branch,
            epoch,
            at_seq,
            total,
            state,
            expires_ms: AtomicI64::new(0),
        });
        let id = loop {
            let id = rand::random::<u64>();
            if let dashmap::Entry::Vacant(v) = self.map.entry(id) {
                v.insert(pinned.clone());
                break id;
            }
        };
        (id, pinned)
    }

    /// The snapshot `id` of `branch`, unless it expired.
    pub fn get(&self, id: u64, branch: &BranchKey) -> Option<Arc<Pinned>> {
        let pinned = self.map.get(&id)?.clone();
        (pinned.branch == *branch && !pinned.expired(now_ms())).then_some(pinned)
    }

    /// Drops expired snapshots.
    pub fn sweep(&self) {
        let now = now_ms();
        self.map.retain(|_, p| !p.expired(now));
    }
}

/// SKUs in products or stock (counted once when in both).
fn count_items(state: &StateSnapshot) -> u64 {
    let dup = state
        .products
        .keys()
        .filter(|k| state.stock.contains_key(*k))
        .count();
    (state.products.len() + state.stock.len() - dup) as u64
}

/// The token of the page after `last` in snapshot `id`.
pub fn page_token(id: u64, last: &Sku) -> String {
    let mut raw = id.to_be_bytes().to_vec();
    raw.extend_from_slice(last.as_str().as_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

/// The snapshot id and last SKU of a page token.
pub fn parse_page_token(token: &str) -> Option<(u64, Sku)> {
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let id = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let sku = Sku::new(String::from_utf8(raw.get(8..)?.to_vec()).ok()?).ok()?;
    Some((id, sku))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::BranchState;
    use branchline_protocol::Name;

    #[test]
    fn pages_merge_products_and_stock_in_sku_order() {
        let sku = |s: &str| Sku::new(s).unwrap();
        let state = BranchState::load(
            vec![],
            (0..5).map(|i| (sku(&format!("S{i}")), i)).collect(),
            vec![],
        );
        let snapshots = Snapshots::default();
        let branch = BranchKey::new(Name::new("t").unwrap(), Name::new("b").unwrap());
        let (id, pinned) = snapshots.insert(branch.clone(), Epoch(1), 9, state.snapshot());
        pinned.touch(Duration::from_secs(60));
        assert_eq!(pinned.total, 5);
        let (first, more) = pinned.page(None, 2);
        assert!(more);
        let last = first.last().unwrap().stock.as_ref().unwrap().sku.clone();
        let token = page_token(id, &last);
        let (tid, after) = parse_page_token(&token).unwrap();
        let rest = snapshots.get(tid, &branch).unwrap().page(Some(&after), 10);
        let skus: Vec<String> = first
            .iter()
            .chain(rest.0.iter())
            .map(|i| i.stock.as_ref().unwrap().sku.to_string())
            .collect();
        assert_eq!(skus, ["S0", "S1", "S2", "S3", "S4"]);
        assert!(!rest.1);
        assert!(parse_page_token("!!").is_none());
        let other = BranchKey::new(Name::new("t").unwrap(), Name::new("c").unwrap());
        assert!(
            snapshots.get(id, &other).is_none(),
            "a token works only for its branch"
        );
    }
}
