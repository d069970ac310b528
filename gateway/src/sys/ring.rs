//! A queue pair's rings behind one small trait, and the frame bookkeeping on top of it.
//!
//! [`Rings`] is what the kernel (or a test) gives a worker: for each of its two sockets (ext
//! and int) an RX, a TX, a fill and a completion ring, over one frame memory they share. The
//! real one is [`crate::sys::xsk::XskRings`]; [`crate::sys::fake::FakeRings`] is an in-memory one
//! that lets the whole burst loop run in tests without root.
//!
//! [`QueuePair`] owns the rings, the free frames and the burst arrays, and is the only code that
//! moves descriptors. Every move removes a descriptor from where it was, so *a descriptor is in
//! exactly one place*: the pool, a fill ring, the RX burst, the TX burst, a TX ring or a
//! completion ring. The safety of the real rings rests on that invariant. Nothing outside this
//! module can hold a descriptor: a received burst is only reachable through [`Received`], which
//! borrows its pair, so a frame can only be read from, forwarded through, or recycled into the
//! pair it came from.

use std::os::fd::RawFd;

/// The most frames one burst can hold (the `burst` setting is at most this).
pub const MAX_BURST: usize = 256;

/// Which socket of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The external interface.
    Ext = 0,
    /// The internal interface.
    Int = 1,
}

impl Side {
    /// The socket a frame received on this side is forwarded to.
    #[inline]
    pub fn other(self) -> Side {
        match self {
            Side::Ext => Side::Int,
            Side::Int => Side::Ext,
        }
    }
}

/// The rings of a queue pair's two sockets over their shared frame memory.
///
/// Implementations trust the caller to give them only descriptors they handed out (through
/// `rx` and `complete`, or at creation) and that nobody else holds; [`QueuePair`] is that
/// caller. The real implementation can therefore not be constructed outside `sys`.
pub trait Rings {
    /// A frame descriptor: where a frame is in the shared memory, and its length.
    type Desc: Copy + Default;

    /// The bytes of a received frame.
    fn frame(&self, desc: &Self::Desc) -> &[u8];
    /// Takes up to `out.len()` received frames off `side`'s RX ring.
    fn rx(&mut self, side: Side, out: &mut [Self::Desc]) -> usize;
    /// Puts a prefix of `descs` on `side`'s TX ring, as much as it has room for.
    fn tx(&mut self, side: Side, descs: &[Self::Desc]) -> usize;
    /// Puts a prefix of `descs` on `side`'s fill ring, as much as it has room for.
    fn fill(&mut self, side: Side, descs: &[Self::Desc]) -> usize;
    /// Takes up to `out.len()` transmitted frames off `side`'s completion ring.
    fn complete(&mut self, side: Side, out: &mut [Self::Desc]) -> usize;
    /// Asks the kernel to transmit what `side`'s TX ring holds, if it wants to be asked.
    /// Returns the number of system calls made.
    fn kick_tx(&mut self, side: Side) -> u64;
    /// Asks the kernel to use `side`'s fill ring, if it wants to be asked. Returns whether it
    /// made a system call.
    fn kick_fill(&mut self, side: Side) -> bool;
    /// The descriptor to poll(2) for `side`'s RX ring, if there is one.
    fn fd(&self, side: Side) -> Option<RawFd>;
}

/// Up to [`MAX_BURST`] descriptors owned by the pair: the frames of one RX burst, or those about
/// to be sent.
struct Burst<D> {
    descs: [D; MAX_BURST],
    len: usize,
}

impl<D: Copy + Default> Burst<D> {
    fn new() -> Self {
        Burst {
            descs: [D::default(); MAX_BURST],
            len: 0,
        }
    }
}

/// The two sockets of one worker on a shared frame memory, the free frames, and the burst
/// arrays. Nothing here allocates after creation: the pool's capacity is the number of frames.
pub struct QueuePair<R: Rings> {
    rings: R,
    pool: Vec<R::Desc>,
    rx: Box<Burst<R::Desc>>,
    fwd: Box<Burst<R::Desc>>,
    /// Frames on each side's TX ring not yet completed.
    in_flight: [usize; 2],
    /// True when the driver refused zero-copy and the sockets run in copy mode.
    pub copy_mode: bool,
}

impl<R: Rings> QueuePair<R> {
    /// A pair over `rings`, owning the free frames `frames` (none of them may be on a ring).
    pub(super) fn new(rings: R, frames: Vec<R::Desc>, copy_mode: bool) -> Self {
        QueuePair {
            rings,
            pool: frames,
            rx: Box::new(Burst::new()),
            fwd: Box::new(Burst::new()),
            in_flight: [0; 2],
            copy_mode,
        }
    }

    /// The rings, for the fake's wire. Never handed out for the real rings: their safety
    /// rests on this pair being the only code that moves descriptors.
    pub(super) fn rings_mut(&mut self) -> &mut R {
        &mut self.rings
    }

