//! A range-splitting decision tree for IPv4 atoms, in the HyperSplit family, walked a burst at a
//! time.
//!
//! Every IPv4 atom is a box over five dimensions: source and destination address ranges, source
//! and destination port ranges, and protocol. An inner node splits one dimension at a threshold
//! (`value <= t` goes to the first child, the rest to the second); a leaf holds the atoms that
//! can still match inside its box, in priority order, and is scanned with the full match (which
//! also checks VLAN and fragments). A leaf stops at the first atom that covers its whole box on
//! every dimension and needs nothing else: nothing after it can be the first match there.
//!
//! The split is chosen per node among the five dimensions: the threshold is the median of the
//! range end points of the node's atoms that fall inside the node's box, and the dimension whose
//! split leaves the larger side smallest wins (HyperSplit's balanced split). An atom that straddles
//! the threshold goes both ways; that replication is what costs memory, and it is measured by
//! `TreeStats` and the benchmark.
//!
//! A node is 8 bytes and its two children sit side by side, so a step is a load, a compare and
//! an add, with no branch on the direction taken. The lookup walks up to [`GROUP`] packets in
//! lock step, one level each round, so one packet's cache miss overlaps the others' work.
//!
//! Reference: Qi, Xu, Yang, Li, Li, "Packet classification algorithms: from theory to practice"
//! (INFOCOM 2009), which introduced HyperSplit.

use super::block::Block;
use super::{Atom, NO_MATCH};
use crate::key::FlowKey;
use crate::rule::mask;

/// Leaves hold at most this many atoms unless no split separates them.
const BINTH: usize = 1;
/// Node indices live in the 29 high bits of `Node::meta`.
const MAX_NODES: usize = 1 << 29;
/// Nodes with more than four times this many atoms choose their split on a sample this size.
const SAMPLE: usize = 64;
/// Past this depth a node becomes a leaf whatever it holds.
const MAX_DEPTH: usize = 40;
/// `meta & 7` of a leaf: the key's value there is always 0, so a leaf's only child is itself.
pub(super) const LEAF: u32 = 5;
/// Packets walked together.
pub(super) const GROUP: usize = 64;

/// An inner node: `meta` is the dimension (low 3 bits) and the index of the first child (the
/// rest). A leaf: `meta` is [`LEAF`] and its own index, so stepping from a leaf stays there and
/// a burst walks without testing which packets have arrived; `thresh` is the index of its first
/// entry in `Tree::leaf`, and the leaf's entries run on while [`MORE`] is set.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(super) struct Node {
    thresh: u32,
    meta: u32,
}

type Box5 = [(u32, u32); 5];

/// `Rec::meta`: the protocol (low 8 bits) is not tested.
pub(super) const ANY_PROTO: u32 = 1 << 8;
/// `Rec::meta`: the atom matches only frames whose ports are known (not a later fragment).
pub(super) const NEEDS_PORTS: u32 = 1 << 9;
/// A leaf entry (`Tree::leaf`): another entry of the same leaf follows this one. The rest of
/// the entry ([`ENTRY`]) is the index of its atom's [`Rec`].
pub(super) const MORE: u32 = 1 << 31;
pub(super) const ENTRY: u32 = MORE - 1;
/// `Rec::meta`: the VLAN (`Rec::vlan`) is not tested.
pub(super) const ANY_VLAN: u32 = 1 << 11;
/// `Rec::meta`: where the source's and the destination's shifts start (6 bits each): 32 minus
/// the prefix length, so an address `a` is in the prefix when `(a ^ prefix) >> shift` is 0 (a
/// shift of 32 leaves nothing: every address is in a /0).
pub(super) const SRC_SHIFT: u32 = 12;
pub(super) const DST_SHIFT: u32 = 18;

/// One atom of a leaf, packed for the match test: 32 bytes, aligned, so a record is one load
/// and never straddles a cache line, and the SIMD check gathers its fields at fixed offsets
/// (`simd.rs` relies on this layout). The fields every test reads come first, as three 8-byte
/// pairs; the VLAN, which almost no atom has, is read only for records that test it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(32))]
pub(super) struct Rec {
    pub(super) src: u32,
    pub(super) dst: u32,
    /// Low 16 bits the lowest port, high 16 the highest.
    pub(super) sport: u32,
    pub(super) dport: u32,
    pub(super) prio: u32,
    /// Protocol, [`ANY_PROTO`], [`NEEDS_PORTS`], [`ANY_VLAN`], and the address shifts
    /// at [`SRC_SHIFT`] and [`DST_SHIFT`].
    pub(super) meta: u32,
    pub(super) vlan: u32,
    pad: u32,
}

