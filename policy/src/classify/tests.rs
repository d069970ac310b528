use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::*;
use crate::key::FlowKey;
use crate::rule::{AddrSet, Direction, Match, PortRange, Prefix};

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn m(src: &[&str], except: &[&str], proto: Option<u8>, dport: PortRange) -> Match {
    let mut x = Match::any(Direction::Ingress);
    x.src = AddrSet {
        include: src.iter().map(|s| p(s)).collect(),
        except: except.iter().map(|s| p(s)).collect(),
    };
    x.proto = proto;
    x.dport = dport;
    x
}

fn key(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> FlowKey {
    FlowKey::new(
        Direction::Ingress,
        src.parse().unwrap(),
        dst.parse().unwrap(),
        proto,
        sport,
        dport,
    )
}

#[test]
fn first_match_and_continuation() {
    let rules = vec![
        m(
            &["10.0.0.0/8"],
            &["10.1.0.0/16"],
            Some(6),
            PortRange::single(80),
        ),
        m(&["10.0.0.0/8"], &[], None, PortRange::ANY),
        m(&[], &[], None, PortRange::ANY),
    ];
    let t = TupleSpace::build(&rules);
    let l = Linear::build(&rules);
    for c in [&t as &dyn Classifier, &l] {
        assert_eq!(c.first_match(&key("10.2.3.4", "1.1.1.1", 6, 9, 80), 0), 0);
        // the exception skips rule 0
        assert_eq!(c.first_match(&key("10.1.3.4", "1.1.1.1", 6, 9, 80), 0), 1);
        assert_eq!(c.first_match(&key("10.2.3.4", "1.1.1.1", 17, 9, 80), 0), 1);
        assert_eq!(c.first_match(&key("11.2.3.4", "1.1.1.1", 6, 9, 80), 0), 2);
        // continuing after a match skips the earlier rules
        assert_eq!(c.first_match(&key("10.2.3.4", "1.1.1.1", 6, 9, 80), 1), 1);
        assert_eq!(
            c.first_match(&key("10.2.3.4", "1.1.1.1", 6, 9, 80), 3),
            NO_MATCH
        );
        // egress keys see no ingress rule
        let mut k = key("10.2.3.4", "1.1.1.1", 6, 9, 80);
        k.dir = Direction::Egress;
        assert_eq!(c.first_match(&k, 0), NO_MATCH);
    }
}

#[test]
fn fragments_skip_port_rules_and_ipv6_is_separate() {
    let mut v6 = m(&["2001:db8::/32"], &[], Some(17), PortRange::single(53));
    v6.dst = AddrSet::any();
    let rules = vec![v6, m(&["10.0.0.0/8"], &[], Some(17), PortRange::single(53))];
    let t = TupleSpace::build(&rules);
    let mut k = key("2001:db8::1", "2001:db8::2", 17, 1, 53);
    assert_eq!(t.first_match(&k, 0), 0);
    k.ports_known = false;
    assert_eq!(t.first_match(&k, 0), NO_MATCH);
    assert_eq!(t.first_match(&key("10.0.0.1", "10.0.0.2", 17, 1, 53), 0), 1);
    assert_eq!(
        t.first_match(&key("2001:db9::1", "::1", 17, 1, 53), 0),
        NO_MATCH
    );
}

fn arb_prefix(v6: bool) -> impl Strategy<Value = Prefix> {
    // A small address space so that prefixes overlap and keys hit them.
    (0u32..16, 0u8..=8).prop_map(move |(host, short)| {
        let len = if v6 { 120 + short } else { 24 + short };
        let base: u128 = if v6 { 0x2001_0db8 << 96 } else { 0x0a00_0000 };
        let bits = base | (host as u128 * 16);
        Prefix::new(crate::rule::bits_addr(v6, bits), len.min(Prefix::width(v6))).unwrap()
    })
}

fn arb_set(v6: bool) -> impl Strategy<Value = AddrSet> {
    (
        prop::collection::vec(arb_prefix(v6), 0..3),
        prop::collection::vec(arb_prefix(v6), 0..2),
    )
        .prop_map(|(include, except)| AddrSet { include, except })
}

fn arb_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        Just(PortRange::ANY),
        (0u16..8, 0u16..8).prop_map(|(a, b)| PortRange {
            lo: a.min(b),
            hi: a.max(b)
        }),
    ]
}

