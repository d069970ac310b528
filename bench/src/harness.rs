//! `portcullis-bench compare`: the same traffic through every peer, in one run.
//!
//! Each sample builds a fresh namespace lab, sets one peer up in the gateway namespace, starts
//! the AF_XDP sink on the server side and the AF_XDP generator on the client side (64-byte UDP,
//! 16 flows, as fast as it goes), and reads back what arrived. The rule set every peer gets is
//! the edge's bread and butter that all of them can express: N client addresses to deny (none of
//! them the generator's), then allow.
//!
//! Placement on a 2-core VM: the generator and the sink share core 0; the forwarding work gets
//! core 1 (Portcullis and the plain forwarder are pinned there; for kernel forwarding, RPS moves
//! the receive work of `ext` to core 1). Portcullis and the plain forwarder are L2 bumps in the
//! wire; the kernel peers route between two subnets (their netfilter hooks are in the forward
//! path there).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::{sh, GatewayProcess, Lab, LabGuard, CLIENT_MAC, EXT_MAC, INT_MAC, SERVER_MAC};
use serde::Serialize;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Rules for Portcullis and the rule-taking peers (Portcullis also runs with 0).
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Length of one traffic run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Peers to run (default: all): plain, portcullis-0, portcullis, portcullis-stateless,
    /// kernel, nft-linear, nft-set, iptables-legacy, xdp-filter.
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    #[arg(long, default_value = "pcmp")]
    prefix: String,
    /// Where compare.json and compare.svg go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    #[arg(long, default_value = "configs/lab/gateway.yaml")]
    config: PathBuf,
    /// Run a ClassBench set instead of the deny list: Portcullis gets its filters as
    /// GatewayPolicy rules (Allow, in order), nftables and iptables-legacy the same rules
    /// linearly (accept, then drop), and the generator replays the set's trace (its TCP and UDP
    /// headers). Peers that cannot express 5-tuple rules (nft-set, xdp-filter) are left out.
    #[arg(long)]
    classbench: Option<String>,
    /// Where the ClassBench sets are.
    #[arg(long, default_value = "../shared/data/classbench")]
    data: PathBuf,
    /// Filled in by `run` from --rules or --classbench.
    #[arg(skip)]
    source: RuleSource,
}

impl Default for RuleSource {
    fn default() -> Self {
        RuleSource::DenyList(0)
    }
}

/// The rules every peer gets.
enum RuleSource {
    /// N client addresses to deny, then allow.
    DenyList(usize),
    /// A ClassBench filter set, every filter an Allow, then the default deny.
    ClassBench {
        name: String,
        rules: Vec<policy::rule::Match>,
        trace: PathBuf,
    },
}

impl RuleSource {
    fn count(&self) -> usize {
        match self {
            RuleSource::DenyList(n) => *n,
            RuleSource::ClassBench { rules, .. } => rules.len(),
        }
    }
}

/// A ClassBench filter as one rule per protocol it can carry ports for: a filter on any
/// protocol with port ranges matches TCP and UDP (the replayed traffic) with those ports.
/// Returns (protocol number or none, source CIDR, destination CIDR, source ports, destination
/// ports) with ports `None` for any.
type Flat = (
    Option<u8>,
    String,
    String,
    Option<(u16, u16)>,
    Option<(u16, u16)>,
);