const _: () = assert!(std::mem::size_of::<Rec>() == 32);

/// Whether `a` is in the prefix `p` whose shift (32 minus its length) is `shift`.
#[inline(always)]
fn in_prefix(a: u32, p: u32, shift: u32) -> bool {
    u64::from(a ^ p) >> shift == 0
}

impl Rec {
    fn from_atom(a: &Atom) -> Rec {
        let mut meta = a.proto.map_or(ANY_PROTO, u32::from);
        if a.vlan.is_none() {
            meta |= ANY_VLAN;
        }
        if a.needs_ports {
            meta |= NEEDS_PORTS;
        }
        meta |= (32 - u32::from(a.src.len.min(32))) << SRC_SHIFT;
        meta |= (32 - u32::from(a.dst.len.min(32))) << DST_SHIFT;
        Rec {
            src: a.src.bits as u32 & mask(false, a.src.len) as u32,
            dst: a.dst.bits as u32 & mask(false, a.dst.len) as u32,
            prio: a.prio,
            sport: a.sport.lo as u32 | (a.sport.hi as u32) << 16,
            dport: a.dport.lo as u32 | (a.dport.hi as u32) << 16,
            meta,
            vlan: a.vlan.map_or(0, u32::from),
            pad: 0,
        }
    }

    /// A record that matches nothing (its source-port range is empty), for an empty leaf.
    fn nothing() -> Rec {
        Rec {
            sport: 1,
            prio: NO_MATCH,
            meta: ANY_PROTO | ANY_VLAN,
            ..Rec::default()
        }
    }

    /// Whether the atom matches the (IPv4) key with these values (the slots of
    /// [`Tree::values`]).
    /// `&`, not `&&`: every test is cheap, and a branch per test costs more than evaluating
    /// them all.
    #[inline(always)]
    pub(super) fn matches(&self, v: &[u32; 8]) -> bool {
        let [src, dst, sport, dport, proto, _, vlan, ports_known] = *v;
        in_prefix(src, self.src, (self.meta >> SRC_SHIFT) & 63)
            & in_prefix(dst, self.dst, (self.meta >> DST_SHIFT) & 63)
            & ((self.meta & ANY_PROTO != 0) | (self.meta & 0xff == proto))
            & (self.sport & 0xffff <= sport)
            & (sport <= self.sport >> 16)
            & (self.dport & 0xffff <= dport)
            & (dport <= self.dport >> 16)
            & ((self.meta & ANY_VLAN != 0) | (self.vlan == vlan))
            & ((ports_known != 0) | (self.meta & NEEDS_PORTS == 0))
    }
}

/// The first record of a leaf's entries, from entry `r` to the leaf's last, that matches the
/// key with values `v` (the slots of [`Tree::values`]) and is at or after `from`, if it beats
/// `best`; else `best`. Each record is tested without a branch on its outcome: leaves are short.
#[inline(always)]
fn scan_records(
    recs: &[Rec],
    leaf: &[u32],
    mut r: usize,
    v: &[u32; 8],
    from: u32,
    mut best: u32,
) -> u32 {
    while let Some(&entry) = leaf.get(r) {
        let Some(e) = recs.get((entry & ENTRY) as usize) else {
            break;
        };
        // Records are in priority order: none from here on beats `best`.
        if e.prio >= best {
            break;
        }
        let hit = e.matches(v) & (e.prio >= from);
        best = best.min(if hit { e.prio } else { NO_MATCH });
        if entry & MORE == 0 {
            break;
        }
        r += 1;
    }
    best
}

/// The atoms of `rules` below or at `t` on `dim` (`low`), or above it.
fn side(boxes: &[Box5], rules: &[u32], dim: usize, t: u32, low: bool) -> Vec<u32> {
    rules
        .iter()
        .copied()
        .filter(|&i| {
            let (lo, hi) = boxes[i as usize][dim];
            if low {
                lo <= t
            } else {
                hi > t
            }
        })
        .collect()
}

