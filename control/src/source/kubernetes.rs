//! The Kubernetes source: kube-rs watchers for every kind the policy engine reads, feeding one
//! snapshot that is debounced, compiled off the datapath and handed to a publish callback.
//!
//! - Objects are read as `DynamicObject` and parsed by the same [`add_object`] the file source
//!   uses, so the API and YAML files can never disagree on what an object means.
//! - Each kind has its own watcher (list, then watch from the list's resourceVersion; a `410
//!   Gone` makes it relist). A relist replaces that kind's objects atomically at `InitDone`, so
//!   deletions missed while disconnected are applied too.
//! - Nothing is published until every kind finished its first list: never a half-synced table.
//! - A kind whose API is not served (a CRD that is not installed: Calico, KubeVirt, our own) is
//!   `absent`, which is normal; it is retried in the background and picked up when installed.
//! - A malformed object is skipped, counted per kind and reported; the others still apply.
//! - Objects are parsed once per event, and an event that changes nothing the compiler reads (a
//!   Pod's status churn, a resync) does not trigger a recompile.
//! - Losing the API keeps the last published table; `/version` is probed to tell the operator
//!   when the API is reachable again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use serde::{Deserialize, Serialize};

use policy::object::add_object;
use policy::snapshot::Snapshot;

/// One kind the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSpec {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Served only when a CRD is installed; a 404 means "absent", not an error.
    pub optional: bool,
}

impl KindSpec {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The collection path, as the API server serves it (cluster-wide).
    pub fn path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}/{}", self.version, self.plural)
        } else {
            format!("/apis/{}/{}/{}", self.group, self.version, self.plural)
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    /// How the status and errors name this kind (`NetworkPolicy` is both Kubernetes' and Calico's).
    pub fn label(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    optional: bool,
) -> KindSpec {
    KindSpec {
        group,
        version,
        kind,
        plural,
        optional,
    }
}

/// Every kind the policy engine reads. The RBAC in `configs/deploy/10-rbac.yaml` grants exactly
/// `get`, `list` and `watch` on these.
pub const KINDS: &[KindSpec] = &[
    kind("", "v1", "Namespace", "namespaces", false),
    kind("", "v1", "Pod", "pods", false),
    kind("", "v1", "Node", "nodes", false),
    kind("", "v1", "Service", "services", false),
    kind("", "v1", "ServiceAccount", "serviceaccounts", false),
    kind(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        false,
    ),
    kind(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        false,
    ),
    kind(
        "crd.projectcalico.org",
        "v1",
        "GlobalNetworkPolicy",
        "globalnetworkpolicies",
        true,
    ),
    kind(
        "crd.projectcalico.org",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    kind("crd.projectcalico.org", "v1", "Tier", "tiers", true),
    kind(
        "crd.projectcalico.org",
        "v1",
        "GlobalNetworkSet",
        "globalnetworksets",
        true,
    ),
    kind(
        "crd.projectcalico.org",
        "v1",
        "NetworkSet",
        "networksets",
        true,
    ),
    kind(
        "crd.projectcalico.org",
        "v1",
        "HostEndpoint",
        "hostendpoints",
        true,
    ),
    kind(
        "portcullis.io",
        "v1alpha1",
        "GatewayPolicy",
        "gatewaypolicies",
        true,
    ),
    kind(
        "portcullis.io",
        "v1alpha1",
        "SecurityGroup",
        "securitygroups",
        true,
    ),
    kind(
        "kubevirt.io",
        "v1",
        "VirtualMachineInstance",
        "virtualmachineinstances",
        true,
    ),
];

/// How to reach the API server.
#[derive(Debug, Clone)]
pub enum Connection {
    /// A kubeconfig file (and optionally a context in it); with no path, the usual inference:
    /// in-cluster service account, else `$KUBECONFIG`, else `~/.kube/config`.
    Kubeconfig {
        path: Option<PathBuf>,
        context: Option<String>,
    },
    /// A ready client configuration (tests, embedding).
    Config(Box<kube::Config>),
}

/// Timing knobs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The most time between two recompiles while events keep coming: the gap after a compile
    /// is twice what it cost, up to this. A change after a quiet spell is not held back at all:
    /// it is compiled once `settle` has passed.
    pub debounce: Duration,
    /// How long the first change after a quiet spell waits for the events delivered with it
    /// (one `kubectl apply` of several objects), so they go into one table.
    pub settle: Duration,
    /// The longest a continuous stream of events may delay a recompile.
    pub max_delay: Duration,
    /// The cap of the exponential reconnect backoff (it starts at 100 ms).
    pub retry_max: Duration,
    /// How often `/version` is probed to tell whether the API is reachable.
    pub probe_interval: Duration,
    /// How often a kind that is not served (CRD not installed) is looked for again.
    pub absent_recheck: Duration,
    /// How long `403 Forbidden` is taken for an API server still warming up (its authorization
    /// caches are cold for a few seconds after it starts) before it is reported as missing RBAC.
    pub forbidden_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            debounce: Duration::from_millis(50),
            settle: Duration::from_millis(2),
            max_delay: Duration::from_millis(500),
            retry_max: Duration::from_secs(5),
            probe_interval: Duration::from_secs(2),
            absent_recheck: Duration::from_secs(30),
            forbidden_grace: Duration::from_secs(30),
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("no Kubernetes configuration found (not in a cluster, no $KUBECONFIG, no ~/.kube/config): {0}; set kubernetes.api.kubeconfig")]
    Infer(String),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
    #[error("cannot start the control runtime: {0}")]
    Runtime(String),
}

