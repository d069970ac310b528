//! Property tests of the shared table against a model, with the lookups and updates of several
//! workers interleaved: a worker looks a packet up, other workers' packets, inserts, moves,
//! evictions, removals, sweeps and clock steps happen, and only then does the first worker apply
//! its packet with the hit it got. That is how a lost transition (an update computed from a
//! stale state), a write into a slot its flow left, or a flow reported absent shows up in one
//! thread, deterministically.
//!
//! The model applies each packet, in the order the table applies them, to its own copy of the
//! flow's state with the same TCP logic ([`TcpConn`]): the table must report the same outcome and
//! hold the same state afterwards. It also checks what the design promises:
//! - a lookup finds only flows that were inserted and not removed, in the right direction;
//! - an assured flow is never lost before its timeout (no eviction, no sweep, no move);
//! - only unassured flows are evicted, and only by an insert;
//! - an insert of a flow that exists applies to it (one flow, one entry);
//! - the entry count equals the occupied slots.

use std::collections::HashMap;

use proptest::prelude::*;

use super::tcp_flags::*;
use super::*;

const S: u64 = NS;

/// A pool of flows, many per bucket of a 32-slot table (4 buckets of 8).
fn pool() -> Vec<Tuple> {
    (0..40u16)
        .map(|i| Tuple {
            dir: if i % 3 == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            v6: i % 7 == 0,
            src: 0x0a00_0000 + u128::from(i % 5),
            dst: 0xc633_6400 + u128::from(i / 5),
            proto: if i % 2 == 0 { proto::TCP } else { proto::UDP },
            sport: 40_000 + i,
            dport: 443,
            vlan: NO_VLAN,
            vlan2: NO_VLAN,
        })
        .collect()
}

/// A segment's shape; its numbers come from the model's view of the flow, so most are in
/// window, or are random.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Syn,
    SynAck,
    Ack,
    FinAck,
    Rst,
    Random(u8, u32, u32),
}

#[derive(Debug, Clone)]
enum Op {
    /// Worker `w` looks up a packet of flow `i` (a reply if `reply`).
    Lookup {
        w: usize,
        i: usize,
        reply: bool,
    },
    /// Worker `w` applies its looked-up packet: to the flow it found, or, if it found none, as
    /// an insert (original direction only: the datapath opens flows that way).
    Apply {
        w: usize,
        shape: Shape,
    },
    /// The datapath's way: a packet of flow `i` looked up and applied at once
    /// (`Conntrack::lookup_update`, one copy of the slot).
    LookupApply {
        i: usize,
        reply: bool,
        shape: Shape,
    },
    /// Policy no longer admits flow `i`.
    Remove(usize),
    Sweep(usize),
    /// The clock moves on this many seconds.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let shape = prop_oneof![
        1 => Just(Shape::Syn),
        1 => Just(Shape::SynAck),
        3 => Just(Shape::Ack),
        1 => Just(Shape::FinAck),
        1 => Just(Shape::Rst),
        1 => (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(f, s, a)| Shape::Random(f, s, a)),
    ];
    prop_oneof![
        6 => (0..3usize, 0..40usize, any::<bool>()).prop_map(|(w, i, reply)| Op::Lookup { w, i, reply }),
        6 => (0..3usize, shape.clone()).prop_map(|(w, shape)| Op::Apply { w, shape }),
        3 => (0..40usize, any::<bool>(), shape).prop_map(|(i, reply, shape)| Op::LookupApply { i, reply, shape }),
        1 => (0..40usize).prop_map(Op::Remove),
        1 => (1..64usize).prop_map(Op::Sweep),
        1 => prop_oneof![Just(0u64), Just(1), Just(5), Just(11), Just(31), Just(61), Just(121)].prop_map(Op::Wait),
    ]
}

/// The model's copy of a flow.
#[derive(Debug, Clone, Copy)]
struct Known {
    tcp: TcpConn,
    /// The table's info bits the model follows: state, assured, seen reply.
    state: FlowState,
    assured: bool,
    seen_reply: bool,
    seen: u64,
    /// When the flow opened (UDP assurance waits 2 s from it).
    created: u64,
}

fn occupied(ct: &Conntrack) -> usize {
    ct.slots
        .iter()
        .filter(|s| s.info.load(Ordering::Relaxed) & I_STATE != 0)
        .count()
}

