//! Publishing tables: an atomic pointer swap that never blocks a worker.
//!
//! The control thread owns the [`Publisher`]; each worker owns a [`TableReader`], an
//! `arc_swap::Cache` that costs one pointer comparison per burst when nothing changed. A worker
//! holds the table it loaded for the whole burst, so every frame of a burst sees one version, and
//! an old table is freed only when the last worker moved on. Nothing here allocates, locks or
//! waits on the worker side.
//!
//! Rule-hit counters live in each table. When a retired table is released by every worker, the
//! publisher folds its counts into a per-[`RuleId`] carry, so a rule's counter survives any number
//! of swaps as long as the rule keeps its identity.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};

use policy::rule::{Layer, RuleId, RuleSet};
use policy::table::Table;

/// The worker side: a cached handle on the current table.
pub struct TableReader {
    cache: Cache<Arc<ArcSwap<Table>>, Arc<Table>>,
}

impl TableReader {
    /// The current table. Call once per burst.
    #[inline]
    pub fn load(&mut self) -> &Arc<Table> {
        self.cache.load()
    }
}

/// A rule's cumulative hit count, across swaps.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuleHits {
    pub id: RuleId,
    pub index: usize,
    pub layer: Layer,
    pub object: String,
    pub rule: Option<usize>,
    pub hits: u64,
}

/// The control side: builds and swaps tables, and keeps counters across swaps.
pub struct Publisher {
    shared: Arc<ArcSwap<Table>>,
    retired: Vec<Arc<Table>>,
    carried: HashMap<RuleId, u64>,
    workers: usize,
    last_swap: std::time::Instant,
}

impl Publisher {
    /// Starts with generation 1 built from `rules`.
    pub fn new(rules: RuleSet, workers: usize) -> Publisher {
        Publisher {
            shared: Arc::new(ArcSwap::from_pointee(Table::build(rules, 1, workers))),
            retired: Vec::new(),
            carried: HashMap::new(),
            workers,
            last_swap: std::time::Instant::now(),
        }
    }

    pub fn reader(&self) -> TableReader {
        TableReader {
            cache: Cache::new(Arc::clone(&self.shared)),
        }
    }

    pub fn current(&self) -> Arc<Table> {
        self.shared.load_full()
    }

    /// Builds a table from `rules` (here, off the datapath) and swaps it in.
    pub fn publish(&mut self, rules: RuleSet) -> Arc<Table> {
        let generation = self.shared.load().generation() + 1;
        let table = Arc::new(Table::build_after(
            rules,
            generation,
            self.workers,
            Some(&self.shared.load()),
        ));
        let old = self.shared.swap(Arc::clone(&table));
        self.last_swap = std::time::Instant::now();
        self.retired.push(old);
        self.fold();
        table
    }

    /// When the current table was swapped in (for event-to-swap latency).
    pub(crate) fn last_swap(&self) -> std::time::Instant {
        self.last_swap
    }

    /// Number of retired tables some worker still holds.
    #[cfg(test)]
    pub(crate) fn retired_in_use(&mut self) -> usize {
        self.fold();
        self.retired.len()
    }

    /// Folds the counts of tables no worker holds any more into the carry.
    fn fold(&mut self) {
        let carried = &mut self.carried;
        // A retired table is folded only once this holds its last reference: `Arc::try_unwrap`
        // says so with the synchronisation a relaxed `strong_count` lacks (a worker's final
        // count increments happen-before its drop of the table).
        let mut keep = Vec::with_capacity(self.retired.len());
        for t in self.retired.drain(..) {
            let t = match Arc::try_unwrap(t) {
                Ok(t) => t,
                Err(t) => {
                    keep.push(t);
                    continue;
                }
            };
            // Only rules that were hit carry anything (most of a large table never is).
            for (r, c) in t.rules().iter().zip(t.hit_counts()) {
                if c > 0 {
                    *carried.entry(r.id).or_default() += c;
                }
            }
        }
        self.retired = keep;
        if self.carried.is_empty() {
            return;
        }
        let current = self.shared.load();
        let live: HashSet<RuleId> = current
            .rules()
            .iter()
            .chain(self.retired.iter().flat_map(|t| t.rules()))
            .map(|r| r.id)
            .collect();
        self.carried.retain(|id, _| live.contains(id));
    }

    /// Cumulative hits of every rule in the current table.
    pub fn rule_hits(&mut self) -> Vec<RuleHits> {
        self.fold();
        let mut totals = self.carried.clone();
        for t in &self.retired {
            for (r, c) in t.rules().iter().zip(t.hit_counts()) {
                *totals.entry(r.id).or_default() += c;
            }
        }
        let current = self.current();
        current
            .rules()
            .iter()
            .zip(current.hit_counts())
            .enumerate()
            .map(|(index, (r, c))| RuleHits {
                id: r.id,
                index,
                layer: r.origin.layer,
                object: r.origin.object.clone(),
                rule: r.origin.index,
                hits: c + totals.get(&r.id).copied().unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::compile::{compile, GatewayContext};
    use policy::key::FlowKey;
    use policy::rule::Direction;
    use policy::snapshot::Snapshot;
    use policy::table::Decision;

    #[test]
    fn counters_survive_swaps_and_old_tables_are_released() {
        let rules = || {
            compile(&Snapshot::default(), &GatewayContext::default())
                .unwrap()
                .rules
        };
        let mut p = Publisher::new(rules(), 1);
        let mut reader = p.reader();
        let key = FlowKey::new(
            Direction::Ingress,
            "192.0.2.1".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            6,
            1,
            80,
        );
        let mut out = [Decision::default()];
        for generation in 1..=5u64 {
            let t = reader.load();
            assert_eq!(t.generation(), generation);
            t.decide_batch(0, &[key, key], &mut out[..]);
            p.publish(rules());
        }
        // The reader still holds generation 5's predecessor until it loads again.
        assert_eq!(p.retired_in_use(), 1);
        assert_eq!(reader.load().generation(), 6);
        assert_eq!(p.retired_in_use(), 0);
        let hits = p.rule_hits();
        let default_ingress = hits.iter().find(|h| h.object == "default/ingress").unwrap();
        // decide_batch is given two keys but `out` has room for one: the zip stops at one.
        assert_eq!(default_ingress.hits, 5);
    }
}
