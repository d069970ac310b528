//! `portcullis`: run the gateway, check and explain policies, read stats, and drive the lab.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use control::compile::GatewayContext;
use control::key::{proto, FlowKey};
use control::reload::load_and_compile;
use control::rule::{Direction, Verdict};
use control::table::Table;
use gateway::config::Config;
use gateway::lab::Lab;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "AF_XDP packet-filter gateway for Kubernetes edge nodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway until SIGINT/SIGTERM (SIGHUP reloads the policies).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate and compile policies; print a table summary, warnings, build time and memory.
    Check {
        #[command(flatten)]
        src: PolicySource,
    },
    /// Explain the verdict for one flow: the rule, its origin and the reason.
    Explain {
        #[command(flatten)]
        src: PolicySource,
        #[arg(long)]
        src_ip: Option<IpAddr>,
        /// Source address (alias of --src-ip).
        #[arg(long = "src", conflicts_with = "src_ip")]
        src_addr: Option<IpAddr>,
        #[arg(long)]
        dst: IpAddr,
        #[arg(long, default_value_t = 40000)]
        sport: u16,
        /// Destination port, or ICMP code with --proto icmp.
        #[arg(long, default_value_t = 0)]
        dport: u16,
        /// tcp, udp, sctp, icmp, icmpv6 or a number.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// ICMP type (with --proto icmp/icmpv6).
        #[arg(long)]
        icmp_type: Option<u8>,
        #[arg(long, value_enum, default_value_t = Dir::Ingress)]
        direction: Dir,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print counters of a running instance.
    Stats {
        /// The instance's metrics.listen address.
        #[arg(long, default_value = "127.0.0.1:9477")]
        addr: SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// The network-namespace lab.
    Lab {
        #[command(subcommand)]
        action: LabCmd,
    },
}

#[derive(clap::Args)]
struct PolicySource {
    /// A gateway config (its policy_dir, defaults and failsafe rules are used).
    #[arg(long, conflicts_with = "policies")]
    config: Option<PathBuf>,
    /// A policy directory, with the default context (ingress deny, egress allow, no failsafe).
    #[arg(long)]
    policies: Option<PathBuf>,
}

impl PolicySource {
    fn load(&self) -> Result<(PathBuf, GatewayContext)> {
        match (&self.config, &self.policies) {
            (Some(c), _) => {
                let cfg = Config::load(c)?;
                Ok((cfg.policy_dir, cfg.context))
            }
            (None, Some(p)) => Ok((p.clone(), GatewayContext::default())),
            (None, None) => bail!("give --config FILE or --policies DIR"),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    Ingress,
    Egress,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the topology.
    Up(LabArgs),
    /// Delete the topology.
    Down(LabArgs),
    /// Show namespaces, addresses and attached XDP programs.
    Status(LabArgs),
    /// Build the lab, run the gateway on configs/lab, send allowed and denied traffic, print the
    /// verdicts and counters, tear down.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long, default_value = "configs/lab/gateway.yaml")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct LabArgs {
    #[arg(long, default_value = "pc")]
    prefix: String,
    #[arg(long, default_value_t = 1)]
    queues: u32,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = dispatch(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run { config } => gateway::runtime::run(Config::load(&config)?),
        Cmd::Check { src } => check(&src),
        Cmd::Explain {
            src,
            src_ip,
            src_addr,
            dst,
            sport,
            dport,
            proto: p,
            icmp_type,
            direction,
            json,
        } => {
            let src_ip = src_ip.or(src_addr).context("give --src IP")?;
            let protocol =
                proto::parse(&p).with_context(|| format!("--proto `{p}` is not a protocol"))?;
            if src_ip.is_ipv4() != dst.is_ipv4() {
                bail!("--src and --dst must be the same address family");
            }
            let dir = match direction {
                Dir::Ingress => Direction::Ingress,
                Dir::Egress => Direction::Egress,
            };
            let sport = if proto::is_icmp(protocol) {
                icmp_type.map_or(sport, u16::from)
            } else {
                sport
            };
            explain(
                &src,
                FlowKey::new(dir, src_ip, dst, protocol, sport, dport),
                json,
            )
        }
        Cmd::Stats { addr, json } => stats(addr, json),
        Cmd::Lab { action } => match action {
            LabCmd::Up(a) => {
                let lab = Lab::new(&a.prefix, a.queues)?;
                lab.up()?;
                print!("{}", lab.status());
                Ok(())
            }
            LabCmd::Down(a) => Ok(Lab::new(&a.prefix, a.queues)?.down()?),
            LabCmd::Status(a) => {
                print!("{}", Lab::new(&a.prefix, a.queues)?.status());
                Ok(())
            }
            LabCmd::Demo { lab, config } => {
                let exe =
                    std::env::current_exe().context("cannot find the portcullis executable")?;
                gateway::demo::run(&exe, &config, &lab.prefix, lab.queues)
            }
        },
    }
}

/// A compiled policy directory, for `check` and `explain`.
struct Built {
    dir: PathBuf,
    table: Table,
    warnings: Vec<String>,
    counts: Vec<(&'static str, usize)>,
    compile_ms: f64,
}

fn build(src: &PolicySource) -> Result<Built> {
    let (dir, ctx) = src.load()?;
    let started = std::time::Instant::now();
    let (snap, rules, warnings) =
        load_and_compile(&dir, &ctx).with_context(|| format!("policies in {}", dir.display()))?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(Built {
        dir,
        table: Table::build(rules, 1, 1),
        warnings,
        counts: snap.counts(),
        compile_ms,
    })
}

fn check(src: &PolicySource) -> Result<()> {
    let Built {
        dir,
        table,
        warnings,
        counts,
        compile_ms,
    } = build(src)?;
    println!("policies: {}", dir.display());
    for (kind, n) in counts {
        println!("  {kind}: {n}");
    }
    let stats = table.classifier_stats();
    println!("compiled rules: {}", table.rules().len());
    println!(
        "classifier: {} atoms in {} tuples, {} buckets (longest {})",
        stats.atoms, stats.tuples, stats.buckets, stats.max_bucket
    );
    println!(
        "load+compile: {compile_ms:.2} ms, classifier build: {:.2} ms, table memory: {} bytes",
        table.build_time().as_secs_f64() * 1e3,
        table.memory_bytes()
    );
    if warnings.is_empty() {
        println!("warnings: none");
    } else {
        println!("warnings ({}):", warnings.len());
        for w in &warnings {
            println!("  - {w}");
        }
    }
    Ok(())
}

fn explain(src: &PolicySource, key: FlowKey, json: bool) -> Result<()> {
    let table = build(src)?.table;
    let e = table.explain(&key);
    let reference = table.reference_decision(&key);
    if reference != e.verdict {
        bail!("internal error: the classifier says {:?} but the reference scan says {reference:?}; please report this", e.verdict);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"flow": key.to_string(), "explanation": e})
            )?
        );
        return Ok(());
    }
    let verdict = match e.verdict {
        Verdict::Allow => "ALLOW".to_string(),
        Verdict::Deny(r) => format!("DENY ({})", r.as_str()),
    };
    println!("flow:    {key}");
    println!("verdict: {verdict}");
    let Some(last) = e.steps.last() else {
        bail!("no rule matched (the table fails closed)");
    };
    let o = &last.origin;
    let pos = o.index.map_or(String::new(), |i| format!(" rule {i}"));
    println!("layer:   {:?}", last.layer);
    println!(
        "rule:    #{} {}{} (id {})",
        last.index, o.object, pos, last.rule
    );
    println!("origin:  {}", o.source);
    println!("reason:  {}", o.why);
    if e.steps.len() > 1 {
        println!("also matched on the way:");
        for s in &e.steps[..e.steps.len() - 1] {
            println!("  #{} {} ({:?})", s.index, s.origin.object, s.action);
        }
    }
    Ok(())
}

