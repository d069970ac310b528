//! A test Kubernetes API server (feature `apiserver`): enough of the real one's list and watch
//! protocol to test the Kubernetes source without a cluster, faithfully where it matters:
//!
//! - one global, increasing `resourceVersion`, stamped on every object and every list;
//! - lists with `limit`/`continue` pagination over a consistent snapshot, `resourceVersion` with
//!   `resourceVersionMatch` (`NotOlderThan`, `Exact`), `504` for a version from the future;
//! - watches streamed as newline-delimited JSON events (`ADDED`, `MODIFIED`, `DELETED`,
//!   `BOOKMARK`, `ERROR`), resumed from any version still in the history, `timeoutSeconds`,
//!   periodic bookmarks when asked for;
//! - compaction: a watch or continue token older than the history gets `410 Gone` (as an `ERROR`
//!   watch event, like the real server), which must make a client relist;
//! - list items of built-in kinds carry no `apiVersion`/`kind` (custom resources do), as served;
//! - kinds that are not served (a CRD not installed) answer `404`;
//! - the whole server can go down (listener closed, every connection cut) and come back on the
//!   same address.
//!
//! Objects are changed from the test through [`ApiServer::apply`] and [`ApiServer::delete`], the
//! way a controller's writes would appear to a watcher. Nothing is validated: that is how a
//! malformed custom resource reaches a gateway.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use control::source::kubernetes::{KindSpec, KINDS};
use policy::explain::percent_decode;

type Body = BoxBody<Bytes, Infallible>;

/// One change, as the history and the live watches see it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: usize,
    event: &'static str,
    object: Value,
}

struct State {
    rv: u64,
    /// Per kind: `namespace/name` (or `name`) to object.
    objects: Vec<BTreeMap<String, Value>>,
    history: Vec<Change>,
    /// Watches and continue tokens older than this get `410 Gone`.
    floor: u64,
    served: Vec<bool>,
    /// Lists of these kinds fail with this HTTP status (an unhealthy API server).
    failing: Vec<Option<u16>>,
    /// The openAPIV3Schema of a kind whose stored objects are pruned as a real API server prunes
    /// custom resources (unknown fields dropped unless `x-kubernetes-preserve-unknown-fields`).
    schemas: Vec<Option<Value>>,
    /// Paginated list snapshots by token id: (list resourceVersion, items).
    pages: HashMap<u64, (u64, Vec<Value>)>,
    next_page: u64,
    uid: u64,
}

/// Counters a test can assert on.
#[derive(Debug, Default)]
pub struct Requests {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    pub gone: AtomicU64,
    pub bookmarks: AtomicU64,
    pub not_found: AtomicU64,
}

struct Shared {
    state: Mutex<State>,
    live: broadcast::Sender<Arc<Change>>,
    /// Bumped when the server goes down: every connection and watch ends.
    epoch: watch::Sender<u64>,
    bookmark_every: Mutex<Duration>,
    requests: Requests,
    /// Until when every request answers `403 Forbidden` (a server whose RBAC caches are cold).
    forbidden_until: Mutex<Option<std::time::Instant>>,
}

/// A running test API server on 127.0.0.1.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_of(obj: &Value) -> Option<String> {
    let meta = obj.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    Some(match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    })
}

fn kind_of(obj: &Value) -> Option<usize> {
    let av = obj.get("apiVersion")?.as_str()?;
    let kind = obj.get("kind")?.as_str()?;
    KINDS
        .iter()
        .position(|k| k.api_version() == av && k.kind == kind)
}

fn builtin(spec: &KindSpec) -> bool {
    matches!(spec.group, "" | "discovery.k8s.io" | "networking.k8s.io")
}

