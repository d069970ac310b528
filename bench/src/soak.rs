//! `portcullis-bench soak --minutes N`: the gateway under everything at once, for a while. A
//! namespace lab runs the real `portcullis run`; a UDP stream and TCP connects (allowed and
//! denied) cross it the whole time, while the policy directory churns (a policy rewritten, then a
//! forced reload, at least `--swaps` times) and `/metrics` and `/status` are scraped. At the end it
//! asserts the gateway's own accounting exactly (rx = tx + every drop; every frame the table
//! decided counted under one rule; TCP verdicts as the policies say) and that resident memory
//! stayed flat: the slope of a least-squares line through RSS samples after the first fifth of
//! the run, reported in KiB per minute.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lab::accounting::{settled_status, Accounting};
use lab::traffic::{addr, tcp_connect, udp_stream, wait_udp, Servers, TcpOutcome};
use lab::{GatewayProcess, Lab, LabGuard, SERVER_V4};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How long traffic, churn and scrapes run.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Table swaps at least (spread over the run).
    #[arg(long, default_value_t = 1000)]
    swaps: u64,
    /// UDP datagrams per second in the stream.
    #[arg(long, default_value_t = 2000)]
    pps: u64,
    /// Largest accepted RSS growth after warm-up, in KiB per minute.
    #[arg(long, default_value_t = 256.0)]
    max_slope_kib_per_min: f64,
    #[arg(long, default_value = "psoak")]
    prefix: String,
    #[arg(long, default_value = "configs/lab/gateway.yaml")]
    config: PathBuf,
    #[arg(long, default_value = "configs/lab/policies")]
    policies: PathBuf,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    minutes: f64,
    swaps: u64,
    scrapes: u64,
    udp_sent: u64,
    udp_received: u64,
    udp_reordered: u64,
    tcp_allowed_ok: u64,
    tcp_denied_ok: u64,
    gateway_rx: u64,
    gateway_tx: u64,
    gateway_drops: u64,
    rule_hits: u64,
    tracked: u64,
    rss_start_kib: u64,
    rss_end_kib: u64,
    rss_max_kib: u64,
    rss_slope_kib_per_min: f64,
}

/// The gateway's resident memory, from /proc.
fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Least-squares slope of `(minutes, KiB)` points.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// A GatewayPolicy that changes with `i`: it denies a client address that is never the lab's,
/// so the verdicts of the traffic stay the same while every swap publishes a different table.
fn churn_policy(i: u64) -> String {
    format!(
        "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {{name: soak-churn}}\nspec:\n  priority: {}\n  ingress:\n    - {{action: Deny, source: {{nets: [100.{}.{}.{}/32]}}}}\n",
        50 + i % 7,
        64 + (i >> 16) % 64,
        (i >> 8) & 255,
        i & 255
    )
}

