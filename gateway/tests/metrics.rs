//! The observability endpoints, served by the real server on loopback:
//!
//! - clients that connect and send nothing (or half a request) delay nobody else: `/healthz`
//!   answers well within a kubelet probe's 1 s while they hang on;
//! - `/metrics` parses with an independent Prometheus text parser, and says what `/status` says;
//! - `/status` reads back as the [`Status`] type.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use control::reload::Reloader;
use gateway::config::Config;
use gateway::conntrack::{Conntrack, Timeouts};
use gateway::metrics::{bind, serve_with, Access, Listener, Observed, Status};
use gateway::stats::{SharedLatency, Tally, WorkerCounters};

struct Server {
    addr: SocketAddr,
    counters: Arc<WorkerCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn server() -> Server {
    server_with(Access::Admin)
}

/// The metrics listener as `run` serves it: read-only.
fn metrics_only() -> Server {
    server_with(Access::Metrics)
}

fn server_with(access: Access) -> Server {
    server_full(access, false)
}

fn server_full(access: Access, kube: bool) -> Server {
    let cfg = Config::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/lab/gateway.yaml"),
    )
    .unwrap();
    let reloader = Reloader::new(&cfg.policy_dir, cfg.context.clone(), 1).unwrap();
    let counters = Arc::new(WorkerCounters::default());
    let obs = Arc::new(Observed {
        started: Instant::now(),
        config: cfg.path.display().to_string(),
        ext: "ext0".into(),
        int: "int0".into(),
        queues: 1,
        copy_mode: AtomicBool::new(true),
        forwarding: AtomicBool::new(true),
        counters: vec![Arc::clone(&counters)],
        latency: vec![Arc::new(SharedLatency::default())],
        reloader: Arc::new(Mutex::new(reloader)),
        kubernetes: OnceLock::new(),
        sockets: Mutex::new(Vec::new()),
        conntrack: Some(Arc::new(Conntrack::new(1024, Timeouts::default()))),
        monitor: None,
    });
    if kube {
        let _ = obs.kubernetes.set(Arc::new(Mutex::new(
            control::source::kubernetes::Status::new("https://api.example:6443".into()),
        )));
    }
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || serve_with(Listener::Tcp(listener), access, obs, stop))
    };
    Server {
        addr,
        counters,
        stop,
        thread: Some(thread),
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, "")
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

#[test]
fn stuck_clients_do_not_delay_healthz() {
    let srv = server();
    // Three clients that connect and send nothing, and one that sends half a request head.
    let mut stuck: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    let mut half = TcpStream::connect(srv.addr).unwrap();
    half.write_all(b"GET /metr").unwrap();
    stuck.push(half);
    std::thread::sleep(Duration::from_millis(100));
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let (code, body) = get(srv.addr, "/healthz");
        worst = worst.max(started.elapsed());
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("ok"), "{body}");
    }
    eprintln!("/healthz with 4 stuck clients: worst of 20 = {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "a stuck client delayed /healthz to {worst:?}"
    );
    // The server hangs up on clients that never finish their request head.
    let mut buf = [0u8; 64];
    let s = &mut stuck[0];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "an idle connection was closed by the server's head timeout (read {n} bytes)"
    );
}

