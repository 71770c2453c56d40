//! Snapshots being paged through, each pinned to one seq of its branch.
//!
//! The first page asks the branch (its engine) for a copy of its state (constant time: the
//! maps are persistent) once that state's seq is durable, and keeps it here. Later pages read
//! the same copy, so every page is exactly the state after `at_seq`, however many publishes
//! happen between requests. A page token is the snapshot id and the last SKU sent.
//!
//! Pins cost memory, so they are bounded per branch: a new snapshot at a seq already pinned
//! shares that pin, a branch holds at most [`MAX_PINS_PER_BRANCH`], and a pin lives
//! `snapshot_ttl` after the last page served from it. At the cap, a pin idle for [`PIN_IDLE`]
//! (a finished or abandoned snapshot) makes room for a new one; when every pin is being paged,
//! the new snapshot is refused with a retry hint, so snapshots already under way always finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use branchline_protocol::http::SnapshotItem;
use branchline_protocol::{BranchKey, Epoch, Sku, StockLevel, UnixMillis, now_ms};
use dashmap::DashMap;

use crate::state::StateSnapshot;

/// Snapshots one branch may have pinned at once. Each pin holds a copy of the branch state;
/// copies share structure with the live state but diverge as it changes, so on a busy
/// 100,000-SKU branch one pin can grow to tens of MiB. Eight lets several tills install at
/// once while bounding what any holder of a branch token can make the hub keep.
pub const MAX_PINS_PER_BRANCH: usize = 8;

/// How long a pin must go without a page request before a new snapshot of a branch at
/// [`MAX_PINS_PER_BRANCH`] may replace it. A reader asks for its next page within
/// milliseconds, so only finished or abandoned snapshots are replaced early.
pub const PIN_IDLE: Duration = Duration::from_secs(30);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A snapshot being paged through.
#[derive(Debug)]
pub struct Pinned {
    /// Its id within the branch (the first half of its page tokens).
    pub id: u64,
    /// The log's epoch.
    pub epoch: Epoch,
    /// The seq the state is exactly at.
    pub at_seq: u64,
    /// SKUs in the snapshot (products and stock together).
    pub total: u64,
    state: StateSnapshot,
    expires_ms: AtomicI64,
    used_ms: AtomicI64,
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

    /// A page was served at `now`: the snapshot lives `ttl` longer. Returns its expiry.
    pub fn touch(&self, now: UnixMillis, ttl: Duration) -> UnixMillis {
        self.used_ms.fetch_max(now, Ordering::Relaxed);
        let expires = now.saturating_add(millis(ttl));
        self.expires_ms
            .fetch_max(expires, Ordering::Relaxed)
            .max(expires)
    }

    fn expired(&self, now: UnixMillis) -> bool {
        self.expires_ms.load(Ordering::Relaxed) < now
    }

    /// When the pin may be replaced by a new snapshot of a branch at the cap.
    fn idle_from(&self) -> UnixMillis {
        self.used_ms
            .load(Ordering::Relaxed)
            .saturating_add(millis(PIN_IDLE))
    }
}

/// A new snapshot could not be pinned: every pin of the branch is being paged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy {
    /// When a pin may free up.
    pub retry_after: Duration,
}

/// Snapshots being paged through, per branch.
#[derive(Default)]
pub struct Snapshots {
    by_branch: DashMap<BranchKey, Vec<Arc<Pinned>>>,
}

impl Snapshots {
    /// A live pin of `branch` at exactly `(epoch, at_seq)`, touched at `now`.
    pub fn reuse(
        &self,
        branch: &BranchKey,
        epoch: Epoch,
        at_seq: u64,
        now: UnixMillis,
        ttl: Duration,
    ) -> Option<Arc<Pinned>> {
        let pins = self.by_branch.get(branch)?;
        let pin = pins
            .iter()
            .find(|p| p.epoch == epoch && p.at_seq == at_seq && !p.expired(now))?;
        pin.touch(now, ttl);
        Some(pin.clone())
    }

