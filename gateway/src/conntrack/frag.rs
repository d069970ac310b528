//! Fragments, VPP's "shallow virtual reassembly": the first fragment of a datagram carries its
//! transport header, so it is decided (and tracked) like a whole packet; when it passes, its
//! datagram's identity (direction, addresses, protocol, identification) is remembered for a
//! while, and a later fragment passes only if its datagram is remembered. Nothing is buffered
//! or reassembled: a later fragment that arrives before its first is dropped
//! (`fragment_no_first`), as is one that overlaps the first fragment's data, where it could
//! rewrite the transport header the decision was made on (RFC 1858, RFC 5722:
//! `fragment_overlap`).
//!
//! Each datagram keeps the byte ranges that passed ([`RANGES`] of them; adjacent ones merge, so
//! fragments in order take one): a later fragment that overlaps any of them is dropped, as
//! Linux drops overlapping IPv4 fragments and RFC 5722 IPv6 ones. A datagram with more holes
//! than that drops its next out-of-order fragment (`fragment_overlap`; the sender retransmits).
//!
//! A small table of buckets of [`WAYS`] entries under a keyed hash, each bucket behind a spin
//! lock (fragments are rare; two workers seldom meet on one bucket). A full bucket replaces its
//! oldest entry: a flood of first fragments can make later fragments of other datagrams wait for
//! their retransmission, never pass one that was not admitted.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use policy::rule::Direction;

const WAYS: usize = 4;

/// Byte ranges kept per datagram.
pub const RANGES: usize = 6;

/// An unused range.
const NO_RANGE: u64 = u64::MAX;

fn range_of(start: u32, end: u32) -> u64 {
    start as u64 | (end as u64) << 32
}

/// A fragmented datagram's identity: the direction, both VLAN tags, the addresses, the
/// protocol its fragments carry and the identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub dir: Direction,
    pub v6: bool,
    pub src: u128,
    pub dst: u128,
    pub proto: u8,
    pub id: u32,
    pub vlan: u16,
    pub vlan2: u16,
}

impl Datagram {
    fn words(&self) -> [u64; 6] {
        [
            (self.src >> 64) as u64,
            self.src as u64,
            (self.dst >> 64) as u64,
            self.dst as u64,
            self.id as u64
                | (self.proto as u64) << 32
                | (self.v6 as u64) << 40
                | (self.dir as u64) << 41
                | 1 << 63,
            self.vlan as u64 | (self.vlan2 as u64) << 16,
        ]
    }
}

#[derive(Default)]
struct Entry {
    key: [AtomicU64; 6],
    /// The table generation that admitted the first fragment.
    generation: AtomicU32,
    /// The byte ranges `[start, end)` that passed (`start | end << 32`), or [`NO_RANGE`].
    ranges: [AtomicU64; RANGES],
    /// Bytes of data the first fragment covers.
    end: AtomicU32,
    /// When the first fragment passed (0: free).
    seen: AtomicU64,
}

#[derive(Default)]
struct Bucket {
    lock: AtomicU32,
    entries: [Entry; WAYS],
}

/// What the table says of a later fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later {
    Pass,
    /// No first fragment of its datagram passed (or it was too long ago).
    NoFirst,
    /// It overlaps the first fragment's data.
    Overlap,
}

/// The table of datagrams whose first fragment passed.
pub struct Frags {
    buckets: Box<[Bucket]>,
    key: (u64, u64),
}

impl Frags {
    /// A table of at least `entries` datagrams.
    pub fn new(entries: usize, key: (u64, u64)) -> Frags {
        let n = entries.div_ceil(WAYS).max(1);
        Frags {
            buckets: (0..n).map(|_| Bucket::default()).collect(),
            // A different key from the flow table's.
            key: (key.0 ^ 0x6672_6167, key.1.rotate_left(17)),
        }
    }

    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    fn bucket(&self, d: &Datagram) -> &Bucket {
        let h = super::siphash13(self.key, &d.words());
        &self.buckets[super::range(h as u32, self.buckets.len())]
    }

    fn locked<R>(&self, b: &Bucket, f: impl FnOnce(&Bucket) -> R) -> R {
        while b
            .lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        let r = f(b);
        b.lock.store(0, Ordering::Release);
        r
    }

    /// Remembers that the first fragment of `d` passed at `now` under table `generation`
    /// (`end`: bytes of the fragmentable part it carries). `now` is never 0 in a live table (the
    /// clock starts before the first packet); a 0 is taken as 1.
    pub fn first(&self, d: &Datagram, end: u32, now: u64, generation: u32) {
        let w = d.words();
        let now = now.max(1);
        self.locked(self.bucket(d), |b| {
            let mut pick = 0;
            let mut oldest = u64::MAX;
            for (i, e) in b.entries.iter().enumerate() {
                let seen = e.seen.load(Ordering::Relaxed);
                if seen != 0 && (0..6).all(|k| e.key[k].load(Ordering::Relaxed) == w[k]) {
                    pick = i;
                    break;
                }
                if seen < oldest {
                    oldest = seen;
                    pick = i;
                }
            }
            let e = &b.entries[pick];
            for (k, v) in e.key.iter().zip(w) {
                k.store(v, Ordering::Relaxed);
            }
            e.end.store(end, Ordering::Relaxed);
            e.generation.store(generation, Ordering::Relaxed);
            e.seen.store(now, Ordering::Relaxed);
            for (k, r) in e.ranges.iter().enumerate() {
                r.store(
                    if k == 0 { range_of(0, end) } else { NO_RANGE },
                    Ordering::Relaxed,
                );
            }
        })
    }

