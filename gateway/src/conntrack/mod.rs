//! The connection tracker: which flows policy admitted, so that their later packets and their
//! replies pass without the classifier, and ICMP errors about them pass as related. Its semantics
//! are netfilter's conntrack (`nf_conntrack_proto_*.c`) unless the README says otherwise:
//!
//! - **TCP** is tracked by state and window ([`tcp`]): an out-of-window segment, a RST whose
//!   sequence number is not the expected one, a SYN/FIN/RST with a bad checksum and impossible
//!   flag combinations are *invalid*: they change nothing, and the rules decide them on their own.
//!   A SYN on a closed or TIME_WAIT flow ends the entry and is decided as a new flow.
//! - **ICMP queries** (echo, timestamp, information, address mask; ICMPv6 echo) pair by type and
//!   identifier: only a request opens a flow, only its reply type answers it. **ICMP errors** are
//!   related only when they quote a packet of the outer packet's family whose source is the outer
//!   destination, and the quote is no longer than the packet it quotes.
//! - **Every other protocol** is tracked by (addresses, protocol), ports where it has them.
//! - **Fragments**: a non-first fragment passes only after its datagram's first fragment did
//!   ([`frag`]).
//!
//! **Shared by every worker.** The reply of a flow may arrive on another queue than the one that
//! opened it (RSS hashes each direction on its own), so all workers share one table: a fixed
//! array of slots, allocated once, in buckets of [`WAYS`]. A flow may live in either of two
//! buckets that a keyed hash of its direction-independent tuple picks (a secret drawn at start-up,
//! so an outsider cannot aim tuples at a bucket), and moves between them cuckoo-style to make
//! room, so the table fills past 90 % before it refuses an established flow.
//!
//! - *Readers* (a lookup) take no lock: each slot is a seqlock, copied until its sequence is even
//!   and unchanged (Linux `read_seqbegin`/`read_seqretry`). A move first writes the flow's new
//!   place, then bumps a table-wide move counter, then clears the old place; a lookup that finds
//!   nothing and sees the counter moved looks again (DPDK `rte_hash`'s `tbl_chng_cnt`).
//! - *Writers* (a state change, an insert, a removal, a move) hold the bucket's spin lock for a
//!   few dozen instructions, so a transition is never lost and is always computed from the
//!   current state (netfilter holds `ct->lock` for the same work). An insert locks both of its
//!   buckets (in index order), so looking for an existing entry and inserting is atomic: one flow
//!   never gets two entries. Moves only *try* further locks, so no lock order can deadlock.
//!
//! **Bounded and flood-safe.** A new flow takes a free or expired slot, else room a move makes,
//! else evicts the oldest entry that is not *assured* (netfilter `early_drop`): TCP becomes
//! assured when its handshake completes, other protocols when they have seen traffic both ways
//! and then more. Assured flows are never evicted: when both buckets hold only those, the new
//! flow is dropped and counted (`conntrack_full`). A flood of SYNs, answered or not, churns
//! unassured entries among themselves and cannot keep out a new flow or push out an established
//! one.
//!
//! **Time** is passed in (nanoseconds of a monotonic clock), so the state machine is tested with
//! a fake clock. Expiry is lazy (a lookup ignores an expired entry, an insert reuses it), plus a
//! bounded [`Conntrack::sweep`] of a few slots per worker turn.
//!
//! **Policy changes apply to open flows.** Each entry remembers the table generation that
//! admitted it; the datapath decides a flow of an *older* generation again (a wrapping serial
//! comparison), in its original direction, on its first packet after a swap (see `worker.rs`).

pub mod frag;
pub mod tcp;

use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use policy::key::{proto, FlowKey, NO_VLAN};

use crate::sys::huge::HugeArray;
use crate::sys::siphash::siphash13;
use policy::rule::Direction;

pub use tcp::{Segment, TcpConn, TcpState};

/// Slots per bucket.
pub(crate) const WAYS: usize = 8;

/// TCP header flags the tracker reads.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Per-state idle timeouts, in seconds. Defaults and why are in the README ("Connection
/// tracking"): netfilter's, shortened where an edge gateway must shed abandoned state sooner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A SYN seen, handshake not complete (netfilter SYN_SENT 120 s, SYN_RECV 60 s).
    pub tcp_syn_s: u32,
    /// Handshake done (netfilter: 5 days; VPP idle: 24 h).
    pub tcp_established_s: u32,
    /// A FIN seen (netfilter FIN_WAIT/CLOSE_WAIT/LAST_ACK: 30-120 s).
    pub tcp_closing_s: u32,
    /// FINs both ways (netfilter TIME_WAIT: 120 s = 2 MSL).
    pub tcp_time_wait_s: u32,
    /// A RST seen (netfilter CLOSE: 10 s).
    pub tcp_closed_s: u32,
    /// UDP (and SCTP, UDP-Lite) with no reply yet (netfilter: 30 s).
    pub udp_unreplied_s: u32,
    /// ... with replies (netfilter stream: 120 s; VPP udp idle: 600 s).
    pub udp_replied_s: u32,
    /// ICMP queries (netfilter: 30 s).
    pub icmp_s: u32,
    /// Every other protocol (ESP, GRE, ...): netfilter's generic timeout, 600 s.
    pub generic_s: u32,
    /// How long a fragmented datagram's first fragment admits the rest (Linux
    /// `ipfrag_time`: 30 s).
    pub fragment_s: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_s: 60,
            tcp_established_s: 86_400,
            tcp_closing_s: 60,
            tcp_time_wait_s: 120,
            tcp_closed_s: 10,
            udp_unreplied_s: 30,
            udp_replied_s: 120,
            icmp_s: 30,
            generic_s: 600,
            fragment_s: 30,
        }
    }
}

/// The state of a tracked flow. TCP flows use netfilter's states; every other protocol is
/// unreplied, then replied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    /// A TCP SYN admitted, no answer yet.
    SynSent,
    /// SYNs both ways (simultaneous open).
    SynSent2,
    /// The SYN-ACK came back.
    SynReceived,
    /// The handshake completed.
    Established,
    /// A FIN seen.
    FinWait,
    /// The FIN acknowledged.
    CloseWait,
    /// FINs both ways, the last ACK pending.
    LastAck,
    /// FINs both ways, acknowledged.
    TimeWait,
    /// A RST seen.
    Closed,
    /// Not TCP: no reply yet.
    Unreplied,
    /// ... and with replies.
    Replied,
}

const CODE_UNREPLIED: u32 = 10;
const CODE_REPLIED: u32 = 11;

impl FlowState {
    fn from_code(c: u32) -> Option<FlowState> {
        use FlowState::*;
        Some(match c {
            CODE_UNREPLIED => Unreplied,
            CODE_REPLIED => Replied,
            c if c > 0 && c < CODE_UNREPLIED => Self::of_tcp(TcpState::from_code(c as u8)),
            _ => return None,
        })
    }

    fn of_tcp(s: TcpState) -> FlowState {
        use FlowState::*;
        match s {
            TcpState::None | TcpState::SynSent => SynSent,
            TcpState::SynSent2 => SynSent2,
            TcpState::SynRecv => SynReceived,
            TcpState::Established => Established,
            TcpState::FinWait => FinWait,
            TcpState::CloseWait => CloseWait,
            TcpState::LastAck => LastAck,
            TcpState::TimeWait => TimeWait,
            TcpState::Close => Closed,
        }
    }

    /// Whether the flow has seen its other direction.
    pub fn replied(self) -> bool {
        !matches!(self, FlowState::SynSent | FlowState::Unreplied)
    }
}

/// Where a packet sits in a fragmented datagram. Offsets count from the start of the
/// fragmentable part (after the IPv4 header, or after the IPv6 Fragment header), and `proto` is
/// what the fragments themselves say comes next (the IPv4 protocol field, the Fragment header's
/// next header), so a datagram's fragments share it whatever headers the first one carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented (or an atomic fragment: offset 0, no more fragments).
    #[default]
    Whole,
    /// The first fragment: it carries the transport header; its data covers `[0, end)` bytes.
    First { id: u32, end: u32, proto: u8 },
    /// A later fragment of `len` bytes at `offset`.
    Later {
        id: u32,
        offset: u32,
        len: u32,
        proto: u8,
    },
}

/// What the tracker needs from a packet beyond its [`FlowKey`]: read by the parser.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Track {
    /// TCP flags, 0 otherwise.
    pub tcp_flags: u8,
    /// The ICMP query identifier; for an error, the identifier of a quoted ICMP query.
    pub icmp_id: u16,
    /// For an ICMP error: the header it quotes, as the key that packet had (its direction is
    /// the opposite of the error's). `None` when the quote is unusable (too short, another
    /// family, longer than the packet it claims to quote).
    pub quoted: Option<FlowKey>,
    /// The TCP segment's sequence space, window and options. For ICMP, `seg.csum_ok` says
    /// whether the message's checksum is right.
    pub seg: Segment,
    /// The inner VLAN id of a QinQ frame, or [`NO_VLAN`].
    pub vlan2: u16,
    pub frag: Frag,
}

impl Track {
    /// A track with no inner VLAN (what `Default` gives is VLAN 0, which the parser never
    /// produces).
    pub fn new() -> Track {
        Track {
            vlan2: NO_VLAN,
            ..Track::default()
        }
    }
}

/// How the tracker sees one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A packet whose flow is tracked by its tuple.
    Flow(Tuple),
    /// An ICMP error quoting `Tuple`, addressed to the quoted packet's sender.
    Error(Tuple),
    /// A non-first fragment: passes if its first fragment did.
    Fragment,
    /// Nothing to track (ICMP messages that are neither queries nor usable errors): the rules
    /// decide.
    Untracked,
}

