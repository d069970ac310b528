//! The tree walk on 16 packets at once with AVX-512, or 8 with AVX2, chosen at run time by what
//! the CPU has.
//! This module is the policy crate's only unsafe code: gathers read through raw pointers, and
//! [`prefetch`] takes one.
//!
//! A round loads each lane's node with two 8-lane gathers, takes the key's value on the node's
//! dimension (AVX-512: blended from the chunk's five key vectors, which are loaded once; AVX2:
//! with a third gather, which measured faster there than blends), and moves every lane to its
//! child with one unsigned compare and a masked add. A leaf's child is itself, so lanes that
//! arrived early keep stepping in place until the last one arrives. The result is the same leaf
//! the scalar walk finds; the proptest and the ClassBench tests run both.
//!
//! The leaf test gathers the six fields every record needs (addresses, ports, priority, meta;
//! AVX-512 as three 64-bit pairs, half the gathered elements of 32-bit reads, which measured
//! 8-25 % faster there and no different on AVX2), and a record's VLAN only in the rare rounds
//! where some lane's record tests one: three gathers of pairs instead of four measured 1.02-1.06
//! times faster on AVX-512. A gather costs the same however few lanes it reads, so the last
//! [`TAIL`] lanes of an AVX-512 test finish scalar.
//!
//! Around the walk: [`transpose`] writes a burst's keys into the key block with five gathers per
//! 16 (or 8) keys, and [`scan_block`] tests one packet against a row of 16 (or 8) atoms of a
//! small tree's block (`block.rs`) with aligned loads and no gather.

#![allow(unsafe_code)]

use super::block::{self, Block};
use super::tree::{Keys, Rec, Tree, GROUP, LEAF};
use crate::key::FlowKey;

/// Asks the CPU to start loading the cache line holding `r`, so a later read finds it there.
/// A hint only: it changes no value and never faults.
#[inline(always)]
pub(super) fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing into the program and cannot fault; `r` is a live
    // reference in any case. SSE, which `_mm_prefetch` needs, is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (r as *const T).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// The widest walk this CPU runs (detection is cached by the standard library).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// 16 lanes, AVX-512F.
    Avx512,
    /// 8 lanes, AVX2.
    Avx2,
    /// One packet at a time.
    Scalar,
}

impl Walk {
    pub fn name(self) -> &'static str {
        match self {
            Walk::Avx512 => "avx512",
            Walk::Avx2 => "avx2",
            Walk::Scalar => "scalar",
        }
    }
}

/// Which walk [`walk`] uses here. `PORTCULLIS_CLASSIFIER_SIMD=avx2|scalar` caps it (read once),
/// so one machine can measure every path.
pub fn detected() -> Walk {
    static WALK: std::sync::OnceLock<Walk> = std::sync::OnceLock::new();
    *WALK.get_or_init(|| {
        let cap = std::env::var("PORTCULLIS_CLASSIFIER_SIMD").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if (cap.is_empty() || cap == "avx512") && std::arch::is_x86_feature_detected!("avx512f")
            {
                return Walk::Avx512;
            }
            if cap != "scalar" && std::arch::is_x86_feature_detected!("avx2") {
                return Walk::Avx2;
            }
        }
        let _ = cap;
        Walk::Scalar
    })
}

