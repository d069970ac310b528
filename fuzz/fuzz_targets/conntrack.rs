//! The connection tracker on random packet sequences (either direction, any TCP flags and
//! sequence numbers, UDP, ICMP, ESP), inserts, removals, sweeps and clock steps, against a small
//! table so buckets fill and entries move. What the design promises is checked as it goes: a
//! lookup finds only flows that were inserted, in the right direction; an assured flow is never
//! lost before its timeout; an insert that succeeds is visible at once; the entry count stays
//! within the capacity.
#![no_main]

use std::collections::HashMap;

use gateway::conntrack::{
    Conntrack, FlowState, InsertError, Opened, Segment, Timeouts, Tuple, Update,
};
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
    let ct = Conntrack::new(16 + b.u8() as usize % 32, timeouts);
    let pool: Vec<Tuple> = (0..24u16)
        .map(|i| {
            let p = [proto::TCP, proto::UDP, proto::ICMP, 50][b.u8() as usize % 4];
            Tuple {
                dir: if b.u8() % 2 == 0 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                v6: false,
                src: 0x0a00_0000 + u128::from(i),
                dst: 0xc633_6400 + u128::from(b.u8() % 4),
                proto: p,
                sport: if p == 50 { 0 } else { 40_000 + i },
                dport: if p == 50 {
                    0
                } else if p == proto::ICMP {
                    8
                } else {
                    b.u16() % 4
                },
                vlan: NO_VLAN,
                vlan2: NO_VLAN,
            }
        })
        .collect();
    // What the table said about each flow it holds: its state, whether assured, when last seen.
    let mut model: HashMap<usize, (FlowState, bool, u64)> = HashMap::new();
    let mut now = S;
    let mut cursor = 0usize;
    while !b.is_empty() {
        match b.u8() % 8 {
            0..=4 => {
                let i = b.u8() as usize % pool.len();
                let reply = b.u8() % 2 == 1;
                let seg = Segment {
                    flags: b.u8(),
                    seq: b.u32(),
                    ack: b.u32(),
                    win: b.u16(),
                    len: b.u16() as u32,
                    wscale: b.u8() % 16,
                    sack_perm: b.u8() % 2 == 0,
                    sack: 0,
                    csum_ok: b.u8() % 8 != 0,
                };
                let t = pool[i];
                let pkt = if reply { t.reversed() } else { t };
                match ct.lookup(&pkt, now) {
                    Some(hit) => {
                        assert!(model.contains_key(&i), "found flow {i}, never inserted");
                        assert_eq!(hit.original, !reply, "direction of flow {i}");
                        match ct.update(&hit, &pkt, &seg, now) {
                            Update::Pass(_) => {
                                let h = ct.lookup(&pkt, now);
                                match h {
                                    Some(h) => {
                                        model.insert(i, (h.state, h.assured, now));
                                    }
                                    None => {
                                        // A RST that was the only answer ends the flow.
                                        model.remove(&i);
                                    }
                                }
                            }
                            Update::Invalid(_) => {}
                            Update::Reopen => {
                                model.remove(&i);
                                assert!(ct.lookup(&pkt, now).is_none());
                            }
                            Update::Gone => panic!("flow {i} found, then gone"),
                        }
                    }
                    None => {
                        if let Some((state, assured, seen)) = model.remove(&i) {
                            let idle = now.saturating_sub(seen);
                            let expired = idle > ct.timeout_ns(t.proto, state);
                            assert!(
                                !assured || expired,
                                "assured flow {i} ({state:?}) lost after {idle} ns"
                            );
                        }
                        if !reply {
                            match ct.insert(&pkt, &seg, 1, now) {
                                Ok(Opened::New(_)) => {
                                    let hit =
                                        ct.lookup(&pkt, now).expect("an insert is visible at once");
                                    model.insert(i, (hit.state, hit.assured, now));
                                }
                                Ok(Opened::Exists(_)) => panic!("flow {i} missed, then found"),
                                Err(InsertError::Full | InsertError::Refused) => {}
                            }
                        }
                    }
                }
            }
            5 => {
                let i = b.u8() as usize % pool.len();
                if let Some(hit) = ct.lookup(&pool[i], now) {
                    assert!(ct.remove(&hit, &pool[i], now));
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
