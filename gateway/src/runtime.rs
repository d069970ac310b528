//! `portcullis run`: preflight, first compile, sockets, workers, the control thread, the
//! observability endpoint, and a clean shutdown that detaches every XDP program it attached.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use control::reload::Reloader;
use control::source::kubernetes::{self, Connection, KubeSource};
use crossbeam_queue::ArrayQueue;
use policy::key::FlowKey;
use policy::rule::Verdict;

use crate::config::{Config, KubernetesApi, Startup};
use crate::conntrack::Conntrack;
use crate::metrics::{self, Observed};
use crate::preflight;
use crate::stats::{Reason, SharedLatency, WorkerCounters};
use crate::sys::xdp;
use crate::sys::xsk::{open_pair, SocketOptions};
use crate::worker::{self, FlowRecord, WorkerSetup};

/// Detaches the XDP programs from both interfaces when dropped, whatever path leaves `run`.
struct Detach<'a> {
    cfg: &'a Config,
    ifindex: [u32; 2],
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        for (iface, idx) in [
            (&self.cfg.interfaces.ext, self.ifindex[0]),
            (&self.cfg.interfaces.int, self.ifindex[1]),
        ] {
            match xdp::detach(idx, self.cfg.xdp.mode) {
                Ok(()) => tracing::info!(iface = iface.as_str(), "XDP program detached"),
                Err(e) => {
                    tracing::error!(iface = iface.as_str(), error = %e, "could not detach the XDP program; remove it with `ip link set dev {iface} xdp off`")
                }
            }
        }
    }
}

/// Logs the policy warnings that appeared since the last swap (not the same ones at every swap).
fn log_warnings(r: &mut Reloader) {
    let changes = r.warning_changes();
    for w in &changes.new {
        tracing::warn!(warning = w.as_str(), "policy warning");
    }
    if changes.resolved > 0 {
        tracing::info!(resolved = changes.resolved, "policy warnings resolved");
    }
}