impl ApiServer {
    /// Starts on an ephemeral port. Built-in kinds and Portcullis' CRDs are served; Calico's and
    /// KubeVirt's are not until [`ApiServer::set_served`].
    pub fn start() -> ApiServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-apiserver")
            .enable_all()
            .build()
            .expect("test API server runtime");
        let (live, _) = broadcast::channel(1 << 16);
        let (epoch, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1000,
                objects: vec![BTreeMap::new(); KINDS.len()],
                history: Vec::new(),
                floor: 0,
                served: KINDS
                    .iter()
                    .map(|k| !k.optional || k.group == "portcullis.io")
                    .collect(),
                failing: vec![None; KINDS.len()],
                schemas: vec![None; KINDS.len()],
                pages: HashMap::new(),
                next_page: 1,
                uid: 0,
            }),
            live,
            epoch,
            bookmark_every: Mutex::new(Duration::from_millis(500)),
            requests: Requests::default(),
            forbidden_until: Mutex::new(None),
        });
        let listener = rt
            .block_on(bind("127.0.0.1:0".parse().expect("address")))
            .expect("bind the test API server");
        let addr = listener.local_addr().expect("local address");
        let server = ApiServer {
            shared,
            addr,
            rt,
            accept: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let shared = Arc::clone(&self.shared);
        let task = self.rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As the real API server (Go sets TCP_NODELAY): watch events leave at once.
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let mut epoch = shared.epoch.subscribe();
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(&shared, req)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = epoch.changed() => {}
                    }
                });
            }
        });
        *lock(&self.accept) = Some(task);
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for this server.
    pub fn kube_config(&self) -> kube::Config {
        let mut c = kube::Config::new(self.url().parse().expect("server URL"));
        c.connect_timeout = Some(Duration::from_secs(1));
        c
    }

    /// A kubeconfig file pointing at this server, as `kubectl` would read it.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            self.url()
        )
    }

    pub fn requests(&self) -> &Requests {
        &self.shared.requests
    }

    /// How often watches that asked for bookmarks get one (the real server: about a minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *lock(&self.shared.bookmark_every) = every;
    }

    /// Serves or stops serving a kind (installing or removing its CRD), by [`KindSpec::label`].
    pub fn set_served(&self, label: &str, served: bool) {
        let i = KINDS
            .iter()
            .position(|k| k.label() == label)
            .unwrap_or_else(|| panic!("no kind {label}"));
        let mut st = lock(&self.shared.state);
        st.served[i] = served;
        if !served {
            // Removing a CRD deletes its objects first, each deletion a new resourceVersion.
            let gone: Vec<Value> = std::mem::take(&mut st.objects[i]).into_values().collect();
            for mut object in gone {
                st.rv += 1;
                object["metadata"]["resourceVersion"] = st.rv.to_string().into();
                Self::record(&self.shared, &mut st, i, "DELETED", object);
            }
        }
    }

    /// Makes lists of one kind fail with `code` (or succeed again with `None`).
    /// Answers every request, `/version` included, with `403 Forbidden` for `d`, as a real API
    /// server does for a few seconds after it starts, before its authorization caches are warm.
    pub fn forbid_for(&self, d: Duration) {
        *lock(&self.shared.forbidden_until) = Some(std::time::Instant::now() + d);
    }

    /// Stores objects of kind `label` pruned by `schema` (a CRD version's openAPIV3Schema), as a
    /// real API server does for custom resources; `None` stores them as given.
    pub fn set_schema(&self, label: &str, schema: Option<Value>) {
        let i = KINDS
            .iter()
            .position(|k| k.label() == label)
            .unwrap_or_else(|| panic!("no kind {label}"));
        lock(&self.shared.state).schemas[i] = schema;
    }

    pub fn fail_lists(&self, label: &str, code: Option<u16>) {
        let i = KINDS
            .iter()
            .position(|k| k.label() == label)
            .unwrap_or_else(|| panic!("no kind {label}"));
        lock(&self.shared.state).failing[i] = code;
    }

    fn record(shared: &Shared, st: &mut State, kind: usize, event: &'static str, object: Value) {
        let change = Change {
            rv: st.rv,
            kind,
            event,
            object,
        };
        st.history.push(change.clone());
        let _ = shared.live.send(Arc::new(change));
    }

    /// Creates or replaces an object (by apiVersion, kind, namespace and name); returns its new
    /// resourceVersion. Panics on an object that names no served kind: a test bug.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = kind_of(&object).unwrap_or_else(|| panic!("not a watched kind: {object}"));
        let key = key_of(&object).unwrap_or_else(|| panic!("no metadata.name: {object}"));
        let mut st = lock(&self.shared.state);
        assert!(st.served[kind], "{} is not served", KINDS[kind].label());
        if let Some(schema) = &st.schemas[kind] {
            // What a client that skips field validation gets: no error, unknown fields gone.
            if let Some(spec) = object.get_mut("spec") {
                prune(&schema["properties"]["spec"], spec);
            }
        }
        st.rv += 1;
        st.uid += 1;
        let rv = st.rv;
        let old = st.objects[kind].get(&key).cloned();
        let meta = object
            .as_object_mut()
            .and_then(|o| o.get_mut("metadata"))
            .and_then(Value::as_object_mut)
            .expect("metadata is an object");
        meta.insert("resourceVersion".into(), rv.to_string().into());
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"].get("uid").cloned())
            .unwrap_or_else(|| format!("00000000-0000-0000-0000-{:012}", st.uid).into());
        meta.insert("uid".into(), uid);
        meta.entry("creationTimestamp")
            .or_insert_with(|| "2026-11-23T00:00:00Z".into());
        st.objects[kind].insert(key, object.clone());
        let event = if old.is_some() { "MODIFIED" } else { "ADDED" };
        Self::record(&self.shared, &mut st, kind, event, object);
        rv
    }

    /// Applies every document of a YAML stream.
    pub fn apply_yaml(&self, text: &str) {
        use serde::Deserialize;
        for doc in serde_norway::Deserializer::from_str(text) {
            let v = Value::deserialize(doc).expect("test YAML");
            if !v.is_null() {
                self.apply(v);
            }
        }
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, key: &str) -> bool {
        let i = KINDS
            .iter()
            .position(|k| k.api_version() == api_version && k.kind == kind)
            .unwrap_or_else(|| panic!("not a watched kind: {api_version} {kind}"));
        let mut st = lock(&self.shared.state);
        let Some(mut object) = st.objects[i].remove(key) else {
            return false;
        };
        st.rv += 1;
        object["metadata"]["resourceVersion"] = st.rv.to_string().into();
        Self::record(&self.shared, &mut st, i, "DELETED", object);
        true
    }

    /// Forgets the history (etcd compaction): watches and continue tokens from before now get
    /// `410 Gone`.
    pub fn compact(&self) {
        let mut st = lock(&self.shared.state);
        st.history.clear();
        // A watch from the current version missed nothing; one from before it did.
        st.floor = st.rv;
        st.pages.clear();
    }

    /// Takes the server down (closes the listener and cuts every connection, watches included).
    pub fn go_down(&self) {
        if let Some(t) = lock(&self.accept).take() {
            t.abort();
            // Wait until the accept loop is gone, so no connection slips in after the cut.
            let _ = self.rt.block_on(t);
        }
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Brings the server back on the same address.
    pub fn come_back(&self) {
        let listener = self.rt.block_on(async {
            for _ in 0..100 {
                if let Ok(l) = bind(self.addr).await {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("cannot rebind {}", self.addr)
        });
        self.serve(listener);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.go_down();
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

/// Structural pruning (apiextensions `pruning.Prune`): in an object node with `properties`,
/// fields the schema does not declare are dropped unless the node has
/// `x-kubernetes-preserve-unknown-fields: true`; declared fields, `additionalProperties` values
/// and array items are pruned by their own schemas.
pub fn prune(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
            let props = schema["properties"].as_object();
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            map.retain(|k, _| {
                preserve || extra.is_some() || props.is_some_and(|p| p.contains_key(k))
            });
            for (k, child) in map.iter_mut() {
                match (props.and_then(|p| p.get(k)), extra) {
                    (Some(s), _) | (None, Some(s)) => prune(s, child),
                    (None, None) => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                items.iter_mut().for_each(|i| prune(s, i));
            }
        }
        _ => {}
    }
}

fn full(code: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| unreachable!("static response parts"))
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn error(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(code, status(code.as_u16(), reason, message))
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Which kind a collection path names, and the namespace it is limited to.
fn route(path: &str) -> Option<(usize, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural),
        _ => return None,
    };
    let i = KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)?;
    Some((i, ns))
}

fn in_namespace(obj: &Value, ns: &Option<String>) -> bool {
    match ns {
        None => true,
        Some(ns) => obj["metadata"]["namespace"].as_str() == Some(ns.as_str()),
    }
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server is read-only over HTTP".into(),
        );
    }
    let path = req.uri().path().to_string();
    if lock(&shared.forbidden_until).is_some_and(|t| std::time::Instant::now() < t) {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{path} is forbidden: User \"system:serviceaccount:kube-system:portcullis\" cannot list resource at the cluster scope"),
        );
    }
    if path == "/version" {
        return full(
            StatusCode::OK,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-portcullis-test", "platform": "linux/amd64"}),
        );
    }
    let q = query(&req);
    let Some((kind, ns)) = route(&path) else {
        shared.requests.not_found.fetch_add(1, Relaxed);
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    };
    if !lock(&shared.state).served[kind] {
        shared.requests.not_found.fetch_add(1, Relaxed);
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    }
    for unsupported in ["labelSelector", "fieldSelector", "sendInitialEvents"] {
        if q.get(unsupported)
            .is_some_and(|v| !v.is_empty() && v != "false")
        {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("{unsupported} is not supported by the test API server"),
            );
        }
    }
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        watch_response(shared, kind, ns, &q)
    } else {
        list_response(shared, kind, ns, &q)
    }
}