    /// Decides a later fragment of `d` of `len` bytes at `offset`, at `now`, under table
    /// `generation`; entries older than `timeout_ns`, or admitted by an older table (a policy
    /// change applies to datagrams in flight too), are gone.
    pub fn later(
        &self,
        d: &Datagram,
        offset: u32,
        len: u32,
        now: u64,
        timeout_ns: u64,
        generation: u32,
    ) -> Later {
        let w = d.words();
        self.locked(self.bucket(d), |b| {
            for e in &b.entries {
                let seen = e.seen.load(Ordering::Relaxed);
                if seen == 0 || !(0..6).all(|k| e.key[k].load(Ordering::Relaxed) == w[k]) {
                    continue;
                }
                if now.saturating_sub(seen) > timeout_ns
                    || super::older(e.generation.load(Ordering::Relaxed), generation)
                {
                    return Later::NoFirst;
                }
                return record(e, offset, offset.saturating_add(len));
            }
            Later::NoFirst
        })
    }
}

/// Records `[start, end)` among the entry's ranges (the caller holds its bucket's lock): an
/// overlap with any of them, or no room for one more hole, drops the fragment.
fn record(e: &Entry, start: u32, end: u32) -> Later {
    let mut free = None;
    for (k, r) in e.ranges.iter().enumerate() {
        let v = r.load(Ordering::Relaxed);
        if v == NO_RANGE {
            free.get_or_insert(k);
            continue;
        }
        let (s, t) = (v as u32, (v >> 32) as u32);
        if start < t && s < end {
            return Later::Overlap;
        }
    }
    // Grow a range this one touches; else take a free one.
    for r in &e.ranges {
        let v = r.load(Ordering::Relaxed);
        if v == NO_RANGE {
            continue;
        }
        let (s, t) = (v as u32, (v >> 32) as u32);
        if t == start {
            r.store(range_of(s, end), Ordering::Relaxed);
            return Later::Pass;
        }
        if end == s {
            r.store(range_of(start, t), Ordering::Relaxed);
            return Later::Pass;
        }
    }
    match free {
        Some(k) => {
            e.ranges[k].store(range_of(start, end), Ordering::Relaxed);
            Later::Pass
        }
        None => Later::Overlap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u32) -> Datagram {
        Datagram {
            dir: Direction::Ingress,
            v6: true,
            src: 1,
            dst: 2,
            proto: 17,
            id,
            vlan: 0xffff,
            vlan2: 0xffff,
        }
    }

    #[test]
    fn later_fragments_follow_their_first() {
        let f = Frags::new(64, (1, 2));
        assert_eq!(f.later(&d(7), 1448, 8, 10, 1_000, 1), Later::NoFirst);
        f.first(&d(7), 1448, 10, 1);
        assert_eq!(f.later(&d(7), 1448, 8, 20, 1_000, 1), Later::Pass);
        assert_eq!(f.later(&d(7), 8, 8, 20, 1_000, 1), Later::Overlap);
        assert_eq!(f.later(&d(8), 1448, 8, 20, 1_000, 1), Later::NoFirst);
        let mut other_way = d(7);
        other_way.dir = Direction::Egress;
        assert_eq!(f.later(&other_way, 1448, 8, 20, 1_000, 1), Later::NoFirst);
        let mut other_vlan = d(7);
        other_vlan.vlan = 20;
        assert_eq!(f.later(&other_vlan, 1448, 8, 20, 1_000, 1), Later::NoFirst);
        assert_eq!(
            f.later(&d(7), 1448, 8, 20, 1_000, 2),
            Later::NoFirst,
            "admitted by an older table"
        );
        assert_eq!(
            f.later(&d(7), 1448, 8, 2_000, 1_000, 1),
            Later::NoFirst,
            "timed out"
        );
    }

    #[test]
    fn overlapping_later_fragments_are_dropped_and_in_order_ones_merge() {
        let f = Frags::new(64, (1, 2));
        f.first(&d(5), 24, 1, 1);
        assert_eq!(f.later(&d(5), 24, 24, 2, 1_000, 1), Later::Pass);
        assert_eq!(
            f.later(&d(5), 40, 16, 2, 1_000, 1),
            Later::Overlap,
            "into [24, 48)"
        );
        assert_eq!(f.later(&d(5), 48, 8, 2, 1_000, 1), Later::Pass, "merged");
        // Out of order: holes up to the table's ranges, then refused.
        for k in 0..(RANGES as u32 - 1) {
            assert_eq!(
                f.later(&d(5), 1000 + 100 * k, 8, 2, 1_000, 1),
                Later::Pass,
                "hole {k}"
            );
        }
        assert_eq!(
            f.later(&d(5), 5000, 8, 2, 1_000, 1),
            Later::Overlap,
            "too many holes"
        );
        assert_eq!(
            f.later(&d(5), 56, 944, 2, 1_000, 1),
            Later::Pass,
            "a hole filled"
        );
    }

    #[test]
    fn a_flood_of_firsts_replaces_the_oldest() {
        let f = Frags::new(4, (1, 2));
        for id in 0..100 {
            f.first(&d(id), 8, 1 + id as u64, 1);
        }
        let passing = (0..100)
            .filter(|&id| f.later(&d(id), 8, 8, 200, 1_000, 1) == Later::Pass)
            .count();
        assert_eq!(passing, WAYS);
        assert_eq!(
            f.later(&d(99), 16, 8, 200, 1_000, 1),
            Later::Pass,
            "the newest stays"
        );
    }
}
