//! `kube-latency`: how long a policy change in the Kubernetes API takes to reach the datapath.
//!
//! A test API server (`testkit::apiserver`) serves N compiled rules' worth of GatewayPolicies
//! (10 rules each). The real Kubernetes source watches it and publishes into a real reloader.
//! Then, one at a time, a policy's first rule is flipped between Deny and Allow through the API,
//! and a worker-side `TableReader` (what the datapath uses) is polled until a probe flow's verdict
//! flips. Two latencies per event:
//!
//! - end to end: from the write in the API server to the verdict visible to a worker (watch
//!   delivery, debounce, snapshot, compile, classifier build, swap);
//! - event to swap: from the watch event's arrival at the source to the swap (what the gateway's
//!   `portcullis_policy_event_to_swap_seconds` histogram records).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use control::reload::Reloader;
use control::source::kubernetes::{Connection, KubeSource, Options};
use hdrhistogram::Histogram;
use policy::compile::GatewayContext;
use policy::key::{proto, FlowKey};
use policy::rule::{Direction, Verdict};
use serde_json::{json, Value};
use testkit::apiserver::ApiServer;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Compiled rule counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub rules: Vec<usize>,
    /// Policy changes per rule count, applied one at a time.
    #[arg(long, default_value_t = 200)]
    pub events: usize,
    /// The source's debounce (the gateway's default is 50 ms).
    #[arg(long, default_value_t = 50)]
    pub debounce_ms: u64,
    /// Print a JSON line per rule count instead of the table.
    #[arg(long)]
    pub json: bool,
}

const RULES_PER_POLICY: usize = 10;

fn policy(i: usize, first_action: &str) -> Value {
    let rules: Vec<Value> = (0..RULES_PER_POLICY)
        .map(|j| {
            json!({"action": if j == 0 { first_action } else { "Deny" }, "protocol": "TCP",
                   "source": {"nets": [format!("10.{}.{}.{j}/32", i / 256, i % 256)]},
                   "destination": {"ports": [1000 + j]}})
        })
        .collect();
    json!({"apiVersion": "portcullis.io/v1alpha1", "kind": "GatewayPolicy",
           "metadata": {"name": format!("p{i}")},
           "spec": {"priority": 100, "ingress": rules}})
}

fn probe(i: usize) -> FlowKey {
    let src = std::net::Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 0);
    FlowKey::new(
        Direction::Ingress,
        src.into(),
        "192.0.2.1".parse().unwrap_or_else(|_| unreachable!()),
        proto::TCP,
        40000,
        1000,
    )
}

/// One rule count's figures.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Row {
    pub rules: usize,
    pub objects: usize,
    pub events: usize,
    pub end_to_end_ms: [f64; 3],
    pub event_to_swap_ms: [f64; 3],
    pub compile_ms_p50: f64,
    pub initial_sync_ms: f64,
}

fn quantiles(h: &Histogram<u64>) -> [f64; 3] {
    [0.5, 0.99, 1.0].map(|q| h.value_at_quantile(q) as f64 / 1e3)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn measure(rules: usize, events: usize, debounce: Duration) -> Result<Row> {
    let policies = rules.div_ceil(RULES_PER_POLICY).max(1);
    if policies > 65_536 {
        bail!("at most {} rules", 65_536 * RULES_PER_POLICY);
    }
    let api = ApiServer::start();
    for i in 0..policies {
        api.apply(policy(i, "Deny"));
    }
    let dir = std::env::temp_dir().join(format!("portcullis-kube-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let reloader = Arc::new(Mutex::new(Reloader::new(
        &dir,
        GatewayContext::default(),
        1,
    )?));
    let _ = std::fs::remove_dir_all(&dir);
    let r = Arc::clone(&reloader);
    let started = Instant::now();
    let source = KubeSource::start(
        Connection::Config(Box::new(api.kube_config())),
        Options {
            debounce,
            max_delay: debounce.max(Duration::from_millis(500)),
            ..Options::default()
        },
        Box::new(move |snap, ev| {
            r.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_kubernetes(snap, ev)
        }),
    )?;
    if !source.wait_synced(
        Some(Duration::from_secs(120)),
        Duration::from_secs(60),
        &|| false,
        &|_| {},
    ) {
        bail!("no first sync: {:#?}", source.status());
    }
    let initial_sync_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut reader = reloader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .publisher()
        .reader();
    let compiled = reader.load().rules().len();

    let mut e2e = histogram();
    let mut compile = histogram();
    let mut state = vec![false; policies]; // false: the first rule denies
    for n in 0..events {
        // Spread the changes over the policies, deterministically.
        let i = (n * 7919) % policies;
        state[i] = !state[i];
        let want = if state[i] {
            Verdict::Allow
        } else {
            Verdict::Deny(policy::rule::DenyReason::Policy)
        };
        let key = probe(i);
        let t0 = Instant::now();
        api.apply(policy(i, if state[i] { "Allow" } else { "Deny" }));
        loop {
            if reader.load().decide(&key).verdict == want {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "event {n}: the verdict for {key} never became {want:?}: {:#?}",
                    source.status()
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let _ = e2e.record((t0.elapsed().as_micros() as u64).max(1));
        let ms = reloader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status()
            .compile_ms;
        let _ = compile.record(((ms * 1e3) as u64).max(1));
    }
    let r = reloader.lock().unwrap_or_else(|p| p.into_inner());
    let h = r.swap_latency();
    let row = Row {
        rules: compiled,
        objects: policies,
        events,
        end_to_end_ms: quantiles(&e2e),
        event_to_swap_ms: quantiles(h),
        compile_ms_p50: compile.value_at_quantile(0.5) as f64 / 1e3,
        initial_sync_ms,
    };
    drop(r);
    drop(source);
    Ok(row)
}

pub(crate) fn run(a: Args) -> Result<()> {
    let debounce = Duration::from_millis(a.debounce_ms);
    if !a.json {
        println!(
            "kube-latency: {} sequential policy changes per size through a test API server; debounce {} ms\n",
            a.events, a.debounce_ms
        );
        println!("| compiled rules | objects | first sync | compile p50 | event to swap p50 / p99 / max | end to end p50 / p99 / max |");
        println!("|---|---|---|---|---|---|");
    }
    for &n in &a.rules {
        let r = measure(n, a.events, debounce).with_context(|| format!("{n} rules"))?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "| {} | {} | {:.0} ms | {:.2} ms | {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms |",
                r.rules,
                r.objects,
                r.initial_sync_ms,
                r.compile_ms_p50,
                r.event_to_swap_ms[0],
                r.event_to_swap_ms[1],
                r.event_to_swap_ms[2],
                r.end_to_end_ms[0],
                r.end_to_end_ms[1],
                r.end_to_end_ms[2]
            );
        }
    }
    Ok(())
}
