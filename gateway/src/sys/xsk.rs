//! AF_XDP sockets through xsk-rs, wrapped so that frame ownership lives in the types.
//!
//! xsk-rs hands out `FrameDesc`s, which are `Copy`, and leaves it to callers (through `unsafe fn`)
//! to never give the kernel a frame twice. Here a frame descriptor never leaves this module: frames
//! move between a [`Pool`] (free), the fill ring, an RX [`Burst`], a TX [`Burst`], and the
//! completion ring, and every move removes the descriptor from where it was. That is the invariant
//! each `// SAFETY:` comment below relies on: *a descriptor is in exactly one place*.
//!
//! One [`QueuePair`] per worker: the sockets on `ext:q` and `int:q` share one UMEM, each with its
//! own fill/completion ring pair, so forwarding moves a descriptor from one socket's RX ring to the
//! other's TX ring without copying the frame.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::config::{XdpMode, ZeroCopy, MAX_BURST};

/// Why a queue's sockets could not be opened. The message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("invalid ring or frame size for the UMEM: {0}")]
    Sizes(String),
    #[error("cannot create the UMEM ({bytes} bytes): {hint}")]
    Umem {
        bytes: usize,
        hint: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot open an AF_XDP socket on {iface} queue {queue} ({mode}): {hint}")]
    Socket {
        iface: String,
        queue: u32,
        mode: &'static str,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel gave {iface} queue {queue} no fill/completion rings (is another socket already bound there?)")]
    NoRings { iface: String, queue: u32 },
}

fn errno_of(e: &(dyn std::error::Error + 'static)) -> io::Error {
    e.source()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(|e| e.raw_os_error())
        .map_or_else(
            || io::Error::other(e.to_string()),
            io::Error::from_raw_os_error,
        )
}

fn socket_hint(err: &io::Error, mode: XdpMode) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "permission denied: run as root, or grant CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF and CAP_SYS_ADMIN".into(),
        Some(libc::EOPNOTSUPP) if mode == XdpMode::Native => "the driver does not support native XDP here; set `xdp.mode: skb` in the config".into(),
        Some(libc::EOPNOTSUPP) => "the kernel refused this socket mode".into(),
        Some(libc::EBUSY) => "the queue is busy: another AF_XDP socket or XDP program owns it (see `ip link show`; detach with `ip link set dev IF xdp off`)".into(),
        Some(libc::EINVAL) => "invalid request: the queue may not exist (check `queues` against `ethtool -l IF`) or the MTU is too large for XDP on this driver".into(),
        Some(libc::ENOMEM) | Some(libc::ENOBUFS) => "out of memory: raise the memlock limit (`ulimit -l unlimited`, or LimitMEMLOCK=infinity) or lower `frames`".into(),
        Some(libc::ENODEV) | Some(libc::ENXIO) => "no such interface or queue".into(),
        _ => "see the underlying error".into(),
    }
}

/// Socket geometry and mode, from the config.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    pub ring_size: u32,
    pub frame_size: u32,
    pub frames: u32,
    pub xdp_mode: XdpMode,
    pub zero_copy: ZeroCopy,
}

/// Creates a UMEM of `o.frames` frames with fill/completion rings of `o.ring_size`.
fn new_umem(o: &SocketOptions) -> Result<(Umem, Vec<FrameDesc>), SocketError> {
    let ring = QueueSize::new(o.ring_size).map_err(|e| SocketError::Sizes(e.to_string()))?;
    let frame = FrameSize::new(o.frame_size).map_err(|e| SocketError::Sizes(e.to_string()))?;
    let cfg = UmemConfig::builder()
        .frame_size(frame)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()
        .map_err(|e| SocketError::Sizes(e.to_string()))?;
    let count =
        NonZeroU32::new(o.frames).ok_or_else(|| SocketError::Sizes("frames must be > 0".into()))?;
    Umem::new(cfg, count, false).map_err(|e| {
        let errno = errno_of(&e);
        SocketError::Umem {
            bytes: o.frames as usize * o.frame_size as usize,
            hint: match errno.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOMEM) => "the memlock limit is too low or privileges are missing: run as root with `ulimit -l unlimited` (systemd: LimitMEMLOCK=infinity)",
                _ => "see the underlying error",
            },
            source: Box::new(e),
        }
    })
}

