//! The connection tracker's state machine on random packet sequences (either direction, any
//! TCP flags), inserts, removals, sweeps and clock steps, against a small table so buckets fill.
//! What the design promises is checked as it goes: a lookup finds only flows that were inserted,
//! in the right direction and state; a flow that has seen a reply is never lost before its
//! timeout; an insert that succeeds is visible at once.
#![no_main]

use std::collections::HashMap;

use gateway::conntrack::{tcp_flags, Conntrack, FlowState, InsertError, Timeouts, Tuple};
use libfuzzer_sys::fuzz_target;
use policy::key::{proto, NO_VLAN};
use policy::rule::Direction;
use portcullis_fuzz::Bytes;

const S: u64 = 1_000_000_000;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    let mut b = Bytes(data);
    let timeouts = Timeouts {
        tcp_syn_s: 1 + b.u8() as u32 % 120,
        tcp_established_s: 1 + b.u16() as u32,
        udp_unreplied_s: 1 + b.u8() as u32 % 60,
        ..Timeouts::default()
    };
    let ct = Conntrack::new(16, timeouts);
    let pool: Vec<Tuple> = (0..12u16)
        .map(|i| Tuple {
            dir: if b.u8() % 2 == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            v6: false,
            src: 0x0a00_0000 + u128::from(i),
            dst: 0xc633_6400 + u128::from(b.u8() % 4),
            proto: [proto::TCP, proto::UDP, proto::ICMP][b.u8() as usize % 3],
            sport: 40_000 + i,
            dport: b.u16() % 4,
            vlan: NO_VLAN,
        })
        .collect();
    // What the table said about each flow it holds: the state after its last packet, and when.
    let mut model: HashMap<usize, (FlowState, u64)> = HashMap::new();
    let mut now = S;
    let mut cursor = 0usize;
    while !b.is_empty() {
        match b.u8() % 8 {
            0..=4 => {
                let i = b.u8() as usize % pool.len();
                let reply = b.u8() % 2 == 1;
                let flags = b.u8();
                let t = pool[i];
                let pkt = if reply { t.reversed() } else { t };
                match ct.lookup(&pkt, now) {
                    Some(hit) => {
                        let known = model.get(&i).copied();
                        assert!(known.is_some(), "found flow {i}, never inserted or removed");
                        assert_eq!(hit.original, !reply, "direction of flow {i}");
                        assert_eq!(hit.state, known.unwrap().0, "state of flow {i}");
                        let state = ct.update(&hit, flags, 1, now);
                        model.insert(i, (state, now));
                    }
                    None => {
                        if let Some((state, seen)) = model.remove(&i) {
                            // Gone: expired, or an unreplied flow an insert evicted.
                            let idle = now.saturating_sub(seen);
                            let expired = idle > ct.timeout_ns(t.proto, state);
                            assert!(
                                !state.replied() || expired,
                                "flow {i} ({state:?}) lost after {idle} ns"
                            );
                        }
                        let opens = !reply
                            && (t.proto != proto::TCP
                                || flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN);
                        if opens {
                            match ct.insert(&pkt, flags, 1, now) {
                                Ok(_) => {
                                    let hit =
                                        ct.lookup(&pkt, now).expect("an insert is visible at once");
                                    model.insert(i, (hit.state, now));
                                }
                                Err(InsertError::Full) => {}
                            }
                        }
                    }
                }
            }
            5 => {
                let i = b.u8() as usize % pool.len();
                if let Some(hit) = ct.lookup(&pool[i], now) {
                    ct.remove(&hit);
                    assert!(
                        ct.lookup(&pool[i], now).is_none(),
                        "removed flow {i} still there"
                    );
                }
                model.remove(&i);
            }
            6 => {
                ct.sweep(&mut cursor, 1 + b.u8() as usize % 32, now);
            }
            _ => now += u64::from(b.u8() % 8) * S * [1, 10, 100][b.u8() as usize % 3],
        }
        assert!(ct.entries() <= ct.capacity());
    }
});
