//! `portcullis-bench datapath`: the per-packet cost of the whole userspace path, without the
//! kernel. Frames built from a ClassBench trace go through a real [`Worker`] over in-memory rings
//! ([`FakeRings`]): parse, connection tracker, classifier on a miss, counters, forward. One core,
//! bursts of 64; only `Worker::turn` is timed (putting frames on the fake wire and taking them
//! off is the "NIC", outside the measurement). Steady-state scenarios report the median of 50 ms
//! samples.
//!
//! Scenarios, each at the set's rule count:
//! - `established`: every packet belongs to a flow the tracker already holds (N flows, each
//!   through its three-way handshake first, so the flows are assured and window-tracked). The
//!   timed packets are in-window ACKs: each is looked up, checked against its window under the
//!   bucket lock, and changes nothing (the frames are replayed, so their sequence numbers do not
//!   advance);
//! - `new`: every packet is a SYN that opens a flow (a fresh tracker per pass);
//! - `mix`: one packet in ten opens a flow, the rest are established;
//! - `stateless`: the tracker off, every packet classified (the path before connection tracking);
//! - `syn-flood`: a full table (64K slots, filled with answered half-open flows) while every
//!   packet is a SYN from a new spoofed source to an allowed address, each answered by the
//!   server's SYN-ACK on the other interface, and one packet in 16 belongs to an established
//!   connection: its ns/packet (SYNs and SYN-ACKs counted) and the share of the established
//!   connection's packets that pass.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use control::publish::Publisher;
use crossbeam_queue::ArrayQueue;
use gateway::config::{Poll, PollMode, L2};
use gateway::conntrack::{Conntrack, Timeouts};
use gateway::stats::{CtEvent, SharedLatency, WorkerCounters};
use gateway::sys::fake::FakeRings;
use gateway::sys::ring::Side;
use gateway::worker::{Worker, WorkerSetup};
use policy::key::{proto, FlowKey};
use policy::rule::{Action, Direction, Layer, Match, Origin, Rule, RuleSet, Verdict};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// ClassBench filters (every filter becomes an Allow rule; the rest is denied).
    #[arg(long, default_value = "../shared/data/classbench/acl1_10k.filters")]
    rules: PathBuf,
    /// ClassBench trace: the 5-tuples the frames carry.
    #[arg(long, default_value = "../shared/data/classbench/acl1_10k.trace")]
    trace: PathBuf,
    /// Flow counts for the established scenario, comma-separated.
    #[arg(long, default_value = "1000,1000000", value_delimiter = ',')]
    flows: Vec<usize>,
    /// Measuring time per scenario, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    min_ms: u64,
    /// Which scenarios to run: established, new, mix, stateless, syn-flood.
    #[arg(
        long,
        default_value = "established,new,mix,stateless,syn-flood",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// A `portcullis monitor` listener during the run: `none` (the workers record nothing),
    /// `drops` (the default feed) or `all` (allowed frames too). A thread on another core
    /// drains the queues as the admin API's pump does.
    #[arg(long, default_value = "none", value_parser = ["none", "drops", "all"])]
    monitor: String,
}

/// The verdict feed every bench worker records into (listened to with `--monitor`).
static MONITOR: std::sync::OnceLock<Arc<gateway::monitor::Monitor>> = std::sync::OnceLock::new();

fn monitor() -> Arc<gateway::monitor::Monitor> {
    Arc::clone(MONITOR.get_or_init(|| Arc::new(gateway::monitor::Monitor::new(1))))
}

const BURST: usize = 64;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The client's and the server's initial sequence numbers in every generated connection.
const CLIENT_ISN: u32 = 1000;
const SERVER_ISN: u32 = 5000;

/// One's complement sum, unfolded.
fn sum16(b: &[u8], mut acc: u64) -> u64 {
    for c in b.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    acc
}