/// The segment a shape makes for a flow the model knows (or a fresh SYN).
fn segment(shape: Shape, k: Option<&Known>, reply: bool) -> Segment {
    let (me, peer) = match k {
        Some(k) => (
            k.tcp.sides[reply as usize].end,
            k.tcp.sides[1 - reply as usize].end,
        ),
        None => (1000, 0),
    };
    let (flags, seq, ack) = match shape {
        Shape::Syn => (SYN, me, 0),
        Shape::SynAck => (SYN | ACK, me, peer),
        Shape::Ack => (ACK, me, peer),
        Shape::FinAck => (FIN | ACK, me, peer),
        Shape::Rst => (RST, me, 0),
        Shape::Random(f, s, a) => (f, s, a),
    };
    Segment {
        flags,
        seq,
        ack,
        win: 4096,
        sack: ack,
        ..Segment::default()
    }
}

/// What the model expects a packet of a live flow to do, and the flow afterwards (`None`: the
/// flow is gone).
fn expect(k: &Known, reply: bool, seg: &Segment, now: u64) -> (Update, Option<Known>) {
    let mut n = *k;
    if k.tcp.state == TcpState::None {
        // Not TCP (the pool's others are UDP): a packet after the reply, 2 s after opening.
        if k.seen_reply && now >= k.created + 2 * S {
            n.assured = true;
        }
        if reply {
            n.state = FlowState::Replied;
            n.seen_reply = true;
        }
        n.seen = now;
        return (Update::Pass(n.state), Some(n));
    }
    let old = k.tcp.state;
    match n.tcp.packet_seen(reply, seg, k.seen_reply) {
        tcp::Verdict::Valid => {
            n.seen_reply |= reply;
            if TcpConn::assures(old, n.tcp.state) && n.seen_reply {
                n.assured = true;
            }
            n.state = FlowState::of_tcp(n.tcp.state);
            n.seen = now;
            (Update::Pass(n.state), Some(n))
        }
        tcp::Verdict::Ignore => {
            n.tcp.state = old;
            (Update::Pass(k.state), Some(n))
        }
        tcp::Verdict::Invalid(why) => (Update::Invalid(why), Some(*k)),
        tcp::Verdict::Reopen => (Update::Reopen, None),
        tcp::Verdict::Kill => (Update::Pass(FlowState::Closed), None),
    }
}

