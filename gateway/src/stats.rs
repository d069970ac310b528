//! Per-worker counters and latency.
//!
//! Each worker owns one cache-line-aligned [`WorkerCounters`] that only it writes (relaxed
//! load+store, once per burst, from a plain local tally), so there is no contention and no locked
//! instruction on the hot path. The control side sums them whenever asked. Burst service time goes
//! into a worker-local hdrhistogram that is merged into a shared one about once a second with a
//! `try_lock`, which never waits.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use policy::rule::DenyReason;
use serde::{Deserialize, Serialize};

/// Why a frame was dropped. Every drop is counted under exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// The frame ended before a header did.
    Truncated,
    /// The IP version nibble is not the one the ethertype announces (4 behind 0x0800, 6 behind
    /// 0x86DD). The IPv6 fixed header has no other field that can be invalid on its own (its
    /// length is `bad_ip_length`, its extension chain `bad_ip_extension`).
    BadIpVersion,
    /// IPv4 header invalid (IHL below 5, total length below the header).
    BadIpv4Header,
    /// An IP (or UDP) length field points past the end of the frame.
    BadIpLength,
    /// An IPv4 option/auth header or an IPv6 extension header chain is invalid.
    BadIpExtension,
    /// The transport header is invalid (for example a TCP data offset below 5).
    BadTransport,
    /// A first fragment too short to hold its transport ports (RFC 1858).
    TinyFragment,
    /// A link layer the gateway does not parse (MACsec).
    UnsupportedLink,
    /// A non-IP frame that the `l2` config drops.
    L2Policy,
    /// An explicit Deny rule.
    PolicyDeny,
    /// The default for the direction is deny and nothing allowed the flow.
    DefaultDeny,
    /// A Service frontend without endpoints.
    NoEndpoints,
    /// externalTrafficPolicy Local and no local endpoint on the addressed node.
    NoLocalEndpoint,
    /// The TX ring of the other interface had no room.
    TxRingFull,
    /// Policy admitted a new flow but both its buckets of the connection tracker held only
    /// assured flows (which are never evicted).
    ConntrackFull,
    /// A packet of a tracked flow that its state does not accept (a TCP segment outside the
    /// window, a RST with the wrong sequence number, a SYN/FIN/RST with a bad checksum, an
    /// impossible flag combination), which the rules did not admit on their own either.
    Invalid,
    /// A later fragment of a datagram whose first fragment did not pass (or passed too long ago).
    FragmentNoFirst,
    /// A later fragment that overlaps the first fragment's data (RFC 1858, RFC 5722).
    FragmentOverlap,
}

impl Reason {
    pub const COUNT: usize = 18;
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::Truncated,
        Reason::BadIpVersion,
        Reason::BadIpv4Header,
        Reason::BadIpLength,
        Reason::BadIpExtension,
        Reason::BadTransport,
        Reason::TinyFragment,
        Reason::UnsupportedLink,
        Reason::L2Policy,
        Reason::PolicyDeny,
        Reason::DefaultDeny,
        Reason::NoEndpoints,
        Reason::NoLocalEndpoint,
        Reason::TxRingFull,
        Reason::ConntrackFull,
        Reason::Invalid,
        Reason::FragmentNoFirst,
        Reason::FragmentOverlap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Truncated => "truncated",
            Reason::BadIpVersion => "bad_ip_version",
            Reason::BadIpv4Header => "bad_ipv4_header",
            Reason::BadIpLength => "bad_ip_length",
            Reason::BadIpExtension => "bad_ip_extension",
            Reason::BadTransport => "bad_transport",
            Reason::TinyFragment => "tiny_fragment",
            Reason::UnsupportedLink => "unsupported_link",
            Reason::L2Policy => "l2_policy",
            Reason::PolicyDeny => "policy_deny",
            Reason::DefaultDeny => "default_deny",
            Reason::NoEndpoints => "no_endpoints",
            Reason::NoLocalEndpoint => "no_local_endpoint",
            Reason::TxRingFull => "tx_ring_full",
            Reason::ConntrackFull => "conntrack_full",
            Reason::Invalid => "invalid",
            Reason::FragmentNoFirst => "fragment_no_first",
            Reason::FragmentOverlap => "fragment_overlap",
        }
    }

    /// Whether a frame dropped for this reason went through the table (and was counted under a
    /// rule): a deny, or a full TX ring after an allow. The others are decided before it.
    pub fn after_classification(self) -> bool {
        matches!(
            self,
            Reason::PolicyDeny
                | Reason::DefaultDeny
                | Reason::NoEndpoints
                | Reason::NoLocalEndpoint
                | Reason::TxRingFull
                | Reason::ConntrackFull
                | Reason::Invalid
        )
    }

    pub(crate) fn from_deny(d: DenyReason) -> Reason {
        match d {
            DenyReason::Policy => Reason::PolicyDeny,
            DenyReason::Default => Reason::DefaultDeny,
            DenyReason::NoEndpoints => Reason::NoEndpoints,
            DenyReason::NoLocalEndpoint => Reason::NoLocalEndpoint,
        }
    }
}

