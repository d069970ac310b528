//! The bench's AF_XDP endpoint: one socket on its own UMEM, a traffic generator (TX) or sink
//! (RX). Unlike the gateway, a generator writes frames, so it manages frame ownership itself
//! through xsk-rs's `unsafe fn`s; the socket comes from `gateway::sys::xsk::open_single`.
//!
//! The ownership rule is the gateway's: a descriptor is in the pool, a ring, or a local burst
//! array, never two; every `// SAFETY:` comment below relies on it.

use gateway::config::MAX_BURST;
use gateway::sys::xsk::{open_single, Single, SocketError, SocketOptions};
use xsk_rs::FrameDesc;

/// One AF_XDP socket with its own UMEM and its free frames.
pub(crate) struct Endpoint {
    s: Single,
    pool: Vec<FrameDesc>,
    in_flight: usize,
    ring_size: u32,
    pub(crate) copy_mode: bool,
}

impl Endpoint {
    pub(crate) fn open(
        iface: &str,
        queue: u32,
        o: &SocketOptions,
    ) -> Result<Endpoint, SocketError> {
        let mut s = open_single(iface, queue, o)?;
        let pool = std::mem::take(&mut s.frames);
        let copy_mode = s.copy_mode;
        Ok(Endpoint {
            s,
            pool,
            in_flight: 0,
            ring_size: o.ring_size,
            copy_mode,
        })
    }

    /// Writes every free frame once: `fill(i, buf)` writes frame `i`'s bytes into `buf` (the
    /// frame's whole data area) and returns the frame length.
    pub(crate) fn write_frames(&mut self, mut fill: impl FnMut(usize, &mut [u8]) -> usize) {
        for (i, desc) in self.pool.iter_mut().enumerate() {
            // SAFETY: the pool owns these frames (none is on a ring), so nothing else reads or
            // writes them while this exclusive borrow lives.
            let mut data = unsafe { self.s.umem.data_mut(desc) };
            let len = {
                let mut c = data.cursor();
                let cap = c.buf_len();
                c.set_pos(cap);
                cap
            };
            let n = fill(i, &mut data.contents_mut()[..len]);
            data.cursor().set_pos(n);
        }
    }

    /// Queues up to `n` frames from the pool for transmission, after `patch(buf)` rewrites
    /// what changes per packet (the frame keeps the length it was written with, `len`). Returns
    /// how many were queued.
    pub(crate) fn send(&mut self, n: usize, len: usize, mut patch: impl FnMut(&mut [u8])) -> usize {
        let mut burst = [FrameDesc::default(); MAX_BURST];
        let take = n
            .min(MAX_BURST)
            .min(self.pool.len())
            .min(self.s.tx.nb_free(n.min(MAX_BURST) as u32) as usize);
        for slot in burst.iter_mut().take(take) {
            let Some(mut desc) = self.pool.pop() else {
                break;
            };
            {
                // SAFETY: the frame was just taken off the pool; nothing else accesses it.
                let mut data = unsafe { self.s.umem.data_mut(&mut desc) };
                // A completed frame comes back with length 0; its bytes are still there.
                data.cursor().set_pos(len);
                patch(data.contents_mut());
            }
            *slot = desc;
        }
        // SAFETY: the frames in `burst[..take]` were taken off the pool and belong to this UMEM;
        // the accepted ones belong to the TX ring until they come back through the completion
        // ring, the rest go back to the pool below.
        let sent = unsafe { self.s.tx.produce(&burst[..take]) };
        self.pool.extend_from_slice(&burst[sent..take]);
        self.in_flight += sent;
        sent
    }

    /// Reaps completions and kicks TX. Returns frames in flight.
    pub(crate) fn service_tx(&mut self) -> usize {
        let mut done = [FrameDesc::default(); MAX_BURST];
        loop {
            // SAFETY: the completion ring returns frames this UMEM's TX ring sent; from here on
            // they are owned by the pool only.
            let n = unsafe { self.s.comp.consume(&mut done) };
            self.pool.extend_from_slice(&done[..n]);
            self.in_flight = self.in_flight.saturating_sub(n);
            if n < MAX_BURST {
                break;
            }
        }
        let mut calls = 0;
        while self.in_flight > 0
            && calls < 8
            && self.s.tx.needs_wakeup()
            && self.s.tx.nb_free_exact() < self.ring_size
        {
            let _ = self.s.tx.wakeup();
            calls += 1;
        }
        self.in_flight
    }

    /// Receives up to one burst, calls `f` on each frame's bytes, and recycles the frames.
    pub(crate) fn receive(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let want = self
            .pool
            .len()
            .min(self.s.fill.nb_free(self.pool.len() as u32) as usize);
        if want > 0 {
            let start = self.pool.len() - want;
            // SAFETY: the frames come off the pool (owned by nobody else) and belong to this UMEM;
            // only the accepted prefix leaves the pool.
            let given = unsafe { self.s.fill.produce(&self.pool[start..]) };
            self.pool.copy_within(start + given.., start);
            self.pool.truncate(self.pool.len() - given);
        }
        if self.s.fill.needs_wakeup() {
            let _ = self.s.fill.wakeup(self.s.rx.fd_mut(), 0);
        }
        let mut burst = [FrameDesc::default(); MAX_BURST];
        // SAFETY: the descriptors written are frames the kernel returns from this socket's RX
        // ring; they were given to its fill ring and are now owned by `burst` alone.
        let n = unsafe { self.s.rx.consume(&mut burst) };
        for desc in &burst[..n] {
            // SAFETY: the frame is owned by `burst` (on no ring), so nothing writes it while
            // this shared borrow lives.
            f(unsafe { self.s.umem.data(desc) }.contents());
        }
        self.pool.extend_from_slice(&burst[..n]);
        n
    }

    pub(crate) fn rx_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        Some(self.s.rx.fd().as_raw_fd())
    }
}