    /// Free frames (not on any ring).
    #[inline]
    pub fn free_frames(&self) -> usize {
        self.pool.len()
    }

    /// Frames queued for TX on `side` whose completion has not been reaped yet.
    #[inline]
    pub fn in_flight(&self, side: Side) -> usize {
        self.in_flight[side as usize]
    }

    /// Reaps both completion rings into the pool. Returns how many frames came back.
    #[inline]
    pub fn reap(&mut self) -> usize {
        self.reap_side(Side::Ext) + self.reap_side(Side::Int)
    }

    fn reap_side(&mut self, side: Side) -> usize {
        let mut total = 0;
        loop {
            let n = self.rings.complete(side, &mut self.fwd.descs);
            self.pool.extend_from_slice(&self.fwd.descs[..n]);
            self.in_flight[side as usize] = self.in_flight[side as usize].saturating_sub(n);
            total += n;
            if n < MAX_BURST {
                return total;
            }
        }
    }

    /// Tops up both fill rings from the pool, half each at most. Returns frames given.
    #[inline]
    pub fn refill(&mut self) -> usize {
        let half = self.pool.len().div_ceil(2);
        self.refill_side(Side::Ext, half) + self.refill_side(Side::Int, usize::MAX)
    }

    fn refill_side(&mut self, side: Side, max: usize) -> usize {
        let take = self.pool.len().min(max);
        if take == 0 {
            return 0;
        }
        let start = self.pool.len() - take;
        let given = self.rings.fill(side, &self.pool[start..]);
        // The ring took a prefix of the slice; keep the rest, drop the given ones from the pool.
        self.pool.copy_within(start + given.., start);
        self.pool.truncate(self.pool.len() - given);
        given
    }

    /// Receives up to `max` frames on `side`. The burst is read through [`Received::frame`] and
    /// ends in [`Received::forward`]; frames not forwarded go back to the pool.
    #[inline]
    pub fn receive(&mut self, side: Side, max: usize) -> Received<'_, R> {
        debug_assert_eq!(self.rx.len, 0);
        let max = max.min(MAX_BURST);
        let n = self.rings.rx(side, &mut self.rx.descs[..max]);
        self.rx.len = n;
        Received { pair: self, side }
    }

    /// Kicks both sockets: TX while frames are in flight, fill when the kernel asks. Returns the
    /// number of system calls made.
    #[inline]
    pub fn kick(&mut self) -> u64 {
        let mut calls = 0;
        for side in [Side::Ext, Side::Int] {
            if self.in_flight[side as usize] > 0 {
                calls += self.rings.kick_tx(side);
            }
            if self.rings.kick_fill(side) {
                calls += 1;
            }
        }
        calls
    }

    /// The descriptors to poll(2) for the two RX rings.
    pub(crate) fn fds(&self) -> [Option<RawFd>; 2] {
        [self.rings.fd(Side::Ext), self.rings.fd(Side::Int)]
    }
}

/// A received burst, borrowed from its pair: its frames can be read, then forwarded to the
/// other side or recycled. Dropping it recycles every frame not forwarded.
pub struct Received<'a, R: Rings> {
    pair: &'a mut QueuePair<R>,
    side: Side,
}

impl<R: Rings> Received<'_, R> {
    /// Frames in the burst.
    #[inline]
    pub fn len(&self) -> usize {
        self.pair.rx.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pair.rx.len == 0
    }

    /// The bytes of frame `i` (`i < len()`).
    #[inline]
    pub fn frame(&self, i: usize) -> &[u8] {
        let rx = &self.pair.rx;
        self.pair.rings.frame(&rx.descs[..rx.len][i])
    }

    /// Forwards frame `i` to the other side's TX ring when `keep[i]`, and recycles it otherwise.
    /// Returns (sent, dropped because the TX ring was full).
    #[inline]
    pub fn forward(self, keep: &[bool]) -> (usize, usize) {
        let p = &mut *self.pair;
        let n = p.rx.len;
        p.fwd.len = 0;
        for (i, desc) in p.rx.descs[..n].iter().enumerate() {
            if keep.get(i).copied().unwrap_or(false) {
                p.fwd.descs[p.fwd.len] = *desc;
                p.fwd.len += 1;
            } else {
                p.pool.push(*desc);
            }
        }
        p.rx.len = 0;
        let to = self.side.other();
        let want = p.fwd.len;
        let sent = if want > 0 {
            p.rings.tx(to, &p.fwd.descs[..want])
        } else {
            0
        };
        p.pool.extend_from_slice(&p.fwd.descs[sent..want]);
        p.fwd.len = 0;
        p.in_flight[to as usize] += sent;
        (sent, want - sent)
    }
}

impl<R: Rings> Drop for Received<'_, R> {
    fn drop(&mut self) {
        let p = &mut *self.pair;
        p.pool.extend_from_slice(&p.rx.descs[..p.rx.len]);
        p.rx.len = 0;
    }
}
