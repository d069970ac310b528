//! Priority-sorted tuple-space search, in the TupleMerge family.
//!
//! Atoms are partitioned by direction and address family into *spaces*. Within a space, each
//! atom is placed in the *tuple* named by its (source, destination) prefix lengths rounded down
//! to a coarse grid; a tuple is a hash table keyed by the key's addresses masked to the tuple's
//! lengths. A bucket holds every atom whose prefixes fall under that masked pair, sorted by
//! priority, and is scanned linearly (ports, protocol, VLAN and the exact prefix lengths are
//! checked there). Rounding lengths down is what TupleMerge adds to plain tuple-space search: far
//! fewer tuples to probe, at the cost of slightly longer buckets.
//!
//! Lookup visits tuples in order of the best priority they hold and stops as soon as that best
//! cannot beat the match already found, so a hit on a high-priority rule costs one or two probes.
//!
//! References: Srinivasan, Suri, Varghese, "Packet classification using tuple space search"
//! (SIGCOMM '99); Daly, Bruschi, Linguaglossa, Pontarelli, Rossi, Tollet, Torng, Yourstone,
//! "TupleMerge: fast software packet processing for online packet classification" (ToN 2019).

use std::collections::HashMap;

use super::{lower, Atom, Classifier, NO_MATCH};
use crate::key::FlowKey;
use crate::rule::{mask, Match};

const ANY_PROTO: u16 = 0x100;
const ANY_VLAN: u32 = 0x1_0000;

/// Round a prefix length down to the tuple grid. The grid trades probes (fewer tuples) against
/// bucket length (more atoms sharing a masked pair). Measured on the ClassBench sets with
/// `portcullis-bench classify`: IPv4 steps of 8 beat steps of 4 (1.3-1.6x more lookups/s, fewer
/// tuples) and steps of 16 at the short end (longer buckets on fw1 and acl1_10k).
#[inline]
fn round(len: u8, v6: bool) -> u8 {
    if v6 {
        match len {
            0..=15 => 0,
            16..=31 => 16,
            32..=47 => 32,
            48..=63 => 48,
            64..=95 => 64,
            96..=127 => 96,
            _ => 128,
        }
    } else {
        match len {
            0..=7 => 0,
            8..=15 => 8,
            16..=23 => 16,
            24..=31 => 24,
            _ => 32,
        }
    }
}

/// The 64-bit finaliser of MurmurHash3: every input bit reaches every output bit, so the low
/// bits that pick a slot depend on the whole address pair. (A bare multiply does not: the low
/// bits of a product depend only on the low bits of its input, so pairs that differ only in the
/// high source bits, such as /24 sources with a wildcard destination, all hashed to one slot and
/// turned the table into a linear scan.)
#[inline(always)]
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// An address width: IPv4 spaces store `u32`, IPv6 spaces `u128`, so an IPv4 entry is 40
/// bytes instead of 96 and more of a bucket fits in a cache line.
pub(super) trait Addr:
    Copy + Eq + Default + std::fmt::Debug + std::ops::BitAnd<Output = Self>
{
    fn from_bits(b: u128) -> Self;
    fn hash_pair(src: Self, dst: Self) -> u64;
}

impl Addr for u32 {
    #[inline(always)]
    fn from_bits(b: u128) -> u32 {
        b as u32
    }
    #[inline(always)]
    fn hash_pair(src: u32, dst: u32) -> u64 {
        mix(((src as u64) << 32) | dst as u64)
    }
}

