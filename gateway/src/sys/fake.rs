//! In-memory [`Rings`]: a queue pair with no kernel behind it, so the whole burst loop (receive,
//! parse, classify, forward, TX kicks, completions, refill) runs in tests and benchmarks without
//! root.
//!
//! It behaves like a copy-mode AF_XDP socket: a frame arriving from the "wire" ([`FakeRings::deliver`])
//! needs a frame on the fill ring and room on the RX ring, or it is dropped and counted the way the
//! kernel counts it; frames put on a TX ring stay there until the "wire" takes them
//! ([`FakeRings::transmit`]), which moves them to the completion ring. Every ring and the frame
//! memory are allocated once, at creation.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use super::ring::{QueuePair, Rings, Side};

/// A frame of the fake memory: its index and the length of the packet in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeDesc {
    index: u32,
    len: u32,
}

/// One side's four rings.
struct FakeSocket {
    rx: VecDeque<FakeDesc>,
    tx: VecDeque<FakeDesc>,
    fill: VecDeque<FakeDesc>,
    comp: VecDeque<FakeDesc>,
}

impl FakeSocket {
    fn new(ring: usize) -> Self {
        FakeSocket {
            rx: VecDeque::with_capacity(ring),
            tx: VecDeque::with_capacity(ring),
            fill: VecDeque::with_capacity(ring),
            comp: VecDeque::with_capacity(ring),
        }
    }
}

/// What the fake "kernel" counted, per side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Frames delivered into the RX ring.
    pub delivered: u64,
    /// Frames dropped because the fill ring was empty.
    pub fill_empty: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Frames taken off the TX ring onto the wire.
    pub transmitted: u64,
    /// TX kicks (the `sendto`s a copy-mode socket needs).
    pub tx_kicks: u64,
}

/// The in-memory rings of a queue pair.
pub struct FakeRings {
    memory: Vec<u8>,
    frame_size: usize,
    ring: usize,
    sockets: [FakeSocket; 2],
    stats: [FakeStats; 2],
}

impl FakeRings {
    /// A queue pair of `frames` frames of `frame_size` bytes, with rings of `ring` entries.
    pub fn pair(frames: u32, frame_size: u32, ring: u32) -> QueuePair<FakeRings> {
        let rings = FakeRings {
            memory: vec![0; frames as usize * frame_size as usize],
            frame_size: frame_size as usize,
            ring: ring as usize,
            sockets: [
                FakeSocket::new(ring as usize),
                FakeSocket::new(ring as usize),
            ],
            stats: [FakeStats::default(); 2],
        };
        let descs = (0..frames)
            .map(|index| FakeDesc { index, len: 0 })
            .collect();
        QueuePair::new(rings, descs, true)
    }

    /// A frame arrives on `side` from the wire: it takes a frame off the fill ring, is copied
    /// in (truncated to the frame size) and put on the RX ring. Returns false when it was dropped
    /// (no fill frame, or the RX ring full), as the kernel would.
    pub fn deliver(&mut self, side: Side, bytes: &[u8]) -> bool {
        let s = &mut self.sockets[side as usize];
        let stats = &mut self.stats[side as usize];
        if s.rx.len() >= self.ring {
            stats.rx_ring_full += 1;
            return false;
        }
        let Some(mut desc) = s.fill.pop_front() else {
            stats.fill_empty += 1;
            return false;
        };
        let len = bytes.len().min(self.frame_size);
        let at = desc.index as usize * self.frame_size;
        self.memory[at..at + len].copy_from_slice(&bytes[..len]);
        desc.len = len as u32;
        s.rx.push_back(desc);
        stats.delivered += 1;
        true
    }

    /// The wire takes every frame on `side`'s TX ring: `f` sees each one's bytes, in order, and
    /// the frames move to the completion ring. Returns how many were sent.
    pub fn transmit(&mut self, side: Side, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while let Some(desc) = self.sockets[side as usize].tx.pop_front() {
            f(self.bytes(&desc));
            self.sockets[side as usize].comp.push_back(desc);
            n += 1;
        }
        self.stats[side as usize].transmitted += n as u64;
        n
    }

    /// What the fake kernel counted on `side`.
    pub fn stats(&self, side: Side) -> FakeStats {
        self.stats[side as usize]
    }

    /// Frames on `side`'s fill ring.
    pub fn fill_level(&self, side: Side) -> usize {
        self.sockets[side as usize].fill.len()
    }

    fn bytes(&self, desc: &FakeDesc) -> &[u8] {
        let at = desc.index as usize * self.frame_size;
        &self.memory[at..at + desc.len as usize]
    }
}

impl QueuePair<FakeRings> {
    /// The fake wire behind this pair, to deliver frames and take transmitted ones.
    pub fn wire(&mut self) -> &mut FakeRings {
        self.rings_mut()
    }
}

impl Rings for FakeRings {
    type Desc = FakeDesc;

    fn frame(&self, desc: &FakeDesc) -> &[u8] {
        self.bytes(desc)
    }

    fn rx(&mut self, side: Side, out: &mut [FakeDesc]) -> usize {
        let rx = &mut self.sockets[side as usize].rx;
        let n = rx.len().min(out.len());
        for (slot, desc) in out.iter_mut().zip(rx.drain(..n)) {
            *slot = desc;
        }
        n
    }

    fn tx(&mut self, side: Side, descs: &[FakeDesc]) -> usize {
        let tx = &mut self.sockets[side as usize].tx;
        let n = (self.ring - tx.len()).min(descs.len());
        tx.extend(&descs[..n]);
        n
    }

    fn fill(&mut self, side: Side, descs: &[FakeDesc]) -> usize {
        let fill = &mut self.sockets[side as usize].fill;
        let n = (self.ring - fill.len()).min(descs.len());
        fill.extend(descs[..n].iter().map(|d| FakeDesc {
            index: d.index,
            len: 0,
        }));
        n
    }

    fn complete(&mut self, side: Side, out: &mut [FakeDesc]) -> usize {
        let comp = &mut self.sockets[side as usize].comp;
        let n = comp.len().min(out.len());
        for (slot, desc) in out.iter_mut().zip(comp.drain(..n)) {
            *slot = desc;
        }
        n
    }

    fn kick_tx(&mut self, side: Side) -> u64 {
        // Copy mode: the kernel always wants a kick while frames wait on the TX ring.
        if self.sockets[side as usize].tx.is_empty() {
            return 0;
        }
        self.stats[side as usize].tx_kicks += 1;
        1
    }

    fn kick_fill(&mut self, _side: Side) -> bool {
        false
    }

    fn fd(&self, _side: Side) -> Option<RawFd> {
        None
    }
}
