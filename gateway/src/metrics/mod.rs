//! Observability: what `/metrics` (Prometheus text), `/status` (JSON), `/healthz` and `/explain`
//! show, served by hyper on its own thread ([`http`]), on localhost by default. It reads worker
//! counters (relaxed loads) and the reloader's state (a mutex the datapath never touches).
//!
//! - [`Status`] is the `/status` document, a type both ways: the CLI and the tests read it back;
//! - [`prometheus`] renders the exposition;
//! - [`http`] serves the endpoints with timeouts, so a slow client delays nobody else.

mod http;
mod prometheus;

pub use http::{bind, bind_unix, serve, serve_with, Access, Listener};
pub use prometheus::prometheus;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use control::publish::RuleHits;
use control::reload::{ReloadStatus, Reloader, SWAP_BUCKETS_S};
use control::source::kubernetes;
use serde::{Deserialize, Serialize};

use crate::conntrack::Conntrack;
use crate::stats::{new_histogram, CounterSnapshot, LatencySummary, SharedLatency, WorkerCounters};
use crate::sys::xsk::{kernel_stats, KernelStats};

/// What the observability endpoints read. Shared by the control thread and the HTTP thread.
pub struct Observed {
    pub started: Instant,
    pub config: String,
    pub ext: String,
    pub int: String,
    pub queues: u32,
    /// Set once the sockets are open (the endpoint serves before that, while waiting for the
    /// Kubernetes API).
    pub copy_mode: AtomicBool,
    /// Set once the workers run on open sockets: until then `/healthz` says "starting".
    pub forwarding: AtomicBool,
    pub counters: Vec<Arc<WorkerCounters>>,
    pub latency: Vec<Arc<SharedLatency>>,
    pub reloader: Arc<Mutex<Reloader>>,
    /// The Kubernetes source's state, when watching the API.
    pub kubernetes: OnceLock<Arc<Mutex<kubernetes::Status>>>,
    /// (worker, interface, AF_XDP socket fd), for the kernel's own drop counters.
    pub sockets: Mutex<Vec<(usize, String, i32)>>,
    /// The connection tracker, when enabled.
    pub conntrack: Option<Arc<Conntrack>>,
    /// The live verdict feed (`GET /monitor` on the admin API), when the workers record one.
    pub monitor: Option<Feed>,
}

/// The workers' verdict queues and the broadcast `/monitor` listeners read: a pump thread
/// ([`Feed::pump`]) moves batches from the one to the other while anyone listens.
#[derive(Clone)]
pub struct Feed {
    pub monitor: Arc<crate::monitor::Monitor>,
    pub batches: tokio::sync::broadcast::Sender<Arc<Vec<crate::monitor::Event>>>,
}

impl Feed {
    pub fn new(monitor: Arc<crate::monitor::Monitor>) -> Feed {
        Feed {
            monitor,
            batches: tokio::sync::broadcast::channel(256).0,
        }
    }

    /// Moves queued events to the listeners every 20 ms until `stop`.
    pub fn pump(&self, stop: &AtomicBool) {
        let mut batch = Vec::new();
        while !stop.load(Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            if self.monitor.listeners() == 0 {
                continue;
            }
            self.monitor.drain(&mut batch);
            if !batch.is_empty() {
                let _ = self.batches.send(Arc::new(std::mem::take(&mut batch)));
            }
        }
    }
}

/// The connection tracker's size, for `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConntrackStatus {
    pub entries: usize,
    pub capacity: usize,
    pub memory_bytes: usize,
}

/// The kernel's view of one AF_XDP socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelSocket {
    pub worker: usize,
    pub iface: String,
    #[serde(flatten)]
    pub stats: KernelStats,
}

/// What the binary was built from, set once by the binary at start (the library crates are not
/// rebuilt for every commit).
static BUILD: OnceLock<(String, String)> = OnceLock::new();

/// Records the commit and build date `portcullis --version` names, for `/status` and
/// `portcullis_build_info`.
pub fn set_build_info(commit: &str, date: &str) {
    let _ = BUILD.set((commit.to_string(), date.to_string()));
}

fn build_info() -> (String, String) {
    BUILD
        .get()
        .cloned()
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

/// Upper bounds (seconds) of the burst service-time histogram buckets.
pub const BURST_BUCKETS_S: [f64; 12] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2,
];

/// One worker's burst service times as a Prometheus histogram.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerLatency {
    /// Cumulative (le seconds, count) buckets.
    pub buckets: Vec<(f64, u64)>,
    pub sum_s: f64,
    pub count: u64,
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The commit and date the binary was built from.
    #[serde(default)]
    pub commit: String,
    #[serde(default)]
    pub build_date: String,
    pub uptime_s: u64,
    pub config: String,
    pub ext: String,
    pub int: String,
    pub queues: u32,
    pub copy_mode: bool,
    /// The workers run on open sockets (false while starting, e.g. waiting for the API).
    #[serde(default)]
    pub forwarding: bool,
    pub policy: ReloadStatus,
    /// The Kubernetes API source, when configured.
    pub kubernetes: Option<kubernetes::Status>,
    /// Cumulative (le seconds, count) buckets of the event-to-swap latency, and its sum.
    pub event_to_swap_buckets: Vec<(f64, u64)>,
    pub event_to_swap_sum_s: f64,
    pub totals: CounterSnapshot,
    pub workers: Vec<CounterSnapshot>,
    pub burst_latency: LatencySummary,
    /// Per worker, for the histograms.
    #[serde(default)]
    pub worker_latency: Vec<WorkerLatency>,
    /// Frames the kernel dropped before the gateway saw them, per socket.
    pub kernel: Vec<KernelSocket>,
    pub rules: Vec<RuleHits>,
    /// The connection tracker's size (its events are in the counters), when enabled.
    #[serde(default)]
    pub conntrack: Option<ConntrackStatus>,
}

