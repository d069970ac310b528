//! Packet classification: given a [`FlowKey`], find the first rule (lowest index) that matches,
//! optionally starting from a given index (how Pass, Log and audit rules continue).
//!
//! - [`Linear`] is the reference oracle: it evaluates [`Match::matches`] rule by rule. Tests and
//!   `explain` use it; the datapath never does.
//! - [`Forest`] is the datapath classifier: range-splitting decision trees (HyperSplit family)
//!   over partitions of the IPv4 atoms, walked a burst at a time, with tuple-space tables for
//!   the atoms a tree would copy too often. See `forest.rs` and `tree.rs`.
//! - [`TupleSpace`] is a priority-sorted tuple-space search in the TupleMerge family
//!   (`tuple.rs`): the forest's IPv6 and continuation path, and a classifier of its own.
//!
//! Both are built from the same `&[Match]` slice (index = priority), so they can be compared on
//! any input.

mod block;
mod forest;
mod linear;
mod simd;
mod tree;
mod tuple;

pub use forest::{Forest, ForestStats};
pub use linear::Linear;
pub use simd::{detected as simd_walk, supported as simd_supported, Walk};
pub use tree::TreeStats;
pub use tuple::{TupleSpace, TupleStats};

use crate::key::FlowKey;
use crate::rule::{Match, PortRange, Prefix};

/// Returned by [`Classifier::first_match`] when no rule at or after `from` matches.
pub const NO_MATCH: u32 = u32::MAX;

/// A first-match packet classifier over an ordered list of matches.
pub trait Classifier: Send + Sync {
    /// The index of the first match at or after index `from`, or [`NO_MATCH`].
    fn first_match(&self, key: &FlowKey, from: u32) -> u32;

    /// Classifies a burst: `out[i] = first_match(&keys[i], 0)`.
    fn classify_batch(&self, keys: &[FlowKey], out: &mut [u32]) {
        for (k, o) in keys.iter().zip(out.iter_mut()) {
            *o = self.first_match(k, 0);
        }
    }

    /// Bytes of memory the structure holds.
    fn memory_bytes(&self) -> usize;
}

/// One conjunctive match over single prefixes: what a [`Match`] with address sets lowers to.
/// A `Match` becomes the cross product of its source and destination prefixes (after removing
/// exceptions), per address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Atom {
    pub prio: u32,
    pub dir: u8,
    pub src: Prefix,
    pub dst: Prefix,
    pub proto: Option<u8>,
    pub sport: PortRange,
    pub dport: PortRange,
    pub vlan: Option<u16>,
    pub needs_ports: bool,
}

/// Lowers matches into atoms. A match whose address sets leave nothing for a family contributes
/// no atom for that family.
pub fn lower<'a>(matches: impl IntoIterator<Item = &'a Match>) -> Vec<Atom> {
    let matches = matches.into_iter();
    let mut atoms = Vec::with_capacity(matches.size_hint().0);
    for (prio, m) in matches.enumerate() {
        for v6 in [false, true] {
            let srcs = m.src.lower(v6);
            let dsts = m.dst.lower(v6);
            for s in &srcs {
                for d in &dsts {
                    atoms.push(Atom {
                        prio: prio as u32,
                        dir: m.direction as u8,
                        src: *s,
                        dst: *d,
                        proto: m.proto,
                        sport: m.sport,
                        dport: m.dport,
                        vlan: m.vlan,
                        needs_ports: m.needs_ports(),
                    });
                }
            }
        }
    }
    atoms
}

#[cfg(test)]
mod tests;