fn flatten(m: &policy::rule::Match) -> Vec<Flat> {
    let cidr = |a: &policy::rule::AddrSet| {
        a.include
            .first()
            .map_or("0.0.0.0/0".to_string(), |p| p.to_string())
    };
    let ports =
        |r: policy::rule::PortRange| (!(r.lo == 0 && r.hi == u16::MAX)).then_some((r.lo, r.hi));
    let (sp, dp) = (ports(m.sport), ports(m.dport));
    let protos: Vec<Option<u8>> = match m.proto {
        Some(p) => vec![Some(p)],
        None if sp.is_some() || dp.is_some() => vec![Some(6), Some(17)],
        None => vec![None],
    };
    protos
        .into_iter()
        .map(|p| (p, cidr(&m.src), cidr(&m.dst), sp, dp))
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
enum Peer {
    Plain,
    /// Portcullis with `n` rules, its connection tracker on.
    Portcullis(usize),
    /// The same without the tracker: every packet classified (the gateway before it was
    /// stateful).
    PortcullisStateless(usize),
    Kernel,
    NftLinear(usize),
    NftSet(usize),
    Iptables(usize),
    XdpFilter(usize),
}

impl Peer {
    fn name(&self) -> String {
        match self {
            Peer::Plain => "plain AF_XDP forwarder (no rules)".into(),
            Peer::Portcullis(n) => format!("portcullis, {n} rules"),
            Peer::PortcullisStateless(n) => format!("portcullis, {n} rules, no tracker"),
            Peer::Kernel => "kernel forwarding (no rules)".into(),
            Peer::NftLinear(n) => format!("nftables, {n} linear rules"),
            Peer::NftSet(n) => format!("nftables, set of {n}"),
            Peer::Iptables(n) => format!("iptables-legacy, {n} linear rules"),
            Peer::XdpFilter(n) => format!("xdp-filter, {n} addresses + kernel forwarding"),
        }
    }

    fn routed(&self) -> bool {
        !matches!(
            self,
            Peer::Plain | Peer::Portcullis(_) | Peer::PortcullisStateless(_)
        )
    }
}

/// The i-th denied client address (100.64.0.0/10, never the generator's).
fn denied(i: usize) -> String {
    format!("100.{}.{}.{}", 64 + (i >> 16) % 64, (i >> 8) & 255, i & 255)
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    sent: u64,
    received: u64,
    mpps: f64,
    p50_ns: u64,
    p99_ns: u64,
    /// CPU time used on core 1 (the forwarding core: busy pollers, RPS, softirq) per forwarded
    /// packet, from /proc/stat.
    core_ns_per_packet: f64,
    /// Portcullis only: the workers' own busy time (turns that moved frames) per forwarded
    /// packet, which busy polling does not inflate.
    worker_ns_per_packet: Option<f64>,
}

/// Core 1's (busy, total) time in USER_HZ ticks, from /proc/stat.
fn core1_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu1 "))
        .context("no cpu1 line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// The sum of `portcullis_busy_nanoseconds_total` over the workers.
fn worker_busy_ns(gw: &GatewayProcess) -> Option<u64> {
    let (code, text) = gw.get("/metrics").ok()?;
    (code == 200).then(|| {
        text.lines()
            .filter(|l| l.starts_with("portcullis_busy_nanoseconds_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    })
}

#[derive(Debug, Serialize)]
struct PeerResult {
    peer: String,
    samples: Vec<Sample>,
    median_mpps: f64,
    min_mpps: f64,
    max_mpps: f64,
    ratio_to_plain: f64,
    p50_ns: u64,
    p99_ns: u64,
    loss_pct: f64,
    core_ns_per_packet: f64,
    worker_ns_per_packet: Option<f64>,
}

fn netns(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    Ok(sh(&v)?)
}

/// Re-addresses the lab for routing: client 10.98.1.1/24 and server 10.98.2.1/24 behind the
/// gateway's ext 10.98.1.254 and int 10.98.2.254, static neighbours, forwarding on, and RPS
/// moving ext's receive work to core 1.
fn route(lab: &Lab) -> Result<()> {
    let (c, g, s) = (lab.client_ns(), lab.gw_ns(), lab.server_ns());
    let (c0, s0, ext, int) = (lab.client_if(), lab.server_if(), lab.ext(), lab.int());
    for (ns, dev, addr, gw, gw_mac) in [
        (&c, &c0, "10.98.1.1/24", "10.98.1.254", EXT_MAC),
        (&s, &s0, "10.98.2.1/24", "10.98.2.254", INT_MAC),
    ] {
        sh(&["ip", "-n", ns, "addr", "flush", "dev", dev])?;
        sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
        sh(&["ip", "-n", ns, "route", "add", "default", "via", gw])?;
        sh(&[
            "ip",
            "-n",
            ns,
            "neigh",
            "replace",
            gw,
            "lladdr",
            gw_mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    sh(&["ip", "-n", &g, "addr", "add", "10.98.1.254/24", "dev", &ext])?;
    sh(&["ip", "-n", &g, "addr", "add", "10.98.2.254/24", "dev", &int])?;
    sh(&[
        "ip",
        "-n",
        &g,
        "neigh",
        "replace",
        "10.98.1.1",
        "lladdr",
        CLIENT_MAC,
        "dev",
        &ext,
        "nud",
        "permanent",
    ])?;
    sh(&[
        "ip",
        "-n",
        &g,
        "neigh",
        "replace",
        "10.98.2.1",
        "lladdr",
        SERVER_MAC,
        "dev",
        &int,
        "nud",
        "permanent",
    ])?;
    netns(&g, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // ClassBench traffic has any addresses: route them all to the server, and take sources
    // from anywhere on ext.
    sh(&[
        "ip",
        "-n",
        &g,
        "route",
        "add",
        "default",
        "via",
        "10.98.2.1",
    ])?;
    for k in ["all", "default", ext.as_str()] {
        netns(
            &g,
            &["sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")],
        )?;
    }
    netns(
        &g,
        &[
            "sh",
            "-c",
            &format!("echo 2 > /sys/class/net/{ext}/queues/rx-0/rps_cpus"),
        ],
    )?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Sets a peer up in the gateway namespace; returns processes to stop afterwards.
fn setup(
    peer: &Peer,
    lab: &Lab,
    a: &Args,
    dir: &Path,
    bench: &Path,
) -> Result<(Option<GatewayProcess>, Option<Child>)> {
    let g = lab.gw_ns();
    let deny_policy = |n: usize| -> String {
        let mut s = String::from("apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: bench}\nspec:\n  ingress:\n");
        for i in 0..n {
            s.push_str(&format!(
                "    - {{action: Deny, source: {{nets: [{}]}}}}\n",
                denied(i)
            ));
        }
        s.push_str("    - {action: Allow, protocol: UDP, destination: {ports: [9]}}\n");
        s
    };
    let classbench_policy = |rules: &[policy::rule::Match]| -> String {
        let mut s = String::from("apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: classbench}\nspec:\n  ingress:\n");
        let ports = |p: Option<(u16, u16)>| {
            p.map_or(String::new(), |(lo, hi)| {
                if lo == hi {
                    format!(", ports: [{lo}]")
                } else {
                    format!(", ports: [\"{lo}-{hi}\"]")
                }
            })
        };
        for m in rules {
            for (proto, src, dst, sp, dp) in flatten(m) {
                let proto = proto.map_or(String::new(), |p| format!(", protocol: {p}"));
                s.push_str(&format!(
                    "    - {{action: Allow{proto}, source: {{nets: [{src}]{}}}, destination: {{nets: [{dst}]{}}}}}\n",
                    ports(sp),
                    ports(dp)
                ));
            }
        }
        s
    };
    match peer {
        Peer::Plain => {
            let mut child = lab::netns_command(&g, bench)
                .args([
                    "forward-plain",
                    "--ext",
                    &lab.ext(),
                    "--int",
                    &lab.int(),
                    "--core",
                    "1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            wait_line(
                child.stderr.take().context("stderr")?,
                "ready",
                Duration::from_secs(10),
            )?;
            Ok((None, Some(child)))
        }
        Peer::Portcullis(n) | Peer::PortcullisStateless(n) => {
            let policies = dir.join("policies");
            std::fs::create_dir_all(&policies)?;
            let text = match &a.source {
                RuleSource::ClassBench { rules, .. } if *n > 0 => classbench_policy(rules),
                _ => deny_policy(*n),
            };
            write(&policies.join("bench.yaml"), &text)?;
            let cfg = dir.join("gateway.yaml");
            lab.write_config(&a.config, &policies, &cfg)?;
            let mut v: serde_norway::Value =
                serde_norway::from_str(&std::fs::read_to_string(&cfg)?)?;
            let m = v.as_mapping_mut().context("config is a mapping")?;
            m.insert("cores".into(), serde_norway::to_value([1])?);
            let mut poll = serde_norway::Mapping::new();
            poll.insert("mode".into(), "busy".into());
            m.insert("poll".into(), serde_norway::Value::Mapping(poll));
            if matches!(peer, Peer::PortcullisStateless(_)) {
                let mut ct = serde_norway::Mapping::new();
                ct.insert("enabled".into(), false.into());
                m.insert("conntrack".into(), serde_norway::Value::Mapping(ct));
            }
            write(&cfg, &serde_norway::to_string(&v)?)?;
            let exe = bench.with_file_name("portcullis");
            let mut gw = GatewayProcess::spawn(
                lab,
                &exe,
                &cfg,
                "127.0.0.1:9477".parse()?,
                &dir.join("gateway.log"),
            )?;
            gw.wait_ready(Duration::from_secs(30))?;
            Ok((Some(gw), None))
        }
        Peer::Kernel => Ok((None, None)),
        Peer::NftLinear(n) | Peer::NftSet(n) => {
            let mut s = String::from("table inet pcbench {\n");
            if let RuleSource::ClassBench { rules, .. } = &a.source {
                s.push_str(
                    "  chain pc_forward { type filter hook forward priority 0; policy drop;\n",
                );
                let range = |p: Option<(u16, u16)>, what: &str, l4: &str| {
                    p.map_or(String::new(), |(lo, hi)| format!(" {l4} {what} {lo}-{hi}"))
                };
                for m in rules {
                    for (proto, src, dst, sp, dp) in flatten(m) {
                        let l4 = match proto {
                            Some(6) => "tcp",
                            Some(17) => "udp",
                            _ => "",
                        };
                        let p = proto.map_or(String::new(), |p| format!(" meta l4proto {p}"));
                        s.push_str(&format!(
                            "    ip saddr {src} ip daddr {dst}{p}{}{} accept\n",
                            range(sp, "sport", l4),
                            range(dp, "dport", l4)
                        ));
                    }
                }
            } else if matches!(peer, Peer::NftSet(_)) {
                s.push_str("  set deny { type ipv4_addr; elements = { ");
                s.push_str(&(0..*n).map(denied).collect::<Vec<_>>().join(", "));
                s.push_str(" } }\n  chain pc_forward { type filter hook forward priority 0; policy accept;\n    ip saddr @deny drop\n");
            } else {
                s.push_str(
                    "  chain pc_forward { type filter hook forward priority 0; policy accept;\n",
                );
                for i in 0..*n {
                    s.push_str(&format!("    ip saddr {} drop\n", denied(i)));
                }
            }
            s.push_str("  }\n}\n");
            let f = dir.join("rules.nft");
            write(&f, &s)?;
            netns(&g, &["nft", "-f", f.to_str().context("path")?])?;
            Ok((None, None))
        }
        Peer::Iptables(n) => {
            let mut s = String::new();
            if let RuleSource::ClassBench { rules, .. } = &a.source {
                s.push_str("*filter\n:FORWARD DROP [0:0]\n");
                let range = |p: Option<(u16, u16)>, what: &str| {
                    p.map_or(String::new(), |(lo, hi)| format!(" --{what} {lo}:{hi}"))
                };
                for m in rules {
                    for (proto, src, dst, sp, dp) in flatten(m) {
                        let p = proto.map_or(String::new(), |p| format!(" -p {p}"));
                        s.push_str(&format!(
                            "-A FORWARD -s {src} -d {dst}{p}{}{} -j ACCEPT\n",
                            range(sp, "sport"),
                            range(dp, "dport")
                        ));
                    }
                }
            } else {
                s.push_str("*filter\n:FORWARD ACCEPT [0:0]\n");
                for i in 0..*n {
                    s.push_str(&format!("-A FORWARD -s {} -j DROP\n", denied(i)));
                }
            }
            s.push_str("COMMIT\n");
            let f = dir.join("rules.iptables");
            write(&f, &s)?;
            netns(
                &g,
                &[
                    "sh",
                    "-c",
                    &format!("iptables-legacy-restore < {}", f.display()),
                ],
            )?;
            Ok((None, None))
        }
        Peer::XdpFilter(n) => {
            // One `xdp-filter ip` per address, from a script sourced by the shell that mounted
            // bpffs (each `ip netns exec` gets its own mount namespace), never one long argv.
            let f = dir.join("rules.xdp-filter");
            let mut script = String::new();
            for i in 0..*n {
                script.push_str(&format!("xdp-filter ip {} --mode src\n", denied(i)));
            }
            write(&f, &script)?;
            netns(
                &g,
                &[
                    "sh",
                    "-ec",
                    &format!(
                        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; xdp-filter load --mode native {}; . {}",
                        lab.ext(),
                        f.display()
                    ),
                ],
            )
            .with_context(|| format!("xdp-filter with {n} addresses (script {})", f.display()))?;
            Ok((None, None))
        }
    }
}

/// Reads lines from `r` until one contains `needle` (bounded in time).
fn wait_line(
    r: impl std::io::Read + Send + 'static,
    needle: &str,
    timeout: Duration,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("timed out waiting for `{}`", "ready"))
}

fn sample(peer: &Peer, a: &Args, bench: &Path) -> Result<Sample> {
    let lab = Lab::new(&a.prefix, 1)?;
    let _ = lab.down();
    lab.up()?;
    let guard = LabGuard(lab.clone());
    let dir = std::env::temp_dir().join(format!("portcullis-compare-{}", a.prefix));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    if peer.routed() {
        route(&lab)?;
    }
    let (gw, child) = setup(peer, &lab, a, &dir, bench)?;
    let secs = format!("{}", a.seconds + 4.0);
    let bench_s = bench.to_str().context("path")?;
    let mut sink = Command::new("taskset")
        .args([
            "-c",
            "0",
            "ip",
            "netns",
            "exec",
            &lab.server_ns(),
            bench_s,
            "sink",
            "--iface",
            &lab.server_if(),
            "--seconds",
            &secs,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_line(
        sink.stderr.take().context("stderr")?,
        "sink ready",
        Duration::from_secs(10),
    )?;
    let (dst_mac, src, dst) = if peer.routed() {
        (EXT_MAC, "10.98.1.1", "10.98.2.1")
    } else {
        (SERVER_MAC, "10.99.0.1", "10.99.0.2")
    };
    let trace: Vec<String> = match &a.source {
        RuleSource::ClassBench { trace, .. } => {
            vec!["--trace".into(), trace.to_string_lossy().into_owned()]
        }
        RuleSource::DenyList(_) => Vec::new(),
    };
    let core_before = core1_ticks()?;
    let busy_before = gw.as_ref().and_then(worker_busy_ns);
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "ip",
            "netns",
            "exec",
            &lab.client_ns(),
            bench_s,
            "gen",
            "--iface",
            &lab.client_if(),
        ])
        .args([
            "--src-mac",
            CLIENT_MAC,
            "--dst-mac",
            dst_mac,
            "--src-ip",
            src,
            "--dst-ip",
            dst,
            "--dport",
            "9",
            "--flows",
            "16",
        ])
        .args(["--seconds", &format!("{}", a.seconds)])
        .args(&trace)
        .output()?;
    let core_after = core1_ticks()?;
    let busy_after = gw.as_ref().and_then(worker_busy_ns);
    if !out.status.success() {
        bail!("gen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let gen: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let started = Instant::now();
    while sink.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = sink.kill();
            bail!("the sink did not stop");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut sink.stdout.take().context("stdout")?, &mut text)?;
    let rep: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("sink output: {text}"))?;
    if let Some(mut c) = child {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
    drop(gw);
    drop(guard);
    let received = match &a.source {
        RuleSource::DenyList(_) => rep["per_dport"]["9"].as_u64().unwrap_or(0),
        // Every replayed header matches a filter, so all of it should arrive.
        RuleSource::ClassBench { .. } => rep["received"].as_u64().unwrap_or(0),
    };
    let gen_secs = gen["seconds"].as_f64().unwrap_or(a.seconds);
    // USER_HZ is 100 on Linux.
    let core_ns = (core_after.0 - core_before.0) as f64 * 1e7;
    let per = |ns: f64| {
        if received == 0 {
            f64::NAN
        } else {
            ns / received as f64
        }
    };
    Ok(Sample {
        sent: gen["sent"].as_u64().unwrap_or(0),
        received,
        mpps: received as f64 / gen_secs / 1e6,
        p50_ns: rep["latency"]["p50_ns"].as_u64().unwrap_or(0),
        p99_ns: rep["latency"]["p99_ns"].as_u64().unwrap_or(0),
        core_ns_per_packet: per(core_ns),
        worker_ns_per_packet: busy_before
            .zip(busy_after)
            .map(|(b, e)| per(e.saturating_sub(b) as f64)),
    })
}

fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s[s.len() / 2]
}

fn svg(results: &[PeerResult]) -> String {
    let max = results.iter().map(|r| r.max_mpps).fold(0.01, f64::max);
    let (w, bar, gap, left) = (760.0, 26.0, 10.0, 330.0);
    let h = 40.0 + results.len() as f64 * (bar + gap);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">Forwarded Mpps (64 B UDP, median; whiskers: min-max)</text>\n");
    for (i, r) in results.iter().enumerate() {
        let y = 32.0 + i as f64 * (bar + gap);
        let scale = (w - left - 80.0) / max;
        s.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{}</text>\n",
            y + bar * 0.65,
            r.peer
        ));
        s.push_str(&format!(
            "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar}\" fill=\"#4a7ab8\"/>\n",
            r.median_mpps * scale
        ));
        s.push_str(&format!(
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
            left + r.min_mpps * scale,
            left + r.max_mpps * scale,
            y + bar / 2.0,
            y + bar / 2.0
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\">{:.3}</text>\n",
            left + r.max_mpps * scale + 6.0,
            y + bar * 0.65,
            r.median_mpps
        ));
    }
    s.push_str("</svg>\n");
    s
}

pub(crate) fn run(mut a: Args) -> Result<()> {
    if a.repeats == 0 || a.seconds <= 0.0 {
        bail!("--repeats and --seconds must be positive");
    }
    a.source = match &a.classbench {
        None => RuleSource::DenyList(a.rules),
        Some(set) => {
            let filters = a.data.join(format!("{set}.filters"));
            let trace = a.data.join(format!("{set}.trace"));
            let rules = policy::classbench::read_filters(&filters)
                .with_context(|| format!("--classbench {set}"))?;
            if !trace.is_file() {
                bail!("--classbench {set}: no trace at {}", trace.display());
            }
            RuleSource::ClassBench {
                name: set.clone(),
                rules,
                trace,
            }
        }
    };
    let n = a.source.count();
    let bench = std::env::current_exe()?;
    let all = vec![
        Peer::Plain,
        Peer::Portcullis(0),
        Peer::Portcullis(n),
        Peer::PortcullisStateless(n),
        Peer::Kernel,
        Peer::NftLinear(n),
        Peer::NftSet(n),
        Peer::Iptables(n),
        Peer::XdpFilter(n),
    ];
    let keys = [
        "plain",
        "portcullis-0",
        "portcullis",
        "portcullis-stateless",
        "kernel",
        "nft-linear",
        "nft-set",
        "iptables-legacy",
        "xdp-filter",
    ];
    // With ClassBench rules: the peers that can hold 5-tuple rules, and the two baselines.
    let classbench_keys = [
        "plain",
        "portcullis",
        "portcullis-stateless",
        "kernel",
        "nft-linear",
        "iptables-legacy",
    ];
    let chosen: Vec<String> = match (&a.peers, &a.source) {
        (Some(list), _) => list.clone(),
        (None, RuleSource::ClassBench { .. }) => {
            classbench_keys.iter().map(|k| k.to_string()).collect()
        }
        (None, RuleSource::DenyList(_)) => keys.iter().map(|k| k.to_string()).collect(),
    };
    let peers: Vec<Peer> = chosen
        .iter()
        .map(|k| {
            if matches!(a.source, RuleSource::ClassBench { .. })
                && !classbench_keys.contains(&k.as_str())
            {
                bail!("peer `{k}` cannot take ClassBench 5-tuple rules (expected one of {classbench_keys:?})");
            }
            keys.iter()
                .position(|x| x == k)
                .map(|i| all[i].clone())
                .with_context(|| format!("unknown peer `{k}` (expected one of {keys:?})"))
        })
        .collect::<Result<_>>()?;
    if let RuleSource::ClassBench { name, rules, .. } = &a.source {
        eprintln!(
            "ClassBench {name}: {} filters, every one an Allow, then deny; the generator replays its trace's TCP and UDP headers",
            rules.len()
        );
    }
    let total = peers.len() * a.repeats;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); peers.len()];
    // A peer that fails is reported with why, and the others go on.
    let mut failed: Vec<Option<String>> = vec![None; peers.len()];
    let mut done = 0;
    let started = Instant::now();
    // Interleave peers within each repeat, so drifts of this shared machine hit all alike.
    for _ in 0..a.repeats {
        for (i, p) in peers.iter().enumerate() {
            done += 1;
            if failed[i].is_some() {
                continue;
            }
            let s = match sample(p, &a, &bench) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}: failed: {e:#}", p.name());
                    failed[i] = Some(format!("{e:#}"));
                    continue;
                }
            };
            let bar: String = (0..20)
                .map(|k| if k * total < done * 20 { '#' } else { '.' })
                .collect();
            eprintln!(
                "[{bar}] {done:>3}/{total} {:>6.1}s  {:<45} {:.3} Mpps ({} of {} arrived), core 1: {:.0} ns/packet",
                started.elapsed().as_secs_f64(),
                p.name(),
                s.mpps,
                s.received,
                s.sent,
                s.core_ns_per_packet
            );
            samples[i].push(s);
        }
    }
    let plain = peers
        .iter()
        .position(|p| *p == Peer::Plain)
        .filter(|&i| !samples[i].is_empty())
        .map(|i| median(&samples[i].iter().map(|s| s.mpps).collect::<Vec<_>>()));
    let results: Vec<PeerResult> = peers
        .iter()
        .zip(samples)
        .zip(&failed)
        .filter(|((_, s), _)| !s.is_empty())
        .map(|((p, s), _)| {
            let mpps: Vec<f64> = s.iter().map(|x| x.mpps).collect();
            let m = median(&mpps);
            let loss: Vec<f64> = s
                .iter()
                .map(|x| {
                    if x.sent == 0 {
                        0.0
                    } else {
                        100.0 * (1.0 - x.received as f64 / x.sent as f64)
                    }
                })
                .collect();
            let worker: Vec<f64> = s.iter().filter_map(|x| x.worker_ns_per_packet).collect();
            PeerResult {
                peer: p.name(),
                median_mpps: m,
                min_mpps: mpps.iter().copied().fold(f64::MAX, f64::min),
                max_mpps: mpps.iter().copied().fold(0.0, f64::max),
                ratio_to_plain: plain.map_or(f64::NAN, |pl| m / pl),
                p50_ns: median(&s.iter().map(|x| x.p50_ns).collect::<Vec<_>>()),
                p99_ns: median(&s.iter().map(|x| x.p99_ns).collect::<Vec<_>>()),
                loss_pct: median(&loss),
                core_ns_per_packet: median(
                    &s.iter().map(|x| x.core_ns_per_packet).collect::<Vec<_>>(),
                ),
                worker_ns_per_packet: (!worker.is_empty()).then(|| median(&worker)),
                samples: s,
            }
        })
        .collect();
    let rules = match &a.source {
        RuleSource::DenyList(n) => format!("{n} deny rules"),
        RuleSource::ClassBench { name, rules, .. } => {
            format!("ClassBench {name}, {} filters", rules.len())
        }
    };
    println!(
        "{rules}; {} repeats of {} s, interleaved\n",
        a.repeats, a.seconds
    );
    println!("| peer | Mpps median [min-max] | ratio to plain forwarder | core 1 CPU ns/packet | worker busy ns/packet | latency p50 / p99 | loss (generator offered more than the path carries) |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.3} [{:.3}-{:.3}] | {:.2} | {:.0} | {} | {:.0} / {:.0} µs | {:.1} % |",
            r.peer,
            r.median_mpps,
            r.min_mpps,
            r.max_mpps,
            r.ratio_to_plain,
            r.core_ns_per_packet,
            r.worker_ns_per_packet
                .map_or("-".to_string(), |w| format!("{w:.0}")),
            r.p50_ns as f64 / 1e3,
            r.p99_ns as f64 / 1e3,
            r.loss_pct
        );
    }
    for (p, why) in peers.iter().zip(&failed) {
        if let Some(why) = why {
            println!("| {} | not run: {why} | | | | | |", p.name());
        }
    }
    std::fs::create_dir_all(&a.out)?;
    let mut f = std::fs::File::create(a.out.join("compare.json"))?;
    writeln!(f, "{}", serde_json::to_string_pretty(&results)?)?;
    write(&a.out.join("compare.svg"), &svg(&results))?;
    eprintln!(
        "wrote {} and {} ({:.0} s)",
        a.out.join("compare.json").display(),
        a.out.join("compare.svg").display(),
        started.elapsed().as_secs_f64()
    );
    if failed.iter().any(Option::is_some) {
        bail!("some peers could not run (see the table)");
    }
    Ok(())
}
