//! The observability endpoints over HTTP/1.1, served by hyper on a tokio current-thread runtime
//! on the metrics thread. Every connection is its own task with a deadline for the request head
//! and for the whole connection, so a client that connects and sends nothing, or reads slowly,
//! delays no other client (a kubelet probe with a 1 s timeout keeps passing).
//!
//! Two kinds of listener, one server: the metrics listener (TCP, read-only: `GET /metrics` and
//! `/healthz`, what a scraper and a probe need) and the admin API (a unix socket whose file
//! permissions decide who may use it, or TCP with a bearer token): `/status`, `/explain` and
//! `/conntrack` (list, and flush with DELETE or POST) besides.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::{health, prometheus, Observed};

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection may live (keep-alive included).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the endpoint. Fails at start-up (not later) when the address is taken.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Binds the admin socket at `path` with permission bits `mode`, creating its directory. A
/// socket file left by a process that is gone is replaced; one a running gateway answers on is
/// not (two gateways must not share an admin socket).
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another process serves the admin socket {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// What a listener's clients may ask for.
#[derive(Debug, Clone)]
pub enum Access {
    /// `GET /metrics` and `/healthz` only.
    Metrics,
    /// Everything (the unix socket: its permissions decide who connects).
    Admin,
    /// Everything, with `Authorization: Bearer <token>` (the admin API over TCP).
    Token(Arc<str>),
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Serves the metrics listener (read-only) on the calling thread until `stop` is set.
pub fn serve(listener: TcpListener, obs: Arc<Observed>, stop: Arc<AtomicBool>) {
    serve_with(Listener::Tcp(listener), Access::Metrics, obs, stop)
}

/// Serves `listener` with `access` on the calling thread until `stop` is set.
pub fn serve_with(listener: Listener, access: Access, obs: Arc<Observed>, stop: Arc<AtomicBool>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the metrics runtime; the endpoints are off");
            return;
        }
    };
    rt.block_on(async move {
        enum L {
            Tcp(tokio::net::TcpListener),
            Unix(tokio::net::UnixListener),
        }
        let listener = match listener {
            Listener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(L::Tcp),
            Listener::Unix(l) => tokio::net::UnixListener::from_std(l).map(L::Unix),
        };
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve a metrics or admin listener; its endpoints are off");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Relaxed) {
            let (obs, access) = (Arc::clone(&obs), access.clone());
            tokio::select! {
                accepted = async {
                    match &listener {
                        L::Tcp(l) => l.accept().await.map(|(s, _)| {
                            let _ = s.set_nodelay(true);
                            tokio::spawn(connection(s, obs, access));
                        }),
                        L::Unix(l) => l.accept().await.map(|(s, _)| {
                            tokio::spawn(connection(s, obs, access));
                        }),
                    }
                } => if let Err(e) = accepted {
                    tracing::warn!(error = %e, "metrics/admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                },
                _ = tick.tick() => {}
            }
        }
    });
}

async fn connection<S>(stream: S, obs: Arc<Observed>, access: Access)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The metrics listener's connections live at most CONNECTION_TIMEOUT; the admin API's may
    // stream (`/monitor`) for as long as the client reads.
    let limit = match access {
        Access::Metrics => CONNECTION_TIMEOUT,
        _ => Duration::from_secs(365 * 24 * 3600),
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let obs = Arc::clone(&obs);
        let access = access.clone();
        async move { Ok::<_, Infallible>(route(&obs, &req, &access)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limit, conn).await {
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended with an error"),
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!("metrics connection closed after {CONNECTION_TIMEOUT:?}"),
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(code: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Compares without an early exit on the first differing byte.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn route(obs: &Arc<Observed>, req: &Request<Incoming>, access: &Access) -> Response<Body> {
    let text = "text/plain; charset=utf-8";
    let path = req.uri().path();
    match access {
        Access::Metrics => {
            if !matches!(path, "/metrics" | "/healthz") {
                let known = matches!(path, "/status" | "/explain" | "/conntrack" | "/monitor");
                return reply(
                    StatusCode::NOT_FOUND,
                    text,
                    if known {
                        format!("{path} is on the admin API (admin.socket, or admin.listen with a token), not on the metrics listener\n")
                    } else {
                        "the metrics listener serves GET /metrics and /healthz\n".into()
                    },
                );
            }
            if !matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD) {
                return reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    text,
                    "the metrics listener is read-only (GET /metrics, GET /healthz)\n".into(),
                );
            }
        }
        Access::Admin => {}
        Access::Token(token) => {
            let given = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_token(given.trim().as_bytes(), token.as_bytes()) {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    text,
                    "the admin API needs Authorization: Bearer <token from admin.token_file>\n"
                        .into(),
                );
            }
        }
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(&obs.status()),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&obs.status())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        ),
        "/explain" => {
            let (code, ctype, body) = explain(obs, req.uri().query().unwrap_or(""));
            reply(code, ctype, body)
        }
        "/conntrack" => {
            let flush = match *req.method() {
                hyper::Method::GET => false,
                hyper::Method::DELETE | hyper::Method::POST => true,
                _ => {
                    return reply(
                        StatusCode::METHOD_NOT_ALLOWED,
                        text,
                        "GET lists flows; DELETE (or POST) flushes them\n".into(),
                    )
                }
            };
            let (code, ctype, body) = conntrack(obs, req.uri().query().unwrap_or(""), flush);
            reply(code, ctype, body)
        }
        "/monitor" => monitor(obs, req.uri().query().unwrap_or("")),
        "/healthz" => match health(&obs.status()) {
            Ok(notes) => reply(
                StatusCode::OK,
                text,
                std::iter::once("ok".to_string())
                    .chain(notes)
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n",
            ),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "try /metrics, /healthz, /status, /conntrack or /explain?src=IP&dst=IP&proto=tcp&dport=N\n"
                .to_string(),
        ),
    }
}