/// Whether this CPU runs `mode`.
pub fn supported(mode: Walk) -> bool {
    match mode {
        #[cfg(target_arch = "x86_64")]
        Walk::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
        #[cfg(target_arch = "x86_64")]
        Walk::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
        Walk::Scalar => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Walks the group's packets (positions `0..n` of `keys`) from the root of `tree` to their
/// leaves and tests their leaves' records, with the SIMD walk `mode`: `best[p]` becomes the
/// first match there if it beats `best[p]` (packets whose `best` beats every atom of the tree
/// are not tested). Returns false, having done nothing, for [`Walk::Scalar`] or a mode this CPU
/// lacks: the caller walks them itself.
#[inline]
pub(super) fn walk(
    mode: Walk,
    tree: &Tree,
    keys: &Keys,
    n: usize,
    best: &mut [u32; GROUP],
) -> bool {
    // Taking a built `Tree`, not a slice of nodes, is what makes this safe to call: only
    // `Tree::build` makes nodes, leaf entries and records, and it keeps every child index in
    // bounds, every path ending at a leaf, every leaf's first entry in bounds, and every entry's
    // record index in bounds (an empty leaf gets an entry for a record that matches nothing).
    // A `Tree::default()` has no nodes, and is refused here.
    if !supported(mode)
        || tree.nodes().is_empty()
        || tree.recs().is_empty()
        || tree.leaf().is_empty()
        || n > GROUP
    {
        return false;
    }
    match mode {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (`supported`). The walk reads `nodes` only at indices
        // taken from the tree itself, which `Tree::build` keeps in bounds (a child index is
        // always a pushed node, and the node count stays below 2^29 so it fits `meta`); the
        // leaf entries only from a leaf's first on while MORE is set (the builder points a leaf
        // at its first entry and sets MORE on each one but the last), and `recs` only at an
        // entry's record index (an atom's, or the one after them); `keys` and `best` in whole
        // chunks below GROUP, a
        // multiple of both widths; the cut's roots at a value shifted right by `shift` and
        // masked by `mask`, which is at most the table's last index (the builder makes
        // `mask + 1` roots; without a cut, one root and mask 0).
        Walk::Avx512 => unsafe { avx512::walk(tree, keys, n, best) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 present (`supported`); the value gather reads `keys` at
        // slot * GROUP + position, slot below 8 (a node's dimension, or LEAF) and position
        // below GROUP.
        Walk::Avx2 => unsafe { avx2::walk(tree, keys, n, best) },
        _ => return false,
    }
    true
}

/// The first match at or after 0 among `block`'s atoms (whose records are `recs`, in the same
/// order) for the key values `v`, if it beats `best`; else `best`. Scans 16 (AVX-512) or 8
/// (AVX2) atoms per compare; [`Walk::Scalar`] or a mode this CPU lacks scans them one at a
/// time.
#[inline]
pub(super) fn scan_block(mode: Walk, block: &Block, recs: &[Rec], v: &[u32; 8], best: u32) -> u32 {
    match mode {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (`supported`). The scan reads only whole rows of
        // `block` through references (aligned: a row and each of its fields are 64 bytes, at
        // 64-byte alignment), and `recs` through `get`.
        Walk::Avx512 if supported(mode) => unsafe { avx512::scan_block(block, recs, v, best) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 present (`supported`); each field's two halves are 32
        // bytes at 32-byte alignment.
        Walk::Avx2 if supported(mode) => unsafe { avx2::scan_block(block, recs, v, best) },
        _ => block::scan(block, recs, v, best),
    }
}

/// Writes a burst's keys (at most [`GROUP`]) into `values` as [`Keys::set`] does, position by
/// position, and returns whether any of them is IPv6 or not of direction `dir`. AVX-512 reads
/// 16 keys' fields with five gathers and writes each slot's 16 values with one store (AVX2: 8),
/// where the scalar loop is seven loads and seven stores per key.
#[inline]
pub(super) fn transpose(mode: Walk, keys: &[FlowKey], values: &mut Keys, dir: u8) -> bool {
    let keys = &keys[..keys.len().min(GROUP)];
    match mode {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (`supported`). The gathers read, for each position below
        // `keys.len()`, four bytes at the offsets `key_offsets` checks, all inside that key
        // and inside its fields; the stores write whole 16-value rows of `values`.
        Walk::Avx512 if supported(mode) => unsafe { avx512::transpose(keys, values, dir) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 present (`supported`), 8 keys at a time.
        Walk::Avx2 if supported(mode) => unsafe { avx2::transpose(keys, values, dir) },
        _ => {
            let mut mixed = false;
            for (p, k) in keys.iter().enumerate() {
                values.set(p, k);
                mixed |= k.v6 | (k.dir as u8 != dir);
            }
            mixed
        }
    }
}

/// Where the AVX-512 transposition reads a [`FlowKey`]'s fields: four-byte words at 0 (the
/// source's low 32 bits), 16 (the destination's), 32 (both ports), 36 (VLAN) and 38
/// (protocol, direction, IPv6, ports known). Every byte those words cover is a field's.
#[cfg(target_arch = "x86_64")]
mod key_offsets {
    use crate::key::FlowKey;
    use std::mem::{offset_of, size_of};
    pub(super) const SRC: i32 = 0;
    pub(super) const DST: i32 = 16;
    pub(super) const PORTS: i32 = 32;
    pub(super) const VLAN: i32 = 36;
    pub(super) const FLAGS: i32 = 38;
    pub(super) const SIZE: i32 = size_of::<FlowKey>() as i32;
    const _: () = assert!(offset_of!(FlowKey, src) == SRC as usize);
    const _: () = assert!(offset_of!(FlowKey, dst) == DST as usize);
    const _: () = assert!(offset_of!(FlowKey, sport) == PORTS as usize);
    const _: () = assert!(offset_of!(FlowKey, dport) == PORTS as usize + 2);
    const _: () = assert!(offset_of!(FlowKey, vlan) == VLAN as usize);
    const _: () = assert!(offset_of!(FlowKey, proto) == FLAGS as usize);
    const _: () = assert!(offset_of!(FlowKey, dir) == FLAGS as usize + 1);
    const _: () = assert!(offset_of!(FlowKey, v6) == FLAGS as usize + 2);
    const _: () = assert!(offset_of!(FlowKey, ports_known) == FLAGS as usize + 3);
    const _: () = assert!(size_of::<crate::rule::Direction>() == 1 && size_of::<bool>() == 1);
    const _: () = assert!(SIZE == 48);
}

const _: () = assert!(GROUP == 64 && LEAF < 8);

/// A leaf test with at most this many lanes left finishes them one at a time: a gather costs
/// the same for one lane as for all of them (measured here: an 8-lane gather took 2 ns with any
/// mask). On AVX-512 that is 1.03-1.05 times faster on the 1k sets and acl1_10k, 0.96 on
/// ipc1_10k; on AVX2, whose gathers are half as wide, it was slower (0.95-0.97), and AVX2 keeps
/// testing every lane with gathers.
const TAIL: u32 = 2;

/// Slots of the key values (`Tree::values`) and `u32` offsets of the record fields (`Rec`)
/// that the leaf tests read.
#[cfg(target_arch = "x86_64")]
mod slot {
    pub(super) const SRC: usize = 0;
    pub(super) const DST: usize = 1;
    pub(super) const SPORT: usize = 2;
    pub(super) const DPORT: usize = 3;
    pub(super) const PROTO: usize = 4;
    pub(super) const VLAN: usize = 6;
    pub(super) const PORTS_KNOWN: usize = 7;
    pub(super) const REC_SRC: usize = 0;
    pub(super) const REC_DST: usize = 1;
    pub(super) const REC_SPORT: usize = 2;
    pub(super) const REC_DPORT: usize = 3;
    pub(super) const REC_PRIO: usize = 4;
    pub(super) const REC_META: usize = 5;
    pub(super) const REC_VLAN: usize = 6;

    use super::super::tree::Rec;
    use std::mem::offset_of;
    const _: () = assert!(offset_of!(Rec, src) == REC_SRC * 4);
    const _: () = assert!(offset_of!(Rec, dst) == REC_DST * 4);
    const _: () = assert!(offset_of!(Rec, prio) == REC_PRIO * 4);
    const _: () = assert!(offset_of!(Rec, sport) == REC_SPORT * 4);
    const _: () = assert!(offset_of!(Rec, dport) == REC_DPORT * 4);
    const _: () = assert!(offset_of!(Rec, vlan) == REC_VLAN * 4);
    const _: () = assert!(offset_of!(Rec, meta) == REC_META * 4);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::key::FlowKey;

    use super::super::block::{self, Block};
    use super::super::tree::{
        Keys, Rec, ANY_PROTO, ANY_VLAN, DST_SHIFT, ENTRY, MORE, NEEDS_PORTS, SRC_SHIFT,
    };
    use super::{slot, Tree, GROUP, LEAF, TAIL};
    use crate::classify::NO_MATCH;

    /// [`super::transpose`], 16 keys at a time.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(keys: &[FlowKey], values: &mut Keys, dir: u8) -> bool {
        use super::key_offsets as at;
        let n = keys.len().min(GROUP);
        let base = keys.as_ptr().cast::<u8>();
        let stride = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(at::SIZE),
        );
        let zero = _mm512_setzero_si512();
        let (low16, low8) = (_mm512_set1_epi32(0xffff), _mm512_set1_epi32(0xff));
        let want = _mm512_set1_epi32(i32::from(dir));
        let mut mixed = 0u16;
        for c in 0..n.div_ceil(16) {
            let lanes = (n - c * 16).min(16);
            let active = (((1u32 << lanes) - 1) & 0xffff) as __mmask16;
            let first = _mm512_add_epi32(stride, _mm512_set1_epi32(c as i32 * 16 * at::SIZE));
            // SAFETY: lane `l` of an active chunk reads four bytes at key `c * 16 + l` (below
            // `n`, so inside `keys`) plus an offset `key_offsets` checks to be inside its
            // fields; inactive lanes read nothing and give 0.
            let word = |off: i32| unsafe {
                _mm512_mask_i32gather_epi32::<1>(
                    zero,
                    active,
                    _mm512_add_epi32(first, _mm512_set1_epi32(off)),
                    base.cast(),
                )
            };
            let (src, dst, ports, vlan, flags) = (
                word(at::SRC),
                word(at::DST),
                word(at::PORTS),
                word(at::VLAN),
                word(at::FLAGS),
            );
            let rows = [
                (0, src),
                (1, dst),
                (2, _mm512_and_si512(ports, low16)),
                (3, _mm512_srli_epi32::<16>(ports)),
                (4, _mm512_and_si512(flags, low8)),
                (6, _mm512_and_si512(vlan, low16)),
                (7, _mm512_srli_epi32::<24>(flags)),
            ];
            for (slot, v) in rows {
                let to = &mut values.0[slot][c * 16..c * 16 + 16];
                // SAFETY: `to` is 16 u32s; an unaligned 512-bit store writes exactly them.
                unsafe { _mm512_storeu_si512(to.as_mut_ptr().cast(), v) };
            }
            let key_dir = _mm512_and_si512(_mm512_srli_epi32::<8>(flags), low8);
            let v6 = _mm512_and_si512(_mm512_srli_epi32::<16>(flags), low8);
            mixed |= _mm512_mask_cmpneq_epi32_mask(active, key_dir, want)
                | _mm512_mask_cmpneq_epi32_mask(active, v6, zero);
        }
        mixed != 0
    }

    /// [`super::scan_block`] with 16 atoms per row. A row's seven field tests are folded into
    /// one vector of mismatch bits (ternary logic, and the sign bits of the port differences)
    /// and one compare, rather than a chain of seven compares into a mask.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scan_block(block: &Block, recs: &[Rec], v: &[u32; 8], best: u32) -> u32 {
        let [ks, kd, ksp, kdp, kp] =
            [v[0], v[1], v[2], v[3], v[4]].map(|x| _mm512_set1_epi32(x as i32));
        let sign = _mm512_set1_epi32(i32::MIN);
        for (r, (row, &first)) in block.rows.iter().zip(block.first.iter()).enumerate() {
            if first >= best {
                break;
            }
            // SAFETY: each field is 16 u32s at 64-byte alignment (`Row` is `align(64)` and
            // every field 64 bytes long): an aligned 512-bit load reads exactly it.
            let f = |x: &[u32; 16]| unsafe { _mm512_load_si512(x.as_ptr().cast()) };
            // (key ^ value) & mask: nonzero where an address or the protocol differs.
            const XOR_AND: i32 = 0x28;
            const OR3: i32 = 0xfe;
            const OR_AND: i32 = 0xf8;
            let s = _mm512_ternarylogic_epi32::<XOR_AND>(ks, f(&row.src), f(&row.src_mask));
            let d = _mm512_ternarylogic_epi32::<XOR_AND>(kd, f(&row.dst), f(&row.dst_mask));
            let p = _mm512_ternarylogic_epi32::<XOR_AND>(kp, f(&row.proto), f(&row.proto_mask));
            let addr = _mm512_ternarylogic_epi32::<OR3>(s, d, p);
            // Ports and bounds fit 16 bits: a difference is negative exactly when the port is
            // outside its range.
            let ports = _mm512_ternarylogic_epi32::<OR3>(
                _mm512_sub_epi32(ksp, f(&row.sport_lo)),
                _mm512_sub_epi32(f(&row.sport_hi), ksp),
                _mm512_sub_epi32(kdp, f(&row.dport_lo)),
            );
            let ports = _mm512_or_si512(ports, _mm512_sub_epi32(f(&row.dport_hi), kdp));
            // addr | (ports & sign)
            let bad = _mm512_ternarylogic_epi32::<OR_AND>(addr, ports, sign);
            let m = _mm512_testn_epi32_mask(bad, bad);
            if let Some(b) = block::confirm(recs, r, u32::from(m), v, best) {
                return b;
            }
        }
        best
    }

    /// Gathers 16 lanes' 64-bit words at `base` + `idx` * 8 bytes (lanes outside `active` read
    /// nothing and give 0) and splits them into their low and high 32-bit halves. Two 8-lane
    /// gathers of 64-bit words load half as many elements as two 16-lane gathers of 32-bit ones.
    ///
    /// # Safety
    /// AVX-512F must be present; `base + idx * 8` must be 8 readable bytes in every active lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn pairs(base: *const i64, idx: __m512i, active: __mmask16) -> (__m512i, __m512i) {
        let zero = _mm512_setzero_si512();
        // SAFETY: the caller's contract, per half of the lanes.
        let (lo, hi) = unsafe {
            (
                _mm512_mask_i32gather_epi64::<8>(
                    zero,
                    active as __mmask8,
                    _mm512_castsi512_si256(idx),
                    base,
                ),
                _mm512_mask_i32gather_epi64::<8>(
                    zero,
                    (active >> 8) as __mmask8,
                    _mm512_extracti64x4_epi64::<1>(idx),
                    base,
                ),
            )
        };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            _mm512_permutex2var_epi32(lo, even, hi),
            _mm512_permutex2var_epi32(lo, odd, hi),
        )
    }

    /// Chunk `c`'s 16 values in slot `s`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn row(keys: &Keys, s: usize, c: usize) -> __m512i {
        let lanes = &keys.0[s][c * 16..c * 16 + 16];
        // SAFETY: `lanes` is 16 u32s (the slice above would have panicked otherwise); an
        // unaligned 512-bit load reads exactly them.
        unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
    }

    /// Tests the lanes `active` of a chunk against their leaves (`at`: each leaf's first entry
    /// in `leaf`): the priority of each lane's first record that matches its key (`k`: the
    /// values on the five dimensions; the VLAN and whether the ports are known come from chunk
    /// `c` of `keys`), else [`NO_MATCH`]. Records are in priority order, so a lane stops at its
    /// first hit, at its leaf's last entry ([`MORE`] clear) or at a record that cannot beat
    /// `was`. An entry is gathered, then its record's fields as pairs; once at most [`TAIL`]
    /// lanes are left, they finish scalar ([`tail`]).
    ///
    /// # Safety
    /// AVX-512F must be present; every active lane of `at` must index `leaf`, and so must the
    /// entries after it while [`MORE`] is set; every entry's record index must index `recs`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn test(
        recs: &[Rec],
        leaf: &[u32],
        mut at: __m512i,
        k: &[__m512i; 5],
        mut active: __mmask16,
        was: __m512i,
        keys: &Keys,
        c: usize,
    ) -> __m512i {
        let r = recs.as_ptr().cast::<i64>();
        let entries = leaf.as_ptr().cast::<i32>();
        let [src, dst, sport, dport, proto] = *k;
        let vlan = row(keys, slot::VLAN, c);
        let known = row(keys, slot::PORTS_KNOWN, c);
        let known = _mm512_test_epi32_mask(known, known);
        let low16 = _mm512_set1_epi32(0xffff);
        let flag = |m: __m512i, f: u32| _mm512_test_epi32_mask(m, _mm512_set1_epi32(f as i32));
        let mut best = _mm512_set1_epi32(NO_MATCH as i32);
        const _: () = assert!(slot::REC_SRC == 0 && slot::REC_DST == 1);
        const _: () = assert!(slot::REC_SPORT == 2 && slot::REC_DPORT == 3);
        const _: () = assert!(slot::REC_PRIO == 4 && slot::REC_META == 5 && slot::REC_VLAN == 6);
        let six_bits = _mm512_set1_epi32(63);
        // Lanes whose address, shifted by the record's shift, differs from the record's prefix
        // in no bit.
        let in_prefix = |a: __m512i, p: __m512i, shift: __m512i| {
            let d = _mm512_srlv_epi32(_mm512_xor_si512(a, p), shift);
            _mm512_testn_epi32_mask(d, d)
        };
        while active != 0 {
            if active.count_ones() <= TAIL {
                return tail(recs, leaf, at, best, active, was, keys, c * 16);
            }
            // SAFETY: the caller's contract: each active lane's `at` is an entry of its leaf
            // (the first, or one after an entry with MORE set). Inactive lanes read nothing.
            let entry = unsafe {
                _mm512_mask_i32gather_epi32::<4>(_mm512_setzero_si512(), active, at, entries)
            };
            // A record is 32 bytes, four 8-byte pairs (the fourth is the VLAN): index * 4,
            // scaled by 8.
            let r4 =
                _mm512_slli_epi32::<2>(_mm512_and_si512(entry, _mm512_set1_epi32(ENTRY as i32)));
            // SAFETY: the builder's entries index `recs`; `p` is a pair inside a Rec. Inactive
            // lanes read nothing.
            let field = |p: usize, lanes: __mmask16| unsafe { pairs(r.add(p), r4, lanes) };
            let (rsrc, rdst) = field(0, active);
            let (sr, dr) = field(1, active);
            let (prio, meta) = field(2, active);
            let addr = in_prefix(
                src,
                rsrc,
                _mm512_and_si512(_mm512_srli_epi32::<{ SRC_SHIFT }>(meta), six_bits),
            ) & in_prefix(
                dst,
                rdst,
                _mm512_and_si512(_mm512_srli_epi32::<{ DST_SHIFT }>(meta), six_bits),
            );
            let ports = _mm512_cmple_epu32_mask(_mm512_and_si512(sr, low16), sport)
                & _mm512_cmple_epu32_mask(sport, _mm512_srli_epi32::<16>(sr))
                & _mm512_cmple_epu32_mask(_mm512_and_si512(dr, low16), dport)
                & _mm512_cmple_epu32_mask(dport, _mm512_srli_epi32::<16>(dr));
            // The VLAN pair only for the records that test one: usually none.
            let any_vlan = flag(meta, ANY_VLAN);
            let tagged = active & !any_vlan;
            let vlan_ok = if tagged == 0 {
                active
            } else {
                any_vlan | _mm512_cmpeq_epi32_mask(field(3, tagged).0, vlan)
            };
            let proto_ok = flag(meta, ANY_PROTO)
                | _mm512_cmpeq_epi32_mask(_mm512_and_si512(meta, _mm512_set1_epi32(0xff)), proto);
            let frag = known | !flag(meta, NEEDS_PORTS);
            // Records are in priority order: once a lane's record cannot beat what the lane
            // already has, neither can any after it.
            let useful = _mm512_cmplt_epu32_mask(prio, was);
            let hit = active & useful & addr & ports & proto_ok & vlan_ok & frag;
            best = _mm512_mask_mov_epi32(best, hit, prio);
            active &= !hit & flag(entry, MORE) & useful;
            at = _mm512_add_epi32(at, _mm512_set1_epi32(1));
        }
        best
    }

    /// Finishes the leaf test of the lanes `active` one at a time (`at`: their next entries;
    /// `best`: what the chunk has found so far): a gather costs as much for one lane as for
    /// sixteen, so the last few lanes of a leaf test scan their records scalar.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn tail(
        recs: &[Rec],
        leaf: &[u32],
        next: __m512i,
        best: __m512i,
        active: __mmask16,
        was: __m512i,
        keys: &Keys,
        first: usize,
    ) -> __m512i {
        let mut at = [0u32; 16];
        let mut bound = [0u32; 16];
        // SAFETY: `at` and `bound` are 16 u32s; unaligned 512-bit stores write exactly them.
        unsafe {
            _mm512_storeu_si512(at.as_mut_ptr().cast(), next);
            _mm512_storeu_si512(bound.as_mut_ptr().cast(), was);
        }
        // Each lane's result goes into its lane of `best` directly: writing them to memory and
        // loading the vector back made the load wait for the stores.
        let mut best = best;
        let mut lanes = active;
        while lanes != 0 {
            let lane = lanes.trailing_zeros() as usize;
            lanes &= lanes - 1;
            let found = keys.scan(recs, leaf, at[lane] as usize, first + lane, bound[lane]);
            best = _mm512_mask_set1_epi32(best, 1 << lane, found as i32);
        }
        best
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn walk(tree: &Tree, keys: &Keys, n: usize, best: &mut [u32; GROUP]) {
        let (cut, nodes, recs, lists) = (tree.cut(), tree.nodes(), tree.recs(), tree.leaf());
        let tree_best = tree.best;
        const CHUNKS: usize = GROUP / 16;
        let n = n.min(GROUP);
        let base = nodes.as_ptr().cast::<i64>();
        // Even and odd 32-bit halves of 16 nodes held in two vectors of 8 u64.
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let seven = _mm512_set1_epi32(7);
        let leaf = _mm512_set1_epi32(LEAF as i32);
        let one = _mm512_set1_epi32(1);
        let dims = [1, 2, 3, 4].map(|d| _mm512_set1_epi32(d));
        let tb = _mm512_set1_epi32(tree_best as i32);
        const _: () = assert!(slot::SRC == 0 && slot::DST == 1 && slot::SPORT == 2);
        const _: () = assert!(slot::DPORT == 3 && slot::PROTO == 4);
        // Four chunks of 16 lanes walk together: each round's gathers for one chunk do not
        // wait for another's, so their latencies overlap. Each chunk's key values on the five
        // dimensions are one vector per dimension: a round picks each lane's value on its
        // node's dimension with compares and blends, not a gather.
        let chunks = n.div_ceil(16);
        let mut k = [[_mm512_setzero_si512(); 5]; CHUNKS];
        let mut was = [_mm512_setzero_si512(); CHUNKS];
        // The lanes to test: packets (not spare lanes past `n`) whose match so far does not
        // beat every atom here. A chunk with none does not walk.
        let mut open = [0 as __mmask16; CHUNKS];
        // Chunks past `n` never walk: `round!` below is written out for each of the four.
        let mut walking = [false; CHUNKS];
        const _: () = assert!(CHUNKS == 4);
        for c in 0..chunks {
            for (d, v) in k[c].iter_mut().enumerate() {
                *v = row(keys, d, c);
            }
            let b = &best[c * 16..c * 16 + 16];
            // SAFETY: `b` is 16 u32s; an unaligned 512-bit load reads exactly them.
            was[c] = unsafe { _mm512_loadu_si512(b.as_ptr().cast()) };
            let packets = (n - c * 16).min(16);
            let lanes = (((1u32 << packets) - 1) & 0xffff) as __mmask16;
            open[c] = _mm512_mask_cmpgt_epu32_mask(lanes, was[c], tb);
            walking[c] = open[c] != 0;
        }
        // Each lane starts at its slice's root.
        let mut idx = [_mm512_setzero_si512(); CHUNKS];
        let shift = _mm512_set1_epi32(cut.shift as i32);
        let slices = _mm512_set1_epi32(cut.mask as i32);
        for (c, at) in idx.iter_mut().enumerate().take(chunks) {
            let slice = _mm512_and_si512(_mm512_srlv_epi32(row(keys, cut.dim, c), shift), slices);
            // SAFETY: the value shifted right by `shift` and masked by `mask` indexes `roots`
            // (see `walk`). Scale 4 is a u32.
            *at = unsafe { _mm512_i32gather_epi32::<4>(slice, cut.roots.as_ptr().cast()) };
        }
        // One round for chunk `c`, written out for each chunk so its state stays in registers
        // (a loop over chunks kept it on the stack).
        macro_rules! round {
            ($c:expr, $moving:ident) => {{
                let c = $c;
                if walking[c] {
                    let cur = idx[c];
                    // SAFETY: every lane of `cur` is a node index inside `nodes` (the root, or
                    // a child index the builder wrote); scale 8 is the size of a Node.
                    let (lo, hi) = unsafe {
                        (
                            _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(cur), base),
                            _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(cur), base),
                        )
                    };
                    let thresh = _mm512_permutex2var_epi32(lo, even, hi);
                    let meta = _mm512_permutex2var_epi32(lo, odd, hi);
                    let dim = _mm512_and_si512(meta, seven);
                    let m = _mm512_cmpneq_epi32_mask(dim, leaf);
                    if m == 0 {
                        // Every lane's node is its leaf, and `thresh` its first entry.
                        walking[c] = false;
                        let (kc, lanes, bound) = (&k[c], open[c], was[c]);
                        // SAFETY: a leaf's `thresh` is one of its entries (see `walk`).
                        let prio = unsafe { test(recs, lists, thresh, kc, lanes, bound, keys, c) };
                        let b = &mut best[c * 16..c * 16 + 16];
                        // SAFETY: `b` is 16 u32s; an unaligned 512-bit store writes exactly
                        // them (spare lanes past `n` keep NO_MATCH: they are never tested).
                        unsafe {
                            _mm512_storeu_si512(
                                b.as_mut_ptr().cast(),
                                _mm512_min_epu32(was[c], prio),
                            )
                        };
                    } else {
                        let mut val = k[c][0];
                        for (d, kd) in dims.iter().zip(&k[c][1..]) {
                            val = _mm512_mask_mov_epi32(val, _mm512_cmpeq_epi32_mask(dim, *d), *kd);
                        }
                        let first = _mm512_srli_epi32::<3>(meta);
                        // A leaf's lane stays where it is (the blends give it the source
                        // address, not the 0 its dimension's slot holds).
                        let right = _mm512_cmpgt_epu32_mask(val, thresh) & m;
                        idx[c] = _mm512_mask_add_epi32(first, right, first, one);
                        $moving |= m;
                    }
                }
            }};
        }
        loop {
            let mut moving = 0u16;
            round!(0, moving);
            round!(1, moving);
            round!(2, moving);
            round!(3, moving);
            if moving == 0 {
                break;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::key::FlowKey;

    use super::super::block::{self, Block};
    use super::super::tree::{
        Keys, Rec, ANY_PROTO, ANY_VLAN, DST_SHIFT, ENTRY, MORE, NEEDS_PORTS, SRC_SHIFT,
    };
    use super::{slot, Tree, GROUP, LEAF};
    use crate::classify::NO_MATCH;

    /// [`super::transpose`], 8 keys at a time.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose(keys: &[FlowKey], values: &mut Keys, dir: u8) -> bool {
        use super::key_offsets as at;
        let n = keys.len().min(GROUP);
        let base = keys.as_ptr().cast::<u8>();
        let stride = _mm256_mullo_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(at::SIZE),
        );
        let zero = _mm256_setzero_si256();
        let (low16, low8) = (_mm256_set1_epi32(0xffff), _mm256_set1_epi32(0xff));
        let want = _mm256_set1_epi32(i32::from(dir));
        let mut mixed = zero;
        for c in 0..n.div_ceil(8) {
            let lanes = (n - c * 8).min(8);
            // All-ones in the lanes of keys, as AVX2 gathers take their mask.
            let active = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(lanes as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let first = _mm256_add_epi32(stride, _mm256_set1_epi32(c as i32 * 8 * at::SIZE));
            // SAFETY: lane `l` of an active chunk reads four bytes at key `c * 8 + l` (below
            // `n`, so inside `keys`) plus an offset `key_offsets` checks to be inside its
            // fields; inactive lanes read nothing and give 0.
            let word = |off: i32| unsafe {
                _mm256_mask_i32gather_epi32::<1>(
                    zero,
                    base.cast(),
                    _mm256_add_epi32(first, _mm256_set1_epi32(off)),
                    active,
                )
            };
            let (src, dst, ports, vlan, flags) = (
                word(at::SRC),
                word(at::DST),
                word(at::PORTS),
                word(at::VLAN),
                word(at::FLAGS),
            );
            let rows = [
                (0, src),
                (1, dst),
                (2, _mm256_and_si256(ports, low16)),
                (3, _mm256_srli_epi32::<16>(ports)),
                (4, _mm256_and_si256(flags, low8)),
                (6, _mm256_and_si256(vlan, low16)),
                (7, _mm256_srli_epi32::<24>(flags)),
            ];
            for (slot, v) in rows {
                let to = &mut values.0[slot][c * 8..c * 8 + 8];
                // SAFETY: `to` is 8 u32s; an unaligned 256-bit store writes exactly them.
                unsafe { _mm256_storeu_si256(to.as_mut_ptr().cast(), v) };
            }
            let key_dir = _mm256_and_si256(_mm256_srli_epi32::<8>(flags), low8);
            let v6 = _mm256_and_si256(_mm256_srli_epi32::<16>(flags), low8);
            let odd = _mm256_or_si256(_mm256_xor_si256(key_dir, want), v6);
            mixed = _mm256_or_si256(mixed, _mm256_and_si256(odd, active));
        }
        _mm256_testz_si256(mixed, mixed) == 0
    }

    /// [`super::scan_block`] with 8 atoms per compare, a row's two halves in turn. Ports and
    /// protocols fit 16 bits, so signed compares order them.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scan_block(block: &Block, recs: &[Rec], v: &[u32; 8], best: u32) -> u32 {
        let [ks, kd, ksp, kdp, kp] =
            [v[0], v[1], v[2], v[3], v[4]].map(|x| _mm256_set1_epi32(x as i32));
        for (r, (row, &first)) in block.rows.iter().zip(block.first.iter()).enumerate() {
            if first >= best {
                break;
            }
            let mut m = 0u32;
            for h in 0..2 {
                // SAFETY: each field is 16 u32s at 64-byte alignment (`Row` is `align(64)` and
                // every field 64 bytes long), so its half `h` is 8 u32s at 32-byte alignment:
                // an aligned 256-bit load reads exactly them.
                let f = |x: &[u32; 16]| unsafe {
                    _mm256_load_si256(x[h * 8..h * 8 + 8].as_ptr().cast())
                };
                let eq = _mm256_and_si256(
                    _mm256_and_si256(
                        _mm256_cmpeq_epi32(_mm256_and_si256(ks, f(&row.src_mask)), f(&row.src)),
                        _mm256_cmpeq_epi32(_mm256_and_si256(kd, f(&row.dst_mask)), f(&row.dst)),
                    ),
                    _mm256_cmpeq_epi32(_mm256_and_si256(kp, f(&row.proto_mask)), f(&row.proto)),
                );
                let out = _mm256_or_si256(
                    _mm256_or_si256(
                        _mm256_cmpgt_epi32(f(&row.sport_lo), ksp),
                        _mm256_cmpgt_epi32(ksp, f(&row.sport_hi)),
                    ),
                    _mm256_or_si256(
                        _mm256_cmpgt_epi32(f(&row.dport_lo), kdp),
                        _mm256_cmpgt_epi32(kdp, f(&row.dport_hi)),
                    ),
                );
                let hit = _mm256_andnot_si256(out, eq);
                m |= (_mm256_movemask_ps(_mm256_castsi256_ps(hit)) as u32) << (h * 8);
            }
            if let Some(b) = block::confirm(recs, r, m, v, best) {
                return b;
            }
        }
        best
    }

    /// Chunk `c`'s 8 values in slot `s`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn row(keys: &Keys, s: usize, c: usize) -> __m256i {
        let lanes = &keys.0[s][c * 8..c * 8 + 8];
        // SAFETY: `lanes` is 8 u32s; an unaligned 256-bit load reads exactly them.
        unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
    }

    /// [`super::avx512`]'s leaf test on 8 lanes. AVX2 compares only signed integers, so
    /// unsigned ones flip the top bit of both sides; masks are vectors of all-ones lanes.
    ///
    /// # Safety
    /// As for the AVX-512 test, with AVX2 present.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn test(
        recs: *const Rec,
        leaf: *const u32,
        mut at: __m256i,
        k: &[__m256i; 5],
        vlan: __m256i,
        known: __m256i,
        mut active: __m256i,
        was: __m256i,
    ) -> __m256i {
        let r = recs.cast::<i32>();
        let [src, dst, sport, dport, proto] = *k;
        let zero = _mm256_setzero_si256();
        let ones = _mm256_set1_epi32(-1);
        let known = _mm256_xor_si256(_mm256_cmpeq_epi32(known, zero), ones);
        let bias = _mm256_set1_epi32(i32::MIN);
        // a <= b, unsigned: not (a > b).
        let le = |a: __m256i, b: __m256i| {
            _mm256_xor_si256(
                _mm256_cmpgt_epi32(_mm256_xor_si256(a, bias), _mm256_xor_si256(b, bias)),
                ones,
            )
        };
        let flag = |m: __m256i, f: u32| {
            _mm256_xor_si256(
                _mm256_cmpeq_epi32(_mm256_and_si256(m, _mm256_set1_epi32(f as i32)), zero),
                ones,
            )
        };
        let low16 = _mm256_set1_epi32(0xffff);
        let mut best = _mm256_set1_epi32(NO_MATCH as i32);
        let six_bits = _mm256_set1_epi32(63);
        // Lanes (all ones) whose address, shifted by the record's shift, differs from the
        // record's prefix in no bit.
        let in_prefix = |a: __m256i, p: __m256i, shift: __m256i| {
            _mm256_cmpeq_epi32(_mm256_srlv_epi32(_mm256_xor_si256(a, p), shift), zero)
        };
        while _mm256_testz_si256(active, active) == 0 {
            // SAFETY: as in the AVX-512 test: active lanes index entries of their leaf, whose
            // record indices index `recs`; inactive lanes read nothing.
            let entry =
                unsafe { _mm256_mask_i32gather_epi32::<4>(zero, leaf.cast::<i32>(), at, active) };
            let r4 =
                _mm256_slli_epi32::<2>(_mm256_and_si256(entry, _mm256_set1_epi32(ENTRY as i32)));
            // SAFETY: as above.
            let field = |f: usize, lanes: __m256i| unsafe {
                _mm256_mask_i32gather_epi32::<8>(zero, r.add(f), r4, lanes)
            };
            let meta = field(slot::REC_META, active);
            let (sr, dr) = (
                field(slot::REC_SPORT, active),
                field(slot::REC_DPORT, active),
            );
            let addr = _mm256_and_si256(
                in_prefix(
                    src,
                    field(slot::REC_SRC, active),
                    _mm256_and_si256(_mm256_srli_epi32::<{ SRC_SHIFT as i32 }>(meta), six_bits),
                ),
                in_prefix(
                    dst,
                    field(slot::REC_DST, active),
                    _mm256_and_si256(_mm256_srli_epi32::<{ DST_SHIFT as i32 }>(meta), six_bits),
                ),
            );
            let ports = _mm256_and_si256(
                _mm256_and_si256(
                    le(_mm256_and_si256(sr, low16), sport),
                    le(sport, _mm256_srli_epi32::<16>(sr)),
                ),
                _mm256_and_si256(
                    le(_mm256_and_si256(dr, low16), dport),
                    le(dport, _mm256_srli_epi32::<16>(dr)),
                ),
            );
            let proto_ok = _mm256_or_si256(
                flag(meta, ANY_PROTO),
                _mm256_cmpeq_epi32(_mm256_and_si256(meta, _mm256_set1_epi32(0xff)), proto),
            );
            // The VLAN field only for the records that test one: usually none.
            let any_vlan = flag(meta, ANY_VLAN);
            let tagged = _mm256_andnot_si256(any_vlan, active);
            let vlan_ok = if _mm256_testz_si256(tagged, tagged) != 0 {
                ones
            } else {
                _mm256_or_si256(
                    any_vlan,
                    _mm256_cmpeq_epi32(field(slot::REC_VLAN, tagged), vlan),
                )
            };
            let frag = _mm256_or_si256(known, _mm256_xor_si256(flag(meta, NEEDS_PORTS), ones));
            // Records are in priority order: once a lane's record cannot beat what the lane
            // already has, neither can any after it.
            let prio = field(slot::REC_PRIO, active);
            let useful =
                _mm256_cmpgt_epi32(_mm256_xor_si256(was, bias), _mm256_xor_si256(prio, bias));
            let hit = _mm256_and_si256(
                _mm256_and_si256(
                    _mm256_and_si256(active, addr),
                    _mm256_and_si256(ports, useful),
                ),
                _mm256_and_si256(_mm256_and_si256(proto_ok, vlan_ok), frag),
            );
            best = _mm256_blendv_epi8(best, prio, hit);
            active = _mm256_andnot_si256(
                hit,
                _mm256_and_si256(_mm256_and_si256(active, useful), flag(entry, MORE)),
            );
            at = _mm256_add_epi32(at, _mm256_set1_epi32(1));
        }
        best
    }

    /// The same walk as the AVX-512 one on 8 lanes, eight chunks in flight; the key's value on
    /// a node's dimension is gathered from `keys` (slot * GROUP + position).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn walk(tree: &Tree, keys: &Keys, n: usize, best: &mut [u32; GROUP]) {
        let (cut, nodes, recs, entries) = (tree.cut(), tree.nodes(), tree.recs(), tree.leaf());
        let tree_best = tree.best;
        const CHUNKS: usize = GROUP / 8;
        let n = n.min(GROUP);
        let base = nodes.as_ptr().cast::<i64>();
        let vals = keys.0.as_ptr().cast::<i32>();
        // Gathered as 4 u64 each: (thresh, meta) pairs; these pick the evens and the odds.
        let pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let seven = _mm256_set1_epi32(7);
        let leaf = _mm256_set1_epi32(LEAF as i32);
        let bias = _mm256_set1_epi32(i32::MIN);
        let tb = _mm256_xor_si256(_mm256_set1_epi32(tree_best as i32), bias);
        let chunks = n.div_ceil(8);
        let mut pos = [_mm256_setzero_si256(); CHUNKS];
        let mut was = [_mm256_setzero_si256(); CHUNKS];
        let mut open = [_mm256_setzero_si256(); CHUNKS];
        // Chunks past `n` never walk: `round!` below is written out for each of the eight.
        let mut walking = [false; CHUNKS];
        const _: () = assert!(CHUNKS == 8);
        for c in 0..chunks {
            pos[c] = _mm256_add_epi32(_mm256_set1_epi32((c * 8) as i32), iota);
            let b = &best[c * 8..c * 8 + 8];
            // SAFETY: `b` is 8 u32s; an unaligned 256-bit load reads exactly them.
            was[c] = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
            // Packets (positions below n) whose match so far does not beat every atom here.
            let packets = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), pos[c]);
            let worse = _mm256_cmpgt_epi32(_mm256_xor_si256(was[c], bias), tb);
            open[c] = _mm256_and_si256(packets, worse);
            walking[c] = _mm256_testz_si256(open[c], open[c]) == 0;
        }
        // Each lane starts at its slice's root.
        let mut idx = [_mm256_setzero_si256(); CHUNKS];
        let shift = _mm256_set1_epi32(cut.shift as i32);
        let slices = _mm256_set1_epi32(cut.mask as i32);
        for (c, at) in idx.iter_mut().enumerate().take(chunks) {
            let slice = _mm256_and_si256(_mm256_srlv_epi32(row(keys, cut.dim, c), shift), slices);
            // SAFETY: the value shifted right by `shift` and masked by `mask` indexes `roots`
            // (see `walk`). Scale 4 is a u32.
            *at = unsafe { _mm256_i32gather_epi32::<4>(cut.roots.as_ptr().cast(), slice) };
        }
        // One round for chunk `c`, written out for each chunk (as in the AVX-512 walk).
        macro_rules! round {
            ($c:expr, $moving:ident) => {{
                let c = $c;
                if walking[c] {
                    let cur = idx[c];
                    // SAFETY: every lane of `cur` is a node index inside `nodes`; scale 8 is
                    // a Node.
                    let (lo, hi) = unsafe {
                        (
                            _mm256_i32gather_epi64::<8>(base, _mm256_castsi256_si128(cur)),
                            _mm256_i32gather_epi64::<8>(base, _mm256_extracti128_si256::<1>(cur)),
                        )
                    };
                    // lo = t0 m0 t1 m1 t2 m2 t3 m3 → t0 t1 t2 t3 | m0 m1 m2 m3, same for hi.
                    let lo = _mm256_permutevar8x32_epi32(lo, pick);
                    let hi = _mm256_permutevar8x32_epi32(hi, pick);
                    let thresh = _mm256_permute2x128_si256::<0x20>(lo, hi);
                    let meta = _mm256_permute2x128_si256::<0x31>(lo, hi);
                    let dim = _mm256_and_si256(meta, seven);
                    let m = _mm256_movemask_epi8(_mm256_cmpeq_epi32(dim, leaf)) ^ -1;
                    if m == 0 {
                        walking[c] = false;
                        let k = [0, 1, 2, 3, 4].map(|s| row(keys, s, c));
                        // SAFETY: a leaf's `thresh` is one of its entries (see `walk`).
                        let prio = unsafe {
                            test(
                                recs.as_ptr(),
                                entries.as_ptr(),
                                thresh,
                                &k,
                                row(keys, slot::VLAN, c),
                                row(keys, slot::PORTS_KNOWN, c),
                                open[c],
                                was[c],
                            )
                        };
                        let b = &mut best[c * 8..c * 8 + 8];
                        // SAFETY: `b` is 8 u32s; an unaligned 256-bit store writes exactly
                        // them (spare lanes past `n` keep NO_MATCH: they are never tested).
                        unsafe {
                            _mm256_storeu_si256(
                                b.as_mut_ptr().cast(),
                                _mm256_min_epu32(was[c], prio),
                            )
                        };
                    } else {
                        // Slot `dim` of each lane's position; a leaf's dimension reads slot 5,
                        // always 0, so its lane stays.
                        let at = _mm256_add_epi32(pos[c], _mm256_slli_epi32::<6>(dim));
                        // SAFETY: dim * GROUP + position < 8 * GROUP, the u32s of `keys`;
                        // scale 4 is a u32.
                        let val = unsafe { _mm256_i32gather_epi32::<4>(vals, at) };
                        let right = _mm256_cmpgt_epi32(
                            _mm256_xor_si256(val, bias),
                            _mm256_xor_si256(thresh, bias),
                        );
                        // right is -1 where the value is above the threshold: subtracting adds
                        // one.
                        idx[c] = _mm256_sub_epi32(_mm256_srli_epi32::<3>(meta), right);
                        $moving |= m;
                    }
                }
            }};
        }
        loop {
            let mut moving = 0i32;
            round!(0, moving);
            round!(1, moving);
            round!(2, moving);
            round!(3, moving);
            round!(4, moving);
            round!(5, moving);
            round!(6, moving);
            round!(7, moving);
            if moving == 0 {
                break;
            }
        }
    }
}
