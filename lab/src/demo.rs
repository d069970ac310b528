//! `portcullis lab demo`: brings a lab up, runs the gateway on `configs/lab/`, sends allowed and
//! denied traffic from the client, prints what each probe saw next to what the policy says, the
//! per-rule counters and drop reasons, then tears everything down (also on Ctrl-C).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::{Lab, LabGuard, CLIENT_V4, SERVER_V4, SERVER_V6};
use crate::process::GatewayProcess;
use crate::traffic::{addr, tcp_connect, udp_stream, wait_udp, Servers, TcpOutcome};

/// One probe of the demo and what the lab policies say about it.
struct DemoCase {
    what: &'static str,
    target: &'static str,
    proto: &'static str,
    port: u16,
    allowed: bool,
    why: &'static str,
}

const PROBES: &[DemoCase] = &[
    DemoCase {
        what: "web",
        target: SERVER_V4,
        proto: "tcp",
        port: 80,
        allowed: true,
        why: "GatewayPolicy/allow-web",
    },
    DemoCase {
        what: "web (tls)",
        target: SERVER_V4,
        proto: "tcp",
        port: 443,
        allowed: true,
        why: "GatewayPolicy/allow-web",
    },
    DemoCase {
        what: "web over IPv6",
        target: SERVER_V6,
        proto: "tcp",
        port: 80,
        allowed: true,
        why: "GatewayPolicy/allow-web",
    },
    DemoCase {
        what: "ssh",
        target: SERVER_V4,
        proto: "tcp",
        port: 22,
        allowed: false,
        why: "GatewayPolicy/deny-ssh (policy_deny)",
    },
    DemoCase {
        what: "admin port",
        target: SERVER_V4,
        proto: "tcp",
        port: 8080,
        allowed: false,
        why: "default ingress deny",
    },
    DemoCase {
        what: "dns",
        target: SERVER_V4,
        proto: "udp",
        port: 53,
        allowed: true,
        why: "GatewayPolicy/allow-dns",
    },
    DemoCase {
        what: "syslog",
        target: SERVER_V4,
        proto: "udp",
        port: 514,
        allowed: false,
        why: "default ingress deny",
    },
];