fn ranges(a: &Atom) -> Box5 {
    let prefix = |p: &crate::rule::Prefix| {
        let lo = p.bits as u32;
        let span = u32::MAX.checked_shr(p.len as u32).unwrap_or(0);
        (lo, lo | span)
    };
    let proto = a.proto.map_or((0, 255), |p| (p as u32, p as u32));
    [
        prefix(&a.src),
        prefix(&a.dst),
        (a.sport.lo as u32, a.sport.hi as u32),
        (a.dport.lo as u32, a.dport.hi as u32),
        proto,
    ]
}

/// Shape of a built tree.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TreeStats {
    pub nodes: usize,
    /// Slices of the table the walk starts with (1: no cut).
    pub cut_slices: usize,
    pub leaves: usize,
    /// Leaves holding more than one atom (the SIMD test takes the first, the rest are scanned).
    pub multi_leaves: usize,
    pub leaf_entries: usize,
    pub max_depth: usize,
    pub max_leaf: usize,
}

#[derive(Debug, Default)]
pub(super) struct Tree {
    /// Where a walk starts: `roots[value >> shift]`, the value on dimension `cut_dim`.
    cut: Cut,
    nodes: Box<[Node]>,
    /// One record per atom, in the atoms' order, and a last one that matches nothing.
    recs: Box<[Rec]>,
    /// The leaves' entries, each leaf's in a run: an atom's record index, and [`MORE`] on every
    /// entry but a leaf's last. An atom that several leaves hold is one record and an entry in
    /// each: four bytes a copy, not a record's 32.
    leaf: Box<[u32]>,
    /// The best (lowest) priority any atom here has; [`NO_MATCH`] when empty.
    pub(super) best: u32,
    /// Whether some leaf stopped at a covering atom, so atoms after it are missing there: a
    /// lookup that starts after that atom (`from`) must also search `dropped`.
    pub(super) truncated: bool,
    /// Indices (into the atoms it was built from) of the atoms some leaf dropped: a lookup
    /// from past a leaf's covering atom must find them elsewhere.
    pub(super) dropped: Vec<u32>,
    /// The atoms for a linear scan, when they are few (see `block.rs`).
    pub(super) block: Option<Block>,
    pub(super) stats: TreeStats,
}

struct Builder<'a> {
    atoms: &'a [Atom],
    boxes: Vec<Box5>,
    nodes: Vec<Node>,
    entries: Vec<u32>,
    stats: TreeStats,
    truncated: bool,
    scratch: Vec<u32>,
    /// Atoms some leaf dropped after a covering atom.
    dropped: Vec<bool>,
    /// Leaf entries the tree may hold before the build gives up.
    budget: usize,
    binth: usize,
}