impl Observed {
    pub fn status(&self) -> Status {
        let workers: Vec<CounterSnapshot> = self.counters.iter().map(|c| c.snapshot()).collect();
        let mut totals = CounterSnapshot::default();
        for w in &workers {
            totals.add(w);
        }
        let mut h = new_histogram();
        let mut worker_latency = Vec::with_capacity(self.latency.len());
        for l in &self.latency {
            let mut one = new_histogram();
            l.merge_into(&mut one);
            worker_latency.push(WorkerLatency {
                buckets: BURST_BUCKETS_S
                    .iter()
                    .map(|le| (*le, one.count_between(0, (le * 1e9) as u64)))
                    .collect(),
                sum_s: one.mean() * one.len() as f64 / 1e9,
                count: one.len(),
            });
            let _ = h.add(&one);
        }
        let (commit, build_date) = build_info();
        let (policy, rules, buckets, sum) = {
            let mut r = self.reloader.lock().unwrap_or_else(|p| p.into_inner());
            let h = r.swap_latency();
            let buckets = SWAP_BUCKETS_S
                .iter()
                .map(|le| (*le, h.count_between(0, (le * 1e6) as u64)))
                .collect();
            let sum = r.swap_latency_sum_s();
            (r.status().clone(), r.rule_hits(), buckets, sum)
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            commit,
            build_date,
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config.clone(),
            ext: self.ext.clone(),
            int: self.int.clone(),
            queues: self.queues,
            copy_mode: self.copy_mode.load(Relaxed),
            forwarding: self.forwarding.load(Relaxed),
            policy,
            kubernetes: self
                .kubernetes
                .get()
                .map(|k| k.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            event_to_swap_buckets: buckets,
            event_to_swap_sum_s: sum,
            totals,
            workers,
            burst_latency: LatencySummary::of(&h),
            worker_latency,
            kernel: self
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(|(worker, iface, fd)| {
                    Some(KernelSocket {
                        worker: *worker,
                        iface: iface.clone(),
                        stats: kernel_stats(*fd)?,
                    })
                })
                .collect(),
            rules,
            conntrack: self.conntrack.as_ref().map(|ct| ConntrackStatus {
                entries: ct.entries(),
                capacity: ct.capacity(),
                memory_bytes: ct.memory_bytes(),
            }),
        }
    }
}

/// Whether the gateway is healthy, and why not: a rejected policy reload, or a Kubernetes source
/// that is not synced or cannot reach the API (the last good table keeps forwarding either way).
/// Healthy may still come with notes: malformed API objects that are being skipped.
pub fn health(s: &Status) -> Result<Vec<String>, Unhealthy> {
    let mut why = Vec::new();
    if !s.forwarding {
        why.push("starting: the sockets are not open and the workers not running yet".to_string());
    }
    let mut notes = Vec::new();
    if let Some(first) = s.policy.rejected.first() {
        notes.push(format!(
            "{} Kubernetes object(s) over the compile budget left out (see /status): {first}",
            s.policy.rejected.len()
        ));
    }
    if !s.policy.last_error.is_empty() {
        why.push(format!(
            "policy reload failing; serving the last good table (generation {}): {}",
            s.policy.generation,
            s.policy.last_error.join("; ")
        ));
    }
    if let Some(k) = &s.kubernetes {
        if !k.synced || k.publishes == 0 {
            why.push(format!(
                "Kubernetes API {} not synced yet; pending: {}",
                k.server,
                k.pending().join(", ")
            ));
        }
        if !k.api_reachable {
            why.push(format!(
                "Kubernetes API {} unreachable{}; serving the last good table (generation {}): {}",
                k.server,
                k.unreachable_since_unix
                    .map(|t| format!(" since unix time {t}"))
                    .unwrap_or_default(),
                s.policy.generation,
                k.last_error.as_deref().unwrap_or("no answer")
            ));
        }
        if let Some(e) = &k.last_publish_error {
            why.push(format!("the Kubernetes snapshot was rejected: {e}"));
        }
        let invalid: usize = k.kinds.iter().map(|x| x.invalid).sum();
        if invalid > 0 {
            notes.push(format!(
                "{invalid} malformed Kubernetes object(s) skipped (see /status): {}",
                k.invalid_objects.first().map_or("", String::as_str)
            ));
        }
    }
    if why.is_empty() {
        Ok(notes)
    } else {
        Err(Unhealthy {
            reasons: why,
            notes,
        })
    }
}

/// Why `/healthz` is not 200: one line per reason, then the notes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", reasons.iter().chain(notes).cloned().collect::<Vec<_>>().join("\n"))]
pub struct Unhealthy {
    pub reasons: Vec<String>,
    pub notes: Vec<String>,
}