/// Runs the gateway until SIGINT/SIGTERM. SIGHUP forces a policy reload.
pub fn run(cfg: Config) -> Result<()> {
    let ifs = preflight::check(&cfg)?;
    let workers = cfg.queues as usize;
    let reloader =
        Reloader::new(&cfg.policy_dir, cfg.context.clone(), workers).with_context(|| {
            format!(
                "the policies in {} do not load; nothing was started",
                cfg.policy_dir.display()
            )
        })?;
    let mut reloader = reloader;
    log_warnings(&mut reloader);
    tracing::info!(
        generation = 1,
        rules = reloader.status().rules,
        build_ms = reloader.status().build_ms,
        "table compiled"
    );
    let reloader = Arc::new(Mutex::new(reloader));

    let stop = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .context("cannot install the SIGHUP handler")?;

    let listener = match cfg.metrics.listen {
        Some(addr) => Some(metrics::bind(addr).with_context(|| {
            format!(
                "cannot listen on {addr} (metrics.listen in {})",
                cfg.path.display()
            )
        })?),
        None => None,
    };
    // The admin API: a unix socket (its permissions decide who may use it) and, when
    // configured, TCP with a bearer token.
    let admin_socket = match &cfg.admin.socket {
        Some(path) => Some((
            metrics::bind_unix(path, cfg.admin.mode).with_context(|| {
                format!(
                    "cannot serve the admin socket {} (admin.socket in {})",
                    path.display(),
                    cfg.path.display()
                )
            })?,
            SocketFile(path.clone()),
        )),
        None => None,
    };
    let admin_tcp = match (cfg.admin.listen, &cfg.admin.token_file) {
        (Some(addr), Some(file)) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read admin.token_file {}", file.display()))?;
            let token = token.trim().to_string();
            if token.len() < 16 {
                anyhow::bail!(
                    "admin.token_file {} holds a token of {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
                    file.display(),
                    token.len()
                );
            }
            let l = metrics::bind(addr).with_context(|| {
                format!(
                    "cannot listen on {addr} (admin.listen in {})",
                    cfg.path.display()
                )
            })?;
            Some((l, Arc::<str>::from(token)))
        }
        _ => None,
    };

    let counters: Vec<Arc<WorkerCounters>> = (0..workers).map(|_| Arc::default()).collect();
    let latency: Vec<Arc<SharedLatency>> = (0..workers).map(|_| Arc::default()).collect();
    let flows = Arc::new(ArrayQueue::<FlowRecord>::new(4096));
    let monitor = Arc::new(crate::monitor::Monitor::new(workers));
    // Allocated once, before any traffic: its memory is fixed from here on.
    let conntrack = cfg.conntrack.enabled.then(|| {
        let ct = Conntrack::new(cfg.conntrack.capacity, cfg.conntrack.timeouts);
        let thp = crate::sys::huge::thp_mode();
        tracing::info!(
            capacity = ct.capacity(),
            memory_bytes = ct.memory_bytes(),
            huge_pages = ct.huge_pages(),
            transparent_hugepage = thp.as_deref().unwrap_or("unknown"),
            "connection tracker ready"
        );
        if ct.huge_pages() && thp.as_deref() == Some("never") {
            tracing::warn!(
                "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled is \
                 `never`): the connection tracker's table uses 4 KiB pages, and lookups in a large \
                 table also miss the TLB; `echo madvise > \
                 /sys/kernel/mm/transparent_hugepage/enabled` lets it use 2 MiB pages"
            );
        }
        Arc::new(ct)
    });
    let obs = Arc::new(Observed {
        started: Instant::now(),
        config: cfg.path.display().to_string(),
        ext: cfg.interfaces.ext.clone(),
        int: cfg.interfaces.int.clone(),
        queues: cfg.queues,
        copy_mode: AtomicBool::new(false),
        forwarding: AtomicBool::new(false),
        counters: counters.clone(),
        latency: latency.clone(),
        reloader: Arc::clone(&reloader),
        kubernetes: OnceLock::new(),
        sockets: Mutex::new(Vec::new()),
        conntrack: conntrack.clone(),
        monitor: Some(metrics::Feed::new(Arc::clone(&monitor))),
    });
    // Every way out of `run` stops the threads started from here on.
    let _stop_threads = StopOnDrop(Arc::clone(&stop));
    let mut handles = Vec::new();
    // Served from the start, so `/healthz` and `portcullis stats` answer while waiting for the
    // Kubernetes API.
    if let Some(l) = listener {
        let (obs, stop) = (Arc::clone(&obs), Arc::clone(&stop));
        handles.push(
            std::thread::Builder::new()
                .name("pc-metrics".into())
                .spawn(move || metrics::serve(l, obs, stop))?,
        );
    }
    if let Some(feed) = obs.monitor.clone() {
        let stop = Arc::clone(&stop);
        handles.push(
            std::thread::Builder::new()
                .name("pc-monitor".into())
                .spawn(move || feed.pump(&stop))?,
        );
    }
    let _admin_file =
        match admin_socket {
            Some((l, file)) => {
                let (obs, stop) = (Arc::clone(&obs), Arc::clone(&stop));
                handles.push(std::thread::Builder::new().name("pc-admin".into()).spawn(
                    move || {
                        metrics::serve_with(
                            metrics::Listener::Unix(l),
                            metrics::Access::Admin,
                            obs,
                            stop,
                        )
                    },
                )?);
                Some(file)
            }
            None => None,
        };
    if let Some((l, token)) = admin_tcp {
        let (obs, stop) = (Arc::clone(&obs), Arc::clone(&stop));
        handles.push(
            std::thread::Builder::new()
                .name("pc-admin-tcp".into())
                .spawn(move || {
                    metrics::serve_with(
                        metrics::Listener::Tcp(l),
                        metrics::Access::Token(token),
                        obs,
                        stop,
                    )
                })?,
        );
    }

    // Kept alive until `run` returns: dropping it stops the watchers.
    let _kube = match &cfg.kubernetes_api {
        Some(api) => {
            let source = start_kubernetes(&cfg, api, &reloader)?;
            let _ = obs.kubernetes.set(source.status_handle());
            if !wait_kubernetes(api, &source, &stop)? {
                tracing::info!("stopped while waiting for the Kubernetes API");
                for h in handles {
                    let _ = h.join();
                }
                return Ok(());
            }
            Some(source)
        }
        None => None,
    };

    // From here on, programs may be attached: detach them on every way out.
    let _detach = Detach {
        cfg: &cfg,
        ifindex: [ifs.ext, ifs.int],
    };
    let opts = SocketOptions {
        ring_size: cfg.ring_size,
        frame_size: cfg.frame_size,
        frames: cfg.frames,
        xdp_mode: cfg.xdp.mode,
        zero_copy: cfg.xdp.zero_copy,
    };
    let mut pairs = Vec::with_capacity(workers);
    for q in 0..cfg.queues {
        let pair =
            open_pair(&cfg.interfaces.ext, &cfg.interfaces.int, q, &opts).with_context(|| {
                format!(
                    "opening queue {q} of {} and {}",
                    cfg.interfaces.ext, cfg.interfaces.int
                )
            })?;
        // Frames start arriving as soon as the program is attached: give the kernel frames
        // before anyone is told the gateway is ready.
        let mut pair = pair;
        pair.refill();
        pairs.push(pair);
    }
    let copy_mode = pairs.iter().any(|p| p.copy_mode);
    obs.copy_mode.store(copy_mode, Relaxed);
    *obs.sockets.lock().unwrap_or_else(|p| p.into_inner()) = pairs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                (i, cfg.interfaces.ext.clone(), p.fds()[0].unwrap_or(-1)),
                (i, cfg.interfaces.int.clone(), p.fds()[1].unwrap_or(-1)),
            ]
        })
        .collect();

    for (i, pair) in pairs.into_iter().enumerate() {
        let setup = WorkerSetup {
            index: i,
            pair,
            reader: reloader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .publisher()
                .reader(),
            counters: Arc::clone(&counters[i]),
            latency: Arc::clone(&latency[i]),
            flows: Arc::clone(&flows),
            flow_budget: cfg.logging.flows_per_sec.div_ceil(workers as u32),
            burst: cfg.burst,
            poll: cfg.poll.clone(),
            l2: cfg.l2.clone(),
            conntrack: conntrack.clone(),
            sweep_per_turn: cfg.conntrack.sweep_per_turn,
            monitor: Arc::clone(&monitor),
        };
        let (core, stop) = (cfg.cores[i], Arc::clone(&stop));
        handles.push(
            std::thread::Builder::new()
                .name(format!("pc-worker-{i}"))
                .spawn(move || worker::run(setup, core, &stop))
                .context("cannot spawn a worker thread")?,
        );
    }
    obs.forwarding.store(true, Relaxed);
    tracing::info!(ext = cfg.interfaces.ext.as_str(), int = cfg.interfaces.int.as_str(), queues = cfg.queues, copy_mode, listen = ?cfg.metrics.listen, admin = ?cfg.admin.socket, "portcullis running");

    control_loop(&reloader, &flows, &stop, &hup);

    tracing::info!("stopping");
    for h in handles {
        let _ = h.join();
    }
    let totals = obs.status().totals;
    tracing::info!(
        rx_ingress = totals.rx_ingress,
        tx_ingress = totals.tx_ingress,
        rx_egress = totals.rx_egress,
        tx_egress = totals.tx_egress,
        "final counters"
    );
    Ok(())
}