fn stats(addr: SocketAddr, json: bool) -> Result<()> {
    let (code, body) = gateway::metrics::http_get(addr, "/status", Duration::from_secs(3))
        .with_context(|| {
            format!("cannot reach a running portcullis at {addr} (is metrics.listen set to it?)")
        })?;
    if code != 200 {
        bail!("{addr}/status answered {code}");
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let s: serde_json::Value = serde_json::from_str(&body)?;
    let t = &s["totals"];
    println!(
        "portcullis {} up {}s, ext={} int={} queues={} copy_mode={}",
        s["version"].as_str().unwrap_or("?"),
        s["uptime_s"],
        s["ext"].as_str().unwrap_or("?"),
        s["int"].as_str().unwrap_or("?"),
        s["queues"],
        s["copy_mode"]
    );
    println!(
        "table generation {} with {} rules; last reload error: {}",
        s["policy"]["generation"], s["policy"]["rules"], s["policy"]["last_error"]
    );
    println!(
        "ingress: {} rx, {} forwarded; egress: {} rx, {} forwarded; non-IP forwarded {}",
        t["rx_ingress"], t["tx_ingress"], t["rx_egress"], t["tx_egress"], t["l2_forwarded"]
    );
    for d in t["drops"].as_array().into_iter().flatten() {
        if d[1].as_u64().unwrap_or(0) > 0 {
            println!("  drop {}: {}", d[0].as_str().unwrap_or("?"), d[1]);
        }
    }
    let l = &s["burst_latency"];
    println!(
        "burst service time: p50 {} ns, p99 {} ns, max {} ns over {} bursts",
        l["p50_ns"], l["p99_ns"], l["max_ns"], l["count"]
    );
    println!("rule hits:");
    for r in s["rules"].as_array().into_iter().flatten() {
        println!(
            "  #{:<4} {:>12}  {}{}",
            r["index"],
            r["hits"],
            r["object"].as_str().unwrap_or("?"),
            r["rule"]
                .as_u64()
                .map_or(String::new(), |p| format!(" [{p}]"))
        );
    }
    Ok(())
}
