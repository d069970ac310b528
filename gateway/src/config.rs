//! The gateway config file: YAML, strictly validated. Unknown fields are errors, and every error
//! names the file, the field and what was expected. Every key and its default is documented in
//! the README ("Configuration reference").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::sys::ring::MAX_BURST;
pub use crate::sys::{XdpMode, ZeroCopy};

use policy::compile::GatewayContext;
use policy::gateway_policy::RuleSpec;
use policy::rule::{DenyReason, Direction, Verdict};

/// A config problem: which file, which field, what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interfaces {
    /// The external (client-facing) interface.
    pub ext: String,
    /// The internal (cluster-facing) interface.
    pub int: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PollMode {
    /// Spin on the rings; lowest latency, one full core per worker.
    Busy,
    /// Spin, but after `idle_after` empty bursts sleep in poll(2) until traffic or timeout.
    Idle,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Poll {
    #[serde(default = "default_poll_mode")]
    pub mode: PollMode,
    #[serde(default = "default_idle_after")]
    pub idle_after: u32,
    #[serde(default = "default_poll_timeout")]
    pub timeout_ms: u32,
}

fn default_poll_mode() -> PollMode {
    PollMode::Busy
}
fn default_idle_after() -> u32 {
    64
}
fn default_poll_timeout() -> u32 {
    100
}

impl Default for Poll {
    fn default() -> Self {
        Poll {
            mode: default_poll_mode(),
            idle_after: default_idle_after(),
            timeout_ms: default_poll_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Xdp {
    #[serde(default = "default_xdp_mode")]
    pub mode: XdpMode,
    #[serde(default = "default_zero_copy")]
    pub zero_copy: ZeroCopy,
}

fn default_xdp_mode() -> XdpMode {
    XdpMode::Native
}
fn default_zero_copy() -> ZeroCopy {
    ZeroCopy::Auto
}

impl Default for Xdp {
    fn default() -> Self {
        Xdp {
            mode: default_xdp_mode(),
            zero_copy: default_zero_copy(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Allow,
    Deny,
}

impl DefaultAction {
    fn verdict(self) -> Verdict {
        match self {
            DefaultAction::Allow => Verdict::Allow,
            DefaultAction::Deny => Verdict::Deny(DenyReason::Default),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default = "deny")]
    pub ingress: DefaultAction,
    #[serde(default = "allow")]
    pub egress: DefaultAction,
}

fn deny() -> DefaultAction {
    DefaultAction::Deny
}
fn allow() -> DefaultAction {
    DefaultAction::Allow
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            ingress: deny(),
            egress: allow(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L2Action {
    Forward,
    Drop,
}

/// What happens to frames that are not IP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2 {
    #[serde(default = "forward")]
    pub arp: L2Action,
    #[serde(default = "drop")]
    pub other: L2Action,
}

fn forward() -> L2Action {
    L2Action::Forward
}
fn drop() -> L2Action {
    L2Action::Drop
}

impl Default for L2 {
    fn default() -> Self {
        L2 {
            arp: forward(),
            other: drop(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failsafe {
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    #[serde(default)]
    pub egress: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where `/metrics` and `/healthz` are served, read-only (GET); `null` turns it off. Safe
    /// to open for scraping: nothing on it changes state or tells the policy's details.
    #[serde(default = "default_listen")]
    pub listen: Option<SocketAddr>,
}

/// The admin API: `/status`, `/explain`, `/conntrack` (list and flush), besides `/metrics` and
/// `/healthz`. On a unix socket whose file permissions decide who may use it; over TCP only
/// with a bearer token, and only when configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// The unix socket (`null`: none). Its directory is created if missing.
    #[serde(default = "default_admin_socket")]
    pub socket: Option<PathBuf>,
    /// The socket file's permission bits (octal in YAML: 0o600 is owner only; 0o660 adds the
    /// group).
    #[serde(default = "default_admin_mode")]
    pub mode: u32,
    /// Also serve the admin API on this TCP address (off by default); needs `token_file`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token TCP admin clients must send (`Authorization: Bearer`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Where the admin socket lives when the config does not say.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/portcullis/admin.sock";

fn default_admin_socket() -> Option<PathBuf> {
    Some(PathBuf::from(DEFAULT_ADMIN_SOCKET))
}

fn default_admin_mode() -> u32 {
    0o600
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            socket: default_admin_socket(),
            mode: default_admin_mode(),
            listen: None,
            token_file: None,
        }
    }
}

fn default_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9477)))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: default_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Logging {
    /// At most this many denied/logged flows are written per second (per process).
    #[serde(default = "default_log_rate")]
    pub flows_per_sec: u32,
}

fn default_log_rate() -> u32 {
    20
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            flows_per_sec: default_log_rate(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoEndpoints {
    /// Drop traffic to a Service frontend without endpoints at the edge (`no_endpoints`).
    Drop,
    /// Let later layers (the default) decide.
    Pass,
}

/// How the Kubernetes layer is compiled, and whether objects also come from the API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Kubernetes {
    /// Pod IPs are reachable through the gateway (routed pod network): compile rules for them.
    #[serde(default)]
    pub pods_routable: bool,
    #[serde(default = "default_no_endpoints")]
    pub no_endpoints: NoEndpoints,
    /// Who enforces NetworkPolicies: `auto` (Calico when the cluster or the policy files have
    /// Calico objects), `calico` (as Calico's order-1000 default-tier policies) or `kubernetes`.
    #[serde(default)]
    pub policy_engine: policy::compile::PolicyEngine,
    /// Watch the Kubernetes API (absent: the policy directory is the only source).
    #[serde(default)]
    pub api: Option<KubernetesApi>,
}

/// What `run` does before the API's first complete snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Startup {
    /// Open no socket until every kind was listed: never forward on a partial view.
    Wait,
    /// Forward on the policy directory's table at once; swap in the merged table when synced.
    Files,
}

/// The Kubernetes API source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct KubernetesApi {
    /// A kubeconfig file (relative to this config's directory). Absent: in-cluster service
    /// account, else `$KUBECONFIG`, else `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// A context of the kubeconfig (absent: its current context).
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default = "default_startup")]
    pub startup: Startup,
    /// Give up starting after this many seconds without a first sync (0: wait for ever).
    #[serde(default)]
    pub startup_timeout_s: u64,
    /// The most time between two recompiles while events keep coming (the gap after a compile
    /// is twice what it cost, up to this); a change after a quiet spell is compiled at once,
    /// after a 2 ms settle.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
    /// The longest a stream of events may delay a recompile.
    #[serde(default = "default_max_delay")]
    pub max_delay_ms: u64,
}

fn default_startup() -> Startup {
    Startup::Wait
}
fn default_debounce() -> u64 {
    50
}
fn default_max_delay() -> u64 {
    500
}

fn default_no_endpoints() -> NoEndpoints {
    NoEndpoints::Drop
}

impl Default for Kubernetes {
    fn default() -> Self {
        Kubernetes {
            pods_routable: false,
            no_endpoints: default_no_endpoints(),
            policy_engine: Default::default(),
            api: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct ConfigWire {
    interfaces: Interfaces,
    #[serde(default = "one")]
    queues: u32,
    #[serde(default)]
    cores: Option<Vec<usize>>,
    #[serde(default)]
    poll: Poll,
    #[serde(default = "default_burst")]
    burst: usize,
    #[serde(default = "default_ring")]
    ring_size: u32,
    #[serde(default = "default_frame_size")]
    frame_size: u32,
    #[serde(default = "default_frames")]
    frames: u32,
    #[serde(default)]
    xdp: Xdp,
    policy_dir: PathBuf,
    #[serde(default)]
    default: Defaults,
    #[serde(default)]
    l2: L2,
    #[serde(default)]
    failsafe: Failsafe,
    #[serde(default)]
    kubernetes: Kubernetes,
    #[serde(default)]
    metrics: Metrics,
    #[serde(default)]
    admin: Admin,
    #[serde(default)]
    logging: Logging,
    #[serde(default)]
    conntrack: Conntrack,
    /// Compile budgets (`limits: {atoms_per_object, atoms_per_table}`).
    #[serde(default)]
    limits: policy::compile::Budget,
}

/// The connection tracker (`conntrack:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Conntrack {
    /// Track flows (the default). Off: every packet is decided by the rules alone.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Flows the table holds, shared by every worker (rounded up to a power of two).
    #[serde(default = "default_ct_capacity")]
    pub capacity: usize,
    /// At most this many slots each worker checks for expiry per turn (the sweep is paced to go
    /// through the whole table once a second).
    #[serde(default = "default_ct_sweep")]
    pub sweep_per_turn: usize,
    #[serde(default)]
    pub timeouts: crate::conntrack::Timeouts,
}

fn yes() -> bool {
    true
}
fn default_ct_capacity() -> usize {
    262_144
}
fn default_ct_sweep() -> usize {
    64
}

impl Default for Conntrack {
    fn default() -> Self {
        Conntrack {
            enabled: true,
            capacity: default_ct_capacity(),
            sweep_per_turn: default_ct_sweep(),
            timeouts: crate::conntrack::Timeouts::default(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_burst() -> usize {
    64
}
fn default_ring() -> u32 {
    2048
}
fn default_frame_size() -> u32 {
    4096
}
fn default_frames() -> u32 {
    8192
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub interfaces: Interfaces,
    pub queues: u32,
    /// Core for worker `i` (queue `i`).
    pub cores: Vec<usize>,
    pub poll: Poll,
    pub burst: usize,
    pub ring_size: u32,
    pub frame_size: u32,
    pub frames: u32,
    pub xdp: Xdp,
    /// Absolute, or relative to the config file's directory.
    pub policy_dir: PathBuf,
    pub l2: L2,
    pub metrics: Metrics,
    pub admin: Admin,
    pub logging: Logging,
    pub conntrack: Conntrack,
    pub context: GatewayContext,
    /// The Kubernetes API source, when configured (kubeconfig anchored like `policy_dir`).
    pub kubernetes_api: Option<KubernetesApi>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it in errors and anchors `policy_dir`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |field: &str, message: String| ConfigError {
            file: file.clone(),
            field: field.to_string(),
            message,
        };
        let de = serde_norway::Deserializer::from_str(text);
        let w: ConfigWire = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(document)".to_string()
            } else {
                field
            };
            err(&field, e.into_inner().to_string())
        })?;

        for (name, value) in [
            ("interfaces.ext", &w.interfaces.ext),
            ("interfaces.int", &w.interfaces.int),
        ] {
            if value.is_empty() || value.len() > 15 || value.contains(['/', ' ']) {
                return Err(err(
                    name,
                    format!(
                        "`{value}` is not an interface name (1-15 characters, no '/' or spaces)"
                    ),
                ));
            }
        }
        if w.interfaces.ext == w.interfaces.int {
            return Err(err(
                "interfaces.int",
                "must differ from interfaces.ext".into(),
            ));
        }
        if !(1..=64).contains(&w.queues) {
            return Err(err(
                "queues",
                format!("{} is out of range (expected 1-64)", w.queues),
            ));
        }
        let ncores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cores = match w.cores {
            Some(c) => {
                if c.len() != w.queues as usize {
                    return Err(err(
                        "cores",
                        format!(
                            "lists {} cores for {} queues (expected one core per queue)",
                            c.len(),
                            w.queues
                        ),
                    ));
                }
                if let Some((i, bad)) = c.iter().enumerate().find(|(_, &c)| c >= ncores) {
                    return Err(err(
                        &format!("cores[{i}]"),
                        format!(
                            "core {bad} does not exist (this machine has cores 0-{})",
                            ncores - 1
                        ),
                    ));
                }
                c
            }
            None => (0..w.queues as usize)
                .map(|i| (ncores - 1 - i % ncores) % ncores)
                .collect(),
        };
        if !(1..=MAX_BURST).contains(&w.burst) {
            return Err(err(
                "burst",
                format!("{} is out of range (expected 1-{MAX_BURST})", w.burst),
            ));
        }
        const MAX_FLOWS: usize = 1 << 26;
        if !(1..=MAX_FLOWS).contains(&w.conntrack.capacity) {
            return Err(err(
                "conntrack.capacity",
                format!(
                    "{} is out of range (expected 1-{MAX_FLOWS}; each flow takes 64 bytes)",
                    w.conntrack.capacity
                ),
            ));
        }
        if !w.ring_size.is_power_of_two() || !(64..=16384).contains(&w.ring_size) {
            return Err(err(
                "ring_size",
                format!("{} must be a power of two in 64-16384", w.ring_size),
            ));
        }
        if w.frame_size != 2048 && w.frame_size != 4096 {
            return Err(err(
                "frame_size",
                format!("{} must be 2048 or 4096", w.frame_size),
            ));
        }
        // Two fill rings to stock, plus frames in flight on two TX rings.
        let needed = 4 * w.ring_size;
        if w.frames < needed || !w.frames.is_power_of_two() {
            return Err(err(
                "frames",
                format!(
                    "{} must be a power of two of at least 4 x ring_size = {needed}",
                    w.frames
                ),
            ));
        }
        if w.poll.mode == PollMode::Idle && !(1..=10_000).contains(&w.poll.timeout_ms) {
            return Err(err(
                "poll.timeout_ms",
                format!("{} is out of range (expected 1-10000)", w.poll.timeout_ms),
            ));
        }
        let mut failsafe = Vec::new();
        for (dir, list, key) in [
            (Direction::Ingress, &w.failsafe.ingress, "ingress"),
            (Direction::Egress, &w.failsafe.egress, "egress"),
        ] {
            for (i, r) in list.iter().enumerate() {
                let rules = r
                    .to_rules(dir, &format!("failsafe.{key}[{i}]"))
                    .map_err(|e| err(&e.field, e.message))?;
                failsafe.extend(rules.into_iter().map(|r| (i, r)));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let policy_dir = anchor(w.policy_dir);
        let mut kubernetes_api = w.kubernetes.api.clone();
        if let Some(api) = &mut kubernetes_api {
            if !(1..=60_000).contains(&api.max_delay_ms) {
                return Err(err(
                    "kubernetes.api.max_delay_ms",
                    format!("{} is out of range (expected 1-60000)", api.max_delay_ms),
                ));
            }
            if api.debounce_ms > api.max_delay_ms {
                return Err(err(
                    "kubernetes.api.debounce_ms",
                    format!(
                        "{} exceeds max_delay_ms ({}): the debounce could never end",
                        api.debounce_ms, api.max_delay_ms
                    ),
                ));
            }
            if api.context.as_deref() == Some("") {
                return Err(err(
                    "kubernetes.api.context",
                    "is empty (omit it to use the kubeconfig's current context)".into(),
                ));
            }
            api.kubeconfig = api.kubeconfig.take().map(anchor);
        }
        let mut admin = w.admin;
        if admin.mode > 0o777 {
            return Err(err(
                "admin.mode",
                format!("{:o} is not a file mode (0o000-0o777)", admin.mode),
            ));
        }
        if let Some(addr) = admin.listen {
            if admin.token_file.is_none() {
                return Err(err(
                    "admin.listen",
                    format!("serving the admin API on {addr} needs admin.token_file (a bearer token); without one, use the unix socket"),
                ));
            }
        }
        admin.socket = admin.socket.take().map(anchor);
        admin.token_file = admin.token_file.take().map(anchor);
        Ok(Config {
            path: path.to_path_buf(),
            interfaces: w.interfaces,
            queues: w.queues,
            cores,
            poll: w.poll,
            burst: w.burst,
            ring_size: w.ring_size,
            frame_size: w.frame_size,
            frames: w.frames,
            xdp: w.xdp,
            policy_dir,
            l2: w.l2,
            metrics: w.metrics,
            admin,
            logging: w.logging,
            conntrack: w.conntrack,
            context: GatewayContext {
                default_ingress: w.default.ingress.verdict(),
                default_egress: w.default.egress.verdict(),
                failsafe,
                pods_routable: w.kubernetes.pods_routable,
                drop_no_endpoints: w.kubernetes.no_endpoints == NoEndpoints::Drop,
                budget: w.limits,
                policy_engine: w.kubernetes.policy_engine,
            },
            kubernetes_api,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "interfaces: {ext: e0, int: i0}\npolicy_dir: policies\n";

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/portcullis/gw.yaml"))
    }

    #[test]
    fn defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.queues, 1);
        assert_eq!(c.burst, 64);
        assert_eq!(c.poll.mode, PollMode::Busy);
        assert_eq!(c.policy_dir, Path::new("/etc/portcullis/policies"));
        assert_eq!(
            c.context.default_ingress,
            Verdict::Deny(DenyReason::Default)
        );
        assert_eq!(c.context.default_egress, Verdict::Allow);
        assert_eq!(c.l2.arp, L2Action::Forward);
        assert_eq!(c.metrics.listen.unwrap().to_string(), "127.0.0.1:9477");
        assert_eq!(c.cores.len(), 1);
    }

    #[test]
    fn errors_name_file_and_field() {
        let cases = [
            ("interfaces: {ext: e0, int: i0}\n", "(document)", "policy_dir"),
            (&format!("{MIN}colour: red\n"), "colour", "unknown field"),
            (&format!("{MIN}burst: 0\n"), "burst", "1-256"),
            (&format!("{MIN}ring_size: 1000\n"), "ring_size", "power of two"),
            (&format!("{MIN}frames: 1024\n"), "frames", "at least"),
            (&format!("{MIN}queues: 2\ncores: [0]\n"), "cores", "one core per queue"),
            (&format!("{MIN}cores: [4096]\n"), "cores[0]", "does not exist"),
            (&format!("{MIN}xdp: {{mode: turbo}}\n"), "xdp.mode", "native"),
            (&format!("{MIN}default: {{ingress: maybe}}\n"), "default.ingress", "allow"),
            (&format!("{MIN}failsafe: {{ingress: [{{protocol: TCP, destination: {{ports: [99999]}}}}]}}\n"), "failsafe.ingress[0]", ""),
            (&format!("{MIN}failsafe: {{ingress: [{{destination: {{nets: [bogus]}}}}]}}\n"), "failsafe.ingress[0].destination.nets[0]", "not an IP"),
            ("interfaces: {ext: e0, int: e0}\npolicy_dir: p\n", "interfaces.int", "differ"),
            ("interfaces: {ext: a-very-long-interface-name, int: i0}\npolicy_dir: p\n", "interfaces.ext", "1-15"),
            (&format!("{MIN}metrics: {{listen: nowhere}}\n"), "metrics.listen", ""),
            (&format!("{MIN}kubernetes: {{api: {{startup: later}}}}\n"), "kubernetes.api.startup", "wait"),
            (&format!("{MIN}kubernetes: {{api: {{debounce_ms: 900}}}}\n"), "kubernetes.api.debounce_ms", "exceeds max_delay_ms"),
            (&format!("{MIN}kubernetes: {{api: {{max_delay_ms: 0}}}}\n"), "kubernetes.api.max_delay_ms", "1-60000"),
            (&format!("{MIN}kubernetes: {{api: {{context: ''}}}}\n"), "kubernetes.api.context", "empty"),
            (&format!("{MIN}kubernetes: {{api: {{kubeconf: x}}}}\n"), "kubernetes.api", "unknown field"),
        ];
        for (text, field, needle) in cases {
            let e = parse(text).unwrap_err();
            let shown = e.to_string();
            assert!(shown.starts_with("/etc/portcullis/gw.yaml: "), "{shown}");
            assert!(
                e.field.starts_with(field),
                "{text:?}: field {} in {shown}",
                e.field
            );
            assert!(shown.contains(needle), "{text:?}: {shown}");
        }
    }

    #[test]
    fn kubernetes_api_defaults_and_anchoring() {
        assert!(parse(MIN).unwrap().kubernetes_api.is_none());
        let c = parse(&format!(
            "{MIN}kubernetes: {{api: {{kubeconfig: kube/config}}}}\n"
        ))
        .unwrap();
        let api = c.kubernetes_api.unwrap();
        assert_eq!(
            api.kubeconfig.unwrap(),
            Path::new("/etc/portcullis/kube/config")
        );
        assert_eq!(api.startup, Startup::Wait);
        assert_eq!(
            (api.debounce_ms, api.max_delay_ms, api.startup_timeout_s),
            (50, 500, 0)
        );
        let c = parse(&format!("{MIN}kubernetes: {{api: {{}}}}\n")).unwrap();
        assert!(
            c.kubernetes_api.unwrap().kubeconfig.is_none(),
            "in-cluster/inferred"
        );
    }

    #[test]
    fn failsafe_rules_compile_into_the_context() {
        let c = parse(&format!(
            "{MIN}failsafe:\n  ingress:\n    - {{protocol: ICMP, icmp: {{type: 3, code: 4}}, description: frag-needed}}\n    - {{protocol: TCP, destination: {{nets: [10.0.0.1], ports: [22]}}}}\n"
        ))
        .unwrap();
        assert_eq!(c.context.failsafe.len(), 2);
        assert_eq!(c.context.failsafe[1].0, 1);
    }
}
