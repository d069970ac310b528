//! The whole burst loop, without root: a real [`Worker`] turns over in-memory rings
//! ([`FakeRings`]) with a real compiled table. Frames arrive from the fake wire, are parsed,
//! classified, forwarded or dropped, transmitted, completed and recycled, exactly as over AF_XDP.
//!
//! - every frame is accounted for: rx = tx + Σ drops, and no descriptor is lost or duplicated;
//! - allowed frames leave on the other side unchanged and in order; denied ones never do;
//! - a full TX ring and an empty fill ring are counted, not hidden;
//! - a turn allocates nothing, with or without the connection tracker: measured with a counting
//!   global allocator after warm-up;
//! - with the tracker, a flow is opened once and decided again once per table generation.

use std::path::PathBuf;
use std::sync::Arc;

use control::publish::Publisher;
use control::reload::load_and_compile;
use crossbeam_queue::ArrayQueue;
use etherparse::PacketBuilder;
use gateway::config::{Config, Poll, PollMode, L2};
use gateway::conntrack::{Conntrack, Timeouts};
use gateway::stats::{CounterSnapshot, CtEvent, Reason, SharedLatency, WorkerCounters};
use gateway::sys::fake::FakeRings;
use gateway::sys::ring::Side;
use gateway::worker::{Worker, WorkerSetup};

const FRAMES: u32 = 512;
const RING: u32 = 128;

const CLIENT_MAC: [u8; 6] = [2, 0x99, 0, 0, 0, 1];
const SERVER_MAC: [u8; 6] = [2, 0x99, 0, 0, 0, 2];

fn tcp(dport: u16, v6: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC);
    let ip = if v6 {
        eth.ipv6(
            [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
    } else {
        eth.ipv4([10, 99, 0, 1], [10, 99, 0, 2], 64)
    };
    ip.tcp(40000, dport, 1, 65535)
        .write(&mut f, &dport.to_be_bytes())
        .unwrap();
    f
}

fn udp(dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4([10, 99, 0, 1], [10, 99, 0, 2], 64)
        .udp(5000, dport)
        .write(&mut f, b"q")
        .unwrap();
    f
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[10, 99, 0, 1, 0, 0, 0, 0, 0, 0, 10, 99, 0, 2]);
    f
}

/// A worker over fake rings with the lab's policies (deny SSH, allow web and DNS to the server,
/// default deny ingress, allow egress).
fn worker(poll: PollMode) -> (Worker<FakeRings>, Arc<WorkerCounters>) {
    let (w, c, _, _) = tracked_worker(poll, None);
    (w, c)
}

/// The same, with a connection tracker, and the publisher to swap tables with.
fn tracked_worker(
    poll: PollMode,
    ct: Option<Arc<Conntrack>>,
) -> (
    Worker<FakeRings>,
    Arc<WorkerCounters>,
    Publisher,
    policy::rule::RuleSet,
) {
    let cfg = Config::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/lab/gateway.yaml"),
    )
    .unwrap();
    let (_, rules, _) = load_and_compile(&cfg.policy_dir, &cfg.context).unwrap();
    let publisher = Publisher::new(rules.clone(), 1);
    let counters = Arc::new(WorkerCounters::default());
    let w = Worker::new(WorkerSetup {
        index: 0,
        pair: FakeRings::pair(FRAMES, 2048, RING),
        reader: publisher.reader(),
        counters: Arc::clone(&counters),
        latency: Arc::new(SharedLatency::default()),
        flows: Arc::new(ArrayQueue::new(64)),
        flow_budget: 16,
        burst: 64,
        poll: Poll {
            mode: poll,
            idle_after: 4,
            timeout_ms: 1,
        },
        l2: L2::default(),
        conntrack: ct,
        sweep_per_turn: 64,
        monitor: std::sync::Arc::new(gateway::monitor::Monitor::new(1)),
    });
    (w, counters, publisher, rules)
}

fn drops(s: &CounterSnapshot) -> u64 {
    s.drops.iter().map(|(_, n)| n).sum()
}