/// Marks an ICMP reply in [`Tuple::dport`].
const ICMP_REPLY: u16 = 0x8000;

/// A flow's identity as tracked: the exact tuple plus both VLAN tags and the direction. An ICMP
/// query uses `sport` for its identifier and `dport` for the request type (the code in bits
/// 8-14), with [`ICMP_REPLY`]
/// set on a reply; reversing an ICMP tuple flips that bit instead of swapping the ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub dir: Direction,
    pub v6: bool,
    pub src: u128,
    pub dst: u128,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Outer VLAN id, or [`NO_VLAN`].
    pub vlan: u16,
    /// Inner VLAN id (QinQ), or [`NO_VLAN`].
    pub vlan2: u16,
}

fn is_icmp(p: u8) -> bool {
    p == proto::ICMP || p == proto::ICMPV6
}

/// Protocols whose first four transport bytes are ports (what the parser reads as ports).
pub fn has_ports(p: u8) -> bool {
    matches!(p, proto::TCP | proto::UDP | proto::SCTP)
}

/// The reply type of an ICMP query request type, if it is one netfilter tracks.
pub fn icmp_reply_of(v6: bool, ty: u8) -> Option<u8> {
    if v6 {
        (ty == 128).then_some(129)
    } else {
        match ty {
            8 => Some(0),
            13 => Some(14),
            15 => Some(16),
            17 => Some(18),
            _ => None,
        }
    }
}

/// The request type an ICMP reply type answers.
fn icmp_request_of(v6: bool, ty: u8) -> Option<u8> {
    if v6 {
        (ty == 129).then_some(128)
    } else {
        match ty {
            0 => Some(8),
            14 => Some(13),
            16 => Some(15),
            18 => Some(17),
            _ => None,
        }
    }
}

/// Whether an ICMP type is an error that quotes the packet that caused it.
pub fn icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

impl Tuple {
    /// A packet's key as a tuple (ports as they are), with no inner VLAN.
    #[inline(always)]
    pub fn of(key: &FlowKey) -> Tuple {
        Tuple {
            dir: key.dir,
            v6: key.v6,
            src: key.src,
            dst: key.dst,
            proto: key.proto,
            sport: key.sport,
            dport: key.dport,
            vlan: key.vlan,
            vlan2: NO_VLAN,
        }
    }

    /// The tuple the reply of this packet carries.
    pub fn reversed(&self) -> Tuple {
        if is_icmp(self.proto) {
            return Tuple {
                dir: other(self.dir),
                src: self.dst,
                dst: self.src,
                dport: self.dport ^ ICMP_REPLY,
                ..*self
            };
        }
        Tuple {
            dir: other(self.dir),
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }

    /// The classification key of a packet of this flow in the tuple's direction (an ICMP query
    /// comes back as its request or reply type, with its code).
    pub fn key(&self) -> FlowKey {
        let (sport, dport, ports_known) = if is_icmp(self.proto) {
            let req = (self.dport & 0xff) as u8;
            let ty = if self.dport & ICMP_REPLY != 0 {
                icmp_reply_of(self.v6, req).unwrap_or(req)
            } else {
                req
            };
            (ty as u16, (self.dport >> 8) & 0x7f, true)
        } else if has_ports(self.proto) {
            (self.sport, self.dport, true)
        } else {
            (0, 0, false)
        };
        FlowKey {
            dir: self.dir,
            v6: self.v6,
            src: self.src,
            dst: self.dst,
            proto: self.proto,
            sport,
            dport,
            ports_known,
            vlan: self.vlan,
        }
    }

    /// The words the bucket hash reads: the same for a tuple and its reverse (the endpoints in a
    /// fixed order, no direction).
    /// The words the bucket hash reads (see [`Tuple::hash_words`]), packed: an IPv4 tuple's two
    /// addresses share one word, so it hashes three words where IPv6 hashes six.
    #[inline(always)]
    pub(crate) fn hash_input(&self) -> ([u64; 6], usize) {
        let w = self.hash_words();
        if self.v6 {
            (w, 6)
        } else {
            ([w[1] | w[3] << 32, w[4], w[5], 0, 0, 0], 3)
        }
    }

    #[inline(always)]
    fn hash_words(&self) -> [u64; 6] {
        let (a, pa, b, pb) = if is_icmp(self.proto) {
            let (lo, hi) = if self.src <= self.dst {
                (self.src, self.dst)
            } else {
                (self.dst, self.src)
            };
            (lo, self.sport, hi, self.dport & !ICMP_REPLY)
        } else if (self.src, self.sport) <= (self.dst, self.dport) {
            (self.src, self.sport, self.dst, self.dport)
        } else {
            (self.dst, self.dport, self.src, self.sport)
        };
        [
            (a >> 64) as u64,
            a as u64,
            (b >> 64) as u64,
            b as u64,
            pa as u64 | (pb as u64) << 16 | (self.proto as u64) << 32 | (self.v6 as u64) << 40,
            self.vlan as u64 | (self.vlan2 as u64) << 16,
        ]
    }

    #[inline(always)]
    fn meta(&self) -> u64 {
        self.proto as u64
            | (self.sport as u64) << 8
            | (self.dport as u64) << 24
            | (self.vlan as u64) << 40
            | (self.v6 as u64) << 56
            | (self.dir as u64) << 57
            | 1 << 63
    }

    fn from_words(addr: &[u64; 4], m: u64, vlan2: u32) -> Tuple {
        Tuple {
            src: (addr[0] as u128) << 64 | addr[1] as u128,
            dst: (addr[2] as u128) << 64 | addr[3] as u128,
            proto: m as u8,
            sport: (m >> 8) as u16,
            dport: (m >> 24) as u16,
            vlan: (m >> 40) as u16,
            vlan2: vlan2 as u16,
            v6: (m >> 56) & 1 == 1,
            dir: if (m >> 57) & 1 == 1 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
        }
    }

    fn addr_words(&self) -> [u64; 4] {
        [
            (self.src >> 64) as u64,
            self.src as u64,
            (self.dst >> 64) as u64,
            self.dst as u64,
        ]
    }
}

fn other(d: Direction) -> Direction {
    match d {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

/// Sorts a parsed packet into what the tracker does with it.
#[inline(always)]
pub fn classify_packet(key: &FlowKey, t: &Track) -> Kind {
    let mut kind = Kind::Untracked;
    classify_into(key, t, &mut kind);
    kind
}

/// [`classify_packet`] into the caller's slot: most protocols are written in place (the
/// datapath's case); ICMP goes out of line.
#[inline(always)]
pub(crate) fn classify_into(key: &FlowKey, t: &Track, out: &mut Kind) {
    if matches!(t.frag, Frag::Later { .. }) {
        *out = Kind::Fragment;
    } else if is_icmp(key.proto) {
        *out = classify_icmp(key, t);
    } else {
        let mut tuple = Tuple::of(key);
        tuple.vlan2 = t.vlan2;
        if !has_ports(key.proto) {
            tuple.sport = 0;
            tuple.dport = 0;
        }
        *out = Kind::Flow(tuple);
    }
}

#[inline(never)]
fn classify_icmp(key: &FlowKey, t: &Track) -> Kind {
    let mut base = Tuple::of(key);
    base.vlan2 = t.vlan2;
    let v6 = key.proto == proto::ICMPV6;
    let ty = key.sport as u8;
    if key.sport > 0xff || (v6 != key.v6) || !t.seg.csum_ok {
        return Kind::Untracked;
    }
    // A query's code is part of its tuple, as in netfilter (a reply must carry the request's
    // code). Codes of queries are 0 in practice; one above 127 does not fit and is not tracked.
    let code = key.dport;
    let queryable = code <= 0x7f;
    if icmp_reply_of(v6, ty).is_some() && queryable {
        return Kind::Flow(Tuple {
            sport: t.icmp_id,
            dport: ty as u16 | code << 8,
            ..base
        });
    }
    if let Some(req) = icmp_request_of(v6, ty).filter(|_| queryable) {
        return Kind::Flow(Tuple {
            sport: t.icmp_id,
            dport: req as u16 | code << 8 | ICMP_REPLY,
            ..base
        });
    }
    if icmp_reply_of(v6, ty).is_some() || icmp_request_of(v6, ty).is_some() {
        return Kind::Untracked;
    }
    if !icmp_error(v6, ty) {
        return Kind::Untracked;
    }
    match t.quoted {
        // netfilter's conditions: the quote is of the outer packet's family, and the error goes
        // to the host that sent the quoted packet. An error about an error is not related.
        Some(q)
            if q.v6 == key.v6
                && q.src == key.dst
                && !(is_icmp(q.proto) && icmp_error(q.proto == proto::ICMPV6, q.sport as u8)) =>
        {
            let inner = Track {
                icmp_id: t.icmp_id,
                vlan2: t.vlan2,
                ..Track::new()
            };
            match classify_packet(&q, &inner) {
                Kind::Flow(tuple) => Kind::Error(tuple),
                _ => Kind::Untracked,
            }
        }
        _ => Kind::Untracked,
    }
}

/// Whether a packet can open a flow: a TCP SYN (no ACK, RST or FIN), an ICMP query request, any
/// packet of another protocol. A first fragment opens like its datagram; later ones never.
pub fn opens_flow(key: &FlowKey, t: &Track) -> bool {
    if matches!(t.frag, Frag::Later { .. }) {
        return false;
    }
    match key.proto {
        proto::TCP => {
            use tcp_flags::*;
            t.tcp_flags & (SYN | ACK | RST | FIN) == SYN
        }
        p if is_icmp(p) => {
            key.sport <= 0xff && icmp_reply_of(p == proto::ICMPV6, key.sport as u8).is_some()
        }
        _ => true,
    }
}

/// Whether a packet looks like the answer to something (so its absence from the table is worth
/// saying in the flow log: `no_flow`).
pub fn looks_like_reply(key: &FlowKey, t: &Track) -> bool {
    match key.proto {
        proto::TCP => t.tcp_flags & tcp_flags::ACK != 0 && t.tcp_flags & tcp_flags::SYN != 0,
        p if is_icmp(p) => {
            key.sport <= 0xff && icmp_request_of(p == proto::ICMPV6, key.sport as u8).is_some()
        }
        _ => false,
    }
}

/// One direction's TCP window as `conntrack list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowView {
    /// Highest sequence number sent, plus one.
    pub end: u32,
    /// Highest sequence number the other side allows.
    pub maxend: u32,
    /// Largest window seen (scaled).
    pub maxwin: u32,
    /// Window scale shift.
    pub scale: u8,
}

/// One tracked flow as `conntrack list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowEntry {
    pub direction: String,
    pub proto: u8,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub vlan: Option<u16>,
    #[serde(default)]
    pub vlan2: Option<u16>,
    pub state: FlowState,
    /// The flow completed its handshake (TCP) or saw traffic both ways and more: it is never
    /// evicted.
    #[serde(default)]
    pub assured: bool,
    pub generation: u32,
    pub idle_ms: u64,
    /// TCP: the original and the reply direction's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<[WindowView; 2]>,
}

/// Which flows `conntrack list|flush` means: every given part must match (an address or port at
/// either end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    pub addr: Option<std::net::IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
}

