//! Everything that talks to the kernel through `unsafe`: AF_XDP sockets, XDP attach queries and
//! poll(2). The rest of the crate is safe code (`unsafe_code` is denied workspace-wide and allowed
//! only here), and every unsafe block says why it holds. This module imports nothing from the
//! rest of the crate.
//!
//! - [`ring`]: the [`ring::Rings`] trait and the [`ring::QueuePair`] that moves descriptors;
//! - [`xsk`]: the real rings (AF_XDP through xsk-rs) and the kernel's socket statistics;
//! - [`fake`]: in-memory rings for tests and benchmarks;
//! - [`xdp`]: which XDP program an interface runs, and detaching it;
//! - [`huge`]: large arrays on transparent huge pages (the connection tracker's table);
//! - [`siphash`]: the tracker's keyed hash, a burst at a time with AVX-512 or AVX2;
//! - [`prefetch`]: a cache hint for the connection tracker's burst;
//! - [`default_sigpipe`]: SIGPIPE's default action back, for the printing subcommands.

pub mod fake;
pub mod huge;
#[cfg(feature = "runtime")]
pub mod liblog;
pub mod ring;
pub mod siphash;
#[cfg(feature = "runtime")]
pub mod xdp;
#[cfg(feature = "runtime")]
pub mod xsk;

use std::io;
use std::os::fd::RawFd;

/// Restores the default action of SIGPIPE (end the process quietly), which the Rust runtime
/// replaces with "ignore": a command whose output goes to a pipe that closes (`portcullis check
/// | head -1`) then stops like any Unix filter, instead of failing a write and panicking. Only
/// for the printing subcommands: the gateway itself keeps ignoring it.
pub fn default_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: installing SIG_DFL runs no handler code of ours, so there is no handler that could
    // touch non-async-signal-safe state; it is done once, at start, before any thread exists.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Clock ticks per second and the page size (for `process_*` metrics from /proc).
pub fn clock_ticks_and_page_size() -> (f64, f64) {
    // SAFETY: sysconf only reads system constants; it has no memory effects.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (
        if ticks > 0 { ticks as f64 } else { 100.0 },
        if page > 0 { page as f64 } else { 4096.0 },
    )
}

/// Asks the CPU to bring the cache line of `r` in, without waiting for it (a hint: no fault, no
/// effect on the program's results). The tracker's burst prefetches the slots its lookups will
/// read, so that a burst's cache misses overlap. A no-op off x86-64.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is a hint that never faults and reads or writes nothing the program
    // can observe; SSE, which has it, is part of the x86-64 baseline; and `r` is a live
    // reference, so the address is even a valid one.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(r as *const T as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Where the XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver (native) XDP.
    Native,
    /// Generic (skb) XDP: works everywhere, slower.
    Skb,
}

/// Whether the sockets use zero-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    /// Try zero-copy, fall back to copy mode with a warning.
    Auto,
    /// Zero-copy or fail.
    On,
    /// Copy mode.
    Off,
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (with no descriptor, it just
/// sleeps). Returns whether one is readable.
pub fn wait_readable(fds: &[Option<RawFd>], timeout_ms: i32) -> io::Result<bool> {
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let mut n = 0;
    for fd in fds.iter().flatten().take(pfds.len()) {
        pfds[n].fd = *fd;
        pfds[n].events = libc::POLLIN;
        n += 1;
    }
    // SAFETY: `pfds` is a live array of `n` initialised pollfd structs; poll(2) writes only their
    // `revents` fields.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
    match r {
        r if r >= 0 => Ok(r > 0),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}
