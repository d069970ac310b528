//! `kube-latency`: how long a policy change in the Kubernetes API takes to reach the datapath.
//!
//! A test API server (`testkit::apiserver`) serves N compiled rules' worth of GatewayPolicies
//! (10 rules each). The real Kubernetes source watches it and publishes into a real reloader.
//! Then, one at a time, a policy's first rule is flipped between Deny and Allow through the API
//! (its Allow form also widens its source, so every change edits a match and rebuilds the
//! classifier),
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
    /// The source's debounce: the least time between two recompiles while events keep coming
    /// (the gateway's default is 50 ms).
    #[arg(long, default_value_t = 50)]
    pub debounce_ms: u64,
    /// After the sequential changes, a storm: this many EndpointSlice updates in one second
    /// (0: none), reported as compiles and event-to-swap quantiles.
    #[arg(long, default_value_t = 500)]
    pub storm: usize,
    /// Print a JSON line per rule count instead of the table.
    #[arg(long)]
    pub json: bool,
}

const RULES_PER_POLICY: usize = 10;

fn policy(i: usize, first_action: &str) -> Value {
    let rules: Vec<Value> = (0..RULES_PER_POLICY)
        .map(|j| {
            // The first rule's Allow form also widens its source to a /31, so every change
            // edits a match and the classifier is rebuilt: the worst case, not the reuse of
            // the classifier that an action-only change gets.
            let len = if j == 0 && first_action == "Allow" {
                31
            } else {
                32
            };
            json!({"action": if j == 0 { first_action } else { "Deny" }, "protocol": "TCP",
                   "source": {"nets": [format!("10.{}.{}.{j}/{len}", i / 256, i % 256)]},
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
    /// The classifier build (`Table::build`), after the compile.
    pub build_ms_p50: f64,
    /// Changes whose table rebuilt its classifier (each edits a match, so all of them should).
    pub classifier_rebuilt: usize,
    pub initial_sync_ms: f64,
    pub storm: Option<Storm>,
}

/// A rollout's churn: EndpointSlice updates as fast as a controller writes them.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Storm {
    pub updates: usize,
    pub seconds: f64,
    /// Tables compiled and published for the whole storm.
    pub compiles: u64,
    pub event_to_swap_ms: [f64; 3],
}

fn endpoint_slice(n: usize) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "storm-abcde", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "storm"}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": [format!("10.250.{}.{}", (n / 250) % 250, n % 250 + 1)],
                          "conditions": {"ready": true}}],
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// Applies `updates` EndpointSlice changes spread over one second, waits for the source to
/// publish them all, and reports how many compiles that took and the event-to-swap quantiles of
/// the storm's events alone.
fn storm(
    api: &ApiServer,
    source: &KubeSource,
    reloader: &Mutex<Reloader>,
    updates: usize,
) -> Result<Storm> {
    let lock = || reloader.lock().unwrap_or_else(|p| p.into_inner());
    let before = lock().swap_latency().clone();
    let publishes = source.status().publishes;
    let started = Instant::now();
    for n in 0..updates {
        let due = started + Duration::from_secs_f64(n as f64 / updates as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        api.apply(endpoint_slice(n));
    }
    let seconds = started.elapsed().as_secs_f64();
    // Every storm event is in a swapped table once the histogram holds them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut h = lock().swap_latency().clone();
        h.subtract(&before).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if h.len() as usize >= updates {
            return Ok(Storm {
                updates,
                seconds,
                compiles: source.status().publishes - publishes,
                event_to_swap_ms: quantiles(&h),
            });
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {updates} storm events reached a table: {:#?}",
                h.len(),
                source.status()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn quantiles(h: &Histogram<u64>) -> [f64; 3] {
    [0.5, 0.99, 1.0].map(|q| h.value_at_quantile(q) as f64 / 1e3)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn measure(rules: usize, events: usize, debounce: Duration, storm_updates: usize) -> Result<Row> {
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
            max_delay: debounce.max(Options::default().max_delay),
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
    let mut build = histogram();
    let mut rebuilt = 0;
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
        let table = reader.load();
        let _ = build.record((table.build_time().as_micros() as u64).max(1));
        rebuilt += usize::from(!table.classifier_reused());
    }
    let r = reloader.lock().unwrap_or_else(|p| p.into_inner());
    let h = r.swap_latency().clone();
    drop(r);
    let storm = (storm_updates > 0)
        .then(|| storm(&api, &source, &reloader, storm_updates))
        .transpose()?;
    let row = Row {
        rules: compiled,
        objects: policies,
        events,
        end_to_end_ms: quantiles(&e2e),
        event_to_swap_ms: quantiles(&h),
        compile_ms_p50: compile.value_at_quantile(0.5) as f64 / 1e3,
        build_ms_p50: build.value_at_quantile(0.5) as f64 / 1e3,
        classifier_rebuilt: rebuilt,
        initial_sync_ms,
        storm,
    };
    drop(source);
    Ok(row)
}

pub(crate) fn run(a: Args) -> Result<()> {
    let debounce = Duration::from_millis(a.debounce_ms);
    if !a.json {
        println!(
            "kube-latency: {} sequential policy changes per size through a test API server, then {} EndpointSlice updates in 1 s; debounce {} ms\n",
            a.events, a.storm, a.debounce_ms
        );
        println!("| compiled rules | objects | first sync | compile p50 | table build p50 (classifier rebuilt) | event to swap p50 / p99 / max | end to end p50 / p99 / max | storm: updates in s, compiles, event to swap p50 / p99 / max |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    for &n in &a.rules {
        let r = measure(n, a.events, debounce, a.storm).with_context(|| format!("{n} rules"))?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let storm = r.storm.as_ref().map_or("-".into(), |s| {
                format!(
                    "{} in {:.2} s, {} compiles, {:.1} / {:.1} / {:.1} ms",
                    s.updates,
                    s.seconds,
                    s.compiles,
                    s.event_to_swap_ms[0],
                    s.event_to_swap_ms[1],
                    s.event_to_swap_ms[2]
                )
            });
            println!(
                "| {} | {} | {:.0} ms | {:.2} ms | {:.2} ms ({} of {}) | {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {storm} |",
                r.rules,
                r.objects,
                r.initial_sync_ms,
                r.compile_ms_p50,
                r.build_ms_p50,
                r.classifier_rebuilt,
                r.events,
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