impl Builder<'_> {
    fn covers(&self, i: u32, b: &Box5) -> bool {
        let a = &self.atoms[i as usize];
        a.vlan.is_none()
            && !a.needs_ports
            && self.boxes[i as usize]
                .iter()
                .zip(b)
                .all(|(r, x)| r.0 <= x.0 && x.1 <= r.1)
    }

    /// The split for `rules` inside `b`: per dimension, the median of the atoms' range ends
    /// inside the box; the dimension whose larger side plus copies is smallest wins, if some
    /// split leaves both sides smaller than `rules`.
    fn choose(&mut self, rules: &[u32], b: &Box5) -> Option<(usize, u32)> {
        // (cost, dimension, threshold)
        let mut choice: Option<(usize, usize, u32)> = None;
        for (dim, &(blo, bhi)) in b.iter().enumerate() {
            self.scratch.clear();
            for &i in rules {
                let (lo, hi) = self.boxes[i as usize][dim];
                if lo > blo {
                    self.scratch.push(lo - 1);
                }
                if hi < bhi {
                    self.scratch.push(hi);
                }
            }
            if self.scratch.is_empty() {
                continue;
            }
            let mid = self.scratch.len() / 2;
            let (_, &mut t, _) = self.scratch.select_nth_unstable(mid);
            let (mut left, mut right) = (0, 0);
            for &i in rules {
                let (lo, hi) = self.boxes[i as usize][dim];
                left += (lo <= t) as usize;
                right += (hi > t) as usize;
            }
            let worst = left.max(right);
            // The larger side, plus every copy the split makes: a balanced split that
            // replicates half the atoms is worse than a lopsided one that replicates none.
            // (Saturating: an atom with an empty range lands on neither side.)
            let cost = worst + (left + right).saturating_sub(rules.len());
            if worst < rules.len() && choice.is_none_or(|(c, _, _)| cost < c) {
                choice = Some((cost, dim, t));
            }
        }
        choice.map(|(_, dim, t)| (dim, t))
    }

    fn leaf(&mut self, at: usize, rules: &[u32], depth: usize) -> Result<(), OverBudget> {
        if self.entries.len() + rules.len() > self.budget {
            return Err(OverBudget);
        }
        let start = self.entries.len() as u32;
        if rules.is_empty() {
            // An empty leaf still has an entry, for the record after the atoms' own, which
            // matches nothing: the checks then need no test for emptiness.
            self.entries.push(self.atoms.len() as u32);
        }
        let last = rules.len().saturating_sub(1);
        self.entries.extend(
            rules
                .iter()
                .enumerate()
                .map(|(n, &i)| if n < last { i | MORE } else { i }),
        );
        self.nodes[at] = Node {
            thresh: start,
            meta: LEAF | (at as u32) << 3,
        };
        self.stats.max_leaf = self.stats.max_leaf.max(rules.len());
        self.stats.leaves += 1;
        // Atoms only: an empty leaf's no-match record is not a copy of anything.
        self.stats.leaf_entries += rules.len();
        self.stats.multi_leaves += (rules.len() > 1) as usize;
        self.stats.max_depth = self.stats.max_depth.max(depth);
        Ok(())
    }

    /// Builds the subtree for `rules` (sorted by priority, all intersecting `b`) into node `at`.
    fn build(
        &mut self,
        at: usize,
        mut rules: Vec<u32>,
        b: Box5,
        depth: usize,
    ) -> Result<(), OverBudget> {
        if let Some(c) = rules.iter().position(|&i| self.covers(i, &b)) {
            if c + 1 < rules.len() {
                self.truncated = true;
                for &i in &rules[c + 1..] {
                    self.dropped[i as usize] = true;
                }
                rules.truncate(c + 1);
            }
        }
        if rules.len() <= self.binth || depth >= MAX_DEPTH {
            return self.leaf(at, &rules, depth);
        }
        // Large nodes choose the split on a sample of their atoms (the threshold only has to
        // be a good one, not the exact median); the partition below is exact either way.
        let sampled: Vec<u32>;
        let pick = if rules.len() > 4 * SAMPLE {
            let step = rules.len() / SAMPLE;
            sampled = rules.iter().step_by(step).copied().collect();
            self.choose(&sampled, &b)
        } else {
            self.choose(&rules, &b)
        };
        let Some((dim, t)) = pick else {
            return self.leaf(at, &rules, depth);
        };
        let (left, right) = (
            side(&self.boxes, &rules, dim, t, true),
            side(&self.boxes, &rules, dim, t, false),
        );
        let (dim, t, left, right) = if left.len().max(right.len()) < rules.len() {
            (dim, t, left, right)
        } else {
            // The sample misled: choose on every atom.
            let Some((dim, t)) = self.choose(&rules, &b) else {
                return self.leaf(at, &rules, depth);
            };
            (
                dim,
                t,
                side(&self.boxes, &rules, dim, t, true),
                side(&self.boxes, &rules, dim, t, false),
            )
        };
        let first = self.nodes.len();
        if first + 2 >= MAX_NODES {
            // Child indices must fit the 29 bits of `meta`.
            return Err(OverBudget);
        }
        self.nodes.push(Node::default());
        self.nodes.push(Node::default());
        self.nodes[at] = Node {
            thresh: t,
            meta: dim as u32 | (first as u32) << 3,
        };
        drop(rules);
        let mut lb = b;
        lb[dim].1 = t;
        let mut rb = b;
        rb[dim].0 = t + 1;
        self.build(first, left, lb, depth + 1)?;
        self.build(first + 1, right, rb, depth + 1)
    }
}

/// A tree would hold more leaf entries than it was allowed.
#[derive(Debug)]
pub(super) struct OverBudget;

