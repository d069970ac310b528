//! Observability: `/metrics` (Prometheus text), `/status` (JSON) and `/healthz`, served by a small
//! blocking HTTP/1.0 server on its own thread, on localhost by default. It reads worker counters
//! (relaxed loads) and the reloader's state (a mutex the datapath never touches).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use control::publish::RuleHits;
use control::reload::{ReloadStatus, Reloader, SWAP_BUCKETS_S};
use control::source::kubernetes::{self, KindState};
use serde::Serialize;

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
    pub counters: Vec<Arc<WorkerCounters>>,
    pub latency: Vec<Arc<SharedLatency>>,
    pub reloader: Arc<Mutex<Reloader>>,
    /// The Kubernetes source's state, when watching the API.
    pub kubernetes: OnceLock<Arc<Mutex<kubernetes::Status>>>,
    /// (worker, interface, AF_XDP socket fd), for the kernel's own drop counters.
    pub sockets: Mutex<Vec<(usize, String, i32)>>,
}

/// The kernel's view of one AF_XDP socket.
#[derive(Debug, Serialize)]
pub struct KernelSocket {
    pub worker: usize,
    pub iface: String,
    #[serde(flatten)]
    pub stats: KernelStats,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_s: u64,
    pub config: String,
    pub ext: String,
    pub int: String,
    pub queues: u32,
    pub copy_mode: bool,
    pub policy: ReloadStatus,
    /// The Kubernetes API source, when configured.
    pub kubernetes: Option<kubernetes::Status>,
    /// Cumulative (le seconds, count) buckets of the event-to-swap latency, and its sum.
    pub event_to_swap_buckets: Vec<(f64, u64)>,
    pub event_to_swap_sum_s: f64,
    pub totals: CounterSnapshot,
    pub workers: Vec<CounterSnapshot>,
    pub burst_latency: LatencySummary,
    /// Frames the kernel dropped before the gateway saw them, per socket.
    pub kernel: Vec<KernelSocket>,
    pub rules: Vec<RuleHits>,
}

impl Observed {
    pub fn status(&self) -> Status {
        let workers: Vec<CounterSnapshot> = self.counters.iter().map(|c| c.snapshot()).collect();
        let mut totals = CounterSnapshot::default();
        for w in &workers {
            totals.add(w);
        }
        let mut h = new_histogram();
        for l in &self.latency {
            l.merge_into(&mut h);
        }
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
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config.clone(),
            ext: self.ext.clone(),
            int: self.int.clone(),
            queues: self.queues,
            copy_mode: self.copy_mode.load(Relaxed),
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
        }
    }
}