fn parse_rv(q: &HashMap<String, String>) -> Result<Option<u64>, Box<Response<Body>>> {
    match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("invalid resourceVersion {v:?}"),
            ))
        }),
    }
}

fn list_response(
    shared: &Shared,
    kind: usize,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    shared.requests.lists.fetch_add(1, Relaxed);
    let spec = &KINDS[kind];
    let mut st = lock(&shared.state);
    let rv = match parse_rv(q) {
        Ok(rv) => rv,
        Err(resp) => return *resp,
    };
    if let Some(code) = st.failing[kind] {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(
            code,
            "InternalError",
            format!("injected failure listing {}", spec.plural),
        );
    }
    let exact = q.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
    if let Some(v) = rv.filter(|v| *v > 0) {
        if v > st.rv {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!("Too large resource version: {v}, current: {}", st.rv),
            );
        }
        if exact && v != st.rv {
            shared.requests.gone.fetch_add(1, Relaxed);
            return error(
                StatusCode::GONE,
                "Expired",
                format!("too old resource version: {v} ({})", st.rv),
            );
        }
    }
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // A continue token is `<page id>:<offset>` into a snapshot taken by the first page.
    let (list_rv, items, offset, page) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(p, o)| Some((p.parse::<u64>().ok()?, o.parse::<usize>().ok()?)));
            let Some(((page, offset), (list_rv, items))) =
                parsed.and_then(|(p, o)| Some(((p, o), st.pages.get(&p)?.clone())))
            else {
                shared.requests.gone.fetch_add(1, Relaxed);
                return error(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                );
            };
            (list_rv, items, offset, page)
        }
        None => {
            let items: Vec<Value> = st.objects[kind]
                .values()
                .filter(|o| in_namespace(o, &ns))
                .map(|o| {
                    let mut o = o.clone();
                    if builtin(spec) {
                        if let Some(m) = o.as_object_mut() {
                            m.remove("apiVersion");
                            m.remove("kind");
                        }
                    }
                    o
                })
                .collect();
            let page = st.next_page;
            st.next_page += 1;
            (st.rv, items, 0, page)
        }
    };
    let end = offset.saturating_add(limit).min(items.len());
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if end < items.len() {
        st.pages.insert(page, (list_rv, items.clone()));
        meta["continue"] = format!("{page}:{end}").into();
        meta["remainingItemCount"] = (items.len() - end).into();
    } else {
        st.pages.remove(&page);
    }
    full(
        StatusCode::OK,
        json!({"apiVersion": spec.api_version(), "kind": format!("{}List", spec.kind),
               "metadata": meta, "items": items[offset.min(end)..end]}),
    )
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(
    shared: &Arc<Shared>,
    kind: usize,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    shared.requests.watches.fetch_add(1, Relaxed);
    let spec = &KINDS[kind];
    let from = match parse_rv(q) {
        Ok(rv) => rv,
        Err(resp) => return *resp,
    };
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    // Subscribe and read the backlog under one lock: no change can fall between them.
    let (mut live, backlog, mut current) = {
        let st = lock(&shared.state);
        let live = shared.live.subscribe();
        let backlog: Result<Vec<Bytes>, Bytes> = match from {
            // No version, or 0: start with the current state as ADDED events.
            None | Some(0) => Ok(st.objects[kind]
                .values()
                .filter(|o| in_namespace(o, &ns))
                .map(|o| event_line("ADDED", o))
                .collect()),
            Some(v) if v < st.floor => {
                shared.requests.gone.fetch_add(1, Relaxed);
                Err(event_line(
                    "ERROR",
                    &status(
                        410,
                        "Expired",
                        format!("too old resource version: {v} ({})", st.floor),
                    ),
                ))
            }
            Some(v) => Ok(st
                .history
                .iter()
                .filter(|c| c.rv > v && c.kind == kind && in_namespace(&c.object, &ns))
                .map(|c| event_line(c.event, &c.object))
                .collect()),
        };
        (live, backlog, st.rv)
    };
    let every = *lock(&shared.bookmark_every);
    let mut epoch = shared.epoch.subscribe();
    let shared = Arc::clone(shared);
    let api_version = spec.api_version();
    let kind_name = spec.kind;
    tokio::spawn(async move {
        let lines = match backlog {
            Ok(lines) => lines,
            Err(gone) => {
                let _ = tx.send(gone).await;
                return;
            }
        };
        for l in lines {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let line = tokio::select! {
                _ = epoch.changed() => return,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => return,
                _ = tick.tick(), if bookmarks => {
                    shared.requests.bookmarks.fetch_add(1, Relaxed);
                    event_line("BOOKMARK", &json!({"apiVersion": api_version, "kind": kind_name, "metadata": {"resourceVersion": current.to_string()}}))
                }
                change = live.recv() => match change {
                    Ok(c) => {
                        current = current.max(c.rv);
                        if c.kind != kind || !in_namespace(&c.object, &ns) {
                            continue;
                        }
                        event_line(c.event, &c.object)
                    }
                    // Too slow to keep up, or the server is going away: end the watch, as the
                    // real server does; the client resumes from its last resourceVersion.
                    Err(_) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
            if !lock(&shared.state).served[kind] {
                // Its CRD was removed (the deletions were delivered): the real server ends
                // such watches.
                return;
            }
        }
    });
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| unreachable!("static response parts"))
}