/// What the connection tracker did, per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtEvent {
    /// A flow was opened.
    New,
    /// A packet passed as part of a tracked flow, without the classifier.
    Established,
    /// An ICMP error passed because it quotes a tracked flow.
    Related,
    /// An unreplied flow was evicted to make room.
    Evicted,
    /// An expired flow was reclaimed (by an insert or the sweep).
    Expired,
    /// A tracked flow that the current table no longer admits: removed, its packet dropped.
    RevalidatedDrop,
    /// A packet of a tracked flow that its state did not accept (then decided by the rules on
    /// its own; dropped ones are also `drops_total{reason="invalid"}`).
    Invalid,
    /// A later fragment passed because its first fragment did.
    Fragment,
    /// Room for a new flow made by moving entries to their other bucket.
    Moved,
}

impl CtEvent {
    pub const COUNT: usize = 9;
    pub const ALL: [CtEvent; CtEvent::COUNT] = [
        CtEvent::New,
        CtEvent::Established,
        CtEvent::Related,
        CtEvent::Evicted,
        CtEvent::Expired,
        CtEvent::RevalidatedDrop,
        CtEvent::Invalid,
        CtEvent::Fragment,
        CtEvent::Moved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CtEvent::New => "new",
            CtEvent::Established => "established",
            CtEvent::Related => "related",
            CtEvent::Evicted => "evicted",
            CtEvent::Expired => "expired",
            CtEvent::RevalidatedDrop => "revalidated_drop",
            CtEvent::Invalid => "invalid",
            CtEvent::Fragment => "fragment",
            CtEvent::Moved => "moved",
        }
    }
}

/// A worker's tally for one burst, in plain integers.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub rx: [u64; 2],
    pub tx: [u64; 2],
    pub drops: [u64; Reason::COUNT],
    pub l2_forwarded: u64,
    pub wakeups: u64,
    pub fill_starved: u64,
    pub idle_sleeps: u64,
    pub bursts: u64,
    /// Nanoseconds spent in turns that moved frames.
    pub busy_ns: u64,
    pub ct: [u64; CtEvent::COUNT],
}

impl Tally {
    #[inline]
    pub fn drop(&mut self, r: Reason) {
        self.drops[r as usize] += 1;
    }

    #[inline]
    pub fn ct(&mut self, e: CtEvent) {
        self.ct[e as usize] += 1;
    }
}

/// The shared copy of a worker's counters. Written by that worker only.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct WorkerCounters {
    rx: [AtomicU64; 2],
    tx: [AtomicU64; 2],
    drops: [AtomicU64; Reason::COUNT],
    l2_forwarded: AtomicU64,
    wakeups: AtomicU64,
    fill_starved: AtomicU64,
    idle_sleeps: AtomicU64,
    bursts: AtomicU64,
    busy_ns: AtomicU64,
    ct: [AtomicU64; CtEvent::COUNT],
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        // Single writer: load+store, not fetch_add.
        c.store(c.load(Relaxed) + n, Relaxed);
    }
}

impl WorkerCounters {
    /// Adds a tally and clears it. Called by the owning worker once per burst.
    #[inline]
    pub fn flush(&self, t: &mut Tally) {
        for i in 0..2 {
            bump(&self.rx[i], t.rx[i]);
            bump(&self.tx[i], t.tx[i]);
        }
        for (c, n) in self.drops.iter().zip(t.drops.iter()) {
            bump(c, *n);
        }
        bump(&self.l2_forwarded, t.l2_forwarded);
        bump(&self.wakeups, t.wakeups);
        bump(&self.fill_starved, t.fill_starved);
        bump(&self.idle_sleeps, t.idle_sleeps);
        bump(&self.bursts, t.bursts);
        bump(&self.busy_ns, t.busy_ns);
        for (c, n) in self.ct.iter().zip(t.ct.iter()) {
            bump(c, *n);
        }
        *t = Tally::default();
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |c: &AtomicU64| c.load(Relaxed);
        CounterSnapshot {
            rx_ingress: l(&self.rx[0]),
            rx_egress: l(&self.rx[1]),
            tx_ingress: l(&self.tx[0]),
            tx_egress: l(&self.tx[1]),
            drops: Reason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), l(&self.drops[*r as usize])))
                .collect(),
            l2_forwarded: l(&self.l2_forwarded),
            wakeups: l(&self.wakeups),
            fill_starved: l(&self.fill_starved),
            idle_sleeps: l(&self.idle_sleeps),
            bursts: l(&self.bursts),
            busy_ns: l(&self.busy_ns),
            conntrack: CtEvent::ALL
                .iter()
                .map(|e| (e.as_str().to_string(), l(&self.ct[*e as usize])))
                .collect(),
        }
    }
}

