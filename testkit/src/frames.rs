//! Hand-built frames for the tracker's attack tests: any VLAN tags, IPv4 with any fragment
//! field, IPv6 with any extension headers (the Fragment header written from RFC 8200's figure,
//! not by a library under test), TCP with any flags, sequence numbers and options and a right (or
//! deliberately wrong) checksum, UDP, ICMP queries and errors with any quote.

/// Ethernet with `tags` (VLAN ids, outermost first; 0x88a8 for the outer tag of two), then
/// `ethertype` and `l3`.
pub fn eth(tags: &[u16], ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0x99, 0, 0, 0, 2, 2, 0x99, 0, 0, 0, 1];
    for (i, vid) in tags.iter().enumerate() {
        let tpid: u16 = if tags.len() > 1 && i == 0 {
            0x88a8
        } else {
            0x8100
        };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// An IPv4 packet: `frag` is the flags-and-offset field (0x2000 = more fragments, offset in
/// 8-byte units below it), `id` the identification.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, id: u16, frag: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = !fold(sum(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet whose first next-header is `next` and whose body (extension headers included)
/// is `body`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(body);
    h
}

/// An IPv6 Fragment header (RFC 8200 §4.5): next header, reserved, then 13 bits of offset in
/// 8-octet units, two reserved bits and the M flag, then the identification.
pub fn v6_fragment(next: u8, offset_bytes: u16, more: bool, id: u32) -> Vec<u8> {
    assert!(offset_bytes.is_multiple_of(8));
    let field = (offset_bytes / 8) << 3 | more as u16;
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// An 8-byte IPv6 Destination Options header (PadN) whose next header is `next`.
pub fn v6_dest_opts(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

fn sum(b: &[u8], mut acc: u64) -> u64 {
    for c in b.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of `src`/`dst` (4 or 16 bytes each), protocol and length.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    sum(dst, sum(src, proto as u64 + len as u64))
}

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// A TCP segment between `src` and `dst` (4 or 16 bytes each), with `opts` (padded to 4 bytes)
/// and a right checksum, or a wrong one when `bad_checksum`.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: &[u8],
    dst: &[u8],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: &[u8],
    data: &[u8],
    bad_checksum: bool,
) -> Vec<u8> {
    let mut o = opts.to_vec();
    while !o.len().is_multiple_of(4) {
        o.push(1); // NOP
    }
    let doff = (20 + o.len()) / 4;
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(&ack.to_be_bytes());
    s.extend_from_slice(&[(doff as u8) << 4, flags]);
    s.extend_from_slice(&win.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(&o);
    s.extend_from_slice(data);
    let mut c = !fold(sum(&s, pseudo(src, dst, 6, s.len())));
    if bad_checksum {
        c ^= 0x5a5a;
    }
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram (checksum 0: not checked by the gateway, allowed over IPv4).
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(data);
    s
}

/// An ICMP (or ICMPv6) message: type, code, the four bytes after the checksum, the body.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut s = vec![ty, code, 0, 0];
    s.extend_from_slice(&rest);
    s.extend_from_slice(body);
    let c = !fold(sum(&s, 0));
    s[2..4].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMPv6 message between `src` and `dst` (its checksum covers the IPv6 pseudo-header).
pub fn icmp6(
    src: [u8; 16],
    dst: [u8; 16],
    ty: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut s = vec![ty, code, 0, 0];
    s.extend_from_slice(&rest);
    s.extend_from_slice(body);
    let c = !fold(sum(&s, pseudo(&src, &dst, 58, s.len())));
    s[2..4].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMP query: identifier and sequence number in the four bytes after the checksum.
pub fn icmp_query(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut rest = [0; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[2..].copy_from_slice(&seq.to_be_bytes());
    icmp(ty, 0, rest, b"query")
}