/// The first step of a walk, by table instead of by levels of nodes: the key's value on an
/// address dimension, shifted right, indexes the node the walk starts at. An address part's
/// atoms are narrow in that address (a /16 or longer), so cutting its top bits into equal
/// slices copies almost none of them, and one load replaces the several levels of splits that
/// would tell the slices apart. (HiCuts' equal-size cuts, at the root only, where they are
/// cheap.) The bits cut are the first ones below what all the atoms share: rules whose
/// addresses are all in 10.0.0.0/8 (a cluster's pod network) are cut on the bits after the 10.
/// Without a cut, `shift` is 32, `mask` 0 and `roots` is `[0]`: every walk starts at node 0.
#[derive(Debug)]
pub(super) struct Cut {
    pub(super) dim: usize,
    /// A value's slice is `(value >> shift) & mask`.
    pub(super) shift: u32,
    pub(super) mask: u32,
    /// `mask + 1` node indices.
    pub(super) roots: Box<[u32]>,
}

impl Default for Cut {
    fn default() -> Self {
        Cut {
            dim: 0,
            shift: 32,
            mask: 0,
            roots: Box::new([0]),
        }
    }
}

impl Cut {
    #[inline(always)]
    pub(super) fn root(&self, v: &[u32; 8]) -> u32 {
        self.root_of(v[self.dim])
    }

    /// The root for a key whose value on the cut's dimension is `value`.
    #[inline(always)]
    pub(super) fn root_of(&self, value: u32) -> u32 {
        self.roots[self.slice(value) as usize]
    }

    /// The slice `value` falls in.
    #[inline(always)]
    pub(super) fn slice(&self, value: u32) -> u32 {
        (u64::from(value) >> self.shift) as u32 & self.mask
    }
}

/// Where a cut's slices lie on one dimension: `bits` bits below the `skip` top bits that every
/// atom shares, which are `base`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slicing {
    dim: usize,
    skip: u32,
    bits: u32,
    base: u32,
}

impl Slicing {
    fn shift(&self) -> u32 {
        32 - self.skip - self.bits
    }

