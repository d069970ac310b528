//! `portcullis-bench compare-classifiers`: our tuple-space classifier against DPDK's rte_acl on
//! the same ClassBench sets, in one run. Both are checked against `.expected` on every header
//! first; then lookups are timed in interleaved repeats (so machine noise hits both alike) for
//! each burst size and each rte_acl method this CPU supports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use policy::classbench::{read_expected, read_filters, read_trace};
use policy::classify::{Classifier, TupleSpace, NO_MATCH};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// ClassBench set names (files <set>.filters/.trace/.expected in --data).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "acl1_1k,fw1_1k,ipc1_1k,acl1_10k"
    )]
    sets: Vec<String>,
    #[arg(long, default_value = "../shared/data/classbench")]
    data: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    bursts: Vec<usize>,
    /// Timed samples per classifier and burst size.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Length of one sample, in milliseconds.
    #[arg(long, default_value_t = 200)]
    ms: u64,
}

/// One classifier under test.
trait Peer {
    fn name(&self) -> String;
    fn run(&self, burst: usize, out: &mut [u32]);
}

struct Ours<'a> {
    c: &'a TupleSpace,
    keys: &'a [policy::key::FlowKey],
}

impl Peer for Ours<'_> {
    fn name(&self) -> String {
        "portcullis tuple-space".into()
    }
    fn run(&self, burst: usize, out: &mut [u32]) {
        for (k, o) in self.keys.chunks(burst).zip(out.chunks_mut(burst)) {
            self.c.classify_batch(k, o);
        }
    }
}

#[cfg(has_dpdk)]
struct Dpdk<'a> {
    acl: crate::dpdk::Acl,
    method: crate::dpdk::Method,
    keys: &'a [crate::dpdk::Tuple5],
}

#[cfg(has_dpdk)]
impl Peer for Dpdk<'_> {
    fn name(&self) -> String {
        format!("rte_acl {}", self.method.name())
    }
    fn run(&self, burst: usize, out: &mut [u32]) {
        for (k, o) in self.keys.chunks(burst).zip(out.chunks_mut(burst)) {
            self.acl.classify(k, o);
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    name: String,
    build_ms: f64,
    memory: usize,
    agree: usize,
}

pub(crate) fn run(a: Args) -> Result<()> {
    if a.repeats == 0 || a.bursts.contains(&0) {
        bail!("--repeats and every --bursts value must be at least 1");
    }
    println!("| set | rules | burst | classifier | lookups/s median [min-max] | ns/lookup | build | memory | ours ÷ this | agrees with .expected |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for set in &a.sets {
        let path = |ext: &str| a.data.join(format!("{set}.{ext}"));
        let rules = read_filters(&path("filters")).with_context(|| format!("set {set}"))?;
        let keys = read_trace(&path("trace"))?;
        let expected = read_expected(&path("expected"))?;
        let check = |out: &[u32]| {
            out.iter()
                .zip(&expected)
                .filter(|(r, e)| (if **r == NO_MATCH { -1 } else { **r as i64 }) == **e)
                .count()
        };

        #[cfg(has_dpdk)]
        let tuples: Vec<crate::dpdk::Tuple5> =
            keys.iter().map(crate::dpdk::Tuple5::from_key).collect();
        let t = Instant::now();
        let ours = TupleSpace::build(&rules);
        let mut rows = vec![Row {
            name: String::new(),
            build_ms: t.elapsed().as_secs_f64() * 1e3,
            memory: ours.memory_bytes(),
            agree: 0,
        }];
        let mut peers: Vec<Box<dyn Peer + '_>> = vec![Box::new(Ours {
            c: &ours,
            keys: &keys,
        })];

        // Start DPDK's EAL before any build is timed.
        #[cfg(has_dpdk)]
        crate::dpdk::eal_init().map_err(anyhow::Error::msg)?;
        #[cfg(has_dpdk)]
        for method in crate::dpdk::Method::ALL {
            let t = Instant::now();
            let mut acl = crate::dpdk::Acl::build(&format!("pc-{set}-{}", method.name()), &rules)
                .map_err(anyhow::Error::msg)?;
            let build_ms = t.elapsed().as_secs_f64() * 1e3;
            if let Err(e) = acl.set_method(method) {
                eprintln!("{set}: {e}; skipped");
                continue;
            }
            rows.push(Row {
                name: String::new(),
                build_ms,
                memory: acl.memory,
                agree: 0,
            });
            peers.push(Box::new(Dpdk {
                acl,
                method,
                keys: &tuples,
            }));
        }
        #[cfg(not(has_dpdk))]
        eprintln!("this portcullis-bench was built without DPDK (install dpdk-dev with scripts/deps and rebuild); only our classifier is measured");

        let mut out = vec![0u32; keys.len()];
        for (p, row) in peers.iter().zip(rows.iter_mut()) {
            p.run(64, &mut out);
            row.name = p.name();
            row.agree = check(&out);
            if row.agree != keys.len() {
                bail!(
                    "{set}: {} disagrees with .expected on {} of {} headers",
                    row.name,
                    keys.len() - row.agree,
                    keys.len()
                );
            }
        }
        for &burst in &a.bursts {
            let mut samples = vec![Vec::new(); peers.len()];
            for _ in 0..a.repeats {
                for (i, p) in peers.iter().enumerate() {
                    let started = Instant::now();
                    let mut n = 0u64;
                    while started.elapsed() < Duration::from_millis(a.ms) {
                        p.run(burst, &mut out);
                        n += keys.len() as u64;
                    }
                    samples[i].push(n as f64 / started.elapsed().as_secs_f64());
                }
            }
            let ours_median = median(&mut samples[0].clone());
            for (row, s) in rows.iter().zip(samples.iter_mut()) {
                let (min, max) = (
                    s.iter().copied().fold(f64::MAX, f64::min),
                    s.iter().copied().fold(0.0, f64::max),
                );
                let m = median(s);
                println!(
                    "| {set} | {} | {burst} | {} | {:.2} M [{:.2}-{:.2}] | {:.0} | {:.2} ms | {} KiB | {:.2} | {} / {} |",
                    rules.len(),
                    row.name,
                    m / 1e6,
                    min / 1e6,
                    max / 1e6,
                    1e9 / m,
                    row.build_ms,
                    row.memory / 1024,
                    ours_median / m,
                    row.agree,
                    keys.len()
                );
            }
        }
    }
    Ok(())
}

