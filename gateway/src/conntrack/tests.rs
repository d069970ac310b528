//! The table's unit tests: states and timeouts, pairing, eviction, placement, and the
//! concurrency guarantees (a replied flow is never reported absent, a transition is never lost,
//! a flow never gets two entries), each under threads that race for one bucket pair.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Barrier};

use super::tcp_flags::*;
use super::*;

const S: u64 = NS;

pub(super) fn tcp(sport: u16, dport: u16) -> Tuple {
    Tuple {
        dir: Direction::Egress,
        v6: false,
        src: 0x0a63_0002,
        dst: 0xc633_6407,
        proto: proto::TCP,
        sport,
        dport,
        vlan: NO_VLAN,
        vlan2: NO_VLAN,
    }
}

pub(super) fn udp(sport: u16) -> Tuple {
    Tuple {
        proto: proto::UDP,
        ..tcp(sport, 53)
    }
}

pub(super) fn seg(flags: u8, seq: u32, ack: u32) -> Segment {
    Segment {
        flags,
        seq,
        ack,
        win: 8192,
        sack: ack,
        ..Segment::default()
    }
}

fn table(cap: usize) -> Conntrack {
    Conntrack::new(cap, Timeouts::default())
}

fn step(ct: &Conntrack, t: &Tuple, s: &Segment, now: u64) -> Update {
    let h = ct.lookup(t, now).expect("tracked");
    ct.update(&h, t, s, now)
}

/// A TCP flow through its handshake (client ISN 1000, server ISN 5000): established, assured.
pub(super) fn handshake(ct: &Conntrack, t: &Tuple, now: u64) {
    assert!(matches!(
        ct.insert(t, &seg(SYN, 1000, 0), 1, now),
        Ok(Opened::New(_))
    ));
    assert_eq!(
        step(ct, &t.reversed(), &seg(SYN | ACK, 5000, 1001), now),
        Update::Pass(FlowState::SynReceived)
    );
    assert_eq!(
        step(ct, t, &seg(ACK, 1001, 5001), now),
        Update::Pass(FlowState::Established)
    );
    assert!(ct.lookup(t, now).unwrap().assured);
}

#[test]
fn an_expired_copy_does_not_hide_the_flow_opened_again() {
    let ct = table(16);
    let t = udp(9);
    let none = Segment::default();
    ct.insert(&t, &none, 1, S).unwrap();
    ct.insert(&udp(10), &none, 1, S).unwrap();
    assert!(ct.lookup(&t, 32 * S).is_none(), "30 s unreplied");
    ct.insert(&t, &none, 1, 32 * S).unwrap();
    let h = ct.lookup(&t.reversed(), 32 * S).expect("the new entry");
    assert!(!h.original);
}

#[test]
fn a_tcp_connection_walks_its_states_and_each_state_has_its_timeout() {
    let ct = table(1024);
    let t = tcp(40000, 443);
    handshake(&ct, &t, 0);
    let r = t.reversed();
    assert_eq!(
        step(&ct, &r, &seg(ACK, 5001, 1001), 3 * S),
        Update::Pass(FlowState::Established)
    );
    // Established lasts a day of silence, not more.
    assert!(ct.lookup(&t, 3 * S + 86_400 * S).is_some());
    assert!(ct.lookup(&t, 4 * S + 86_400 * S).is_none());
    assert_eq!(
        step(&ct, &t, &seg(FIN | ACK, 1001, 5001), 4 * S),
        Update::Pass(FlowState::FinWait)
    );
    assert_eq!(
        step(&ct, &r, &seg(FIN | ACK, 5001, 1002), 5 * S),
        Update::Pass(FlowState::LastAck)
    );
    assert_eq!(
        step(&ct, &t, &seg(ACK, 1002, 5002), 5 * S),
        Update::Pass(FlowState::TimeWait)
    );
    assert!(ct.lookup(&t, 5 * S + 120 * S).is_some());
    assert!(ct.lookup(&t, 6 * S + 120 * S).is_none());
}

