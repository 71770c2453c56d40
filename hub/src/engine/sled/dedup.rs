//! A fast "certainly new" answer for the dedup index.
//!
//! Almost every publish carries an `event_id` the branch has never seen, and proving that
//! from the store is a full lookup (about a tenth of the hub's CPU under publish load). A
//! Bloom filter of every id the branch accepted answers "certainly not accepted" from memory;
//! only a "maybe" (every real duplicate, and about 1% of new ids) goes to the store. The
//! filter is built from the store's dedup index when the branch opens and grows as a chain of
//! filters, each twice the previous, so it never has to be rebuilt while the hub runs. Ids
//! that leave the dedup window stay in it: a false "maybe" costs a lookup, never correctness.

use bloomfilter::Bloom;
use uuid::Uuid;

/// The rate of false "maybe" answers each filter of the chain is sized for.
const FALSE_POSITIVES: f64 = 0.01;
/// Ids the first filter holds at least (about 80 KiB).
const MIN_CAPACITY: usize = 65_536;

/// The ids a branch accepted, approximately.
pub struct DedupFilter {
    filters: Vec<Filter>,
}

struct Filter {
    bloom: Bloom<Uuid>,
    capacity: usize,
    len: usize,
}

impl Filter {
    fn new(capacity: usize) -> Option<Self> {
        Bloom::new_for_fp_rate(capacity, FALSE_POSITIVES)
            .ok()
            .map(|bloom| Self {
                bloom,
                capacity,
                len: 0,
            })
    }
}

impl DedupFilter {
    /// A filter sized for `known` ids already accepted (and as many more).
    pub fn with_capacity(known: usize) -> Self {
        Self {
            filters: Filter::new(known.saturating_mul(2).max(MIN_CAPACITY))
                .into_iter()
                .collect(),
        }
    }

    /// Records an accepted id.
    pub fn insert(&mut self, id: &Uuid) {
        let full = self.filters.last().is_none_or(|f| f.len >= f.capacity);
        if full {
            let capacity = self
                .filters
                .last()
                .map_or(MIN_CAPACITY, |f| f.capacity.saturating_mul(2));
            match Filter::new(capacity) {
                Some(filter) => self.filters.push(filter),
                // Cannot size a filter: keep filling the last one (more false "maybe"s).
                None if self.filters.is_empty() => return,
                None => {}
            }
        }
        if let Some(filter) = self.filters.last_mut() {
            filter.bloom.set(id);
            filter.len += 1;
        }
    }

    /// `false` if `id` was certainly never recorded; `true` if it may have been.
    pub fn may_contain(&self, id: &Uuid) -> bool {
        // With no filter at all (it could not be sized), everything must be looked up.
        self.filters.is_empty() || self.filters.iter().any(|f| f.bloom.check(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_ids_are_always_maybe_and_most_new_ids_are_certainly_new() {
        let mut filter = DedupFilter::with_capacity(0);
        let recorded: Vec<Uuid> = (0..200_000).map(|_| Uuid::now_v7()).collect();
        for id in &recorded {
            filter.insert(id);
        }
        assert!(
            filter.filters.len() >= 2,
            "the chain grew past its first filter"
        );
        assert!(
            recorded.iter().all(|id| filter.may_contain(id)),
            "no false negative, ever"
        );
        let false_maybes = (0..100_000)
            .filter(|_| filter.may_contain(&Uuid::now_v7()))
            .count();
        assert!(
            false_maybes < 5_000,
            "{false_maybes} of 100,000 new ids looked known"
        );
    }
}
