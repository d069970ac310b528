//! Criterion benchmarks of the classifier on the shared ClassBench sets: lookup (bursts of 64
//! over the whole trace, throughput in headers) and build, for the forest (the datapath
//! classifier), the tuple space and, for lookups on the 1k sets, the linear reference. Run with
//! `cargo bench -p policy`.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use policy::classbench::{read_filters, read_trace};
use policy::classify::{Classifier, Forest, Linear, TupleSpace};

fn data(set: &str) -> (Vec<policy::rule::Match>, Vec<policy::key::FlowKey>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/classbench");
    (
        read_filters(&dir.join(format!("{set}.filters")))
            .expect("shared ClassBench data beside the repository"),
        read_trace(&dir.join(format!("{set}.trace")))
            .expect("shared ClassBench data beside the repository"),
    )
}

const SETS: [&str; 9] = [
    "acl1_1k",
    "fw1_1k",
    "ipc1_1k",
    "acl1_10k",
    "fw1_10k",
    "ipc1_10k",
    "acl1_100k",
    "fw1_100k",
    "ipc1_100k",
];

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for set in SETS {
        let (rules, trace) = data(set);
        g.throughput(Throughput::Elements(trace.len() as u64));
        let forest = Forest::build(&rules);
        let tuples = TupleSpace::build(&rules);
        let mut out = vec![0u32; trace.len()];
        for (name, c) in [
            ("forest", &forest as &dyn Classifier),
            ("tuple-space", &tuples),
        ] {
            g.bench_with_input(BenchmarkId::new(name, set), &trace, |b, t| {
                b.iter(|| {
                    for (k, o) in t.chunks(64).zip(out.chunks_mut(64)) {
                        c.classify_batch(k, o);
                    }
                })
            });
        }
        if rules.len() < 2000 {
            let linear = Linear::build(&rules);
            g.sample_size(10);
            g.bench_with_input(BenchmarkId::new("linear", set), &trace, |b, t| {
                b.iter(|| {
                    for (k, o) in t.chunks(64).zip(out.chunks_mut(64)) {
                        linear.classify_batch(k, o);
                    }
                })
            });
            g.sample_size(100);
        }
    }
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("build");
    for set in SETS {
        let (rules, _) = data(set);
        g.throughput(Throughput::Elements(rules.len() as u64));
        g.bench_with_input(BenchmarkId::new("forest", set), &rules, |b, r| {
            b.iter(|| Forest::build(r))
        });
        g.bench_with_input(BenchmarkId::new("tuple-space", set), &rules, |b, r| {
            b.iter(|| TupleSpace::build(r))
        });
    }
    g.finish();
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
