//! Which XDP program an interface runs, and detaching it (libbpf's netlink helpers).

use std::io;

use super::XdpMode;

const XDP_FLAGS_SKB_MODE: u32 = 2;
const XDP_FLAGS_DRV_MODE: u32 = 4;

fn flags(mode: XdpMode) -> u32 {
    match mode {
        XdpMode::Native => XDP_FLAGS_DRV_MODE,
        XdpMode::Skb => XDP_FLAGS_SKB_MODE,
    }
}

/// The id of the XDP program attached to `ifindex` in `mode`, if any.
pub fn attached(ifindex: u32, mode: XdpMode) -> io::Result<Option<u32>> {
    let mut id: u32 = 0;
    // SAFETY: `id` is a live u32 the call writes the program id into; libbpf reads no other
    // memory of ours.
    let r = unsafe { libxdp_sys::bpf_xdp_query_id(ifindex as i32, flags(mode) as i32, &mut id) };
    match r {
        0 => Ok((id != 0).then_some(id)),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// Detaches whatever XDP program `ifindex` runs in `mode`. Detaching nothing is not an error.
pub fn detach(ifindex: u32, mode: XdpMode) -> io::Result<()> {
    // SAFETY: a null `opts` is documented as "no options"; the call only sends a netlink message.
    let r = unsafe { libxdp_sys::bpf_xdp_detach(ifindex as i32, flags(mode), std::ptr::null()) };
    match r {
        0 => Ok(()),
        e if -e == libc::ENOENT || -e == libc::ENODEV => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}