/// Free frames owned by one worker.
pub struct Pool {
    free: Vec<FrameDesc>,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// Up to [`MAX_BURST`] owned frames: the frames of one RX burst, or those about to be sent.
pub struct Burst {
    descs: [FrameDesc; MAX_BURST],
    len: usize,
}

impl Default for Burst {
    fn default() -> Self {
        Burst {
            descs: [FrameDesc::default(); MAX_BURST],
            len: 0,
        }
    }
}

impl Burst {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves every frame out: frame `i` goes to the end of `to` when `keep[i]`, else back to
    /// the pool (the packet is dropped). `self` is empty afterwards, so each frame moved exactly
    /// once. `to` must have room for the kept frames.
    #[inline]
    pub fn split_into(&mut self, keep: &[bool], to: &mut Burst, pool: &mut Pool) {
        for (i, desc) in self.descs[..self.len].iter().enumerate() {
            if keep[i] && to.len < MAX_BURST {
                to.descs[to.len] = *desc;
                to.len += 1;
            } else {
                pool.free.push(*desc);
            }
        }
        self.len = 0;
    }
}

/// One AF_XDP socket with its rings.
pub struct Port {
    pub iface: String,
    pub queue: u32,
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// Frames on the TX ring not yet completed.
    in_flight: usize,
    ring_size: u32,
}

/// The two sockets of one worker on a shared UMEM, and its frame pool.
pub struct QueuePair {
    umem: Umem,
    pub ext: Port,
    pub int: Port,
    pub pool: Pool,
    /// True when the driver refused zero-copy and the sockets run in copy mode.
    pub copy_mode: bool,
}

impl QueuePair {
    /// Creates the UMEM and binds `ext:queue` and `int:queue` to it. libxdp loads its redirect
    /// program on each interface (or reuses the one already loaded for other queues). With
    /// `zero_copy: auto`, a refusal on either socket reopens the whole pair in copy mode: sockets
    /// sharing a UMEM share its mode.
    pub fn open(
        ext: &str,
        int: &str,
        queue: u32,
        o: &SocketOptions,
    ) -> Result<QueuePair, SocketError> {
        match o.zero_copy {
            ZeroCopy::Off => Self::open_mode(ext, int, queue, o, true),
            ZeroCopy::On => Self::open_mode(ext, int, queue, o, false),
            ZeroCopy::Auto => match Self::open_mode(ext, int, queue, o, false) {
                Err(SocketError::Socket { source, iface, .. })
                    if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    tracing::warn!(iface = iface.as_str(), queue, "the driver refused zero-copy AF_XDP; the queue pair falls back to copy mode (expected on veth)");
                    Self::open_mode(ext, int, queue, o, true)
                }
                other => other,
            },
        }
    }

    fn open_mode(
        ext: &str,
        int: &str,
        queue: u32,
        o: &SocketOptions,
        copy_mode: bool,
    ) -> Result<QueuePair, SocketError> {
        let (umem, descs) = new_umem(o)?;

        let ext_port = Port::bind(&umem, ext, queue, o, copy_mode)?;
        let int_port = Port::bind(&umem, int, queue, o, copy_mode)?;
        Ok(QueuePair {
            umem,
            ext: ext_port,
            int: int_port,
            pool: Pool { free: descs },
            copy_mode,
        })
    }

    /// Borrows the pair's pieces for moving frames from `ext` to `int` (`ingress`) or back.
    #[inline]
    pub fn parts(&mut self, ingress: bool) -> Parts<'_> {
        let (from, to) = if ingress {
            (&mut self.ext, &mut self.int)
        } else {
            (&mut self.int, &mut self.ext)
        };
        Parts {
            frames: Frames { umem: &self.umem },
            from,
            to,
            pool: &mut self.pool,
        }
    }

    /// Reaps both completion rings into the pool. Returns how many frames came back.
    #[inline]
    pub fn reap(&mut self) -> usize {
        self.ext.reap(&mut self.pool) + self.int.reap(&mut self.pool)
    }

    /// Tops up both fill rings from the pool, half each at most. Returns frames given.
    #[inline]
    pub fn refill(&mut self) -> usize {
        let half = self.pool.len().div_ceil(2);
        self.ext.refill(&mut self.pool, half) + self.int.refill(&mut self.pool, usize::MAX)
    }
}

