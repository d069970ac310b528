//! One worker per queue index: a run-to-completion loop over the two sockets of its
//! [`QueuePair`], pinned to its own core.
//!
//! Per iteration (a *turn*): load the table once; reap completions and refill the fill rings;
//! receive up to `burst` frames on ext, parse, classify the whole burst, forward the allowed ones
//! to int's TX ring and recycle the rest; the same from int to ext; kick TX only while frames are in
//! flight; record the burst's service time. Nothing in the loop allocates or logs, and the one lock
//! is a tracker bucket's, held for a flow's state change (see `conntrack`); flows to
//! log go through a bounded lock-free queue to the control thread.
//!
//! The clock is read once per non-empty turn under load (the end of one burst is the start of the
//! next), twice after an idle spell, and once every 1024 empty turns otherwise: `Instant::now()`
//! costs tens of nanoseconds in a VM, which an empty spin must not pay.
//!
//! The worker is generic over its [`Rings`]: the real AF_XDP ones in `portcullis run`, the
//! in-memory [`crate::sys::fake::FakeRings`] in tests, which drive it turn by turn.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::publish::TableReader;
use crossbeam_queue::ArrayQueue;
use policy::key::proto;
use policy::key::FlowKey;
use policy::rule::{Direction, Verdict};
use policy::table::{Decision, Table};

use hdrhistogram::Histogram;

use crate::config::{L2Action, Poll, PollMode, L2, MAX_BURST};
use crate::conntrack::frag::{Datagram, Later};
use crate::conntrack::{
    self, older, Conntrack, Displaced, Frag, Hit, InsertError, Kind, Opened, Place, Probe, Track,
    Tuple, Update,
};
use crate::monitor::{Event, Monitor, TrackerState, Wants, SNAPLEN};
use crate::parse::{self, Parsed};
use crate::stats::{new_histogram, CtEvent, Reason, SharedLatency, Tally, WorkerCounters};
use crate::sys::ring::{QueuePair, Received, Rings, Side};
use crate::sys::wait_readable;

/// A flow the control thread should log (rate-limited at the source).
#[derive(Debug, Clone, Copy)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub verdict: Verdict,
    pub rule: u32,
    /// The first rule that asked for logging (an audit or Log rule), or `u32::MAX`.
    pub log_rule: u32,
    pub generation: u64,
    /// The ids of `rule` and `log_rule` (stable across table swaps, so the control thread can
    /// name them after a newer table replaced this one).
    pub rule_id: Option<policy::rule::RuleId>,
    pub log_rule_id: Option<policy::rule::RuleId>,
    pub worker: u16,
    /// A denied packet that looked like a reply (SYN-ACK, echo reply) and had no tracked flow.
    pub no_flow: bool,
    /// The tracker's word, when it decided the drop: `invalid` (a packet its flow's state
    /// refused, which the rules denied too), `fragment_no_first` or `fragment_overlap` (then
    /// `rule` is `u32::MAX`: no rule was consulted).
    pub tracker: Option<Reason>,
}

/// Everything a worker needs, moved into its thread.
pub struct WorkerSetup<R: Rings> {
    pub index: usize,
    pub pair: QueuePair<R>,
    pub reader: TableReader,
    pub counters: Arc<WorkerCounters>,
    pub latency: Arc<SharedLatency>,
    pub flows: Arc<ArrayQueue<FlowRecord>>,
    /// Flows this worker may queue for logging per second.
    pub flow_budget: u32,
    pub burst: usize,
    pub poll: Poll,
    pub l2: L2,
    /// The connection tracker shared by every worker, unless disabled.
    pub conntrack: Option<Arc<Conntrack>>,
    /// Tracker slots checked for expiry per turn.
    pub sweep_per_turn: usize,
    /// The live verdict feed (`portcullis monitor`).
    pub monitor: Arc<Monitor>,
}