/// Counter values at one moment. `rx_ingress` counts frames received on ext, `tx_ingress` frames
/// forwarded ext→int, and so on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub rx_ingress: u64,
    pub rx_egress: u64,
    pub tx_ingress: u64,
    pub tx_egress: u64,
    pub drops: Vec<(String, u64)>,
    pub l2_forwarded: u64,
    pub wakeups: u64,
    pub fill_starved: u64,
    pub idle_sleeps: u64,
    pub bursts: u64,
    /// Nanoseconds the worker spent in turns that moved frames: its CPU cost, where busy
    /// polling keeps the core at 100 % whatever the load.
    #[serde(default)]
    pub busy_ns: u64,
    /// Connection tracker events by name (`CtEvent`).
    #[serde(default)]
    pub conntrack: Vec<(String, u64)>,
}

impl CounterSnapshot {
    pub fn add(&mut self, o: &CounterSnapshot) {
        self.rx_ingress += o.rx_ingress;
        self.rx_egress += o.rx_egress;
        self.tx_ingress += o.tx_ingress;
        self.tx_egress += o.tx_egress;
        if self.drops.is_empty() {
            self.drops = o.drops.clone();
        } else {
            for ((_, a), (_, b)) in self.drops.iter_mut().zip(&o.drops) {
                *a += b;
            }
        }
        self.l2_forwarded += o.l2_forwarded;
        self.wakeups += o.wakeups;
        self.fill_starved += o.fill_starved;
        self.idle_sleeps += o.idle_sleeps;
        self.bursts += o.bursts;
        self.busy_ns += o.busy_ns;
        if self.conntrack.is_empty() {
            self.conntrack = o.conntrack.clone();
        } else {
            for ((_, a), (_, b)) in self.conntrack.iter_mut().zip(&o.conntrack) {
                *a += b;
            }
        }
    }

    /// The non-zero drop counters as `reason=n, ...`, or `none`.
    pub fn drop_summary(&self) -> String {
        let nonzero: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if nonzero.is_empty() {
            "none".into()
        } else {
            nonzero.join(", ")
        }
    }

    pub fn ct_count(&self, e: CtEvent) -> u64 {
        self.conntrack
            .iter()
            .find(|(n, _)| n == e.as_str())
            .map_or(0, |(_, c)| *c)
    }

    pub fn drop_count(&self, reason: Reason) -> u64 {
        self.drops
            .iter()
            .find(|(n, _)| n == reason.as_str())
            .map_or(0, |(_, c)| *c)
    }
}

/// Burst service time, nanoseconds: 1 ns to 10 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, 10_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// A worker's latency histogram as the control side sees it.
#[derive(Debug)]
pub struct SharedLatency(Mutex<Histogram<u64>>);

impl Default for SharedLatency {
    fn default() -> Self {
        SharedLatency(Mutex::new(new_histogram()))
    }
}

impl SharedLatency {
    /// Moves `local` into the shared histogram if the lock is free right now; otherwise keeps it
    /// for next time. Never blocks; never allocates (equal bounds).
    pub(crate) fn try_merge(&self, local: &mut Histogram<u64>) {
        if let Ok(mut h) = self.0.try_lock() {
            if h.add(&*local).is_ok() {
                local.reset();
            }
        }
    }

    /// Adds this worker's history into `into`.
    pub(crate) fn merge_into(&self, into: &mut Histogram<u64>) {
        let h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = into.add(&*h);
    }
}

/// Percentiles of a histogram, for status output.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    /// Sum of all recorded times (from the histogram's mean: within its 3-digit precision).
    pub sum_ns: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        LatencySummary {
            sum_ns: (h.mean() * h.len() as f64) as u64,
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_table_is_complete_and_unique() {
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL is in discriminant order");
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::COUNT);
        for d in DenyReason::ALL {
            assert_eq!(Reason::from_deny(d).as_str(), d.as_str());
        }
    }

    #[test]
    fn flush_adds_and_clears() {
        let c = WorkerCounters::default();
        let mut t = Tally::default();
        t.rx[0] = 3;
        t.drop(Reason::TxRingFull);
        c.flush(&mut t);
        t.rx[0] = 2;
        c.flush(&mut t);
        let s = c.snapshot();
        assert_eq!(s.rx_ingress, 5);
        assert_eq!(s.drop_count(Reason::TxRingFull), 1);
        assert_eq!(t.rx[0], 0);
        let mut total = CounterSnapshot::default();
        total.add(&s);
        total.add(&s);
        assert_eq!(total.drop_count(Reason::TxRingFull), 2);
    }
}