#[test]
fn a_syn_on_a_finished_flow_ends_it_in_either_direction() {
    for from_server in [false, true] {
        let ct = table(1024);
        let t = tcp(40010, 443);
        handshake(&ct, &t, 0);
        let r = t.reversed();
        step(&ct, &t, &seg(FIN | ACK, 1001, 5001), S);
        step(&ct, &r, &seg(FIN | ACK, 5001, 1002), S);
        step(&ct, &t, &seg(ACK, 1002, 5002), S);
        let who = if from_server { r } else { t };
        assert_eq!(step(&ct, &who, &seg(SYN, 77_777, 0), 2 * S), Update::Reopen);
        assert!(ct.lookup(&t, 2 * S).is_none(), "the old entry is gone");
        assert_eq!(ct.entries(), 0);
    }
}

#[test]
fn a_rst_closes_only_with_the_expected_sequence_number_and_checksum() {
    let ct = table(1024);
    let t = tcp(40001, 443);
    handshake(&ct, &t, 0);
    let r = t.reversed();
    let far = seg(RST, 5001u32.wrapping_add(3_000_000), 0);
    assert!(matches!(step(&ct, &r, &far, S), Update::Invalid(_)));
    let mut bad = seg(RST, 5001, 0);
    bad.csum_ok = false;
    assert_eq!(
        step(&ct, &r, &bad, S),
        Update::Invalid(tcp::Invalid::Checksum)
    );
    assert_eq!(
        step(
            &ct,
            &r,
            &seg(FIN | ACK, 5001u32.wrapping_add(1 << 31), 1001),
            S
        ),
        Update::Invalid(tcp::Invalid::Window),
        "a forged FIN"
    );
    assert_eq!(ct.lookup(&t, S).unwrap().state, FlowState::Established);
    assert_eq!(
        step(&ct, &r, &seg(RST, 5001, 0), S),
        Update::Pass(FlowState::Closed)
    );
    assert!(ct.lookup(&t, 11 * S).is_some());
    assert!(ct.lookup(&t, 12 * S).is_none(), "closed timeout");
}

#[test]
fn an_embryonic_flow_expires_fast_and_a_refusing_rst_ends_it() {
    let ct = table(1024);
    let t = tcp(40002, 443);
    ct.insert(&t, &seg(SYN, 1, 0), 1, 0).unwrap();
    assert!(ct.lookup(&t.reversed(), 60 * S).is_some());
    assert!(ct.lookup(&t.reversed(), 61 * S).is_none(), "SYN timeout");
    let t = tcp(40003, 443);
    ct.insert(&t, &seg(SYN, 1, 0), 1, 0).unwrap();
    assert_eq!(
        step(&ct, &t.reversed(), &seg(RST | ACK, 0, 2), S),
        Update::Pass(FlowState::Closed)
    );
    assert!(ct.lookup(&t, S).is_none(), "the only answer was a RST");
}

#[test]
fn udp_is_unreplied_then_replied_then_assured() {
    let ct = table(1024);
    let none = Segment::default();
    let t = udp(5353);
    ct.insert(&t, &none, 1, 0).unwrap();
    assert_eq!(step(&ct, &t, &none, S), Update::Pass(FlowState::Unreplied));
    assert!(ct.lookup(&t, 32 * S).is_none(), "30 s unreplied");
    let t = udp(5354);
    ct.insert(&t, &none, 1, 0).unwrap();
    assert_eq!(
        step(&ct, &t.reversed(), &none, S),
        Update::Pass(FlowState::Replied)
    );
    assert!(!ct.lookup(&t, S).unwrap().assured, "a request and a reply");
    step(&ct, &t, &none, 2 * S);
    assert!(
        ct.lookup(&t, 2 * S).unwrap().assured,
        "and then more, 2 s after it opened"
    );
    // ICMP and other protocols are never assured (netfilter): an answered ping flood evicts.
    let ping = Tuple {
        proto: proto::ICMP,
        sport: 7,
        dport: 8,
        ..udp(0)
    };
    ct.insert(&ping, &none, 1, 0).unwrap();
    step(&ct, &ping.reversed(), &none, S);
    step(&ct, &ping, &none, 5 * S);
    assert!(!ct.lookup(&ping, 5 * S).unwrap().assured);
    assert!(ct.lookup(&t, 100 * S).is_some());
    assert!(ct.lookup(&t, 123 * S).is_none(), "120 s replied");
}