/// Frames owned by the pair or its rings, wherever they are: none may be lost or duplicated.
fn frames_accounted(w: &mut Worker<FakeRings>) -> usize {
    let pair = w.pair();
    let free = pair.free_frames();
    let wire = pair.wire();
    free + wire.fill_level(Side::Ext) + wire.fill_level(Side::Int)
}

#[test]
fn a_burst_is_parsed_classified_forwarded_and_counted() {
    let (mut w, counters) = worker(PollMode::Busy);
    let allowed = [tcp(80, false), tcp(443, true), udp(53), arp()];
    let denied = [tcp(22, false), tcp(8080, false), udp(54)];
    let mut truncated = udp(53);
    truncated.truncate(30);
    let wire = w.pair().wire();
    for f in allowed.iter().chain(&denied).chain([&truncated]) {
        assert!(wire.deliver(Side::Ext, f));
    }
    assert_eq!(w.turn(), 8);
    let mut out = Vec::new();
    let sent = w
        .pair()
        .wire()
        .transmit(Side::Int, |b| out.push(b.to_vec()));
    assert_eq!(sent, 4);
    assert_eq!(out, allowed, "allowed frames leave unchanged and in order");
    assert_eq!(w.pair().wire().transmit(Side::Ext, |_| {}), 0);

    w.flush();
    let s = counters.snapshot();
    assert_eq!((s.rx_ingress, s.tx_ingress, s.l2_forwarded), (8, 4, 1));
    assert_eq!(s.drop_count(Reason::PolicyDeny), 1, "{s:?}");
    assert_eq!(s.drop_count(Reason::DefaultDeny), 2, "{s:?}");
    assert_eq!(drops(&s), 4, "one reason per dropped frame: {s:?}");
    assert_eq!(s.rx_ingress, s.tx_ingress + drops(&s));

    // The egress direction: the server's answer goes back out (default egress allow).
    let reply = tcp(40000, false);
    assert!(w.pair().wire().deliver(Side::Int, &reply));
    w.turn();
    let mut back = Vec::new();
    w.pair()
        .wire()
        .transmit(Side::Ext, |b| back.push(b.to_vec()));
    assert_eq!(back, [reply]);

    // Completions come back into the pool on the next turn; nothing is lost.
    w.turn();
    assert_eq!(frames_accounted(&mut w), FRAMES as usize);
    assert_eq!(w.pair().in_flight(Side::Int), 0);
}

#[test]
fn a_full_tx_ring_and_an_empty_fill_ring_are_counted() {
    let (mut w, counters) = worker(PollMode::Busy);
    let frame = tcp(80, false);
    // Nobody takes frames off the int TX ring: after RING frames it is full.
    let mut delivered = 0u64;
    for _ in 0..4 {
        for _ in 0..64 {
            delivered += u64::from(w.pair().wire().deliver(Side::Ext, &frame));
        }
        w.turn();
    }
    w.flush();
    let s = counters.snapshot();
    assert_eq!(s.rx_ingress, delivered);
    assert_eq!(
        s.tx_ingress,
        u64::from(RING),
        "the TX ring holds RING frames"
    );
    assert_eq!(
        s.drop_count(Reason::TxRingFull),
        delivered - u64::from(RING),
        "{s:?}"
    );
    assert_eq!(s.rx_ingress, s.tx_ingress + drops(&s));

    // Frames arriving faster than the worker turns: the fill ring runs dry and the fake kernel
    // drops (the gateway's counters cannot see those; the kernel's statistics do).
    let mut refused = 0;
    for _ in 0..(2 * FRAMES) {
        refused += u32::from(!w.pair().wire().deliver(Side::Ext, &frame));
    }
    assert!(refused > 0);
    let k = w.pair().wire().stats(Side::Ext);
    assert_eq!(k.fill_empty + k.rx_ring_full, u64::from(refused), "{k:?}");
    // Drain everything, and every frame is back.
    for _ in 0..20 {
        w.pair().wire().transmit(Side::Int, |_| {});
        w.turn();
    }
    w.pair().wire().transmit(Side::Int, |_| {});
    w.turn();
    assert_eq!(frames_accounted(&mut w), FRAMES as usize);
}

