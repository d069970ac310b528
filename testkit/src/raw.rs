//! A raw AF_PACKET sender: puts arbitrary bytes on the wire of one interface. The lab and the tests
//! use it to send malformed frames the kernel's own stack would never build.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A send-only packet socket bound to one interface.
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSender {
    pub fn open(iface: &str) -> io::Result<RawSender> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)? as i32;
        // Protocol 0: the socket receives nothing, it only sends.
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawSender { fd, ifindex })
    }

    /// Sends one frame as is (it must start with an Ethernet header).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() < 14 {
            // The kernel refuses frames shorter than the link header; pad what the test meant
            // as "runt" up to it so it reaches the wire as a truncated packet.
            let mut padded = [0u8; 14];
            padded[..frame.len()].copy_from_slice(frame);
            return self.send(&padded);
        }
        let mut addr: libc::sockaddr_ll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: 0,
            sll_ifindex: self.ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: [0; 8],
        };
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are live for the call and their lengths are passed exactly.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