// Slot markers for frames that the table does not decide.
const SLOT_DROP: u16 = u16::MAX;
const SLOT_L2_FORWARD: u16 = u16::MAX - 1;
const SLOT_L2_DROP: u16 = u16::MAX - 2;
const SLOT_TRACKED: u16 = u16::MAX - 3;
const SLOT_IP: u16 = u16::MAX - 4;

/// What the tracker does with a frame once the table has decided it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) enum Pending {
    /// Decided by the table alone (no tracker, or nothing to track).
    #[default]
    Untracked,
    /// No tracked flow: an allowed packet that can open one (a SYN, a query request, any UDP
    /// packet...) does, at the place its probe computed.
    Open(Tuple, Place),
    /// A tracked flow decided again: a new SYN, or the first packet after a table swap of a
    /// flow admitted by an older table (the key classified is the flow's original direction;
    /// the tuple is the packet's).
    Recheck(Hit, Tuple),
    /// An ICMP error about a flow an older table admitted: the flow is decided again, and the
    /// error passes as related only if it still stands.
    RecheckRelated(Hit, Tuple),
    /// A packet of a tracked flow that the flow's state refused (TCP window, RST sequence,
    /// checksum, flags): the rules decide it on its own, and it changes nothing. Denied, it
    /// counts as `invalid`.
    Invalid,
}

/// The worker's caller-owned burst arrays: per frame (`parsed`, `tracks`, `kind`, `probe`,
/// `slot`, `keep`), and per packet the classifier decides (`keys`, `decisions`, `pending`).
struct Scratch {
    parsed: [FlowKey; MAX_BURST],
    kind: [Kind; MAX_BURST],
    probe: [Probe; MAX_BURST],
    keys: [FlowKey; MAX_BURST],
    decisions: [Decision; MAX_BURST],
    slot: [u16; MAX_BURST],
    keep: [bool; MAX_BURST],
    pending: [Pending; MAX_BURST],
    tracks: [Track; MAX_BURST],
    /// Written only while someone monitors: each frame's drop reason, tracker state and rule.
    why: [Reason; MAX_BURST],
    trk: [TrackerState; MAX_BURST],
    rule: [u32; MAX_BURST],
    /// The bucket hash's input of the burst's IPv4 tuples, word-major (so a vector load takes
    /// a word of several packets), which frame each is, and their hashes.
    hash_in: [[u64; MAX_BURST]; 3],
    hash_of: [u16; MAX_BURST],
    hash: [u64; MAX_BURST],
}

/// The per-burst path: everything a burst touches except the table reader.
struct Datapath<R: Rings> {
    index: usize,
    pair: QueuePair<R>,
    s: Box<Scratch>,
    tally: Tally,
    burst: usize,
    l2: L2,
    flows: Arc<ArrayQueue<FlowRecord>>,
    flow_tokens: u32,
    /// When the current burst started: the end of the previous one while bursts follow each
    /// other, else read when the first frame of this turn arrives.
    burst_start: Option<Instant>,
    ct: Option<Arc<Conntrack>>,
    monitor: Arc<Monitor>,
}