/// A kind's sync state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindState {
    /// The first list has not completed.
    Pending,
    /// Listed; watching.
    Synced,
    /// Not served by this API server (a CRD that is not installed). Counts as synced and empty.
    Absent,
}

/// What `/status` shows per kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindStatus {
    pub kind: String,
    pub path: String,
    pub state: KindState,
    pub objects: usize,
    /// Objects skipped because they do not parse.
    pub invalid: usize,
    pub events: u64,
    /// Completed lists (1 after the first sync; more after `410 Gone` or reconnects).
    pub lists: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// The source's state, shared with the observability endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub server: String,
    /// Every kind finished its first list (absent ones count).
    pub synced: bool,
    /// The last `/version` probe or watch answered.
    pub api_reachable: bool,
    /// Unix seconds since the API has been unreachable.
    pub unreachable_since_unix: Option<u64>,
    pub last_error: Option<String>,
    pub kinds: Vec<KindStatus>,
    /// One line per malformed object currently skipped (the first 100).
    pub invalid_objects: Vec<String>,
    pub publishes: u64,
    pub publish_errors: u64,
    pub last_publish_error: Option<String>,
    /// Events that changed what the compiler reads / events that did not.
    pub relevant_events: u64,
    pub ignored_events: u64,
    /// List and watch failures not yet reported in a log line (they are summarised).
    #[serde(skip)]
    failures: FailureSummary,
}

/// List and watch failures since the last warning: one warning per [`WARN_INTERVAL`] with the
/// cause and what to check, instead of one line per kind and retry.
#[derive(Debug, Clone, Default)]
struct FailureSummary {
    last_warned: Option<Instant>,
    cause: String,
    count: u64,
    kinds: std::collections::BTreeSet<String>,
}

/// How often failures of the same cause are reported.
const WARN_INTERVAL: Duration = Duration::from_secs(30);