/// Whether the gateway is healthy, and why not: a rejected policy reload, or a Kubernetes source
/// that is not synced or cannot reach the API (the last good table keeps forwarding either way).
/// Healthy may still come with notes: malformed API objects that are being skipped.
pub fn health(s: &Status) -> Result<Vec<String>, String> {
    let mut why = Vec::new();
    let mut notes = Vec::new();
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
        why.extend(notes);
        Err(why.join("\n"))
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric family's HELP and TYPE lines.
fn family(name: &str, kind: &str, help: &str, o: &mut String) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders the Prometheus text exposition.
pub fn prometheus(s: &Status) -> String {
    let mut o = String::new();
    for (name, help, get) in [
        (
            "portcullis_rx_packets_total",
            "Frames received, per worker and direction (ingress = received on ext).",
            (|w: &CounterSnapshot| [w.rx_ingress, w.rx_egress]) as fn(&CounterSnapshot) -> [u64; 2],
        ),
        (
            "portcullis_tx_packets_total",
            "Frames forwarded, per worker and direction.",
            |w| [w.tx_ingress, w.tx_egress],
        ),
    ] {
        family(name, "counter", help, &mut o);
        for (i, w) in s.workers.iter().enumerate() {
            let [ingress, egress] = get(w);
            let _ = writeln!(
                o,
                "{name}{{worker=\"{i}\",direction=\"ingress\"}} {ingress}"
            );
            let _ = writeln!(o, "{name}{{worker=\"{i}\",direction=\"egress\"}} {egress}");
        }
    }
    family(
        "portcullis_drops_total",
        "counter",
        "Frames dropped, per worker and reason.",
        &mut o,
    );
    for (i, w) in s.workers.iter().enumerate() {
        for (reason, n) in &w.drops {
            let _ = writeln!(
                o,
                "portcullis_drops_total{{worker=\"{i}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    for (name, help, get) in [
        (
            "portcullis_l2_forwarded_total",
            "Non-IP frames forwarded by the l2 policy.",
            (|w: &CounterSnapshot| w.l2_forwarded) as fn(&CounterSnapshot) -> u64,
        ),
        (
            "portcullis_wakeups_total",
            "Syscalls made to kick TX or the fill ring (need_wakeup).",
            |w| w.wakeups,
        ),
        (
            "portcullis_fill_starved_total",
            "Bursts that found no free frame to refill the fill rings.",
            |w| w.fill_starved,
        ),
        (
            "portcullis_idle_sleeps_total",
            "poll(2) sleeps in idle mode.",
            |w| w.idle_sleeps,
        ),
        (
            "portcullis_bursts_total",
            "Non-empty bursts processed.",
            |w| w.bursts,
        ),
    ] {
        family(name, "counter", help, &mut o);
        for (i, w) in s.workers.iter().enumerate() {
            let _ = writeln!(o, "{name}{{worker=\"{i}\"}} {}", get(w));
        }
    }
    family(
        "portcullis_xsk_kernel_drops_total",
        "counter",
        "Frames the kernel could not hand to the gateway's AF_XDP sockets (XDP_STATISTICS), per socket and kind.",
        &mut o,
    );
    for k in &s.kernel {
        for (kind, v) in [
            ("rx_dropped", k.stats.rx_dropped),
            ("rx_ring_full", k.stats.rx_ring_full),
            ("rx_fill_ring_empty", k.stats.rx_fill_ring_empty_descs),
            ("rx_invalid_desc", k.stats.rx_invalid_descs),
            ("tx_invalid_desc", k.stats.tx_invalid_descs),
        ] {
            let _ = writeln!(o, "portcullis_xsk_kernel_drops_total{{worker=\"{}\",iface=\"{}\",kind=\"{kind}\"}} {v}", k.worker, label(&k.iface));
        }
    }
    family(
        "portcullis_rule_hits_total",
        "counter",
        "Frames that matched each rule of the current table, carried across table swaps.",
        &mut o,
    );
    for r in &s.rules {
        let _ = writeln!(
            o,
            "portcullis_rule_hits_total{{rule=\"{}\",index=\"{}\",layer=\"{}\",object=\"{}\",position=\"{}\"}} {}",
            r.id,
            r.index,
            serde_json::to_value(r.layer).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            label(&r.object),
            r.rule.map_or(String::new(), |p| p.to_string()),
            r.hits
        );
    }
    let p = &s.policy;
    for (name, kind, help, value) in [
        (
            "portcullis_table_generation",
            "gauge",
            "Generation of the table the workers use.",
            p.generation as f64,
        ),
        (
            "portcullis_table_rules",
            "gauge",
            "Rules in the current table.",
            p.rules as f64,
        ),
        (
            "portcullis_table_build_seconds",
            "gauge",
            "Time to build the current classifier.",
            p.build_ms / 1e3,
        ),
        (
            "portcullis_table_compile_seconds",
            "gauge",
            "Time to load and compile the current policies.",
            p.compile_ms / 1e3,
        ),
        (
            "portcullis_table_memory_bytes",
            "gauge",
            "Memory held by the current table.",
            p.memory_bytes as f64,
        ),
        (
            "portcullis_policy_reload_errors_total",
            "counter",
            "Policy reloads rejected (the last good table stayed).",
            p.reloads_failed as f64,
        ),
        (
            "portcullis_policy_reloads_total",
            "counter",
            "Policy reloads published.",
            p.reloads_ok as f64,
        ),
        (
            "portcullis_policy_healthy",
            "gauge",
            "1 when the last reload succeeded.",
            if p.last_error.is_empty() { 1.0 } else { 0.0 },
        ),
        (
            "portcullis_uptime_seconds",
            "gauge",
            "Seconds since start.",
            s.uptime_s as f64,
        ),
        (
            "portcullis_table_last_swap_timestamp_seconds",
            "gauge",
            "Unix time of the last table swap (alert when policies change but this does not).",
            p.last_publish_unix as f64,
        ),
    ] {
        family(name, kind, help, &mut o);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        "portcullis_burst_service_seconds",
        "summary",
        "Time a worker spends on one non-empty burst.",
        &mut o,
    );
    let l = &s.burst_latency;
    for (q, v) in [
        ("0.5", l.p50_ns),
        ("0.99", l.p99_ns),
        ("0.999", l.p999_ns),
        ("1", l.max_ns),
    ] {
        let _ = writeln!(
            o,
            "portcullis_burst_service_seconds{{quantile=\"{q}\"}} {}",
            v as f64 / 1e9
        );
    }
    let _ = writeln!(
        o,
        "portcullis_burst_service_seconds_sum {}",
        l.sum_ns as f64 / 1e9
    );
    let _ = writeln!(o, "portcullis_burst_service_seconds_count {}", l.count);

    family(
        "portcullis_policy_event_to_swap_seconds",
        "histogram",
        "Time from a Kubernetes watch event to the swap of the table that contains it.",
        &mut o,
    );
    for (le, n) in &s.event_to_swap_buckets {
        let _ = writeln!(
            o,
            "portcullis_policy_event_to_swap_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let count = s.policy.event_to_swap.count;
    let _ = writeln!(
        o,
        "portcullis_policy_event_to_swap_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        o,
        "portcullis_policy_event_to_swap_seconds_sum {}",
        s.event_to_swap_sum_s
    );
    let _ = writeln!(o, "portcullis_policy_event_to_swap_seconds_count {count}");
    family(
        "portcullis_healthy",
        "gauge",
        "1 when /healthz answers 200 (policies load, and the Kubernetes API is synced and reachable).",
        &mut o,
    );
    let _ = writeln!(o, "portcullis_healthy {}", u8::from(health(s).is_ok()));
    if let Some(k) = &s.kubernetes {
        kubernetes_metrics(k, &mut o);
    }
    o
}

fn kubernetes_metrics(k: &kubernetes::Status, o: &mut String) {
    for (name, kind, help, value) in [
        (
            "portcullis_kubernetes_synced",
            "gauge",
            "1 once every kind was listed.",
            u64::from(k.synced),
        ),
        (
            "portcullis_kubernetes_api_reachable",
            "gauge",
            "1 while the API server answers.",
            u64::from(k.api_reachable),
        ),
        (
            "portcullis_kubernetes_publishes_total",
            "counter",
            "Kubernetes snapshots compiled and swapped in.",
            k.publishes,
        ),
        (
            "portcullis_kubernetes_publish_errors_total",
            "counter",
            "Kubernetes snapshots rejected by the compiler (the last good table stayed).",
            k.publish_errors,
        ),
        (
            "portcullis_kubernetes_relevant_events_total",
            "counter",
            "Watch events that changed what the compiler reads.",
            k.relevant_events,
        ),
        (
            "portcullis_kubernetes_ignored_events_total",
            "counter",
            "Watch events that changed nothing the compiler reads (status churn, resyncs).",
            k.ignored_events,
        ),
    ] {
        family(name, kind, help, o);
        let _ = writeln!(o, "{name} {value}");
    }
    for (name, kind, help, get) in [
        (
            "portcullis_kubernetes_objects",
            "gauge",
            "Objects held, per kind (malformed ones included).",
            (|s: &kubernetes::KindStatus| s.objects as u64) as fn(&kubernetes::KindStatus) -> u64,
        ),
        (
            "portcullis_kubernetes_invalid_objects",
            "gauge",
            "Objects skipped because they do not parse, per kind.",
            |s| s.invalid as u64,
        ),
        (
            "portcullis_kubernetes_events_total",
            "counter",
            "Watch events received, per kind.",
            |s| s.events,
        ),
        (
            "portcullis_kubernetes_lists_total",
            "counter",
            "Complete lists, per kind (more than 1: relists after 410 Gone or reconnects).",
            |s| s.lists,
        ),
        (
            "portcullis_kubernetes_watch_errors_total",
            "counter",
            "List and watch errors, per kind.",
            |s| s.errors,
        ),
        (
            "portcullis_kubernetes_kind_synced",
            "gauge",
            "1 when the kind is listed (or absent: its CRD is not installed).",
            |s| u64::from(s.state != KindState::Pending),
        ),
    ] {
        family(name, kind, help, o);
        for s in &k.kinds {
            let _ = writeln!(o, "{name}{{kind=\"{}\"}} {}", label(&s.kind), get(s));
        }
    }
}

/// `/explain?src=&dst=&proto=&sport=&dport=&icmp_type=&direction=&format=text|json`: the live
/// table's verdict for one flow.
fn explain(obs: &Observed, path: &str) -> (&'static str, &'static str, String) {
    let bad = |m: String| ("400 Bad Request", "text/plain", format!("{m}\n"));
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let mut fields = serde_json::Map::new();
    let mut json = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = control::explain::percent_decode(v);
        let (k, v) = (k, v.as_str());
        match k {
            "format" => json = v == "json",
            "sport" | "dport" | "icmp_type" => match v.parse::<u16>() {
                Ok(n) => {
                    fields.insert(k.into(), n.into());
                }
                Err(_) => return bad(format!("{k}={v} is not a number")),
            },
            _ => {
                fields.insert(k.into(), v.into());
            }
        }
    }
    let probe: control::explain::Probe = match serde_json::from_value(fields.into()) {
        Ok(p) => p,
        Err(e) => return bad(format!("bad flow: {e} (give src, dst, and optionally proto, sport, dport, icmp_type, direction)")),
    };
    let key = match probe.key() {
        Ok(k) => k,
        Err(e) => return bad(e),
    };
    let report = obs
        .reloader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .explain(&key);
    match report {
        Ok(r) if json => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&r).unwrap_or_default() + "\n",
        ),
        Ok(r) => ("200 OK", "text/plain", r.render()),
        Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
    }
}

fn respond(mut stream: TcpStream, obs: &Observed) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Read the whole request head: a client may send it in several segments.
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (code, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            prometheus(&obs.status()),
        ),
        "/status" => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&obs.status())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        ),
        p if p.starts_with("/explain") => explain(obs, p),
        "/healthz" => match health(&obs.status()) {
            Ok(notes) => (
                "200 OK",
                "text/plain",
                std::iter::once("ok".to_string())
                    .chain(notes)
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n",
            ),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /status, /healthz or /explain?src=IP&dst=IP&proto=tcp&dport=N\n"
                .to_string(),
        ),
    };
    stream.write_all(
        format!(
            "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// Binds the endpoint. Fails at start-up (not later) when the address is taken.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves requests until `stop` is set.
pub fn serve(listener: TcpListener, obs: Arc<Observed>, stop: Arc<AtomicBool>) {
    while !stop.load(Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if let Err(e) = respond(stream, &obs) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A minimal HTTP GET for `portcullis stats` and the lab: returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    // One write: a server that reads the head in one go must see all of it.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// The non-zero drop counters of a `/status` document's `drops` array, as `reason=n, ...`, or
/// `none`.
pub fn drop_summary(drops: &serde_json::Value) -> String {
    let nonzero: Vec<String> = drops
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d[1].as_u64().unwrap_or(0) > 0)
        .map(|d| format!("{}={}", d[0].as_str().unwrap_or("?"), d[1]))
        .collect();
    if nonzero.is_empty() {
        "none".into()
    } else {
        nonzero.join(", ")
    }
}