    /// Pins `state`, the branch state exactly after `at_seq`, for `ttl` from `now`; or shares
    /// a live pin at the same position. At [`MAX_PINS_PER_BRANCH`] the least recently used pin
    /// is replaced if it has been idle for [`PIN_IDLE`]; otherwise the snapshot is refused.
    pub fn pin(
        &self,
        branch: &BranchKey,
        epoch: Epoch,
        at_seq: u64,
        state: StateSnapshot,
        now: UnixMillis,
        ttl: Duration,
    ) -> Result<Arc<Pinned>, Busy> {
        if let Some(pin) = self.reuse(branch, epoch, at_seq, now, ttl) {
            return Ok(pin);
        }
        // Counted outside the branch's lock: it walks every SKU.
        let total = count_items(&state);
        let mut pins = self.by_branch.entry(branch.clone()).or_default();
        pins.retain(|p| !p.expired(now));
        if let Some(pin) = pins.iter().find(|p| p.epoch == epoch && p.at_seq == at_seq) {
            pin.touch(now, ttl);
            return Ok(pin.clone());
        }
        if pins.len() >= MAX_PINS_PER_BRANCH {
            let lru = pins
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.idle_from())
                .map(|(i, p)| (i, p.idle_from()));
            if let Some((i, idle_from)) = lru {
                if idle_from > now {
                    let wait = u64::try_from(idle_from - now).unwrap_or(0);
                    return Err(Busy {
                        retry_after: Duration::from_millis(wait),
                    });
                }
                pins.swap_remove(i);
            }
        }
        let id = loop {
            let id = rand::random::<u64>();
            if pins.iter().all(|p| p.id != id) {
                break id;
            }
        };
        let pin = Arc::new(Pinned {
            id,
            epoch,
            at_seq,
            total,
            state,
            expires_ms: AtomicI64::new(i64::MIN),
            used_ms: AtomicI64::new(i64::MIN),
        });
        // The expiry is set before anyone can see the pin: a sweep never drops it unserved.
        pin.touch(now, ttl);
        pins.push(pin.clone());
        Ok(pin)
    }

    /// The snapshot `id` of `branch`, unless it expired by `now`.
    pub fn get(&self, branch: &BranchKey, id: u64, now: UnixMillis) -> Option<Arc<Pinned>> {
        let pins = self.by_branch.get(branch)?;
        pins.iter().find(|p| p.id == id && !p.expired(now)).cloned()
    }

    /// Drops expired snapshots.
    pub fn sweep(&self) {
        self.sweep_at(now_ms());
    }

    fn sweep_at(&self, now: UnixMillis) {
        self.by_branch.retain(|_, pins| {
            pins.retain(|p| !p.expired(now));
            !pins.is_empty()
        });
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

    const TTL: Duration = Duration::from_secs(600);

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn branch(name: &str) -> BranchKey {
        BranchKey::new(Name::new("t").unwrap(), Name::new(name).unwrap())
    }

    fn state(skus: usize) -> StateSnapshot {
        BranchState::load(
            vec![],
            (0..skus)
                .map(|i| (sku(&format!("S{i}")), i as i64))
                .collect(),
            vec![],
        )
        .snapshot()
    }

    #[test]
    fn pages_merge_products_and_stock_in_sku_order() {
        let snapshots = Snapshots::default();
        let b = branch("b");
        let pinned = snapshots.pin(&b, Epoch(1), 9, state(5), 0, TTL).unwrap();
        assert_eq!(pinned.total, 5);
        let (first, more) = pinned.page(None, 2);
        assert!(more);
        let last = first.last().unwrap().stock.as_ref().unwrap().sku.clone();
        let token = page_token(pinned.id, &last);
        let (tid, after) = parse_page_token(&token).unwrap();
        let rest = snapshots.get(&b, tid, 1).unwrap().page(Some(&after), 10);
        let skus: Vec<String> = first
            .iter()
            .chain(rest.0.iter())
            .map(|i| i.stock.as_ref().unwrap().sku.to_string())
            .collect();
        assert_eq!(skus, ["S0", "S1", "S2", "S3", "S4"]);
        assert!(!rest.1);
        assert!(parse_page_token("!!").is_none());
        assert!(
            snapshots.get(&branch("c"), pinned.id, 1).is_none(),
            "a token works only for its branch"
        );
    }

    #[test]
    fn the_documented_page_token_is_what_the_hub_makes() {
        // PROTOCOL.md §11, the snapshot page example: snapshot 1, last SKU COFFEE-250G.
        assert_eq!(
            page_token(1, &sku("COFFEE-250G")),
            "AAAAAAAAAAFDT0ZGRUUtMjUwRw"
        );
    }

    #[test]
    fn a_new_pin_survives_a_sweep_before_its_first_page_and_expires_after_the_ttl() {
        let snapshots = Snapshots::default();
        let b = branch("b");
        let pinned = snapshots
            .pin(&b, Epoch(1), 3, state(2), 1_000, TTL)
            .unwrap();
        snapshots.sweep_at(1_000);
        assert!(snapshots.get(&b, pinned.id, 1_000).is_some());
        let end = 1_000 + millis(TTL);
        snapshots.sweep_at(end);
        assert!(
            snapshots.get(&b, pinned.id, end).is_some(),
            "alive until the TTL"
        );
        assert_eq!(
            pinned.touch(end, TTL),
            end + millis(TTL),
            "a page extends it"
        );
        snapshots.sweep_at(end + millis(TTL) + 1);
        assert!(
            snapshots.get(&b, pinned.id, end).is_none(),
            "swept once expired"
        );
    }

    #[test]
    fn pins_at_the_same_seq_are_shared_and_each_branch_has_at_most_the_cap() {
        let snapshots = Snapshots::default();
        let b = branch("b");
        let first = snapshots.pin(&b, Epoch(1), 1, state(2), 0, TTL).unwrap();
        let again = snapshots.pin(&b, Epoch(1), 1, state(2), 5, TTL).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "one pin per position");
        assert!(Arc::ptr_eq(
            &snapshots.reuse(&b, Epoch(1), 1, 6, TTL).unwrap(),
            &first
        ));
        assert!(snapshots.reuse(&b, Epoch(2), 1, 6, TTL).is_none());
        for seq in 2..=MAX_PINS_PER_BRANCH as u64 {
            snapshots.pin(&b, Epoch(1), seq, state(2), 10, TTL).unwrap();
        }

        // Every pin was used within PIN_IDLE: a new position is refused until the least
        // recently used one has been idle that long, and nothing already pinned is dropped.
        let busy = snapshots
            .pin(&b, Epoch(1), 100, state(2), 20, TTL)
            .unwrap_err();
        assert_eq!(
            busy.retry_after,
            Duration::from_millis(6) + PIN_IDLE - Duration::from_millis(20)
        );
        assert!(snapshots.get(&b, first.id, 20).is_some());
        let other = snapshots.pin(&branch("c"), Epoch(1), 100, state(2), 20, TTL);
        assert!(other.is_ok(), "the cap is per branch");

        // A reader paging the first snapshot keeps it; the idle second one makes room.
        let later = millis(PIN_IDLE) + 10;
        first.touch(later, TTL);
        let new = snapshots
            .pin(&b, Epoch(1), 100, state(2), later, TTL)
            .unwrap();
        assert!(snapshots.get(&b, first.id, later).is_some());
        assert!(snapshots.get(&b, new.id, later).is_some());
        let live = (1..=MAX_PINS_PER_BRANCH as u64)
            .filter(|seq| snapshots.reuse(&b, Epoch(1), *seq, later, TTL).is_some())
            .count();
        assert_eq!(
            live,
            MAX_PINS_PER_BRANCH - 1,
            "exactly one pin was replaced"
        );
    }
}