impl<R: Rings> Datapath<R> {
    /// Moves one burst from `dir`'s receiving side to the other. Returns frames received.
    #[inline]
    fn step(&mut self, dir: Direction, table: &Table) -> usize {
        let side = match dir {
            Direction::Ingress => Side::Ext,
            Direction::Egress => Side::Int,
        };
        let rx = self.pair.receive(side, self.burst);
        let n = rx.len();
        if n == 0 {
            return 0;
        }
        if self.burst_start.is_none() {
            self.burst_start = Some(Instant::now());
        }
        let now = match &self.ct {
            Some(ct) => ct.ns(self.burst_start.unwrap_or_else(Instant::now)),
            None => 0,
        };
        let generation = table.generation() as u32;
        // One load per burst: with nobody listening, the per-frame `mon` branches never run.
        let wants = self.monitor.wants();
        let mon = wants.any();
        let s = &mut *self.s;
        // Pass 1: parse every frame in place and, with a tracker, gather the IPv4 tuples' hash
        // input (the rest are hashed and their bucket heads prefetched at once).
        let mut hashed = 0;
        for i in 0..n {
            let frame = rx.frame(i);
            if let Some(key) = parse::fast_path(frame, dir, &mut s.tracks[i]) {
                // The common case: the key goes to the tracker from registers, then is stored.
                if let Some(ct) = &self.ct {
                    let t = Tuple::of(&key);
                    match t.hash_input() {
                        (w, 3) => {
                            for (col, word) in s.hash_in.iter_mut().zip(w) {
                                col[hashed] = word;
                            }
                            s.hash_of[hashed] = i as u16;
                            hashed += 1;
                        }
                        _ => s.probe[i].place = ct.place_ahead(&t),
                    }
                    s.kind[i] = Kind::Flow(t);
                }
                s.parsed[i] = key;
                s.slot[i] = SLOT_IP;
                continue;
            }
            s.slot[i] = match parse::parse_slow(frame, dir, &mut s.parsed[i], &mut s.tracks[i]) {
                Ok(Parsed::Ip) => {
                    if let Some(ct) = &self.ct {
                        conntrack::classify_into(&s.parsed[i], &s.tracks[i], &mut s.kind[i]);
                        if let Kind::Flow(t) | Kind::Error(t) = &s.kind[i] {
                            s.probe[i].place = ct.place_ahead(t);
                        }
                    }
                    SLOT_IP
                }
                Ok(Parsed::Arp) if self.l2.arp == L2Action::Forward => SLOT_L2_FORWARD,
                Ok(Parsed::OtherL2) if self.l2.other == L2Action::Forward => SLOT_L2_FORWARD,
                Ok(Parsed::Arp | Parsed::OtherL2) => SLOT_L2_DROP,
                Err(reason) => {
                    self.tally.drop(reason);
                    if mon {
                        s.why[i] = reason;
                    }
                    SLOT_DROP
                }
            };
            if mon {
                s.trk[i] = TrackerState::None;
                s.rule[i] = u32::MAX;
            }
        }
        // Then the IPv4 tuples' hashes, all at once (several lanes a vector instruction), and a
        // prefetch of each one's bucket head; then each bucket's tag word (in cache by now, or
        // on its way) and a prefetch of the slot it points at: stages over the burst, as
        // DPDK's bulk hash lookup does, so that the burst's cache misses overlap.
        if let Some(ct) = &self.ct {
            let [a, b, c] = &s.hash_in;
            crate::sys::siphash::siphash13_x3(
                ct.hash_key(),
                [&a[..hashed], &b[..hashed], &c[..hashed]],
                &mut s.hash[..hashed],
                // As wide as this CPU goes.
                crate::sys::siphash::Width::Avx512,
            );
            for j in 0..hashed {
                let place = ct.place_of_hash(s.hash[j]);
                ct.prefetch_head(&place);
                s.probe[s.hash_of[j] as usize].place = place;
            }
            let moves = ct.moves();
            for i in 0..n {
                if s.slot[i] == SLOT_IP && matches!(s.kind[i], Kind::Flow(_) | Kind::Error(_)) {
                    s.probe[i] = ct.probe_at(s.probe[i].place, moves);
                    ct.touch(&s.probe[i]);
                }
            }
        }
        // Pass 2: the tracker passes the packets of flows it holds; the rest go to the
        // classifier, as one batch.
        let mut nkeys = 0usize;
        for i in 0..n {
            if s.slot[i] != SLOT_IP {
                continue;
            }
            let pending = match &self.ct {
                Some(ct) => {
                    let (k, t) = (&s.parsed[i], &s.tracks[i]);
                    match track_probed(ct, k, t, &s.kind[i], &s.probe[i], generation, now) {
                        Tracked::Pass(event) => {
                            self.tally.ct(event);
                            s.slot[i] = SLOT_TRACKED;
                            if mon {
                                s.rule[i] = u32::MAX;
                                s.trk[i] = match event {
                                    CtEvent::Related => TrackerState::Related,
                                    CtEvent::Fragment => TrackerState::Fragment,
                                    _ => TrackerState::Established,
                                };
                            }
                            continue;
                        }
                        Tracked::Decide(key, pending) => {
                            s.keys[nkeys] = key;
                            pending
                        }
                        Tracked::Drop(reason) => {
                            self.tally.drop(reason);
                            s.slot[i] = SLOT_DROP;
                            if mon {
                                s.why[i] = reason;
                                s.trk[i] = TrackerState::Fragment;
                                s.rule[i] = u32::MAX;
                            }
                            if self.flow_tokens > 0 {
                                self.flow_tokens -= 1;
                                let _ = self.flows.push(FlowRecord {
                                    key: s.parsed[i],
                                    verdict: Verdict::Deny(policy::rule::DenyReason::Policy),
                                    rule: u32::MAX,
                                    log_rule: u32::MAX,
                                    generation: table.generation(),
                                    rule_id: None,
                                    log_rule_id: None,
                                    worker: self.index as u16,
                                    no_flow: false,
                                    tracker: Some(reason),
                                });
                            }
                            continue;
                        }
                    }
                }
                None => {
                    s.keys[nkeys] = s.parsed[i];
                    Pending::Untracked
                }
            };
            s.pending[nkeys] = pending;
            s.slot[i] = nkeys as u16;
            nkeys += 1;
        }
        table.decide_batch(self.index, &s.keys[..nkeys], &mut s.decisions[..nkeys]);
        // The allowed new flows' inserts come next: bring in the slots each will read or write
        // (a free one, or under a flood both full buckets' first lines), all before the first
        // insert, so that their misses overlap instead of queueing one insert behind another.
        if let Some(ct) = &self.ct {
            for k in 0..nkeys {
                if let (Pending::Open(_, place), Verdict::Allow) =
                    (&s.pending[k], s.decisions[k].verdict)
                {
                    ct.prepare_insert(place);
                }
            }
        }
        for i in 0..n {
            s.keep[i] = match s.slot[i] {
                SLOT_DROP => false,
                SLOT_TRACKED => true,
                SLOT_L2_FORWARD => {
                    self.tally.l2_forwarded += 1;
                    true
                }
                SLOT_L2_DROP => {
                    self.tally.drop(Reason::L2Policy);
                    if mon {
                        s.why[i] = Reason::L2Policy;
                    }
                    false
                }
                k => {
                    let track = &s.tracks[i];
                    let k = k as usize;
                    let d = s.decisions[k];
                    let outcome = match &self.ct {
                        Some(ct) => settle(
                            ct,
                            &mut self.tally,
                            &s.parsed[i],
                            &s.pending[k],
                            track,
                            d.verdict,
                            generation,
                            now,
                        ),
                        None => Outcome::Table,
                    };
                    let verdict = d.verdict;
                    let denied = !matches!(verdict, Verdict::Allow);
                    if mon {
                        s.rule[i] = d.rule;
                        s.trk[i] = match outcome {
                            Outcome::Invalid => TrackerState::Invalid,
                            _ if denied
                                && matches!(s.pending[k], Pending::Open(..))
                                && conntrack::looks_like_reply(&s.keys[k], track) =>
                            {
                                TrackerState::NoFlow
                            }
                            _ => TrackerState::New,
                        };
                    }
                    if (d.log || denied) && self.flow_tokens > 0 {
                        self.flow_tokens -= 1;
                        let _ = self.flows.push(FlowRecord {
                            key: s.keys[k],
                            verdict,
                            rule: d.rule,
                            log_rule: d.log_rule,
                            generation: table.generation(),
                            rule_id: table.rules().get(d.rule as usize).map(|r| r.id),
                            log_rule_id: table.rules().get(d.log_rule as usize).map(|r| r.id),
                            worker: self.index as u16,
                            no_flow: denied
                                && matches!(s.pending[k], Pending::Open(..))
                                && conntrack::looks_like_reply(&s.keys[k], track),
                            tracker: (denied && outcome == Outcome::Invalid)
                                .then_some(Reason::Invalid),
                        });
                    }
                    let why = match (verdict, outcome) {
                        (Verdict::Allow, Outcome::Full) => Some(Reason::ConntrackFull),
                        (Verdict::Deny(_), Outcome::Invalid) => Some(Reason::Invalid),
                        (Verdict::Allow, _) => None,
                        (Verdict::Deny(r), _) => Some(Reason::from_deny(r)),
                    };
                    match why {
                        Some(r) => {
                            self.tally.drop(r);
                            if mon {
                                s.why[i] = r;
                            }
                            false
                        }
                        None => true,
                    }
                }
            };
        }
        if mon {
            record(s, &self.monitor, self.index, &rx, n, dir, table, wants);
        }
        let (sent, dropped) = rx.forward(&s.keep[..n]);
        self.tally.rx[dir as usize] += n as u64;
        self.tally.tx[dir as usize] += sent as u64;
        self.tally.drops[Reason::TxRingFull as usize] += dropped as u64;
        n
    }
}

