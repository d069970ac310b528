//! Property tests of the tracker against a model, with a fake clock.
//!
//! Random sequences of packets (either direction, any TCP flags), inserts the way the datapath
//! does them (after a miss, for a packet policy admitted), removals, sweeps and clock steps run
//! against a small table, so buckets collide and fill. The model records what the table told it
//! (the state after each packet, and when) and checks what the design promises:
//! - a lookup finds only flows that were inserted and not removed, in the right direction, in
//!   the state the last packet left them, and never past their timeout;
//! - a flow that has seen a reply is never lost before its timeout (no eviction, no sweep), even
//!   when inserts find its bucket full;
//! - only unreplied flows are evicted, and only by an insert;
//! - the entry count equals the occupied slots.

use std::collections::HashMap;

use proptest::prelude::*;

use super::tcp_flags::*;
use super::*;

const S: u64 = NS;

/// A pool of flows, many per bucket of a 16-slot table (2 buckets of 8).
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
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// A packet of flow `i`, in its original direction or as a reply, with TCP `flags`; an
    /// admitted packet with no flow opens one (as the datapath does after a miss).
    Packet {
        i: usize,
        reply: bool,
        flags: u8,
    },
    /// Policy no longer admits flow `i`.
    Remove(usize),
    Sweep(usize),
    /// The clock moves on this many seconds (0 included: packets at one instant).
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let flags = prop_oneof![
        Just(SYN),
        Just(SYN | ACK),
        Just(ACK),
        Just(FIN | ACK),
        Just(RST),
        any::<u8>(),
    ];
    prop_oneof![
        8 => (0..40usize, any::<bool>(), flags).prop_map(|(i, reply, flags)| Op::Packet { i, reply, flags }),
        1 => (0..40usize).prop_map(Op::Remove),
        1 => (1..64usize).prop_map(Op::Sweep),
        1 => prop_oneof![Just(0u64), Just(1), Just(5), Just(11), Just(31), Just(61), Just(121)].prop_map(Op::Wait),
    ]
}

/// What the model knows of a flow: the state the table reported after its last packet, when
/// that was, and whether its own packets were replies.
#[derive(Debug, Clone, Copy)]
struct Known {
    state: FlowState,
    seen: u64,
}

fn occupied(ct: &Conntrack) -> usize {
    ct.slots
        .iter()
        .filter(|s| s.state.load(Ordering::Relaxed) != 0)
        .count()
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let ct = Conntrack::new(16, Timeouts::default());
    let flows = pool();
    let mut model: HashMap<usize, Known> = HashMap::new();
    let mut now = S;
    let live = |ct: &Conntrack, k: &Known, now: u64, proto_: u8| {
        now.saturating_sub(k.seen) <= ct.timeout_ns(proto_, k.state)
    };
    for op in ops {
        match *op {
            Op::Packet { i, reply, flags } => {
                let t = flows[i];
                let pkt = if reply { t.reversed() } else { t };
                match ct.lookup(&pkt, now) {
                    Some(hit) => {
                        let k = model.get(&i);
                        prop_assert!(k.is_some(), "found flow {i}, never inserted or removed");
                        let k = *k.unwrap();
                        prop_assert!(
                            live(&ct, &k, now, t.proto),
                            "found flow {i} past its timeout"
                        );
                        prop_assert_eq!(hit.original, !reply);
                        prop_assert_eq!(hit.state, k.state);
                        let state = ct.update(&hit, flags, 1, now);
                        model.insert(i, Known { state, seen: now });
                    }
                    None => {
                        if let Some(k) = model.remove(&i) {
                            // Gone: it must have expired, or been an unreplied flow an insert
                            // evicted.
                            prop_assert!(
                                !live(&ct, &k, now, t.proto) || !k.state.replied(),
                                "flow {i} in state {:?} lost before its timeout",
                                k.state
                            );
                        }
                        // Only a packet in the original direction opens its flow (a reply
                        // without an entry is denied by the datapath); TCP needs a SYN.
                        let opens = !reply && (t.proto != proto::TCP || flags & (SYN | ACK) == SYN);
                        if opens {
                            let before: Vec<(usize, Known)> =
                                model.iter().map(|(a, b)| (*a, *b)).collect();
                            match ct.insert(&pkt, flags, 1, now) {
                                Ok(_) => {
                                    let hit = ct.lookup(&pkt, now);
                                    prop_assert!(hit.is_some(), "flow {i} inserted, not found");
                                    let state = hit.unwrap().state;
                                    model.insert(i, Known { state, seen: now });
                                }
                                Err(InsertError::Full) => {
                                    let replied = before
                                        .iter()
                                        .filter(|(j, k)| {
                                            k.state.replied() && live(&ct, k, now, flows[*j].proto)
                                        })
                                        .count();
                                    prop_assert!(
                                        replied >= WAYS,
                                        "full with only {replied} live replied flows"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            Op::Remove(i) => {
                if let Some(hit) = ct.lookup(&flows[i], now) {
                    prop_assert!(ct.remove(&hit));
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
        // Every replied, live flow the model knows is still there.
        for (i, k) in &model {
            if k.state.replied() && live(&ct, k, now, flows[*i].proto) {
                prop_assert!(
                    ct.lookup(&flows[*i], now).is_some(),
                    "replied flow {i} ({:?}) lost",
                    k.state
                );
            }
        }
        // And the table holds nothing the model does not.
        for e in ct.list(now, |_| true) {
            let found = model.keys().any(|i| {
                let t = &flows[*i];
                e.sport == t.sport && e.dport == t.dport && e.proto == t.proto
            });
            prop_assert!(found, "listed flow {e:?} unknown to the model");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_tracker_keeps_its_promises(ops in proptest::collection::vec(op(), 1..200)) {
        run(&ops)?;
    }
}