#[test]
fn other_protocols_are_tracked_by_address_pair_for_the_generic_timeout() {
    let ct = table(1024);
    let esp = Tuple {
        proto: 50,
        sport: 0,
        dport: 0,
        ..udp(0)
    };
    ct.insert(&esp, &Segment::default(), 1, 0).unwrap();
    assert!(ct
        .lookup(&esp.reversed(), 599 * S)
        .is_some_and(|h| !h.original));
    assert!(ct.lookup(&esp, 601 * S).is_none());
    assert!(!esp.key().ports_known, "re-decided without ports");
}

#[test]
fn a_reply_must_be_the_exact_reverse() {
    let ct = table(1024);
    let t = udp(6000);
    ct.insert(&t, &Segment::default(), 1, 0).unwrap();
    let mut other_host = t.reversed();
    other_host.src ^= 1;
    assert!(ct.lookup(&other_host, S).is_none());
    let mut other_port = t.reversed();
    other_port.sport = 54;
    assert!(ct.lookup(&other_port, S).is_none());
    let mut same_way_back = t;
    same_way_back.dir = Direction::Ingress;
    assert!(
        ct.lookup(&same_way_back, S).is_none(),
        "the same tuple arriving on the other interface is not a reply"
    );
    let mut vlan = t.reversed();
    vlan.vlan = 7;
    assert!(ct.lookup(&vlan, S).is_none());
    let mut inner = t.reversed();
    inner.vlan2 = 8;
    assert!(ct.lookup(&inner, S).is_none(), "another inner VLAN");
}

fn icmp_key(dir: Direction, src: u128, dst: u128, ty: u16) -> FlowKey {
    FlowKey {
        dir,
        src,
        dst,
        proto: proto::ICMP,
        sport: ty,
        dport: 0,
        ..FlowKey::default()
    }
}

fn with_id(id: u16) -> Track {
    Track {
        icmp_id: id,
        ..Track::new()
    }
}

#[test]
fn icmp_queries_pair_by_type_and_identifier() {
    let ct = table(1024);
    let (inside, outside) = (0x0a63_0002, 0x0a63_0001);
    for (req, rep) in [(8, 0), (13, 14), (15, 16), (17, 18)] {
        let ct = &ct;
        let out = icmp_key(Direction::Egress, inside, outside, req);
        assert!(opens_flow(&out, &with_id(77)));
        let Kind::Flow(t) = classify_packet(&out, &with_id(77)) else {
            panic!("a request is tracked")
        };
        ct.insert(&t, &Segment::default(), 1, 0).unwrap();
        let lookup = |ty, id, dir, src, dst| {
            let Kind::Flow(r) = classify_packet(&icmp_key(dir, src, dst, ty), &with_id(id)) else {
                panic!()
            };
            ct.lookup(&r, S)
        };
        assert!(lookup(rep, 77, Direction::Ingress, outside, inside).is_some_and(|h| !h.original));
        assert!(lookup(rep, 78, Direction::Ingress, outside, inside).is_none());
        assert!(
            lookup(req, 77, Direction::Ingress, outside, inside).is_none(),
            "a request from outside with the same identifier is not a reply"
        );
        let other_reply = if rep == 0 { 14 } else { 0 };
        assert!(lookup(other_reply, 77, Direction::Ingress, outside, inside).is_none());
        // The reply must carry the request's code.
        let Kind::Flow(r) = classify_packet(
            &FlowKey {
                dport: 1,
                ..icmp_key(Direction::Ingress, outside, inside, rep)
            },
            &with_id(77),
        ) else {
            panic!()
        };
        assert!(ct.lookup(&r, S).is_none(), "a reply with another code");
        ct.flush(|_| true);
    }
    // A reply going out opens nothing; an ICMPv6 echo reply neither.
    assert!(!opens_flow(
        &icmp_key(Direction::Egress, inside, outside, 0),
        &with_id(5)
    ));
    let mut v6 = icmp_key(Direction::Egress, inside, outside, 129);
    v6.proto = proto::ICMPV6;
    v6.v6 = true;
    assert!(!opens_flow(&v6, &with_id(5)));
    v6.sport = 128;
    assert!(opens_flow(&v6, &with_id(5)));
}