/// Queues a burst's verdicts for the monitor (only while someone listens).
#[cold]
#[allow(clippy::too_many_arguments)]
fn record<R: Rings>(
    s: &Scratch,
    monitor: &Monitor,
    index: usize,
    rx: &Received<'_, R>,
    n: usize,
    dir: Direction,
    table: &Table,
    wants: Wants,
) {
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for i in 0..n {
        let allowed = s.keep[i];
        if allowed && !wants.allowed {
            continue;
        }
        let frame = rx.frame(i);
        let ev = Event {
            unix_ns,
            key: s.parsed[i],
            parsed: s.slot[i] == SLOT_TRACKED
                || s.slot[i] < SLOT_IP
                || (s.slot[i] == SLOT_DROP && s.trk[i] != TrackerState::None),
            allowed,
            reason: s.why[i],
            tracker: s.trk[i],
            rule: table.rules().get(s.rule[i] as usize).map(|r| r.id),
            generation: table.generation(),
            worker: index as u16,
            ingress: dir == Direction::Ingress,
            len: frame.len().min(u16::MAX as usize) as u16,
            frame: wants
                .frames
                .then(|| frame[..frame.len().min(SNAPLEN)].into()),
        };
        monitor.push(index, ev);
    }
}

/// What the tracker says about a packet before the table.
pub(crate) enum Tracked {
    /// Part of a tracked flow admitted by the current table (or an ICMP error about one, or a
    /// later fragment of an admitted datagram): it passes without the classifier.
    Pass(CtEvent),
    /// The table decides this key; then [`settle`] applies the verdict to the tracker.
    Decide(FlowKey, Pending),
    /// Dropped before the table (a later fragment without its first).
    Drop(Reason),
}