/// The TCP checksum of segment `t` between the addresses of `k`.
fn tcp_checksum(k: &FlowKey, t: &[u8]) -> u16 {
    let (s, d) = if k.v6 {
        (k.src.to_be_bytes().to_vec(), k.dst.to_be_bytes().to_vec())
    } else {
        (
            (k.src as u32).to_be_bytes().to_vec(),
            (k.dst as u32).to_be_bytes().to_vec(),
        )
    };
    let mut acc = sum16(t, sum16(&d, sum16(&s, 6 + t.len() as u64)));
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The sequence and acknowledgement numbers a segment with `flags` carries in a generated
/// connection: the client's SYN, the server's SYN-ACK, then in-window ACKs either way.
fn numbers(k: &FlowKey, flags: u8) -> (u32, u32) {
    let reply = k.dir == Direction::Egress;
    match (flags & (TCP_SYN | TCP_ACK), reply) {
        (TCP_SYN, _) => (CLIENT_ISN, 0),
        (f, true) if f == TCP_SYN | TCP_ACK => (SERVER_ISN, CLIENT_ISN + 1),
        (_, false) => (CLIENT_ISN + 1, SERVER_ISN + 1),
        (_, true) => (SERVER_ISN + 1, CLIENT_ISN + 1),
    }
}

/// An Ethernet frame carrying `k` (TCP with `flags` and a right checksum, UDP, or another
/// protocol with its ports).
fn frame(k: &FlowKey, flags: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    let l4: Vec<u8> = match k.proto {
        proto::TCP => {
            let (seq, ack) = numbers(k, flags);
            let mut t = Vec::with_capacity(20);
            t.extend_from_slice(&k.sport.to_be_bytes());
            t.extend_from_slice(&k.dport.to_be_bytes());
            t.extend_from_slice(&seq.to_be_bytes());
            t.extend_from_slice(&ack.to_be_bytes());
            t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            let c = tcp_checksum(k, &t);
            t[16..18].copy_from_slice(&c.to_be_bytes());
            t
        }
        proto::ICMP | proto::ICMPV6 => vec![8, 0, 0, 0, 0, 7, 0, 1],
        _ => {
            let mut u = Vec::with_capacity(8);
            u.extend_from_slice(&k.sport.to_be_bytes());
            u.extend_from_slice(&k.dport.to_be_bytes());
            u.extend_from_slice(&[0, 8, 0, 0]);
            u
        }
    };
    if k.v6 {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[k.proto, 64]);
        f.extend_from_slice(&k.src.to_be_bytes());
        f.extend_from_slice(&k.dst.to_be_bytes());
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, k.proto, 0, 0]);
        f.extend_from_slice(&(k.src as u32).to_be_bytes());
        f.extend_from_slice(&(k.dst as u32).to_be_bytes());
    }
    f.extend_from_slice(&l4);
    f
}

/// The ClassBench filters as Allow rules, then a default deny each way.
fn rule_set(matches: Vec<Match>) -> Result<RuleSet> {
    let origin = |layer, object: &str, index| Origin {
        layer,
        object: object.into(),
        index,
        source: "classbench".into(),
        why: String::new(),
    };
    let mut rules: Vec<Rule> = matches
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            Rule::new(
                m,
                Action::Decide(Verdict::Allow),
                false,
                origin(Layer::Gateway, "classbench", Some(i)),
            )
        })
        .collect();
    for (d, name) in [
        (Direction::Ingress, "default/ingress"),
        (Direction::Egress, "default/egress"),
    ] {
        rules.push(Rule::new(
            Match::any(d),
            Action::Decide(Verdict::Deny(policy::rule::DenyReason::Default)),
            false,
            origin(Layer::Default, name, None),
        ));
    }
    RuleSet::new(rules).context("the ClassBench rules do not form a rule set")
}

struct Bench {
    worker: Worker<FakeRings>,
    counters: Arc<WorkerCounters>,
    _publisher: Publisher,
}

fn bench(rules: &RuleSet, ct: Option<Arc<Conntrack>>) -> Bench {
    let publisher = Publisher::new(rules.clone(), 1);
    let counters = Arc::new(WorkerCounters::default());
    let worker = Worker::new(WorkerSetup {
        index: 0,
        pair: FakeRings::pair(4096, 2048, 1024),
        reader: publisher.reader(),
        counters: Arc::clone(&counters),
        latency: Arc::new(SharedLatency::default()),
        flows: Arc::new(ArrayQueue::new(1024)),
        flow_budget: 0,
        burst: BURST,
        poll: Poll {
            mode: PollMode::Busy,
            idle_after: 1,
            timeout_ms: 1,
        },
        l2: L2::default(),
        conntrack: ct,
        sweep_per_turn: 64,
        monitor: monitor(),
    });
    Bench {
        worker,
        counters,
        _publisher: publisher,
    }
}