/// Sets the stop flag when dropped, so no thread outlives an early error return.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// Starts the Kubernetes source publishing into `reloader`.
fn start_kubernetes(
    cfg: &Config,
    api: &KubernetesApi,
    reloader: &Arc<Mutex<Reloader>>,
) -> Result<KubeSource> {
    let r = Arc::clone(reloader);
    let publish: kubernetes::PublishFn = Box::new(move |snap, events| {
        let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
        match r.set_kubernetes(snap, events) {
            Ok(generation) => {
                let s = r.status();
                tracing::info!(
                    generation,
                    rules = s.rules,
                    build_ms = s.build_ms,
                    events = events.len(),
                    "table swapped (Kubernetes)"
                );
                log_warnings(&mut r);
                Ok(generation)
            }
            Err(e) => Err(e),
        }
    });
    let opts = kubernetes::Options {
        debounce: Duration::from_millis(api.debounce_ms),
        max_delay: Duration::from_millis(api.max_delay_ms),
        ..kubernetes::Options::default()
    };
    let conn = Connection::Kubeconfig {
        path: api.kubeconfig.clone(),
        context: api.context.clone(),
    };
    KubeSource::start(conn, opts, publish).with_context(|| {
        format!(
            "cannot start the Kubernetes source (kubernetes.api in {})",
            cfg.path.display()
        )
    })
}