/// Looks a packet up in the tracker.
#[inline]
pub(crate) fn track_packet(
    ct: &Conntrack,
    k: &FlowKey,
    t: &Track,
    generation: u32,
    now: u64,
) -> Tracked {
    let kind = conntrack::classify_packet(k, t);
    let probe = match &kind {
        Kind::Flow(tuple) | Kind::Error(tuple) => ct.probe(tuple),
        Kind::Fragment | Kind::Untracked => Probe::default(),
    };
    track_probed(ct, k, t, &kind, &probe, generation, now)
}

/// The datagram a fragment belongs to.
fn datagram(k: &FlowKey, t: &Track, id: u32, proto: u8) -> Datagram {
    Datagram {
        dir: k.dir,
        v6: k.v6,
        src: k.src,
        dst: k.dst,
        proto,
        id,
        vlan: k.vlan,
        vlan2: t.vlan2,
    }
}

/// A first fragment that passed admits its datagram's later fragments.
#[inline(always)]
fn passed(ct: &Conntrack, k: &FlowKey, t: &Track, now: u64, generation: u32) {
    if let Frag::First { id, end, proto } = t.frag {
        ct.frags()
            .first(&datagram(k, t, id, proto), end, now, generation);
    }
}

/// [`track_packet`] with the packet's [`Kind`] and bucket [`Probe`] taken earlier.
#[inline(always)]
fn track_probed(
    ct: &Conntrack,
    k: &FlowKey,
    t: &Track,
    kind: &Kind,
    probe: &Probe,
    generation: u32,
    now: u64,
) -> Tracked {
    match kind {
        Kind::Flow(tuple) => match ct.lookup_update(tuple, probe, &t.seg, now) {
            Some((hit, update)) => {
                // The flow's state sees the packet first (netfilter: conntrack before the
                // rules). A flow an older table admitted, and a new SYN, are then decided by the
                // current table, in the flow's original direction.
                let syn = hit.original
                    && k.proto == proto::TCP
                    && t.tcp_flags & (conntrack::tcp_flags::SYN | conntrack::tcp_flags::ACK)
                        == conntrack::tcp_flags::SYN;
                match update {
                    Update::Pass(_) if syn || older(hit.generation, generation) => Tracked::Decide(
                        hit.original_tuple(tuple).key(),
                        Pending::Recheck(hit, *tuple),
                    ),
                    Update::Pass(_) => {
                        passed(ct, k, t, now, generation);
                        Tracked::Pass(CtEvent::Established)
                    }
                    Update::Invalid(_) => Tracked::Decide(*k, Pending::Invalid),
                    // A SYN that reopens a closed flow, or a flow gone meanwhile: a new flow.
                    Update::Reopen | Update::Gone => {
                        Tracked::Decide(*k, Pending::Open(*tuple, probe.place))
                    }
                }
            }
            None => Tracked::Decide(*k, Pending::Open(*tuple, probe.place)),
        },
        Kind::Error(quoted) => match ct.lookup_probed(quoted, probe, now) {
            Some(hit) if !older(hit.generation, generation) => Tracked::Pass(CtEvent::Related),
            // Related to a flow the current table has not decided yet: it decides the flow.
            Some(hit) => Tracked::Decide(
                hit.original_tuple(quoted).key(),
                Pending::RecheckRelated(hit, *quoted),
            ),
            None => Tracked::Decide(*k, Pending::Untracked),
        },
        Kind::Fragment => {
            let Frag::Later {
                id,
                offset,
                len,
                proto,
            } = t.frag
            else {
                return Tracked::Decide(*k, Pending::Untracked);
            };
            match ct.frags().later(
                &datagram(k, t, id, proto),
                offset,
                len,
                now,
                ct.fragment_timeout_ns(),
                generation,
            ) {
                Later::Pass => Tracked::Pass(CtEvent::Fragment),
                Later::NoFirst => Tracked::Drop(Reason::FragmentNoFirst),
                Later::Overlap => Tracked::Drop(Reason::FragmentOverlap),
            }
        }
        Kind::Untracked => Tracked::Decide(*k, Pending::Untracked),
    }
}