    fn mask(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// The slice of `value`, which shares the top `skip` bits.
    fn of(&self, value: u32) -> usize {
        ((value >> self.shift()) & self.mask()) as usize
    }

    /// The values of slices `s..e`.
    fn span(&self, s: usize, e: usize) -> (u32, u32) {
        let lo = u64::from(self.base) | (s as u64) << self.shift();
        let hi = u64::from(self.base) | (((e as u64) << self.shift()) - 1);
        (lo as u32, hi as u32)
    }
}

/// The most bits a cut takes (a table of 4096 roots), and the fewest slices worth one.
const CUT_MAX_BITS: u32 = 12;
const CUT_MIN_SLICES: usize = 4;

/// The cut for atoms with these boxes, if one pays: on the source or destination address, the
/// number of top bits that tells the most atoms apart while copying at most one atom in eight
/// and keeping the table at most two roots per atom. Where no such cut exists (a tree that
/// merged source- and destination-specific parts is wide in both), one that copies each atom
/// up to [`CUT_DEAR_COPIES`] times instead: without a cut every walk starts at the one root.
/// `bounds` is the atoms' bounding box.
fn choose_cut(boxes: &[Box5], bounds: &Box5) -> Option<Slicing> {
    let n = boxes.len();
    cut_within(boxes, bounds, n + n / 8).or_else(|| cut_within(boxes, bounds, n * CUT_DEAR_COPIES))
}

/// Atoms may be copied into more than one slice of a cut only this many times each, where no
/// cheaper cut exists (see [`choose_cut`]). Measured on ipc1_1k, whose merged tree has no cheap
/// cut: 32 slices, 228 -> 248 KiB, walks of 14 levels instead of 17, 1.08-1.11 times faster
/// (in-process A/B). No other shared set's trees change.
const CUT_DEAR_COPIES: usize = 4;

/// [`choose_cut`] with at most `limit` copies in all.
fn cut_within(boxes: &[Box5], bounds: &Box5, limit: usize) -> Option<Slicing> {
    let n = boxes.len();
    let mut best: Option<(usize, Slicing)> = None;
    for dim in 0..2 {
        let (lo, hi) = bounds[dim];
        // The top bits every atom shares on this dimension cut nothing apart; where they share
        // the whole value, nothing does.
        let skip = (lo ^ hi).leading_zeros();
        if skip >= 32 {
            continue;
        }
        let base = lo & !(u32::MAX.checked_shr(skip).unwrap_or(0));
        for bits in 4..=CUT_MAX_BITS.min(32 - skip) {
            if (1usize << bits) > 2 * n {
                break;
            }
            let cut = Slicing {
                dim,
                skip,
                bits,
                base,
            };
            let mut used = vec![false; 1 << bits];
            let mut copies = 0usize;
            for b in boxes {
                let (lo, hi) = (cut.of(b[dim].0), cut.of(b[dim].1));
                copies += hi - lo + 1;
                if copies > limit {
                    break;
                }
                for u in &mut used[lo..=hi] {
                    *u = true;
                }
            }
            if copies > limit {
                continue;
            }
            let slices = used.iter().filter(|&&u| u).count();
            if slices >= CUT_MIN_SLICES && best.is_none_or(|(s, _)| slices > s) {
                best = Some((slices, cut));
            }
        }
    }
    best.map(|(_, cut)| cut)
}

impl Tree {
    /// Builds a tree over IPv4 atoms of one direction, sorted by priority, unless it would hold
    /// more than `budget` leaf entries (atoms counted once per leaf they land in).
    pub(super) fn build(atoms: &[Atom], budget: usize) -> Result<Tree, OverBudget> {
        let mut b = Builder {
            binth: BINTH,
            budget,
            atoms,
            boxes: atoms.iter().map(ranges).collect(),
            nodes: Vec::new(),
            entries: Vec::new(),
            stats: TreeStats::default(),
            truncated: false,
            scratch: Vec::new(),
            dropped: vec![false; atoms.len()],
        };
        // The root's box is the atoms' bounding box, not the whole space: a dimension on which
        // every atom has the same range (the protocol, where every rule is TCP) then offers no
        // split, and no node spends time choosing one there. A key outside the box matches no
        // atom, and one inside a leaf's box is what its atoms are tested on, so an atom that
        // covers a leaf's (smaller) box still makes every later atom there unneeded.
        let mut all = [(u32::MAX, 0); 5];
        for bx in &b.boxes {
            for (to, r) in all.iter_mut().zip(bx) {
                *to = (to.0.min(r.0), to.1.max(r.1));
            }
        }
        if b.boxes.is_empty() {
            all = [
                (0, u32::MAX),
                (0, u32::MAX),
                (0, 65535),
                (0, 65535),
                (0, 255),
            ];
        }
        let cut = match choose_cut(&b.boxes, &all) {
            None => {
                b.nodes.push(Node::default());
                b.build(0, (0..atoms.len() as u32).collect(), all, 0)?;
                Cut::default()
            }
            Some(cut) => {
                let dim = cut.dim;
                let mut slices: Vec<Vec<u32>> = vec![Vec::new(); 1 << cut.bits];
                for (i, bx) in b.boxes.iter().enumerate() {
                    for s in &mut slices[cut.of(bx[dim].0)..=cut.of(bx[dim].1)] {
                        s.push(i as u32);
                    }
                }
                let mut roots = vec![0u32; slices.len()];
                let mut empty: Option<u32> = None;
                let mut s = 0;
                while s < slices.len() {
                    // A run of slices with the same atoms shares one subtree, built over the
                    // run's whole range (a leaf stops at an atom covering that range).
                    let mut e = s + 1;
                    while e < slices.len() && slices[e] == slices[s] {
                        e += 1;
                    }
                    let none = slices[s].is_empty();
                    let root = match (none, empty) {
                        (true, Some(r)) => r,
                        _ => {
                            let at = b.nodes.len();
                            if at + 1 >= MAX_NODES {
                                // Node indices must fit the 29 bits of `meta`.
                                return Err(OverBudget);
                            }
                            b.nodes.push(Node::default());
                            let mut bx = all;
                            bx[dim] = cut.span(s, e);
                            b.build(at, std::mem::take(&mut slices[s]), bx, 0)?;
                            if none {
                                empty = Some(at as u32);
                            }
                            at as u32
                        }
                    };
                    roots[s..e].fill(root);
                    s = e;
                }
                Cut {
                    dim,
                    shift: cut.shift(),
                    mask: cut.mask(),
                    roots: roots.into_boxed_slice(),
                }
            }
        };
        let mut stats = b.stats;
        stats.nodes = b.nodes.len();
        stats.cut_slices = cut.roots.len();
        Ok(Tree {
            cut,
            nodes: b.nodes.into_boxed_slice(),
            recs: atoms
                .iter()
                .map(Rec::from_atom)
                .chain([Rec::nothing()])
                .collect(),
            leaf: b.entries.into_boxed_slice(),
            best: atoms.first().map_or(NO_MATCH, |a| a.prio),
            truncated: b.truncated,
            dropped: (0..atoms.len() as u32)
                .filter(|&i| b.dropped[i as usize])
                .collect(),
            block: Block::build(atoms),
            stats,
        })
    }

