//! TCP state and window tracking, as netfilter does it (`nf_conntrack_proto_tcp.c`:
//! `tcp_conntracks`, `tcp_in_window`, `nf_conntrack_tcp_packet`), which follows Guido van
//! Rooney's "Real Stateful TCP Packet Filtering in IP Filter".
//!
//! Pure functions over a flow's [`TcpConn`]: the table calls [`TcpConn::packet`] under the flow's
//! bucket lock and stores what it returns. A segment is checked against four bounds per
//! direction (the highest sequence number sent, `end`; the highest the receiver allowed,
//! `maxend`; the largest window seen, `maxwin`; the highest acknowledgement, `maxack`):
//!
//! 1. its data ends after `end - receiver.maxwin` (not older than a window back);
//! 2. it starts before `maxend + 1` (inside what the receiver advertised);
//! 3. it acknowledges nothing beyond what the other side sent (`sack <= receiver.end`);
//! 4. it acknowledges nothing older than a window back.
//!
//! A segment outside them is [`Verdict::Invalid`]: it changes no state. So does a SYN, FIN or RST
//! with a bad checksum (the parser verifies checksums only on those, so data pays nothing), and
//! a flag combination no stack sends. A RST closes the flow only when its sequence number is the
//! one the receiver expects next (RFC 5961 §3.2); one that is in the window but not exact
//! passes without closing, so the endpoint can answer it with a challenge ACK.

use super::tcp_flags::*;

/// The window scale option was present (the shift is in [`Side::scale`]).
pub(crate) const F_WSCALE: u8 = 0x01;
/// SACK permitted.
pub(crate) const F_SACK_PERM: u8 = 0x02;
/// This side sent the first FIN (it closed actively).
pub(crate) const F_CLOSE_INIT: u8 = 0x04;
/// `maxack` holds a value.
pub(crate) const F_MAXACK_SET: u8 = 0x08;
/// This side has sent data the other has not acknowledged.
pub(crate) const F_DATA_UNACK: u8 = 0x10;
/// The flags fit in this many bits (the slot packs them).
pub(crate) const FLAG_BITS: u32 = 5;

/// No window scale option in the segment.
pub const NO_WSCALE: u8 = 0xff;

/// What the tracker reads of a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The window field, unscaled.
    pub win: u16,
    /// Payload bytes.
    pub len: u32,
    /// The window scale option's shift, or [`NO_WSCALE`].
    pub wscale: u8,
    pub sack_perm: bool,
    /// The highest right edge of the SACK blocks, or `ack` when there are none.
    pub sack: u32,
    /// The checksum was verified and is right, or was not verified (segments that cannot change
    /// state are not checked).
    pub csum_ok: bool,
}

impl Default for Segment {
    fn default() -> Self {
        Segment {
            flags: 0,
            seq: 0,
            ack: 0,
            win: 0,
            len: 0,
            wscale: NO_WSCALE,
            sack_perm: false,
            sack: 0,
            csum_ok: true,
        }
    }
}

/// A connection's state, netfilter's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    #[default]
    None = 0,
    SynSent = 1,
    SynRecv = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    LastAck = 6,
    TimeWait = 7,
    Close = 8,
    /// Simultaneous open: SYNs both ways.
    SynSent2 = 9,
}

impl TcpState {
    pub(crate) fn from_code(c: u8) -> TcpState {
        use TcpState::*;
        match c {
            1 => SynSent,
            2 => SynRecv,
            3 => Established,
            4 => FinWait,
            5 => CloseWait,
            6 => LastAck,
            7 => TimeWait,
            8 => Close,
            9 => SynSent2,
            _ => None,
        }
    }
}

/// One direction's window bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Side {
    pub end: u32,
    pub maxend: u32,
    pub maxwin: u32,
    pub maxack: u32,
    pub scale: u8,
    pub flags: u8,
}

/// A TCP flow as the tracker keeps it. `sides[0]` is the original direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpConn {
    pub state: TcpState,
    pub sides: [Side; 2],
    /// The direction (0 original, 1 reply) and index of the last in-window segment.
    pub last_dir: u8,
    pub last_index: u8,
}

/// Why a segment was not accepted into the flow's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A flag combination no TCP stack sends (SYN+FIN, no flags, ...).
    Flags,
    /// A SYN, FIN or RST whose checksum is wrong.
    Checksum,
    /// A segment the state does not allow (a SYN-ACK in the original direction, ...).
    State,
    /// Outside the window.
    Window,
    /// A RST whose sequence number is below what the receiver has acknowledged.
    Rst,
}