/// What the tracker made of the table's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The table's verdict stands.
    Table,
    /// Allowed, but the tracker had no room for the new flow: dropped (`conntrack_full`).
    Full,
    /// A packet its flow's state refused; the table's deny is counted as `invalid`.
    Invalid,
}

/// Applies the table's verdict to the tracker: an allowed packet that can open a flow opens it
/// (or is applied to it, if another worker opened it meanwhile), a denied recheck removes the
/// flow.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn settle(
    ct: &Conntrack,
    tally: &mut Tally,
    k: &FlowKey,
    pending: &Pending,
    t: &Track,
    verdict: Verdict,
    generation: u32,
    now: u64,
) -> Outcome {
    let allowed = matches!(verdict, Verdict::Allow);
    match pending {
        Pending::Untracked => {
            if allowed {
                passed(ct, k, t, now, generation);
            }
            Outcome::Table
        }
        Pending::Invalid => {
            tally.ct(CtEvent::Invalid);
            if allowed {
                passed(ct, k, t, now, generation);
                Outcome::Table
            } else {
                Outcome::Invalid
            }
        }
        Pending::Open(..) if !allowed => Outcome::Table,
        Pending::Open(tuple, place) => {
            // Only a SYN opens a TCP flow, only a request an ICMP one. A mid-stream segment the
            // rules allow passes on its own but opens nothing: otherwise the surviving half of a
            // connection that a new Deny just cut would open it again the other way.
            if !conntrack::opens_flow(k, t) {
                passed(ct, k, t, now, generation);
                return Outcome::Table;
            }
            let outcome = match ct.insert_at(tuple, place, &t.seg, generation, now) {
                Ok(Opened::New(displaced)) => {
                    tally.ct(CtEvent::New);
                    match displaced {
                        Displaced::Nothing => {}
                        Displaced::Expired => tally.ct(CtEvent::Expired),
                        Displaced::Evicted => tally.ct(CtEvent::Evicted),
                        Displaced::Moved => tally.ct(CtEvent::Moved),
                    }
                    Outcome::Table
                }
                Ok(Opened::Exists(Update::Invalid(_))) | Err(InsertError::Refused) => {
                    // Allowed by the rules, refused by the state (a SYN with a bad checksum):
                    // it passes and opens nothing.
                    tally.ct(CtEvent::Invalid);
                    Outcome::Table
                }
                Ok(Opened::Exists(_)) => Outcome::Table,
                Err(InsertError::Full) => Outcome::Full,
            };
            // A first fragment admits the rest of its datagram only if it passes.
            if outcome == Outcome::Table {
                passed(ct, k, t, now, generation);
            }
            outcome
        }
        Pending::Recheck(hit, tuple) | Pending::RecheckRelated(hit, tuple) => {
            if allowed {
                ct.revalidate(hit, tuple, generation, now);
                passed(ct, k, t, now, generation);
            } else {
                ct.remove(hit, tuple, now);
                tally.ct(CtEvent::RevalidatedDrop);
            }
            Outcome::Table
        }
    }
}

