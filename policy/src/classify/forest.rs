//! The datapath classifier: range-splitting trees for IPv4, tuple-space tables for what trees do
//! badly.
//!
//! The IPv4 atoms of each direction are partitioned by which address is specific (a prefix of
//! /16 or longer): a specific source, a specific destination, or neither. Each part gets its own
//! [`Tree`], which then mostly splits on the address its atoms are narrow in, so few atoms
//! straddle a split and few are copied. A part whose tree would still hold more than
//! [`REPLICATION`] copies per atom (wide ranges on every dimension do that) is put in tuple-space
//! tables instead, which never copy. IPv6 keys go to the tuple space.
//!
//! Parts' trees then merge where one tree is cheaper than two (see [`MERGE_BYTES_PER_ATOM`]):
//! every tree is a walk and a leaf test of its own. A lookup visits the trees in order of their
//! best priority, then the tables, and skips any whose best cannot beat the match found so far.
//! Bursts are walked [`GROUP`] packets at a time, tree by tree, level by level; a small tree
//! that only a few packets of the burst still need is scanned linearly instead (`block.rs`).
//!
//! Leaves stop at a covering atom, so a lookup that continues *after* a match (`from` > 0, how
//! Pass, Log and audit rules go on) may need atoms a leaf dropped. Only those atoms go to a
//! second tuple space, beside the IPv6 atoms: a lookup from `from` takes the best of the trees'
//! leaves (scanned from `from`), the tables and that tuple space. An atom no leaf dropped is
//! in every leaf whose box it meets, so the leaves answer for it.

use super::simd::{detected, scan_block, supported, transpose, Walk};
use super::tree::{Keys, Tree, TreeStats, GROUP};
use super::tuple::{lookup, tables_memory, v4_tables, Tuple, TupleSpace, TupleStats};
use super::{lower, Atom, Classifier, NO_MATCH};
use crate::key::FlowKey;
use crate::rule::Match;

/// Prefixes at least this long make an address specific when partitioning.
const SPECIFIC: u8 = 16;
/// A tree may hold this many leaf entries per atom (plus [`SLACK`]) before its part goes to
/// tuple-space tables instead. Measured on the ClassBench sets: the parts that stay under it
/// copy each atom 1.5-5 times; the broad part of ipc1_100k would copy each over 400 times.
const REPLICATION: usize = 8;
const SLACK: usize = 4096;
/// A later tree that at most this many packets of a group still need walks them one at a time
/// (acl1_1k's second tree, about three packets a burst: 1.08 times faster than a packed SIMD
/// walk; no different on ipc1 and fw1).
const SCALAR_MAX: usize = 4;
/// A tree with a [`Block`](super::block) is scanned linearly, packet by packet, when the
/// packets that still need it times its rows (16 atoms each) are at most this. fw1_1k's third
/// tree (77 atoms, 5 rows, about six packets a burst) cost 6 ns a lookup, averaged over all
/// packets, as a walk, and 3-4 ns scanned: lookups 1.07-1.15 times faster over the whole set
/// (in-process A/B). Allowing 16 packets of 5 rows measured better than 8 or 32. A scalar
/// lookup walks the tree: without SIMD, a scan tests every atom.
const LINEAR_ROWS: usize = 80;
/// Two trees merge into one when the merged tree's walk is no longer than walking both (its
/// depth at most the sum of theirs) and it takes at most this many bytes per atom: ten records'
/// worth. A leaf holds 4-byte entries, so copies are cheap. Measured (in-process A/B, merged
/// against not merged): ipc1_1k's three trees become one of 238 bytes an atom, 1.50 times
/// faster; acl1_1k's three one of 67, 1.53 times; acl1_10k's source and destination parts 1.7
/// times and acl1_100k's 1.66. fw1_1k's would take 812 bytes an atom, and ipc1_10k's and fw1's
/// larger sets fail the limit.
const MERGE_BYTES_PER_ATOM: usize = 320;
/// A merge is attempted with room for at most this many times the two trees' leaf entries
/// together, which bounds what a failed attempt costs.
const MERGE_GROWTH: usize = 8;
/// A merge is not attempted when copying the smaller tree's atoms into the larger tree's leaves
/// would take more than this many times the limit of entries (see `Part::build`).
const MERGE_ESTIMATE: usize = 4;
/// A tree with at most 1/MERGE_SMALL of the other's atoms is "a handful" (see `Part::build`),
/// merged only into a tree of at most MERGE_HANDFUL_MAX atoms: its atoms are usually broad, so
/// the merge copies them into most of the large tree's leaves and rebuilds it. ipc1_1k's 9 into
/// 516 atoms: 1.2 times faster lookups. acl1_10k's 80 into 2,542: 1.03 times faster, for a build
/// 2.3 times longer (27 -> 64 ms); a one-atom default tree into kube-latency's 10,000: the table
/// build doubled (8.4 -> 18.7 ms) and the end-to-end p99 reached 49.6 ms.
const MERGE_SMALL: usize = 16;
const MERGE_HANDFUL_MAX: usize = 1024;

