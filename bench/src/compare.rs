//! `portcullis-bench compare-classifiers`: our tuple-space classifier against DPDK's rte_acl on
//! the same ClassBench sets, in one run. Both are checked against `.expected` on every header
//! first; then lookups are timed in interleaved repeats (so machine noise hits both alike) for
//! each burst size and each rte_acl method this CPU supports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use policy::classbench::{read_expected, read_filters, read_trace};
use policy::classify::{Classifier, Forest, TupleSpace, Walk, NO_MATCH};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// ClassBench set names (files <set>.filters/.trace/.expected in --data).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "acl1_1k,fw1_1k,ipc1_1k,acl1_10k,fw1_10k,ipc1_10k,acl1_100k,fw1_100k,ipc1_100k"
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
    /// Alternating pairs of short samples in each head-to-head (ours against rte_acl's best
    /// method, and AVX2 against AVX2); 0 skips them.
    #[arg(long, default_value_t = 40)]
    pairs: usize,
    /// Length of one head-to-head sample, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pair_ms: u64,
    /// Memory for DPDK's EAL, in MiB (`--no-huge -m`). The default sizes it to the largest set:
    /// rte_acl needs about 2 KiB per rule at 10k rules and more per rule above.
    #[arg(long)]
    dpdk_mem: Option<usize>,
}

/// One classifier under test.
trait Peer {
    fn name(&self) -> String;
    /// Prepares for a run (rte_acl: selects the method on the shared context).
    fn select(&mut self) {}
    fn run(&self, burst: usize, out: &mut [u32]);
}

struct Ours<'a> {
    name: &'static str,
    c: &'a dyn Classifier,
    keys: &'a [policy::key::FlowKey],
}

impl Peer for Ours<'_> {
    fn name(&self) -> String {
        self.name.into()
    }
    fn run(&self, burst: usize, out: &mut [u32]) {
        for (k, o) in self.keys.chunks(burst).zip(out.chunks_mut(burst)) {
            self.c.classify_batch(k, o);
        }
    }
}

#[cfg(has_dpdk)]
struct Dpdk<'a> {
    acl: std::rc::Rc<std::cell::RefCell<crate::dpdk::Acl>>,
    method: crate::dpdk::Method,
    keys: &'a [crate::dpdk::Tuple5],
}

#[cfg(has_dpdk)]
impl Peer for Dpdk<'_> {
    fn name(&self) -> String {
        format!("rte_acl {}", self.method.name())
    }
    fn select(&mut self) {
        // Checked when the peer was admitted; the same call cannot fail now.
        let _ = self.acl.borrow_mut().set_method(self.method);
    }
    fn run(&self, burst: usize, out: &mut [u32]) {
        let acl = self.acl.borrow();
        for (k, o) in self.keys.chunks(burst).zip(out.chunks_mut(burst)) {
            acl.classify(k, o);
        }
    }
}