/// The root cause of a list or watch failure in words an operator knows, and what to check.
pub fn diagnose(e: &(dyn std::error::Error + 'static)) -> (String, &'static str) {
    // The deepest error says why; the ones above repeat it in their own words.
    let mut chain: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io_kind = None;
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        let m = err.to_string();
        if !chain.iter().any(|c| c.contains(&m)) {
            chain.push(m);
        }
        cur = err.source();
    }
    let all = chain.join(": ").to_lowercase();
    let (cause, hint) = if io_kind == Some(std::io::ErrorKind::ConnectionRefused)
        || all.contains("connection refused")
    {
        ("connection refused", "is the API server running, and is the kubeconfig's server address (host and port) right?")
    } else if all.contains("certificate") || all.contains("unknownissuer") || all.contains("tls") {
        ("TLS certificate rejected", "does the kubeconfig's certificate-authority match the API server's certificate, and the server name its SAN?")
    } else if all.contains("dns")
        || all.contains("lookup address")
        || all.contains("name or service not known")
    {
        (
            "the server's name does not resolve",
            "check the kubeconfig's server host name and the node's DNS",
        )
    } else if io_kind == Some(std::io::ErrorKind::TimedOut)
        || all.contains("timed out")
        || all.contains("deadline")
    {
        (
            "timed out",
            "is the API server reachable from this node (routes, firewalls)?",
        )
    } else if all.contains("401") || all.contains("unauthorized") {
        (
            "401 unauthorized",
            "are the kubeconfig's credentials (token, client certificate) valid and unexpired?",
        )
    } else if all.contains("403") || all.contains("forbidden") {
        ("403 forbidden", "does the ClusterRole (configs/deploy/10-rbac.yaml) grant get, list and watch on every kind?")
    } else if io_kind == Some(std::io::ErrorKind::ConnectionReset)
        || all.contains("reset")
        || all.contains("broken pipe")
    {
        (
            "connection reset",
            "the API server or a proxy in between closed the connection; it is retried",
        )
    } else {
        (
            "request failed",
            "see the error, and `portcullis stats` for each kind's state",
        )
    };
    let detail = chain.last().cloned().unwrap_or_default();
    (format!("{cause} ({detail})"), hint)
}

impl Status {
    pub fn new(server: String) -> Status {
        Status {
            server,
            synced: false,
            api_reachable: false,
            unreachable_since_unix: None,
            last_error: None,
            kinds: KINDS
                .iter()
                .map(|k| KindStatus {
                    kind: k.label(),
                    path: k.path(),
                    state: KindState::Pending,
                    objects: 0,
                    invalid: 0,
                    events: 0,
                    lists: 0,
                    errors: 0,
                    last_error: None,
                })
                .collect(),
            invalid_objects: Vec::new(),
            publishes: 0,
            publish_errors: 0,
            last_publish_error: None,
            relevant_events: 0,
            failures: FailureSummary::default(),
            ignored_events: 0,
        }
    }

    /// Kinds still waiting for their first list, for start-up logs.
    /// Kinds that share an error are named together with it once.
    pub fn pending(&self) -> Vec<String> {
        let mut plain = Vec::new();
        let mut by_error: Vec<(&str, Vec<&str>)> = Vec::new();
        for k in self.kinds.iter().filter(|k| k.state == KindState::Pending) {
            match &k.last_error {
                None => plain.push(k.kind.clone()),
                Some(e) => match by_error.iter_mut().find(|(x, _)| x == e) {
                    Some((_, kinds)) => kinds.push(&k.kind),
                    None => by_error.push((e, vec![&k.kind])),
                },
            }
        }
        plain.extend(
            by_error
                .into_iter()
                .map(|(e, kinds)| format!("{} ({e})", kinds.join(", "))),
        );
        plain
    }
}

/// Called with every complete snapshot to publish and the instants of the events it contains.
/// Returns the new table generation, or why it was rejected (the old table stays).
pub type PublishFn =
    Box<dyn FnMut(Snapshot, &[Instant]) -> Result<u64, crate::reload::LoadError> + Send>;