/// Leaf entries a tree over `atoms` may hold.
fn budget(atoms: usize, replication: usize) -> usize {
    if replication == 0 {
        0
    } else {
        atoms * replication + SLACK
    }
}

/// One direction's IPv4 atoms.
#[derive(Debug, Default)]
struct Part {
    /// Sorted by their best priority.
    trees: Vec<Tree>,
    /// Atoms whose tree went over budget.
    tables: Vec<Tuple<u32>>,
    tables_best: u32,
    /// Some leaf dropped atoms after a covering one.
    truncated: bool,
    /// The atoms leaves dropped, for lookups from past a covering atom.
    dropped: Vec<Atom>,
}

impl Part {
    fn build(atoms: &[Atom], stats: &mut ForestStats, replication: usize) -> Part {
        let mut groups: [Vec<Atom>; 3] = Default::default();
        for a in atoms {
            let g = if a.src.len >= SPECIFIC && a.src.len >= a.dst.len {
                0
            } else if a.dst.len >= SPECIFIC {
                1
            } else {
                2
            };
            groups[g].push(*a);
        }
        let mut part = Part {
            tables_best: NO_MATCH,
            ..Part::default()
        };
        let mut rest = Vec::new();
        let mut built: Vec<(Vec<Atom>, Tree)> = Vec::new();
        for mut g in groups.into_iter().filter(|g| !g.is_empty()) {
            g.sort_by_key(|a| a.prio);
            g.dedup();
            match Tree::build(&g, budget(g.len(), replication)) {
                Ok(t) => built.push((g, t)),
                Err(_) => rest.append(&mut g),
            }
        }
        // Fewer trees is what makes a lookup fast: each tree is a walk and a leaf test of its
        // own, and a burst waits for the last lane of each. Pairs are tried smallest first,
        // and a pair that failed is not tried again.
        let mut failed: Vec<[(u32, usize); 2]> = Vec::new();
        let key = |b: &[(Vec<Atom>, Tree)], i: usize| (b[i].1.best, b[i].0.len());
        'merging: loop {
            let mut pairs: Vec<(usize, usize)> = (0..built.len())
                .flat_map(|i| (i + 1..built.len()).map(move |j| (i, j)))
                .collect();
            pairs.sort_by_key(|&(i, j)| {
                built[i].1.stats.leaf_entries + built[j].1.stats.leaf_entries
            });
            for (i, j) in pairs {
                let pair = [key(&built, i), key(&built, j)];
                if failed.contains(&pair) {
                    continue;
                }
                let (a, b) = (&built[i], &built[j]);
                // Worth a try when most packets walk both trees anyway (the later one's best
                // atom comes before most atoms), or when one is a handful of atoms: in the
                // other's leaves they cost little, and on their own they are a walk for the
                // packets that still need them.
                let later = a.1.best.max(b.1.best);
                let before = a.0.iter().chain(&b.0).filter(|x| x.prio < later).count();
                let (small, large) = (a.0.len().min(b.0.len()), a.0.len().max(b.0.len()));
                let needed = before * 2 <= a.0.len() + b.0.len();
                let handful = small * MERGE_SMALL <= large && large <= MERGE_HANDFUL_MAX;
                if !needed && !handful {
                    continue;
                }
                let entries = a.1.stats.leaf_entries + b.1.stats.leaf_entries;
                let depth = a.1.stats.max_depth + b.1.stats.max_depth;
                let mut g: Vec<Atom> = a.0.iter().chain(&b.0).copied().collect();
                g.sort_by_key(|a| a.prio);
                g.dedup();
                let bytes = MERGE_BYTES_PER_ATOM * g.len();
                let limit = (entries * MERGE_GROWTH).min(bytes / 4);
                // The smaller tree's atoms copied into the larger tree's leaves as they are: a
                // merged tree splits anew and copies fewer (acl1_10k's: 2.3 times fewer), but
                // where even this is many times over the limit, building it would only find
                // that out later (ipc1_10k's: 9 times; fw1's and ipc1_100k's: over 100).
                let (big, few) = if a.0.len() >= b.0.len() {
                    (a, b)
                } else {
                    (b, a)
                };
                let floor = big.1.stats.leaf_entries;
                let cap = MERGE_ESTIMATE * limit;
                if floor + big.1.copies(&few.0, cap + 1 - floor.min(cap)) > cap {
                    failed.push(pair);
                    continue;
                }
                let merged = Tree::build(&g, limit);
                match merged
                    .ok()
                    .filter(|t| t.stats.max_depth <= depth && t.memory() <= bytes)
                {
                    Some(t) => {
                        built.swap_remove(j);
                        built[i] = (g, t);
                        continue 'merging;
                    }
                    None => failed.push(pair),
                }
            }
            break;
        }
        for (g, t) in built {
            stats.trees += 1;
            stats.tree_nodes += t.stats.nodes;
            stats.leaves += t.stats.leaves;
            stats.multi_leaves += t.stats.multi_leaves;
            stats.leaf_entries += t.stats.leaf_entries;
            stats.max_depth = stats.max_depth.max(t.stats.max_depth);
            stats.max_leaf = stats.max_leaf.max(t.stats.max_leaf);
            stats.cut_trees += usize::from(t.stats.cut_slices > 1);
            stats.block_trees += usize::from(t.block.is_some());
            part.truncated |= t.truncated;
            part.dropped
                .extend(t.dropped.iter().map(|&i| g[i as usize]));
            part.trees.push(t);
        }
        part.trees.sort_by_key(|t| t.best);
        if !rest.is_empty() {
            stats.table_atoms += rest.len();
            part.tables_best = rest.iter().map(|a| a.prio).min().unwrap_or(NO_MATCH);
            part.tables = v4_tables(&rest, &mut TupleStats::default());
        }
        part
    }

    #[inline]
    fn first_match(&self, k: &FlowKey) -> u32 {
        let mut best = NO_MATCH;
        for t in &self.trees {
            if t.best >= best {
                break;
            }
            best = t.first_match(k, 0, best);
        }
        if self.tables_best < best {
            best = lookup(&self.tables, k.src as u32, k.dst as u32, k, 0, best);
        }
        best
    }

    /// Classifies one direction's packets of a burst: `keys` holds their values (position `p`
    /// is `flows[members[p]]`), and each one's first match goes to `out[members[p]]`.
    #[inline]
    fn classify_group(
        &self,
        mode: Walk,
        flows: &[FlowKey],
        keys: &Keys,
        members: &[u8],
        out: &mut [u32],
    ) {
        let n = members.len().min(GROUP);
        let mut best = [NO_MATCH; GROUP];
        for (i, t) in self.trees.iter().enumerate() {
            // The packets whose match so far does not beat every atom of this tree. Trees are
            // in order of their best atom: once there are none, no later tree has any either.
            // Before the first tree every packet is.
            let c = if i == 0 {
                n
            } else {
                best[..n].iter().filter(|&&b| b > t.best).count()
            };
            if c == 0 {
                break;
            }
            if let Some(block) = &t.block {
                if mode != Walk::Scalar && c * block.rows.len() <= LINEAR_ROWS {
                    // Few packets and few atoms: each packet scans the atoms, 16 or 8 at a
                    // time, instead of a chunk waiting on each level's gathers.
                    // The packets as bits, so that picking them out is not a branch per
                    // packet.
                    let mut open = 0u64;
                    for (p, &b) in best[..n].iter().enumerate() {
                        open |= u64::from(b > t.best) << p;
                    }
                    while open != 0 {
                        let p = open.trailing_zeros() as usize;
                        open &= open - 1;
                        best[p] = scan_block(mode, block, t.recs(), &keys.values(p), best[p]);
                    }
                    continue;
                }
            }
            if c * 4 > n * 3 {
                t.classify_group(mode, keys, n, flows, members, &mut best);
                continue;
            }
            if c <= SCALAR_MAX {
                // A handful: one at a time. A SIMD walk of even one lane waits on each level's
                // gather; scalar walks of a few packets overlap.
                for (p, b) in best[..n].iter_mut().enumerate() {
                    if *b > t.best {
                        *b = t.first_match(&flows[members[p] as usize], 0, *b);
                    }
                }
                continue;
            }
            // Few are: walk them packed together, so fewer chunks walk.
            let mut open = [0u8; GROUP];
            let mut c = 0;
            for (p, &b) in best[..n].iter().enumerate() {
                open[c] = p as u8;
                c += (b > t.best) as usize;
            }
            let mut sub = Keys::zeroed();
            let mut sub_members = [0u8; GROUP];
            let mut sub_best = [NO_MATCH; GROUP];
            for (i, &p) in open[..c].iter().enumerate() {
                let p = p as usize;
                for (to, from) in sub.0.iter_mut().zip(&keys.0) {
                    to[i] = from[p];
                }
                sub_members[i] = members[p];
                sub_best[i] = best[p];
            }
            t.classify_group(mode, &sub, c, flows, &sub_members[..c], &mut sub_best);
            for (&p, &b) in open[..c].iter().zip(&sub_best) {
                best[p as usize] = b;
            }
        }
        // Without tables, `tables_best` is NO_MATCH and no packet looks there; a one-way
        // burst's members are its positions in order, so its results are `best` as it is.
        if self.tables_best == NO_MATCH && members[..n] == IN_ORDER[..n] {
            out[..n].copy_from_slice(&best[..n]);
            return;
        }
        for (p, &m) in members[..n].iter().enumerate() {
            if self.tables_best < best[p] {
                let k = &flows[m as usize];
                best[p] = lookup(&self.tables, k.src as u32, k.dst as u32, k, 0, best[p]);
            }
            out[m as usize] = best[p];
        }
    }

    fn memory(&self) -> usize {
        self.trees.iter().map(Tree::memory).sum::<usize>() + tables_memory(&self.tables)
    }
}