/// `GET /monitor?all=1&addr=&port=&proto=&reason=&frames=1`: a stream of JSON lines, one per
/// frame verdict that matches (drops only unless `all=1`), for as long as the client reads.
/// Lines `{"lost": N}` say how many events were lost since the previous one (a worker's queue
/// was full, or this client read too slowly).
fn monitor(obs: &Arc<Observed>, query: &str) -> Response<Body> {
    let text = "text/plain; charset=utf-8";
    let Some(feed) = obs.monitor.clone() else {
        return reply(
            StatusCode::NOT_FOUND,
            text,
            "this instance records no verdict feed\n".into(),
        );
    };
    let filter = match crate::monitor::Filter::parse(query) {
        Ok(f) => f,
        Err(e) => return reply(StatusCode::BAD_REQUEST, text, format!("{e}\n")),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let obs = Arc::clone(obs);
    let query = query.to_string();
    tokio::spawn(async move {
        let mut batches = feed.batches.subscribe();
        // Registered only once subscribed: no batch is sent that this listener could miss.
        let _sub = feed.monitor.subscribe(filter.allowed, filter.frames);
        let mut lost_seen = feed.monitor.lost();
        // Says hello at once, so the client knows it is listening.
        let hello = serde_json::json!({"listening": true, "filter": query}).to_string() + "\n";
        if tx.send(Bytes::from(hello)).await.is_err() {
            return;
        }
        loop {
            let batch = tokio::select! {
                b = batches.recv() => b,
                _ = tx.closed() => return,
            };
            let mut out = String::new();
            match batch {
                Ok(events) => {
                    let table = obs
                        .reloader
                        .lock()
                        .map(|mut r| r.publisher().current())
                        .ok();
                    for e in events.iter().filter(|e| filter.matches(e)) {
                        let origin = e
                            .rule
                            .and_then(|id| Some(table.as_ref()?.rule_by_id(id)?.origin.name()));
                        let line = crate::monitor::Line::of(e, origin, filter.frames);
                        out.push_str(&serde_json::to_string(&line).unwrap_or_default());
                        out.push('\n');
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    out.push_str(&format!(
                        "{{\"lost\":{n},\"why\":\"this listener read too slowly\"}}\n"
                    ));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
            let lost = feed.monitor.lost();
            if lost > lost_seen {
                out.push_str(&format!(
                    "{{\"lost\":{},\"why\":\"a worker's queue was full\"}}\n",
                    lost - lost_seen
                ));
                lost_seen = lost;
            }
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// `/explain?src=&dst=&proto=&sport=&dport=&icmp_type=&direction=&format=text|json`: the live
/// table's verdict for one flow.
fn explain(obs: &Observed, query: &str) -> (StatusCode, &'static str, String) {
    let bad = |m: String| (StatusCode::BAD_REQUEST, "text/plain", format!("{m}\n"));
    let mut fields = serde_json::Map::new();
    let mut json = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = policy::explain::percent_decode(v);
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
    let probe: policy::explain::FlowQuery = match serde_json::from_value(fields.into()) {
        Ok(p) => p,
        Err(e) => return bad(format!("bad flow: {e} (give src, dst, and optionally proto, sport, dport, icmp_type, direction)")),
    };
    let key = match probe.key() {
        Ok(k) => k,
        Err(e) => return bad(e.to_string()),
    };
    let report = obs
        .reloader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .explain(&key);
    let tracked = obs.conntrack.as_ref().map(|ct| tracker_view(ct, &key));
    match report {
        Ok(r) if json => {
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            if let (Some(map), Some(t)) = (v.as_object_mut(), &tracked) {
                map.insert(
                    "conntrack".into(),
                    serde_json::to_value(t).unwrap_or_default(),
                );
            }
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
            )
        }
        Ok(r) => {
            let mut text = r.render();
            if let Some(t) = &tracked {
                text.push_str(&t.render());
            }
            (StatusCode::OK, "text/plain", text)
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

/// `/conntrack?addr=IP&port=N&proto=P`: the tracked flows with that address (either end), port
/// (either end) and protocol, as JSON; with DELETE, flushes them and says how many.
fn conntrack(obs: &Observed, query: &str, flush: bool) -> (StatusCode, &'static str, String) {
    let bad = |m: String| (StatusCode::BAD_REQUEST, "text/plain", format!("{m}\n"));
    let Some(ct) = &obs.conntrack else {
        return bad("connection tracking is disabled (conntrack.enabled: false)".into());
    };
    let mut filter = crate::conntrack::Filter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = policy::explain::percent_decode(v);
        match (k, v.parse::<std::net::IpAddr>(), v.parse::<u16>()) {
            ("addr", Ok(a), _) => filter.addr = Some(a),
            ("port", _, Ok(p)) => filter.port = Some(p),
            ("proto", _, _) => match policy::key::proto::parse(&v) {
                Some(p) => filter.proto = Some(p),
                None => return bad(format!("proto={v} is not a protocol")),
            },
            _ => return bad(format!("{k}={v}: expected addr=IP, port=N or proto=P")),
        }
    }
    let now = ct.ns(std::time::Instant::now());
    if flush {
        let n = ct.flush(|t| filter.matches(t));
        (
            StatusCode::OK,
            "application/json",
            format!("{{\"flushed\":{n}}}\n"),
        )
    } else {
        let flows = ct.list(now, |t| filter.matches(t));
        (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&flows).unwrap_or_default() + "\n",
        )
    }
}

/// What the live tracker says about a flow, for `/explain`.
#[derive(Debug, serde::Serialize)]
struct TrackerView {
    /// `new` (no entry: the rules decide), or `established` (a tracked flow, either direction).
    state: &'static str,
    entry: Option<crate::conntrack::FlowEntry>,
    /// The packet travels in the entry's original direction (else it is a reply).
    original: Option<bool>,
}

impl TrackerView {
    fn render(&self) -> String {
        match (&self.entry, self.original) {
            (Some(e), Some(original)) => format!(
                "tracker: established flow {} {}:{} -> {}:{} ({:?}, {}, admitted by generation {}, idle {} ms); this packet is {} and passes without the rules above if its flow's state accepts it (a TCP segment outside the window, a RST with the wrong sequence number, or a SYN/FIN/RST with a bad checksum is `invalid`: the rules above decide it on its own, and a deny counts as drops_total{{reason=\"invalid\"}}), until the table changes (then the flow is decided again in its original direction)\n",
                e.direction,
                e.src,
                e.sport,
                e.dst,
                e.dport,
                e.state,
                if e.assured { "assured: never evicted" } else { "not assured: evictable when its buckets are full" },
                e.generation,
                e.idle_ms,
                if original { "in its original direction" } else { "a reply" },
            ),
            _ => "tracker: no tracked flow: this packet is new, and the rules above decide it (an allowed one opens a flow if it can: a TCP SYN, an ICMP query request, any packet of another protocol; a later fragment passes only after its first fragment did, else fragment_no_first)\n".into(),
        }
    }
}

fn tracker_view(ct: &crate::conntrack::Conntrack, key: &policy::key::FlowKey) -> TrackerView {
    let now = ct.ns(std::time::Instant::now());
    let kind = crate::conntrack::classify_packet(key, &crate::conntrack::Track::new());
    let hit = match kind {
        crate::conntrack::Kind::Flow(t) => ct.lookup(&t, now).map(|h| (h, t)),
        _ => None,
    };
    match hit {
        Some((h, t)) => TrackerView {
            state: "established",
            entry: Some(h.entry(&t, now)),
            original: Some(h.original),
        },
        None => TrackerView {
            state: "new",
            entry: None,
            original: None,
        },
    }
}
