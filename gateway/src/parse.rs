//! Frame parsing: Ethernet (with up to three 802.1Q/802.1ad tags), IPv4 (with options), IPv6
//! (with extension headers), TCP, UDP, SCTP, ICMPv4/v6.
//!
//! Never panics and never allocates: every frame becomes a [`Frame`] or a [`Reason`] to drop it.
//!
//! The common case (untagged IPv4 without options, TCP or UDP) is read at fixed offsets
//! ([`fast_path`]). The rest goes through [`parse_sliced`], which reads the IP layer itself:
//! etherparse 0.19 decodes the IPv6 Fragment header's offset and M bit from the wrong bits
//! (JulianSchmid/etherparse#150), which made a trailing fragment look like a whole packet, so
//! the extension chain and the Fragment header are walked here ([`frag_field`] has the bit
//! layout and a regression test). etherparse remains the TCP header reader (its option
//! iterator) and the builder the tests make frames with.
//!
//! **Fragments.** A first fragment carries the transport header and is read like a whole packet;
//! it must hold the whole header chain and the full transport header (RFC 7112; RFC 1858's tiny
//! fragment attack), or it is dropped (`tiny_fragment`). A later fragment has no ports
//! (`ports_known = false`); the tracker passes it only after its first fragment
//! (`conntrack::frag`). An atomic fragment (offset 0, no more fragments; RFC 6946) is a whole
//! packet.
//!
//! **VLANs.** The first tag with a VLAN id is the key's VLAN, the second the tracker's inner
//! VLAN (QinQ); a priority tag (VLAN id 0) names no VLAN (IEEE 802.1Q).
//!
//! **TCP.** The tracker gets the sequence number, acknowledgement, window, payload length and the
//! SYN's options, and a checksum verdict for segments that can change state (SYN, FIN, RST):
//! data segments are not summed.

use etherparse::TcpOptionElement;
use policy::key::{proto, FlowKey, NO_VLAN};
use policy::rule::Direction;

use crate::conntrack::tcp::{Segment, NO_WSCALE};
use crate::conntrack::{icmp_error, tcp_flags, Frag, Track};
use crate::stats::Reason;

/// What a frame is, as far as the gateway cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Ip(FlowKey),
    Arp,
    /// Any other ethertype (LLDP, ...), or an unknown one behind VLAN tags.
    OtherL2,
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_ARP: u16 = 0x0806;
const ETH_MACSEC: u16 = 0x88e5;

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one frame received in `direction`.
#[inline]
pub fn parse(data: &[u8], direction: Direction) -> Result<Frame, Reason> {
    parse_tracked(data, direction).map(|(f, _)| f)
}

/// [`parse`], plus what the connection tracker needs: TCP flags and segment, the ICMP query
/// identifier, the header an ICMP error quotes, the inner VLAN, the fragment position.
#[inline]
pub fn parse_tracked(data: &[u8], direction: Direction) -> Result<(Frame, Track), Reason> {
    let mut key = FlowKey::default();
    let mut track = Track::new();
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
    if let Some(k) = fast_path(data, direction, track) {
        *key = k;
        return Ok(Parsed::Ip);
    }
    parse_slow(data, direction, key, track)
}