/// Positions `0..GROUP`: the members of a group that is a whole burst.
const IN_ORDER: [u8; GROUP] = {
    let mut a = [0u8; GROUP];
    let mut i = 0;
    while i < GROUP {
        a[i] = i as u8;
        i += 1;
    }
    a
};

/// Shape of a built [`Forest`], for `check` and the benchmarks.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ForestStats {
    pub atoms: usize,
    pub trees: usize,
    pub tree_nodes: usize,
    pub leaves: usize,
    pub multi_leaves: usize,
    /// Atoms in tree leaves, counted once per leaf: `leaf_entries / atoms` is the replication.
    pub leaf_entries: usize,
    pub max_depth: usize,
    pub max_leaf: usize,
    /// Trees whose walk starts with a cut table.
    pub cut_trees: usize,
    /// Trees that also have a linear block (at most `block::LINEAR_MAX` atoms), scanned
    /// instead of walked when few packets need them.
    pub block_trees: usize,
    /// IPv4 atoms in tuple-space tables because their tree would copy them too often.
    pub table_atoms: usize,
    /// The tuple space beside it (IPv6, and the atoms leaves dropped, for continuations).
    pub tuples: TupleStats,
}

/// The datapath classifier. Immutable once built; lookups take `&self`.
#[derive(Debug)]
pub struct Forest {
    /// IPv4, by direction.
    v4: [Part; 2],
    /// The IPv6 atoms, and the IPv4 atoms some leaf dropped (lookups that continue past a
    /// truncated leaf).
    rest: TupleSpace,
    stats: ForestStats,
    /// How bursts walk the trees: the widest SIMD walk this CPU has.
    walk: Walk,
}

