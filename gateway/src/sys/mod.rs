//! Everything that talks to the kernel through `unsafe`: AF_XDP sockets, XDP attach queries,
//! raw AF_PACKET sends and poll(2). The rest of the crate is safe code (`unsafe_code` is denied
//! workspace-wide and allowed only here), and every unsafe block says why it holds.

pub mod packet;
pub mod xdp;
pub mod xsk;

use std::io;
use std::os::fd::RawFd;

/// Waits until one of `fds` is readable or `timeout_ms` passes. Returns whether one is readable.
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<bool> {
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(pfds.len());
    for (p, fd) in pfds.iter_mut().zip(fds) {
        p.fd = *fd;
        p.events = libc::POLLIN;
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
