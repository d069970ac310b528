//! The live verdict feed behind `portcullis monitor`: what each worker decided, frame by frame,
//! while someone listens.
//!
//! - Per worker, a bounded lock-free queue of [`Event`]s (crossbeam's `ArrayQueue`): the worker
//!   pushes, the admin thread pops. A full queue loses the event and counts it: the datapath
//!   never waits for a listener.
//! - Nobody listening costs one relaxed load per burst ([`Monitor::wants`]), no per-packet work.
//! - The admin thread drains the queues into a broadcast channel; each `GET /monitor` client
//!   filters that stream and gets JSON lines (with the frame's bytes when asked, which the CLI
//!   writes as pcap).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use policy::key::FlowKey;
use policy::rule::RuleId;

use crate::stats::Reason;

/// Bytes of each frame kept (a whole Ethernet frame with two VLAN tags).
pub const SNAPLEN: usize = 1536;
/// Events each worker's queue holds before it loses them.
pub const QUEUE: usize = 1024;

/// What the tracker had to do with a packet, for the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackerState {
    /// The rules decided it (a new flow, or no tracker).
    New,
    /// Part of a tracked flow: passed without the rules.
    Established,
    /// An ICMP error about a tracked flow.
    Related,
    /// A later fragment of a datagram whose first passed.
    Fragment,
    /// A packet its flow's state refused; the rules decided it on its own.
    Invalid,
    /// A reply-looking packet no tracked flow expected.
    NoFlow,
    /// Not looked at: a frame that did not parse, or not IP.
    None,
}

/// One frame's verdict.
#[derive(Debug, Clone)]
pub struct Event {
    pub unix_ns: u64,
    /// The parsed flow (zero for a frame that did not parse).
    pub key: FlowKey,
    pub parsed: bool,
    pub allowed: bool,
    /// Why it was dropped (meaningless when allowed).
    pub reason: Reason,
    pub tracker: TrackerState,
    /// The deciding rule's id, when a rule decided.
    pub rule: Option<RuleId>,
    pub generation: u64,
    pub worker: u16,
    /// Received on ext (else on int).
    pub ingress: bool,
    /// The frame's length on the wire.
    pub len: u16,
    /// The frame's first [`SNAPLEN`] bytes, when a listener asked for frames (`--pcap`): only
    /// then is anything copied or allocated.
    pub frame: Option<Box<[u8]>>,
}

/// The feed: per-worker queues and who listens.
pub struct Monitor {
    /// Listeners, and those of them that want allowed frames too.
    listeners: AtomicU32,
    allowed: AtomicU32,
    frames: AtomicU32,
    queues: Vec<ArrayQueue<Event>>,
    lost: Vec<AtomicU64>,
}

/// What the workers should record this burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    pub drops: bool,
    pub allowed: bool,
    pub frames: bool,
}

impl Wants {
    pub const NOTHING: Wants = Wants {
        drops: false,
        allowed: false,
        frames: false,
    };

    #[inline]
    pub fn any(&self) -> bool {
        self.drops
    }
}

impl Monitor {
    pub fn new(workers: usize) -> Monitor {
        Monitor {
            listeners: AtomicU32::new(0),
            allowed: AtomicU32::new(0),
            frames: AtomicU32::new(0),
            queues: (0..workers).map(|_| ArrayQueue::new(QUEUE)).collect(),
            lost: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// What to record: nothing unless someone listens (once per burst).
    #[inline]
    pub fn wants(&self) -> Wants {
        if self.listeners.load(Relaxed) == 0 {
            return Wants::NOTHING;
        }
        Wants {
            drops: true,
            allowed: self.allowed.load(Relaxed) > 0,
            frames: self.frames.load(Relaxed) > 0,
        }
    }

    /// Queues `ev` for the listeners; a full queue loses it and counts the loss.
    #[inline]
    pub fn push(&self, worker: usize, ev: Event) {
        let Some(q) = self.queues.get(worker) else {
            return;
        };
        if q.push(ev).is_err() {
            self.lost[worker].fetch_add(1, Relaxed);
        }
    }

    /// Takes every queued event, worker by worker.
    pub fn drain(&self, out: &mut Vec<Event>) {
        for q in &self.queues {
            while let Some(e) = q.pop() {
                out.push(e);
            }
        }
    }

    /// Events lost because a queue was full.
    pub fn lost(&self) -> u64 {
        self.lost.iter().map(|l| l.load(Relaxed)).sum()
    }

    /// Registers a listener until the returned guard is dropped.
    pub fn subscribe(self: &Arc<Self>, allowed: bool, frames: bool) -> Subscription {
        self.listeners.fetch_add(1, Relaxed);
        if allowed {
            self.allowed.fetch_add(1, Relaxed);
        }
        if frames {
            self.frames.fetch_add(1, Relaxed);
        }
        Subscription {
            monitor: Arc::clone(self),
            allowed,
            frames,
        }
    }

    pub fn listeners(&self) -> u32 {
        self.listeners.load(Relaxed)
    }
}

/// A listener's registration; dropping it unregisters.
pub struct Subscription {
    monitor: Arc<Monitor>,
    allowed: bool,
    frames: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.allowed {
            self.monitor.allowed.fetch_sub(1, Relaxed);
        }
        if self.frames {
            self.monitor.frames.fetch_sub(1, Relaxed);
        }
        let left = self.monitor.listeners.fetch_sub(1, Relaxed) - 1;
        if left == 0 {
            // Nobody left: what the workers queued meanwhile is nobody's.
            let mut sink = Vec::new();
            self.monitor.drain(&mut sink);
        }
    }
}

/// What a listener asked for (the query of `GET /monitor`).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub allowed: bool,
    pub addr: Option<std::net::IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    pub reason: Option<String>,
    pub frames: bool,
}