pub(crate) fn run(a: Args) -> Result<()> {
    ensure!(a.minutes > 0.0, "--minutes must be positive");
    ensure!(
        nix::unistd::geteuid().is_root(),
        "soak builds network namespaces and AF_XDP sockets: run it as root"
    );
    let duration = Duration::from_secs_f64(a.minutes * 60.0);
    let exe = std::env::current_exe()?.with_file_name("portcullis");
    let lab = Lab::new(&a.prefix, 1)?;
    let _ = lab.down();
    lab.up()?;
    let _guard = LabGuard(lab.clone());
    let dir = std::env::temp_dir().join(format!("portcullis-soak-{}", a.prefix));
    let _ = std::fs::remove_dir_all(&dir);
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    for e in std::fs::read_dir(&a.policies)
        .with_context(|| format!("reading {}", a.policies.display()))?
    {
        let p = e?.path();
        if let Some(name) = p.file_name() {
            std::fs::copy(&p, policies.join(name))?;
        }
    }
    let churn = policies.join("50-soak-churn.yaml");
    std::fs::write(&churn, churn_policy(0))?;
    let cfg = dir.join("gateway.yaml");
    lab.write_config(&a.config, &policies, &cfg)?;
    let metrics: std::net::SocketAddr = "127.0.0.1:9477".parse()?;
    let mut gw = GatewayProcess::spawn(&lab, &exe, &cfg, metrics, &dir.join("gateway.log"))?;
    gw.wait_ready(Duration::from_secs(30))?;
    let servers = Servers::start(&lab.server_ns(), &[80, 22], &[53])?;
    let ns = lab.client_ns();
    // Resolve the server's MAC before the stream (the kernel reorders a first burst otherwise).
    udp_stream(&ns, addr(SERVER_V4, 9), 1, 0, Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_millis(200));
    let before = Accounting::of(&settled_status(&gw)?);
    let started = Instant::now();

    // The stream: one sequence-numbered UDP flow for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let total = (a.pps as f64 * duration.as_secs_f64()) as u64;
    let sender = {
        let ns = ns.clone();
        let (pps, d) = (a.pps, duration + Duration::from_secs(5));
        std::thread::spawn(move || udp_stream(&ns, addr(SERVER_V4, 53), total, pps, d))
    };
    // TCP: allowed (80) and denied (22, deny-ssh) connects, on their own thread.
    let tcp = {
        let (ns, stop) = (ns.clone(), Arc::clone(&stop));
        std::thread::spawn(move || -> Result<(u64, u64)> {
            let (mut ok, mut denied) = (0, 0);
            while !stop.load(Relaxed) {
                match tcp_connect(&ns, addr(SERVER_V4, 80), Duration::from_secs(2))? {
                    TcpOutcome::Connected => ok += 1,
                    o => bail!("an allowed connect to :80 failed: {o:?}"),
                }
                match tcp_connect(&ns, addr(SERVER_V4, 22), Duration::from_millis(300))? {
                    TcpOutcome::TimedOut => denied += 1,
                    o => bail!("a denied connect to :22 got through: {o:?}"),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok((ok, denied))
        })
    };

    // Churn, scrapes and RSS samples on this thread.
    let every = duration.div_f64(a.swaps.max(1) as f64);
    let (mut swaps, mut scrapes) = (0u64, 0u64);
    let mut generation = gw.status()?.policy.generation;
    let mut rss: Vec<(f64, f64)> = Vec::new();
    let mut last_sample = Instant::now() - Duration::from_secs(60);
    while started.elapsed() < duration || swaps < a.swaps {
        ensure!(
            started.elapsed() < duration * 3 + Duration::from_secs(60),
            "only {swaps} swaps in {:?}: reloads are too slow",
            started.elapsed()
        );
        let tick = Instant::now();
        std::fs::write(&churn, churn_policy(swaps + 1))?;
        gw.signal(nix::sys::signal::Signal::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = gw.status()?;
            scrapes += 1;
            ensure!(
                s.policy.last_error.is_empty(),
                "a reload failed: {:?}",
                s.policy.last_error
            );
            if s.policy.generation > generation {
                generation = s.policy.generation;
                break;
            }
            ensure!(Instant::now() < deadline, "SIGHUP produced no swap in 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        swaps += 1;
        let (code, body) = gw.get("/metrics")?;
        ensure!(
            code == 200 && body.contains("portcullis_rx_packets_total"),
            "/metrics answered {code}"
        );
        scrapes += 1;
        if last_sample.elapsed() >= Duration::from_secs(2) {
            last_sample = Instant::now();
            rss.push((
                started.elapsed().as_secs_f64() / 60.0,
                rss_kib(gw.pid())? as f64,
            ));
        }
        if let Some(rest) = every.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    stop.store(true, Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP sender panicked"))??;
    let (tcp_ok, tcp_denied) = tcp
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP thread panicked"))??;
    let log = wait_udp(&servers, 53, sent, Duration::from_secs(5));
    let sum = log.summary(sent);
    let status = settled_status(&gw)?;
    let delta = Accounting::of(&status).since(&before);
    rss.push((
        started.elapsed().as_secs_f64() / 60.0,
        rss_kib(gw.pid())? as f64,
    ));
    let warm = rss.len() / 5;
    let report = Report {
        minutes: started.elapsed().as_secs_f64() / 60.0,
        swaps,
        scrapes,
        udp_sent: sent,
        udp_received: sum.received,
        udp_reordered: sum.reordered,
        tcp_allowed_ok: tcp_ok,
        tcp_denied_ok: tcp_denied,
        gateway_rx: delta.rx,
        gateway_tx: delta.tx,
        gateway_drops: delta.drops,
        rule_hits: delta.hits,
        tracked: delta.tracked,
        rss_start_kib: rss.first().map_or(0, |p| p.1 as u64),
        rss_end_kib: rss.last().map_or(0, |p| p.1 as u64),
        rss_max_kib: rss.iter().map(|p| p.1 as u64).max().unwrap_or(0),
        rss_slope_kib_per_min: slope(&rss[warm..]),
    };
    gw.stop(Duration::from_secs(10))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report:#?}");
    }
    delta
        .check()
        .map_err(|e| anyhow::anyhow!("accounting: {e}"))?;
    ensure!(
        sum.received == sent && sum.reordered == 0 && sum.duplicated == 0,
        "the UDP stream lost or reordered datagrams across the swaps: sent {sent}, {sum:?}"
    );
    ensure!(
        delta.rx >= sum.received,
        "the gateway read fewer frames than arrived"
    );
    ensure!(
        report.rss_slope_kib_per_min <= a.max_slope_kib_per_min,
        "resident memory grows {:.1} KiB/min (limit {})",
        report.rss_slope_kib_per_min,
        a.max_slope_kib_per_min
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