/// What a segment does to its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In window; the state moved (or stayed) as the connection says.
    Valid,
    /// Part of the flow but changes nothing (netfilter's IGNORE: a retransmitted SYN or SYN-ACK
    /// in a state past it).
    Ignore,
    /// Not part of the flow's state: the rules decide the packet on its own, and nothing changes.
    Invalid(Invalid),
    /// A SYN on a closed or TIME_WAIT flow: the entry ends and the packet is decided as a new
    /// flow in its own direction.
    Reopen,
    /// The only answer was a RST: the flow never existed for the server; the entry ends (the RST
    /// passes).
    Kill,
}

// The segment's index into the state table.
const I_SYN: usize = 0;
const I_SYNACK: usize = 1;
const I_FIN: usize = 2;
const I_ACK: usize = 3;
const I_RST: usize = 4;
const I_NONE: usize = 5;

fn index(flags: u8) -> usize {
    if flags & RST != 0 {
        I_RST
    } else if flags & SYN != 0 {
        if flags & ACK != 0 {
            I_SYNACK
        } else {
            I_SYN
        }
    } else if flags & FIN != 0 {
        I_FIN
    } else if flags & ACK != 0 {
        I_ACK
    } else {
        I_NONE
    }
}

/// A table entry: a state, or one of these two.
const IV: u8 = 0xfe; // invalid
const IG: u8 = 0xfd; // ignore