fn walk_name(w: Walk) -> &'static str {
    match w {
        Walk::Avx512 => "portcullis forest (avx512)",
        Walk::Avx2 => "portcullis forest (avx2)",
        Walk::Scalar => "portcullis forest (scalar)",
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Lookups per second of one sample of about `ms` milliseconds.
fn rate(p: &mut dyn Peer, burst: usize, out: &mut [u32], ms: u64) -> f64 {
    p.select();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_millis(ms) {
        p.run(burst, out);
        n += out.len() as u64;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Peer `a`'s speed over peer `b`'s, head to head: `pairs` pairs of short samples, one of each
/// back to back (in turn which goes first). Both samples of a pair run under the same machine
/// conditions, so a pair's ratio is free of the swings (up to 2x on a shared VM, over seconds)
/// that move whole samples apart. Returns the median ratio and the quartiles.
fn head_to_head(
    peers: &mut [Box<dyn Peer + '_>],
    a: usize,
    b: usize,
    burst: usize,
    out: &mut [u32],
    pairs: usize,
    ms: u64,
) -> (f64, f64, f64) {
    let mut ratios = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (x, y) = if i % 2 == 0 {
            let x = rate(&mut *peers[a], burst, out, ms);
            (x, rate(&mut *peers[b], burst, out, ms))
        } else {
            let y = rate(&mut *peers[b], burst, out, ms);
            (rate(&mut *peers[a], burst, out, ms), y)
        };
        ratios.push(x / y);
    }
    ratios.sort_by(f64::total_cmp);
    let q = |f: usize| ratios[(ratios.len() - 1) * f / 4];
    (q(2), q(1), q(3))
}

struct Row {
    name: String,
    build_ms: f64,
    memory: usize,
    agree: usize,
}

/// EAL memory for the sets (MiB): rte_acl took 19 MiB for acl1_10k and over 114 MiB for
/// fw1_10k, and grows faster than the rule count, so leave room: 64 KiB per rule, at least 1 GiB,
/// at most half of this machine's memory. `--no-huge` memory is only touched as it is used.
#[cfg(has_dpdk)]
fn dpdk_mem_for(rules: usize) -> usize {
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(4096, |kib| kib / 1024);
    (rules * 64 / 1024).clamp(1024, (total_mib / 2).max(1024))
}

pub(crate) fn run(a: Args) -> Result<()> {
    if a.repeats == 0 || a.bursts.contains(&0) {
        bail!("--repeats and every --bursts value must be at least 1");
    }
    let mut sets = Vec::new();
    for set in &a.sets {
        let path = |ext: &str| a.data.join(format!("{set}.{ext}"));
        let rules = read_filters(&path("filters")).with_context(|| format!("set {set}"))?;
        let keys = read_trace(&path("trace")).with_context(|| format!("set {set}"))?;
        let expected = read_expected(&path("expected")).with_context(|| format!("set {set}"))?;
        if keys.len() != expected.len() {
            bail!(
                "{set}: the trace has {} headers but .expected has {}",
                keys.len(),
                expected.len()
            );
        }
        sets.push((set.clone(), rules, keys, expected));
    }
    #[cfg(has_dpdk)]
    let eal = {
        let largest = sets.iter().map(|s| s.1.len()).max().unwrap_or(0);
        let mem = a.dpdk_mem.unwrap_or_else(|| dpdk_mem_for(largest));
        crate::dpdk::eal_init(mem).map(|()| mem)
    };
    #[cfg(not(has_dpdk))]
    eprintln!("this portcullis-bench was built without DPDK (install dpdk-dev with scripts/deps and rebuild); only our classifiers are measured");

    println!("| set | rules | burst | classifier | lookups/s median [min-max] | ns/lookup | build | memory | forest ÷ this | agrees with .expected |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for (set, rules, keys, expected) in &sets {
        let check = |out: &[u32]| {
            out.iter()
                .zip(expected)
                .filter(|(r, e)| (if **r == NO_MATCH { -1 } else { **r as i64 }) == **e)
                .count()
        };
        #[cfg(has_dpdk)]
        let tuple5: Vec<crate::dpdk::Tuple5> =
            keys.iter().map(crate::dpdk::Tuple5::from_key).collect();
        let t = Instant::now();
        let forest = Forest::build(rules);
        let mut forest_builds = vec![t.elapsed().as_secs_f64() * 1e3];
        let t = Instant::now();
        let tuples = TupleSpace::build(rules);
        let tuples_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut rows = vec![
            Row {
                name: String::new(),
                build_ms: 0.0,
                memory: forest.memory_bytes(),
                agree: 0,
            },
            Row {
                name: String::new(),
                build_ms: tuples_ms,
                memory: tuples.memory_bytes(),
                agree: 0,
            },
        ];
        // The forest again with the narrower walks, so one machine shows each against rte_acl's
        // method of the same width. Each of those builds is timed too: the build column is the
        // median of the three (one build alone moves by 2x with this shared machine's phases).
        let narrower: Vec<Forest> = [Walk::Avx2, Walk::Scalar]
            .into_iter()
            .filter(|&w| w != forest.walk())
            .filter_map(|w| {
                let t = Instant::now();
                let mut f = Forest::build(rules);
                forest_builds.push(t.elapsed().as_secs_f64() * 1e3);
                f.set_walk(w).then_some(f)
            })
            .collect();
        forest_builds.sort_by(f64::total_cmp);
        let forest_ms = forest_builds[forest_builds.len() / 2];
        rows[0].build_ms = forest_ms;
        let mut peers: Vec<Box<dyn Peer + '_>> = vec![
            Box::new(Ours {
                name: walk_name(forest.walk()),
                c: &forest,
                keys,
            }),
            Box::new(Ours {
                name: "portcullis tuple-space",
                c: &tuples,
                keys,
            }),
        ];
        for f in &narrower {
            rows.push(Row {
                name: String::new(),
                build_ms: forest_ms,
                memory: f.memory_bytes(),
                agree: 0,
            });
            peers.push(Box::new(Ours {
                name: walk_name(f.walk()),
                c: f,
                keys,
            }));
        }
        let ours = peers.len();
        // Peers that cannot run: (name, why).
        let mut absent: Vec<(String, String)> = Vec::new();

        #[cfg(has_dpdk)]
        match &eal {
            Err(e) => absent.push(("rte_acl".into(), e.clone())),
            Ok(mem) => {
                let t = Instant::now();
                match crate::dpdk::Acl::build(&format!("pc-{set}"), rules) {
                    Err(e) => absent.push((
                        "rte_acl".into(),
                        format!("build failed: {e} (EAL memory {mem} MiB; raise --dpdk-mem)"),
                    )),
                    Ok(acl) => {
                        let build_ms = t.elapsed().as_secs_f64() * 1e3;
                        let memory = acl.memory;
                        let acl = std::rc::Rc::new(std::cell::RefCell::new(acl));
                        for method in crate::dpdk::Method::EXPLICIT {
                            if let Err(e) = acl.borrow_mut().set_method(method) {
                                absent.push((format!("rte_acl {}", method.name()), e));
                                continue;
                            }
                            rows.push(Row {
                                name: String::new(),
                                build_ms,
                                memory,
                                agree: 0,
                            });
                            peers.push(Box::new(Dpdk {
                                acl: acl.clone(),
                                method,
                                keys: &tuple5,
                            }));
                        }
                    }
                }
            }
        }

        let mut out = vec![0u32; keys.len()];
        for (p, row) in peers.iter_mut().zip(rows.iter_mut()) {
            p.select();
            p.run(64, &mut out);
            row.name = p.name();
            row.agree = check(&out);
            if row.agree != keys.len() {
                failures.push(format!(
                    "{set}: {} disagrees with .expected on {} of {} headers",
                    row.name,
                    keys.len() - row.agree,
                    keys.len()
                ));
            }
        }
        for &burst in &a.bursts {
            let mut samples = vec![Vec::new(); peers.len()];
            for _ in 0..a.repeats {
                for (i, p) in peers.iter_mut().enumerate() {
                    samples[i].push(rate(&mut **p, burst, &mut out, a.ms));
                }
            }
            let medians: Vec<f64> = samples.iter().map(|s| median(&mut s.clone())).collect();
            for ((row, s), m) in rows.iter().zip(&samples).zip(&medians) {
                let (min, max) = (
                    s.iter().copied().fold(f64::MAX, f64::min),
                    s.iter().copied().fold(0.0, f64::max),
                );
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
                    medians[0] / m,
                    row.agree,
                    keys.len()
                );
            }
            for (name, why) in &absent {
                println!(
                    "| {set} | {} | {burst} | {name} | not run: {why} | | | | | |",
                    rules.len()
                );
            }
            // Against rte_acl's best method at this burst, and its memory.
            if let Some((i, m)) = medians
                .iter()
                .enumerate()
                .skip(ours)
                .max_by(|x, y| x.1.total_cmp(y.1))
            {
                // Our AVX2 walk against rte_acl's AVX2 method: the comparison on AVX2-only CPUs.
                let find = |name: &str| rows.iter().position(|r| r.name == name);
                let avx2 = find(walk_name(Walk::Avx2)).zip(find("rte_acl avx2"));
                let pair = |peers: &mut Vec<Box<dyn Peer + '_>>,
                            x: usize,
                            y: usize,
                            out: &mut Vec<u32>| {
                    if a.pairs == 0 {
                        return "-".to_string();
                    }
                    let (m, lo, hi) = head_to_head(peers, x, y, burst, out, a.pairs, a.pair_ms);
                    format!("{m:.2} [{lo:.2}-{hi:.2}]")
                };
                let best_paired = pair(&mut peers, 0, i, &mut out);
                let (avx2_medians, avx2_paired) = match avx2 {
                    Some((x, y)) => (
                        format!("{:.2}", medians[x] / medians[y]),
                        pair(&mut peers, x, y, &mut out),
                    ),
                    None => ("n/a".into(), "n/a".into()),
                };
                summary.push(format!(
                    "| {set} | {burst} | {:.2} M | {} {:.2} M | {:.2} | {best_paired} | {avx2_medians} | {avx2_paired} | {:.1} % | {:.1} % |",
                    medians[0] / 1e6,
                    rows[i].name,
                    m / 1e6,
                    medians[0] / m,
                    100.0 * rows[0].build_ms / rows[i].build_ms,
                    100.0 * rows[0].memory as f64 / rows[i].memory as f64
                ));
            }
        }
    }
    if !summary.is_empty() {
        println!();
        println!("| set | burst | forest | rte_acl's best method here | forest ÷ best (medians) | forest ÷ best, head to head: median [quartiles] | forest avx2 ÷ rte_acl avx2 (medians) | avx2 ÷ avx2, head to head | build, % of rte_acl's | memory, % of rte_acl's |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for l in &summary {
            println!("{l}");
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
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
    /// `ours` (the forest), `tuple-space`, or `rte_acl:METHOD` (default, scalar, sse, avx2,
    /// avx512x16, avx512x32).
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
    let forest;
    let tuples;
    #[cfg(has_dpdk)]
    let tuple5: Vec<crate::dpdk::Tuple5> = keys.iter().map(crate::dpdk::Tuple5::from_key).collect();
    let mut peer: Box<dyn Peer + '_>;
    match a.peer.split_once(':') {
        None if a.peer == "ours" => {
            forest = Forest::build(&rules);
            peer = Box::new(Ours {
                name: "portcullis forest",
                c: &forest,
                keys: &keys,
            });
        }
        None if a.peer == "tuple-space" => {
            tuples = TupleSpace::build(&rules);
            peer = Box::new(Ours {
                name: "portcullis tuple-space",
                c: &tuples,
                keys: &keys,
            });
        }
        #[cfg(has_dpdk)]
        Some(("rte_acl", m)) => {
            let method = crate::dpdk::Method::ALL
                .into_iter()
                .find(|x| x.name() == m)
                .with_context(|| format!("unknown rte_acl method `{m}`"))?;
            crate::dpdk::eal_init(dpdk_mem_for(rules.len())).map_err(anyhow::Error::msg)?;
            let mut acl =
                crate::dpdk::Acl::build("pc-passes", &rules).map_err(anyhow::Error::msg)?;
            acl.set_method(method).map_err(anyhow::Error::msg)?;
            peer = Box::new(Dpdk {
                acl: std::rc::Rc::new(std::cell::RefCell::new(acl)),
                method,
                keys: &tuple5,
            });
        }
        _ => bail!("--peer must be `ours`, `tuple-space` or `rte_acl:METHOD` (rte_acl needs a build with DPDK)"),
    }
    peer.select();
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