#[test]
fn icmp_errors_are_related_only_to_the_quoted_packets_sender() {
    let ct = table(1024);
    let out = udp(7000);
    ct.insert(&out, &Segment::default(), 1, 0).unwrap();
    let quote = FlowKey {
        sport: out.sport,
        dport: out.dport,
        ..out.key()
    };
    let error = |dst: u128, q: FlowKey, proto_: u8| {
        let mut k = icmp_key(Direction::Ingress, 0xc633_6401, dst, 3);
        k.proto = proto_;
        k.v6 = proto_ == proto::ICMPV6;
        if k.v6 {
            k.sport = 1;
        }
        classify_packet(
            &k,
            &Track {
                quoted: Some(q),
                ..Track::new()
            },
        )
    };
    let Kind::Error(q) = error(out.src, quote, proto::ICMP) else {
        panic!("related")
    };
    assert!(ct.lookup(&q, S).is_some());
    assert_eq!(
        error(out.src + 1, quote, proto::ICMP),
        Kind::Untracked,
        "to another inside host"
    );
    assert_eq!(
        error(out.dst, quote, proto::ICMP),
        Kind::Untracked,
        "to the outside peer"
    );
    assert_eq!(
        error(out.src, quote, proto::ICMPV6),
        Kind::Untracked,
        "an ICMPv6 error quoting IPv4"
    );
    // Informational messages other than queries are not tracked.
    let redirect = icmp_key(Direction::Ingress, 1, 2, 9);
    assert_eq!(classify_packet(&redirect, &Track::new()), Kind::Untracked);
}

#[test]
fn a_full_bucket_pair_evicts_the_oldest_unassured_flow_never_an_assured_one() {
    // One bucket: both choices are the same bucket, and there is nowhere to move to.
    let ct = table(WAYS);
    let none = Segment::default();
    let assured: Vec<Tuple> = (0..4).map(|i| udp(100 + i)).collect();
    for t in &assured {
        ct.insert(t, &none, 1, 0).unwrap();
        step(&ct, &t.reversed(), &none, 0);
        step(&ct, t, &none, S);
        assert!(
            !ct.lookup(t, S).unwrap().assured,
            "too soon (netfilter: 2 s)"
        );
        step(&ct, t, &none, 2 * S);
        assert!(ct.lookup(t, 2 * S).unwrap().assured);
    }
    for i in 0..4u16 {
        ct.insert(&udp(200 + i), &none, 1, u64::from(i) * S)
            .unwrap();
    }
    assert_eq!(ct.entries(), WAYS);
    assert_eq!(
        ct.insert(&udp(300), &none, 1, 5 * S),
        Ok(Opened::New(Displaced::Evicted))
    );
    assert!(ct.lookup(&udp(200), 5 * S).is_none(), "the oldest went");
    assert!(ct.lookup(&udp(201), 5 * S).is_some());
    // Answered but not assured is still evictable (netfilter's early_drop).
    step(&ct, &udp(201).reversed(), &none, 5 * S);
    assert_eq!(
        ct.insert(&udp(301), &none, 1, 6 * S),
        Ok(Opened::New(Displaced::Evicted))
    );
    for t in (200..400).map(udp) {
        if ct.lookup(&t, 6 * S).is_some() {
            step(&ct, &t.reversed(), &none, 6 * S);
            step(&ct, &t, &none, 9 * S);
        }
    }
    let live = (200..400)
        .filter(|&p| ct.lookup(&udp(p), 9 * S).is_some())
        .count();
    assert_eq!(live, 4);
    assert_eq!(
        ct.insert(&udp(400), &none, 1, 9 * S),
        Err(InsertError::Full)
    );
    for t in &assured {
        assert!(ct.lookup(t, 9 * S).is_some(), "assured flows stay");
    }
    // Past their timeout, assured flows make room.
    assert_eq!(
        ct.insert(&udp(400), &none, 1, 200 * S),
        Ok(Opened::New(Displaced::Expired))
    );
}