/// Runs the demo. `template` is the lab gateway config; its `policy_dir` is used as is.
pub fn run(exe: &Path, template: &Path, prefix: &str, queues: u32) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted))?;
    }
    let cfg = gateway::config::Config::load(template)?;
    let lab = Lab::new(prefix, queues)?;
    println!("== building lab `{prefix}` ({queues} queue(s)): client {CLIENT_V4} -> [ext portcullis int] -> server {SERVER_V4}");
    lab.up()?;
    let guard = LabGuard(lab.clone());
    let workdir = PathBuf::from(format!("/tmp/portcullis-lab-{prefix}"));
    std::fs::create_dir_all(&workdir)?;
    let config = workdir.join("gateway.yaml");
    lab.write_config(template, &cfg.policy_dir, &config)?;
    let log = workdir.join("gateway.log");
    let metrics = cfg
        .metrics
        .listen
        .context("the demo reads counters from the metrics endpoint; set metrics.listen")?;
    let mut gw = GatewayProcess::spawn(&lab, exe, &config, metrics, &log)?;
    println!("== gateway starting (log: {})", log.display());
    gw.wait_ready(Duration::from_secs(20))?;

    let ports = |proto: &str| -> Vec<u16> {
        let set: std::collections::BTreeSet<u16> = PROBES
            .iter()
            .filter(|p| p.proto == proto)
            .map(|p| p.port)
            .collect();
        set.into_iter().collect()
    };
    let (tcp_ports, udp_ports) = (ports("tcp"), ports("udp"));
    let servers = Servers::start(&lab.server_ns(), &tcp_ports, &udp_ports)?;

    println!("\n== probes from the client ({CLIENT_V4})\n");
    println!("| probe | destination | policy says | observed | ok |");
    println!("|---|---|---|---|---|");
    let mut failures = 0;
    for p in PROBES {
        if interrupted.load(Relaxed) {
            bail!("interrupted");
        }
        let (observed, passed) = match p.proto {
            "tcp" => {
                let o = tcp_connect(
                    &lab.client_ns(),
                    addr(p.target, p.port),
                    Duration::from_millis(1500),
                )?;
                let text = match &o {
                    TcpOutcome::Connected => "connected".to_string(),
                    TcpOutcome::Refused => "refused".to_string(),
                    TcpOutcome::TimedOut => "timed out (dropped)".to_string(),
                    TcpOutcome::Failed(e) => format!("error: {e}"),
                };
                (text, o == TcpOutcome::Connected)
            }
            _ => {
                let sent = udp_stream(
                    &lab.client_ns(),
                    addr(p.target, p.port),
                    20,
                    200,
                    Duration::from_secs(2),
                )?;
                let log = wait_udp(
                    &servers,
                    p.port,
                    sent,
                    Duration::from_millis(if p.allowed { 2000 } else { 500 }),
                );
                (
                    format!("{}/{} datagrams arrived", log.seqs.len(), sent),
                    log.seqs.len() as u64 == sent && sent > 0,
                )
            }
        };
        let ok = passed == p.allowed;
        failures += usize::from(!ok);
        println!(
            "| {} {}/{} | {} | {} ({}) | {} | {} |",
            p.what,
            p.proto,
            p.port,
            p.target,
            if p.allowed { "allow" } else { "deny" },
            p.why,
            observed,
            if ok { "yes" } else { "NO" }
        );
    }

    // The other way: the server opens a connection out. Its SYN-ACK comes back through the
    // default-deny ingress because the connection tracker knows the flow.
    println!("\n== from the server ({SERVER_V4}), out through the gateway\n");
    println!("| probe | destination | policy says | observed | ok |");
    println!("|---|---|---|---|---|");
    let outside = Servers::start(&lab.client_ns(), &[7000], &[])?;
    let o = tcp_connect(
        &lab.server_ns(),
        addr(CLIENT_V4, 7000),
        Duration::from_millis(1500),
    )?;
    let ok = o == TcpOutcome::Connected;
    failures += usize::from(!ok);
    println!(
        "| outbound tcp/7000 | {CLIENT_V4} | allow (default egress allow; the reply is tracked) | {} | {} |",
        if ok { "connected".to_string() } else { format!("{o:?}") },
        if ok { "yes" } else { "NO" }
    );
    drop(outside);

    let status = gw.status()?;
    if let Some(ct) = &status.conntrack {
        let t = &status.totals;
        println!(
            "\n== connection tracker: {} flow(s) of {} ({} KiB); {} opened, {} packets passed as established",
            ct.entries,
            ct.capacity,
            ct.memory_bytes / 1024,
            t.ct_count(gateway::stats::CtEvent::New),
            t.ct_count(gateway::stats::CtEvent::Established)
        );
    }
    println!(
        "\n== per-rule counters (table generation {})\n",
        status.policy.generation
    );
    println!("| # | rule | layer | hits |");
    println!("|---|---|---|---|");
    for r in &status.rules {
        let pos = r.rule.map_or(String::new(), |p| format!(" [{p}]"));
        println!(
            "| {} | {}{} | {:?} | {} |",
            r.index, r.object, pos, r.layer, r.hits
        );
    }
    let t = &status.totals;
    println!(
        "\n== datapath: ext->int {} rx / {} forwarded, int->ext {} rx / {} forwarded, {} non-IP frames (ARP) forwarded",
        t.rx_ingress, t.tx_ingress, t.rx_egress, t.tx_egress, t.l2_forwarded
    );
    println!("== drops by reason: {}", t.drop_summary());
    drop(servers);

    let exit = gw.stop(Duration::from_secs(10))?;
    let leftover: Vec<String> = [lab.ext(), lab.int()]
        .into_iter()
        .filter(|i| lab.xdp_program(i).is_some())
        .collect();
    println!(
        "== gateway stopped ({exit}); XDP programs left attached: {}",
        if leftover.is_empty() {
            "none".to_string()
        } else {
            leftover.join(", ")
        }
    );
    drop(guard);
    println!("== lab `{prefix}` torn down");
    if failures > 0 || !exit.success() || !leftover.is_empty() {
        bail!("{failures} probe(s) did not match the policy");
    }
    println!("\nall {} probes matched the policy", PROBES.len() + 1);
    Ok(())
}
