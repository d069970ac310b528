//! Frame parsing: Ethernet (with up to three 802.1Q/802.1ad tags), IPv4 (with options), IPv6
//! (with extension headers), TCP, UDP, SCTP, ICMPv4/v6, through etherparse's zero-copy slicer.
//!
//! Never panics and never allocates: every frame becomes a [`Frame`] or a [`Reason`] to drop it.
//! Fragments: the first fragment carries the transport header and yields ports; a non-first
//! fragment has none (`ports_known = false`), so only rules that need no ports can match it.
//! A first fragment too short to hold its ports is the RFC 1858 tiny-fragment attack and is
//! dropped.

use etherparse::err::packet::SliceError;
use etherparse::{Ipv6ExtensionSlice, LinkExtSlice, NetSlice, SlicedPacket, TransportSlice};
use policy::key::{proto, FlowKey, NO_VLAN};
use policy::rule::Direction;

use crate::conntrack::Track;
use crate::stats::Reason;

/// What a frame is, as far as the gateway cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Ip(FlowKey),
    Arp,
    /// Any other ethertype (LLDP, ...), or an unknown one behind VLAN tags.
    OtherL2,
}

/// Maps etherparse's error to a drop reason. `bad_ip_length`: the IP length field disagrees with
/// the frame (claims more than the frame holds, or less than its own header). `truncated`: a
/// header is cut off, by the end of the frame or by the enclosing packet's length.
fn malformed(e: &SliceError) -> Reason {
    use etherparse::err::{ip, ipv4, ipv6, Layer};
    match e {
        SliceError::Len(l) if matches!(l.layer, Layer::Ipv4Packet | Layer::Ipv6Packet) => {
            Reason::BadIpLength
        }
        SliceError::Len(_) => Reason::Truncated,
        // A version nibble that disagrees with the ethertype is one reason whichever the
        // ethertype (etherparse's only IPv6 header error is this one).
        SliceError::Ip(ip::HeaderError::UnsupportedIpVersion { .. })
        | SliceError::Ipv4(ipv4::HeaderError::UnexpectedVersion { .. })
        | SliceError::Ipv6(ipv6::HeaderError::UnexpectedVersion { .. }) => Reason::BadIpVersion,
        SliceError::Ip(_) | SliceError::Ipv4(_) => Reason::BadIpv4Header,
        SliceError::Ipv4Exts(_) | SliceError::Ipv6Exts(_) => Reason::BadIpExtension,
        SliceError::Tcp(_) => Reason::BadTransport,
        SliceError::LinuxSll(_) | SliceError::Macsec(_) => Reason::UnsupportedLink,
    }
}

/// Reads (sport, dport) from the start of a transport header that etherparse did not slice
/// (SCTP, or the first fragment of a fragmented datagram).
#[inline]
fn raw_ports(p: u8, payload: &[u8]) -> Option<(u16, u16)> {
    if proto::is_icmp(p) {
        return (payload.len() >= 2).then(|| (payload[0] as u16, payload[1] as u16));
    }
    // SCTP's common header is 12 bytes; TCP and UDP ports are the first 4 bytes of theirs.
    let need = if p == proto::SCTP { 12 } else { 4 };
    (payload.len() >= need).then(|| {
        (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        )
    })
}

fn has_ports(p: u8) -> bool {
    matches!(p, proto::TCP | proto::UDP | proto::SCTP) || proto::is_icmp(p)
}

/// Parses one frame received in `direction`.
#[inline]
pub fn parse(data: &[u8], direction: Direction) -> Result<Frame, Reason> {
    parse_tracked(data, direction).map(|(f, _)| f)
}

/// The header an ICMP error quotes (RFC 792, RFC 4443 §2.4: as much of the offending packet as
/// fits), as the key that packet had: it travelled the other way. `None` when too little is
/// quoted to know the flow.
fn quoted(inner: &[u8], error_dir: Direction, vlan: u16) -> Option<(FlowKey, u16)> {
    let dir = match error_dir {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    };
    let mut k = FlowKey {
        dir,
        vlan,
        ..FlowKey::default()
    };
    let rest = match inner.first()? >> 4 {
        4 => {
            let ihl = usize::from(inner[0] & 0x0f) * 4;
            if ihl < 20 || inner.len() < ihl {
                return None;
            }
            if u16::from_be_bytes([inner[6], inner[7]]) & 0x1fff != 0 {
                return None; // a non-first fragment quotes no ports
            }
            k.proto = inner[9];
            k.src = u32::from_be_bytes(inner[12..16].try_into().ok()?) as u128;
            k.dst = u32::from_be_bytes(inner[16..20].try_into().ok()?) as u128;
            &inner[ihl..]
        }
        6 if inner.len() >= 40 => {
            k.v6 = true;
            k.proto = inner[6];
            k.src = u128::from_be_bytes(inner[8..24].try_into().ok()?);
            k.dst = u128::from_be_bytes(inner[24..40].try_into().ok()?);
            &inner[40..]
        }
        _ => return None,
    };
    let (s, d) = raw_ports(k.proto, rest)?;
    k.sport = s;
    k.dport = d;
    let id = if proto::is_icmp(k.proto) && rest.len() >= 6 {
        u16::from_be_bytes([rest[4], rest[5]])
    } else {
        0
    };
    Some((k, id))
}