/// One worker: its queue pair, its table reader and its counters. [`run`] drives it on its own
/// pinned thread; tests drive it one [`Worker::turn`] at a time.
pub struct Worker<R: Rings> {
    dp: Datapath<R>,
    reader: TableReader,
    counters: Arc<WorkerCounters>,
    latency: Arc<SharedLatency>,
    hist: Histogram<u64>,
    flow_budget: u32,
    poll: Poll,
    empty: u32,
    iterations: u32,
    last_merge: Instant,
    sweep_per_turn: usize,
    sweep: conntrack::Sweeper,
}

impl<R: Rings> Worker<R> {
    /// A worker ready to turn; its fill rings are topped up.
    pub fn new(setup: WorkerSetup<R>) -> Self {
        let WorkerSetup {
            index,
            mut pair,
            reader,
            counters,
            latency,
            flows,
            flow_budget,
            burst,
            poll,
            l2,
            conntrack,
            sweep_per_turn,
            monitor,
        } = setup;
        pair.refill();
        Worker {
            dp: Datapath {
                index,
                pair,
                s: Box::new(Scratch {
                    parsed: [FlowKey::default(); MAX_BURST],
                    kind: [Kind::Untracked; MAX_BURST],
                    probe: [Probe::default(); MAX_BURST],
                    keys: [FlowKey::default(); MAX_BURST],
                    decisions: [Decision::default(); MAX_BURST],
                    slot: [0; MAX_BURST],
                    keep: [false; MAX_BURST],
                    pending: [Pending::Untracked; MAX_BURST],
                    tracks: [Track::default(); MAX_BURST],
                    why: [Reason::Truncated; MAX_BURST],
                    trk: [TrackerState::None; MAX_BURST],
                    rule: [u32::MAX; MAX_BURST],
                    hash_in: [[0; MAX_BURST]; 3],
                    hash_of: [0; MAX_BURST],
                    hash: [0; MAX_BURST],
                }),
                tally: Tally::default(),
                burst,
                l2,
                flows,
                flow_tokens: flow_budget,
                burst_start: None,
                ct: conntrack,
                monitor,
            },
            reader,
            counters,
            latency,
            hist: new_histogram(),
            flow_budget,
            poll,
            empty: 0,
            iterations: 0,
            last_merge: Instant::now(),
            sweep_per_turn,
            sweep: conntrack::Sweeper::default(),
        }
    }

