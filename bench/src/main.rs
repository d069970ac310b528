//! `portcullis-bench`: benchmarks of the classifier, the datapath, forwarding, policy latency.

/// mimalloc: the control thread's compile and classifier build allocate many small vectors, and
/// glibc's malloc and free were a quarter of that time (`perf` on `kube-latency` at 10k rules).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use policy::classbench::{read_expected, read_filters, read_trace};
use policy::classify::{Classifier, Forest, Linear, NO_MATCH};
use policy::key::FlowKey;

#[derive(Parser)]
#[command(name = "portcullis-bench", version, about = "Portcullis benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Classify a ClassBench trace against a filter set: prints the first-matching rule index for
    /// each header (0-based, -1 for none), then lookups/s and build time for the datapath
    /// classifier (the forest) and the linear reference, and the agreement with `--expected`.
    Classify {
        #[arg(long)]
        rules: PathBuf,
        #[arg(long)]
        trace: PathBuf,
        #[arg(long)]
        expected: Option<PathBuf>,
        /// Burst size for batch classification.
        #[arg(long, default_value_t = 64)]
        burst: usize,
        /// Minimum measuring time per classifier, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        min_ms: u64,
        /// Do not print the per-header indices.
        #[arg(long)]
        quiet: bool,
    },
    /// Our classifier against DPDK's rte_acl (every method this CPU supports) on the same
    /// ClassBench sets, in one run: lookups/s, ns/lookup, build time, memory, ratio, agreement.
    CompareClassifiers(compare::Args),
    /// Classify a trace N times with one classifier (for instruction counts under callgrind).
    ClassifyPasses(compare::PassesArgs),
    /// AF_XDP traffic generator: Ethernet/IPv4/UDP flows with sequence numbers and timestamps.
    Gen(traffic::GenArgs),
    /// AF_XDP sink: per-flow loss and reordering, latency percentiles, as JSON.
    Sink(traffic::SinkArgs),
    /// A plain AF_XDP forwarder without rules: the ceiling for `compare`.
    ForwardPlain(traffic::PlainArgs),
    /// Build the lab and run the same traffic through Portcullis, the plain forwarder, kernel
    /// forwarding, nftables (linear and set), iptables-legacy and xdp-filter; print a table.
    Compare(harness::Args),
    /// Drive the kernel's pktgen (where /proc/net/pktgen exists).
    Pktgen(traffic::PktgenArgs),
    /// Forwarding throughput in the namespace lab: UDP floods from the client through a
    /// busy-polling gateway to the server; rates come from the gateway's own counters.
    LabForward(forward::Args),
    /// Policy change to datapath latency through the Kubernetes source, at given rule counts.
    KubeLatency(kube_latency::Args),
    /// ns/packet of the whole userspace path (parse, tracker, classifier on a miss, counters)
    /// over in-memory rings: established flows, new flows, a mix, and without the tracker.
    Datapath(datapath::Args),
    /// The gateway under traffic, 1,000+ table swaps, policy churn and metrics scrapes for N
    /// minutes, in the namespace lab: exact accounting and flat resident memory, or it fails.
    Soak(soak::Args),
}

fn index(v: u32) -> i64 {
    if v == NO_MATCH {
        -1
    } else {
        v as i64
    }
}

/// Classifies the whole trace repeatedly for at least `min`; returns (lookups/s, results).
fn measure(c: &dyn Classifier, trace: &[FlowKey], burst: usize, min: Duration) -> (f64, Vec<u32>) {
    let mut out = vec![0u32; trace.len()];
    let started = Instant::now();
    let mut lookups = 0u64;
    loop {
        for (keys, res) in trace.chunks(burst).zip(out.chunks_mut(burst)) {
            c.classify_batch(keys, res);
        }
        lookups += trace.len() as u64;
        if started.elapsed() >= min {
            break;
        }
    }
    (lookups as f64 / started.elapsed().as_secs_f64(), out)
}