/// Whether an ICMP type is an error that quotes the packet that caused it.
fn icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

/// Reads the echo identifier or, for an error, the quoted header, from an ICMP message's body
/// (`body` starts at the ICMP header).
fn icmp_track(key: &FlowKey, body: &[u8], track: &mut Track) {
    let ty = key.sport as u8;
    if icmp_error(key.v6, ty) {
        if let Some((q, id)) = body
            .get(8..)
            .and_then(|inner| quoted(inner, key.dir, key.vlan))
        {
            track.quoted = Some(q);
            track.icmp_id = id;
        }
    } else if body.len() >= 6 {
        track.icmp_id = u16::from_be_bytes([body[4], body[5]]);
    }
}

/// [`parse`], plus what the connection tracker needs: TCP flags, the ICMP echo identifier, the
/// header an ICMP error quotes.
#[inline]
pub fn parse_tracked(data: &[u8], direction: Direction) -> Result<(Frame, Track), Reason> {
    let mut key = FlowKey::default();
    let mut track = Track::default();
    Ok(match parse_into(data, direction, &mut key, &mut track)? {
        Parsed::Ip => (Frame::Ip(key), track),
        Parsed::Arp => (Frame::Arp, track),
        Parsed::OtherL2 => (Frame::OtherL2, track),
    })
}

/// What [`parse_into`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// An IP packet: its key and tracker fields were written.
    Ip,
    Arp,
    OtherL2,
}

/// [`parse_tracked`] into the caller's burst arrays.
#[inline(always)]
pub(crate) fn parse_into(
    data: &[u8],
    direction: Direction,
    key: &mut FlowKey,
    track: &mut Track,
) -> Result<Parsed, Reason> {
    if let Some((k, flags)) = fast_path(data, direction) {
        *key = k;
        *track = Track {
            tcp_flags: flags,
            ..Track::default()
        };
        return Ok(Parsed::Ip);
    }
    parse_slow(data, direction, key, track)
}

/// Everything [`fast_path`] does not take, through etherparse.
#[inline(never)]
pub(crate) fn parse_slow(
    data: &[u8],
    direction: Direction,
    key: &mut FlowKey,
    track: &mut Track,
) -> Result<Parsed, Reason> {
    let (frame, t) = parse_sliced(data, direction)?;
    *track = t;
    Ok(match frame {
        Frame::Ip(k) => {
            *key = k;
            Parsed::Ip
        }
        Frame::Arp => Parsed::Arp,
        Frame::OtherL2 => Parsed::OtherL2,
    })
}

/// The common case at fixed offsets (DESIGN §4): untagged Ethernet, IPv4 without options, not
/// fragmented, TCP or UDP with consistent lengths: the key and the TCP flags (0 for UDP). Inlined
/// into the burst loop, the key stays in registers for the tracker's probe (reading back
/// fields just stored byte by byte would stall store forwarding). Anything else, or anything
/// odd, returns `None` and goes through etherparse; a test checks on generated and mutated
/// frames that whatever this accepts, etherparse parses to the same result.
#[inline(always)]
pub fn fast_path(b: &[u8], direction: Direction) -> Option<(FlowKey, u8)> {
    if b.len() < 14 + 20 + 8 || b[12] != 0x08 || b[13] != 0x00 || b[14] != 0x45 {
        return None;
    }
    let total = u16::from_be_bytes([b[16], b[17]]) as usize;
    // Fragmented (MF or an offset) goes the slow way; DF is fine.
    if u16::from_be_bytes([b[20], b[21]]) & 0x3fff != 0 || total < 20 + 8 || total > b.len() - 14 {
        return None;
    }
    let l4 = &b[34..14 + total];
    let proto_ = b[23];
    let flags = match proto_ {
        proto::TCP => {
            if l4.len() < 20 {
                return None;
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return None;
            }
            l4[13]
        }
        proto::UDP => {
            if l4.len() < 8 || u16::from_be_bytes([l4[4], l4[5]]) as usize != l4.len() {
                return None;
            }
            0
        }
        _ => return None,
    };
    let key = FlowKey {
        dir: direction,
        v6: false,
        src: u32::from_be_bytes([b[26], b[27], b[28], b[29]]) as u128,
        dst: u32::from_be_bytes([b[30], b[31], b[32], b[33]]) as u128,
        proto: proto_,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ports_known: true,
        vlan: NO_VLAN,
    };
    Some((key, flags))
}

