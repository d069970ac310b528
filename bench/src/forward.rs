//! `portcullis-bench lab-forward`: how many frames per second the gateway forwards in the
//! namespace lab. Senders are UDP sockets in the client namespace (many flows, so the client's
//! transmit hashing spreads them over the queues), pinned to chosen cores; the gateway runs in
//! busy-poll mode with its workers pinned. The rate is the gateway's forwarded-frame counter over
//! the measuring window, so it is what went through, not what was offered.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gateway::stats::CounterSnapshot;
use lab::{in_netns, GatewayProcess, Lab, LabGuard, SERVER_V4};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Cores of the gateway workers (one per queue).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    worker_cores: Vec<usize>,
    /// Cores of the sender threads (one thread each).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    sender_cores: Vec<usize>,
    /// UDP flows (source ports) per sender.
    #[arg(long, default_value_t = 64)]
    flows: u16,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Gateway config template (its policies are used).
    #[arg(long, default_value = "configs/lab/gateway.yaml")]
    config: PathBuf,
    #[arg(long, default_value = "pbench")]
    prefix: String,
    /// UDP destination port; it must be allowed by the policies (53 in configs/lab).
    #[arg(long, default_value_t = 53)]
    port: u16,
}

fn totals(gw: &GatewayProcess) -> Result<(u64, u64, CounterSnapshot)> {
    let s = gw.status()?;
    Ok((s.totals.rx_ingress, s.totals.tx_ingress, s.totals))
}

pub(crate) fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.worker_cores.len() == a.queues as usize,
        "--worker-cores needs one core per queue"
    );
    let lab = Lab::new(&a.prefix, a.queues)?;
    let _ = lab.down();
    lab.up()?;
    let _guard = LabGuard(lab.clone());
    let dir = PathBuf::from(format!("/tmp/portcullis-bench-{}", a.prefix));
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join("gateway.yaml");
    let template = gateway::config::Config::load(&a.config)?;
    lab.write_config(&a.config, &template.policy_dir, &cfg_path)?;
    // Busy polling and pinning for a throughput run.
    let mut v: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    let m = v.as_mapping_mut().context("config is a mapping")?;
    m.insert("cores".into(), serde_norway::to_value(&a.worker_cores)?);
    let mut poll = serde_norway::Mapping::new();
    poll.insert("mode".into(), "busy".into());
    m.insert("poll".into(), serde_norway::Value::Mapping(poll));
    std::fs::write(&cfg_path, serde_norway::to_string(&v)?)?;
    let exe = std::env::current_exe()?.with_file_name("portcullis");
    let metrics = template
        .metrics
        .listen
        .context("metrics.listen must be set")?;
    let mut gw = GatewayProcess::spawn(&lab, &exe, &cfg_path, metrics, &dir.join("gateway.log"))?;
    gw.wait_ready(Duration::from_secs(20))?;

    let stop = Arc::new(AtomicBool::new(false));
    let offered = Arc::new(AtomicU64::new(0));
    let deadline = Duration::from_secs(a.seconds + 3);
    let mut senders = Vec::new();
    for (i, core) in a.sender_cores.iter().copied().enumerate() {
        let (ns, stop, offered, flows, port) = (
            lab.client_ns(),
            Arc::clone(&stop),
            Arc::clone(&offered),
            a.flows,
            a.port,
        );
        senders.push(std::thread::spawn(move || {
            in_netns(&ns, || {
                core_affinity::set_for_current(core_affinity::CoreId { id: core });
                let socks: Vec<UdpSocket> = (0..flows)
                    .filter_map(|f| {
                        let s =
                            UdpSocket::bind(("10.99.0.1", 20000 + (i as u16) * 1000 + f)).ok()?;
                        s.connect((SERVER_V4, port)).ok()?;
                        Some(s)
                    })
                    .collect();
                let payload = [0u8; 18]; // 64-byte frames on the wire
                let started = Instant::now();
                let mut n = 0u64;
                'outer: loop {
                    for s in &socks {
                        if s.send(&payload).is_ok() {
                            n += 1;
                        }
                    }
                    if stop.load(Relaxed) || started.elapsed() > deadline {
                        break 'outer;
                    }
                }
                offered.fetch_add(n, Relaxed);
            })
        }));
    }
    std::thread::sleep(Duration::from_secs(1)); // warm-up: ARP, caches
    let (rx0, tx0, _) = totals(&gw)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(a.seconds));
    let (rx1, tx1, drops) = totals(&gw)?;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for s in senders {
        let _ = s.join();
    }
    let status = gw.status()?;
    gw.stop(Duration::from_secs(10))?;
    let per_worker: Vec<u64> = status.workers.iter().map(|w| w.tx_ingress).collect();
    println!(
        "queues {} | workers on cores {:?} (busy poll) | senders on cores {:?} x {} flows | {:.3} Mpps received, {:.3} Mpps forwarded ext->int over {:.1}s | per-worker forwarded {:?} | burst p50 {} ns p99 {} ns",
        a.queues,
        a.worker_cores,
        a.sender_cores,
        a.flows,
        (rx1 - rx0) as f64 / secs / 1e6,
        (tx1 - tx0) as f64 / secs / 1e6,
        secs,
        per_worker,
        status.burst_latency.p50_ns,
        status.burst_latency.p99_ns,
    );
    println!(
        "drops: {}; offered by senders (whole run): {}",
        drops.drop_summary(),
        offered.load(Relaxed)
    );
    Ok(())
}
