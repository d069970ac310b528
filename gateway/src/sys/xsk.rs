//! AF_XDP sockets through xsk-rs: the real [`Rings`] of a queue pair.
//!
//! xsk-rs hands out `FrameDesc`s, which are `Copy`, and leaves it to callers (through `unsafe fn`)
//! to never give the kernel a frame twice. [`XskRings`] can only be created here, inside a
//! [`QueuePair`], whose bookkeeping keeps *a descriptor in exactly one place* (see
//! [`super::ring`]); every `// SAFETY:` comment below relies on that invariant.
//!
//! One [`QueuePair`] per worker: the sockets on `ext:q` and `int:q` share one UMEM, each with its
//! own fill/completion ring pair, so forwarding moves a descriptor from one socket's RX ring to the
//! other's TX ring without copying the frame.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use super::ring::{QueuePair, Rings, Side};
use super::{XdpMode, ZeroCopy};

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
    #[error("interfaces.ext `{ext}` and interfaces.int `{int}` are one device (ifindex {ifindex}: an alternative name?); the gateway needs two")]
    SameDevice {
        ext: String,
        int: String,
        ifindex: u32,
    },
    #[error("interface `{iface}` does not exist in this network namespace")]
    NoDevice { iface: String },
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

/// One AF_XDP socket's four rings.
struct Port {
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    ring_size: u32,
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
        // (device, queue) is bound once per UMEM (`open_mode` refuses two names of one ifindex,
        // so an alternative name cannot bind one queue twice), so libxdp's program load is never
        // asked to register the same queue twice.
        let (tx, rx, rings) =
            unsafe { Socket::new(cfg, umem, &name, queue) }.map_err(|e| fail(errno_of(&e)))?;
        let (fill, comp) = rings.ok_or_else(|| SocketError::NoRings {
            iface: iface.to_string(),
            queue,
        })?;
        Ok(Port {
            rx,
            tx,
            fill,
            comp,
            ring_size: o.ring_size,
        })
    }
}

/// The real rings of a queue pair: two AF_XDP sockets bound to one UMEM. Only
/// [`open_pair`] creates them, inside the [`QueuePair`] whose bookkeeping they rely on.
pub struct XskRings {
    umem: Umem,
    ports: [Port; 2],
}