/// Keeps the model's copy of flow `i` as a packet left it (`None`: the flow is gone).
fn follow(model: &mut HashMap<usize, Known>, i: usize, after: Option<Known>) {
    match after {
        Some(n) => {
            model.insert(i, n);
        }
        None => {
            model.remove(&i);
        }
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let ct = Conntrack::with_key(32, Timeouts::default(), (7, 11));
    let flows = pool();
    let mut model: HashMap<usize, Known> = HashMap::new();
    // Per worker: the packet it looked up (flow, reply) and what it found.
    let mut pending: [Option<(usize, bool, Option<Hit>)>; 3] = [None; 3];
    let mut now = S;
    let live = |ct: &Conntrack, k: &Known, now: u64, proto_: u8| {
        now.saturating_sub(k.seen) <= ct.timeout_ns(proto_, k.state)
    };
    for op in ops {
        match *op {
            Op::Lookup { w, i, reply } => {
                let t = flows[i];
                let pkt = if reply { t.reversed() } else { t };
                let hit = ct.lookup(&pkt, now);
                if let Some(h) = &hit {
                    prop_assert!(model.contains_key(&i), "found flow {i}, never inserted");
                    prop_assert_eq!(h.original, !reply);
                }
                pending[w] = Some((i, reply, hit));
            }
            Op::Apply { w, shape } => {
                let Some((i, reply, hit)) = pending[w].take() else {
                    continue;
                };
                let t = flows[i];
                let pkt = if reply { t.reversed() } else { t };
                let known = model
                    .get(&i)
                    .copied()
                    .filter(|k| live(&ct, k, now, t.proto));
                let seg = segment(shape, known.as_ref(), reply);
                match hit {
                    Some(hit) => {
                        let got = ct.update(&hit, &pkt, &seg, now);
                        match known {
                            Some(k) => {
                                let (want, after) = expect(&k, reply, &seg, now);
                                prop_assert_eq!(got, want, "flow {} {:?} with {:?}", i, k, seg);
                                follow(&mut model, i, after);
                            }
                            None => {
                                prop_assert_eq!(got, Update::Gone, "flow {} is gone", i);
                                model.remove(&i);
                            }
                        }
                    }
                    None if !reply => {
                        let r = ct.insert(&pkt, &seg, 1, now);
                        match (r, known) {
                            (Ok(Opened::Exists(got)), Some(k)) => {
                                // Another worker opened it between the miss and this insert.
                                let (want, after) = expect(&k, reply, &seg, now);
                                prop_assert_eq!(got, want);
                                follow(&mut model, i, after);
                            }
                            (Ok(Opened::Exists(_)), None) => {
                                prop_assert!(false, "flow {} exists but the model has none", i)
                            }
                            (Ok(Opened::New(_)), Some(k)) => {
                                prop_assert!(false, "flow {} got a second entry ({:?})", i, k)
                            }
                            (Ok(Opened::New(_)), None) => {
                                let tcp = if t.proto == proto::TCP {
                                    TcpConn::open(&seg).map(|(c, _)| c).unwrap_or_default()
                                } else {
                                    TcpConn::default()
                                };
                                let state = if t.proto == proto::TCP {
                                    FlowState::of_tcp(tcp.state)
                                } else {
                                    FlowState::Unreplied
                                };
                                model.insert(
                                    i,
                                    Known {
                                        tcp,
                                        state,
                                        assured: false,
                                        seen_reply: false,
                                        seen: now,
                                        created: now,
                                    },
                                );
                            }
                            (Err(InsertError::Refused), _) => {
                                prop_assert!(t.proto == proto::TCP, "only TCP refuses")
                            }
                            (Err(InsertError::Full), _) => {
                                let assured = model
                                    .iter()
                                    .filter(|(j, k)| {
                                        k.assured && live(&ct, k, now, flows[**j].proto)
                                    })
                                    .count();
                                prop_assert!(
                                    assured >= WAYS,
                                    "full with only {} assured flows",
                                    assured
                                );
                            }
                        }
                    }
                    None => {}
                }
            }
            Op::LookupApply { i, reply, shape } => {
                let t = flows[i];
                let pkt = if reply { t.reversed() } else { t };
                let known = model
                    .get(&i)
                    .copied()
                    .filter(|k| live(&ct, k, now, t.proto));
                let seg = segment(shape, known.as_ref(), reply);
                match (ct.lookup_update(&pkt, &ct.probe(&pkt), &seg, now), known) {
                    (Some((h, got)), Some(k)) => {
                        prop_assert_eq!(h.original, !reply);
                        let (want, after) = expect(&k, reply, &seg, now);
                        prop_assert_eq!(got, want, "flow {} {:?} with {:?}", i, k, seg);
                        follow(&mut model, i, after);
                    }
                    (Some(_), None) => {
                        prop_assert!(false, "found flow {}, unknown to the model", i)
                    }
                    (None, Some(k)) => {
                        prop_assert!(!k.assured, "assured flow {} ({:?}) not found", i, k.state);
                        model.remove(&i);
                    }
                    (None, None) => {
                        model.remove(&i);
                    }
                }
            }
            Op::Remove(i) => {
                if let Some(hit) = ct.lookup(&flows[i], now) {
                    prop_assert!(ct.remove(&hit, &flows[i], now));
                    prop_assert!(ct.lookup(&flows[i], now).is_none());
                }
                model.remove(&i);
            }
            Op::Sweep(n) => {
                let mut cursor = 0;
                ct.sweep(&mut cursor, n, now);
            }
            Op::Wait(s) => now += s * S,
        }
        prop_assert_eq!(ct.entries(), occupied(&ct), "entry count");
        // The model and the table agree on every flow; only unassured or expired ones vanish.
        let ids: Vec<usize> = model.keys().copied().collect();
        for i in ids {
            let k = model[&i];
            match ct.lookup(&flows[i], now) {
                Some(h) => {
                    prop_assert_eq!(h.state, k.state, "state of flow {}", i);
                    prop_assert_eq!(h.assured, k.assured, "assured flag of flow {}", i);
                }
                None => {
                    prop_assert!(
                        !k.assured || !live(&ct, &k, now, flows[i].proto),
                        "assured flow {} ({:?}) lost",
                        i,
                        k.state
                    );
                    model.remove(&i);
                }
            }
        }
        for e in ct.list(now, |_| true) {
            let found = model.keys().any(|i| {
                let t = &flows[*i];
                e.sport == t.sport && e.dport == t.dport && e.proto == t.proto
            });
            prop_assert!(found, "listed flow {:?} unknown to the model", e);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn interleaved_workers_keep_the_tables_promises(ops in proptest::collection::vec(op(), 1..300)) {
        run(&ops)?;
    }
}