impl Forest {
    pub fn build(matches: &[Match]) -> Forest {
        Self::build_with(matches, REPLICATION)
    }

    /// [`Forest::build`] from borrowed matches, in priority order (`Table::build` passes its
    /// rules' matches without copying them).
    pub fn build_from<'a>(matches: impl IntoIterator<Item = &'a Match>) -> Forest {
        Self::build_with(matches, REPLICATION)
    }

    /// [`Forest::build`] with another replication limit: tests use 0 to force every part into
    /// tables.
    pub(crate) fn build_with<'a>(
        matches: impl IntoIterator<Item = &'a Match>,
        replication: usize,
    ) -> Forest {
        let atoms = lower(matches);
        let mut stats = ForestStats {
            atoms: atoms.len(),
            ..ForestStats::default()
        };
        let part = |dir: u8, stats: &mut ForestStats| {
            let v4: Vec<Atom> = atoms
                .iter()
                .filter(|a| a.dir == dir && !a.src.v6)
                .copied()
                .collect();
            Part::build(&v4, stats, replication)
        };
        let mut v4 = [part(0, &mut stats), part(1, &mut stats)];
        let mut rest: Vec<Atom> = atoms.iter().filter(|a| a.src.v6).copied().collect();
        for p in &mut v4 {
            rest.append(&mut p.dropped);
        }
        let rest = TupleSpace::from_atoms(&rest);
        stats.tuples = rest.stats();
        Forest {
            v4,
            rest,
            stats,
            walk: detected(),
        }
    }

    pub fn stats(&self) -> ForestStats {
        self.stats
    }

    /// Each tree's shape, both directions.
    pub fn tree_stats(&self) -> Vec<TreeStats> {
        self.v4
            .iter()
            .flat_map(|p| p.trees.iter().map(|t| t.stats))
            .collect()
    }

    /// How bursts walk the trees here.
    pub fn walk(&self) -> Walk {
        self.walk
    }

    /// Walks bursts with `mode` instead of the detected one, if this CPU runs it (tests and
    /// benchmarks measure every path on one machine). Returns whether it took effect.
    pub fn set_walk(&mut self, mode: Walk) -> bool {
        if supported(mode) {
            self.walk = mode;
        }
        self.walk == mode
    }
}