/// Creates the UMEM and binds `ext:queue` and `int:queue` to it. libxdp loads its redirect
/// program on each interface (or reuses the one already loaded for other queues). With
/// `zero_copy: auto`, a refusal on either socket reopens the whole pair in copy mode: sockets
/// sharing a UMEM share its mode.
pub fn open_pair(
    ext: &str,
    int: &str,
    queue: u32,
    o: &SocketOptions,
) -> Result<QueuePair<XskRings>, SocketError> {
    match o.zero_copy {
        ZeroCopy::Off => open_mode(ext, int, queue, o, true),
        ZeroCopy::On => open_mode(ext, int, queue, o, false),
        ZeroCopy::Auto => match open_mode(ext, int, queue, o, false) {
            Err(SocketError::Socket { source, iface, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                tracing::warn!(iface = iface.as_str(), queue, "the driver refused zero-copy AF_XDP; the queue pair falls back to copy mode (expected on veth)");
                open_mode(ext, int, queue, o, true)
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
) -> Result<QueuePair<XskRings>, SocketError> {
    let index = |iface: &str| {
        nix::net::if_::if_nametoindex(iface).map_err(|_| SocketError::NoDevice {
            iface: iface.to_string(),
        })
    };
    let ifindex = index(ext)?;
    if ifindex == index(int)? {
        return Err(SocketError::SameDevice {
            ext: ext.to_string(),
            int: int.to_string(),
            ifindex,
        });
    }
    let (umem, descs) = new_umem(o)?;
    let ext_port = Port::bind(&umem, ext, queue, o, copy_mode)?;
    let int_port = Port::bind(&umem, int, queue, o, copy_mode)?;
    let rings = XskRings {
        umem,
        ports: [ext_port, int_port],
    };
    Ok(QueuePair::new(rings, descs, copy_mode))
}

impl Rings for XskRings {
    type Desc = FrameDesc;

    #[inline]
    fn frame(&self, desc: &FrameDesc) -> &[u8] {
        // SAFETY: the queue pair only asks for frames of its RX burst: frames of this UMEM that
        // the kernel handed back through an RX ring and that are on no ring now (a descriptor is
        // in exactly one place), so nothing writes the frame while this shared borrow lives; the
        // gateway never writes frames.
        unsafe { self.umem.data(desc) }.contents()
    }

    #[inline]
    fn rx(&mut self, side: Side, out: &mut [FrameDesc]) -> usize {
        // SAFETY: the descriptors written are frames the kernel returns from this socket's RX
        // ring; they were given to a fill ring of this UMEM and are now owned by `out` alone.
        unsafe { self.ports[side as usize].rx.consume(out) }
    }

    #[inline]
    fn tx(&mut self, side: Side, descs: &[FrameDesc]) -> usize {
        let tx = &mut self.ports[side as usize].tx;
        // libxdp's reserve is all-or-nothing, so ask for no more than the ring has room for.
        let room = (tx.nb_free(descs.len() as u32) as usize).min(descs.len());
        // SAFETY: every frame in `descs` belongs to this UMEM and is owned by the caller only;
        // the accepted ones now belong to the TX ring until they come back through `complete`.
        unsafe { tx.produce(&descs[..room]) }
    }

    #[inline]
    fn fill(&mut self, side: Side, descs: &[FrameDesc]) -> usize {
        let fill = &mut self.ports[side as usize].fill;
        let room = (fill.nb_free(descs.len() as u32) as usize).min(descs.len());
        // SAFETY: the frames are free (owned by the caller's pool and nobody else) and belong
        // to this UMEM; the caller removes exactly the accepted prefix from its pool.
        unsafe { fill.produce(&descs[..room]) }
    }

    #[inline]
    fn complete(&mut self, side: Side, out: &mut [FrameDesc]) -> usize {
        // SAFETY: the completion ring returns frames this UMEM's TX rings sent; from here on
        // they are owned by `out` (and then the caller's pool) only.
        unsafe { self.ports[side as usize].comp.consume(out) }
    }

    /// Kicks the kernel to transmit while it asks for it and the TX ring still holds frames it
    /// has not taken. In copy mode each `sendto` sends at most 32 frames (the kernel's per-call
    /// TX budget), so a burst of 64 needs two; the loop is bounded so a stuck device cannot spin
    /// it.
    #[inline]
    fn kick_tx(&mut self, side: Side) -> u64 {
        let p = &mut self.ports[side as usize];
        let mut calls = 0;
        while calls < 8 && p.tx.needs_wakeup() && p.tx.nb_free_exact() < p.ring_size {
            // ENOBUFS/EAGAIN/EBUSY/ENETDOWN are swallowed by xsk-rs (retry next burst); any other
            // error would recur on every burst and the ring would stall, visible in the counters.
            let _ = p.tx.wakeup();
            calls += 1;
        }
        calls
    }

    #[inline]
    fn kick_fill(&mut self, side: Side) -> bool {
        let p = &mut self.ports[side as usize];
        if p.fill.needs_wakeup() {
            let _ = p.fill.wakeup(p.rx.fd_mut(), 0);
            return true;
        }
        false
    }

    fn fd(&self, side: Side) -> Option<RawFd> {
        Some(self.ports[side as usize].rx.fd().as_raw_fd())
    }
}

/// The kernel's counters for one AF_XDP socket: frames it dropped before the gateway saw them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
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

/// Reads `XDP_STATISTICS` of an AF_XDP socket by descriptor (the control thread reads the
/// workers' sockets this way). `None` if the socket is gone.
pub(crate) fn kernel_stats(fd: RawFd) -> Option<KernelStats> {
    // SAFETY: `xdp_statistics` is a plain struct of integers; all zeroes is a valid value.
    let mut raw: libc::xdp_statistics = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::xdp_statistics>() as libc::socklen_t;
    // SAFETY: `raw` is a live, writable `struct xdp_statistics` of `len` bytes; the kernel writes
    // at most `len` bytes and reports how many.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            libc::XDP_STATISTICS,
            (&mut raw as *mut libc::xdp_statistics).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(KernelStats {
        rx_dropped: raw.rx_dropped,
        rx_invalid_descs: raw.rx_invalid_descs,
        tx_invalid_descs: raw.tx_invalid_descs,
        rx_ring_full: raw.rx_ring_full,
        rx_fill_ring_empty_descs: raw.rx_fill_ring_empty_descs,
        tx_ring_empty_descs: raw.tx_ring_empty_descs,
    })
}

/// One AF_XDP socket on its own UMEM, unwrapped: for traffic generators and sinks outside the
/// gateway (the bench), which write frames and so manage ownership themselves, through
/// xsk-rs's `unsafe fn`s.
pub struct Single {
    pub umem: Umem,
    pub frames: Vec<FrameDesc>,
    pub rx: RxQueue,
    pub tx: TxQueue,
    pub fill: FillQueue,
    pub comp: CompQueue,
    pub copy_mode: bool,
}

/// Opens one socket on `iface:queue` with its own UMEM (`zero_copy: auto` falls back to copy
/// mode).
pub fn open_single(iface: &str, queue: u32, o: &SocketOptions) -> Result<Single, SocketError> {
    let (umem, frames) = new_umem(o)?;
    let (port, copy_mode) = match Port::bind(&umem, iface, queue, o, o.zero_copy == ZeroCopy::Off) {
        Err(SocketError::Socket { source, .. })
            if o.zero_copy == ZeroCopy::Auto && source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            (Port::bind(&umem, iface, queue, o, true)?, true)
        }
        other => (other?, o.zero_copy == ZeroCopy::Off),
    };
    Ok(Single {
        umem,
        frames,
        rx: port.rx,
        tx: port.tx,
        fill: port.fill,
        comp: port.comp,
        copy_mode,
    })
}
