//! The datapath classifier (the forest) and the tuple space against the linear reference, for random rule sets and
//! keys: the first matching rule must be the same, from every starting index.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::classify::{Classifier, Forest, Linear, TupleSpace};
use policy::key::FlowKey;
use policy::rule::{AddrSet, Direction, Match, PortRange, Prefix};
use portcullis_fuzz::Bytes;

/// A prefix inside a small space (10.0.0.0/16, or 2001:db8::/112) so that rules overlap.
fn prefix(b: &mut Bytes) -> Prefix {
    let v6 = b.u8() % 5 == 0;
    let host = b.u16() as u128;
    let (base, width) = if v6 {
        (0x2001_0db8u128 << 96, 128u8)
    } else {
        (0x0a00_0000u128, 32u8)
    };
    let len = width - 16 + (b.u8() % 17);
    let addr = if v6 {
        std::net::IpAddr::from(std::net::Ipv6Addr::from(base | host))
    } else {
        std::net::IpAddr::from(std::net::Ipv4Addr::from((base | host) as u32))
    };
    Prefix::new(addr, len).expect("a length within the family")
}

fn ports(b: &mut Bytes) -> PortRange {
    match b.u8() % 4 {
        0 => PortRange {
            lo: 0,
            hi: u16::MAX,
        },
        1 => {
            let p = b.u16() % 64;
            PortRange { lo: p, hi: p }
        }
        _ => {
            let lo = b.u16() % 64;
            PortRange {
                lo,
                hi: lo + b.u16() % 64,
            }
        }
    }
}

fn set(b: &mut Bytes) -> AddrSet {
    let include = (0..b.u8() % 3).map(|_| prefix(b)).collect();
    let except = (0..b.u8() % 3).map(|_| prefix(b)).collect();
    AddrSet { include, except }
}

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    let mut b = Bytes(data);
    let n = 1 + b.u8() as usize % 24;
    let matches: Vec<Match> = (0..n)
        .map(|_| Match {
            direction: if b.u8() % 2 == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            src: set(&mut b),
            dst: set(&mut b),
            proto: [None, Some(6), Some(17), Some(1)][b.u8() as usize % 4],
            sport: ports(&mut b),
            dport: ports(&mut b),
            vlan: if b.u8() % 7 == 0 {
                Some(b.u16() % 8)
            } else {
                None
            },
        })
        .collect();
    let forest = Forest::build(&matches);
    let tuples = TupleSpace::build(&matches);
    let slow = Linear::build(&matches);
    let mut keys = Vec::new();
    while !b.is_empty() {
        let s = prefix(&mut b);
        let d = prefix(&mut b);
        let v6 = s.v6;
        let key = FlowKey {
            dir: if b.u8() % 2 == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            v6,
            src: s.bits | (b.u16() as u128 & 0xff),
            dst: if d.v6 == v6 { d.bits } else { s.bits ^ 1 },
            proto: [6, 17, 1, 47][b.u8() as usize % 4],
            sport: b.u16() % 80,
            dport: b.u16() % 80,
            ports_known: b.u8() % 9 != 0,
            vlan: if b.u8() % 5 == 0 {
                b.u16() % 8
            } else {
                policy::key::NO_VLAN
            },
        };
        let from = b.u8() as u32 % (n as u32 + 1);
        for fast in [&forest as &dyn Classifier, &tuples] {
            assert_eq!(
                fast.first_match(&key, from),
                slow.first_match(&key, from),
                "{key} from {from} over {matches:#?}"
            );
        }
        keys.push(key);
    }
    let mut out = vec![0u32; keys.len()];
    forest.classify_batch(&keys, &mut out);
    for (k, o) in keys.iter().zip(&out) {
        assert_eq!(*o, slow.first_match(k, 0), "{k} in a burst over {matches:#?}");
    }
});