    /// How many leaves `atoms` would be copied into if they were added to this tree as it is
    /// (each atom once per leaf whose box it meets), counting up to `cap`: what merging them
    /// in would cost at least, found without building anything.
    pub(super) fn copies(&self, atoms: &[Atom], cap: usize) -> usize {
        let mut count = 0;
        let mut stack: Vec<u32> = Vec::new();
        for a in atoms {
            let want = ranges(a);
            // The roots of the slices the atom spans, each once.
            // The slices the atom's range spans. An atom outside the bits every atom of the
            // tree shares (a merge candidate) may span a whole cycle of slices, or wrap.
            let (a, z) = want[self.cut.dim];
            let (lo, hi) = (self.cut.slice(a), self.cut.slice(z));
            let period = (u64::from(self.cut.mask) + 1) << self.cut.shift;
            let (lo, hi) = if u64::from(z - a) + 1 >= period || lo > hi {
                (0, self.cut.mask)
            } else {
                (lo, hi)
            };
            let mut last = None;
            for slice in lo..=hi {
                let root = self.cut.roots[slice as usize];
                if last != Some(root) {
                    stack.push(root);
                    last = Some(root);
                }
            }
            while let Some(at) = stack.pop() {
                let n = self.nodes[at as usize];
                if n.meta & 7 == LEAF {
                    count += 1;
                    if count >= cap {
                        return cap;
                    }
                    continue;
                }
                let (d, t, first) = ((n.meta & 7) as usize, n.thresh, n.meta >> 3);
                if want[d].0 <= t {
                    stack.push(first);
                }
                if want[d].1 > t {
                    stack.push(first + 1);
                }
            }
        }
        count
    }

    /// Where walks start, for the SIMD walk.
    pub(super) fn cut(&self) -> &Cut {
        &self.cut
    }

    /// The nodes, for the SIMD walk.
    pub(super) fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The atoms' records, for the SIMD check.
    pub(super) fn recs(&self) -> &[Rec] {
        &self.recs
    }

    /// The leaves' entries, for the SIMD check.
    pub(super) fn leaf(&self) -> &[u32] {
        &self.leaf
    }

    pub(super) fn memory(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.cut.roots.len() * std::mem::size_of::<u32>()
            + self.nodes.len() * std::mem::size_of::<Node>()
            + self.recs.len() * std::mem::size_of::<Rec>()
            + self.leaf.len() * std::mem::size_of::<u32>()
            + self.block.as_ref().map_or(0, Block::memory)
    }

    /// The key's value on each dimension (slots 0-4), 0 in slot 5 (a leaf "splits" on it), and
    /// the VLAN and whether the ports are known in slots 6 and 7, for the SIMD check.
    #[inline(always)]
    pub(super) fn values(k: &FlowKey) -> [u32; 8] {
        [
            k.src as u32,
            k.dst as u32,
            k.sport as u32,
            k.dport as u32,
            k.proto as u32,
            0,
            k.vlan as u32,
            k.ports_known as u32,
        ]
    }

    /// The first atom of leaf `at` at or after `from` that matches, if it beats `best`; else
    /// `best`. Leaves are short; each record is tested without a branch on its outcome.
    #[inline(always)]
    fn scan(&self, at: usize, k: &FlowKey, from: u32, best: u32) -> u32 {
        let r = self.nodes[at].thresh as usize;
        scan_records(&self.recs, &self.leaf, r, &Self::values(k), from, best)
    }