/// The reverse of `k` (the server's answer, arriving on int).
fn reversed(k: &FlowKey) -> FlowKey {
    FlowKey {
        dir: Direction::Egress,
        src: k.dst,
        dst: k.src,
        sport: k.dport,
        dport: k.sport,
        ..*k
    }
}

/// Opens `flows` through their handshakes: SYN in, SYN-ACK out, ACK in, a burst at a time.
fn handshakes(w: &mut Worker<FakeRings>, flows: &[FlowKey]) {
    for chunk in flows.chunks(BURST) {
        let syns: Vec<Vec<u8>> = chunk.iter().map(|k| frame(k, TCP_SYN)).collect();
        run(w, &syns);
        let answers: Vec<Vec<u8>> = chunk
            .iter()
            .map(|k| frame(&reversed(k), TCP_SYN | TCP_ACK))
            .collect();
        run_side(w, Side::Int, &answers);
        let acks: Vec<Vec<u8>> = chunk.iter().map(|k| frame(k, TCP_ACK)).collect();
        run(w, &acks);
    }
}

/// Runs `frames` arriving on `side` through the worker in bursts.
fn run_side(w: &mut Worker<FakeRings>, side: Side, frames: &[Vec<u8>]) {
    for burst in frames.chunks(BURST) {
        for f in burst {
            w.pair().wire().deliver(side, f);
        }
        w.turn();
        w.pair().wire().transmit(Side::Int, |_| {});
        w.pair().wire().transmit(Side::Ext, |_| {});
    }
}

/// Runs `frames` through the worker in bursts; returns the time spent in `turn` and the number
/// of packets.
fn run(w: &mut Worker<FakeRings>, frames: &[Vec<u8>]) -> (Duration, u64) {
    let mut spent = Duration::ZERO;
    let mut n = 0u64;
    for burst in frames.chunks(BURST) {
        for f in burst {
            w.pair().wire().deliver(Side::Ext, f);
        }
        let t = Instant::now();
        n += w.turn() as u64;
        spent += t.elapsed();
        w.pair().wire().transmit(Side::Int, |_| {});
    }
    (spent, n)
}

/// Repeats `frames` until `min` of turn time, in samples of at least 50 ms; the median sample's
/// ns per packet (a shared machine's hiccups land in a few samples, not in the figure).
fn measure(w: &mut Worker<FakeRings>, frames: &[Vec<u8>], min: Duration) -> f64 {
    let sample = Duration::from_millis(50).min(min);
    let (mut total, mut ns) = (Duration::ZERO, Vec::new());
    while total < min {
        let (mut spent, mut n) = (Duration::ZERO, 0u64);
        while spent < sample {
            let (s, k) = run(w, frames);
            spent += s;
            n += k;
        }
        total += spent;
        ns.push(spent.as_nanos() as f64 / n.max(1) as f64);
    }
    ns.sort_by(f64::total_cmp);
    ns[ns.len() / 2]
}

/// `count` distinct flows from the trace: its 5-tuples, with the source port varied once the
/// trace runs out, keeping only those the rules allow (only allowed packets open flows).
fn flows(trace: &[FlowKey], count: usize, table: &policy::table::Table) -> Vec<FlowKey> {
    let mut out = Vec::with_capacity(count);
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut round = 0u32;
    while out.len() < count && round < 4096 {
        for k in trace {
            let mut k = *k;
            k.dir = Direction::Ingress;
            if round > 0 {
                k.sport = k.sport.wrapping_add(round as u16 * 7919);
                k.src ^= (round as u128) << 8;
            }
            if !matches!(k.proto, proto::TCP | proto::UDP) {
                continue;
            }
            if table.decide(&k).verdict == Verdict::Allow && seen.insert(k) {
                out.push(k);
                if out.len() == count {
                    break;
                }
            }
        }
        round += 1;
    }
    out
}