/// With `startup: wait`, blocks until the source's first complete snapshot is in the table.
/// Returns false if stopped meanwhile, an error after `startup_timeout_s`.
fn wait_kubernetes(api: &KubernetesApi, source: &KubeSource, stop: &AtomicBool) -> Result<bool> {
    let server = source.status().server;
    if api.startup == Startup::Files {
        tracing::info!(
            server = server.as_str(),
            "forwarding on the policy directory's table until the Kubernetes API is synced"
        );
        return Ok(true);
    }
    tracing::info!(
        server = server.as_str(),
        "waiting for a complete list of every kind before opening any socket (kubernetes.api.startup: wait)"
    );
    let timeout = (api.startup_timeout_s > 0).then(|| Duration::from_secs(api.startup_timeout_s));
    let synced = source.wait_synced(
        timeout,
        Duration::from_secs(5),
        &|| stop.load(Relaxed),
        &|s| {
            tracing::warn!(
                server = s.server.as_str(),
                pending = s.pending().join(", ").as_str(),
                last_error = s.last_error.as_deref().unwrap_or(""),
                rejected = s.last_publish_error.as_deref().unwrap_or(""),
                "still waiting for the Kubernetes API"
            )
        },
    );
    if synced || stop.load(Relaxed) {
        return Ok(synced);
    }
    let s = source.status();
    anyhow::bail!(
        "no complete snapshot from the Kubernetes API at {} within {}s (kubernetes.api.startup_timeout_s); still pending: {}; last error: {}{}",
        s.server,
        api.startup_timeout_s,
        s.pending().join(", "),
        s.last_error.as_deref().unwrap_or("none"),
        s.last_publish_error
            .map(|e| format!("; the snapshot was rejected: {e}"))
            .unwrap_or_default()
    )
}

/// The control thread's loop (on the main thread): reload on change or SIGHUP, and write the
/// flow log at a bounded rate.
fn control_loop(
    reloader: &Mutex<Reloader>,
    flows: &ArrayQueue<FlowRecord>,
    stop: &AtomicBool,
    hup: &AtomicBool,
) {
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let mut flow_log = FlowLog::default();
    while !stop.load(Relaxed) {
        let force = hup.swap(false, Relaxed);
        if force || last_check.elapsed() >= Duration::from_millis(250) {
            last_check = Instant::now();
            let mut r = reloader.lock().unwrap_or_else(|p| p.into_inner());
            match r.poll(force) {
                None => {}
                Some(Ok(generation)) => {
                    let s = r.status();
                    tracing::info!(
                        generation,
                        rules = s.rules,
                        build_ms = s.build_ms,
                        forced = force,
                        "table swapped"
                    );
                    log_warnings(&mut r);
                }
                Some(Err(e)) => tracing::error!(
                    "policy reload rejected, keeping generation {}: {e}",
                    r.status().generation
                ),
            }
        }
        let table = reloader.lock().map(|mut r| r.publisher().current()).ok();
        while let Some(f) = flows.pop() {
            flow_log.record(&f, table.as_deref(), Instant::now());
        }
        flow_log.flush_repeats(Instant::now(), false);
        std::thread::sleep(Duration::from_millis(50));
    }
    flow_log.flush_repeats(Instant::now(), true);
}

/// How long repeats of one denied flow are folded into one line.
const FOLD_INTERVAL: Duration = Duration::from_secs(10);
/// Flows whose repeats are being counted at once (beyond it, repeats are logged as they come).
const FOLD_FLOWS: usize = 4096;

/// The flow log: one event per logged flow with its fields apart (direction, protocol, both
/// ends, verdict, reason, rule id and origin, tracker state). The first denial of a flow is
/// logged at once; its repeats within [`FOLD_INTERVAL`] (SYN retransmits, a client retrying) are
/// counted and logged as one `repeated` line when the interval ends.
#[derive(Default)]
struct FlowLog {
    repeats: std::collections::HashMap<FlowKey, (Instant, u64, FlowEvent)>,
}