impl Filter {
    pub(crate) fn matches(&self, t: &Tuple) -> bool {
        let k = t.key();
        self.addr
            .is_none_or(|a| k.src_addr() == a || k.dst_addr() == a)
            && self.port.is_none_or(|p| t.sport == p || t.dport == p)
            && self.proto.is_none_or(|p| t.proto == p)
    }
}

// The slot's info word: the state, the flags, and what TCP keeps beside its window words.
const I_STATE: u32 = 0xf;
const I_ASSURED: u32 = 1 << 4;
const I_SEEN_REPLY: u32 = 1 << 5;
const I_LAST_DIR: u32 = 1 << 6;
const I_LAST_INDEX: u32 = 7;
const I_SIDE: [u32; 2] = [10, 19];

/// A slot: two cache lines. The first holds what a lookup reads (sequence, state, tuple,
/// last-seen time); the second TCP's window bounds and the entry's other bucket.
#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    /// Odd while a writer (who holds the bucket lock) changes the slot.
    seq: AtomicU32,
    /// `I_*` fields; state 0 when free.
    info: AtomicU32,
    generation: AtomicU32,
    vlan2: AtomicU32,
    seen: AtomicU64,
    addr: [AtomicU64; 4],
    meta: AtomicU64,
    /// Per direction: `end | maxend << 32`, `maxwin | maxack << 32`.
    win: [AtomicU64; 4],
    /// The other bucket this entry may live in.
    alt: AtomicU32,
}

/// A bucket's header: the tag byte of each slot (8 bits of the flow's hash, a hint that lets a
/// lookup read only the slots that may match) and the writers' lock.
#[repr(C, align(16))]
#[derive(Default)]
struct Head {
    tags: AtomicU64,
    lock: AtomicU32,
    /// Set (never cleared) once a flow whose primary bucket this is was placed in its other
    /// bucket: until then a lookup need not read the other bucket at all, which spares a new
    /// flow's lookup a cache miss.
    spilled: AtomicU32,
}

/// A consistent copy of a slot's first line.
#[derive(Debug, Clone, Copy)]
struct SlotCopy {
    tuple: Tuple,
    info: u32,
    generation: u32,
    seen: u64,
}

/// A flow's two buckets (primary first) and its tag byte: where it may live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Place {
    b: [u32; 2],
    tag: u8,
}

/// A flow's place with its primary bucket's tag word, read ahead of its lookup (see
/// [`Conntrack::probe`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Probe {
    pub(crate) place: Place,
    tags: u64,
    spilled: bool,
    moves: u64,
}

/// A lookup's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    slot: usize,
    info: u32,
    /// The packet travels in the flow's original direction.
    pub original: bool,
    pub state: FlowState,
    /// Never evicted (see the module doc).
    pub assured: bool,
    /// The table generation that admitted (or last re-admitted) the flow.
    pub generation: u32,
    /// The flow's protocol.
    pub proto: u8,
    /// When the flow last saw a packet.
    pub seen: u64,
}

/// Why an insert did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// Both buckets of the flow hold only assured flows, and no move made room.
    Full,
    /// The packet cannot open a flow (a TCP segment other than a valid SYN).
    Refused,
}

/// What an insert displaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Displaced {
    Nothing,
    /// An entry past its timeout.
    Expired,
    /// An unassured entry, the oldest of the flow's buckets.
    Evicted,
    /// Room made by moving entries to their other bucket.
    Moved,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new entry.
    New(Displaced),
    /// The flow was there already (another worker opened it first): the packet is applied to
    /// it like any packet of the flow.
    Exists(Update),
}

/// What a packet did to the flow it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Part of the flow; the flow is now in this state.
    Pass(FlowState),
    /// Not acceptable to the flow's state (TCP window, RST sequence, checksum, flags): nothing
    /// changed; the rules decide the packet on its own.
    Invalid(tcp::Invalid),
    /// A SYN on a closed or TIME_WAIT flow: the entry is gone; the packet is a new flow.
    Reopen,
    /// The flow is not (or no longer) in the table.
    Gone,
}

/// The shared table.
pub struct Conntrack {
    /// On huge pages ([`HugeArray`]): every packet reads a random slot, which on small pages
    /// is a TLB miss too.
    slots: HugeArray<Slot>,
    heads: HugeArray<Head>,
    buckets: usize,
    /// The bucket hash's secret (SipHash-1-3 keys), drawn at start-up.
    key: (u64, u64),
    /// Bumped by every move, between writing the new place and clearing the old.
    moves: AtomicU64,
    timeouts: Timeouts,
    /// Every idle timeout in nanoseconds by protocol class ([`Conntrack::class`]) and state code:
    /// what [`Conntrack::timeout_ns`] computes, as one load for the per-packet expiry check.
    idle_ns: [[u64; 16]; 3],
    entries: AtomicUsize,
    /// Time zero of the shared clock (every worker's `now` counts from it).
    epoch: std::time::Instant,
    frags: frag::Frags,
}

const NS: u64 = 1_000_000_000;

/// How stale a flow's last-seen time may get before a packet refreshes it (a packet that changes
/// nothing else writes nothing sooner). Every timeout is in whole seconds.
const SEEN_GRANULARITY_NS: u64 = 1_000_000;

/// How often each worker's sweep goes through the whole table. Expiry is lazy anyway (an expired
/// entry is ignored by lookups and reused by inserts); the sweep keeps the entry count and
/// `conntrack list` current. Timeouts are whole seconds, the shortest 10 s by default.
pub const SWEEP_PERIOD_NS: u64 = NS;

/// A worker's place in the expiry sweep, and when it last swept: the sweep is paced by time
/// (the whole table once per [`SWEEP_PERIOD_NS`]), not by packets, so that under load it costs a
/// small fraction of a slot per packet.
#[derive(Debug, Clone, Default)]
pub struct Sweeper {
    cursor: usize,
    last: Option<u64>,
}

impl Sweeper {
    /// Slots checked so far (wrapping).
    pub fn checked(&self) -> usize {
        self.cursor
    }
}