#[test]
fn metrics_parse_and_agree_with_status() {
    let srv = server();
    let mut tally = Tally::default();
    tally.rx[0] = 7;
    tally.tx[0] = 5;
    tally.drop(gateway::stats::Reason::DefaultDeny);
    tally.drop(gateway::stats::Reason::DefaultDeny);
    srv.counters.flush(&mut tally);

    let (code, body) = get(srv.addr, "/status");
    assert_eq!(code, 200);
    let status: Status = serde_json::from_str(&body).expect("/status reads back as Status");
    assert_eq!(status.totals.rx_ingress, 7);
    assert_eq!(status.totals.drop_summary(), "default_deny=2");
    assert!(status.policy.generation >= 1);

    let (code, text) = get(srv.addr, "/metrics");
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name} is not a plain value: {other:?}"),
        }
    };
    assert_eq!(
        value("portcullis_drops_total", &[("reason", "default_deny")]),
        2.0
    );
    assert_eq!(value("portcullis_healthy", &[]), 1.0);
    assert_eq!(value("portcullis_conntrack_capacity", &[]), 1024.0);
    assert_eq!(value("portcullis_conntrack_entries", &[]), 0.0);
    assert_eq!(
        value("portcullis_conntrack_new_total", &[("worker", "0")]),
        0.0
    );
    assert_eq!(
        value("portcullis_table_generation", &[]),
        status.policy.generation as f64
    );
    // Conventions dashboards rely on (prometheus.io/docs/practices/naming): base units, counters
    // end in `_total`, no series twice, no label that moves when a rule is inserted above.
    let mut series = std::collections::BTreeSet::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let key = l.rsplit_once(' ').unwrap().0.to_string();
        assert!(series.insert(key.clone()), "duplicate series {key}");
        for bad in ["nanoseconds", "milliseconds", "_ms{", "_ns{", "index=\""] {
            assert!(
                !key.contains(bad),
                "{key}: not in base units / unstable label"
            );
        }
    }
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = l.split_once(' ').unwrap();
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} does not end in _total"
            );
        }
        if kind == "summary" {
            panic!("{name}: summaries cannot be aggregated across workers; use a histogram");
        }
    }
    assert!(
        !text.contains("portcullis_conntrack_full_drops_total"),
        "duplicates portcullis_drops_total{{reason=\"conntrack_full\"}}"
    );
    let build = scrape
        .samples
        .iter()
        .find(|s| s.metric == "portcullis_build_info")
        .expect("portcullis_build_info");
    assert!(build.labels.get("version").is_some() && build.labels.get("commit").is_some());
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
    ] {
        assert!(scrape.samples.iter().any(|s| s.metric == name), "no {name}");
    }
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(value("process_open_fds", &[]) >= 3.0);
    assert!(
        text.contains("portcullis_burst_service_seconds_bucket{worker=\"0\",le=\"+Inf\"}"),
        "{text}"
    );
    // Every family has HELP and TYPE, and every sample belongs to a family.
    for s in &scrape.samples {
        let family = s
            .metric
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            scrape.docs.contains_key(family) || scrape.docs.contains_key(&s.metric),
            "{} has no HELP",
            s.metric
        );
    }
}

#[test]
fn unknown_paths_and_bad_explain_queries_get_clear_answers() {
    let srv = server();
    let (code, body) = get(srv.addr, "/nope");
    assert_eq!(code, 404);
    assert!(body.contains("/healthz"));
    let (code, body) = get(srv.addr, "/explain?src=10.99.0.1&dst=nowhere");
    assert_eq!(code, 400, "{body}");
    let (code, body) = get(
        srv.addr,
        "/explain?src=10.99.0.1&dst=10.99.0.2&proto=tcp&dport=22",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("deny-ssh"), "{body}");
    let (code, body) = get(srv.addr, "/conntrack?addr=10.99.0.1&proto=udp");
    assert_eq!((code, body.trim()), (200, "[]"));
    let (code, body) = get(srv.addr, "/conntrack?addr=nowhere");
    assert_eq!(code, 400, "{body}");
}

/// A rule's hit series keeps its labels when another rule is inserted above it: the labels are
/// the rule's id (a hash of its origin and match) and its origin, never its table position.
#[test]
fn rule_hit_labels_survive_an_insertion_above() {
    use policy::compile::{compile, GatewayContext};
    use policy::object::add_object;
    use policy::snapshot::Snapshot;
    let policy = |name: &str, priority: u32, port: u16| {
        format!("apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {{name: {name}}}\nspec: {{priority: {priority}, ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [{port}]}}}}]}}")
    };
    let labels = |docs: &[String]| {
        let mut snap = Snapshot::default();
        for (i, d) in docs.iter().enumerate() {
            add_object(
                serde_norway::from_str(d).unwrap(),
                &format!("t#{i}"),
                &mut snap,
            )
            .unwrap();
        }
        let c = compile(&snap, &GatewayContext::default()).unwrap();
        let r = c
            .rules
            .rules()
            .iter()
            .position(|r| r.origin.object == "GatewayPolicy/web")
            .unwrap();
        let rule = &c.rules.rules()[r];
        (
            r,
            format!(
                "rule=\"{}\",layer=\"gateway\",object=\"{}\",position=\"{}\"",
                rule.id,
                rule.origin.object,
                rule.origin.index.unwrap()
            ),
        )
    };
    let (before_at, before) = labels(&[policy("web", 100, 443)]);
    let (after_at, after) = labels(&[policy("web", 100, 443), policy("first", 10, 22)]);
    assert_ne!(before_at, after_at, "the rule moved down the table");
    assert_eq!(before, after, "but its series did not change");
}

/// The metrics listener is read-only and shows no policy detail: a scraper and a probe get
/// `/metrics` and `/healthz`; DELETE and POST (a flush), `/status`, `/explain` and `/conntrack`
/// are refused there (they are the admin API's).
#[test]
fn the_metrics_listener_is_read_only() {
    let srv = metrics_only();
    assert_eq!(get(srv.addr, "/metrics").0, 200);
    assert_eq!(get(srv.addr, "/healthz").0, 200);
    for method in ["DELETE", "POST", "PUT"] {
        let (code, body) = request(srv.addr, method, "/metrics", "");
        assert_eq!(code, 405, "{method}: {body}");
        assert!(body.contains("read-only"), "{body}");
    }
    for path in [
        "/status",
        "/explain?src=10.99.0.1&dst=10.99.0.2",
        "/conntrack",
    ] {
        let (code, body) = get(srv.addr, path);
        assert_eq!(code, 404, "{path}: {body}");
        assert!(body.contains("admin API"), "{body}");
    }
    let (code, _) = request(srv.addr, "DELETE", "/conntrack", "");
    assert_eq!(code, 404);
}

