//! One worker per queue index: a run-to-completion loop over the two sockets of its
//! [`QueuePair`], pinned to its own core.
//!
//! Per iteration (a *burst*): load the table once; reap completions and refill the fill rings;
//! receive up to `burst` frames on ext, parse, classify the whole burst, forward the allowed ones
//! to int's TX ring and recycle the rest; the same from int to ext; kick TX only while frames are in
//! flight; record the burst's service time. Nothing in the loop allocates, locks or logs; flows to
//! log go through a bounded lock-free queue to the control thread.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::key::FlowKey;
use control::publish::TableReader;
use control::rule::{Direction, Verdict};
use control::table::{Decision, Table};
use crossbeam_queue::ArrayQueue;

use crate::config::{L2Action, Poll, PollMode, L2, MAX_BURST};
use crate::parse::{parse, Frame};
use crate::stats::{new_histogram, Reason, SharedLatency, Tally, WorkerCounters};
use crate::sys::wait_readable;
use crate::sys::xsk::{Burst, QueuePair};

/// A flow the control thread should log (rate-limited at the source).
#[derive(Debug, Clone, Copy)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub verdict: Verdict,
    pub rule: u32,
    /// The first rule that asked for logging (an audit or Log rule), or `u32::MAX`.
    pub log_rule: u32,
    pub generation: u64,
    pub worker: u16,
}

/// Everything a worker needs, moved into its thread.
pub struct WorkerSetup {
    pub index: usize,
    pub core: usize,
    pub pair: QueuePair,
    pub reader: TableReader,
    pub counters: Arc<WorkerCounters>,
    pub latency: Arc<SharedLatency>,
    pub flows: Arc<ArrayQueue<FlowRecord>>,
    /// Flows this worker may queue for logging per second.
    pub flow_budget: u32,
    pub burst: usize,
    pub poll: Poll,
    pub l2: L2,
    pub stop: Arc<AtomicBool>,
}

// Slot markers for frames that produced no key.
const SLOT_DROP: u16 = u16::MAX;
const SLOT_L2_FORWARD: u16 = u16::MAX - 1;
const SLOT_L2_DROP: u16 = u16::MAX - 2;

/// The worker's caller-owned burst arrays.
struct Scratch {
    rx: Burst,
    fwd: Burst,
    keys: [FlowKey; MAX_BURST],
    decisions: [Decision; MAX_BURST],
    slot: [u16; MAX_BURST],
    keep: [bool; MAX_BURST],
}

struct Worker {
    index: usize,
    pair: QueuePair,
    s: Box<Scratch>,
    tally: Tally,
    burst: usize,
    l2: L2,
    flows: Arc<ArrayQueue<FlowRecord>>,
    flow_budget: u32,
    flow_tokens: u32,
}

impl Worker {
    /// Moves one burst from `dir`'s receiving port to the other port. Returns frames received.
    #[inline]
    fn step(&mut self, dir: Direction, table: &Table) -> usize {
        let p = self.pair.parts(dir == Direction::Ingress);
        let s = &mut *self.s;
        let n = p.from.recv(&mut s.rx, self.burst);
        if n == 0 {
            return 0;
        }
        let mut nkeys = 0usize;
        for i in 0..n {
            s.slot[i] = match parse(p.frames.data(&s.rx, i), dir) {
                Ok(Frame::Ip(k)) => {
                    s.keys[nkeys] = k;
                    nkeys += 1;
                    (nkeys - 1) as u16
                }
                Ok(Frame::Arp) if self.l2.arp == L2Action::Forward => SLOT_L2_FORWARD,
                Ok(Frame::OtherL2) if self.l2.other == L2Action::Forward => SLOT_L2_FORWARD,
                Ok(Frame::Arp | Frame::OtherL2) => SLOT_L2_DROP,
                Err(reason) => {
                    self.tally.drop(reason);
                    SLOT_DROP
                }
            };
        }
        table.decide_batch(self.index, &s.keys[..nkeys], &mut s.decisions[..nkeys]);
        for i in 0..n {
            s.keep[i] = match s.slot[i] {
                SLOT_DROP => false,
                SLOT_L2_FORWARD => {
                    self.tally.l2_forwarded += 1;
                    true
                }
                SLOT_L2_DROP => {
                    self.tally.drop(Reason::L2Policy);
                    false
                }
                k => {
                    let d = s.decisions[k as usize];
                    let denied = matches!(d.verdict, Verdict::Deny(_));
                    if (d.log || denied) && self.flow_tokens > 0 {
                        self.flow_tokens -= 1;
                        let _ = self.flows.push(FlowRecord {
                            key: s.keys[k as usize],
                            verdict: d.verdict,
                            rule: d.rule,
                            log_rule: d.log_rule,
                            generation: table.generation(),
                            worker: self.index as u16,
                        });
                    }
                    match d.verdict {
                        Verdict::Allow => true,
                        Verdict::Deny(r) => {
                            self.tally.drop(Reason::from_deny(r));
                            false
                        }
                    }
                }
            };
        }
        s.rx.split_into(&s.keep[..n], &mut s.fwd, p.pool);
        let (sent, dropped) = p.to.send(&mut s.fwd, p.pool);
        self.tally.rx[dir as usize] += n as u64;
        self.tally.tx[dir as usize] += sent as u64;
        self.tally.drops[Reason::TxRingFull as usize] += dropped as u64;
        n
    }
}