/// Read access to the frames of one UMEM.
pub struct Frames<'a> {
    umem: &'a Umem,
}

impl Frames<'_> {
    /// The bytes of frame `i` of `burst`, which must hold frames received on this UMEM.
    #[inline]
    pub fn data<'b>(&'b self, burst: &'b Burst, i: usize) -> &'b [u8] {
        debug_assert!(i < burst.len);
        // SAFETY: `burst` holds frames of this UMEM that the kernel handed back through an RX ring
        // and that are not on any ring now (a descriptor is in exactly one place), so nothing
        // writes the frame while this shared borrow lives; the gateway never writes frames.
        unsafe { self.umem.data(&burst.descs[i]) }.contents()
    }
}

/// A queue pair split for one direction of forwarding.
pub struct Parts<'a> {
    pub frames: Frames<'a>,
    pub from: &'a mut Port,
    pub to: &'a mut Port,
    pub pool: &'a mut Pool,
}

impl Port {
    fn bind(
        umem: &Umem,
        iface: &str,
        queue: u32,
        o: &SocketOptions,
        copy: bool,
    ) -> Result<Port, SocketError> {
        let mode = match (copy, o.xdp_mode) {
            (true, XdpMode::Native) => "native XDP, copy mode",
            (true, XdpMode::Skb) => "skb XDP, copy mode",
            (false, XdpMode::Native) => "native XDP, zero-copy",
            (false, XdpMode::Skb) => "skb XDP, zero-copy",
        };
        let fail = |source: io::Error| SocketError::Socket {
            iface: iface.to_string(),
            queue,
            mode,
            hint: socket_hint(&source, o.xdp_mode),
            source,
        };
        let ring = QueueSize::new(o.ring_size).map_err(|e| SocketError::Sizes(e.to_string()))?;
        let name: Interface = iface
            .parse()
            .map_err(|_| fail(io::Error::from_raw_os_error(libc::ENODEV)))?;
        let mut bind = BindFlags::XDP_USE_NEED_WAKEUP;
        bind |= if copy {
            BindFlags::XDP_COPY
        } else {
            BindFlags::XDP_ZEROCOPY
        };
        let cfg = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            // Never inhibit libxdp's program load: sockets on queues > 0 must be registered in
            // its XSK map, which only happens on the load path.
            .libxdp_flags(LibxdpFlags::empty())
            .xdp_flags(match o.xdp_mode {
                XdpMode::Native => XdpFlags::XDP_FLAGS_DRV_MODE,
                XdpMode::Skb => XdpFlags::XDP_FLAGS_SKB_MODE,
            })
            .bind_flags(bind)
            .build();
        // SAFETY: `umem` outlives the returned queues (xsk-rs keeps a clone of it inside each
        // socket); every frame given to these rings comes from this UMEM's own pool; and each
        // (interface, queue) is bound once per UMEM (the config rejects ext == int), so libxdp's
        // program load is never asked to register the same queue twice.
        let (tx, rx, rings) =
            unsafe { Socket::new(cfg, umem, &name, queue) }.map_err(|e| fail(errno_of(&e)))?;
        let (fill, comp) = rings.ok_or_else(|| SocketError::NoRings {
            iface: iface.to_string(),
            queue,
        })?;
        Ok(Port {
            iface: iface.to_string(),
            queue,
            rx,
            tx,
            fill,
            comp,
            in_flight: 0,
            ring_size: o.ring_size,
        })
    }