impl Addr for u128 {
    #[inline(always)]
    fn from_bits(b: u128) -> u128 {
        b
    }
    #[inline(always)]
    fn hash_pair(src: u128, dst: u128) -> u64 {
        let a = (src as u64) ^ ((src >> 64) as u64).rotate_left(23);
        let b = (dst as u64) ^ ((dst >> 64) as u64).rotate_left(41);
        mix(a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Entry<A> {
    src: A,
    src_mask: A,
    dst: A,
    dst_mask: A,
    pub(super) prio: u32,
    vlan: u32,
    proto: u16,
    sport_lo: u16,
    sport_hi: u16,
    dport_lo: u16,
    dport_hi: u16,
    needs_ports: bool,
}

impl<A: Addr> Entry<A> {
    pub(super) fn from_atom(a: &Atom) -> Entry<A> {
        Entry {
            src: A::from_bits(a.src.bits),
            src_mask: A::from_bits(mask(a.src.v6, a.src.len)),
            dst: A::from_bits(a.dst.bits),
            dst_mask: A::from_bits(mask(a.dst.v6, a.dst.len)),
            prio: a.prio,
            vlan: a.vlan.map_or(ANY_VLAN, u32::from),
            proto: a.proto.map_or(ANY_PROTO, u16::from),
            sport_lo: a.sport.lo,
            sport_hi: a.sport.hi,
            dport_lo: a.dport.lo,
            dport_hi: a.dport.hi,
            needs_ports: a.needs_ports,
        }
    }

    #[inline(always)]
    pub(super) fn matches(&self, src: A, dst: A, k: &FlowKey) -> bool {
        // `&`, not `&&`: every test is cheap, and one unpredictable branch per entry costs more
        // than evaluating them all.
        ((src & self.src_mask) == self.src)
            & ((dst & self.dst_mask) == self.dst)
            & ((self.proto == ANY_PROTO) | (self.proto == k.proto as u16))
            & (self.sport_lo <= k.sport)
            & (k.sport <= self.sport_hi)
            & (self.dport_lo <= k.dport)
            & (k.dport <= self.dport_hi)
            & ((self.vlan == ANY_VLAN) | (self.vlan == k.vlan as u32))
            & (k.ports_known | !self.needs_ports)
    }
}

/// A hash-table slot: the masked address pair and the bucket's range in `entries`.
#[derive(Debug, Clone, Copy, Default)]
struct Slot<A> {
    src: A,
    dst: A,
    start: u32,
    /// 0 marks an empty slot.
    len: u32,
}

#[derive(Debug)]
pub(super) struct Tuple<A> {
    src_mask: A,
    dst_mask: A,
    /// The best (lowest) priority of any entry here.
    pub(super) best: u32,
    slot_mask: usize,
    slots: Box<[Slot<A>]>,
    entries: Box<[Entry<A>]>,
}

impl<A: Addr> Tuple<A> {
    fn build(src_mask: A, dst_mask: A, mut buckets: Vec<((u128, u128), Vec<Atom>)>) -> Tuple<A> {
        let cap = (buckets.len() * 2).next_power_of_two().max(2);
        let mut slots = vec![Slot::default(); cap].into_boxed_slice();
        let mut entries = Vec::new();
        let mut best = u32::MAX;
        buckets.sort_by_key(|(_, atoms)| atoms[0].prio);
        for ((s, d), mut atoms) in buckets {
            atoms.sort_by_key(|a| a.prio);
            atoms.dedup();
            best = best.min(atoms[0].prio);
            let start = entries.len() as u32;
            entries.extend(atoms.iter().map(Entry::from_atom));
            let (s, d) = (A::from_bits(s), A::from_bits(d));
            let mut i = A::hash_pair(s, d) as usize & (cap - 1);
            while slots[i].len != 0 {
                i = (i + 1) & (cap - 1);
            }
            slots[i] = Slot {
                src: s,
                dst: d,
                start,
                len: atoms.len() as u32,
            };
        }
        Tuple {
            src_mask,
            dst_mask,
            best,
            slot_mask: cap - 1,
            slots,
            entries: entries.into_boxed_slice(),
        }
    }

    /// The slot a masked address pair hashes to.
    #[inline(always)]
    fn home(&self, src: A, dst: A) -> usize {
        A::hash_pair(src & self.src_mask, dst & self.dst_mask) as usize & self.slot_mask
    }

    /// The bucket (start, length) for an address pair, given the content of its home slot; a
    /// pair that collided further on is found by probing on from there.
    #[inline(always)]
    fn resolve_range(&self, home: Slot<A>, src: A, dst: A) -> (u32, u32) {
        let s = src & self.src_mask;
        let d = dst & self.dst_mask;
        if home.len == 0 || (home.src == s && home.dst == d) {
            return (home.start, home.len);
        }
        let mut i = A::hash_pair(s, d) as usize & self.slot_mask;
        loop {
            i = (i + 1) & self.slot_mask;
            let slot = &self.slots[i];
            if slot.len == 0 || (slot.src == s && slot.dst == d) {
                return (slot.start, slot.len);
            }
        }
    }

    #[inline(always)]
    fn resolve(&self, home: Slot<A>, src: A, dst: A) -> &[Entry<A>] {
        let (start, len) = self.resolve_range(home, src, dst);
        &self.entries[start as usize..(start + len) as usize]
    }

    #[inline(always)]
    fn bucket(&self, src: A, dst: A) -> &[Entry<A>] {
        self.resolve(self.slots[self.home(src, dst)], src, dst)
    }

    fn memory(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.slots.len() * std::mem::size_of::<Slot<A>>()
            + self.entries.len() * std::mem::size_of::<Entry<A>>()
    }
}

/// The most tuples whose slots a single lookup loads up front; a space with more loads the rest
/// as it reaches them.
const AHEAD: usize = 32;

/// First match at or after `from` in one space (tuples sorted by their best priority).
///
/// The slots of every tuple are loaded first, before any is used: the loads do not depend on each
/// other, so their cache misses overlap instead of queueing one probe behind the last. Only then
/// are the buckets walked in priority order, stopping as soon as no later tuple can win.
/// `best` is a match already found elsewhere: only a better one is looked for, and it is
/// returned when there is none.
#[inline(always)]
pub(super) fn lookup<A: Addr>(
    space: &[Tuple<A>],
    src: A,
    dst: A,
    key: &FlowKey,
    from: u32,
    mut best: u32,
) -> u32 {
    let mut slots = [Slot::<A>::default(); AHEAD];
    for (t, s) in space.iter().zip(slots.iter_mut()) {
        if t.best >= best {
            break;
        }
        *s = t.slots[t.home(src, dst)];
    }
    for (j, t) in space.iter().enumerate() {
        if t.best >= best {
            break;
        }
        let bucket = match slots.get(j) {
            Some(s) => t.resolve(*s, src, dst),
            None => t.bucket(src, dst),
        };
        for e in bucket {
            if e.prio >= best {
                break;
            }
            if e.prio >= from && e.matches(src, dst, key) {
                best = e.prio;
                break;
            }
        }
    }
    best
}

/// Shape of a built [`TupleSpace`], for `check` and the benchmarks.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TupleStats {
    pub atoms: usize,
    pub tuples: usize,
    pub buckets: usize,
    pub max_bucket: usize,
}

type Buckets = HashMap<(u128, u128), Vec<Atom>>;

fn build_space<A: Addr>(
    tuples: HashMap<(u8, u8), Buckets>,
    v6: bool,
    stats: &mut TupleStats,
) -> Vec<Tuple<A>> {
    let mut built: Vec<Tuple<A>> = tuples
        .into_iter()
        .map(|((sl, dl), buckets)| {
            stats.buckets += buckets.len();
            stats.max_bucket = stats
                .max_bucket
                .max(buckets.values().map(Vec::len).max().unwrap_or(0));
            Tuple::build(
                A::from_bits(mask(v6, sl)),
                A::from_bits(mask(v6, dl)),
                buckets.into_iter().collect(),
            )
        })
        .collect();
    built.sort_by_key(|t| t.best);
    stats.tuples += built.len();
    built
}

/// Tuple tables over IPv4 atoms of one direction: what the forest uses for atoms whose tree
/// would replicate too much.
pub(super) fn v4_tables(atoms: &[Atom], stats: &mut TupleStats) -> Vec<Tuple<u32>> {
    let mut grouped: HashMap<(u8, u8), Buckets> = HashMap::new();
    for a in atoms {
        let (sl, dl) = (round(a.src.len, false), round(a.dst.len, false));
        let (sm, dm) = (mask(false, sl), mask(false, dl));
        grouped
            .entry((sl, dl))
            .or_default()
            .entry((a.src.bits & sm, a.dst.bits & dm))
            .or_default()
            .push(*a);
    }
    build_space(grouped, false, stats)
}

/// Bytes held by a list of tuple tables.
pub(super) fn tables_memory<A: Addr>(tables: &[Tuple<A>]) -> usize {
    tables.iter().map(Tuple::memory).sum()
}

/// A tuple-space classifier over every atom. The datapath's [`super::Forest`] uses it for IPv6
/// and for lookups that continue past a rule; it is also a classifier of its own, for the
/// benchmarks. Immutable once built; lookups take `&self`.
#[derive(Debug)]
pub struct TupleSpace {
    /// Indexed by direction.
    v4: [Vec<Tuple<u32>>; 2],
    v6: [Vec<Tuple<u128>>; 2],
    stats: TupleStats,
}

impl TupleSpace {
    pub fn build(matches: &[Match]) -> TupleSpace {
        Self::from_atoms(&lower(matches))
    }

    pub(crate) fn from_atoms(atoms: &[Atom]) -> TupleSpace {
        let mut grouped: [HashMap<(u8, u8), Buckets>; 4] = Default::default();
        for a in atoms {
            let v6 = a.src.v6;
            let (sl, dl) = (round(a.src.len, v6), round(a.dst.len, v6));
            let (sm, dm) = (mask(v6, sl), mask(v6, dl));
            grouped[a.dir as usize * 2 + v6 as usize]
                .entry((sl, dl))
                .or_default()
                .entry((a.src.bits & sm, a.dst.bits & dm))
                .or_default()
                .push(*a);
        }
        let mut stats = TupleStats {
            atoms: atoms.len(),
            ..TupleStats::default()
        };
        let [i4, i6, e4, e6] = grouped;
        TupleSpace {
            v4: [
                build_space(i4, false, &mut stats),
                build_space(e4, false, &mut stats),
            ],
            v6: [
                build_space(i6, true, &mut stats),
                build_space(e6, true, &mut stats),
            ],
            stats,
        }
    }

    pub fn stats(&self) -> TupleStats {
        self.stats
    }
}

impl Classifier for TupleSpace {
    #[inline]
    fn first_match(&self, key: &FlowKey, from: u32) -> u32 {
        let dir = key.dir as usize & 1;
        if key.v6 {
            lookup(&self.v6[dir], key.src, key.dst, key, from, NO_MATCH)
        } else {
            lookup(
                &self.v4[dir],
                key.src as u32,
                key.dst as u32,
                key,
                from,
                NO_MATCH,
            )
        }
    }

    fn memory_bytes(&self) -> usize {
        self.v4.iter().flatten().map(Tuple::memory).sum::<usize>()
            + self.v6.iter().flatten().map(Tuple::memory).sum::<usize>()
    }
}