    /// The worker's queue pair (tests reach the fake wire through it).
    pub fn pair(&mut self) -> &mut QueuePair<R> {
        &mut self.dp.pair
    }

    /// One turn of the loop: one burst each way, TX and fill kicks, counters. Returns the frames
    /// received. In idle poll mode, a turn after `idle_after` empty ones sleeps in poll(2).
    pub fn turn(&mut self) -> usize {
        let began = Instant::now();
        // One table version for the whole turn; the reader's cache keeps it alive.
        let table: &Table = self.reader.load();
        let dp = &mut self.dp;
        dp.pair.reap();
        if dp.pair.refill() == 0 && dp.pair.free_frames() == 0 {
            dp.tally.fill_starved += 1;
        }
        let n = dp.step(Direction::Ingress, table) + dp.step(Direction::Egress, table);
        dp.tally.wakeups += dp.pair.kick();
        self.iterations = self.iterations.wrapping_add(1);
        let now = if n > 0 {
            let now = Instant::now();
            let started = dp.burst_start.unwrap_or(now);
            dp.tally.bursts += 1;
            dp.tally.busy_ns += now.duration_since(began).as_nanos() as u64;
            self.hist
                .saturating_record(now.duration_since(started).as_nanos() as u64);
            // Under load the next burst starts where this one ended.
            dp.burst_start = Some(now);
            self.empty = 0;
            self.counters.flush(&mut dp.tally);
            Some(now)
        } else {
            dp.burst_start = None;
            self.empty = self.empty.saturating_add(1);
            let idle = dp.pair.in_flight(Side::Ext) == 0 && dp.pair.in_flight(Side::Int) == 0;
            if self.poll.mode == PollMode::Idle && self.empty >= self.poll.idle_after && idle {
                let _ = wait_readable(&dp.pair.fds(), self.poll.timeout_ms as i32);
                dp.tally.idle_sleeps += 1;
                self.empty = 0;
                self.counters.flush(&mut dp.tally);
                Some(Instant::now())
            } else if self.iterations.is_multiple_of(1024) {
                Some(Instant::now())
            } else {
                None
            }
        };
        if let Some(now) = now {
            if let Some(ct) = &self.dp.ct {
                let freed = ct.sweep_paced(&mut self.sweep, self.sweep_per_turn, ct.ns(now));
                self.dp.tally.ct[CtEvent::Expired as usize] += freed as u64;
            }
            if now.duration_since(self.last_merge) >= Duration::from_secs(1) {
                self.housekeeping(now);
            }
        }
        n
    }

    /// About once a second: publish the latency histogram, refill the flow-log budget.
    fn housekeeping(&mut self, now: Instant) {
        self.latency.try_merge(&mut self.hist);
        self.dp.flow_tokens = self.flow_budget;
        self.last_merge = now;
        self.counters.flush(&mut self.dp.tally);
    }

    /// Flushes every counter and the latency histogram (the worker is stopping, or a test reads).
    pub fn flush(&mut self) {
        self.counters.flush(&mut self.dp.tally);
        self.latency.try_merge(&mut self.hist);
    }
}

/// Runs a worker on the calling thread until `stop` is set. Pins itself to `core` first (a
/// failure to pin is logged, not fatal).
pub fn run<R: Rings>(setup: WorkerSetup<R>, core: usize, stop: &AtomicBool) {
    let span = tracing::info_span!("worker", queue = setup.index, core);
    let _enter = span.enter();
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!("could not pin the worker to core {core}; it runs unpinned");
    }
    tracing::info!(copy_mode = setup.pair.copy_mode, burst = setup.burst, mode = ?setup.poll.mode, "worker started");
    let mut w = Worker::new(setup);
    while !stop.load(Relaxed) {
        w.turn();
    }
    w.flush();
    tracing::info!("worker stopped");
}