#[test]
fn an_answered_syn_flood_neither_pushes_out_established_flows_nor_keeps_new_ones_out() {
    let ct = table(4096);
    let established: Vec<Tuple> = (0..512).map(|i| tcp(10_000 + i, 443)).collect();
    for t in &established {
        handshake(&ct, t, 0);
    }
    let (mut ok, mut full) = (0, 0);
    for i in 0..100_000u32 {
        let mut t = tcp(1024 + (i % 60_000) as u16, 443);
        t.src = 0xc000_0000 | i as u128; // spoofed sources
        match ct.insert(&t, &seg(SYN, i, 0), 1, S) {
            Ok(_) => {
                ok += 1;
                // The server answers every one: half-open, not assured.
                step(&ct, &t.reversed(), &seg(SYN | ACK, 9, i + 1), S);
            }
            Err(_) => full += 1,
        }
    }
    assert_eq!(full, 0, "answered SYNs are evictable");
    assert!(ok > 0 && ct.entries() <= ct.capacity());
    for t in &established {
        assert!(ct.lookup(t, 2 * S).is_some(), "{t:?} survived the flood");
    }
    // A new legitimate flow still opens, and completes.
    handshake(&ct, &tcp(33_333, 8443), 2 * S);
}

#[test]
fn the_bucket_hash_is_keyed() {
    let a = Conntrack::with_key(1 << 16, Timeouts::default(), (1, 2));
    let b = Conntrack::with_key(1 << 16, Timeouts::default(), (3, 4));
    let same = (0..1000u16)
        .filter(|&p| a.place(&tcp(p, 80)).0 == b.place(&tcp(p, 80)).0)
        .count();
    assert!(
        same < 5,
        "{same} of 1000 tuples share buckets under two keys"
    );
    // Direction-independent under any key.
    for p in 0..100 {
        let t = tcp(p, 80);
        assert_eq!(a.place(&t), a.place(&t.reversed()));
        let Kind::Flow(q) = classify_packet(&icmp_key(Direction::Egress, 1, 2, 8), &with_id(p))
        else {
            panic!()
        };
        assert_eq!(a.place(&q), a.place(&q.reversed()));
    }
}

/// Fills a table with assured flows until the first refusal; returns the load then.
pub(super) fn first_refusal(cap: usize) -> f64 {
    let ct = table(cap);
    let none = Segment::default();
    for i in 0u64.. {
        let t = Tuple {
            src: 0x0a00_0000 | (i >> 16) as u128,
            sport: i as u16,
            ..udp(0)
        };
        match ct.insert(&t, &none, 1, 0) {
            Ok(_) => {
                step(&ct, &t.reversed(), &none, 0);
                step(&ct, &t, &none, 2 * S);
            }
            Err(_) => return ct.entries() as f64 / ct.capacity() as f64,
        }
    }
    unreachable!()
}

#[test]
fn established_flows_fill_the_table_past_ninety_percent() {
    for (cap, name) in [(1 << 18, "256K"), (1 << 20, "1M")] {
        let load = first_refusal(cap);
        eprintln!(
            "{name} slots: first established flow refused at {:.1} % load",
            load * 100.0
        );
        assert!(load >= 0.90, "{name}: refused at {load:.3}");
    }
}

#[test]
fn sweep_frees_expired_entries_in_bounded_steps() {
    let ct = table(1024);
    for i in 0..100 {
        ct.insert(&udp(i), &Segment::default(), 1, 0).unwrap();
    }
    let mut cursor = 0;
    let mut freed = 0;
    for _ in 0..(ct.capacity() / 64) {
        freed += ct.sweep(&mut cursor, 64, 31 * S);
    }
    assert_eq!(freed, 100);
    assert_eq!(ct.entries(), 0);
}