impl Classifier for Forest {
    #[inline]
    fn first_match(&self, key: &FlowKey, from: u32) -> u32 {
        let part = &self.v4[key.dir as usize & 1];
        if key.v6 {
            self.rest.first_match(key, from)
        } else if from > 0 {
            let mut best = NO_MATCH;
            for t in &part.trees {
                best = t.first_match(key, from, best);
            }
            best = lookup(
                &part.tables,
                key.src as u32,
                key.dst as u32,
                key,
                from,
                best,
            );
            if part.truncated {
                best = best.min(self.rest.first_match(key, from));
            }
            best
        } else {
            part.first_match(key)
        }
    }

    fn classify_batch(&self, keys: &[FlowKey], out: &mut [u32]) {
        let n = keys.len().min(out.len());
        if n < 4 {
            // Too few to walk together: one at a time, without setting up a group.
            for (k, o) in keys[..n].iter().zip(out.iter_mut()) {
                *o = self.first_match(k, 0);
            }
            return;
        }
        for base in (0..n).step_by(GROUP) {
            let end = (base + GROUP).min(n);
            let (chunk, out) = (&keys[base..end], &mut out[base..end]);
            // A burst from one receive queue is all one direction, and nearly always IPv4:
            // then its keys go to one block in order, with nothing to sort.
            let d = chunk[0].dir as usize & 1;
            // The keys go into one block as they are checked, in one pass: a mixed burst (rare)
            // is then done again below.
            let mut values = Keys::zeroed();
            let mixed = transpose(self.walk, chunk, &mut values, d as u8);
            if !mixed {
                self.v4[d].classify_group(self.walk, chunk, &values, &IN_ORDER[..chunk.len()], out);
                continue;
            }
            // Group the burst by direction, writing each IPv4 key's values straight into its
            // direction's key block; IPv6 keys go one by one to the tuple space. The counts
            // stay in registers: an indexed count in memory made each key wait for the last
            // one's store.
            let mut values = [Keys::zeroed(), Keys::zeroed()];
            let mut members = [[0u8; GROUP]; 2];
            let (mut n0, mut n1) = (0usize, 0usize);
            for (i, k) in chunk.iter().enumerate() {
                if k.v6 {
                    out[i] = self.rest.first_match(k, 0);
                    continue;
                }
                let egress = k.dir as usize & 1;
                let at = if egress == 0 { n0 } else { n1 } & (GROUP - 1);
                values[egress].set(at, k);
                members[egress][at] = i as u8;
                n0 += 1 - egress;
                n1 += egress;
            }
            for (d, count) in [n0, n1].into_iter().enumerate() {
                if count > 0 {
                    let members = &members[d][..count];
                    self.v4[d].classify_group(self.walk, chunk, &values[d], members, out);
                }
            }
        }
    }

    fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.v4.iter().map(Part::memory).sum::<usize>()
            + self.rest.memory_bytes()
    }
}