/// The general parser: every link extension, IP version, extension header and transport.
pub fn parse_sliced(data: &[u8], direction: Direction) -> Result<(Frame, Track), Reason> {
    let mut track = Track::default();
    let pkt = SlicedPacket::from_ethernet(data).map_err(|e| malformed(&e))?;
    let vlan = pkt
        .link_exts
        .iter()
        .find_map(|x| match x {
            LinkExtSlice::Vlan(v) => Some(v.vlan_identifier().value()),
            LinkExtSlice::Macsec(_) => None,
        })
        .unwrap_or(NO_VLAN);
    let mut key = FlowKey {
        dir: direction,
        vlan,
        ..FlowKey::default()
    };
    let (payload, first_fragment) = match &pkt.net {
        None => return Ok((Frame::OtherL2, track)),
        Some(NetSlice::Arp(_)) => return Ok((Frame::Arp, track)),
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            key.src = u32::from_be_bytes(h.source()) as u128;
            key.dst = u32::from_be_bytes(h.destination()) as u128;
            (ip.payload(), h.fragments_offset().value() == 0)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            key.v6 = true;
            key.src = u128::from_be_bytes(h.source());
            key.dst = u128::from_be_bytes(h.destination());
            let first = ip.extensions().clone().into_iter().all(|x| match x {
                Ipv6ExtensionSlice::Fragment(f) => f.fragment_offset().value() == 0,
                _ => true,
            });
            (ip.payload(), first)
        }
    };
    key.proto = payload.ip_number.0;
    match &pkt.transport {
        Some(TransportSlice::Tcp(t)) => {
            key.sport = t.source_port();
            key.dport = t.destination_port();
            // Byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN.
            track.tcp_flags = t.slice()[13];
        }
        Some(TransportSlice::Udp(u)) => {
            key.sport = u.source_port();
            key.dport = u.destination_port();
        }
        Some(TransportSlice::Icmpv4(i)) => {
            key.sport = i.type_u8() as u16;
            key.dport = i.code_u8() as u16;
            icmp_track(&key, i.slice(), &mut track);
        }
        Some(TransportSlice::Icmpv6(i)) => {
            key.sport = i.type_u8() as u16;
            key.dport = i.code_u8() as u16;
            icmp_track(&key, i.slice(), &mut track);
        }
        None if payload.fragmented && !first_fragment => key.ports_known = false,
        None if has_ports(key.proto) => {
            let (s, d) = raw_ports(key.proto, payload.payload).ok_or(if payload.fragmented {
                Reason::TinyFragment
            } else {
                Reason::Truncated
            })?;
            key.sport = s;
            key.dport = d;
        }
        // A protocol without ports (GRE, ESP, ...): rules that need ports cannot match it.
        None => key.ports_known = false,
    }
    Ok((Frame::Ip(key), track))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn build(b: etherparse::PacketBuilderStep<etherparse::UdpHeader>, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn ip_key(f: Result<Frame, Reason>) -> FlowKey {
        match f {
            Ok(Frame::Ip(k)) => k,
            other => panic!("expected an IP frame, got {other:?}"),
        }
    }

    #[test]
    fn udp_v4_and_vlan() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(5000, 53);
        let k = ip_key(parse(&build(b, b"hello"), Direction::Ingress));
        assert_eq!(
            (k.src, k.dst, k.proto, k.sport, k.dport),
            (0x0a00_0001, 0x0a00_0002, 17, 5000, 53)
        );
        assert!(k.ports_known && !k.v6 && k.vlan == NO_VLAN);

        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(42.try_into().unwrap())
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let k = ip_key(parse(&build(b, b""), Direction::Egress));
        assert_eq!(k.vlan, 42);
        assert_eq!(k.dir, Direction::Egress);
    }

    #[test]
    fn tcp_v6_with_extension_headers_and_icmp() {
        // IPv6 + hop-by-hop options (8 bytes) + TCP SYN, by hand.
        let mut f = Vec::new();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 28, 0 /* HBH */, 64]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[6 /* next: TCP */, 0, 1, 4, 0, 0, 0, 0]);
        f.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        let k = ip_key(parse(&f, Direction::Ingress));
        assert!(k.v6);
        assert_eq!((k.proto, k.sport, k.dport), (6, 40000, 80));
        assert_eq!(k.dst & 0xff, 2);

        let mut v = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .icmpv4_echo_request(1, 1)
            .write(&mut v, b"ping")
            .unwrap();
        let k = ip_key(parse(&v, Direction::Ingress));
        assert_eq!((k.proto, k.sport, k.dport), (1, 8, 0));
    }

    /// A minimal IPv4 header + payload behind an Ethernet header; checksum left zero (we do not
    /// validate it: the receiving host does).
    fn v4(ihl_words: u8, total_len: u16, proto_: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x40 | ihl_words, 0]);
        f.extend_from_slice(&total_len.to_be_bytes());
        f.extend_from_slice(&[0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto_, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        for _ in 5..ihl_words {
            f.extend_from_slice(&[1, 1, 1, 1]); // NOP options
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn options_sctp_and_fragments() {
        let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
        let k = ip_key(parse(&v4(6, 32, 17, 0, &udp), Direction::Ingress));
        assert_eq!((k.sport, k.dport), (5000, 53), "IPv4 options are skipped");

        let sctp = [0x0b, 0xb8, 0x0f, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0];
        let k = ip_key(parse(&v4(5, 32, 132, 0, &sctp), Direction::Ingress));
        assert_eq!((k.proto, k.sport, k.dport), (132, 3000, 4000));

        // First fragment (MF set, offset 0): ports read from the partial transport header.
        let k = ip_key(parse(&v4(5, 28, 17, 0x2000, &udp), Direction::Ingress));
        assert!(k.ports_known);
        assert_eq!(k.dport, 53);
        // Non-first fragment (offset 8 bytes): no ports.
        let k = ip_key(parse(&v4(5, 28, 17, 0x0001, &udp), Direction::Ingress));
        assert!(!k.ports_known);
        // A first fragment too short for its ports.
        assert_eq!(
            parse(&v4(5, 22, 6, 0x2000, &[0, 80]), Direction::Ingress),
            Err(Reason::TinyFragment)
        );
    }

    #[test]
    fn malformed_frames_get_reasons() {
        let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
        let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            ("runt ethernet", vec![1, 2, 3], Reason::Truncated),
            (
                "truncated ipv4 header",
                v4(5, 28, 17, 0, &udp)[..24].to_vec(),
                Reason::Truncated,
            ),
            ("ihl below 5", v4(4, 28, 17, 0, &udp), Reason::BadIpv4Header),
            (
                "total length beyond frame",
                v4(5, 200, 17, 0, &udp),
                Reason::BadIpLength,
            ),
            (
                "total length below header",
                v4(5, 12, 17, 0, &udp),
                Reason::BadIpLength,
            ),
            (
                "ip version 7",
                {
                    let mut f = v4(5, 28, 17, 0, &udp);
                    f[14] = 0x75;
                    f
                },
                Reason::BadIpVersion,
            ),
            (
                "ip version 4 behind the IPv6 ethertype",
                {
                    let mut f = v4(5, 28, 17, 0, &udp);
                    f[12] = 0x86;
                    f[13] = 0xdd;
                    f.resize(14 + 40 + 8, 0);
                    f
                },
                Reason::BadIpVersion,
            ),
            (
                "truncated udp",
                v4(5, 24, 17, 0, &udp[..4]),
                Reason::Truncated,
            ),
            (
                "tcp data offset too small",
                v4(
                    5,
                    40,
                    6,
                    0,
                    &[
                        0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
                Reason::BadTransport,
            ),
        ];
        for (what, frame, reason) in cases {
            assert_eq!(parse(&frame, Direction::Ingress), Err(reason), "{what}");
        }
        // IPv6 with a hop-by-hop header that is not first.
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, 60 /* dest opts */, 64]);
        f.extend_from_slice(&[0u8; 32]);
        f.extend_from_slice(&[0 /* next: HBH */, 0, 1, 4, 0, 0, 0, 0]);
        f.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(parse(&f, Direction::Ingress), Err(Reason::BadIpExtension));
        // An extension header whose length runs past the payload.
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 0, 64]);
        f.extend_from_slice(&[0u8; 32]);
        f.extend_from_slice(&[17, 9, 1, 4, 0, 0, 0, 0]);
        assert_eq!(parse(&f, Direction::Ingress), Err(Reason::Truncated));
    }

    #[test]
    fn l2_frames() {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        assert_eq!(parse(&arp, Direction::Ingress), Ok(Frame::Arp));
        let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e];
        lldp.extend_from_slice(&MAC_A);
        lldp.extend_from_slice(&[0x88, 0xcc, 2, 7, 4, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&lldp, Direction::Ingress), Ok(Frame::OtherL2));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // Deterministic xorshift fuzz over mutated valid frames and random garbage.
        let base = v4(6, 32, 17, 0, &[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200_000 {
            let mut f = base.clone();
            let n = (next() % 4) as usize + 1;
            for _ in 0..n {
                let i = (next() as usize) % f.len();
                f[i] = next() as u8;
            }
            let cut = (next() as usize) % (f.len() + 1);
            let _ = parse(&f[..cut], Direction::Ingress);
        }
    }

    #[test]
    fn the_tracker_gets_tcp_flags_echo_ids_and_quoted_headers() {
        let mut syn = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1, 1024)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let (_, tr) = parse_tracked(&syn, Direction::Ingress).unwrap();
        assert_eq!(tr.tcp_flags, crate::conntrack::tcp_flags::SYN);

        let mut echo = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(0x1234, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        let (f, tr) = parse_tracked(&echo, Direction::Ingress).unwrap();
        assert_eq!(ip_key(Ok(f)).sport, 8);
        assert_eq!(tr.icmp_id, 0x1234);

        // A port unreachable from a router, quoting a datagram the server sent out.
        let mut inner = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 9], 64)
            .udp(5353, 53)
            .write(&mut inner, b"question")
            .unwrap();
        let mut err = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([192, 0, 2, 254], [10, 0, 0, 2], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut err, &inner[..28])
            .unwrap();
        let (_, tr) = parse_tracked(&err, Direction::Ingress).unwrap();
        let q = tr.quoted.expect("the quoted header");
        assert_eq!(q.dir, Direction::Egress);
        assert_eq!(
            (q.src, q.dst, q.proto, q.sport, q.dport),
            (0x0a00_0002, 0xc000_0209, 17, 5353, 53)
        );
        // Quoting too little gives no flow, and is not an error.
        let mut short = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([192, 0, 2, 254], [10, 0, 0, 2], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut short, &inner[..21])
            .unwrap();
        let (_, tr) = parse_tracked(&short, Direction::Ingress).unwrap();
        assert_eq!(tr.quoted, None);
    }

    /// The fast path on its own, as `parse_tracked` would return it.
    fn fast(f: &[u8], dir: Direction) -> Option<(Frame, Track)> {
        fast_path(f, dir).map(|(key, flags)| {
            let track = Track {
                tcp_flags: flags,
                ..Track::default()
            };
            (Frame::Ip(key), track)
        })
    }

    #[test]
    fn the_fast_path_agrees_with_etherparse() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut frames = Vec::new();
        for i in 0..64u16 {
            let base =
                PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64);
            let mut f = Vec::new();
            match i % 3 {
                0 => base.udp(1000 + i, 53).write(&mut f, &[7; 20]).unwrap(),
                1 => base
                    .tcp(40000, 80 + i, 1, 1024)
                    .syn()
                    .write(&mut f, &[])
                    .unwrap(),
                _ => base
                    .tcp(40000, 443, 1, 1024)
                    .ack(9)
                    .fin()
                    .write(&mut f, &[1; 30])
                    .unwrap(),
            }
            if i % 4 == 0 {
                f.resize(f.len() + 10, 0); // Ethernet padding after the IP packet
            }
            frames.push(f);
        }
        let mut accepted = 0;
        for round in 0..40_000u32 {
            let mut f = frames[(round % 64) as usize].clone();
            // Damage it: flip bytes, cut it, or leave it alone.
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % f.len();
                f[at] = next() as u8;
            }
            if next() % 5 == 0 {
                let cut = (next() as usize) % (f.len() + 1);
                f.truncate(cut);
            }
            if let Some(fast) = fast(&f, Direction::Ingress) {
                accepted += 1;
                assert_eq!(
                    Ok(fast),
                    parse_sliced(&f, Direction::Ingress),
                    "frame {f:02x?}"
                );
            }
        }
        assert!(accepted > 10_000, "the fast path took {accepted} frames");
        for f in &frames {
            assert!(fast(f, Direction::Egress).is_some(), "{f:02x?}");
        }
    }
}