/// Everything [`fast_path`] does not take.
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
/// fragmented, TCP or UDP with consistent lengths: the key, with the tracker's fields written to
/// `track`. Inlined into the burst loop, the key stays in registers for the tracker's probe.
/// Anything else, or anything odd, returns `None` (with `track` in an unspecified state) and
/// goes the general way; a test checks on generated and mutated frames that whatever this
/// accepts, [`parse_sliced`] parses to the same result.
#[inline(always)]
pub fn fast_path(b: &[u8], direction: Direction, track: &mut Track) -> Option<FlowKey> {
    if b.len() < 14 + 20 + 8 || b[12] != 0x08 || b[13] != 0x00 || b[14] != 0x45 {
        return None;
    }
    let total = be16(b, 16) as usize;
    // Fragmented (MF or an offset) goes the slow way; DF is fine.
    if be16(b, 20) & 0x3fff != 0 || total < 20 + 8 || total > b.len() - 14 {
        return None;
    }
    let l4 = &b[34..14 + total];
    let proto_ = b[23];
    match proto_ {
        proto::TCP => {
            tcp_segment(l4, &b[26..34], false, &mut track.seg).ok()?;
            track.tcp_flags = track.seg.flags;
        }
        proto::UDP => {
            if l4.len() < 8 || be16(l4, 4) as usize != l4.len() {
                return None;
            }
            track.tcp_flags = 0;
            track.seg = Segment::default();
        }
        _ => return None,
    }
    track.icmp_id = 0;
    track.quoted = None;
    track.vlan2 = NO_VLAN;
    track.frag = Frag::Whole;
    Some(FlowKey {
        dir: direction,
        v6: false,
        src: be32(b, 26) as u128,
        dst: be32(b, 30) as u128,
        proto: proto_,
        sport: be16(l4, 0),
        dport: be16(l4, 2),
        ports_known: true,
        vlan: NO_VLAN,
    })
}

/// One's complement sum of `b` (16-bit big-endian words, an odd byte padded), not folded.
fn sum16(b: &[u8], mut acc: u64) -> u64 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Whether a TCP segment's checksum is right. `addrs`: the source and destination addresses as
/// they sit in the IP header (8 or 32 bytes), for the pseudo-header.
fn tcp_checksum_ok(l4: &[u8], addrs: &[u8]) -> bool {
    let acc = sum16(addrs, proto::TCP as u64 + l4.len() as u64);
    fold(sum16(l4, acc)) == 0xffff
}

/// Reads a TCP header and what the tracker needs of its segment. `fragment`: the header is in a
/// first fragment, whose checksum covers data not here (not verified) and whose length is not
/// the segment's.
#[inline(always)]
fn tcp_segment(l4: &[u8], addrs: &[u8], fragment: bool, seg: &mut Segment) -> Result<(), Reason> {
    let short = if fragment {
        Reason::TinyFragment
    } else {
        Reason::Truncated
    };
    if l4.len() < 20 {
        return Err(short);
    }
    let doff = usize::from(l4[12] >> 4) * 4;
    if doff < 20 {
        return Err(Reason::BadTransport);
    }
    if doff > l4.len() {
        return Err(short);
    }
    // Written field by field into the caller's segment: a `Segment` built here and returned
    // by value went through the stack in pieces of mixed width, and reading it back stalled on
    // store forwarding (a fifth of an established packet's time).
    let flags = l4[13];
    let ack = be32(l4, 8);
    seg.flags = flags;
    seg.seq = be32(l4, 4);
    seg.ack = ack;
    seg.win = be16(l4, 14);
    seg.len = (l4.len() - doff) as u32;
    seg.wscale = NO_WSCALE;
    seg.sack_perm = false;
    seg.sack = ack;
    seg.csum_ok = true;
    if doff > 20 {
        options(&l4[20..doff], seg);
    }
    if flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0 {
        state_changing(seg, l4, addrs, fragment);
    }
    Ok(())
}

/// The checksum verdict of a segment that can change state (SYN, FIN, RST): out of line, off
/// the data path.
#[inline(never)]
fn state_changing(seg: &mut Segment, l4: &[u8], addrs: &[u8], fragment: bool) {
    let flags = seg.flags;
    if fragment {
        // The checksum covers the whole datagram, which a first fragment does not hold: a FIN
        // or RST that cannot be verified (and that a host which never reassembles the datagram
        // never sees) changes no state. A SYN may still open its flow.
        seg.csum_ok = flags & (tcp_flags::FIN | tcp_flags::RST) == 0;
    } else {
        seg.csum_ok = tcp_checksum_ok(l4, addrs);
    }
}