#[test]
fn the_paced_sweep_covers_the_table_once_a_period_whatever_the_turn_rate() {
    let ct = table(1024);
    for i in 0..100 {
        ct.insert(&udp(i), &Segment::default(), 1, 0).unwrap();
    }
    let cap = ct.capacity();
    let mut sw = Sweeper::default();
    // The first call only starts the clock.
    assert_eq!(ct.sweep_paced(&mut sw, 64, 31 * S), 0);
    assert_eq!(sw.checked(), 0);
    // A turn every microsecond for one period: each slot checked once, not one per turn.
    let (mut freed, mut now) = (0, 31 * S);
    for _ in 0..SWEEP_PERIOD_NS / 1000 {
        now += 1000;
        freed += ct.sweep_paced(&mut sw, 64, now);
    }
    assert_eq!(freed, 100, "one period reaches every slot");
    assert_eq!(ct.entries(), 0);
    assert!(
        (cap - 1..=cap).contains(&sw.checked()),
        "{} slots checked in one period of a {cap}-slot table",
        sw.checked()
    );
    // After an hour idle the worker owes one period, not an hour: it catches up `max` slots
    // a turn and then goes back to the pace.
    now += 3600 * S;
    let before = sw.checked();
    for _ in 0..4 * cap {
        now += 1;
        ct.sweep_paced(&mut sw, 64, now);
    }
    let caught_up = sw.checked() - before;
    assert!(
        (cap..=cap + 64).contains(&caught_up),
        "{caught_up} slots checked after the gap"
    );
}

#[test]
fn list_flush_and_remove() {
    let ct = table(1024);
    for i in 0..10 {
        ct.insert(&udp(i), &Segment::default(), 3, 0).unwrap();
    }
    handshake(&ct, &tcp(1, 2), 0);
    let all = ct.list(S, |_| true);
    assert_eq!(all.len(), 11);
    let tcp_entry = all.iter().find(|e| e.proto == proto::TCP).unwrap();
    assert!(tcp_entry.assured);
    let w = tcp_entry.window.expect("TCP shows its window");
    assert_eq!((w[0].end, w[1].end), (1001, 5001));
    assert_eq!(all.iter().filter(|e| e.generation == 3).count(), 10);
    assert_eq!(ct.flush(|t| t.proto == proto::UDP && t.sport < 5), 5);
    assert_eq!(ct.list(S, |_| true).len(), 6);
    let h = ct.lookup(&udp(7), S).unwrap();
    assert!(ct.remove(&h, &udp(7), S));
    assert!(!ct.remove(&h, &udp(7), S), "removed once");
    assert!(ct.lookup(&udp(7), S).is_none());
    assert_eq!(ct.entries(), 5);
}

#[test]
fn generations_compare_as_serial_numbers() {
    assert!(older(1, 2));
    assert!(!older(2, 1));
    assert!(!older(5, 5));
    assert!(older(u32::MAX, 0), "wraps");
    assert!(!older(0, u32::MAX));
}

// ---- concurrency -------------------------------------------------------------------------