/// A running Kubernetes source. Dropping it stops the watchers and joins the thread.
pub struct KubeSource {
    status: Arc<Mutex<Status>>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn resolve(conn: Connection) -> Result<kube::Config, StartError> {
    match conn {
        Connection::Config(c) => Ok(*c),
        Connection::Kubeconfig {
            path: Some(path),
            context,
        } => {
            let shown = path.display().to_string();
            let kc = Kubeconfig::read_from(&path).map_err(|e| StartError::Kubeconfig {
                path: shown.clone(),
                message: e.to_string(),
            })?;
            let opts = KubeConfigOptions {
                context,
                ..KubeConfigOptions::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| StartError::Kubeconfig {
                    path: shown,
                    message: e.to_string(),
                })
        }
        Connection::Kubeconfig {
            path: None,
            context: Some(context),
        } => {
            let opts = KubeConfigOptions {
                context: Some(context),
                ..KubeConfigOptions::default()
            };
            kube::Config::from_kubeconfig(&opts)
                .await
                .map_err(|e| StartError::Infer(e.to_string()))
        }
        Connection::Kubeconfig {
            path: None,
            context: None,
        } => kube::Config::infer()
            .await
            .map_err(|e| StartError::Infer(e.to_string())),
    }
}

impl KubeSource {
    /// Resolves the connection (errors here are configuration errors), then starts the control
    /// thread. Returns at once: use [`KubeSource::wait_synced`] to wait for the first table.
    pub fn start(
        conn: Connection,
        opts: Options,
        publish: PublishFn,
    ) -> Result<KubeSource, StartError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        let config = rt.block_on(resolve(conn))?;
        let server = config.cluster_url.to_string();
        let client = {
            let _guard = rt.enter();
            kube::Client::try_from(config).map_err(|e| StartError::Client(e.to_string()))?
        };
        let status = Arc::new(Mutex::new(Status::new(server)));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shared = Arc::clone(&status);
        let thread = std::thread::Builder::new()
            .name("pc-kubernetes".into())
            .spawn(move || {
                rt.block_on(run(client, opts, publish, shared, stopped));
            })
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        Ok(KubeSource {
            status,
            stop,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// The shared status, for the observability endpoint.
    pub fn status_handle(&self) -> Arc<Mutex<Status>> {
        Arc::clone(&self.status)
    }

    /// Waits until the first complete snapshot was published (a rejected one keeps waiting for a
    /// fix), `give_up` returns true, or `timeout` passes. Calls `progress` every `every`.
    pub fn wait_synced(
        &self,
        timeout: Option<Duration>,
        every: Duration,
        give_up: &dyn Fn() -> bool,
        progress: &dyn Fn(&Status),
    ) -> bool {
        let started = Instant::now();
        let mut last_progress = Instant::now();
        loop {
            let s = self.status();
            if s.publishes > 0 {
                return true;
            }
            if give_up() || timeout.is_some_and(|t| started.elapsed() >= t) {
                return false;
            }
            if last_progress.elapsed() >= every {
                progress(&s);
                last_progress = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exponential reconnect backoff, 100 ms doubling up to a cap, reset by real progress (a
/// completed list or a watch event).
struct Retry {
    next: Duration,
    max: Duration,
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

impl Retry {
    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

/// One object, parsed once when its event arrived.
#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    /// The snapshot fragment of the newest version that parsed. When an update does not parse,
    /// the previous version stays in force: a typo in an edit must not drop a Deny.
    good: Option<Snapshot>,
    /// Why the newest version does not parse.
    error: Option<String>,
}

impl Parsed {
    /// `self`, an update of `old`: keeps `old`'s last good version if `self` does not parse.
    fn over(mut self, old: Option<&Parsed>) -> Parsed {
        if self.good.is_none() {
            if let Some(previous) = old.and_then(|o| o.good.clone()) {
                self.good = Some(previous);
                if let Some(e) = &mut self.error {
                    e.push_str(" (the previous version stays in force)");
                }
            }
        }
        self
    }
}

fn parse(spec: &KindSpec, obj: DynamicObject) -> (String, Parsed) {
    let ns = obj.metadata.namespace.clone();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let key = match &ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    };
    let source = format!("api:{}/{key}", spec.label());
    let result = (|| {
        let mut json = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
        // List items carry no apiVersion/kind; the watch tells us what they are.
        if let Some(map) = json.as_object_mut() {
            map.insert("apiVersion".into(), spec.api_version().into());
            map.insert("kind".into(), spec.kind.into());
        }
        let value = serde_norway::to_value(&json).map_err(|e| e.to_string())?;
        let mut frag = Snapshot::default();
        add_object(value, &source, &mut frag).map_err(|e| {
            let mut s = format!("{} {key}", spec.label());
            if let Some(f) = &e.field {
                s.push_str(&format!(": {f}"));
            }
            s.push_str(&format!(": {}", e.message));
            s
        })?;
        Ok(frag)
    })();
    let parsed = match result {
        Ok(frag) => Parsed {
            good: Some(frag),
            error: None,
        },
        Err(e) => Parsed {
            good: None,
            error: Some(e),
        },
    };
    (key, parsed)
}

/// Per-kind objects, and the relist being buffered.
struct KindStore {
    objects: BTreeMap<String, Parsed>,
    relist: Option<BTreeMap<String, Parsed>>,
    /// When the current run of `403 Forbidden` answers began.
    forbidden_since: Option<Instant>,
}

fn build_snapshot(stores: &[KindStore]) -> Snapshot {
    let mut snap = Snapshot::default();
    for s in stores {
        for frag in s.objects.values().filter_map(|p| p.good.as_ref()) {
            snap.extend_from(frag);
        }
    }
    snap
}

fn refresh_counts(status: &mut Status, stores: &[KindStore]) {
    let mut invalid = Vec::new();
    for (k, s) in status.kinds.iter_mut().zip(stores) {
        k.objects = s.objects.len();
        k.invalid = 0;
        for p in s.objects.values() {
            if let Some(e) = &p.error {
                k.invalid += 1;
                if invalid.len() < 100 {
                    invalid.push(e.clone());
                }
            }
        }
    }
    status.invalid_objects = invalid;
}

/// The API server could not be reached or the connection broke (as opposed to an answer).
fn transport_error(e: &watcher::Error) -> bool {
    matches!(
        client_error(e),
        Some(kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_))
    )
}

/// The client error behind a list or watch failure, if there is one.
fn client_error(e: &watcher::Error) -> Option<&kube::Error> {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => Some(e),
        watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => None,
    }
}

fn spec_optional(i: usize) -> bool {
    KINDS[i].optional
}

fn error_code(e: &watcher::Error) -> Option<u16> {
    match (e, client_error(e)) {
        (watcher::Error::WatchError(s), _) => Some(s.code),
        (_, Some(kube::Error::Api(s))) => Some(s.code),
        _ => None,
    }
}

type Update = (usize, Result<Event<DynamicObject>, watcher::Error>);

async fn run(
    client: kube::Client,
    opts: Options,
    mut publish: PublishFn,
    status: Arc<Mutex<Status>>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Update>(1024);
    let mut tasks = Vec::new();
    for (i, spec) in KINDS.iter().enumerate() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &spec.resource());
        let tx = tx.clone();
        let retry = Retry {
            next: Duration::from_millis(100),
            max: opts.retry_max,
        };
        let absent_recheck = opts.absent_recheck;
        tasks.push(tokio::spawn(async move {
            // The backoff is ours, not `WatchStreamExt::backoff`: that one resets on every Ok
            // item, and a failing relist yields an Ok(Init) before each error, so it would retry
            // at the minimum delay for ever. Only real progress resets this one.
            let mut retry = retry;
            // A new watcher starts with a list; an optional kind whose API vanished after it was
            // synced (its CRD removed) gets one, so it turns `absent` instead of staying stale.
            'relist: loop {
                let config = watcher::Config::default();
                let mut stream = watcher::watcher(api.clone(), config).boxed();
                while let Some(ev) = stream.next().await {
                    let progress =
                        matches!(ev, Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)));
                    let not_served =
                        matches!(&ev, Err(e) if spec_optional(i) && error_code(e) == Some(404));
                    let vanished =
                        not_served && matches!(&ev, Err(watcher::Error::WatchStartFailed(_)));
                    let pause = match &ev {
                        Err(_) if not_served => Some(absent_recheck),
                        Err(_) => retry.next(),
                        Ok(_) => None,
                    };
                    if progress {
                        retry.reset();
                    }
                    if tx.send((i, ev)).await.is_err() {
                        return;
                    }
                    if vanished {
                        continue 'relist;
                    }
                    if let Some(p) = pause {
                        tokio::time::sleep(p).await;
                    }
                }
                return;
            }
        }));
    }
    drop(tx);
    {
        let client = client.clone();
        let status = Arc::clone(&status);
        let every = opts.probe_interval;
        tasks.push(tokio::spawn(async move {
            loop {
                let ok = tokio::time::timeout(
                    every.max(Duration::from_secs(1)),
                    client.apiserver_version(),
                )
                .await;
                {
                    let mut s = lock(&status);
                    match ok {
                        Ok(Ok(_)) => mark_reachable(&mut s),
                        // An answer, even `403` from a server whose authorization caches are
                        // still cold, means the server is there.
                        Ok(Err(kube::Error::Api(_))) => mark_reachable(&mut s),
                        Ok(Err(e)) => mark_unreachable(&mut s, &diagnose(&e).0),
                        Err(_) => mark_unreachable(&mut s, "GET /version timed out"),
                    }
                }
                tokio::time::sleep(every).await;
            }
        }));
    }