/// The admin API over TCP answers only with the token.
#[test]
fn the_tcp_admin_api_needs_its_token() {
    let srv = server_with(Access::Token("0123456789abcdef0123".into()));
    assert_eq!(get(srv.addr, "/status").0, 401);
    assert_eq!(
        request(
            srv.addr,
            "GET",
            "/status",
            "Authorization: Bearer wrong\r\n"
        )
        .0,
        401
    );
    assert_eq!(
        request(
            srv.addr,
            "GET",
            "/status",
            "Authorization: Bearer 0123456789abcdef0123\r\n"
        )
        .0,
        200
    );
}

/// Every metric the shipped dashboard and alerts use exists: in the exposition, or (for the
/// Kubernetes source's, absent here) in the code that renders it.
#[test]
fn the_dashboard_and_alerts_use_metrics_that_exist() {
    let srv = server();
    let (_, text) = get(srv.addr, "/metrics");
    let code = include_str!("../src/metrics/prometheus.rs");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/monitoring");
    let mut checked = 0;
    for file in ["alerts.yaml", "grafana-dashboard.json"] {
        let body = std::fs::read_to_string(dir.join(file)).unwrap();
        if file.ends_with(".json") {
            let _: serde_json::Value = serde_json::from_str(&body).expect("the dashboard is JSON");
        }
        let bytes = body.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let rest = &body[i..];
            let starts = rest.starts_with("portcullis_") || rest.starts_with("process_");
            let boundary =
                i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            if starts && boundary {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                i += name.len();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                let exported = text.contains(&format!("# TYPE {family} "));
                let rendered = code.contains(&format!("\"{family}\""))
                    || code.contains(&format!("\"{family}{{"));
                assert!(
                    exported || rendered,
                    "{file} uses {name}, which Portcullis does not export"
                );
                checked += 1;
            } else {
                i += 1;
            }
        }
    }
    assert!(checked > 20, "{checked} metric references");
}

/// docs/metrics.md is the exposition's families (name, type, help), generated from the code:
/// `PORTCULLIS_WRITE_DOCS=1 cargo test -p gateway --test metrics` rewrites it.
#[test]
fn the_metrics_reference_matches_the_code() {
    let srv = server_full(Access::Admin, true);
    let (_, text) = get(srv.addr, "/metrics");
    let mut help = std::collections::BTreeMap::new();
    let mut kinds = std::collections::BTreeMap::new();
    let mut labels: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("# HELP ") {
            let (n, h) = r.split_once(' ').unwrap();
            help.insert(n.to_string(), h.to_string());
        } else if let Some(r) = l.strip_prefix("# TYPE ") {
            let (n, k) = r.split_once(' ').unwrap();
            kinds.insert(n.to_string(), k.to_string());
        } else if let Some((series, _)) = l.rsplit_once(' ') {
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| kinds.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            let set = labels.entry(family.to_string()).or_default();
            for pair in rest
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
            {
                let k = pair.split('=').next().unwrap();
                if k != "le" {
                    set.insert(k.to_string());
                }
            }
        }
    }
    let mut doc = String::from("# Metrics reference\n\nEvery metric family `/metrics` exposes, generated from the code by `gateway/tests/metrics.rs` (CI fails when this file and the code disagree; `PORTCULLIS_WRITE_DOCS=1 cargo test -p gateway --test metrics` rewrites it). Counters end in `_total`; times are in seconds and sizes in bytes. Rule hits are labelled by the rule's stable id and origin, never by its position in the table, so a series keeps its labels when a rule is inserted above.\n\n| metric | type | labels | meaning |\n| --- | --- | --- | --- |\n");
    for (name, kind) in &kinds {
        let l = labels
            .get(name)
            .map(|s| s.iter().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        doc.push_str(&format!(
            "| `{name}` | {kind} | {l} | {} |\n",
            help.get(name)
                .map(String::as_str)
                .unwrap_or("")
                .replace('|', "\\|")
        ));
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    if std::env::var_os("PORTCULLIS_WRITE_DOCS").is_some() {
        std::fs::write(&path, &doc).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == doc,
        "docs/metrics.md does not match the exposition; run PORTCULLIS_WRITE_DOCS=1 cargo test -p gateway --test metrics"
    );
}