/// netfilter's `tcp_conntracks[dir][index][state]`, states in [`TcpState`] order
/// (NONE SYN_SENT SYN_RECV ESTABLISHED FIN_WAIT CLOSE_WAIT LAST_ACK TIME_WAIT CLOSE SYN_SENT2).
const TABLE: [[[u8; 10]; 6]; 2] = {
    const NO: u8 = 0;
    const SS: u8 = 1;
    const SR: u8 = 2;
    const ES: u8 = 3;
    const FW: u8 = 4;
    const CW: u8 = 5;
    const LA: u8 = 6;
    const TW: u8 = 7;
    const CL: u8 = 8;
    const S2: u8 = 9;
    let _ = NO;
    [
        // ORIGINAL
        [
            /* syn    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2],
            /* synack */ [IV, IV, SR, IV, IV, IV, IV, IV, IV, SR],
            /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
            /* ack    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV],
            /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
            /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
        ],
        // REPLY
        [
            /* syn    */ [IV, S2, IV, IV, IV, IV, IV, SS, IV, S2],
            /* synack */ [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR],
            /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
            /* ack    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG],
            /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
            /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
        ],
    ]
};

/// netfilter's `tcp_valid_flags`: the combinations a stack sends (ECE and CWR aside), as a
/// 64-entry bit set over the low six flag bits (one load and a shift per segment).
const VALID_FLAGS: u64 = {
    let valid: [u8; 14] = [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        RST | ACK | PSH,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
        ACK | PSH,
        ACK | PSH | URG,
        FIN | ACK | PSH,
        FIN | ACK | PSH | URG,
    ];
    let mut set = 0u64;
    let mut i = 0;
    while i < valid.len() {
        set |= 1 << valid[i];
        i += 1;
    }
    set
};

/// Whether `flags` is a combination a TCP stack sends (netfilter `tcp_valid_flags`).
#[inline(always)]
pub fn valid_flags(flags: u8) -> bool {
    VALID_FLAGS >> (flags & 0x3f) & 1 == 1
}

#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// Sequence space a segment takes: its data, plus one for a SYN and one for a FIN.
fn seg_end(s: &Segment) -> u32 {
    s.seq
        .wrapping_add(s.len)
        .wrapping_add((s.flags & SYN != 0) as u32)
        .wrapping_add((s.flags & FIN != 0) as u32)
}

/// Reads a SYN's options into `side` (netfilter `tcp_options`).
fn options(side: &mut Side, s: &Segment) {
    // netfilter clears what a SYN may set before reading it again.
    side.flags = 0;
    side.scale = 0;
    if s.wscale != NO_WSCALE {
        side.flags |= F_WSCALE;
        side.scale = s.wscale.min(14);
    }
    if s.sack_perm {
        side.flags |= F_SACK_PERM;
    }
}

impl TcpConn {
    /// The state a first segment (a SYN; the datapath opens TCP flows with nothing else) starts
    /// (netfilter `tcp_new`), then processed like any segment. `None` for a segment that cannot
    /// open a flow.
    pub fn open(s: &Segment) -> Option<(TcpConn, Verdict)> {
        if s.flags & (SYN | ACK | RST | FIN) != SYN || !valid_flags(s.flags) || !s.csum_ok {
            return None;
        }
        // Built whole, not as `TcpConn::default()` patched field by field: that went through
        // the stack in pieces of mixed width and stalled store forwarding on every new flow.
        let end = seg_end(s);
        let mut o = Side {
            end,
            maxend: end,
            maxwin: (s.win as u32).max(1),
            maxack: 0,
            scale: 0,
            flags: 0,
        };
        options(&mut o, s);
        let mut c = TcpConn {
            state: TcpState::None,
            sides: [o, Side::default()],
            last_dir: 0,
            last_index: 0,
        };
        let v = c.packet(false, s);
        Some((c, v))
    }

    /// Processes one segment (`reply`: it travels the reply direction). `seen_reply`: the flow has
    /// passed a packet the reply way before this one.
    pub fn packet(&mut self, reply: bool, s: &Segment) -> Verdict {
        self.packet_seen(reply, s, true)
    }

    /// [`TcpConn::packet`], told whether the flow has seen a reply (netfilter's
    /// `IPS_SEEN_REPLY`): a RST that is the first answer ends the flow ([`Verdict::Kill`]).
    pub fn packet_seen(&mut self, reply: bool, s: &Segment, seen_reply: bool) -> Verdict {
        if !valid_flags(s.flags) {
            return Verdict::Invalid(Invalid::Flags);
        }
        if s.flags & (SYN | FIN | RST) != 0 && !s.csum_ok {
            return Verdict::Invalid(Invalid::Checksum);
        }
        let dir = reply as usize;
        let idx = index(s.flags);
        let old = self.state;
        let mut new = TABLE[dir][idx][old as usize];
        match new {
            IV => return Verdict::Invalid(Invalid::State),
            IG => return Verdict::Ignore,
            n if n == TcpState::SynSent as u8 && old >= TcpState::TimeWait => {
                // A SYN on a closed or TIME_WAIT flow, either way: a new connection on the same
                // ports. netfilter reopens when the old one was closed actively or reset; the
                // rules decide the new one in its own direction either way.
                return Verdict::Reopen;
            }
            n if n == TcpState::Close as u8 && idx == I_RST => {
                let other = &self.sides[1 - dir];
                if other.flags & F_MAXACK_SET != 0 {
                    if before(s.seq, other.maxack) {
                        return Verdict::Invalid(Invalid::Rst);
                    }
                    // In the window but not where the receiver expects it: it passes (the
                    // endpoint answers with a challenge ACK) and closes nothing.
                    if old == TcpState::Established && s.seq != other.maxack {
                        new = old as u8;
                    }
                }
            }
            _ => {}
        }
        match self.in_window(dir, idx, s) {
            Win::Accept => {}
            Win::Ignore => return Verdict::Ignore,
            Win::Invalid => return Verdict::Invalid(Invalid::Window),
        }
        self.last_dir = dir as u8;
        self.last_index = idx as u8;
        let new = TcpState::from_code(new);
        if old != new && new == TcpState::FinWait {
            self.sides[dir].flags |= F_CLOSE_INIT;
        }
        self.state = new;
        if reply && !seen_reply && idx == I_RST {
            return Verdict::Kill;
        }
        Verdict::Valid
    }

    /// Whether the handshake just completed (netfilter sets ASSURED here).
    pub fn assures(old: TcpState, new: TcpState) -> bool {
        matches!(old, TcpState::SynRecv | TcpState::Established) && new == TcpState::Established
    }

    /// netfilter's `tcp_in_window` (current kernels): checks the segment against the bounds and
    /// moves them. A segment beyond the window, or acknowledging data never sent, is invalid;
    /// one entirely below the window (a late retransmit) or acknowledging something older than
    /// a window back is part of the flow but moves nothing (ignored); a sender that overshoots
    /// the receiver's window by less than a window (stacks that do) moves its end and is ignored.
    fn in_window(&mut self, dir: usize, idx: usize, s: &Segment) -> Win {
        let (a, b) = self.sides.split_at_mut(1);
        let (sender, receiver) = if dir == 0 {
            (&mut a[0], &mut b[0])
        } else {
            (&mut b[0], &mut a[0])
        };
        let syn = s.flags & SYN != 0;
        let has_ack = s.flags & ACK != 0;
        let mut seq = s.seq;
        let mut ack = s.ack;
        let mut sack = if receiver.flags & F_SACK_PERM != 0 && after(s.sack, s.ack) {
            s.sack
        } else {
            s.ack
        };
        let mut win = s.win as u32;
        let mut end = seg_end(s);

        if sender.maxwin == 0 {
            // The first segment this way.
            if syn {
                init_sender(sender, receiver, s, end, dir);
                if !has_ack {
                    // Simultaneous open.
                    return Win::Accept;
                }
            } else {
                // Mid-stream (a RST answering the SYN): take the bounds from this segment.
                sender.end = end;
                let swin = win << sender.scale;
                sender.maxwin = swin.max(1);
                sender.maxend = end.wrapping_add(sender.maxwin);
                if receiver.maxwin == 0 {
                    receiver.end = sack;
                    receiver.maxend = sack;
                } else if sack == receiver.end.wrapping_add(1) {
                    // A keepalive's answer.
                    receiver.end = receiver.end.wrapping_add(1);
                }
            }
        } else if syn
            && after(end, sender.end)
            && matches!(self.state, TcpState::SynSent | TcpState::SynRecv)
        {
            // A SYN (or SYN-ACK) sent again with a new initial sequence number.
            init_sender(sender, receiver, s, end, dir);
            if dir == 1 && !has_ack {
                return Win::Accept;
            }
        }

        if !has_ack {
            ack = receiver.end;
            sack = receiver.end;
        } else if s.flags & (ACK | RST) == ACK | RST && ack == 0 {
            // Stacks that set ACK with a zero acknowledgement on a RST.
            ack = receiver.end;
            sack = receiver.end;
        }
        if idx == I_RST && seq == 0 && self.state == TcpState::SynSent {
            // A RST answering the SYN.
            seq = sender.end;
            end = sender.end;
        }

        let maxackwin = if sender.maxwin != 0 {
            sender.maxwin
        } else {
            66_000
        };
        let ack_ok = after(sack, receiver.end.wrapping_sub(maxackwin).wrapping_sub(1));
        if !before(seq, sender.maxend.wrapping_add(1)) {
            // Beyond the window. Some stacks send a little more than the receiver allowed.
            let overshot = end.wrapping_sub(sender.maxend).wrapping_add(1);
            let in_recv_win = receiver.maxwin != 0
                && after(
                    end,
                    sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
                );
            if in_recv_win
                && ack_ok
                && overshot <= receiver.maxwin
                && before(sack, receiver.end.wrapping_add(1))
            {
                sender.end = end;
                sender.flags |= F_DATA_UNACK;
                return Win::Ignore;
            }
            return Win::Invalid;
        }
        if !before(sack, receiver.end.wrapping_add(1)) {
            // Acknowledges data the other side never sent.
            return Win::Invalid;
        }
        let in_recv_win = receiver.maxwin == 0
            || after(
                end,
                sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
            );
        if !in_recv_win || !ack_ok {
            // Entirely old (a late retransmit), or an old acknowledgement.
            return Win::Ignore;
        }
        if !syn {
            win <<= sender.scale;
        }
        let swin = win.wrapping_add(sack.wrapping_sub(ack));
        if sender.maxwin < swin {
            sender.maxwin = swin;
        }
        if after(end, sender.end) {
            sender.end = end;
            sender.flags |= F_DATA_UNACK;
        }
        if has_ack {
            if sender.flags & F_MAXACK_SET == 0 {
                sender.maxack = ack;
                sender.flags |= F_MAXACK_SET;
            } else if after(ack, sender.maxack) {
                sender.maxack = ack;
            }
        }
        if receiver.maxwin != 0 && after(end, sender.maxend) {
            receiver.maxwin = receiver
                .maxwin
                .wrapping_add(end.wrapping_sub(sender.maxend));
        }
        if after(sack.wrapping_add(win), receiver.maxend.wrapping_sub(1)) {
            receiver.maxend = sack.wrapping_add(win);
            if win == 0 {
                receiver.maxend = receiver.maxend.wrapping_add(1);
            }
        }
        if ack == receiver.end {
            receiver.flags &= !F_DATA_UNACK;
        }
        Win::Accept
    }
}

/// What [`TcpConn::in_window`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Win {
    Accept,
    Ignore,
    Invalid,
}

/// netfilter's `tcp_init_sender`: a SYN-ACK answering the SYN, or a SYN from the reply
/// direction (simultaneous open), or either sent again with a new sequence number.
fn init_sender(sender: &mut Side, receiver: &mut Side, s: &Segment, end: u32, dir: usize) {
    sender.end = end;
    sender.maxend = end;
    sender.maxwin = (s.win as u32).max(1);
    options(sender, s);
    // RFC 7323: scaling only when both sides offer it.
    if dir == 1 && (sender.flags & F_WSCALE == 0 || receiver.flags & F_WSCALE == 0) {
        sender.scale = 0;
        receiver.scale = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(flags: u8, seq: u32, ack: u32, win: u16, len: u32) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            win,
            len,
            sack: ack,
            ..Segment::default()
        }
    }

    /// A handshake with window scaling: client ISN 1000, server ISN 5000.
    fn established() -> TcpConn {
        let mut syn = seg(SYN, 1000, 0, 65535, 0);
        syn.wscale = 7;
        let (mut c, v) = TcpConn::open(&syn).unwrap();
        assert_eq!(v, Verdict::Valid);
        let mut synack = seg(SYN | ACK, 5000, 1001, 65160, 0);
        synack.wscale = 7;
        assert_eq!(c.packet_seen(true, &synack, false), Verdict::Valid);
        assert_eq!(c.state, TcpState::SynRecv);
        assert_eq!(
            c.packet(false, &seg(ACK, 1001, 5001, 502, 0)),
            Verdict::Valid
        );
        assert_eq!(c.state, TcpState::Established);
        c
    }

    #[test]
    fn a_handshake_data_and_a_close() {
        let mut c = established();
        // 100 KB from the server in 1448-byte segments, acked as it goes (window 502 << 7).
        let mut sseq = 5001u32;
        for _ in 0..70 {
            assert_eq!(
                c.packet(true, &seg(ACK, sseq, 1001, 509, 1448)),
                Verdict::Valid
            );
            sseq = sseq.wrapping_add(1448);
            assert_eq!(
                c.packet(false, &seg(ACK, 1001, sseq, 502, 0)),
                Verdict::Valid
            );
        }
        assert_eq!(
            c.packet(false, &seg(FIN | ACK, 1001, sseq, 502, 0)),
            Verdict::Valid
        );
        assert_eq!(c.state, TcpState::FinWait);
        assert_eq!(
            c.packet(true, &seg(FIN | ACK, sseq, 1002, 509, 0)),
            Verdict::Valid
        );
        assert_eq!(c.state, TcpState::LastAck);
        assert_eq!(
            c.packet(false, &seg(ACK, 1002, sseq.wrapping_add(1), 502, 0)),
            Verdict::Valid
        );
        assert_eq!(c.state, TcpState::TimeWait);
        // The former server opens again: a new flow, decided by the rules.
        assert_eq!(c.packet(true, &seg(SYN, 9, 0, 100, 0)), Verdict::Reopen);
        assert_eq!(c.packet(false, &seg(SYN, 9, 0, 100, 0)), Verdict::Reopen);
    }

    #[test]
    fn rst_out_of_window_or_inexact_does_not_close() {
        let mut c = established();
        let far = seg(RST, 1001u32.wrapping_add(10_000_000), 0, 0, 0);
        assert_eq!(c.packet(false, &far), Verdict::Invalid(Invalid::Window));
        assert_eq!(c.state, TcpState::Established);
        // From the server, below what the client acknowledged.
        assert_eq!(
            c.packet(true, &seg(RST, 4000, 0, 0, 0)),
            Verdict::Invalid(Invalid::Rst)
        );
        // In the window, not exact: passes, closes nothing.
        assert_eq!(c.packet(true, &seg(RST, 5100, 0, 0, 0)), Verdict::Valid);
        assert_eq!(c.state, TcpState::Established);
        // Bad checksum.
        let mut bad = seg(RST, 5001, 0, 0, 0);
        bad.csum_ok = false;
        assert_eq!(c.packet(true, &bad), Verdict::Invalid(Invalid::Checksum));
        // Exact.
        assert_eq!(c.packet(true, &seg(RST, 5001, 0, 0, 0)), Verdict::Valid);
        assert_eq!(c.state, TcpState::Close);
    }

    #[test]
    fn forged_fin_and_data_outside_the_window_change_nothing() {
        let mut c = established();
        assert_eq!(
            c.packet(
                true,
                &seg(FIN | ACK, 5001u32.wrapping_add(1 << 30), 1001, 10, 0)
            ),
            Verdict::Invalid(Invalid::Window)
        );
        assert_eq!(
            c.packet(true, &seg(ACK, 5001, 1001 + 500_000, 10, 0)),
            Verdict::Invalid(Invalid::Window),
            "acknowledges data never sent"
        );
        assert_eq!(c.state, TcpState::Established);
        assert_eq!(
            c.packet(true, &seg(SYN | FIN, 5001, 0, 10, 0)),
            Verdict::Invalid(Invalid::Flags)
        );
    }

    #[test]
    fn valid_flags_are_netfilters_fourteen_with_ece_and_cwr_ignored() {
        // netfilter's tcp_valid_flags, as written there (TCPHDR_* values).
        let (f, s, r, p, a, u) = (0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20);
        let nf = [
            s,
            s | u,
            s | a,
            r,
            r | a,
            r | a | p,
            f | a,
            f | a | u,
            a,
            a | u,
            a | p,
            a | p | u,
            f | a | p,
            f | a | p | u,
        ];
        for flags in 0..=255u8 {
            assert_eq!(
                valid_flags(flags),
                nf.contains(&(flags & 0x3f)),
                "{flags:#04x}"
            );
        }
    }

    #[test]
    fn the_only_answer_a_rst_kills() {
        let (mut c, _) = TcpConn::open(&seg(SYN, 77, 0, 1000, 0)).unwrap();
        assert_eq!(
            c.packet_seen(true, &seg(RST | ACK, 0, 78, 0, 0), false),
            Verdict::Kill
        );
    }
}

/// Window tracking against a reference model, on simulated connections: two endpoints exchange
/// data through the gateway with window scaling, changing (and zero) windows, losses before the
/// gateway, go-back-N retransmits and reordering; some runs inject a forged segment. The model
/// keeps netfilter's bounds in unwrapped 64-bit sequence space (so it cannot share the tracker's
/// wrap-around mistakes); the first segment it calls invalid must be the first the tracker calls
/// invalid, and a run without a forgery has none.
#[cfg(test)]
mod window_model {
    use super::*;
    use proptest::prelude::*;

    /// netfilter's bounds, unwrapped.
    #[derive(Debug, Clone, Copy, Default)]
    struct MSide {
        end: u64,
        maxend: u64,
        maxwin: u64,
        scale: u32,
    }

    /// A segment in unwrapped space: sequence and acknowledgement as 64-bit offsets.
    #[derive(Debug, Clone, Copy)]
    struct Seg {
        from_b: bool,
        seq: u64,
        ack: u64,
        win: u16,
        len: u32,
    }

    /// `Some(true)`: accepted; `Some(false)`: ignored; `None`: invalid.
    fn model_in_window(m: &mut [MSide; 2], s: &Seg) -> Option<bool> {
        let dir = s.from_b as usize;
        let (snd, rcv) = (m[dir], m[1 - dir]);
        let end = s.seq + s.len as u64;
        let maxackwin = if snd.maxwin != 0 { snd.maxwin } else { 66_000 };
        let ack_ok = s.ack + maxackwin >= rcv.end;
        if s.seq > snd.maxend {
            let overshot = end - snd.maxend + 1;
            let in_recv_win = rcv.maxwin != 0 && end + rcv.maxwin >= snd.end;
            if in_recv_win && ack_ok && overshot <= rcv.maxwin && s.ack <= rcv.end {
                m[dir].end = end;
                return Some(false);
            }
            return None;
        }
        if s.ack > rcv.end {
            return None;
        }
        if !(rcv.maxwin == 0 || end + rcv.maxwin >= snd.end) || !ack_ok {
            return Some(false);
        }
        let win = (s.win as u64) << snd.scale;
        let snd = &mut m[dir];
        snd.maxwin = snd.maxwin.max(win);
        let old_maxend = snd.maxend;
        if end > snd.end {
            snd.end = end;
        }
        let rcv = &mut m[1 - dir];
        if rcv.maxwin != 0 && end > old_maxend {
            rcv.maxwin += end - old_maxend;
        }
        if s.ack + win + 1 > rcv.maxend {
            rcv.maxend = s.ack + win + (win == 0) as u64;
        }
        Some(true)
    }

    #[derive(Debug, Clone)]
    enum Act {
        /// The side sends up to this many bytes of new data.
        Send(bool, u16),
        /// The side acknowledges what it has, advertising a window of this many units.
        Ack(bool, u16),
        /// The side's oldest unacknowledged segments are sent again (a timeout).
        Retransmit(bool),
        /// The next segment to cross the gateway is the one this far back in the queue.
        Deliver(u8),
        /// The next segment in the queue is lost before the gateway.
        Lose,
    }

    fn act() -> impl Strategy<Value = Act> {
        prop_oneof![
            4 => (any::<bool>(), 1u16..1461).prop_map(|(b, n)| Act::Send(b, n)),
            3 => (any::<bool>(), any::<u16>()).prop_map(|(b, w)| Act::Ack(b, w)),
            1 => any::<bool>().prop_map(Act::Retransmit),
            4 => (0u8..3).prop_map(Act::Deliver),
            1 => Just(Act::Lose),
        ]
    }

    /// One endpoint, in unwrapped space (offsets from its own ISN, which is added back on the
    /// wire).
    #[derive(Debug, Clone, Copy)]
    struct End {
        isn: u32,
        nxt: u64,
        una: u64,
        rcv: u64,
        /// The right edge it advertised last (never moved left).
        edge: u64,
        scale: u32,
        /// How far it may send: the highest right edge the peer advertised in a segment that
        /// reached it (a stack knows only what it received).
        peer_edge: u64,
    }

    fn run(
        isn: (u32, u32),
        scales: (u8, u8),
        acts: &[Act],
        forge: Option<(usize, u32, bool)>,
    ) -> Result<(), TestCaseError> {
        let mut ends = [
            End {
                isn: isn.0,
                nxt: 1,
                una: 1,
                rcv: 1,
                edge: 1 + 65_535,
                scale: scales.0 as u32,
                // The SYN-ACK reached the client: the server's (unscaled) window.
                peer_edge: 1 + 65_535,
            },
            End {
                isn: isn.1,
                nxt: 1,
                una: 1,
                rcv: 1,
                edge: 1 + 65_535,
                scale: scales.1 as u32,
                // The server sends nothing before the client's third ACK (or data) reaches it.
                peer_edge: 1,
            },
        ];
        // The handshake, through both.
        let mut syn = Segment {
            flags: SYN,
            seq: isn.0,
            win: 65_535,
            wscale: scales.0,
            ..Segment::default()
        };
        let (mut conn, v) = TcpConn::open(&syn).unwrap();
        prop_assert_eq!(v, Verdict::Valid);
        syn = Segment {
            flags: SYN | ACK,
            seq: isn.1,
            ack: isn.0.wrapping_add(1),
            sack: isn.0.wrapping_add(1),
            win: 65_535,
            wscale: scales.1,
            ..Segment::default()
        };
        prop_assert_eq!(conn.packet(true, &syn), Verdict::Valid);
        // The model starts where the SYNs leave netfilter: ends at ISN+1, each side allowed the
        // other's window (unscaled on SYNs) from what it acknowledged: the client's SYN-ACK'd
        // data up to 1 + 65535, the server's nothing yet (the third ACK opens it).
        let scale = |s: u8| s.min(14) as u32;
        let mut m = [
            MSide {
                end: 1,
                maxend: 1 + 65_535,
                maxwin: 65_535,
                scale: scale(scales.0),
            },
            MSide {
                end: 1,
                maxend: 1,
                maxwin: 65_535,
                scale: scale(scales.1),
            },
        ];
        let ack3 = Seg {
            from_b: false,
            seq: 1,
            ack: 1,
            win: 65_535 >> scales.0,
            len: 0,
        };
        let mut queue: Vec<Seg> = vec![ack3];
        let mut seen = 0usize;
        let (mut first_model, mut first_tracker) = (None, None);
        let mut forged = false;
        let wire = |ends: &[End; 2], s: &Seg| -> Segment {
            let (me, peer) = (&ends[s.from_b as usize], &ends[1 - s.from_b as usize]);
            let ack = peer.isn.wrapping_add(s.ack as u32);
            Segment {
                flags: ACK | if s.len > 0 { 0x08 } else { 0 },
                seq: me.isn.wrapping_add(s.seq as u32),
                ack,
                sack: ack,
                win: s.win,
                len: s.len,
                ..Segment::default()
            }
        };
        let cross = |s: Seg,
                     ends: &mut [End; 2],
                     m: &mut [MSide; 2],
                     conn: &mut TcpConn,
                     seen: &mut usize|
         -> (bool, bool) {
            let model_ok = model_in_window(m, &s).is_some();
            let tracker_ok = !matches!(conn.packet(s.from_b, &wire(ends, &s)), Verdict::Invalid(_));
            // The receiver takes it if it is next in order, and learns the sender's window.
            let sender_scale = ends[s.from_b as usize].scale;
            let r = &mut ends[1 - s.from_b as usize];
            if s.seq == r.rcv {
                r.rcv += s.len as u64;
            }
            r.peer_edge = r.peer_edge.max(s.ack + ((s.win as u64) << sender_scale));
            let snd_peer = &mut ends[s.from_b as usize];
            // What the sender learns from the acknowledgement.
            snd_peer.una = snd_peer.una.max(s.ack.min(snd_peer.nxt));
            *seen += 1;
            (model_ok, tracker_ok)
        };
        for (i, a) in acts.iter().enumerate() {
            if let Some((at, junk, from_b)) = forge {
                if at == i {
                    forged = true;
                    let s = Seg {
                        from_b,
                        seq: ends[from_b as usize].nxt + (1 << 30) + 70_000 + junk as u64,
                        ack: ends[1 - from_b as usize].nxt,
                        win: 100,
                        len: 10,
                    };
                    let (mo, tr) = cross(s, &mut ends, &mut m, &mut conn, &mut seen);
                    first_model = first_model.or((!mo).then_some(seen));
                    first_tracker = first_tracker.or((!tr).then_some(seen));
                }
            }
            match *a {
                Act::Send(b, n) => {
                    let me = ends[b as usize];
                    // Never past what the peer advertised (and this side heard).
                    let len = (n as u64).min(me.peer_edge.saturating_sub(me.nxt));
                    if len == 0 {
                        continue;
                    }
                    let win = ((me.edge - me.rcv) >> me.scale).min(65_535) as u16;
                    queue.push(Seg {
                        from_b: b,
                        seq: me.nxt,
                        ack: me.rcv,
                        win,
                        len: len as u32,
                    });
                    ends[b as usize].nxt += len;
                }
                Act::Ack(b, w) => {
                    let me = &mut ends[b as usize];
                    // A new window that never moves the right edge left.
                    let want = me.rcv + ((w as u64) << me.scale);
                    me.edge = me.edge.max(want);
                    let win = ((me.edge - me.rcv) >> me.scale).min(65_535) as u16;
                    me.edge = me.rcv + ((win as u64) << me.scale);
                    let me = *me;
                    queue.push(Seg {
                        from_b: b,
                        seq: me.nxt,
                        ack: me.rcv,
                        win,
                        len: 0,
                    });
                }
                Act::Retransmit(b) => {
                    let me = ends[b as usize];
                    let len = me.nxt.saturating_sub(me.una).min(1460);
                    if len == 0 {
                        continue;
                    }
                    let win = ((me.edge - me.rcv) >> me.scale).min(65_535) as u16;
                    queue.push(Seg {
                        from_b: b,
                        seq: me.una,
                        ack: me.rcv,
                        win,
                        len: len as u32,
                    });
                }
                Act::Deliver(back) => {
                    if queue.is_empty() {
                        continue;
                    }
                    let at = (back as usize).min(queue.len() - 1);
                    let s = queue.remove(at);
                    let (mo, tr) = cross(s, &mut ends, &mut m, &mut conn, &mut seen);
                    first_model = first_model.or((!mo).then_some(seen));
                    first_tracker = first_tracker.or((!tr).then_some(seen));
                }
                Act::Lose => {
                    if !queue.is_empty() {
                        queue.remove(0);
                    }
                }
            }
            if first_model.is_some() || first_tracker.is_some() {
                break;
            }
        }
        prop_assert_eq!(first_model, first_tracker, "model and tracker disagree");
        if forge.is_none() {
            prop_assert_eq!(first_tracker, None, "a real stack's segment called invalid");
        }
        // A gigabyte past the window is invalid while windows stay far below that (with shifts
        // of 8 and more, netfilter's tolerance for overshooting senders, up to a whole window,
        // can reach it: then only the agreement above is checked).
        if forged && scales.0.max(scales.1) < 8 {
            prop_assert!(
                first_tracker.is_some(),
                "a forged segment far past the window passed"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn real_traffic_is_never_invalid_and_the_first_invalid_agrees(
            isn in (any::<u32>(), prop_oneof![any::<u32>(), Just(u32::MAX - 3000)]),
            scales in (0u8..15, 0u8..15),
            acts in proptest::collection::vec(act(), 1..400),
            forge in proptest::option::of((0usize..400, 0u32..1_000_000, any::<bool>())),
        ) {
            run(isn, scales, &acts, forge)?;
        }
    }
}