/// The options the tracker reads: window scale and SACK permitted (on a SYN), the highest SACK
/// block edge (on any segment). Malformed options end the walk, as in netfilter.
#[inline(never)]
fn options(opts: &[u8], seg: &mut Segment) {
    let syn = seg.flags & tcp_flags::SYN != 0;
    let header = {
        // etherparse's option iterator, over a header of just these options.
        let mut h = [0u8; 60];
        h[12] = (((20 + opts.len()) / 4) as u8) << 4;
        h[20..20 + opts.len()].copy_from_slice(opts);
        h
    };
    let Ok(tcp) = etherparse::TcpHeaderSlice::from_slice(&header[..20 + opts.len()]) else {
        return;
    };
    for o in tcp.options_iterator() {
        match o {
            Ok(TcpOptionElement::WindowScale(shift)) if syn => seg.wscale = shift,
            Ok(TcpOptionElement::SelectiveAcknowledgementPermitted) if syn => seg.sack_perm = true,
            Ok(TcpOptionElement::SelectiveAcknowledgement(first, rest)) => {
                for (_, right) in std::iter::once(first).chain(rest.into_iter().flatten()) {
                    if (right.wrapping_sub(seg.sack) as i32) > 0 {
                        seg.sack = right;
                    }
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if seg.wscale != NO_WSCALE && !syn {
        seg.wscale = NO_WSCALE;
    }
}

/// The IPv6 Fragment header's third and fourth bytes (RFC 8200 §4.5): the offset in 8-byte units
/// in the top 13 bits, two reserved bits, the M (more fragments) flag in the lowest bit.
/// Returns (offset in bytes, more fragments).
pub fn frag_field(b2: u8, b3: u8) -> (u32, bool) {
    let v = u16::from_be_bytes([b2, b3]);
    (u32::from(v >> 3) * 8, v & 1 == 1)
}

/// An IPv6 Fragment header as read: offset (bytes) and M flag, identification, next header, and
/// the length of what follows it (the fragment's share of the fragmentable part).
#[derive(Debug, Clone, Copy)]
struct V6Frag {
    offset: u32,
    more: bool,
    id: u32,
    next: u8,
    len: u32,
}

/// Where an IP packet's transport header starts, and what the walk learnt.
struct Ip<'a> {
    v6: bool,
    src: u128,
    dst: u128,
    /// The source and destination address bytes (for the TCP pseudo-header).
    addrs: &'a [u8],
    proto: u8,
    /// From the transport header on, to the end of what the IP length covers.
    payload: &'a [u8],
    frag: Frag,
}

/// Walks IPv6 extension headers from `next` over `p` to the transport header. Returns the
/// transport protocol, the rest, and the fragment position. `Err(None)`: the chain runs past the
/// end of `p`.
#[allow(clippy::type_complexity)]
fn v6_chain(mut next: u8, mut p: &[u8]) -> Result<(u8, &[u8], Option<V6Frag>), Option<Reason>> {
    let mut frag = None;
    for n in 0.. {
        if n >= 16 {
            return Err(Some(Reason::BadIpExtension));
        }
        match next {
            // Hop-by-hop options may only come first (RFC 8200 §4.1).
            0 if n > 0 => return Err(Some(Reason::BadIpExtension)),
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6.
            0 | 43 | 60 | 135 | 139 | 140 => {
                if p.len() < 2 {
                    return Err(None);
                }
                let len = (usize::from(p[1]) + 1) * 8;
                if len > p.len() {
                    return Err(None);
                }
                next = p[0];
                p = &p[len..];
            }
            44 => {
                if frag.is_some() {
                    return Err(Some(Reason::BadIpExtension));
                }
                if p.len() < 8 {
                    return Err(None);
                }
                let (offset, more) = frag_field(p[2], p[3]);
                frag = Some(V6Frag {
                    offset,
                    more,
                    id: be32(p, 4),
                    next: p[0],
                    len: (p.len() - 8) as u32,
                });
                next = p[0];
                p = &p[8..];
                if offset != 0 {
                    // The rest is a later fragment's data, not headers.
                    break;
                }
            }
            // Authentication header: 4-byte units, plus 2.
            51 => {
                if p.len() < 2 {
                    return Err(None);
                }
                let len = (usize::from(p[1]) + 2) * 4;
                if len > p.len() {
                    return Err(None);
                }
                next = p[0];
                p = &p[len..];
            }
            _ => break,
        }
    }
    Ok((next, p, frag))
}

/// Reads the IP layer of `ip` (IPv4 when `v4`).
fn ip_layer(ip: &[u8], v4: bool) -> Result<Ip<'_>, Reason> {
    let version = ip.first().ok_or(Reason::Truncated)? >> 4;
    if v4 {
        if version != 4 {
            return Err(Reason::BadIpVersion);
        }
        if ip.len() < 20 {
            return Err(Reason::Truncated);
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(Reason::BadIpv4Header);
        }
        if ip.len() < ihl {
            return Err(Reason::Truncated);
        }
        let total = be16(ip, 2) as usize;
        if total < ihl || total > ip.len() {
            return Err(Reason::BadIpLength);
        }
        let fo = be16(ip, 6);
        let (offset, more) = (u32::from(fo & 0x1fff) * 8, fo & 0x2000 != 0);
        let id = be16(ip, 4) as u32;
        let mut proto_ = ip[9];
        let mut payload = &ip[ihl..total];
        if proto_ == 51 && offset == 0 {
            // An authentication header: the transport header follows it.
            if payload.len() < 2 {
                return Err(if more {
                    Reason::TinyFragment
                } else {
                    Reason::Truncated
                });
            }
            let len = (usize::from(payload[1]) + 2) * 4;
            if len > payload.len() {
                return Err(Reason::BadIpExtension);
            }
            proto_ = payload[0];
            payload = &payload[len..];
        }
        // The fragmentable part starts after the IPv4 header (an AH is part of it).
        let (raw_proto, frag_len) = (ip[9], (total - ihl) as u32);
        let frag = match (offset, more) {
            (0, false) => Frag::Whole,
            (0, true) => Frag::First {
                id,
                end: frag_len,
                proto: raw_proto,
            },
            (o, _) => Frag::Later {
                id,
                offset: o,
                len: frag_len,
                proto: raw_proto,
            },
        };
        return Ok(Ip {
            v6: false,
            src: be32(ip, 12) as u128,
            dst: be32(ip, 16) as u128,
            addrs: &ip[12..20],
            proto: proto_,
            payload,
            frag,
        });
    }
    if version != 6 {
        return Err(Reason::BadIpVersion);
    }
    if ip.len() < 40 {
        return Err(Reason::Truncated);
    }
    let plen = be16(ip, 4) as usize;
    if 40 + plen > ip.len() {
        return Err(Reason::BadIpLength);
    }
    let body = &ip[40..40 + plen];
    let (proto_, payload, frag) = match v6_chain(ip[6], body) {
        Ok(x) => x,
        Err(Some(r)) => return Err(r),
        // The chain runs past the packet: in a first fragment that is RFC 7112's case.
        Err(None) => {
            return Err(if has_fragment_header(ip[6], body) {
                Reason::TinyFragment
            } else {
                Reason::Truncated
            })
        }
    };
    let frag = match frag {
        None => Frag::Whole,
        Some(f) if f.offset == 0 && !f.more => Frag::Whole,
        Some(f) if f.offset == 0 => Frag::First {
            id: f.id,
            end: f.len,
            proto: f.next,
        },
        Some(f) => Frag::Later {
            id: f.id,
            offset: f.offset,
            len: f.len,
            proto: f.next,
        },
    };
    Ok(Ip {
        v6: true,
        src: u128::from_be_bytes(ip[8..24].try_into().map_err(|_| Reason::Truncated)?),
        dst: u128::from_be_bytes(ip[24..40].try_into().map_err(|_| Reason::Truncated)?),
        addrs: &ip[8..40],
        proto: proto_,
        payload,
        frag,
    })
}

/// Whether a (possibly cut) IPv6 extension chain contains a Fragment header.
fn has_fragment_header(mut next: u8, mut p: &[u8]) -> bool {
    for _ in 0..16 {
        match next {
            44 => return true,
            0 | 43 | 60 | 135 | 139 | 140 | 51 if p.len() >= 2 => {
                let len = if next == 51 {
                    (usize::from(p[1]) + 2) * 4
                } else {
                    (usize::from(p[1]) + 1) * 8
                };
                next = p[0];
                p = p.get(len..).unwrap_or(&[]);
            }
            _ => return false,
        }
    }
    false
}

/// How much of the offending packet an ICMP error may carry: RFC 1812 §4.3.2.3 caps an ICMPv4
/// error at 576 bytes, RFC 4443 §2.4 an ICMPv6 one at the minimum MTU.
const ICMP4_ERROR_MAX: usize = 576;
const ICMP6_ERROR_MAX: usize = 1280;

/// The header an ICMP error quotes (RFC 792, RFC 4443 §2.4: as much of the offending packet as
/// fits), as the key that packet had: it travelled the other way. `None` when the quote is
/// unusable: too short to know the flow, of the other IP family, from a later fragment, or
/// longer than the packet it quotes says it was (bytes after the quote are not the offending
/// packet's, and a related error must not smuggle them).
fn quoted(inner: &[u8], outer_v6: bool, error_dir: Direction, vlan: u16) -> Option<(FlowKey, u16)> {
    let dir = match error_dir {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    };
    let mut k = FlowKey {
        dir,
        vlan,
        ..FlowKey::default()
    };
    let rest = match (inner.first()? >> 4, outer_v6) {
        (4, false) => {
            let ihl = usize::from(inner[0] & 0x0f) * 4;
            if ihl < 20 || inner.len() < ihl {
                return None;
            }
            if inner.len() > be16(inner, 2) as usize {
                return None;
            }
            if be16(inner, 6) & 0x1fff != 0 {
                return None; // a later fragment quotes no ports
            }
            k.proto = inner[9];
            k.src = be32(inner, 12) as u128;
            k.dst = be32(inner, 16) as u128;
            &inner[ihl..]
        }
        (6, true) if inner.len() >= 40 => {
            if inner.len() > 40 + be16(inner, 4) as usize {
                return None;
            }
            k.v6 = true;
            k.src = u128::from_be_bytes(inner[8..24].try_into().ok()?);
            k.dst = u128::from_be_bytes(inner[24..40].try_into().ok()?);
            let (p, rest, frag) = v6_chain(inner[6], &inner[40..]).ok()?;
            if frag.is_some_and(|f| f.offset != 0) {
                return None;
            }
            k.proto = p;
            rest
        }
        _ => return None,
    };
    let mut id = 0;
    if k.proto == proto::ICMP || k.proto == proto::ICMPV6 {
        if rest.len() < 6 {
            return None;
        }
        k.sport = rest[0] as u16;
        k.dport = rest[1] as u16;
        id = be16(rest, 4);
    } else if crate::conntrack::has_ports(k.proto) {
        if rest.len() < 4 {
            return None;
        }
        k.sport = be16(rest, 0);
        k.dport = be16(rest, 2);
    } else {
        k.ports_known = false;
    }
    Some((k, id))
}

/// Reads the query identifier or, for an error, the quoted header, from an ICMP message
/// (`body` starts at the ICMP header; `ip_len`: the whole outer IP packet's length).
fn icmp_track(key: &FlowKey, body: &[u8], ip_len: usize, track: &mut Track) {
    let ty = key.sport as u8;
    if icmp_error(key.v6, ty) {
        let max = if key.v6 {
            ICMP6_ERROR_MAX
        } else {
            ICMP4_ERROR_MAX
        };
        if ip_len > max {
            return;
        }
        if let Some((q, id)) = body
            .get(8..)
            .and_then(|inner| quoted(inner, key.v6, key.dir, key.vlan))
        {
            track.quoted = Some(q);
            track.icmp_id = id;
        }
    } else if body.len() >= 6 {
        track.icmp_id = be16(body, 4);
    }
}

/// The general parser: every link extension, IP version, extension header and transport.
pub fn parse_sliced(data: &[u8], direction: Direction) -> Result<(Frame, Track), Reason> {
    let mut track = Track::new();
    if data.len() < 14 {
        return Err(Reason::Truncated);
    }
    let mut ethertype = be16(data, 12);
    let mut off = 14;
    let mut vids = [NO_VLAN; 2];
    let mut nvids = 0;
    let mut tags = 0;
    while matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
        if tags == 3 {
            return Ok((Frame::OtherL2, track));
        }
        if data.len() < off + 4 {
            return Err(Reason::Truncated);
        }
        let vid = be16(data, off) & 0x0fff;
        if vid != 0 && nvids < 2 {
            vids[nvids] = vid;
            nvids += 1;
        }
        ethertype = be16(data, off + 2);
        off += 4;
        tags += 1;
    }
    let l3 = &data[off..];
    let v4 = match ethertype {
        ETH_IPV4 => true,
        ETH_IPV6 => false,
        ETH_ARP => {
            // Hardware and protocol address lengths decide the ARP packet's size.
            if l3.len() < 8 || l3.len() < 8 + 2 * (usize::from(l3[4]) + usize::from(l3[5])) {
                return Err(Reason::Truncated);
            }
            return Ok((Frame::Arp, track));
        }
        ETH_MACSEC => return Err(Reason::UnsupportedLink),
        _ => return Ok((Frame::OtherL2, track)),
    };
    let ip = ip_layer(l3, v4)?;
    track.vlan2 = vids[1];
    track.frag = ip.frag;
    let mut key = FlowKey {
        dir: direction,
        vlan: vids[0],
        v6: ip.v6,
        src: ip.src,
        dst: ip.dst,
        proto: ip.proto,
        ..FlowKey::default()
    };
    let p = ip.payload;
    let fragment = matches!(ip.frag, Frag::First { .. });
    let short = if fragment {
        Reason::TinyFragment
    } else {
        Reason::Truncated
    };
    if matches!(ip.frag, Frag::Later { .. }) {
        key.ports_known = false;
        return Ok((Frame::Ip(key), track));
    }
    match key.proto {
        proto::TCP => {
            tcp_segment(p, ip.addrs, fragment, &mut track.seg)?;
            key.sport = be16(p, 0);
            key.dport = be16(p, 2);
            track.tcp_flags = track.seg.flags;
        }
        proto::UDP => {
            if p.len() < 8 {
                return Err(short);
            }
            let ulen = be16(p, 4) as usize;
            if !fragment && ulen != 0 && (ulen < 8 || ulen > p.len()) {
                return Err(if ulen < 8 {
                    Reason::BadTransport
                } else {
                    Reason::Truncated
                });
            }
            key.sport = be16(p, 0);
            key.dport = be16(p, 2);
        }
        proto::SCTP => {
            if p.len() < 12 {
                return Err(short);
            }
            key.sport = be16(p, 0);
            key.dport = be16(p, 2);
        }
        proto::ICMP | proto::ICMPV6 => {
            if p.len() < 8 {
                return Err(short);
            }
            key.sport = p[0] as u16;
            key.dport = p[1] as u16;
            let ip_len = l3.len().min(if ip.v6 {
                40 + be16(l3, 4) as usize
            } else {
                be16(l3, 2) as usize
            });
            // netfilter verifies ICMP checksums (`icmp_error`): a message with a bad one is
            // not tracked (neither a query nor a related error). A fragment's cannot be.
            if !fragment {
                let acc = if ip.v6 {
                    sum16(ip.addrs, proto::ICMPV6 as u64 + p.len() as u64)
                } else {
                    0
                };
                track.seg.csum_ok = fold(sum16(p, acc)) == 0xffff;
            }
            icmp_track(&key, p, ip_len, &mut track);
        }
        // A protocol without ports (GRE, ESP, ...): rules that need ports cannot match it.
        _ => key.ports_known = false,
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
    fn the_ipv6_fragment_field_is_read_as_rfc_8200_lays_it_out() {
        // Offset 13 bits (8-octet units), 2 reserved bits, M last: the bytes etherparse 0.19
        // misread (JulianSchmid/etherparse#150).
        assert_eq!(frag_field(0x00, 0x01), (0, true), "first fragment");
        assert_eq!(frag_field(0x00, 0x20), (32, false), "offset 4 units, last");
        assert_eq!(frag_field(0x00, 0x41), (64, true));
        assert_eq!(frag_field(0x00, 0x80), (128, false));
        assert_eq!(
            frag_field(0xff, 0xf8),
            (8191 * 8, false),
            "the largest offset"
        );
        assert_eq!(
            frag_field(0x00, 0x06),
            (0, false),
            "reserved bits are not M"
        );
        // A trailing fragment at 32 bytes that carries what looks like a TCP SYN is a later
        // fragment, without ports.
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 28, 44, 64]);
        f.extend_from_slice(&[0u8; 32]);
        f.extend_from_slice(&[6, 0, 0x00, 0x20, 0, 0, 0, 9]);
        f.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        let (frame, track) = parse_tracked(&f, Direction::Ingress).unwrap();
        assert!(!ip_key(Ok(frame)).ports_known);
        assert_eq!(
            track.frag,
            Frag::Later {
                id: 9,
                offset: 32,
                len: 20,
                proto: 6
            }
        );
        // The same bytes as a first fragment (M set, offset 0): ports and flags read.
        f[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&[0, 1]);
        let (frame, track) = parse_tracked(&f, Direction::Ingress).unwrap();
        let k = ip_key(Ok(frame));
        assert_eq!((k.proto, k.sport, k.dport), (6, 40000, 80));
        assert_eq!(
            track.frag,
            Frag::First {
                id: 9,
                end: 20,
                proto: 6
            }
        );
        assert_eq!(track.tcp_flags, crate::conntrack::tcp_flags::SYN);
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

    /// QinQ keys on both tags (outer in the key, inner in the track), and a priority tag (VID 0)
    /// names no VLAN wherever it stands, so a priority-tagged frame keys like an untagged one.
    #[test]
    fn qinq_keeps_both_tags_and_a_priority_tag_names_no_vlan() {
        let mut plain = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(5000, 53)
            .write(&mut plain, b"q")
            .unwrap();
        // Inserts 802.1Q-style tags (TPID, VID) after the MAC addresses.
        let tagged = |tags: &[(u16, u16)]| {
            let mut f = plain[..12].to_vec();
            for &(tpid, vid) in tags {
                f.extend_from_slice(&tpid.to_be_bytes());
                f.extend_from_slice(&vid.to_be_bytes());
            }
            f.extend_from_slice(&plain[12..]);
            f
        };
        let tags_of = |f: &[u8]| {
            let (frame, tr) = parse_tracked(f, Direction::Ingress).unwrap();
            (ip_key(Ok(frame)).vlan, tr.vlan2)
        };
        assert_eq!(tags_of(&plain), (NO_VLAN, NO_VLAN));
        assert_eq!(tags_of(&tagged(&[(0x88a8, 100), (0x8100, 42)])), (100, 42));
        assert_eq!(tags_of(&tagged(&[(0x9100, 100), (0x8100, 43)])), (100, 43));
        // Priority bits are not part of the VID.
        assert_eq!(tags_of(&tagged(&[(0x8100, 0xe000 | 42)])), (42, NO_VLAN));
        assert_eq!(tags_of(&tagged(&[(0x8100, 0)])), (NO_VLAN, NO_VLAN));
        assert_eq!(
            tags_of(&tagged(&[(0x88a8, 100), (0x8100, 0)])),
            (100, NO_VLAN)
        );
        assert_eq!(
            tags_of(&tagged(&[(0x88a8, 0), (0x8100, 42)])),
            (42, NO_VLAN)
        );
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
        let mut track = Track::new();
        fast_path(f, dir, &mut track).map(|key| (Frame::Ip(key), track))
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
