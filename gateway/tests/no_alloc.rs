//! The per-packet path allocates nothing: parsing a burst, classifying it against a real table,
//! counting rule hits and flushing the worker's counters, measured with a counting global
//! allocator after one warm-up burst. (The socket side is covered by the lab tests; it only moves
//! descriptors between preallocated arrays.)

use std::path::PathBuf;

use control::reload::load_and_compile;
use etherparse::PacketBuilder;
use gateway::config::Config;
use gateway::parse::{parse, Frame};
use gateway::stats::{Tally, WorkerCounters};
use policy::key::FlowKey;
use policy::rule::Direction;
use policy::table::{Decision, Table};

fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    for (dport, v6) in [(80u16, false), (22, false), (8080, false), (443, true)] {
        let mut f = Vec::new();
        let eth = PacketBuilder::ethernet2(a, b);
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
            .write(&mut f, b"payload")
            .unwrap();
        out.push(f);
    }
    let mut udp = Vec::new();
    PacketBuilder::ethernet2(a, b)
        .ipv4([10, 99, 0, 1], [10, 99, 0, 2], 64)
        .udp(5000, 53)
        .write(&mut udp, b"q")
        .unwrap();
    out.push(udp.clone());
    out.push(udp[..30].to_vec()); // truncated
    out
}

#[test]
fn parse_classify_and_count_do_not_allocate() {
    let cfg = Config::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/lab/gateway.yaml"),
    )
    .unwrap();
    let (_, rules, _) = load_and_compile(&cfg.policy_dir, &cfg.context).unwrap();
    let table = Table::build(rules, 1, 1);
    let frames = frames();
    let counters = WorkerCounters::default();
    let mut tally = Tally::default();
    let mut keys = [FlowKey::default(); 64];
    let mut out = [Decision::default(); 64];

    let mut burst = |tally: &mut Tally| {
        let mut n = 0;
        for i in 0..64 {
            match parse(&frames[i % frames.len()], Direction::Ingress) {
                Ok(Frame::Ip(k)) => {
                    keys[n] = k;
                    n += 1;
                }
                Ok(_) => tally.l2_forwarded += 1,
                Err(r) => tally.drop(r),
            }
        }
        table.decide_batch(0, &keys[..n], &mut out[..n]);
        tally.rx[0] += 64;
        counters.flush(tally);
        n
    };
    burst(&mut tally); // warm-up
    let mut classified = 0;
    let allocations = allocation_counter::measure(|| {
        for _ in 0..100 {
            classified += burst(&mut tally);
        }
    });
    assert!(classified > 5000, "the bursts did real work");
    assert_eq!(
        allocations.count_total, 0,
        "the per-packet path allocated: {allocations:?}"
    );
    assert!(counters.snapshot().rx_ingress >= 6400);
}
