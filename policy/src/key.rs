//! The classification key: what the gateway extracts from a frame and the table decides on.

use std::fmt;
use std::net::IpAddr;

use crate::rule::{addr_bits, bits_addr, Direction};

/// Marks "no VLAN tag" in [`FlowKey::vlan`]. Real VLAN ids are 12 bits.
pub const NO_VLAN: u16 = u16::MAX;

/// A frame's 5-tuple plus what the rules can also match on. `Copy` and fixed-size so a burst of
/// them lives in a caller-owned array. `repr(C)`, in this order, so the classifier's SIMD
/// transposition reads a burst's fields at fixed offsets (`classify/simd.rs` checks them): the
/// fields after the addresses are ten bytes with no padding between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct FlowKey {
    /// Source address; IPv4 in the low 32 bits.
    pub src: u128,
    pub dst: u128,
    /// Source port, or ICMP type.
    pub sport: u16,
    /// Destination port, or ICMP code.
    pub dport: u16,
    /// Outer VLAN id, or [`NO_VLAN`].
    pub vlan: u16,
    pub proto: u8,
    /// Which way the frame crosses the gateway.
    pub dir: Direction,
    pub v6: bool,
    /// False for non-first fragments, which carry no transport header.
    pub ports_known: bool,
}

impl Default for FlowKey {
    fn default() -> Self {
        FlowKey {
            dir: Direction::Ingress,
            v6: false,
            src: 0,
            dst: 0,
            proto: 0,
            sport: 0,
            dport: 0,
            ports_known: true,
            vlan: NO_VLAN,
        }
    }
}

impl FlowKey {
    /// A key for a TCP/UDP/SCTP flow or, with `proto` 1/58, an ICMP type/code.
    pub fn new(
        direction: Direction,
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        sport: u16,
        dport: u16,
    ) -> FlowKey {
        let (v6, s) = addr_bits(src);
        let (_, d) = addr_bits(dst);
        FlowKey {
            dir: direction,
            v6,
            src: s,
            dst: d,
            proto,
            sport,
            dport,
            ..FlowKey::default()
        }
    }

    #[inline]
    pub fn direction(&self) -> Direction {
        self.dir
    }

    pub fn src_addr(&self) -> IpAddr {
        bits_addr(self.v6, self.src)
    }

    pub fn dst_addr(&self) -> IpAddr {
        bits_addr(self.v6, self.dst)
    }
}

/// The IANA protocol numbers the gateway names.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;

    /// A protocol's lowercase name, or its number.
    pub fn name(p: u8) -> std::borrow::Cow<'static, str> {
        match p {
            ICMP => "icmp".into(),
            TCP => "tcp".into(),
            UDP => "udp".into(),
            ICMPV6 => "icmpv6".into(),
            SCTP => "sctp".into(),
            UDPLITE => "udplite".into(),
            other => other.to_string().into(),
        }
    }

    /// Parses a protocol name (case-insensitive) or number.
    pub fn parse(s: &str) -> Option<u8> {
        match s.to_ascii_lowercase().as_str() {
            "icmp" => Some(ICMP),
            "tcp" => Some(TCP),
            "udp" => Some(UDP),
            "icmpv6" => Some(ICMPV6),
            "sctp" => Some(SCTP),
            "udplite" => Some(UDPLITE),
            n => n.parse().ok(),
        }
    }

    /// Whether the protocol's key carries ICMP type/code in the port fields.
    pub fn is_icmp(p: u8) -> bool {
        p == ICMP || p == ICMPV6
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.direction(),
            proto::name(self.proto),
            self.src_addr()
        )?;
        if proto::is_icmp(self.proto) {
            write!(
                f,
                " -> {} type {} code {}",
                self.dst_addr(),
                self.sport,
                self.dport
            )?;
        } else if self.ports_known {
            write!(f, ":{} -> {}:{}", self.sport, self.dst_addr(), self.dport)?;
        } else {
            write!(f, " -> {} (fragment)", self.dst_addr())?;
        }
        if self.vlan != NO_VLAN {
            write!(f, " vlan {}", self.vlan)?;
        }
        Ok(())
    }
}