/// Runs a worker until `stop` is set. Pins itself first (a failure to pin is logged, not fatal).
pub fn run(setup: WorkerSetup) {
    let WorkerSetup {
        index,
        core,
        pair,
        mut reader,
        counters,
        latency,
        flows,
        flow_budget,
        burst,
        poll,
        l2,
        stop,
    } = setup;
    let span = tracing::info_span!("worker", queue = index, core);
    let _enter = span.enter();
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!("could not pin the worker to core {core}; it runs unpinned");
    }
    tracing::info!(copy_mode = pair.copy_mode, burst, mode = ?poll.mode, "worker started");
    let mut w = Worker {
        index,
        pair,
        s: Box::new(Scratch {
            rx: Burst::default(),
            fwd: Burst::default(),
            keys: [FlowKey::default(); MAX_BURST],
            decisions: [Decision::default(); MAX_BURST],
            slot: [0; MAX_BURST],
            keep: [false; MAX_BURST],
        }),
        tally: Tally::default(),
        burst,
        l2,
        flows,
        flow_budget,
        flow_tokens: flow_budget,
    };
    let mut hist = new_histogram();
    let mut empty: u32 = 0;
    let mut last_merge = Instant::now();
    let mut iterations: u32 = 0;
    w.pair.refill();
    while !stop.load(Relaxed) {
        let started = Instant::now();
        // One table version for the whole burst; the reader's cache keeps it alive.
        let table: &Table = reader.load();
        w.pair.reap();
        if w.pair.refill() == 0 && w.pair.pool.is_empty() {
            w.tally.fill_starved += 1;
        }
        let n = w.step(Direction::Ingress, table) + w.step(Direction::Egress, table);
        for port in [&mut w.pair.ext, &mut w.pair.int] {
            if port.in_flight() > 0 {
                w.tally.wakeups += port.kick_tx();
            }
            if port.kick_fill() {
                w.tally.wakeups += 1;
            }
        }
        if n > 0 {
            w.tally.bursts += 1;
            hist.saturating_record(started.elapsed().as_nanos() as u64);
            empty = 0;
            counters.flush(&mut w.tally);
        } else {
            empty = empty.saturating_add(1);
            let idle = w.pair.ext.in_flight() == 0 && w.pair.int.in_flight() == 0;
            if poll.mode == PollMode::Idle && empty >= poll.idle_after && idle {
                let fds = [w.pair.ext.rx_fd(), w.pair.int.rx_fd()];
                let _ = wait_readable(&fds, poll.timeout_ms as i32);
                w.tally.idle_sleeps += 1;
                empty = 0;
                counters.flush(&mut w.tally);
            }
        }
        iterations = iterations.wrapping_add(1);
        if iterations.is_multiple_of(1024) || empty == 0 {
            let now = Instant::now();
            if now.duration_since(last_merge) >= Duration::from_secs(1) {
                latency.try_merge(&mut hist);
                w.flow_tokens = w.flow_budget;
                last_merge = now;
                counters.flush(&mut w.tally);
            }
        }
    }
    counters.flush(&mut w.tally);
    latency.try_merge(&mut hist);
    tracing::info!("worker stopped");
}