impl Filter {
    /// Parses `all=1&addr=IP&port=N&proto=P&reason=R&frames=1`.
    pub fn parse(query: &str) -> Result<Filter, String> {
        let mut f = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = policy::explain::percent_decode(v);
            match k {
                "all" => f.allowed = v == "1" || v == "true",
                "frames" => f.frames = v == "1" || v == "true",
                "addr" => {
                    f.addr = Some(
                        v.parse()
                            .map_err(|_| format!("addr={v} is not an IP address"))?,
                    )
                }
                "port" => f.port = Some(v.parse().map_err(|_| format!("port={v} is not a port"))?),
                "proto" => {
                    f.proto = Some(
                        policy::key::proto::parse(&v)
                            .ok_or_else(|| format!("proto={v} is not a protocol"))?,
                    )
                }
                "reason" => {
                    if !Reason::ALL.iter().any(|r| r.as_str() == v) {
                        return Err(format!(
                            "reason={v} is not a drop reason ({})",
                            Reason::ALL
                                .iter()
                                .map(|r| r.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    f.reason = Some(v)
                }
                other => {
                    return Err(format!(
                        "{other}: expected all, addr, port, proto, reason or frames"
                    ))
                }
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &Event) -> bool {
        if e.allowed && !self.allowed {
            return false;
        }
        if let Some(r) = &self.reason {
            if e.allowed || e.reason.as_str() != r {
                return false;
            }
        }
        let k = &e.key;
        if self
            .addr
            .is_some_and(|a| !e.parsed || (k.src_addr() != a && k.dst_addr() != a))
        {
            return false;
        }
        if self.port.is_some_and(|p| {
            !e.parsed || policy::key::proto::is_icmp(k.proto) || (k.sport != p && k.dport != p)
        }) {
            return false;
        }
        if self.proto.is_some_and(|p| !e.parsed || k.proto != p) {
            return false;
        }
        true
    }
}

/// One feed line: every field apart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Line {
    pub time_unix_ns: u64,
    pub worker: u16,
    /// `ingress` (received on ext) or `egress`.
    pub direction: String,
    pub proto: Option<String>,
    pub src: Option<String>,
    pub sport: Option<u16>,
    pub dst: Option<String>,
    pub dport: Option<u16>,
    pub verdict: String,
    /// The drop reason (absent when allowed).
    pub reason: Option<String>,
    pub rule: Option<String>,
    pub rule_origin: Option<String>,
    pub tracker: TrackerState,
    pub generation: u64,
    pub len: u16,
    /// The frame's first bytes, hex (with `frames=1`).
    #[serde(default)]
    pub frame: Option<String>,
}

impl Line {
    pub fn of(e: &Event, origin: Option<String>, frames: bool) -> Line {
        let k = &e.key;
        let icmp = policy::key::proto::is_icmp(k.proto);
        Line {
            time_unix_ns: e.unix_ns,
            worker: e.worker,
            direction: if e.ingress { "ingress" } else { "egress" }.into(),
            proto: e
                .parsed
                .then(|| policy::key::proto::name(k.proto).into_owned()),
            src: e.parsed.then(|| k.src_addr().to_string()),
            sport: (e.parsed && !icmp && k.ports_known).then_some(k.sport),
            dst: e.parsed.then(|| k.dst_addr().to_string()),
            dport: (e.parsed && !icmp && k.ports_known).then_some(k.dport),
            verdict: if e.allowed { "allow" } else { "deny" }.into(),
            reason: (!e.allowed).then(|| e.reason.as_str().to_string()),
            rule: e.rule.map(|r| r.to_string()),
            rule_origin: origin,
            tracker: e.tracker,
            generation: e.generation,
            len: e.len,
            frame: e
                .frame
                .as_deref()
                .filter(|_| frames)
                .map(|f| f.iter().map(|b| format!("{b:02x}")).collect()),
        }
    }
}