#[test]
fn idle_mode_sleeps_after_empty_turns() {
    let (mut w, counters) = worker(PollMode::Idle);
    for _ in 0..10 {
        assert_eq!(w.turn(), 0);
    }
    w.flush();
    assert!(counters.snapshot().idle_sleeps >= 2);
}

#[test]
fn a_turn_allocates_nothing() {
    turns_allocate_nothing(None);
}

#[test]
fn a_turn_with_the_connection_tracker_allocates_nothing() {
    turns_allocate_nothing(Some(Arc::new(Conntrack::new(4096, Timeouts::default()))));
}

fn turns_allocate_nothing(ct: Option<Arc<Conntrack>>) {
    let (mut w, counters, _, _) = tracked_worker(PollMode::Busy, ct);
    let frames = [
        tcp(80, false),
        tcp(22, false),
        tcp(8080, false),
        tcp(443, true),
        udp(53),
        arp(),
    ];
    let round = |w: &mut Worker<FakeRings>| {
        for i in 0..64 {
            w.pair()
                .wire()
                .deliver(Side::Ext, &frames[i % frames.len()]);
        }
        let n = w.turn();
        w.pair().wire().transmit(Side::Int, |_| {});
        n
    };
    for _ in 0..4 {
        round(&mut w); // warm-up: every ring and histogram bucket touched once
    }
    let mut received = 0;
    let allocations = allocation_counter::measure(|| {
        for _ in 0..200 {
            received += round(&mut w);
        }
    });
    assert_eq!(received, 200 * 64, "the turns did real work");
    assert_eq!(
        allocations.count_total, 0,
        "the burst loop allocated: {allocations:?}"
    );
    w.flush();
    let s = counters.snapshot();
    assert_eq!(s.rx_ingress, s.tx_ingress + drops(&s));
}

#[test]
fn a_tracked_flow_is_classified_once_per_table_generation() {
    let ct = Arc::new(Conntrack::new(1024, Timeouts::default()));
    let (mut w, counters, mut publisher, rules) =
        tracked_worker(PollMode::Busy, Some(Arc::clone(&ct)));
    let dns = udp(53);
    for round in 0..5 {
        for _ in 0..20 {
            assert!(w.pair().wire().deliver(Side::Ext, &dns));
            w.turn();
        }
        w.pair().wire().transmit(Side::Int, |_| {});
        // A swap: the flow is decided again by the new table on its next packet.
        publisher.publish(rules.clone());
        let _ = round;
    }
    w.flush();
    let s = counters.snapshot();
    assert_eq!(s.ct_count(CtEvent::New), 1, "{s:?}");
    assert_eq!(s.ct_count(CtEvent::Evicted), 0, "{s:?}");
    assert_eq!(s.ct_count(CtEvent::Established), 100 - 5, "{s:?}");
    assert_eq!(s.tx_ingress, 100);
    assert_eq!(ct.entries(), 1);
}

#[test]
fn a_burst_of_one_new_flow_opens_it_once() {
    let ct = Arc::new(Conntrack::new(1024, Timeouts::default()));
    let (mut w, counters, _, _) = tracked_worker(PollMode::Busy, Some(Arc::clone(&ct)));
    let dns = udp(53);
    for _ in 0..64 {
        assert!(w.pair().wire().deliver(Side::Ext, &dns));
    }
    assert_eq!(w.turn(), 64);
    w.flush();
    let s = counters.snapshot();
    assert_eq!(
        (s.ct_count(CtEvent::New), s.ct_count(CtEvent::Evicted)),
        (1, 0),
        "{s:?}"
    );
    assert_eq!(ct.entries(), 1);
    assert_eq!(s.tx_ingress, 64);
}