    /// Receives up to `max` frames into `burst` (which must be empty).
    #[inline]
    pub fn recv(&mut self, burst: &mut Burst, max: usize) -> usize {
        debug_assert!(burst.len == 0);
        let max = max.min(MAX_BURST);
        // SAFETY: the descriptors written are frames the kernel returns from this socket's RX ring;
        // they were given to a fill ring of this UMEM and are now owned by `burst` alone.
        let n = unsafe { self.rx.consume(&mut burst.descs[..max]) };
        burst.len = n;
        n
    }

    /// Queues `burst` for transmission. Frames the TX ring had no room for go back to the pool;
    /// returns (sent, dropped). `burst` is empty afterwards.
    #[inline]
    pub fn send(&mut self, burst: &mut Burst, pool: &mut Pool) -> (usize, usize) {
        if burst.len == 0 {
            return (0, 0);
        }
        // libxdp's reserve is all-or-nothing, so ask for no more than the ring has room for.
        let room = (self.tx.nb_free(burst.len as u32) as usize).min(burst.len);
        // SAFETY: every frame in `burst` belongs to this UMEM and is owned by `burst` only; the
        // accepted ones now belong to the TX ring until they come back through `comp`.
        let sent = unsafe { self.tx.produce(&burst.descs[..room]) };
        pool.free.extend_from_slice(&burst.descs[sent..burst.len]);
        let dropped = burst.len - sent;
        self.in_flight += sent;
        burst.len = 0;
        (sent, dropped)
    }

    /// Kicks the kernel to transmit while it asks for it and the TX ring still holds frames it has
    /// not taken. In copy mode each `sendto` sends at most 32 frames (the kernel's per-call TX
    /// budget), so a burst of 64 needs two; the loop is bounded so a stuck device cannot spin it.
    /// Returns the number of syscalls made.
    #[inline]
    pub fn kick_tx(&mut self) -> u64 {
        let mut calls = 0;
        while calls < 8 && self.tx.needs_wakeup() && self.tx.nb_free_exact() < self.ring_size {
            // ENOBUFS/EAGAIN/EBUSY/ENETDOWN are swallowed by xsk-rs (retry next burst); any other
            // error would recur on every burst and the ring would stall, visible in the counters.
            let _ = self.tx.wakeup();
            calls += 1;
        }
        calls
    }

    /// Wakes the driver to use the fill ring if it asked for it.
    #[inline]
    pub fn kick_fill(&mut self) -> bool {
        if self.fill.needs_wakeup() {
            let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
            return true;
        }
        false
    }

    fn reap(&mut self, pool: &mut Pool) -> usize {
        let mut total = 0;
        let mut tmp = [FrameDesc::default(); MAX_BURST];
        loop {
            // SAFETY: the completion ring returns frames this UMEM's TX rings sent; from here on
            // they are owned by the pool only.
            let n = unsafe { self.comp.consume(&mut tmp) };
            pool.free.extend_from_slice(&tmp[..n]);
            self.in_flight = self.in_flight.saturating_sub(n);
            total += n;
            if n < MAX_BURST {
                return total;
            }
        }
    }

    fn refill(&mut self, pool: &mut Pool, max: usize) -> usize {
        let want = pool.free.len().min(max) as u32;
        if want == 0 {
            return 0;
        }
        let room = self.fill.nb_free(want) as usize;
        let take = room.min(want as usize);
        let start = pool.free.len() - take;
        // SAFETY: the frames come off the pool (owned by nobody else) and belong to this UMEM;
        // only the ones the ring accepted are removed from the pool.
        let given = unsafe { self.fill.produce(&pool.free[start..]) };
        pool.free.truncate(pool.free.len() - given);
        given
    }

    /// Frames queued for TX whose completion has not been reaped yet.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn rx_fd(&self) -> i32 {
        self.rx.fd().as_raw_fd()
    }
}

/// The kernel's counters for one AF_XDP socket: frames it dropped before the gateway saw them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct KernelStats {
    /// Dropped for reasons other than invalid descriptors (e.g. no room).
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Dropped because the RX ring was full (the worker fell behind).
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when the kernel needed a frame.
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

const SOL_XDP: libc::c_int = 283;
const XDP_STATISTICS: libc::c_int = 7;