#[test]
fn two_workers_opening_one_flow_at_once_make_one_entry() {
    let barrier = Arc::new(Barrier::new(2));
    let tables: Arc<Vec<Conntrack>> = Arc::new((0..5_000).map(|_| table(64)).collect());
    let handles: Vec<_> = (0..2)
        .map(|w| {
            let (barrier, tables) = (barrier.clone(), tables.clone());
            std::thread::spawn(move || {
                for ct in tables.iter() {
                    barrier.wait();
                    // Worker 0 sees the request, worker 1 the reply, both with no flow yet
                    // (UDP: both directions open).
                    let t = if w == 0 { udp(9) } else { udp(9).reversed() };
                    let _ = ct.insert(&t, &Segment::default(), 1, 0);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for ct in tables.iter() {
        assert_eq!(ct.entries(), 1);
        assert_eq!(ct.list(0, |_| true).len(), 1);
    }
}

#[test]
fn two_fins_at_once_both_count() {
    // Both ends close at the same moment on two queues: netfilter's table gives LAST_ACK in
    // either order; a lost transition would leave FIN_WAIT.
    let barrier = Arc::new(Barrier::new(2));
    let t = tcp(40_000, 443);
    let tables: Arc<Vec<Conntrack>> = Arc::new(
        (0..5_000)
            .map(|_| {
                let ct = table(64);
                handshake(&ct, &t, 0);
                ct
            })
            .collect(),
    );
    let handles: Vec<_> = (0..2)
        .map(|w| {
            let (barrier, tables) = (barrier.clone(), tables.clone());
            std::thread::spawn(move || {
                for ct in tables.iter() {
                    let (tuple, s) = if w == 0 {
                        (t, seg(FIN | ACK, 1001, 5001))
                    } else {
                        (t.reversed(), seg(FIN | ACK, 5001, 1001))
                    };
                    let h = ct.lookup(&tuple, S).unwrap();
                    barrier.wait();
                    assert!(matches!(ct.update(&h, &tuple, &s, S), Update::Pass(_)));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for ct in tables.iter() {
        assert_eq!(ct.lookup(&t, S).unwrap().state, FlowState::LastAck);
    }
}

/// Threads flood one small table with new flows (inserts, evictions, moves) while another
/// looks up an assured flow and updates it: it must be found every time. Bounded in time.
pub(super) fn stress(seconds: f64) -> (u64, u64, u64) {
    let ct = Arc::new(table(256));
    let kept = tcp(1, 1);
    handshake(&ct, &kept, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..2u32)
        .map(|w| {
            let (ct, stop) = (ct.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(1);
                    let mut t = tcp(i as u16, 80);
                    t.src = (w as u128) << 20 | (i >> 16) as u128;
                    if ct.insert(&t, &seg(SYN, i, 0), 1, S).is_ok() {
                        n += 1;
                    }
                    if i.is_multiple_of(64) {
                        let mut cursor = i as usize;
                        ct.sweep(&mut cursor, 16, S);
                    }
                }
                n
            })
        })
        .collect();
    let started = std::time::Instant::now();
    let (mut lookups, mut misses) = (0u64, 0u64);
    while started.elapsed().as_secs_f64() < seconds {
        for tuple in [kept, kept.reversed()] {
            lookups += 1;
            match ct.lookup(&tuple, S) {
                Some(h) => {
                    let s = if h.original {
                        seg(ACK, 1001, 5001)
                    } else {
                        seg(ACK, 5001, 1001)
                    };
                    if ct.update(&h, &tuple, &s, S) == Update::Gone {
                        misses += 1;
                    }
                }
                None => misses += 1,
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let inserts: u64 = flooders.into_iter().map(|h| h.join().unwrap()).sum();
    (lookups, misses, inserts)
}

#[test]
fn an_assured_flow_is_never_reported_absent_under_flooding_inserts() {
    let (lookups, misses, inserts) = stress(2.0);
    eprintln!("stress: {lookups} lookups, {misses} misses, {inserts} flood inserts");
    assert!(inserts > 1000 && lookups > 1000);
    assert_eq!(misses, 0);
}

/// The shortcut for segments that change nothing agrees with the full TCP step: whenever
/// `tcp_unchanged` says a segment is valid and moves nothing, `tcp_step` says exactly that, on
/// connections driven through handshakes, data both ways, window changes and random probes.
#[test]
fn the_unchanged_shortcut_agrees_with_the_full_tcp_step() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut hits, mut checked) = (0u32, 0u32);
    for _ in 0..300 {
        let (ci, si) = (next() as u32, next() as u32);
        let (cs, ss) = ((next() % 15) as u8, (next() % 15) as u8);
        let mut syn = seg(SYN, ci, 0);
        syn.wscale = cs;
        syn.sack_perm = next() % 2 == 0;
        let (conn, _) = TcpConn::open(&syn).unwrap();
        let mut info = pack_tcp(0, &conn);
        let mut win = win_words(&conn);
        let mut synack = seg(SYN | ACK, si, ci.wrapping_add(1));
        synack.wscale = ss;
        synack.sack_perm = next() % 2 == 0;
        let apply = |info: &mut u32, win: &mut [u64; 4], original: bool, s: &Segment| {
            let (v, i, w, _) = tcp_step(*info, win, original, s);
            if matches!(v, tcp::Verdict::Valid | tcp::Verdict::Ignore) {
                *info = i;
                *win = w;
            }
        };
        apply(&mut info, &mut win, false, &synack);
        let (mut c_nxt, mut s_nxt) = (ci.wrapping_add(1), si.wrapping_add(1));
        apply(&mut info, &mut win, true, &seg(ACK, c_nxt, s_nxt));
        for _ in 0..200 {
            // Move the connection on: data one way or the other, acknowledged or not.
            let from_server = next() % 2 == 0;
            let len = (next() % 1500) as u32 * (next() % 2) as u32;
            let mut s = if from_server {
                seg(ACK | PSH, s_nxt, c_nxt)
            } else {
                seg(ACK | PSH, c_nxt, s_nxt)
            };
            s.len = len;
            s.win = (next() % 65_536) as u16;
            apply(&mut info, &mut win, !from_server, &s);
            // A duplicate of it (a replayed ACK: the most common segment that changes nothing).
            checked += 1;
            if tcp_unchanged(info, &win, !from_server, &s) {
                hits += 1;
                let (v, i, w, _) = tcp_step(info, &win, !from_server, &s);
                assert_eq!((v, i, w), (tcp::Verdict::Valid, info, win), "{s:?}");
            }
            if from_server {
                s_nxt = s_nxt.wrapping_add(len);
            } else {
                c_nxt = c_nxt.wrapping_add(len);
            }
            // Probe: a segment near the bounds, either way.
            let original = next() % 2 == 0;
            let (me, peer) = if original {
                (c_nxt, s_nxt)
            } else {
                (s_nxt, c_nxt)
            };
            let jitter = |v: u32, r: u64| v.wrapping_add((r % 4000) as u32).wrapping_sub(2000);
            let mut p = seg(
                [ACK, ACK | PSH, ACK | 0x20, ACK | FIN, ACK | 0x40][(next() % 5) as usize],
                jitter(me, next()),
                jitter(peer, next()),
            );
            p.len = (next() % 3000) as u32 * (next() % 2) as u32;
            p.win = (next() % 65_536) as u16;
            p.sack = jitter(p.ack, next());
            checked += 1;
            if tcp_unchanged(info, &win, original, &p) {
                hits += 1;
                let (v, i, w, st) = tcp_step(info, &win, original, &p);
                assert_eq!(
                    (v, i, w, st),
                    (tcp::Verdict::Valid, info, win, FlowState::Established),
                    "{p:?}"
                );
            }
        }
    }
    eprintln!("shortcut taken on {hits} of {checked} probes");
    assert!(hits > 500, "the shortcut is exercised: {hits}");
}

#[test]
fn the_expiry_table_agrees_with_the_timeouts_for_every_protocol_and_state() {
    let t = Timeouts {
        tcp_syn_s: 1,
        tcp_established_s: 2,
        tcp_closing_s: 3,
        tcp_time_wait_s: 4,
        tcp_closed_s: 5,
        udp_unreplied_s: 6,
        udp_replied_s: 7,
        icmp_s: 8,
        generic_s: 9,
        fragment_s: 10,
    };
    let ct = Conntrack::new(64, t);
    for p in 0..=255u8 {
        for code in 1..=CODE_REPLIED {
            let state = FlowState::from_code(code).unwrap();
            let limit = ct.timeout_ns(p, state);
            assert!(!ct.idle_expired(p, code, 0, limit), "proto {p} {state:?}");
            assert!(
                ct.idle_expired(p, code, 0, limit + 1),
                "proto {p} {state:?}"
            );
        }
    }
}