/// Passes over frames that must meet a fresh tracker each time: `prepare` sets the worker up
/// (untimed) and returns the frames to time. Returns ns/packet and the last pass's counters.
fn fresh_passes(
    rules: &RuleSet,
    flows: usize,
    min: Duration,
    mut prepare: impl FnMut(&mut Worker<FakeRings>) -> Vec<Vec<u8>>,
) -> (f64, Arc<WorkerCounters>) {
    let (mut spent, mut n) = (Duration::ZERO, 0u64);
    loop {
        let ct = Arc::new(Conntrack::new(flows * 2, Timeouts::default()));
        let mut b = bench(rules, Some(ct));
        let frames = prepare(&mut b.worker);
        let (s, k) = run(&mut b.worker, &frames);
        spent += s;
        n += k;
        b.worker.flush();
        if spent >= min {
            return (spent.as_nanos() as f64 / n.max(1) as f64, b.counters);
        }
    }
}

#[derive(serde::Serialize)]
struct Row {
    scenario: String,
    rules: usize,
    flows: usize,
    ns_per_packet: f64,
    mpps: f64,
    established: u64,
    new: u64,
    /// syn-flood: the share of the established connection's packets that passed.
    kept: Option<f64>,
}

pub(crate) fn main(a: Args) -> Result<()> {
    let matches = policy::classbench::read_filters(&a.rules)
        .with_context(|| format!("reading {}", a.rules.display()))?;
    let trace = policy::classbench::read_trace(&a.trace)
        .with_context(|| format!("reading {}", a.trace.display()))?;
    if trace.is_empty() {
        bail!("{}: the trace is empty", a.trace.display());
    }
    let nrules = matches.len();
    let rules = rule_set(matches)?;
    // A listener, and the drain that plays the admin API's pump.
    let listening = a.monitor != "none";
    let _listener = listening.then(|| monitor().subscribe(a.monitor == "all", false));
    let drained = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = listening.then(|| {
        let (drained, stop) = (Arc::clone(&drained), Arc::clone(&stop));
        std::thread::spawn(move || {
            let m = monitor();
            let mut batch = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                m.drain(&mut batch);
                drained.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                batch.clear();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    });
    let table = policy::table::Table::build(rules.clone(), 1, 1);
    let min = Duration::from_millis(a.min_ms);
    let max_flows = a.flows.iter().copied().max().unwrap_or(1000).max(10_000);
    let all = flows(&trace, max_flows, &table);
    if all.is_empty() {
        bail!("no TCP/UDP flow of the trace is allowed by the rules");
    }
    let mut rows = Vec::new();
    let mut row = |scenario: &str, flows: usize, ns: f64, c: &WorkerCounters, kept: Option<f64>| {
        let s = c.snapshot();
        rows.push(Row {
            scenario: scenario.into(),
            rules: nrules,
            flows,
            ns_per_packet: ns,
            mpps: 1e3 / ns,
            established: s.ct_count(CtEvent::Established),
            new: s.ct_count(CtEvent::New),
            kept,
        });
    };
    let opener = |k: &FlowKey| frame(k, TCP_SYN);
    let follower = |k: &FlowKey| frame(k, TCP_ACK);

    let run_it = |s: &str| a.scenarios.iter().any(|x| x == s);
    // Established: open every flow once, then measure their later packets.
    for &n in a.flows.iter().filter(|_| run_it("established")) {
        let fl = &all[..n.min(all.len())];
        let ct = Arc::new(Conntrack::new(fl.len() * 2, Timeouts::default()));
        let mut b = bench(&rules, Some(Arc::clone(&ct)));
        handshakes(&mut b.worker, fl);
        let later: Vec<Vec<u8>> = fl.iter().map(follower).collect();
        let ns = measure(&mut b.worker, &later, min);
        b.worker.flush();
        row("established", fl.len(), ns, &b.counters, None);
    }

    // New: every packet opens a flow in a fresh tracker.
    if run_it("new") {
        let open: Vec<Vec<u8>> = all.iter().map(opener).collect();
        let (ns, c) = fresh_passes(&rules, all.len(), min, |_| open.clone());
        row("new", all.len(), ns, &c, None);
    }

    // Mix: one packet in ten opens a flow, nine belong to established flows.
    if run_it("mix") {
        let est = &all[..all.len() / 2];
        let fresh = &all[all.len() / 2..];
        let mut mixed = Vec::with_capacity(fresh.len() * 10);
        let mut e = est.iter().cycle();
        for k in fresh {
            mixed.push(opener(k));
            for _ in 0..9 {
                mixed.push(follower(e.next().unwrap_or(k)));
            }
        }
        let (ns, c) = fresh_passes(&rules, all.len(), min, |w| {
            handshakes(w, est);
            mixed.clone()
        });
        row("mix", all.len(), ns, &c, None);
    }

    // SYN flood: a full table, every packet a SYN from a new source (answered), one in 16 an
    // established connection's.
    if run_it("syn-flood") {
        let cap = 65_536;
        let ct = Arc::new(Conntrack::new(cap, Timeouts::default()));
        let mut b = bench(&rules, Some(Arc::clone(&ct)));
        let victim = all[0];
        handshakes(&mut b.worker, &[victim]);
        // Spoofed sources for the SYNs: the victim's destination, from 4x the table's
        // capacity of sources, so a source comes back only after its entry was evicted.
        let spoofed: Vec<FlowKey> = (0..(4 * cap) as u32)
            .map(|i| FlowKey {
                src: 0xc000_0000 | i as u128,
                sport: 1024 + (i % 60_000) as u16,
                ..victim
            })
            .collect();
        let syns: Vec<Vec<u8>> = spoofed.iter().map(|k| frame(k, TCP_SYN)).collect();
        let answers: Vec<Vec<u8>> = spoofed
            .iter()
            .map(|k| frame(&reversed(k), TCP_SYN | TCP_ACK))
            .collect();
        let kept_frame = frame(&victim, TCP_ACK);
        let (mut spent, mut packets, mut sent, mut passed) = (Duration::ZERO, 0u64, 0u64, 0u64);
        let mut at = 0;
        // Fill the table first (untimed), then measure.
        let mut filling = true;
        let mut filled_at = 0usize;
        while spent < min {
            let n = BURST - 4;
            for j in 0..n {
                let i = (at + j) % syns.len();
                b.worker.pair().wire().deliver(Side::Ext, &syns[i]);
                b.worker.pair().wire().deliver(Side::Int, &answers[i]);
            }
            for _ in 0..4 {
                b.worker.pair().wire().deliver(Side::Ext, &kept_frame);
            }
            let t = Instant::now();
            let k = b.worker.turn() as u64;
            let e = t.elapsed();
            let mut got = 0u64;
            b.worker.pair().wire().transmit(Side::Int, |f| {
                if f == kept_frame.as_slice() {
                    got += 1;
                }
            });
            b.worker.pair().wire().transmit(Side::Ext, |_| {});
            at += n;
            if filling {
                filled_at += n;
                filling = filled_at < 2 * cap;
                continue;
            }
            spent += e;
            packets += k;
            sent += 4;
            passed += got;
        }
        b.worker.flush();
        let ns = spent.as_nanos() as f64 / packets.max(1) as f64;
        row(
            "syn-flood",
            cap,
            ns,
            &b.counters,
            Some(passed as f64 / sent.max(1) as f64),
        );
    }

    // Stateless: no tracker, every packet classified.
    if run_it("stateless") {
        let mut b = bench(&rules, None);
        let later: Vec<Vec<u8>> = all.iter().map(follower).collect();
        let ns = measure(&mut b.worker, &later, min);
        b.worker.flush();
        row("stateless", all.len(), ns, &b.counters, None);
    }

    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "datapath, one core, bursts of {BURST}, {} ({nrules} rules):\n",
            a.rules.display()
        );
        println!("| scenario | flows | ns/packet | Mpps | tracker: established / new | established kept |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for r in &rows {
            println!(
                "| {} | {} | {:.1} | {:.2} | {} / {} | {} |",
                r.scenario,
                r.flows,
                r.ns_per_packet,
                r.mpps,
                r.established,
                r.new,
                r.kept.map_or("-".into(), |k| format!("{:.2} %", k * 100.0))
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(d) = drain {
        let _ = d.join();
        eprintln!(
            "monitor ({}): {} verdicts drained, {} lost (queue full)",
            a.monitor,
            drained.load(std::sync::atomic::Ordering::Relaxed),
            monitor().lost()
        );
    }
    Ok(())
}