/// Reads `XDP_STATISTICS` of an AF_XDP socket by descriptor. `None` if the socket is gone.
pub fn kernel_stats(fd: i32) -> Option<KernelStats> {
    let mut raw = [0u64; 6];
    let mut len = std::mem::size_of_val(&raw) as libc::socklen_t;
    // SAFETY: `raw` is a live, writable buffer of `len` bytes, the layout of `struct
    // xdp_statistics` (six __u64) since Linux 5.9; the kernel writes at most `len` bytes and
    // reports how many.
    let r = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_STATISTICS,
            raw.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0).then(|| KernelStats {
        rx_dropped: raw[0],
        rx_invalid_descs: raw[1],
        tx_invalid_descs: raw[2],
        rx_ring_full: raw[3],
        rx_fill_ring_empty_descs: raw[4],
        tx_ring_empty_descs: raw[5],
    })
}

/// One AF_XDP socket with its own UMEM: the benchmark's traffic generator (TX) or sink (RX).
/// The same ownership rule holds: a descriptor is in the pool, a ring, or a `Burst`, never two.
pub struct Endpoint {
    umem: Umem,
    port: Port,
    pool: Pool,
    pub copy_mode: bool,
}

impl Endpoint {
    pub fn open(iface: &str, queue: u32, o: &SocketOptions) -> Result<Endpoint, SocketError> {
        let (umem, descs) = new_umem(o)?;
        let (port, copy_mode) =
            match Port::bind(&umem, iface, queue, o, o.zero_copy == ZeroCopy::Off) {
                Err(SocketError::Socket { source, .. })
                    if o.zero_copy == ZeroCopy::Auto
                        && source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    (Port::bind(&umem, iface, queue, o, true)?, true)
                }
                other => (other?, o.zero_copy == ZeroCopy::Off),
            };
        Ok(Endpoint {
            umem,
            port,
            pool: Pool { free: descs },
            copy_mode,
        })
    }

    /// Writes every free frame once: `fill(i, buf)` writes frame `i`'s bytes into `buf` (the
    /// frame's whole data area) and returns the frame length.
    pub fn write_frames(&mut self, mut fill: impl FnMut(usize, &mut [u8]) -> usize) {
        for (i, desc) in self.pool.free.iter_mut().enumerate() {
            // SAFETY: the pool owns these frames (none is on a ring), so nothing else reads or
            // writes them while this exclusive borrow lives.
            let mut data = unsafe { self.umem.data_mut(desc) };
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
    pub fn send(&mut self, n: usize, len: usize, mut patch: impl FnMut(&mut [u8])) -> usize {
        let mut burst = Burst::default();
        let take = n.min(MAX_BURST).min(self.pool.free.len());
        for _ in 0..take {
            let Some(mut desc) = self.pool.free.pop() else {
                break;
            };
            {
                // SAFETY: the frame was just taken off the pool; nothing else accesses it.
                let mut data = unsafe { self.umem.data_mut(&mut desc) };
                // A completed frame comes back with length 0; its bytes are still there.
                data.cursor().set_pos(len);
                patch(data.contents_mut());
            }
            burst.descs[burst.len] = desc;
            burst.len += 1;
        }
        let (sent, _) = self.port.send(&mut burst, &mut self.pool);
        sent
    }

    /// Reaps completions and kicks TX. Returns frames in flight.
    pub fn service_tx(&mut self) -> usize {
        self.port.reap(&mut self.pool);
        if self.port.in_flight() > 0 {
            self.port.kick_tx();
        }
        self.port.in_flight()
    }

    /// Receives up to one burst, calls `f` on each frame's bytes, and recycles the frames.
    pub fn receive(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        self.port.refill(&mut self.pool, usize::MAX);
        self.port.kick_fill();
        let mut burst = Burst::default();
        let n = self.port.recv(&mut burst, MAX_BURST);
        let frames = Frames { umem: &self.umem };
        for i in 0..n {
            f(frames.data(&burst, i));
        }
        burst.split_into(
            &[false; MAX_BURST][..n],
            &mut Burst::default(),
            &mut self.pool,
        );
        n
    }

    pub fn rx_fd(&self) -> i32 {
        self.port.rx_fd()
    }
}
