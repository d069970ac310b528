//! The tree walk on 16 packets at once with AVX-512, or 8 with AVX2, chosen at run time by what
//! the CPU has.
//! This module is the policy crate's only unsafe code: gathers read through raw pointers, and
//! [`prefetch`] takes one.
//!
//! A round loads each lane's node with two 8-lane gathers, takes the key's value on the node's
//! dimension with a third, and moves every lane to its child with one unsigned compare and a
//! masked add. A leaf's child is itself, so lanes that arrived early keep stepping in place
//! until the last one arrives. The result is the same leaf the scalar walk finds; the proptest
//! and the ClassBench tests run both.

#![allow(unsafe_code)]

use super::tree::{Node, Tree, GROUP, LEAF};

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

/// Walks the packets `live` (positions into `v`) from the root of `nodes` to their leaves and
/// writes each one's leaf index to `at[i]`, with the SIMD walk `mode`. Returns false, having
/// done nothing, for [`Walk::Scalar`] or a mode this CPU lacks: the caller walks them itself.
#[inline]
pub(super) fn walk(
    mode: Walk,
    tree: &Tree,
    v: &[[u32; 8]; GROUP],
    live: &[u8],
    at: &mut [u32; GROUP],
) -> bool {
    // Taking a built `Tree`, not a slice of nodes, is what makes this safe to call: only
    // `Tree::build` makes nodes, and it keeps every child index in bounds and every path ending
    // at a leaf (a `Tree::default()` has no nodes, and is refused here).
    let nodes = tree.nodes();
    if !supported(mode)
        || nodes.is_empty()
        || live.len() > GROUP
        || live.iter().any(|&p| p as usize >= GROUP)
    {
        return false;
    }
    match mode {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (`supported`). The walk reads `nodes` only at indices
        // taken from the tree itself, which `Tree::build` keeps in bounds (a child index is
        // always a pushed node, and the node count stays below 2^29 so it fits `meta`), and `v`
        // at `position * 8 + dim` with positions below GROUP (checked above) and dim below 8.
        Walk::Avx512 => unsafe { avx512::walk(nodes, v, live, at) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 present (`supported`).
        Walk::Avx2 => unsafe { avx2::walk(nodes, v, live, at) },
        _ => return false,
    }
    true
}

/// Chunk `c`'s lane offsets into the value array (`position * 8`), `W` lanes; spare lanes past
/// the end of `live` repeat the chunk's first packet (they walk harmlessly and are not stored).
#[cfg(target_arch = "x86_64")]
fn lane_offsets<const W: usize>(live: &[u8], c: usize) -> [i32; W] {
    let i = c * W;
    let mut lane = [live[i] as i32 * 8; W];
    for (x, &p) in lane.iter_mut().zip(&live[i..]) {
        *x = p as i32 * 8;
    }
    lane
}

/// Writes chunk `c`'s leaf indices (`W` lanes) to `at`, the live lanes only.
#[cfg(target_arch = "x86_64")]
fn store_leaves<const W: usize>(leaves: &[u32; W], n: usize, c: usize, at: &mut [u32; GROUP]) {
    let i = c * W;
    let lanes = (n - i).min(W);
    at[i..i + lanes].copy_from_slice(&leaves[..lanes]);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{lane_offsets, store_leaves, Node, GROUP, LEAF};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn walk(
        nodes: &[Node],
        v: &[[u32; 8]; GROUP],
        live: &[u8],
        at: &mut [u32; GROUP],
    ) {
        let n = live.len().min(GROUP);
        let base = nodes.as_ptr().cast::<i64>();
        let vals = v.as_ptr().cast::<i32>();
        // Even and odd 32-bit halves of 16 nodes held in two vectors of 8 u64.
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let seven = _mm512_set1_epi32(7);
        let leaf = _mm512_set1_epi32(LEAF as i32);
        let one = _mm512_set1_epi32(1);
        // Four chunks of 16 lanes walk together: each round's gathers for one chunk do not
        // wait for another's, so their latencies overlap.
        let chunks = n.div_ceil(16);
        let mut offs = [_mm512_setzero_si512(); GROUP / 16];
        for (c, o) in offs.iter_mut().enumerate().take(chunks) {
            let lane = lane_offsets::<16>(&live[..n], c);
            // SAFETY: `lane` is 16 i32s, an unaligned 512-bit load reads exactly them.
            *o = unsafe { _mm512_loadu_si512(lane.as_ptr().cast()) };
        }
        let mut idx = [_mm512_setzero_si512(); GROUP / 16];
        // A chunk whose lanes have all reached their leaves stops gathering.
        let mut walking = [true; GROUP / 16];
        loop {
            let mut moving = 0u16;
            for ((cur, off), w) in idx
                .iter_mut()
                .zip(&offs)
                .zip(walking.iter_mut())
                .take(chunks)
            {
                if !*w {
                    continue;
                }
                // SAFETY: every lane of `cur` is a node index inside `nodes` (the root, or a
                // child index the builder wrote); scale 8 is the size of a Node.
                let (lo, hi) = unsafe {
                    (
                        _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(*cur), base),
                        _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(*cur), base),
                    )
                };
                let thresh = _mm512_permutex2var_epi32(lo, even, hi);
                let meta = _mm512_permutex2var_epi32(lo, odd, hi);
                let dim = _mm512_and_si512(meta, seven);
                // SAFETY: offs + dim < GROUP * 8, the length of `v` in u32s; scale 4 is a u32.
                let val = unsafe { _mm512_i32gather_epi32::<4>(_mm512_add_epi32(*off, dim), vals) };
                let first = _mm512_srli_epi32::<3>(meta);
                let right = _mm512_cmpgt_epu32_mask(val, thresh);
                *cur = _mm512_mask_add_epi32(first, right, first, one);
                let m = _mm512_cmpneq_epi32_mask(dim, leaf);
                *w = m != 0;
                moving |= m;
            }
            if moving == 0 {
                break;
            }
        }
        for (c, chunk) in idx.iter().enumerate().take(chunks) {
            let mut out = [0u32; 16];
            // SAFETY: `out` is 16 u32s, an unaligned 512-bit store writes exactly them.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), *chunk) };
            store_leaves(&out, n, c, at);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{lane_offsets, store_leaves, Node, GROUP, LEAF};

    /// The same walk as the AVX-512 one on 8 lanes, eight chunks in flight. AVX2 compares only
    /// signed integers, so values and thresholds are compared with their top bit flipped.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn walk(
        nodes: &[Node],
        v: &[[u32; 8]; GROUP],
        live: &[u8],
        at: &mut [u32; GROUP],
    ) {
        let n = live.len().min(GROUP);
        let base = nodes.as_ptr().cast::<i64>();
        let vals = v.as_ptr().cast::<i32>();
        // Gathered as 4 u64 each: (thresh, meta) pairs; these pick the evens and the odds.
        let pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let seven = _mm256_set1_epi32(7);
        let leaf = _mm256_set1_epi32(LEAF as i32);
        let bias = _mm256_set1_epi32(i32::MIN);
        let chunks = n.div_ceil(8);
        let mut offs = [_mm256_setzero_si256(); GROUP / 8];
        for (c, o) in offs.iter_mut().enumerate().take(chunks) {
            let lane = lane_offsets::<8>(&live[..n], c);
            // SAFETY: `lane` is 8 i32s, an unaligned 256-bit load reads exactly them.
            *o = unsafe { _mm256_loadu_si256(lane.as_ptr().cast()) };
        }
        let mut idx = [_mm256_setzero_si256(); GROUP / 8];
        let mut walking = [true; GROUP / 8];
        loop {
            let mut moving = 0i32;
            for ((cur, off), w) in idx
                .iter_mut()
                .zip(&offs)
                .zip(walking.iter_mut())
                .take(chunks)
            {
                if !*w {
                    continue;
                }
                // SAFETY: every lane of `cur` is a node index inside `nodes`; scale 8 is a Node.
                let (lo, hi) = unsafe {
                    (
                        _mm256_i32gather_epi64::<8>(base, _mm256_castsi256_si128(*cur)),
                        _mm256_i32gather_epi64::<8>(base, _mm256_extracti128_si256::<1>(*cur)),
                    )
                };
                // lo = t0 m0 t1 m1 t2 m2 t3 m3 → t0 t1 t2 t3 | m0 m1 m2 m3, same for hi.
                let lo = _mm256_permutevar8x32_epi32(lo, pick);
                let hi = _mm256_permutevar8x32_epi32(hi, pick);
                let thresh = _mm256_permute2x128_si256::<0x20>(lo, hi);
                let meta = _mm256_permute2x128_si256::<0x31>(lo, hi);
                let dim = _mm256_and_si256(meta, seven);
                // SAFETY: off + dim < GROUP * 8, the length of `v` in u32s; scale 4 is a u32.
                let val = unsafe { _mm256_i32gather_epi32::<4>(vals, _mm256_add_epi32(*off, dim)) };
                let right =
                    _mm256_cmpgt_epi32(_mm256_xor_si256(val, bias), _mm256_xor_si256(thresh, bias));
                // right is -1 where the value is above the threshold: subtracting adds one.
                *cur = _mm256_sub_epi32(_mm256_srli_epi32::<3>(meta), right);
                let m = _mm256_movemask_epi8(_mm256_cmpeq_epi32(dim, leaf)) ^ -1;
                *w = m != 0;
                moving |= m;
            }
            if moving == 0 {
                break;
            }
        }
        for (c, chunk) in idx.iter().enumerate().take(chunks) {
            let mut out = [0u32; 8];
            // SAFETY: `out` is 8 u32s, an unaligned 256-bit store writes exactly them.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), *chunk) };
            store_leaves(&out, n, c, at);
        }
    }
}