/// Whether generation `a` is older than `b` (serial number arithmetic, RFC 1982: a table
/// generation wraps after 2^32 swaps).
#[inline(always)]
pub fn older(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// A secret from the standard library's per-process random keys.
fn secret() -> (u64, u64) {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new();
    (s.hash_one(0x5eed_u64), s.hash_one(0xc0ffee_u64))
}

/// [`Conntrack::timeout_ns`] for timeouts `t`.
fn timeout_of(t: &Timeouts, proto_: u8, s: FlowState) -> u64 {
    use FlowState::*;
    let secs = match s {
        SynSent | SynSent2 | SynReceived => t.tcp_syn_s,
        Established => t.tcp_established_s,
        FinWait | CloseWait | LastAck => t.tcp_closing_s,
        TimeWait => t.tcp_time_wait_s,
        Closed => t.tcp_closed_s,
        Unreplied | Replied if is_icmp(proto_) => t.icmp_s,
        Unreplied | Replied if !matches!(proto_, proto::UDP | proto::SCTP | 136) => t.generic_s,
        Unreplied => t.udp_unreplied_s,
        Replied => t.udp_replied_s,
    };
    secs as u64 * NS
}

/// A protocol's row of [`Conntrack::idle_ns`]: 0 the UDP-like protocols, 1 ICMP, 2 every other
/// protocol, TCP included (TCP's states time out alike in every row; the non-TCP states share
/// codes, not timeouts).
#[inline(always)]
fn class(p: u8) -> usize {
    if udp_like(p) {
        0
    } else if is_icmp(p) {
        1
    } else {
        2
    }
}

/// The table behind [`Conntrack::idle_expired`]: [`Conntrack::timeout_ns`] for every class and
/// state code (a code no state has, which no live slot holds, gets the closed timeout as
/// `FlowState::from_code`'s callers always assumed).
fn idle_table(t: &Timeouts) -> [[u64; 16]; 3] {
    // One protocol of each class.
    let probe = [proto::UDP, proto::ICMP, proto::TCP];
    let mut out = [[0; 16]; 3];
    for (row, &p) in out.iter_mut().zip(&probe) {
        for (code, v) in row.iter_mut().enumerate() {
            let state = FlowState::from_code(code as u32).unwrap_or(FlowState::Closed);
            *v = timeout_of(t, p, state);
        }
    }
    out
}

/// `x` scaled into `0..n` (Lemire's multiply-shift: no division, no power of two needed).
#[inline(always)]
fn range(x: u32, n: usize) -> usize {
    ((x as u64 * n as u64) >> 32) as usize
}

/// A slot's tuple words and info, written together.
struct Entry {
    tuple: Tuple,
    info: u32,
    generation: u32,
    seen: u64,
    win: [u64; 4],
    alt: u32,
}

impl Conntrack {
    /// A table for `capacity` flows (rounded up to whole buckets), with a fresh hash secret.
    pub fn new(capacity: usize, timeouts: Timeouts) -> Conntrack {
        Self::with_key(capacity, timeouts, secret())
    }

    /// [`Conntrack::new`] with a given hash key (tests that need collisions).
    pub(crate) fn with_key(capacity: usize, timeouts: Timeouts, key: (u64, u64)) -> Conntrack {
        let buckets = capacity.div_ceil(WAYS).max(1);
        // Every element is written here, so every page is faulted in now: a host short of memory
        // fails at start, not on the first packets of each page.
        let slots = HugeArray::from_fn(buckets * WAYS, |_| Slot::default());
        let heads = HugeArray::from_fn(buckets, |_| Head::default());
        Conntrack {
            slots,
            heads,
            buckets,
            key,
            moves: AtomicU64::new(0),
            timeouts,
            idle_ns: idle_table(&timeouts),
            entries: AtomicUsize::new(0),
            epoch: std::time::Instant::now(),
            frags: frag::Frags::new((capacity / 64).clamp(1024, 65_536), key),
        }
    }

    /// `at` on the table's clock, in nanoseconds.
    #[inline]
    pub fn ns(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Flows the table can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Whether the slots are a mapping advised to use huge pages (a table under 2 MiB is not;
    /// the kernel may still back an advised one with small pages).
    pub fn huge_pages(&self) -> bool {
        self.slots.mapped()
    }

    /// Bytes the table occupies (allocated once), fragment table included.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
            + std::mem::size_of_val(&*self.heads)
            + self.frags.memory_bytes()
    }

    /// Occupied slots (approximate while workers insert and expire concurrently).
    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// The fragment table.
    pub(crate) fn frags(&self) -> &frag::Frags {
        &self.frags
    }

    /// How long a first fragment admits the rest of its datagram.
    pub(crate) fn fragment_timeout_ns(&self) -> u64 {
        self.timeouts.fragment_s as u64 * NS
    }

    /// How long a flow of `proto_` in state `s` may stay idle, in nanoseconds.
    #[inline(always)]
    pub fn timeout_ns(&self, proto_: u8, s: FlowState) -> u64 {
        timeout_of(&self.timeouts, proto_, s)
    }

    /// Whether a flow of `proto_` in the state of `info`, last seen at `seen`, has expired.
    #[inline(always)]
    fn idle_expired(&self, proto_: u8, info: u32, seen: u64, now: u64) -> bool {
        now.saturating_sub(seen) > self.idle_ns[class(proto_)][(info & I_STATE) as usize]
    }

    #[inline(always)]
    fn expired(&self, c: &SlotCopy, now: u64) -> bool {
        self.idle_expired(c.tuple.proto, c.info, c.seen, now)
    }

    /// The flow's two buckets and its tag.
    #[inline(always)]
    fn place(&self, t: &Tuple) -> ([usize; 2], u8) {
        let p = self.locate(t);
        ([p.b[0] as usize, p.b[1] as usize], p.tag)
    }

    /// [`Conntrack::place`] as a [`Place`].
    #[inline(always)]
    pub(crate) fn locate(&self, t: &Tuple) -> Place {
        let (w, n) = t.hash_input();
        self.place_of_hash(siphash13(self.key, &w[..n]))
    }

    /// The bucket hash's key (SipHash-1-3 keys), for the datapath's burst hashing.
    #[inline(always)]
    pub(crate) fn hash_key(&self) -> (u64, u64) {
        self.key
    }

    /// The place a tuple whose bucket hash is `h` has.
    #[inline(always)]
    pub(crate) fn place_of_hash(&self, h: u64) -> Place {
        let b1 = range(h as u32, self.buckets);
        let mut b2 = range((h >> 32) as u32, self.buckets);
        if b2 == b1 {
            b2 = (b1 + 1) % self.buckets;
        }
        Place {
            b: [b1 as u32, b2 as u32],
            // Never 0: a zero tag byte marks a free slot.
            tag: ((h >> 24) as u8 ^ (h >> 56) as u8).max(1),
        }
    }

    // ---- bucket locks -------------------------------------------------------------------

    fn lock(&self, b: usize) {
        let l = &self.heads[b].lock;
        while l
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while l.load(Ordering::Relaxed) != 0 {
                std::hint::spin_loop();
            }
        }
    }

    fn try_lock(&self, b: usize) -> bool {
        self.heads[b]
            .lock
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    fn unlock(&self, b: usize) {
        self.heads[b].lock.store(0, Ordering::Release);
    }

    /// Locks both buckets of a pair, lower index first (so two inserts never deadlock).
    fn lock_pair(&self, b: [usize; 2]) {
        let (lo, hi) = (b[0].min(b[1]), b[0].max(b[1]));
        self.lock(lo);
        if hi != lo {
            self.lock(hi);
        }
    }

    fn unlock_pair(&self, b: [usize; 2]) {
        self.unlock(b[0]);
        if b[1] != b[0] {
            self.unlock(b[1]);
        }
    }

    // ---- reading -------------------------------------------------------------------------

    /// A consistent copy of slot `i`'s first line, if it holds a flow.
    #[inline(always)]
    fn read(&self, i: usize) -> Option<SlotCopy> {
        self.copy::<false>(i).map(|(c, _)| c)
    }

    /// A consistent copy of slot `i`'s two lines (first line, window words), if it holds a flow.
    #[inline(always)]
    fn read_full(&self, i: usize) -> Option<(SlotCopy, [u64; 4])> {
        self.copy::<true>(i)
    }

    /// The seqlock read behind [`Conntrack::read`] and [`Conntrack::read_full`]: retries while a
    /// writer holds the slot (a writer's critical section is a few dozen instructions). The
    /// window words are read (else zero) when `FULL`.
    #[inline(always)]
    fn copy<const FULL: bool>(&self, i: usize) -> Option<(SlotCopy, [u64; 4])> {
        let s = &self.slots[i];
        loop {
            let seq = s.seq.load(Ordering::Acquire);
            if seq & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let info = s.info.load(Ordering::Relaxed);
            let generation = s.generation.load(Ordering::Relaxed);
            let vlan2 = s.vlan2.load(Ordering::Relaxed);
            let seen = s.seen.load(Ordering::Relaxed);
            let addr = s.addr.each_ref().map(|w| w.load(Ordering::Relaxed));
            let meta = s.meta.load(Ordering::Relaxed);
            let win = if FULL {
                s.win.each_ref().map(|w| w.load(Ordering::Relaxed))
            } else {
                [0; 4]
            };
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) != seq {
                continue;
            }
            if info & I_STATE == 0 {
                return None;
            }
            let c = SlotCopy {
                tuple: Tuple::from_words(&addr, meta, vlan2),
                info,
                generation,
                seen,
            };
            return Some((c, win));
        }
    }

    /// A whole lookup's first steps at once: `t`'s buckets and its primary bucket's tag word
    /// (most flows live in their primary bucket: an insert uses the other only when the primary
    /// is full). The datapath instead splits them over its burst ([`Conntrack::place`],
    /// [`Conntrack::probe_at`], [`Conntrack::touch`]) so that the burst's cache misses overlap.
    #[inline(always)]
    pub(crate) fn probe(&self, t: &Tuple) -> Probe {
        let moves = self.moves();
        self.probe_at(self.locate(t), moves)
    }

    /// The move counter, read before any tag word a lookup uses (see [`Conntrack::find`]).
    #[inline(always)]
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(Ordering::Acquire)
    }

    /// The first stage of a burst's lookups: `t`'s place, with its primary bucket's head asked
    /// into the cache (a prefetch, which does not wait: the next packet's parse overlaps it).
    #[inline(always)]
    pub(crate) fn place_ahead(&self, t: &Tuple) -> Place {
        let place = self.locate(t);
        self.prefetch_head(&place);
        place
    }

    /// Asks `place`'s primary bucket head into the cache.
    #[inline(always)]
    pub(crate) fn prefetch_head(&self, place: &Place) {
        crate::sys::prefetch(&self.heads[place.b[0] as usize]);
    }

    /// The second stage: the primary bucket's tag word, read after [`Conntrack::place_ahead`]
    /// brought it in. `moves` is [`Conntrack::moves`], read before this.
    #[inline(always)]
    pub(crate) fn probe_at(&self, place: Place, moves: u64) -> Probe {
        let head = &self.heads[place.b[0] as usize];
        Probe {
            place,
            tags: head.tags.load(Ordering::Acquire),
            spilled: head.spilled.load(Ordering::Acquire) != 0,
            moves,
        }
    }

    /// The third stage: asks the first slot the [`Probe`]'s tag word points at into the cache,
    /// both its lines, so that the slot is there when its lookup and update come. With no such
    /// slot the packet is likely a new flow: then the slot its insert will take (the primary
    /// bucket's first free one) and the other bucket's head (which the insert locks) come in
    /// instead, so that the insert's writes find their lines here and the next insert's locked
    /// instructions do not wait for them to drain to memory.
    #[inline(always)]
    pub(crate) fn touch(&self, p: &Probe) {
        let b = p.place.b[0] as usize;
        let i = first_tag(p.tags, p.place.tag).or_else(|| {
            crate::sys::prefetch(&self.heads[p.place.b[1] as usize]);
            first_tag(p.tags, 0)
        });
        if let Some(i) = i {
            self.prefetch_slot(b * WAYS + i);
        }
    }

    /// Asks both lines of slot `i` into the cache.
    #[inline(always)]
    fn prefetch_slot(&self, i: usize) {
        let s = &self.slots[i];
        crate::sys::prefetch(&s.meta);
        crate::sys::prefetch(&s.win[0]);
    }

    /// Prefetches what inserting a flow at `place` will touch: the first free slot of its
    /// buckets, or, when both are full, the first line of every slot of both (which the insert
    /// scans for an expired entry or an eviction victim). The heads came in with the lookup.
    #[inline(always)]
    pub(crate) fn prepare_insert(&self, place: &Place) {
        let b = place.b.map(|x| x as usize);
        if let Some(i) = b.iter().find_map(|&x| self.free_slot(x)) {
            self.prefetch_slot(i);
            return;
        }
        for x in b {
            for s in &self.slots[x * WAYS..(x + 1) * WAYS] {
                crate::sys::prefetch(&s.meta);
            }
        }
    }

    /// Finds the live flow `t` belongs to, in either direction.
    #[inline(always)]
    pub fn lookup(&self, t: &Tuple, now: u64) -> Option<Hit> {
        self.lookup_probed(t, &self.probe(t), now)
    }

    /// [`Conntrack::lookup`] after [`Conntrack::probe`]. A tag word read a moment ago is still a
    /// sound hint: a flow another worker inserted since is missed, and the packet then goes
    /// through the classifier, whose allow finds the flow when it inserts. A flow *moved* since
    /// is not missed: the move counter says to look again.
    #[inline(always)]
    pub(crate) fn lookup_probed(&self, t: &Tuple, p: &Probe, now: u64) -> Option<Hit> {
        self.find(t, p, now, false)
            .map(|(i, c, _, original)| hit(i, &c, original))
    }

    /// The datapath's lookup and update in one: the flow's slot is copied once (both lines for
    /// TCP), the packet is decided on that copy when it changes nothing, and otherwise applied
    /// under the bucket lock from the current state, as [`Conntrack::update`] does.
    #[inline(always)]
    pub(crate) fn lookup_update(
        &self,
        t: &Tuple,
        p: &Probe,
        seg: &Segment,
        now: u64,
    ) -> Option<(Hit, Update)> {
        let tcp = t.proto == proto::TCP;
        let (i, c, win, original) = self.find(t, p, now, tcp)?;
        let h = hit(i, &c, original);
        let quick = if tcp {
            self.tcp_unlocked(i, &c, &win, original, seg, now)
        } else {
            self.generic_unlocked(i, &c, original, now)
        };
        Some((h, quick.unwrap_or_else(|| self.update_slow(i, t, seg, now))))
    }

    /// Finds the live entry of `t` in either direction: its slot, a consistent copy of it (with
    /// the window words when `full`), and whether `t` is its original direction.
    #[inline(always)]
    fn find(
        &self,
        t: &Tuple,
        p: &Probe,
        now: u64,
        full: bool,
    ) -> Option<(usize, SlotCopy, [u64; 4], bool)> {
        let rev = t.reversed();
        let (m, rm) = (t.meta(), rev.meta());
        let mut p = *p;
        loop {
            for k in 0..2 {
                let b = p.place.b[k] as usize;
                let tags = if k == 0 {
                    p.tags
                } else if b == p.place.b[0] as usize || !p.spilled {
                    break;
                } else {
                    self.heads[b].tags.load(Ordering::Acquire)
                };
                let mut cand = tag_matches(tags, p.place.tag);
                while cand != 0 {
                    let i = b * WAYS + (cand.trailing_zeros() / 8) as usize;
                    cand &= cand - 1;
                    // One relaxed load of the ports/protocol/VLAN/direction word rules a
                    // candidate out or in; the seqlocked copy confirms.
                    let w = self.slots[i].meta.load(Ordering::Relaxed);
                    if w != m && w != rm {
                        continue;
                    }
                    let copy = if full {
                        self.read_full(i)
                    } else {
                        self.read(i).map(|c| (c, [0; 4]))
                    };
                    let Some((c, win)) = copy else { continue };
                    let original = c.tuple == *t;
                    if !original && c.tuple != rev {
                        continue;
                    }
                    if self.expired(&c, now) {
                        // An expired copy (the flow may have opened again in another slot).
                        continue;
                    }
                    return Some((i, c, win, original));
                }
            }
            fence(Ordering::Acquire);
            let moves = self.moves.load(Ordering::Acquire);
            if moves == p.moves {
                return None;
            }
            // A move may have taken the flow from a slot not yet read to one already read.
            p = self.probe(t);
        }
    }

    // ---- writing -------------------------------------------------------------------------

    /// Starts a write of slot `i` (the caller holds its bucket lock).
    #[inline(always)]
    fn begin(&self, i: usize) {
        let s = &self.slots[i].seq;
        s.store(s.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
    }

    #[inline(always)]
    fn end(&self, i: usize) {
        let s = &self.slots[i].seq;
        s.store(s.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
    }

    /// Reads the whole slot `i` (the caller holds its bucket lock, so nothing moves under it).
    fn entry(&self, i: usize) -> Option<Entry> {
        // Under the bucket lock no other writer is in the slot: the copy takes one pass.
        let (c, win) = self.read_full(i)?;
        Some(Entry {
            tuple: c.tuple,
            info: c.info,
            generation: c.generation,
            seen: c.seen,
            win,
            alt: self.slots[i].alt.load(Ordering::Relaxed),
        })
    }

    /// Writes a whole entry into slot `i` and its tag (the caller holds the bucket lock).
    fn put(&self, i: usize, e: &Entry, tag: u8) {
        let b = i / WAYS;
        let shift = (i % WAYS) * 8;
        let s = &self.slots[i];
        self.begin(i);
        // The tag goes in before the slot is published, so a reader that sees the slot sees it.
        let h = &self.heads[b].tags;
        h.store(
            h.load(Ordering::Relaxed) & !(0xffu64 << shift) | (tag as u64) << shift,
            Ordering::Relaxed,
        );
        for (w, v) in s.addr.iter().zip(e.tuple.addr_words()) {
            w.store(v, Ordering::Relaxed);
        }
        s.meta.store(e.tuple.meta(), Ordering::Relaxed);
        s.vlan2.store(e.tuple.vlan2 as u32, Ordering::Relaxed);
        s.generation.store(e.generation, Ordering::Relaxed);
        s.seen.store(e.seen, Ordering::Relaxed);
        for (w, v) in s.win.iter().zip(e.win) {
            w.store(v, Ordering::Relaxed);
        }
        s.alt.store(e.alt, Ordering::Relaxed);
        s.info.store(e.info, Ordering::Relaxed);
        self.end(i);
    }

    /// Frees slot `i` and zeroes its tag (the caller holds its bucket lock).
    fn clear(&self, i: usize) {
        self.begin(i);
        self.slots[i].info.store(0, Ordering::Relaxed);
        let h = &self.heads[i / WAYS].tags;
        h.store(
            h.load(Ordering::Relaxed) & !(0xffu64 << ((i % WAYS) * 8)),
            Ordering::Relaxed,
        );
        self.end(i);
    }

    /// A free slot of bucket `x`, from its tag word alone: exact under the bucket's lock (a slot
    /// is free exactly when its tag byte is zero), a hint without it.
    #[inline(always)]
    fn free_slot(&self, x: usize) -> Option<usize> {
        first_tag(self.heads[x].tags.load(Ordering::Relaxed), 0).map(|k| x * WAYS + k)
    }

    /// Whether the entry in slot `i` is the flow `t` (either direction), live at `now`.
    fn holds(&self, i: usize, t: &Tuple, now: u64) -> Option<(Entry, bool)> {
        let e = self.entry(i)?;
        let original = e.tuple == *t;
        if !original && e.tuple != t.reversed() {
            return None;
        }
        let c = SlotCopy {
            tuple: e.tuple,
            info: e.info,
            generation: e.generation,
            seen: e.seen,
        };
        (!self.expired(&c, now)).then_some((e, original))
    }

    /// Applies a packet of flow `hit` (`packet`: its tuple; `seg`: its TCP segment) at `now`.
    /// Computed from the flow's current state under its bucket lock, so a transition is never
    /// lost to another worker's.
    pub fn update(&self, hit: &Hit, packet: &Tuple, seg: &Segment, now: u64) -> Update {
        // A packet that changes nothing (and a fresh last-seen time) writes nothing and takes no
        // lock, so the slot's cache lines stay shared between the workers that see the two
        // directions. It is decided on a fresh copy, not the hit's (another worker may have
        // moved the flow on since the lookup); had a concurrent writer moved it on after the
        // copy, this packet is ordered before that write, against the state it was checked on.
        let expect = if hit.original {
            *packet
        } else {
            packet.reversed()
        };
        let quick = if hit.proto != proto::TCP {
            self.read(hit.slot)
                .filter(|c| c.tuple == expect && !self.expired(c, now))
                .and_then(|c| self.generic_unlocked(hit.slot, &c, hit.original, now))
        } else {
            self.read_full(hit.slot)
                .filter(|(c, _)| c.tuple == expect && !self.expired(c, now))
                .and_then(|(c, win)| self.tcp_unlocked(hit.slot, &c, &win, hit.original, seg, now))
        };
        quick.unwrap_or_else(|| self.update_slow(hit.slot, packet, seg, now))
    }

    /// A packet of a non-TCP flow decided on a copy: `Some` when it changes nothing.
    #[inline(always)]
    fn generic_unlocked(&self, i: usize, c: &SlotCopy, original: bool, now: u64) -> Option<Update> {
        // A UDP flow whose assurance may be due needs its opening time (second line): the
        // locked path reads it.
        let due = udp_like(c.tuple.proto) && c.info & I_SEEN_REPLY != 0 && c.info & I_ASSURED == 0;
        if due {
            return None;
        }
        let (info, state) = generic_next(c.info, original, c.tuple.proto, now, None);
        (info == c.info).then(|| {
            self.refresh(i, c.seen, now);
            Update::Pass(state)
        })
    }

    /// Refreshes slot `i`'s last-seen time when it is staler than [`SEEN_GRANULARITY_NS`]. No
    /// lock and no sequence bump: the time only ever grows (`fetch_max`, here and in the locked
    /// writes), and a reader that copies it torn from the rest sees a flow fresh a moment
    /// early, which only delays its expiry by that moment.
    #[inline(always)]
    fn refresh(&self, i: usize, seen: u64, now: u64) {
        if now.saturating_sub(seen) >= SEEN_GRANULARITY_NS {
            self.slots[i].seen.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// A TCP packet decided on a copy of its flow: `Some` when it changes nothing (an invalid
    /// segment, a duplicate ACK, a replayed frame), `None` when the locked path must apply it.
    #[inline(always)]
    fn tcp_unlocked(
        &self,
        i: usize,
        c: &SlotCopy,
        win: &[u64; 4],
        original: bool,
        seg: &Segment,
        now: u64,
    ) -> Option<Update> {
        if tcp_unchanged(c.info, win, original, seg) {
            self.refresh(i, c.seen, now);
            return Some(Update::Pass(FlowState::Established));
        }
        match tcp_step(c.info, win, original, seg) {
            (tcp::Verdict::Invalid(why), ..) => Some(Update::Invalid(why)),
            (tcp::Verdict::Valid, info, w, state) if info == c.info && w == *win => {
                self.refresh(i, c.seen, now);
                Some(Update::Pass(state))
            }
            (tcp::Verdict::Ignore, info, w, state) if w == *win && info == c.info => {
                Some(Update::Pass(state))
            }
            _ => None,
        }
    }

    /// Applies a packet under the bucket lock of slot `slot`, finding the flow again if it moved.
    fn update_slow(&self, slot: usize, packet: &Tuple, seg: &Segment, now: u64) -> Update {
        let mut slot = slot;
        for _ in 0..4 {
            let b = slot / WAYS;
            self.lock(b);
            let r = self.update_locked(slot, packet, seg, now);
            self.unlock(b);
            if r != Update::Gone {
                return r;
            }
            // Moved to its other bucket meanwhile (or gone): find it again.
            match self.lookup(packet, now) {
                Some(h) => slot = h.slot,
                None => return Update::Gone,
            }
        }
        Update::Gone
    }

    fn update_locked(&self, i: usize, packet: &Tuple, seg: &Segment, now: u64) -> Update {
        let Some((e, original)) = self.holds(i, packet, now) else {
            return Update::Gone;
        };
        let s = &self.slots[i];
        if e.tuple.proto != proto::TCP {
            // The second line of a non-TCP entry holds when it opened.
            let (info, state) = generic_next(e.info, original, e.tuple.proto, now, Some(e.win[0]));
            if info != e.info || now.saturating_sub(e.seen) >= SEEN_GRANULARITY_NS {
                self.begin(i);
                s.info.store(info, Ordering::Relaxed);
                s.seen.fetch_max(now, Ordering::Relaxed);
                self.end(i);
            }
            return Update::Pass(state);
        }
        match tcp_step(e.info, &e.win, original, seg) {
            (tcp::Verdict::Valid, info, win, state) => {
                if info != e.info
                    || win != e.win
                    || now.saturating_sub(e.seen) >= SEEN_GRANULARITY_NS
                {
                    self.begin(i);
                    s.info.store(info, Ordering::Relaxed);
                    for (w, v) in s.win.iter().zip(win) {
                        w.store(v, Ordering::Relaxed);
                    }
                    s.seen.fetch_max(now, Ordering::Relaxed);
                    self.end(i);
                }
                Update::Pass(state)
            }
            (tcp::Verdict::Ignore, info, win, state) => {
                // Part of the flow, moves nothing but what the window check itself keeps (an
                // overshooting sender's end); like netfilter, it does not refresh the timeout.
                if win != e.win || info != e.info {
                    self.begin(i);
                    s.info.store(info, Ordering::Relaxed);
                    for (w, v) in s.win.iter().zip(win) {
                        w.store(v, Ordering::Relaxed);
                    }
                    self.end(i);
                }
                Update::Pass(state)
            }
            (tcp::Verdict::Invalid(why), ..) => Update::Invalid(why),
            (tcp::Verdict::Reopen, ..) => {
                self.clear(i);
                self.entries.fetch_sub(1, Ordering::Relaxed);
                Update::Reopen
            }
            (tcp::Verdict::Kill, ..) => {
                self.clear(i);
                self.entries.fetch_sub(1, Ordering::Relaxed);
                Update::Pass(FlowState::Closed)
            }
        }
    }

    /// Records that table `generation` admitted flow `hit` again (after a swap). A newer
    /// generation already there stays.
    pub fn revalidate(&self, hit: &Hit, packet: &Tuple, generation: u32, now: u64) {
        let b = hit.slot / WAYS;
        self.lock(b);
        if let Some((e, _)) = self.holds(hit.slot, packet, now) {
            // The same instance (a flow removed and opened again in this slot since carries
            // another generation), and not admitted by a newer table meanwhile.
            if e.generation == hit.generation && older(e.generation, generation) {
                self.begin(hit.slot);
                self.slots[hit.slot]
                    .generation
                    .store(generation, Ordering::Relaxed);
                self.end(hit.slot);
            }
        }
        self.unlock(b);
    }

    /// Starts flow `t` (a packet policy admitted, in its original direction; `seg`: its TCP
    /// segment) under table `generation`. If the flow exists already (another worker opened it
    /// a moment ago), the packet is applied to it instead: looking and inserting happen under
    /// both bucket locks, so a flow never gets two entries.
    pub fn insert(
        &self,
        t: &Tuple,
        seg: &Segment,
        generation: u32,
        now: u64,
    ) -> Result<Opened, InsertError> {
        self.insert_at(t, &self.locate(t), seg, generation, now)
    }

    /// [`Conntrack::insert`] with the flow's place already computed (by its probe).
    pub(crate) fn insert_at(
        &self,
        t: &Tuple,
        place: &Place,
        seg: &Segment,
        generation: u32,
        now: u64,
    ) -> Result<Opened, InsertError> {
        let (info, win) = if t.proto == proto::TCP {
            let Some((conn, tcp::Verdict::Valid)) = TcpConn::open(seg) else {
                return Err(InsertError::Refused);
            };
            (pack_tcp(0, &conn), win_words(&conn))
        } else {
            (CODE_UNREPLIED, [now, 0, 0, 0])
        };
        let b = [place.b[0] as usize, place.b[1] as usize];
        self.lock_pair(b);
        let r = self.insert_locked(t, b, place.tag, info, win, generation, seg, now);
        self.unlock_pair(b);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_locked(
        &self,
        t: &Tuple,
        b: [usize; 2],
        tag: u8,
        info: u32,
        win: [u64; 4],
        generation: u32,
        seg: &Segment,
        now: u64,
    ) -> Result<Opened, InsertError> {
        let pair: &[usize] = if b[0] == b[1] { &b[..1] } else { &b[..] };
        // Is it there already? Nothing can add it meanwhile: every insert of it holds these two
        // locks, and under them the tag words are exact.
        // An entry of the same flow that this worker's clock calls expired (another worker's
        // clock may lag) is replaced in place, so there is never a second one.
        let (m, rm) = (t.meta(), t.reversed().meta());
        let mut same: Option<usize> = None;
        'exists: for &x in pair {
            let mut cand = tag_matches(self.heads[x].tags.load(Ordering::Relaxed), tag);
            while cand != 0 {
                let i = x * WAYS + (cand.trailing_zeros() / 8) as usize;
                cand &= cand - 1;
                let w = self.slots[i].meta.load(Ordering::Relaxed);
                if w != m && w != rm {
                    continue;
                }
                if self.holds(i, t, now).is_some() {
                    match self.update_locked(i, t, seg, now) {
                        // A SYN that ended a closed entry: the new flow goes in below.
                        Update::Reopen => break 'exists,
                        r => return Ok(Opened::Exists(r)),
                    }
                }
                if self
                    .entry(i)
                    .is_some_and(|e| e.tuple == *t || e.tuple == t.reversed())
                {
                    same = Some(i);
                    break 'exists;
                }
            }
        }
        // The same flow's expired entry; else a free slot, the primary bucket first (from the
        // tag words: no slot is read); else an expired one; else room a move makes; else the
        // oldest unassured entry. Only each slot's first line is read.
        let free = if same.is_some() {
            None
        } else {
            pair.iter().find_map(|&x| self.free_slot(x))
        };
        let mut expired: Option<usize> = None;
        let mut victim: Option<(usize, u64)> = None;
        let full = same.is_none() && free.is_none();
        for &x in pair.iter().filter(|_| full) {
            for i in x * WAYS..(x + 1) * WAYS {
                let s = &self.slots[i];
                let info = s.info.load(Ordering::Relaxed);
                if info & I_STATE == 0 {
                    continue;
                }
                let seen = s.seen.load(Ordering::Relaxed);
                let proto_ = s.meta.load(Ordering::Relaxed) as u8;
                if self.idle_expired(proto_, info, seen, now) {
                    expired.get_or_insert(i);
                } else if info & I_ASSURED == 0 && victim.is_none_or(|(_, v)| seen < v) {
                    victim = Some((i, seen));
                }
            }
        }
        let chosen = same
            .map(|i| (i, Displaced::Expired))
            .or(free.map(|i| (i, Displaced::Nothing)))
            .or(expired.map(|i| (i, Displaced::Expired)));
        let chosen = match chosen {
            Some(c) => Some(c),
            // Room by moving before evicting, while the table as a whole has room.
            None if self.entries() < self.capacity() => self
                .cuckoo(pair, now)
                .map(|i| (i, Displaced::Moved))
                .or(victim.map(|(i, _)| (i, Displaced::Evicted))),
            None => victim.map(|(i, _)| (i, Displaced::Evicted)),
        };
        let Some((i, displaced)) = chosen else {
            return Err(InsertError::Full);
        };
        // Counted before the slot is written: a locked add after the stores would wait for
        // them (two cache lines, likely missing) to drain from the store buffer.
        if matches!(displaced, Displaced::Nothing | Displaced::Moved) {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        let home = i / WAYS;
        let alt = if home == b[0] { b[1] } else { b[0] };
        if home != b[0] {
            self.heads[b[0]].spilled.store(1, Ordering::Release);
        }
        self.put(
            i,
            &Entry {
                tuple: *t,
                info,
                generation,
                seen: now,
                win,
                alt: alt as u32,
            },
            tag,
        );
        Ok(Opened::New(displaced))
    }

    /// A free slot of bucket `x` (locked by the caller), else an expired one (which
    /// [`Conntrack::move_entry`] counts as freed when it overwrites it).
    fn room(&self, x: usize, now: u64) -> Option<usize> {
        self.free_slot(x).or_else(|| {
            (x * WAYS..(x + 1) * WAYS)
                .find(|&i| self.read(i).is_some_and(|c| self.expired(&c, now)))
        })
    }

    /// Moves the entry in slot `from` to slot `to` (both buckets locked by the caller): the new
    /// place first, then the move counter, then the old place cleared.
    fn move_entry(&self, from: usize, to: usize) {
        let Some(mut e) = self.entry(from) else {
            return;
        };
        let to_was_live = self.entry(to).is_some();
        let (b, tag) = self.place(&e.tuple);
        e.alt = (if to / WAYS == b[0] { b[1] } else { b[0] }) as u32;
        if to / WAYS != b[0] {
            self.heads[b[0]].spilled.store(1, Ordering::Release);
        }
        self.put(to, &e, tag);
        self.moves.fetch_add(1, Ordering::Release);
        self.clear(from);
        if to_was_live {
            // An expired entry was overwritten.
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Makes room in one of `pair` (locked) by moving an entry to its other bucket, or an entry
    /// of that bucket on to its own other bucket (a cuckoo path of length two). Further buckets
    /// are only tried, never waited for. Returns the slot freed in `pair`.
    fn cuckoo(&self, pair: &[usize], now: u64) -> Option<usize> {
        for &x in pair {
            for i in x * WAYS..(x + 1) * WAYS {
                let alt = self.slots[i].alt.load(Ordering::Relaxed) as usize;
                if pair.contains(&alt) || alt >= self.buckets || !self.try_lock(alt) {
                    continue;
                }
                if let Some(f) = self.room(alt, now) {
                    self.move_entry(i, f);
                    self.unlock(alt);
                    return Some(i);
                }
                for j in alt * WAYS..(alt + 1) * WAYS {
                    let alt2 = self.slots[j].alt.load(Ordering::Relaxed) as usize;
                    if pair.contains(&alt2)
                        || alt2 == alt
                        || alt2 >= self.buckets
                        || !self.try_lock(alt2)
                    {
                        continue;
                    }
                    let room = self.room(alt2, now);
                    if let Some(f) = room {
                        self.move_entry(j, f);
                        self.move_entry(i, j);
                    }
                    self.unlock(alt2);
                    if room.is_some() {
                        self.unlock(alt);
                        return Some(i);
                    }
                }
                self.unlock(alt);
            }
        }
        None
    }

    /// Removes the flow of `hit` (policy no longer admits it). Returns whether this call removed
    /// it (another worker may have first).
    pub fn remove(&self, hit: &Hit, packet: &Tuple, now: u64) -> bool {
        let b = hit.slot / WAYS;
        self.lock(b);
        let done = self
            .holds(hit.slot, packet, now)
            .is_some_and(|(e, _)| e.generation == hit.generation);
        if done {
            self.clear(hit.slot);
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
        self.unlock(b);
        done
    }

    /// Frees the expired entries among `n` slots from `*cursor` on, and moves the cursor.
    /// Returns how many were freed. Bounded work: a worker calls it once per turn; a bucket
    /// another worker holds is skipped this time.
    pub fn sweep(&self, cursor: &mut usize, n: usize, now: u64) -> usize {
        let mut freed = 0;
        for _ in 0..n.min(self.slots.len()) {
            let i = *cursor % self.slots.len();
            *cursor = cursor.wrapping_add(1);
            // A relaxed look first: free slots and fresh flows (most of them) need no lock.
            let s = &self.slots[i];
            let info = s.info.load(Ordering::Relaxed);
            if info & I_STATE == 0 {
                continue;
            }
            let proto_ = s.meta.load(Ordering::Relaxed) as u8;
            if !self.idle_expired(proto_, info, s.seen.load(Ordering::Relaxed), now) {
                continue;
            }
            let b = i / WAYS;
            if !self.try_lock(b) {
                continue;
            }
            if let Some(c) = self.read(i) {
                if self.expired(&c, now) {
                    self.clear(i);
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                    freed += 1;
                }
            }
            self.unlock(b);
        }
        freed
    }

    /// Paced [`Conntrack::sweep`]: a worker's share of the expiry work at `now`, at most `max`
    /// slots (see [`Sweeper`]).
    pub fn sweep_paced(&self, sw: &mut Sweeper, max: usize, now: u64) -> usize {
        let cap = self.slots.len() as u128;
        let last = *sw.last.get_or_insert(now);
        let due = (now.saturating_sub(last) as u128 * cap / SWEEP_PERIOD_NS as u128) as usize;
        let n = due.min(max);
        if n == 0 {
            return 0;
        }
        // The time the `n` slots stand for; a worker that fell behind (a long idle sleep, or
        // `max` too small) owes at most one period.
        let step = (n as u128 * SWEEP_PERIOD_NS as u128 / cap) as u64;
        sw.last = Some((last + step).max(now.saturating_sub(SWEEP_PERIOD_NS)));
        self.sweep(&mut sw.cursor, n, now)
    }

    /// Every live flow for which `keep` holds (off the datapath: walks the whole table with
    /// seqlocked copies, taking no lock a worker could wait on).
    pub fn list(&self, now: u64, mut keep: impl FnMut(&Tuple) -> bool) -> Vec<FlowEntry> {
        let mut out = Vec::new();
        for i in 0..self.slots.len() {
            let Some((c, win)) = self.read_full(i) else {
                continue;
            };
            if self.expired(&c, now) || !keep(&c.tuple) {
                continue;
            }
            let window = (c.tuple.proto == proto::TCP).then(|| {
                tcp_of(c.info, &win).sides.map(|s| WindowView {
                    end: s.end,
                    maxend: s.maxend,
                    maxwin: s.maxwin,
                    scale: s.scale,
                })
            });
            out.push(entry_view(&c, now, window));
        }
        out
    }

    /// Removes every live flow for which `drop` holds. Returns how many.
    pub fn flush(&self, mut drop: impl FnMut(&Tuple) -> bool) -> usize {
        let mut n = 0;
        for b in 0..self.buckets {
            self.lock(b);
            for i in b * WAYS..(b + 1) * WAYS {
                if let Some(e) = self.entry(i) {
                    if drop(&e.tuple) {
                        self.clear(i);
                        self.entries.fetch_sub(1, Ordering::Relaxed);
                        n += 1;
                    }
                }
            }
            self.unlock(b);
        }
        n
    }
}

/// The byte mask of the slots whose tag is `tag` (0x80 in each matching byte).
#[inline(always)]
fn tag_matches(tags: u64, tag: u8) -> u64 {
    // Exact per-byte equality: a zero byte of `x` is a match (no false positives, unlike the
    // classic haszero trick's borrow).
    let x = tags ^ (tag as u64 * 0x0101_0101_0101_0101);
    let y = (x & 0x7f7f_7f7f_7f7f_7f7f).wrapping_add(0x7f7f_7f7f_7f7f_7f7f);
    !(y | x | 0x7f7f_7f7f_7f7f_7f7f)
}

fn first_tag(tags: u64, tag: u8) -> Option<usize> {
    let m = tag_matches(tags, tag);
    (m != 0).then(|| (m.trailing_zeros() / 8) as usize)
}

#[inline(always)]
fn hit(i: usize, c: &SlotCopy, original: bool) -> Hit {
    Hit {
        slot: i,
        info: c.info,
        original,
        state: FlowState::from_code(c.info & I_STATE).unwrap_or(FlowState::Closed),
        assured: c.info & I_ASSURED != 0,
        generation: c.generation,
        proto: c.tuple.proto,
        seen: c.seen,
    }
}

/// Protocols netfilter assures like UDP (a stream): UDP, UDP-Lite, and SCTP, which we track
/// without its own state machine.
fn udp_like(p: u8) -> bool {
    matches!(p, proto::UDP | proto::SCTP | 136)
}

/// A protocol without TCP's states: a reply makes it replied. Only UDP-like flows become
/// assured, and only as netfilter's `stream_ts` says: a packet after the reply was seen, at
/// least 2 s after the flow opened (`created`; `None` when unknown: then never). ICMP and the
/// generic protocols are never assured, so a flood of answered pings or ESP cannot fill the
/// table with entries that may not be evicted.
fn generic_next(
    info: u32,
    original: bool,
    proto_: u8,
    now: u64,
    created: Option<u64>,
) -> (u32, FlowState) {
    let mut next = info;
    if udp_like(proto_)
        && info & I_SEEN_REPLY != 0
        && created.is_some_and(|c| now >= c.saturating_add(2 * NS))
    {
        next |= I_ASSURED;
    }
    if !original {
        next = next & !I_STATE | CODE_REPLIED | I_SEEN_REPLY;
    }
    let s = if next & I_STATE == CODE_REPLIED {
        FlowState::Replied
    } else {
        FlowState::Unreplied
    };
    (next, s)
}

/// Whether a TCP packet provably changes nothing and is valid: an ACK (PSH, URG aside) on an
/// established, assured flow, inside every bound of `tcp_in_window`, moving none of them. The
/// common case, decided from the words without unpacking the connection; anything else goes
/// through [`tcp_step`]. A property test checks that whenever this says so, `tcp_step` agrees.
#[inline(always)]
fn tcp_unchanged(info: u32, win: &[u64; 4], original: bool, seg: &Segment) -> bool {
    use tcp::{F_DATA_UNACK, F_MAXACK_SET, F_SACK_PERM};
    use tcp_flags::*;
    let d = (!original) as usize;
    // Established, assured, replied, and the last in-window segment an ACK the same way: one
    // compare of the info word's low bits.
    let mask = I_STATE | I_ASSURED | I_SEEN_REPLY | I_LAST_DIR | 7 << I_LAST_INDEX;
    let want = TcpState::Established as u32
        | I_ASSURED
        | I_SEEN_REPLY
        | if d == 1 { I_LAST_DIR } else { 0 }
        | 3 << I_LAST_INDEX;
    if info & mask != want
        || seg.flags & (SYN | FIN | RST | ACK) != ACK
        || !tcp::valid_flags(seg.flags)
    {
        return false;
    }
    let bits = |side: usize| info >> I_SIDE[side];
    let (sb, rb) = (bits(d), bits(1 - d));
    let (s_scale, s_flags) = (sb & 0xf, (sb >> 4) & 0x1f);
    let r_flags = (rb >> 4) & 0x1f;
    let (s_end, s_maxend) = (win[2 * d] as u32, (win[2 * d] >> 32) as u32);
    let (s_maxwin, s_maxack) = (win[2 * d + 1] as u32, (win[2 * d + 1] >> 32) as u32);
    let (r_end, r_maxend) = (win[2 * (1 - d)] as u32, (win[2 * (1 - d)] >> 32) as u32);
    let r_maxwin = win[2 * (1 - d) + 1] as u32;
    let before = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
    let after = |a: u32, b: u32| before(b, a);
    if s_maxwin == 0 || s_flags & F_MAXACK_SET as u32 == 0 {
        return false;
    }
    let ack = seg.ack;
    let sack = if r_flags & F_SACK_PERM as u32 != 0 && after(seg.sack, seg.ack) {
        seg.sack
    } else {
        ack
    };
    let (seq, end) = (seg.seq, seg.seq.wrapping_add(seg.len));
    let win_s = (seg.win as u32) << s_scale;
    // The receiver's right edge moves to `sack + win` (one more for a zero window) when that is
    // at or past it: a change unless it is already exactly there.
    let edge = sack.wrapping_add(win_s);
    // Every condition is computed and combined with `&`, not `&&`: all of them hold on the
    // common path, where branching on each costs more than evaluating the rest.
    before(seq, s_maxend.wrapping_add(1))
        & before(sack, r_end.wrapping_add(1))
        & (r_maxwin == 0 || after(end, s_end.wrapping_sub(r_maxwin).wrapping_sub(1)))
        & after(sack, r_end.wrapping_sub(s_maxwin).wrapping_sub(1))
        & (win_s.wrapping_add(sack.wrapping_sub(ack)) <= s_maxwin)
        & !after(end, s_end)
        & !after(ack, s_maxack)
        & !(r_maxwin != 0 && after(end, s_maxend))
        & (!after(edge, r_maxend.wrapping_sub(1))
            || edge.wrapping_add((win_s == 0) as u32) == r_maxend)
        & !(ack == r_end && r_flags & F_DATA_UNACK as u32 != 0)
}

/// A TCP packet applied to a flow's info and window words: the verdict, the new info and window
/// words, and the state to report.
#[inline(always)]
fn tcp_step(
    info: u32,
    win: &[u64; 4],
    original: bool,
    seg: &Segment,
) -> (tcp::Verdict, u32, [u64; 4], FlowState) {
    let mut conn = tcp_of(info, win);
    let old = conn.state;
    let v = conn.packet_seen(!original, seg, info & I_SEEN_REPLY != 0);
    match v {
        tcp::Verdict::Valid => {
            let mut next = pack_tcp(info, &conn);
            if !original {
                next |= I_SEEN_REPLY;
            }
            if TcpConn::assures(old, conn.state) && next & I_SEEN_REPLY != 0 {
                next |= I_ASSURED;
            }
            (v, next, win_words(&conn), FlowState::of_tcp(conn.state))
        }
        // Ignored: the state stays, but what the window check itself keeps (a re-initialised
        // side's options, an overshooting sender's end) is kept whole, as netfilter keeps it.
        tcp::Verdict::Ignore => (
            v,
            pack_tcp(info, &conn),
            win_words(&conn),
            FlowState::of_tcp(old),
        ),
        _ => (v, info, win_words(&conn), FlowState::of_tcp(old)),
    }
}

/// A TCP flow's state from its info word and window words.
fn tcp_of(info: u32, win: &[u64; 4]) -> TcpConn {
    let mut c = TcpConn {
        state: TcpState::from_code((info & I_STATE) as u8),
        last_dir: ((info & I_LAST_DIR) != 0) as u8,
        last_index: ((info >> I_LAST_INDEX) & 7) as u8,
        ..TcpConn::default()
    };
    for (d, side) in c.sides.iter_mut().enumerate() {
        let bits = info >> I_SIDE[d];
        side.scale = (bits & 0xf) as u8;
        side.flags = ((bits >> 4) & ((1 << tcp::FLAG_BITS) - 1)) as u8;
        side.end = win[2 * d] as u32;
        side.maxend = (win[2 * d] >> 32) as u32;
        side.maxwin = win[2 * d + 1] as u32;
        side.maxack = (win[2 * d + 1] >> 32) as u32;
    }
    c
}

/// `info` with a TCP flow's state, last segment and per-side scale and flags.
fn pack_tcp(info: u32, c: &TcpConn) -> u32 {
    let keep = info & (I_ASSURED | I_SEEN_REPLY);
    let mut w = keep
        | c.state as u32
        | if c.last_dir != 0 { I_LAST_DIR } else { 0 }
        | (c.last_index as u32 & 7) << I_LAST_INDEX;
    if c.state == TcpState::None {
        w |= TcpState::SynSent as u32;
    }
    for (d, side) in c.sides.iter().enumerate() {
        w |= ((side.scale as u32 & 0xf) | (side.flags as u32) << 4) << I_SIDE[d];
    }
    w
}

fn win_words(c: &TcpConn) -> [u64; 4] {
    let mut w = [0; 4];
    for (d, s) in c.sides.iter().enumerate() {
        w[2 * d] = s.end as u64 | (s.maxend as u64) << 32;
        w[2 * d + 1] = s.maxwin as u64 | (s.maxack as u64) << 32;
    }
    w
}

/// A flow as `conntrack list` shows it.
fn entry_view(c: &SlotCopy, now: u64, window: Option<[WindowView; 2]>) -> FlowEntry {
    let t = &c.tuple;
    let k = t.key();
    let (sport, dport) = if is_icmp(t.proto) {
        (t.sport, t.dport & 0xff)
    } else {
        (t.sport, t.dport)
    };
    FlowEntry {
        direction: match t.dir {
            Direction::Ingress => "ingress".into(),
            Direction::Egress => "egress".into(),
        },
        proto: t.proto,
        src: k.src_addr().to_string(),
        sport,
        dst: k.dst_addr().to_string(),
        dport,
        vlan: (t.vlan != NO_VLAN).then_some(t.vlan),
        vlan2: (t.vlan2 != NO_VLAN).then_some(t.vlan2),
        state: FlowState::from_code(c.info & I_STATE).unwrap_or(FlowState::Closed),
        assured: c.info & I_ASSURED != 0,
        generation: c.generation,
        idle_ms: now.saturating_sub(c.seen) / 1_000_000,
        window,
    }
}

impl Hit {
    /// The flow as it was opened, from the tuple of the packet that found it.
    pub fn original_tuple(&self, packet: &Tuple) -> Tuple {
        if self.original {
            *packet
        } else {
            packet.reversed()
        }
    }

    /// The flow of this hit as `conntrack list` shows it (`packet`: the tuple that found it).
    pub fn entry(&self, packet: &Tuple, now: u64) -> FlowEntry {
        entry_view(
            &SlotCopy {
                tuple: self.original_tuple(packet),
                info: self.info,
                generation: self.generation,
                seen: self.seen,
            },
            now,
            None,
        )
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model;