    let mut stores: Vec<KindStore> = KINDS
        .iter()
        .map(|_| KindStore {
            objects: BTreeMap::new(),
            relist: None,
            forbidden_since: None,
        })
        .collect();
    let mut synced = false;
    // Events not yet in a published table.
    let mut pending: Vec<Instant> = Vec::new();
    let mut last_event = Instant::now();
    let mut dirty = false;
    // When the last compile ended and what it cost: the next may start `gap` after it.
    let mut last_publish: Option<Instant> = None;
    let mut gap = Duration::ZERO;
    // Events the last compile took in: more than one means events are coming faster than
    // tables are built.
    let mut last_batch = 0usize;

    loop {
        // Leading edge, then a throttle. A change that comes alone (the last compile took one
        // event and no other is waiting) is compiled as soon as `settle` has passed. While
        // changes pile up (more than one per compile: a rollout's EndpointSlice storm), each
        // compile waits a gap after the last one: twice what that one cost, at most `debounce`.
        // A storm is so batched, compiling takes at most a third of the control thread while a
        // compile costs under half of `debounce`, and a lone change waits milliseconds, not a
        // fixed debounce on top of the compile. (A steady stream of exactly one change per
        // compile is compiled change by change: each is alone when it comes.)
        let deadline = if dirty && synced {
            let first = pending.first().copied().unwrap_or(last_event);
            let mut at = first + opts.settle;
            if let Some(p) = last_publish {
                if last_batch > 1 || pending.len() > 1 {
                    at = at.max(p + gap);
                }
            }
            Some(at.min(first + opts.max_delay))
        } else {
            None
        };
        tokio::select! {
            _ = stopped.changed() => break,
            update = rx.recv() => {
                let Some((i, ev)) = update else { break };
                let now = Instant::now();
                let changed = apply(&mut stores, &status, i, ev, opts.forbidden_grace);
                if changed {
                    dirty = true;
                    last_event = now;
                    if synced && pending.len() < 1_000_000 {
                        pending.push(now);
                    }
                }
                let mut s = lock(&status);
                if changed {
                    refresh_counts(&mut s, &stores);
                }
                if !synced && s.kinds.iter().all(|k| k.state != KindState::Pending) {
                    synced = true;
                    s.synced = true;
                    dirty = true;
                    refresh_counts(&mut s, &stores);
                    tracing::info!(server = s.server.as_str(), objects = s.kinds.iter().map(|k| k.objects).sum::<usize>(), "Kubernetes objects synced");
                }
            }
            _ = sleep_until(deadline) => {
                let began = Instant::now();
                let mut snap = build_snapshot(&stores);
                // Calico's CRDs are served: Calico is the cluster's policy engine.
                snap.calico_api = lock(&status)
                    .kinds
                    .iter()
                    .zip(KINDS)
                    .any(|(k, spec)| spec.group == "crd.projectcalico.org" && k.state == KindState::Synced);
                let result = publish(snap, &pending);
                let mut s = lock(&status);
                match result {
                    Ok(generation) => {
                        s.publishes += 1;
                        s.last_publish_error = None;
                        tracing::debug!(generation, events = pending.len(), "Kubernetes snapshot published");
                    }
                    Err(e) => {
                        s.publish_errors += 1;
                        let e = e.lines().join("; ");
                        tracing::error!(error = e.as_str(), "Kubernetes snapshot rejected; keeping the last good table");
                        s.last_publish_error = Some(e);
                    }
                }
                last_batch = pending.len();
                pending.clear();
                dirty = false;
                let now = Instant::now();
                gap = ((now - began) * 2).min(opts.debounce);
                last_publish = Some(now);
            }
        }
    }
    for t in tasks {
        t.abort();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// A request got an answer: the API is reachable. Only an answer clears `unreachable_since`, never
/// a retry starting.
fn mark_reachable(s: &mut Status) {
    if !s.api_reachable {
        tracing::info!(server = s.server.as_str(), "Kubernetes API reachable");
    }
    s.api_reachable = true;
    s.unreachable_since_unix = None;
}

fn mark_unreachable(s: &mut Status, why: &str) {
    if s.api_reachable || s.unreachable_since_unix.is_none() {
        tracing::warn!(
            server = s.server.as_str(),
            cause = why,
            "Kubernetes API unreachable; keeping the last good table"
        );
        s.unreachable_since_unix = Some(unix_now());
    }
    s.api_reachable = false;
    s.last_error = Some(why.to_string());
}

/// Applies one watcher update. Returns whether anything the compiler reads changed.
fn apply(
    stores: &mut [KindStore],
    status: &Mutex<Status>,
    i: usize,
    ev: Result<Event<DynamicObject>, watcher::Error>,
    grace: Duration,
) -> bool {
    let spec = &KINDS[i];
    let store = &mut stores[i];
    let ev = match ev {
        Ok(ev) => ev,
        Err(e) => {
            let code = error_code(&e);
            let mut s = lock(status);
            let k = &mut s.kinds[i];
            k.errors += 1;
            let absent = spec.optional
                && code == Some(404)
                && matches!(e, watcher::Error::InitialListFailed(_));
            if absent {
                k.last_error = None;
                if k.state != KindState::Absent {
                    tracing::info!(
                        kind = spec.label(),
                        "not served by this API server (CRD not installed); treated as empty"
                    );
                }
                k.state = KindState::Absent;
                let had = !store.objects.is_empty();
                store.objects.clear();
                store.relist = None;
                return had;
            }
            if code == Some(403) {
                // An answer: the server is there. Right after it (re)starts its authorization
                // caches are cold and every kind answers 403 for a few seconds; only a 403 that
                // outlasts the grace period means the ClusterRole is missing something.
                let since = *store.forbidden_since.get_or_insert_with(Instant::now);
                let for_ = since.elapsed();
                let msg = if for_ < grace {
                    format!(
                        "forbidden for {:.0} s: the API server may still be warming up (its authorization caches are cold after a start); retrying ({e})",
                        for_.as_secs_f64()
                    )
                } else {
                    format!(
                        "forbidden for {:.0} s: the ClusterRole needs get, list and watch on {} ({e})",
                        for_.as_secs_f64(),
                        spec.path()
                    )
                };
                let first_after_grace = for_ >= grace
                    && !k
                        .last_error
                        .as_deref()
                        .is_some_and(|m| m.contains("ClusterRole"));
                if first_after_grace {
                    tracing::warn!(
                        kind = spec.label(),
                        error = msg.as_str(),
                        "watch forbidden; retrying"
                    );
                } else if k.last_error.is_none() {
                    tracing::info!(
                        kind = spec.label(),
                        error = msg.as_str(),
                        "watch forbidden (API server warming up?); retrying"
                    );
                }
                k.last_error = Some(msg);
                mark_reachable(&mut s);
                return false;
            }
            store.forbidden_since = None;
            let (cause, hint) = diagnose(&e);
            k.last_error = Some(cause.clone());
            let label = spec.label();
            let server = s.server.clone();
            let f = &mut s.failures;
            f.count += 1;
            f.kinds.insert(label);
            let due =
                f.last_warned.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) || f.cause != cause;
            if due {
                tracing::warn!(
                    server = server.as_str(),
                    cause = cause.as_str(),
                    check = hint,
                    failures = f.count,
                    kinds = f.kinds.len(),
                    "Kubernetes list/watch failing; retrying with backoff"
                );
                f.last_warned = Some(Instant::now());
                f.cause = cause.clone();
                f.count = 0;
                f.kinds.clear();
            }
            if transport_error(&e) || code.is_some_and(|c| c >= 500) {
                mark_unreachable(&mut s, &cause);
            }
            return false;
        }
    };
    let mut s = lock(status);
    // `Init` says the watcher is about to list: nothing has answered yet, so it proves nothing
    // about the API (every retry during an outage starts with one). Every other event carries
    // an answer.
    if !matches!(ev, Event::Init) {
        store.forbidden_since = None;
        mark_reachable(&mut s);
    }
    let changed = match ev {
        Event::Init => {
            store.relist = Some(BTreeMap::new());
            return false;
        }
        Event::InitApply(obj) => {
            let (key, parsed) = parse(spec, obj);
            store
                .relist
                .get_or_insert_with(BTreeMap::new)
                .insert(key, parsed);
            return false;
        }
        Event::InitDone => {
            let fresh: BTreeMap<String, Parsed> = store
                .relist
                .take()
                .unwrap_or_default()
                .into_iter()
                .map(|(key, p)| {
                    let p = p.over(store.objects.get(&key));
                    (key, p)
                })
                .collect();
            let k = &mut s.kinds[i];
            k.lists += 1;
            k.events += 1;
            k.last_error = None;
            if k.lists > 1 {
                tracing::info!(kind = spec.label(), objects = fresh.len(), "relisted");
            }
            let became_synced = k.state != KindState::Synced;
            k.state = KindState::Synced;
            let changed = fresh != store.objects;
            store.objects = fresh;
            changed || became_synced
        }
        Event::Apply(obj) => {
            s.kinds[i].events += 1;
            let (key, parsed) = parse(spec, obj);
            let parsed = parsed.over(store.objects.get(&key));
            if let Some(e) = &parsed.error {
                tracing::warn!(error = e.as_str(), "malformed object skipped");
            }
            store.objects.insert(key, parsed.clone()) != Some(parsed)
        }
        Event::Delete(obj) => {
            s.kinds[i].events += 1;
            let (key, _) = parse(spec, obj);
            store.objects.remove(&key).is_some()
        }
    };
    if changed {
        s.relevant_events += 1;
    } else {
        s.ignored_events += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_unique_and_paths_are_api_paths() {
        let mut paths: Vec<String> = KINDS.iter().map(KindSpec::path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), KINDS.len());
        assert_eq!(KINDS[1].path(), "/api/v1/pods");
        assert!(KINDS
            .iter()
            .any(|k| k.path() == "/apis/networking.k8s.io/v1/networkpolicies"));
        assert!(KINDS
            .iter()
            .any(|k| k.path() == "/apis/crd.projectcalico.org/v1/hostendpoints" && k.optional));
        assert!(KINDS
            .iter()
            .filter(|k| !k.optional)
            .all(|k| matches!(k.group, "" | "discovery.k8s.io" | "networking.k8s.io")));
    }

    #[test]
    fn parse_names_the_field_of_a_malformed_object() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bad", "resourceVersion": "7"},
            "spec": {"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["eighty"]}}]}
        }))
        .unwrap();
        let spec = KINDS.iter().find(|k| k.kind == "GatewayPolicy").unwrap();
        let (key, parsed) = parse(spec, obj);
        assert_eq!(key, "bad");
        let err = parsed.error.unwrap();
        assert!(
            err.starts_with(
                "GatewayPolicy.portcullis.io bad: spec.ingress[0].destination.ports[0]"
            ),
            "{err}"
        );
    }
}