/// `portcullis-bench classify-passes`: builds one classifier and classifies the whole trace
/// `passes` times in bursts. Run under callgrind with two pass counts; the difference in
/// instructions divided by the extra lookups is the instruction count per lookup, free of build
/// and start-up costs (`scripts/callgrind-classifiers` does exactly that).
#[derive(clap::Args)]
pub(crate) struct PassesArgs {
    #[arg(long)]
    set: String,
    #[arg(long, default_value = "../shared/data/classbench")]
    data: PathBuf,
    /// `ours`, or `rte_acl:METHOD` (default, scalar, sse, avx2, avx512x16, avx512x32).
    #[arg(long)]
    peer: String,
    #[arg(long, default_value_t = 64)]
    burst: usize,
    #[arg(long, default_value_t = 1)]
    passes: usize,
}

pub(crate) fn passes(a: PassesArgs) -> Result<()> {
    if a.burst == 0 {
        bail!("--burst must be at least 1");
    }
    let rules = read_filters(&a.data.join(format!("{}.filters", a.set)))?;
    let keys = read_trace(&a.data.join(format!("{}.trace", a.set)))?;
    let mut out = vec![0u32; keys.len()];
    let ours;
    #[cfg(has_dpdk)]
    let tuples: Vec<crate::dpdk::Tuple5> = keys.iter().map(crate::dpdk::Tuple5::from_key).collect();
    let peer: Box<dyn Peer + '_>;
    match a.peer.split_once(':') {
        None if a.peer == "ours" => {
            ours = TupleSpace::build(&rules);
            peer = Box::new(Ours {
                c: &ours,
                keys: &keys,
            });
        }
        #[cfg(has_dpdk)]
        Some(("rte_acl", m)) => {
            let method = crate::dpdk::Method::ALL
                .into_iter()
                .find(|x| x.name() == m)
                .with_context(|| format!("unknown rte_acl method `{m}`"))?;
            let mut acl =
                crate::dpdk::Acl::build("pc-passes", &rules).map_err(anyhow::Error::msg)?;
            acl.set_method(method).map_err(anyhow::Error::msg)?;
            peer = Box::new(Dpdk {
                acl,
                method,
                keys: &tuples,
            });
        }
        _ => bail!("--peer must be `ours` or `rte_acl:METHOD` (rte_acl needs a build with DPDK)"),
    }
    for _ in 0..a.passes {
        peer.run(a.burst, &mut out);
    }
    println!(
        "{} lookups by {}; checksum {}",
        a.passes * keys.len(),
        peer.name(),
        out.iter().map(|&x| x as u64).sum::<u64>()
    );
    Ok(())
}