mod compare;
mod datapath;
#[cfg(has_dpdk)]
#[allow(unsafe_code)]
mod dpdk;
mod forward;
mod harness;
mod kube_latency;
mod soak;
mod traffic;
#[allow(unsafe_code)]
mod xsk;

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::LabForward(a) => forward::run(a),
        Cmd::KubeLatency(a) => kube_latency::run(a),
        Cmd::Datapath(a) => datapath::main(a),
        Cmd::Soak(a) => soak::run(a),
        Cmd::Gen(a) => traffic::gen(a),
        Cmd::Sink(a) => traffic::sink(a),
        Cmd::Pktgen(a) => traffic::pktgen(a),
        Cmd::ForwardPlain(a) => traffic::plain(a),
        Cmd::Compare(a) => harness::run(a),
        Cmd::CompareClassifiers(a) => compare::run(a),
        Cmd::ClassifyPasses(a) => compare::passes(a),
        Cmd::Classify {
            rules,
            trace,
            expected,
            burst,
            min_ms,
            quiet,
        } => {
            if burst == 0 {
                bail!("--burst must be at least 1");
            }
            let matches = read_filters(&rules)?;
            let keys = read_trace(&trace)?;
            let expected = expected.map(|p| read_expected(&p)).transpose()?;
            let t = Instant::now();
            let fast = Forest::build(&matches);
            let build_fast = t.elapsed();
            let t = Instant::now();
            let linear = Linear::build(&matches);
            let build_linear = t.elapsed();
            let min = Duration::from_millis(min_ms);
            let (fast_rate, results) = measure(&fast, &keys, burst, min);
            let (linear_rate, linear_results) = measure(&linear, &keys, burst, min / 4);
            if !quiet {
                let mut s = String::with_capacity(keys.len() * 6);
                for r in &results {
                    s.push_str(&index(*r).to_string());
                    s.push('\n');
                }
                print!("{s}");
            }
            let stats = fast.stats();
            println!(
                "# set: {} rules, {} headers, burst {burst}",
                matches.len(),
                keys.len()
            );
            println!(
                "# forest ({} walk): {:.2} M lookups/s ({:.0} ns/lookup), build {:.2} ms, {} bytes, {} trees ({} starting with a cut table, {} with a linear block) of {} nodes (depth {} after it), {} leaves ({} with several atoms), {} atoms in tables",
                fast.walk().name(),
                fast_rate / 1e6,
                1e9 / fast_rate,
                build_fast.as_secs_f64() * 1e3,
                fast.memory_bytes(),
                stats.trees,
                stats.cut_trees,
                stats.block_trees,
                stats.tree_nodes,
                stats.max_depth,
                stats.leaves,
                stats.multi_leaves,
                stats.table_atoms
            );
            println!(
                "# linear reference: {:.3} M lookups/s ({:.0} ns/lookup), build {:.2} ms; the forest is {:.0}x faster",
                linear_rate / 1e6,
                1e9 / linear_rate,
                build_linear.as_secs_f64() * 1e3,
                fast_rate / linear_rate
            );
            let disagree_linear = results
                .iter()
                .zip(&linear_results)
                .filter(|(a, b)| a != b)
                .count();
            println!(
                "# forest vs linear: {} of {} disagree",
                disagree_linear,
                keys.len()
            );
            if let Some(exp) = expected {
                if exp.len() != keys.len() {
                    bail!(
                        "--expected has {} lines but the trace has {}",
                        exp.len(),
                        keys.len()
                    );
                }
                let agree = results
                    .iter()
                    .zip(&exp)
                    .filter(|(r, e)| index(**r) == **e)
                    .count();
                println!("# agreement with expected: {agree} of {}", exp.len());
                if agree != exp.len() || disagree_linear != 0 {
                    bail!("the classifier disagrees with the expected results");
                }
            }
            Ok(())
        }
    }
}