/// One flow-log event's fields.
#[derive(Clone)]
struct FlowEvent {
    direction: &'static str,
    proto: String,
    src: String,
    sport: u16,
    dst: String,
    dport: u16,
    verdict: &'static str,
    reason: &'static str,
    rule: String,
    origin: String,
    tracker: &'static str,
    logged_by: String,
    worker: u16,
}

impl FlowEvent {
    fn new(f: &FlowRecord, table: Option<&policy::table::Table>) -> FlowEvent {
        // By id: the rule keeps it in the newer tables a swap brought in meanwhile.
        let by_id = |id: Option<policy::rule::RuleId>| table?.rule_by_id(id?);
        let (rule, origin) = match by_id(f.rule_id) {
            Some(r) => (r.id.to_string(), r.origin.name()),
            None if f.rule == u32::MAX => ("-".into(), "-".into()),
            None => (
                f.rule_id.map_or("-".into(), |id| id.to_string()),
                format!(
                    "rule #{} of generation {} (no longer in the table)",
                    f.rule, f.generation
                ),
            ),
        };
        // An audit or Log rule on the way: which, and what it would have done.
        let logged_by = (f.log_rule != f.rule && f.log_rule != u32::MAX)
            .then(|| by_id(f.log_rule_id))
            .flatten()
            .map(|r| format!("{} ({:?})", r.origin.object, r.action))
            .unwrap_or_default();
        let (verdict, reason, tracker) = match f.verdict {
            Verdict::Allow => ("allow", "-", "new"),
            // A reply-looking packet (SYN-ACK, echo reply) no tracked flow expected; a packet
            // its flow's state refused; a fragment without its first.
            Verdict::Deny(r) => match f.tracker {
                Some(Reason::Invalid) => ("deny", "invalid", "invalid"),
                Some(t) => ("deny", t.as_str(), "fragment"),
                None if f.no_flow => ("deny", r.as_str(), "no_flow"),
                None => ("deny", r.as_str(), "new"),
            },
        };
        let k = &f.key;
        FlowEvent {
            direction: k.direction().as_str(),
            proto: policy::key::proto::name(k.proto).into_owned(),
            src: k.src_addr().to_string(),
            sport: k.sport,
            dst: k.dst_addr().to_string(),
            dport: k.dport,
            verdict,
            reason,
            rule,
            origin,
            tracker,
            logged_by,
            worker: f.worker,
        }
    }

    fn emit(&self, count: u64, message: &str) {
        tracing::info!(
            target: "portcullis::flows",
            direction = self.direction,
            proto = self.proto.as_str(),
            src = self.src.as_str(),
            sport = self.sport,
            dst = self.dst.as_str(),
            dport = self.dport,
            verdict = self.verdict,
            reason = self.reason,
            rule = self.rule.as_str(),
            rule_origin = self.origin.as_str(),
            tracker = self.tracker,
            logged_by = self.logged_by.as_str(),
            worker = self.worker,
            count,
            "{message}"
        );
    }
}

impl FlowLog {
    fn record(&mut self, f: &FlowRecord, table: Option<&policy::table::Table>, now: Instant) {
        let denied = f.verdict != Verdict::Allow;
        if denied {
            if let Some((_, n, _)) = self.repeats.get_mut(&f.key) {
                *n += 1;
                return;
            }
        }
        let e = FlowEvent::new(f, table);
        e.emit(1, if denied { "denied flow" } else { "logged flow" });
        if denied && self.repeats.len() < FOLD_FLOWS {
            self.repeats.insert(f.key, (now, 0, e));
        }
    }

    /// Logs the repeats of every flow whose interval ended (all of them with `all`).
    fn flush_repeats(&mut self, now: Instant, all: bool) {
        self.repeats.retain(|_, (since, n, e)| {
            if !all && now.duration_since(*since) < FOLD_INTERVAL {
                return true;
            }
            if *n > 0 {
                e.emit(*n, "denied flow repeated");
            }
            false
        });
    }
}

/// Removes the admin socket's file when the gateway stops.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
