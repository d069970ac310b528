//! The tree walk on 16 packets at once with AVX-512, chosen at run time when the CPU has it.
//! This module is the policy crate's only unsafe code: gathers read through raw pointers, and
//! [`prefetch`] takes one.
//!
//! A round loads each lane's node with two 8-lane gathers, takes the key's value on the node's
//! dimension with a third, and moves every lane to its child with one unsigned compare and a
//! masked add. A leaf's child is itself, so lanes that arrived early keep stepping in place
//! until the last one arrives. The result is the same leaf the scalar walk finds; the proptest
//! and the ClassBench tests run both.

#![allow(unsafe_code)]

use super::tree::{Node, GROUP, LEAF};

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

/// Whether [`walk`] can run here (cached by the standard library after the first call).
#[inline]
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Walks the packets `live` (positions into `v`) from the root of `nodes` to their leaves and
/// writes each one's leaf index to `at[i]`. Callers check [`available`] first; without
/// AVX-512 it does nothing and returns false.
#[inline]
pub(super) fn walk(
    nodes: &[Node],
    v: &[[u32; 8]; GROUP],
    live: &[u8],
    at: &mut [u32; GROUP],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if available() && !nodes.is_empty() {
            // SAFETY: AVX-512F is present (checked just above). The walk only reads `nodes` at
            // indices taken from the tree itself, which the builder keeps in bounds (a child
            // index is always a pushed node), and `v` at `position * 8 + dim` with positions
            // below GROUP (they index the `[_; GROUP]` arrays of the caller) and dim below 8.
            unsafe { avx512::walk(nodes, v, live, at) };
            return true;
        }
    }
    let _ = (nodes, v, live, at);
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Node, GROUP, LEAF};

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
            let i = c * 16;
            let lanes = (n - i).min(16);
            // Each lane's offset into `v` (position * 8); spare lanes repeat the chunk's first.
            let mut lane = [live[i] as i32 * 8; 16];
            for (l, x) in lane.iter_mut().enumerate().take(lanes) {
                *x = live[i + l] as i32 * 8;
            }
            // SAFETY: `lane` is 16 i32s, an unaligned 512-bit load reads exactly them.
            *o = unsafe { _mm512_loadu_si512(lane.as_ptr().cast()) };
        }
        let mut idx = [_mm512_setzero_si512(); GROUP / 16];
        loop {
            let mut moving = 0u16;
            for (cur, off) in idx.iter_mut().zip(&offs).take(chunks) {
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
                let val =
                    unsafe { _mm512_i32gather_epi32::<4>(_mm512_add_epi32(*off, dim), vals) };
                let first = _mm512_srli_epi32::<3>(meta);
                let right = _mm512_cmpgt_epu32_mask(val, thresh);
                *cur = _mm512_mask_add_epi32(first, right, first, one);
                moving |= _mm512_cmpneq_epi32_mask(dim, leaf);
            }
            if moving == 0 {
                break;
            }
        }
        for (c, chunk) in idx.iter().enumerate().take(chunks) {
            let i = c * 16;
            let lanes = (n - i).min(16);
            let mut out = [0u32; 16];
            // SAFETY: `out` is 16 u32s, an unaligned 512-bit store writes exactly them.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), *chunk) };
            at[i..i + lanes].copy_from_slice(&out[..lanes]);
        }
    }
}
