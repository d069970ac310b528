//! A tree's atoms laid out for a linear SIMD scan: the cheaper home for a small tree that few
//! packets of a burst still need.
//!
//! A later tree (one whose best atom comes after the earlier trees' matches for most packets)
//! is walked only by the packets whose match so far it could beat. When they are a handful, a
//! SIMD walk of one chunk is bound by its gathers' latency, level after level: fw1_1k's third
//! tree (77 broad atoms, 11 levels, about six packets a burst) cost about 60 ns for each
//! packet that walked it. A [`Block`] holds the same atoms structure of arrays, so one packet
//! is tested against 16 (or 8) atoms at a time with no gather, and the scan stops at the row
//! of the first candidate, since atoms are in priority order: about 30 ns a packet there.
//! `Forest` scans a block instead of walking its tree when few packets need it (see
//! `LINEAR_ROWS` there).
//!
//! The SIMD filter tests the addresses, protocol and port ranges; each candidate it finds is
//! then checked with the record's full match (VLAN, fragments), so the result is exactly the
//! tree's.

use super::tree::Rec;
use super::Atom;
use crate::rule::mask;

/// Atoms a block is built for at most: past this, scanning even one packet costs more than a
/// walk.
pub(super) const LINEAR_MAX: usize = 128;

/// Lanes per row: the AVX-512 width, a multiple of AVX2's.
pub(super) const LANES: usize = 16;

/// One row of 16 atoms, field by field. A lane past the atoms (padding) has an empty source
/// port range, so it never matches.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
pub(super) struct Row {
    /// `key & mask == value` on the source, destination and protocol: a /0 or any protocol
    /// has mask 0.
    pub(super) src: [u32; LANES],
    pub(super) src_mask: [u32; LANES],
    pub(super) dst: [u32; LANES],
    pub(super) dst_mask: [u32; LANES],
    pub(super) proto: [u32; LANES],
    pub(super) proto_mask: [u32; LANES],
    /// `lo <= port <= hi`.
    pub(super) sport_lo: [u32; LANES],
    pub(super) sport_hi: [u32; LANES],
    pub(super) dport_lo: [u32; LANES],
    pub(super) dport_hi: [u32; LANES],
}

/// The rows of a tree's atoms, in the tree's (priority) order: atom `i` is lane `i % 16` of
/// row `i / 16`, and record `i` of the tree.
#[derive(Debug, Clone, Default)]
pub(super) struct Block {
    pub(super) rows: Box<[Row]>,
    /// Each row's first atom's priority, so a scan stops at the first row that cannot beat the
    /// match found so far.
    pub(super) first: Box<[u32]>,
}

impl Block {
    /// The block for `atoms` (IPv4, in priority order), if they are few enough.
    pub(super) fn build(atoms: &[Atom]) -> Option<Block> {
        if atoms.is_empty() || atoms.len() > LINEAR_MAX {
            return None;
        }
        let count = atoms.len().div_ceil(LANES);
        let mut rows = vec![
            Row {
                // Padding: lo 1 above hi 0 never matches.
                sport_lo: [1; LANES],
                ..Row::default()
            };
            count
        ];
        for (i, a) in atoms.iter().enumerate() {
            let (row, l) = (&mut rows[i / LANES], i % LANES);
            let src_mask = mask(false, a.src.len) as u32;
            let dst_mask = mask(false, a.dst.len) as u32;
            row.src[l] = a.src.bits as u32 & src_mask;
            row.src_mask[l] = src_mask;
            row.dst[l] = a.dst.bits as u32 & dst_mask;
            row.dst_mask[l] = dst_mask;
            row.proto[l] = a.proto.map_or(0, u32::from);
            row.proto_mask[l] = if a.proto.is_some() { 0xff } else { 0 };
            row.sport_lo[l] = u32::from(a.sport.lo);
            row.sport_hi[l] = u32::from(a.sport.hi);
            row.dport_lo[l] = u32::from(a.dport.lo);
            row.dport_hi[l] = u32::from(a.dport.hi);
        }
        let first = atoms.iter().step_by(LANES).map(|a| a.prio).collect();
        Some(Block {
            rows: rows.into_boxed_slice(),
            first,
        })
    }

    pub(super) fn memory(&self) -> usize {
        std::mem::size_of_val(&*self.rows) + std::mem::size_of_val(&*self.first)
    }

    /// Lanes of row `r` whose addresses, protocol and ports admit the key values `v` (the
    /// slots of `Tree::values`): bit `l` for lane `l`. The scalar form of the SIMD filter.
    pub(super) fn candidates(&self, r: usize, v: &[u32; 8]) -> u32 {
        let row = &self.rows[r];
        let mut m = 0;
        for l in 0..LANES {
            let hit = (v[0] & row.src_mask[l] == row.src[l])
                & (v[1] & row.dst_mask[l] == row.dst[l])
                & (v[4] & row.proto_mask[l] == row.proto[l])
                & (row.sport_lo[l] <= v[2])
                & (v[2] <= row.sport_hi[l])
                & (row.dport_lo[l] <= v[3])
                & (v[3] <= row.dport_hi[l]);
            m |= u32::from(hit) << l;
        }
        m
    }
}

/// Row `r`'s first candidate (lanes `m`, bit `l` for lane `l`; records `recs`, the block's
/// atoms' in the same order) that fully matches the key values `v`, if it beats `best`: then
/// `Some` of its priority. Also `Some(best)` when a candidate cannot beat `best` (nor can any
/// later atom), so the scan stops there; `None` to go on to the next row. The SIMD filter tests
/// every field but the VLAN and fragments, so the first candidate nearly always matches.
#[inline(always)]
pub(super) fn confirm(recs: &[Rec], r: usize, mut m: u32, v: &[u32; 8], best: u32) -> Option<u32> {
    while m != 0 {
        let e = recs.get(r * LANES + m.trailing_zeros() as usize)?;
        if e.prio >= best {
            return Some(best);
        }
        if e.matches(v) {
            return Some(e.prio);
        }
        m &= m - 1;
    }
    None
}

/// The scalar scan: what the SIMD scans compute.
pub(super) fn scan(block: &Block, recs: &[Rec], v: &[u32; 8], best: u32) -> u32 {
    for (r, &first) in block.first.iter().enumerate() {
        if first >= best {
            break;
        }
        if let Some(b) = confirm(recs, r, block.candidates(r, v), v, best) {
            return b;
        }
    }
    best
}