    /// First match at or after `from` among the atoms the key's leaf holds, if it beats `best`;
    /// else `best`. For `from` past the leaf's covering atom, the atoms the leaf dropped
    /// (`dropped`) must be searched too.
    #[inline]
    pub(super) fn first_match(&self, k: &FlowKey, from: u32, best: u32) -> u32 {
        let v = Self::values(k);
        let mut at = self.cut.root(&v) as usize;
        let mut n = self.nodes[at];
        while n.meta & 7 != LEAF {
            at = ((n.meta >> 3) + (v[(n.meta & 7) as usize] > n.thresh) as u32) as usize;
            n = self.nodes[at];
        }
        self.scan(at, k, from, best)
    }

    /// Walks the group's packets (positions `0..n` of `keys`, `best` and `members`; at most
    /// [`GROUP`]) down the tree together, a level per round for all of them (a packet at its
    /// leaf stays there) until none moved, then tests their leaves: `best[p]` becomes the first
    /// match from 0 if it beats `best[p]`. Packets whose `best` already beats every atom here
    /// need nothing from this tree.
    #[inline]
    pub(super) fn classify_group(
        &self,
        mode: super::Walk,
        keys: &Keys,
        n: usize,
        flows: &[FlowKey],
        members: &[u8],
        best: &mut [u32; GROUP],
    ) {
        let n = n.min(GROUP);
        // The SIMD walk also tests the leaves, and keeps `best` itself.
        if super::simd::walk(mode, self, keys, n, best) {
            return;
        }
        let mut at = [0u32; GROUP];
        let mut cur = [Node::default(); GROUP];
        for p in 0..n {
            at[p] = self.cut.root_of(keys.0[self.cut.dim][p]);
            cur[p] = self.nodes[at[p] as usize];
        }
        loop {
            let mut moving = false;
            for p in 0..n {
                let nd = cur[p];
                let val = keys.0[(nd.meta & 7) as usize][p];
                let c = (nd.meta >> 3) + (val > nd.thresh) as u32;
                moving |= nd.meta & 7 != LEAF;
                at[p] = c;
                cur[p] = self.nodes[c as usize];
            }
            if !moving {
                break;
            }
        }
        // Start loading every packet's leaf before scanning any: the scans' first reads then
        // overlap instead of each waiting in turn.
        for &a in &at[..n] {
            let entry = self.leaf.get(self.nodes[a as usize].thresh as usize);
            if let Some(e) = entry.and_then(|&e| self.recs.get((e & ENTRY) as usize)) {
                super::simd::prefetch(e);
            }
        }
        for p in 0..n {
            if best[p] > self.best {
                best[p] = self.scan(at[p] as usize, &flows[members[p] as usize], 0, best[p]);
            }
        }
    }
}

/// A group's key values by slot (the slots of [`Tree::values`]), structure of arrays: `0[s][p]`
/// is packet `p`'s value in slot `s`, so the SIMD walks load a chunk's values on one dimension
/// with one aligned load. Positions past the group's packets, and slot 5 (what a leaf's
/// dimension reads), stay 0.
#[repr(C, align(64))]
pub(super) struct Keys(pub(super) [[u32; GROUP]; 8]);

impl Keys {
    /// Every value 0.
    #[inline]
    pub(super) fn zeroed() -> Keys {
        Keys([[0; GROUP]; 8])
    }

    /// The priority of packet `p`'s first match among the records of a leaf's entries, from
    /// entry `r` to the leaf's last, if it beats `best`; else `best`. The SIMD tests finish a
    /// chunk's last few lanes with this: a gather costs the same for one lane as for all of
    /// them.
    #[inline]
    pub(super) fn scan(&self, recs: &[Rec], leaf: &[u32], r: usize, p: usize, best: u32) -> u32 {
        scan_records(recs, leaf, r, &self.values(p), 0, best)
    }

    /// Packet `p`'s values (the slots of [`Tree::values`]).
    #[inline(always)]
    pub(super) fn values(&self, p: usize) -> [u32; 8] {
        std::array::from_fn(|s| self.0[s][p])
    }

    /// Puts `k`'s values at position `p`.
    #[inline(always)]
    pub(super) fn set(&mut self, p: usize, k: &FlowKey) {
        // Slot 5 stays 0 (see `Keys`): seven stores, not eight.
        let v = Tree::values(k);
        for s in [0, 1, 2, 3, 4, 6, 7] {
            self.0[s][p] = v[s];
        }
    }
}