fn arb_match() -> impl Strategy<Value = Match> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(6u8)), Just(Some(17u8))],
        arb_range(),
        arb_range(),
        prop_oneof![3 => Just(None), 1 => Just(Some(7u16))],
    )
        .prop_flat_map(|(v6, egress, proto, sport, dport, vlan)| {
            (arb_set(v6), arb_set(v6)).prop_map(move |(src, dst)| Match {
                direction: if egress {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                src,
                dst,
                proto,
                sport,
                dport,
                vlan,
            })
        })
}

fn arb_key() -> impl Strategy<Value = FlowKey> {
    (
        any::<bool>(),
        any::<bool>(),
        0u32..256,
        0u32..256,
        prop_oneof![Just(6u8), Just(17u8), Just(1u8)],
        0u16..8,
        0u16..8,
        any::<bool>(),
        prop_oneof![Just(crate::key::NO_VLAN), Just(7u16)],
    )
        .prop_map(|(v6, egress, s, d, proto, sport, dport, frag, vlan)| {
            let base: u128 = if v6 { 0x2001_0db8 << 96 } else { 0x0a00_0000 };
            FlowKey {
                dir: if egress {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                v6,
                src: base | s as u128,
                dst: base | d as u128,
                proto,
                sport,
                dport,
                ports_known: !frag,
                vlan,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn tuple_space_agrees_with_linear(
        rules in prop::collection::vec(arb_match(), 1..40),
        keys in prop::collection::vec(arb_key(), 64),
        from in 0u32..8,
    ) {
        let oracle = Linear::build(&rules);
        let tuples = TupleSpace::build(&rules);
        let forest = Forest::build(&rules);
        let tables = Forest::build_with(&rules, 0);
        let mut walks = Vec::new();
        for mode in [Walk::Avx512, Walk::Avx2, Walk::Scalar] {
            let mut f = Forest::build(&rules);
            if f.set_walk(mode) {
                walks.push(f);
            }
        }
        let mut all: Vec<&dyn Classifier> = vec![&tuples, &forest, &tables];
        all.extend(walks.iter().map(|f| f as &dyn Classifier));
        for fast in all {
            let mut batch = vec![0u32; keys.len()];
            fast.classify_batch(&keys, &mut batch);
            let mut small = vec![0u32; keys.len()];
            for (k, o) in keys.chunks(3).zip(small.chunks_mut(3)) {
                fast.classify_batch(k, o);
            }
            for ((k, b), s) in keys.iter().zip(&batch).zip(&small) {
                prop_assert_eq!(fast.first_match(k, 0), oracle.first_match(k, 0), "key {}", k);
                prop_assert_eq!(*b, oracle.first_match(k, 0));
                prop_assert_eq!(*s, oracle.first_match(k, 0));
                prop_assert_eq!(fast.first_match(k, from), oracle.first_match(k, from));
            }
        }
    }
}

/// Every walk this CPU runs, against the linear reference: bursts of each size in `bursts`, and
/// one key at a time from 0 and from `from`.
fn every_walk_agrees(
    rules: &[Match],
    keys: &[FlowKey],
    from: u32,
    bursts: &[usize],
) -> Result<(), TestCaseError> {
    let oracle = Linear::build(rules);
    for mode in [Walk::Avx512, Walk::Avx2, Walk::Scalar] {
        let mut forest = Forest::build(rules);
        if !forest.set_walk(mode) {
            continue;
        }
        for &burst in bursts {
            let mut out = vec![0u32; keys.len()];
            for (k, o) in keys.chunks(burst).zip(out.chunks_mut(burst)) {
                forest.classify_batch(k, o);
            }
            for (k, o) in keys.iter().zip(&out) {
                prop_assert_eq!(
                    *o,
                    oracle.first_match(k, 0),
                    "key {} walk {:?} burst {}",
                    k,
                    mode,
                    burst
                );
            }
        }
        for k in keys {
            prop_assert_eq!(
                forest.first_match(k, 0),
                oracle.first_match(k, 0),
                "key {}",
                k
            );
            prop_assert_eq!(
                forest.first_match(k, from),
                oracle.first_match(k, from),
                "key {}",
                k
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Sets large enough for the tree builder's sampled split choice (over 256 atoms in a node)
    /// and deep trees; bursts of 64 and of 17 (one full and one partial SIMD chunk), mixed and
    /// one-way.
    #[test]
    fn forest_agrees_with_linear_on_large_sets(
        rules in prop::collection::vec(arb_match(), 300..700),
        keys in prop::collection::vec(arb_key(), 128),
        from in 0u32..64,
    ) {
        every_walk_agrees(&rules, &keys, from, &[64, 17])?;
        // Bursts all IPv4 and one direction, as one receive queue gives them, take a path of
        // their own.
        let one_way: Vec<FlowKey> = keys
            .iter()
            .filter(|k| !k.v6)
            .map(|k| FlowKey { dir: Direction::Egress, ..*k })
            .collect();
        every_walk_agrees(&rules, &one_way, from, &[64])?;
    }
}

/// IPv4 prefixes spread over the top bits of the address space (eight /8s, a few /16s in
/// each), mostly /16 or longer with some short ones, so trees start with a cut table and some
/// atoms straddle slices.
/// An address spread over the top bits (`a` picks one of eight /8s), or, in one network
/// (`pod`), over the bits after 10.0.0.0/8, as a cluster's pod addresses are.
fn spread_addr(pod: bool, a: u32, b: u32, c: u32, d: u32) -> u128 {
    let bits = if pod {
        10 << 24 | (a * 32 + 1) << 16 | b << 8 | (c * 16 + d)
    } else {
        (a * 32 + 1) << 24 | b << 16 | c << 8 | d
    };
    bits as u128
}

fn arb_spread_prefix(pod: bool) -> impl Strategy<Value = Prefix> {
    // In one network, no prefix is shorter than the network's /8.
    let (long, short) = if pod {
        (24u8, 8u8..=16)
    } else {
        (16u8, 0u8..=12)
    };
    (
        0u32..8,
        0u32..4,
        0u32..4,
        prop_oneof![6 => long..=32, 1 => short],
    )
        .prop_map(move |(a, b, c, len)| {
            let bits = spread_addr(pod, a, b, c, 7);
            Prefix::new(crate::rule::bits_addr(false, bits), len).unwrap()
        })
}

fn arb_spread_match(pod: bool) -> impl Strategy<Value = Match> {
    (
        prop::collection::vec(arb_spread_prefix(pod), 0..3),
        prop::collection::vec(arb_spread_prefix(pod), 0..2),
        prop::collection::vec(arb_spread_prefix(pod), 0..2),
        prop_oneof![Just(None), Just(Some(6u8))],
        arb_range(),
    )
        .prop_map(|(src, except, dst, proto, dport)| {
            let mut x = Match::any(Direction::Ingress);
            x.src = AddrSet {
                include: src,
                except,
            };
            x.dst = AddrSet {
                include: dst,
                except: vec![],
            };
            x.proto = proto;
            x.dport = dport;
            x
        })
}

/// The rules that name sources, with any destination: one part, whose tree keeps its cut
/// table (a broad part would merge into it and copy its atoms into every slice).
fn only_sources(mut rules: Vec<Match>) -> Vec<Match> {
    rules.retain(|r| !r.src.include.is_empty());
    for r in &mut rules {
        r.dst = AddrSet {
            include: vec![],
            except: vec![],
        };
    }
    rules
}

fn arb_spread_key(pod: bool) -> impl Strategy<Value = FlowKey> {
    let addr = (0u32..8, 0u32..4, 0u32..4, 0u32..16)
        .prop_map(move |(a, b, c, d)| spread_addr(pod, a, b, c, d));
    (addr.clone(), addr, 0u16..8).prop_map(|(src, dst, dport)| FlowKey {
        src,
        dst,
        proto: 6,
        sport: 1,
        dport,
        ..key("10.0.0.1", "10.0.0.2", 6, 1, 1)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Trees that start with a cut table (the address parts of real rule sets are spread over
    /// the top bits): every walk, bursts and continuations, against the linear reference.
    #[test]
    fn forest_with_cut_tables_agrees_with_linear(
        rules in prop::collection::vec(arb_spread_match(false), 100..400),
        keys in prop::collection::vec(arb_spread_key(false), 128),
        from in 0u32..64,
        sources_only in any::<bool>(),
    ) {
        // With destinations too, the source- and destination-specific trees may merge into one
        // that has no cut; with sources only, the one part keeps its cut.
        let rules = if sources_only { only_sources(rules) } else { rules };
        every_walk_agrees(&rules, &keys, from, &[64])?;
    }

    /// The same in one network (every address in 10.0.0.0/8): the cut takes the bits after
    /// the ones all atoms share, and keys outside the network land in slices too.
    #[test]
    fn forest_with_cut_tables_in_one_network_agrees_with_linear(
        rules in prop::collection::vec(arb_spread_match(true), 100..400),
        keys in prop::collection::vec(
            prop_oneof![6 => arb_spread_key(true), 1 => arb_spread_key(false)],
            128,
        ),
        from in 0u32..64,
        sources_only in any::<bool>(),
    ) {
        let rules = if sources_only { only_sources(rules) } else { rules };
        every_walk_agrees(&rules, &keys, from, &[64])?;
    }
}

#[test]
fn spread_rule_sets_get_cut_tables() {
    // The strategies above must actually produce cuts, or their tests check nothing new: spread
    // over the top bits, and inside one /8.
    for pod in [false, true] {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let rules = only_sources(
            prop::collection::vec(arb_spread_match(pod), 300)
                .new_tree(&mut runner)
                .unwrap()
                .current(),
        );
        let cut = Forest::build(&rules)
            .tree_stats()
            .iter()
            .any(|t| t.cut_slices > 1);
        assert!(
            cut,
            "no tree of the spread set (one network: {pod}) starts with a cut"
        );
    }
}

#[test]
fn copies_counts_every_leaf_an_atom_is_in_and_stops_at_its_cap() {
    // `Tree::copies` decides which merges are not worth building: it must count at least the
    // leaves each atom already sits in (an atom is in every leaf whose box it meets, unless a
    // covering atom came first), and never more than its cap.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let rules = prop::collection::vec(arb_spread_match(false), 300)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    let mut atoms: Vec<Atom> = lower(&rules)
        .into_iter()
        .filter(|a| a.dir == 0 && !a.src.v6)
        .collect();
    atoms.sort_by_key(|a| a.prio);
    let tree = super::tree::Tree::build(&atoms, usize::MAX).unwrap();
    let entries = tree.stats.leaf_entries;
    assert!(entries > 10, "the set should fill some leaves");
    assert!(tree.copies(&atoms, usize::MAX) >= entries);
    assert_eq!(tree.copies(&atoms, 10), 10);
}

/// Port ranges and ports at both ends of the 16 bits, so the SIMD scans' compares meet values
/// near 0 and near 65,535.
fn arb_edge_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        arb_range(),
        (65_528u16..=65_535, 65_528u16..=65_535).prop_map(|(a, b)| PortRange {
            lo: a.min(b),
            hi: a.max(b)
        }),
        (0u16..8, 65_528u16..=65_535).prop_map(|(lo, hi)| PortRange { lo, hi }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// A block's scan (every width this CPU runs, and the scalar one) finds what testing its
    /// atoms' records one by one in priority order finds, below any `best`.
    #[test]
    fn block_scan_agrees_with_testing_every_record(
        rules in prop::collection::vec(
            (arb_match(), arb_edge_range(), arb_edge_range()).prop_map(|(mut m, s, d)| {
                m.sport = s;
                m.dport = d;
                m
            }),
            1..60,
        ),
        keys in prop::collection::vec(
            (arb_key(), prop_oneof![0u16..8, 65_528u16..=65_535], prop_oneof![0u16..8, 65_528u16..=65_535])
                .prop_map(|(k, s, d)| FlowKey { sport: s, dport: d, ..k }),
            32,
        ),
        bests in prop::collection::vec(0u32..70, 32),
    ) {
        let atoms: Vec<Atom> = lower(&rules)
            .into_iter()
            .filter(|a| !a.src.v6)
            .take(super::block::LINEAR_MAX)
            .collect();
        prop_assume!(!atoms.is_empty());
        let tree = super::tree::Tree::build(&atoms, usize::MAX).unwrap();
        let block = tree.block.as_ref().expect("at most LINEAR_MAX atoms get a block");
        let recs = tree.recs();
        for (k, &b) in keys.iter().zip(&bests) {
            let best = if b >= 64 { NO_MATCH } else { b };
            let v = super::tree::Tree::values(k);
            let want = recs
                .iter()
                .find(|r| r.prio < best && r.matches(&v))
                .map_or(best, |r| r.prio);
            prop_assert_eq!(super::block::scan(block, recs, &v, best), want);
            for mode in [Walk::Avx512, Walk::Avx2] {
                if super::simd::supported(mode) {
                    prop_assert_eq!(super::simd::scan_block(mode, block, recs, &v, best), want, "{:?}", mode);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// The SIMD transpositions write every key's values where `Keys::set` does, leave the
    /// positions past the burst 0, and flag a burst with an IPv6 key or a key of the other
    /// direction.
    #[test]
    fn transposed_keys_agree_with_setting_them_one_by_one(
        keys in prop::collection::vec(
            (arb_key(), any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>())
                .prop_map(|(k, s, d, sp, dp)| FlowKey {
                    src: if k.v6 { k.src } else { u128::from(s) },
                    dst: if k.v6 { k.dst } else { u128::from(d) },
                    sport: sp,
                    dport: dp,
                    ..k
                }),
            1..=64,
        ),
        dir in 0u8..2,
    ) {
        use super::tree::Keys;
        let mut want = Keys::zeroed();
        for (p, k) in keys.iter().enumerate() {
            want.set(p, k);
        }
        let mixed = keys.iter().any(|k| k.v6 || k.dir as u8 != dir);
        for mode in [Walk::Avx512, Walk::Avx2, Walk::Scalar] {
            if !super::simd::supported(mode) {
                continue;
            }
            let mut got = Keys::zeroed();
            prop_assert_eq!(super::simd::transpose(mode, &keys, &mut got, dir), mixed, "{:?}", mode);
            prop_assert_eq!(got.0, want.0, "{:?}", mode);
        }
    }
}

#[test]
fn atoms_that_share_one_address_build_and_agree() {
    // Every atom's source is the same host (a dimension whose atoms share all 32 bits offers no
    // cut), and every destination the same /24 (shared top bits, then a few to cut).
    let mut rules = Vec::new();
    for i in 0..64u16 {
        let mut r = m(&["10.1.2.3/32"], &[], Some(6), PortRange { lo: i, hi: i });
        r.dst = AddrSet {
            include: vec![p(&format!("10.9.8.{}/32", i % 16))],
            except: vec![],
        };
        rules.push(r);
    }
    rules.push(Match::any(Direction::Ingress));
    let oracle = Linear::build(&rules);
    let forest = Forest::build(&rules);
    for i in 0..80u16 {
        for host in ["10.1.2.3", "10.1.2.4"] {
            let k = key(host, &format!("10.9.8.{}", i % 20), 6, 1, i);
            assert_eq!(forest.first_match(&k, 0), oracle.first_match(&k, 0), "{k}");
        }
    }
}
