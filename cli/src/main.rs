//! `portcullis`: run the gateway, check and explain policies, read stats, and drive the lab.

/// mimalloc: the control thread's compile and classifier build allocate many small vectors, and
/// glibc's malloc and free were a quarter of that time (`perf` on `kube-latency` at 10k rules).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use control::source::kubernetes::{self, Connection, KubeSource};
use control::source::{load_dir_report, SourceError};
use gateway::config::{Config, KubernetesApi};
use gateway::metrics::Status;
use lab::Lab;
use policy::compile::{compile, GatewayContext};
use policy::explain::FlowQuery;
use policy::key::FlowKey;
use policy::snapshot::{ClusterObjects, Snapshot};
use policy::table::Table;

/// `portcullis --version`: the version, the commit and the build date.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PORTCULLIS_COMMIT"),
    ", built ",
    env!("PORTCULLIS_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "portcullis",
    version = VERSION,
    about = "AF_XDP packet-filter gateway for Kubernetes edge nodes"
)]
struct Cli {
    /// Log lines: `auto` (coloured on a terminal, plain text otherwise), `plain`, or `json` (one
    /// object per line, for log shippers). Logs go to standard error; RUST_LOG filters them.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Auto,
    Plain,
    Json,
}

/// Sets up logging to standard error in `format`.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    // libbpf's and libxdp's own lines come through tracing (targets `libbpf`, `libxdp`); their
    // warnings are mostly capability probes that fail by design, so they are off unless RUST_LOG
    // asks for them (RUST_LOG=info,libbpf=debug,libxdp=debug). kube's client logs every failed
    // request; the Kubernetes source summarises failures with their cause instead.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,libbpf=off,libxdp=off,kube_client=off".into());
    gateway::sys::liblog::route_library_logs();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        // Colour codes only where a terminal reads them: never in a file or a journal.
        LogFormat::Auto => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Plain => builder.with_ansi(false).init(),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway until SIGINT/SIGTERM (SIGHUP reloads the policies).
    Run {
        /// The gateway config (YAML): interfaces, queues, policy directory, defaults, tracker,
        /// metrics and the Kubernetes API.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate and compile policies; print a table summary, warnings, build time and memory.
    Check {
        #[command(flatten)]
        src: PolicySource,
    },
    /// Explain the verdict for one flow: the rule, its origin and the reason (and the Kubernetes
    /// verdicts when either end is a known pod), or for every JSON line of --probes.
    Explain {
        #[command(flatten)]
        src: PolicySource,
        /// Ask a running instance about its live table (files and Kubernetes API merged, exactly
        /// what the workers use) instead of reading policies: --admin or --addr say where.
        #[arg(long, conflicts_with_all = ["config", "policies", "files_only", "probes"])]
        live: bool,
        #[command(flatten)]
        admin: AdminArgs,
        /// Source address.
        #[arg(long = "src", required_unless_present = "probes")]
        src_addr: Option<IpAddr>,
        /// Destination address (the same family as --src).
        #[arg(long, required_unless_present = "probes")]
        dst: Option<IpAddr>,
        /// Source port (TCP, UDP, SCTP).
        #[arg(long, default_value_t = 40000)]
        sport: u16,
        /// Destination port, or the ICMP code with --icmp-type.
        #[arg(long, default_value_t = 0)]
        dport: u16,
        /// tcp, udp, sctp, icmp, icmpv6 or a number [default: tcp; icmp or icmpv6 with
        /// --icmp-type].
        #[arg(long)]
        proto: Option<String>,
        /// ICMP type: the flow is ICMP (ICMPv6 for IPv6 addresses) unless --proto says which.
        #[arg(long)]
        icmp_type: Option<u8>,
        /// Which way the flow crosses the gateway: ingress (ext to int) or egress.
        #[arg(long, value_enum, default_value_t = Dir::Ingress)]
        direction: Dir,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Explain every probe of a JSON-lines file ({"src","dst","proto","sport","dport",
        /// "icmp_type","direction"}); writes one JSON line per probe. `-` reads standard input.
        #[arg(long, conflicts_with_all = ["src_addr", "dst"])]
        probes: Option<PathBuf>,
    },
    /// Print counters of a running instance.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the /status document (JSON) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Watch a running instance's verdicts live: drops by default, allowed ones too with --all.
    Monitor {
        #[command(flatten)]
        admin: AdminArgs,
        /// Allowed frames too (by default only drops).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        matching: FlowMatch,
        /// Only drops for this reason (policy_deny, default_deny, invalid, conntrack_full, ...).
        #[arg(long, conflicts_with = "all")]
        reason: Option<String>,
        /// One JSON object per verdict (every field apart) instead of a line of text.
        #[arg(long)]
        json: bool,
        /// Also write the matching frames as pcap: those received on ext to FILE, those received
        /// on int to FILE with `.int` before its extension (`portcullis replay --ext --int`
        /// reads them; so does tcpdump).
        #[arg(long, value_name = "FILE")]
        pcap: Option<PathBuf>,
        /// Stop after this many verdicts.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// The connection tracker of a running instance.
    Conntrack {
        #[command(subcommand)]
        action: ConntrackCmd,
    },
    /// Run two captures (tcpdump -w on ext and int) through the real parser, table and
    /// connection tracker, offline, in timestamp order; print every packet's verdict.
    Replay {
        /// The gateway config whose policies, defaults and tracker settings to use.
        #[arg(long)]
        config: PathBuf,
        /// What arrived on the external interface (classic pcap).
        #[arg(long)]
        ext: PathBuf,
        /// What arrived on the internal interface (classic pcap).
        #[arg(long)]
        int: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// From capture time TS (seconds since the Unix epoch, as `ts` prints) on, the policies
        /// are those in DIR, swapped in the way a reload swaps them. Repeatable.
        #[arg(long = "change", value_name = "TS=DIR")]
        changes: Vec<gateway::replay::Change>,
    },
    /// The network-namespace lab.
    Lab {
        #[command(subcommand)]
        action: LabCmd,
    },
    /// Print Portcullis' CustomResourceDefinitions (generated from the Rust types), or write them
    /// into a directory (configs/deploy keeps them).
    Crds {
        /// Write each CRD to its file in this directory instead of printing them.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from these command definitions.
    Man,
}

#[derive(Subcommand)]
enum ConntrackCmd {
    /// List tracked flows.
    List {
        #[command(flatten)]
        filter: FlowFilter,
        /// One JSON array of flows instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove tracked flows (their next packet is decided by the rules again).
    Flush {
        #[command(flatten)]
        filter: FlowFilter,
    },
}

#[derive(clap::Args)]
struct FlowFilter {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    matching: FlowMatch,
}

/// Which flows (`conntrack`) or frames (`monitor`) a command is about.
#[derive(clap::Args)]
struct FlowMatch {
    /// Only those with this address at either end.
    #[arg(long = "ip")]
    ip: Option<IpAddr>,
    /// Only those with this port at either end (TCP, UDP, SCTP).
    #[arg(long)]
    port: Option<u16>,
    /// Only those of this protocol (tcp, udp, icmp, ... or a number).
    #[arg(long)]
    proto: Option<String>,
}

impl FlowMatch {
    /// The admin API's query terms for it (`addr=`, `port=`, `proto=`).
    fn terms(&self) -> Vec<String> {
        let mut q = Vec::new();
        if let Some(a) = self.ip {
            q.push(format!("addr={a}"));
        }
        if let Some(p) = self.port {
            q.push(format!("port={p}"));
        }
        if let Some(p) = &self.proto {
            q.push(format!("proto={p}"));
        }
        q
    }
}

impl FlowFilter {
    fn query(&self) -> String {
        format!("/conntrack?{}", self.matching.terms().join("&"))
    }
}

/// Where a running instance's admin API is: its unix socket (the default), or TCP with a token.
#[derive(clap::Args)]
struct AdminArgs {
    /// The running instance's admin socket (admin.socket in its config)
    /// [default: /run/portcullis/admin.sock].
    #[arg(long, value_name = "PATH")]
    admin: Option<PathBuf>,
    /// The admin API over TCP (admin.listen in its config) instead of the socket.
    #[arg(long, conflicts_with = "admin", requires = "token_file")]
    addr: Option<SocketAddr>,
    /// A file holding the admin API's bearer token (admin.token_file), with --addr.
    #[arg(long, requires = "addr", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn given(&self) -> bool {
        self.admin.is_some() || self.addr.is_some()
    }

    fn endpoint(&self) -> Result<lab::http::Endpoint> {
        Ok(match (&self.addr, &self.token_file) {
            (Some(a), Some(f)) => lab::http::Endpoint::Tcp(
                *a,
                Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read the token file {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
            ),
            (Some(a), None) => lab::http::Endpoint::Tcp(*a, None),
            (None, _) => lab::http::Endpoint::Unix(
                self.admin
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(gateway::config::DEFAULT_ADMIN_SOCKET)),
            ),
        })
    }

    /// `method path` on the admin API, with an error that says what to check.
    fn request(&self, method: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
        let e = self.endpoint()?;
        e.request(method, path, timeout).map_err(|err| {
            let hint = match (&e, err.kind()) {
                (lab::http::Endpoint::Unix(_), std::io::ErrorKind::PermissionDenied) => {
                    "permission denied: the socket's mode (admin.mode) decides who may use it; run as its owner or group"
                }
                (lab::http::Endpoint::Unix(_), std::io::ErrorKind::NotFound) => {
                    "no such socket: is portcullis running, and is this its admin.socket? (--admin PATH)"
                }
                (_, std::io::ErrorKind::ConnectionRefused) => {
                    "connection refused: is portcullis running with this admin.socket or admin.listen?"
                }
                _ => "is portcullis running, and is this its admin API?",
            };
            anyhow::anyhow!("cannot reach a running portcullis at {e}: {err} ({hint})")
        })
    }
}

#[derive(clap::Args)]
struct PolicySource {
    /// A gateway config (its policy_dir, defaults and failsafe rules are used).
    #[arg(long, conflicts_with = "policies")]
    config: Option<PathBuf>,
    /// A policy directory, with the default context (ingress deny, egress allow, no failsafe).
    #[arg(long)]
    policies: Option<PathBuf>,
    /// With a config that watches the Kubernetes API: read the policy directory only.
    #[arg(long, requires = "config")]
    files_only: bool,
}

impl PolicySource {
    fn load(&self) -> Result<(PathBuf, GatewayContext, Option<KubernetesApi>)> {
        match (&self.config, &self.policies) {
            (Some(c), _) => {
                let cfg = Config::load(c)?;
                let api = cfg.kubernetes_api.filter(|_| !self.files_only);
                Ok((cfg.policy_dir, cfg.context, api))
            }
            (None, Some(p)) => Ok((p.clone(), GatewayContext::default(), None)),
            (None, None) => bail!("give --config FILE or --policies DIR"),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    /// ext to int.
    Ingress,
    /// int to ext.
    Egress,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the topology.
    Up(LabArgs),
    /// Delete the topology.
    Down(LabArgs),
    /// Show namespaces, addresses and attached XDP programs.
    Status(LabArgs),
    /// Build the lab, run the gateway on configs/lab, send allowed and denied traffic, print the
    /// verdicts and counters, tear down.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
        /// The gateway config to run [default: the lab's, configs/lab/gateway.yaml, found from
        /// the current directory, the source tree or /usr/share/portcullis].
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct LabArgs {
    /// Prefix of the lab's namespace and interface names (several labs can coexist).
    #[arg(long, default_value = "pc")]
    prefix: String,
    /// Queues (and gateway workers) per interface.
    #[arg(long, default_value_t = 1)]
    queues: u32,
}

/// The lab config `lab demo` runs when none is given: from the current directory, the source
/// tree this binary was built in, or where the package installs it.
fn lab_config() -> Result<PathBuf> {
    let tried = [
        PathBuf::from("configs/lab/gateway.yaml"),
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/lab/gateway.yaml"
        )),
        PathBuf::from("/usr/share/portcullis/configs/lab/gateway.yaml"),
    ];
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no lab config found (tried {}); give --config",
                tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn main() {
    gateway::metrics::set_build_info(env!("PORTCULLIS_COMMIT"), env!("PORTCULLIS_BUILD_DATE"));
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        // A printing command whose reader goes away stops quietly, like any filter.
        gateway::sys::default_sigpipe();
    }
    let format = cli.log_format;
    init_logs(format);
    if let Err(e) = dispatch(cli) {
        if format == LogFormat::Json {
            // A log shipper reads only JSON lines: the reason for stopping is one too.
            tracing::error!(error = format!("{e:#}").as_str(), "stopped");
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run { config } => gateway::runtime::run(Config::load(&config)?),
        Cmd::Check { src } => check(&src),
        Cmd::Explain {
            src,
            live,
            admin,
            src_addr,
            dst,
            sport,
            dport,
            proto: p,
            icmp_type,
            direction,
            json,
            probes,
        } => {
            let live = live || admin.given();
            if live && (src.config.is_some() || src.policies.is_some()) {
                bail!("--admin/--addr ask a running instance; --config/--policies read policies: give one or the other");
            }
            if !live {
                if let Some(file) = &probes {
                    return explain_probes(&build(&src)?, file);
                }
            } else if probes.is_some() {
                bail!("--probes reads policies (--config or --policies); a running instance is asked one flow at a time");
            }
            let src_ip = src_addr.context("give --src IP")?;
            let proto = match (p, icmp_type) {
                (Some(p), None) => p,
                (None, None) => "tcp".into(),
                (None, Some(_)) if src_ip.is_ipv6() => "icmpv6".into(),
                (None, Some(_)) => "icmp".into(),
                (Some(p), Some(_)) => match policy::key::proto::parse(&p) {
                    Some(policy::key::proto::ICMP | policy::key::proto::ICMPV6) => p,
                    _ => {
                        bail!("--icmp-type needs --proto icmp or icmpv6 (or no --proto), not `{p}`")
                    }
                },
            };
            let probe = FlowQuery {
                src: src_ip,
                dst: dst.context("give --dst IP")?,
                proto,
                sport,
                dport,
                icmp_type,
                direction: match direction {
                    Dir::Ingress => "ingress".into(),
                    Dir::Egress => "egress".into(),
                },
            };
            let key = probe.key()?;
            match live {
                true => explain_live(&admin, &probe, json),
                false => explain(&build(&src)?, &key, json),
            }
        }
        Cmd::Stats { admin, json } => stats(&admin, json),
        Cmd::Monitor {
            admin,
            all,
            matching,
            reason,
            json,
            pcap,
            count,
            seconds,
        } => {
            let mut q = matching.terms();
            if all {
                q.push("all=1".to_string());
            }
            if let Some(r) = &reason {
                q.push(format!("reason={r}"));
            }
            if pcap.is_some() {
                q.push("frames=1".into());
            }
            monitor(
                &admin,
                &format!("/monitor?{}", q.join("&")),
                json,
                pcap.as_deref(),
                count,
                seconds.map(Duration::from_secs),
            )
        }
        Cmd::Conntrack { action } => conntrack(action),
        Cmd::Crds { write } => crds(write.as_deref()),
        Cmd::Replay {
            config,
            ext,
            int,
            json,
            changes,
        } => replay(&config, &ext, &int, &changes, json),
        Cmd::Lab { action } => match action {
            LabCmd::Up(a) => {
                let lab = Lab::new(&a.prefix, a.queues)?;
                lab.up()?;
                print!("{}", lab.status());
                Ok(())
            }
            LabCmd::Down(a) => Ok(Lab::new(&a.prefix, a.queues)?.down()?),
            LabCmd::Status(a) => {
                print!("{}", Lab::new(&a.prefix, a.queues)?.status());
                Ok(())
            }
            LabCmd::Demo { lab, config } => {
                let exe =
                    std::env::current_exe().context("cannot find the portcullis executable")?;
                let config = match config {
                    Some(c) => c,
                    None => lab_config()?,
                };
                lab::demo::run(&exe, &config, &lab.prefix, lab.queues)
            }
        },
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "portcullis", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}

/// A compiled policy directory, for `check` and `explain`: the valid objects compiled, the
/// invalid ones reported.
struct Built {
    /// What was read: the policy directory, and the API server when configured.
    sources: String,
    table: Table,
    objects: ClusterObjects,
    errors: Vec<String>,
    warnings: Vec<String>,
    counts: Vec<(&'static str, usize)>,
    compile_ms: f64,
}

/// One complete list of every kind from the API (what `run` would start on), and the objects
/// it skipped as malformed.
fn api_snapshot(api: &KubernetesApi) -> Result<(String, Snapshot, Vec<String>)> {
    let got = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&got);
    let source = KubeSource::start(
        Connection::Kubeconfig {
            path: api.kubeconfig.clone(),
            context: api.context.clone(),
        },
        kubernetes::Options {
            debounce: Duration::ZERO,
            ..kubernetes::Options::default()
        },
        Box::new(move |snap, _| {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap);
            Ok(0)
        }),
    )?;
    let limit = Duration::from_secs(match api.startup_timeout_s {
        0 => 30,
        t => t,
    });
    let synced = source.wait_synced(Some(limit), Duration::from_secs(5), &|| false, &|s| {
        eprintln!(
            "waiting for the Kubernetes API at {}: pending {}",
            s.server,
            s.pending().join(", ")
        )
    });
    let status = source.status();
    drop(source);
    if !synced {
        let pending = status.pending().join(", ");
        // The API-wide error, unless the kinds' own errors said it already.
        let last = match status.last_error.as_deref() {
            Some(e) if !pending.contains(e) => format!("; last error: {e}"),
            _ => String::new(),
        };
        bail!(
            "no complete list from the Kubernetes API at {} within {}s; pending: {pending}{last} (--files-only skips the API)",
            status.server,
            limit.as_secs(),
        );
    }
    let snap = got
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    Ok((status.server, snap, status.invalid_objects))
}

fn build(src: &PolicySource) -> Result<Built> {
    let (dir, ctx, api) = src.load()?;
    let started = std::time::Instant::now();
    let (mut snap, errors) = load_dir_report(&dir);
    if let Some(e @ SourceError::Directory { .. }) = errors.first() {
        bail!("{}", e.line());
    }
    let mut errors: Vec<String> = errors.iter().map(|e| e.line()).collect();
    let mut sources = format!("files {}", dir.display());
    if let Some(api) = &api {
        let (server, from_api, invalid) = api_snapshot(api)?;
        snap.extend_from(&from_api);
        errors.extend(invalid.into_iter().map(|e| format!("{server}: {e}")));
        sources.push_str(&format!(" + Kubernetes API {server}"));
    }
    let compiled = compile(&snap, &ctx).with_context(|| format!("policies from {sources}"))?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    errors.extend(
        compiled
            .rejected
            .iter()
            .map(|r| format!("{} ({}): {}", r.object, r.source, r.message)),
    );
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(Built {
        sources,
        table: Table::build(compiled.rules, 1, 1),
        objects: snap.cluster_objects(),
        errors,
        warnings: compiled.warnings,
        counts: snap.counts(),
        compile_ms,
    })
}

fn check(src: &PolicySource) -> Result<()> {
    let b = build(src)?;
    let table = &b.table;
    println!("policies: {}", b.sources);
    for (kind, n) in &b.counts {
        println!("  {kind}: {n}");
    }
    let stats = table.classifier_stats();
    println!("compiled rules: {}", table.rules().len());
    println!(
        "classifier: {} atoms; IPv4 in {} trees ({} nodes, {} leaf entries, depth {}, longest leaf {}) and {} atoms in tables; tuple space: {} tuples, {} buckets (longest {})",
        stats.atoms,
        stats.trees,
        stats.tree_nodes,
        stats.leaf_entries,
        stats.max_depth,
        stats.max_leaf,
        stats.table_atoms,
        stats.tuples.tuples,
        stats.tuples.buckets,
        stats.tuples.max_bucket
    );
    println!(
        "load+compile: {:.2} ms, classifier build: {:.2} ms, table memory: {} bytes",
        b.compile_ms,
        table.build_time().as_secs_f64() * 1e3,
        table.memory_bytes()
    );
    if b.warnings.is_empty() {
        println!("warnings: none");
    } else {
        println!("warnings ({}):", b.warnings.len());
        for w in &b.warnings {
            println!("  - {w}");
        }
    }
    if !b.errors.is_empty() {
        bail!("{} invalid object(s) (listed above) were skipped; a running gateway refuses a policy directory holding any of them (keeping its last good table), and skips them when the API serves them", b.errors.len());
    }
    Ok(())
}

fn explain(b: &Built, key: &FlowKey, json: bool) -> Result<()> {
    let r = policy::explain::explain(&b.table, &b.objects, key)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.render());
        println!(
            "tracker: explained as a new flow (the rules decide it; an allowed one opens a flow whose packets and replies then pass); `--live` asks a running instance whether it is already tracked"
        );
    }
    if r.steps.is_empty() {
        bail!("no rule matched (the table fails closed)");
    }
    Ok(())
}

/// `explain --live`: asks a running instance about its live table (whatever its sources).
fn explain_live(admin: &AdminArgs, probe: &FlowQuery, json: bool) -> Result<()> {
    let mut path = format!(
        "/explain?src={}&dst={}&proto={}&sport={}&dport={}&direction={}&format={}",
        probe.src,
        probe.dst,
        probe.proto,
        probe.sport,
        probe.dport,
        probe.direction,
        if json { "json" } else { "text" }
    );
    if let Some(t) = probe.icmp_type {
        path.push_str(&format!("&icmp_type={t}"));
    }
    let (code, body) = admin.request("GET", &path, Duration::from_secs(3))?;
    if code != 200 {
        bail!("{} answered {code}: {}", admin.endpoint()?, body.trim());
    }
    print!("{body}");
    Ok(())
}

/// `explain --probes`: one JSON line out per JSON line in; a bad line gets an error line.
fn explain_probes(b: &Built, file: &std::path::Path) -> Result<()> {
    use std::io::{BufRead, Write};
    let input: Box<dyn BufRead> = if file == std::path::Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        ))
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut bad = 0;
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let result = serde_json::from_str::<FlowQuery>(&line)
            .map_err(|e| e.to_string())
            .and_then(|p| p.key().map_err(|e| e.to_string()))
            .and_then(|k| {
                policy::explain::explain(&b.table, &b.objects, &k).map_err(|e| e.to_string())
            });
        let v = match result {
            Ok(r) => serde_json::json!({"line": n + 1, "report": r}),
            Err(e) => {
                bad += 1;
                serde_json::json!({"line": n + 1, "input": line, "error": e})
            }
        };
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    if bad > 0 {
        bail!("{bad} probe line(s) could not be explained (see their error lines)");
    }
    Ok(())
}

/// `portcullis monitor`: prints the verdict stream (and writes its frames as pcap) until a
/// limit is reached, the instance stops, or the reader goes away.
fn monitor(
    admin: &AdminArgs,
    path: &str,
    json: bool,
    pcap: Option<&std::path::Path>,
    count: Option<u64>,
    limit: Option<Duration>,
) -> Result<()> {
    use std::io::{BufRead, Write};
    let endpoint = admin.endpoint()?;
    let (code, mut body) = endpoint.stream(path).map_err(|e| {
        anyhow::anyhow!("cannot reach a running portcullis at {endpoint}: {e} (is this its admin.socket? --admin PATH)")
    })?;
    if code != 200 {
        let mut msg = String::new();
        let _ = body.read_to_string(&mut msg);
        bail!("{endpoint} answered {code}: {}", msg.trim());
    }
    let mut writers = match pcap {
        Some(p) => {
            let int = p.with_file_name(format!(
                "{}.int{}",
                p.file_stem().and_then(|s| s.to_str()).unwrap_or("monitor"),
                p.extension()
                    .and_then(|e| e.to_str())
                    .map_or(String::new(), |e| format!(".{e}"))
            ));
            Some((
                gateway::pcap::Writer::create(p)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                gateway::pcap::Writer::create(&int)
                    .with_context(|| format!("cannot write {}", int.display()))?,
            ))
        }
        None => None,
    };
    // The limit in time is checked between lines; a quiet feed ends it at the next line or when
    // the process is stopped.
    let started = std::time::Instant::now();
    if let Some(l) = limit {
        let deadline = started + l;
        std::thread::spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()));
            std::process::exit(0);
        });
    }
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line)? == 0 {
            eprintln!("the instance closed the feed");
            return Ok(());
        }
        let v: serde_json::Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v.get("listening").is_some() {
            eprintln!(
                "listening on {endpoint} ({})",
                v["filter"].as_str().unwrap_or("")
            );
            continue;
        }
        if let Some(n) = v.get("lost") {
            eprintln!("lost {n} verdicts: {}", v["why"].as_str().unwrap_or(""));
            continue;
        }
        let l: gateway::monitor::Line = match serde_json::from_value(v.clone()) {
            Ok(l) => l,
            Err(_) => continue,
        };
        if let (Some((ext, int)), Some(hex)) = (writers.as_mut(), &l.frame) {
            let data: Vec<u8> = (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                .collect();
            let p = gateway::pcap::Packet {
                ts_ns: l.time_unix_ns,
                wire_len: u32::from(l.len),
                data,
            };
            if l.direction == "ingress" {
                ext.write(&p)?
            } else {
                int.write(&p)?
            }
        }
        if json {
            let mut v = v;
            if let Some(m) = v.as_object_mut() {
                m.remove("frame");
            }
            writeln!(out, "{v}")?;
        } else {
            let ends = match (&l.src, &l.dst) {
                (Some(s), Some(d)) => match (l.sport, l.dport) {
                    (Some(sp), Some(dp)) => format!("{s}:{sp} -> {d}:{dp}"),
                    _ => format!("{s} -> {d}"),
                },
                _ => "(not IP, or did not parse)".into(),
            };
            writeln!(
                out,
                "{} {:<7} {:<6} {ends} {}{} by {} (tracker {:?}, worker {})",
                l.time_unix_ns / 1_000_000,
                l.direction,
                l.proto.as_deref().unwrap_or("-"),
                l.verdict.to_uppercase(),
                l.reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(" {r}")),
                l.rule_origin.as_deref().unwrap_or("-"),
                l.tracker,
                l.worker
            )?;
        }
        out.flush()?;
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}

fn stats(admin: &AdminArgs, json: bool) -> Result<()> {
    let (code, body) = admin.request("GET", "/status", Duration::from_secs(3))?;
    let addr = admin.endpoint()?;
    if code != 200 {
        bail!("{addr} /status answered {code}: {}", body.trim());
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&body)
        .with_context(|| format!("{addr} /status is not a portcullis status document"))?;
    let t = &s.totals;
    println!(
        "portcullis {} (commit {}) up {}s, ext={} int={} queues={} copy_mode={}",
        s.version, s.commit, s.uptime_s, s.ext, s.int, s.queues, s.copy_mode
    );
    let p = &s.policy;
    println!(
        "table generation {} with {} rules from {}; last reload error: {:?}",
        p.generation,
        p.rules,
        p.sources.join(" + "),
        p.last_error
    );
    if let Some(k) = &s.kubernetes {
        println!(
            "kubernetes {}: synced={} reachable={} publishes={} rejected={} events={} relevant / {} ignored; last error: {}",
            k.server,
            k.synced,
            k.api_reachable,
            k.publishes,
            k.publish_errors,
            k.relevant_events,
            k.ignored_events,
            k.last_error.as_deref().unwrap_or("none")
        );
        let e = &p.event_to_swap;
        println!(
            "  event to swap: p50 {} ms, p99 {} ms, max {} ms over {} events",
            e.p50_ms, e.p99_ms, e.max_ms, e.count
        );
        for kind in &k.kinds {
            println!(
                "  {:<40} {:<8} {:>6} objects {:>3} invalid {:>3} lists {:>3} errors{}",
                kind.kind,
                format!("{:?}", kind.state).to_lowercase(),
                kind.objects,
                kind.invalid,
                kind.lists,
                kind.errors,
                kind.last_error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
        for bad in &k.invalid_objects {
            println!("  skipped: {bad}");
        }
    }
    println!(
        "ingress: {} rx, {} forwarded; egress: {} rx, {} forwarded; non-IP forwarded {}",
        t.rx_ingress, t.tx_ingress, t.rx_egress, t.tx_egress, t.l2_forwarded
    );
    println!("drops: {}", t.drop_summary());
    let l = &s.burst_latency;
    println!(
        "burst service time: p50 {} ns, p99 {} ns, max {} ns over {} bursts",
        l.p50_ns, l.p99_ns, l.max_ns, l.count
    );
    println!("rule hits:");
    for r in &s.rules {
        println!(
            "  #{:<4} {:>12}  {}{}",
            r.index,
            r.hits,
            r.object,
            r.rule.map_or(String::new(), |p| format!(" [{p}]"))
        );
    }
    Ok(())
}

fn conntrack(action: ConntrackCmd) -> Result<()> {
    let (method, filter, json) = match &action {
        ConntrackCmd::List { filter, json } => ("GET", filter, *json),
        ConntrackCmd::Flush { filter } => ("DELETE", filter, true),
    };
    let addr = filter.admin.endpoint()?;
    let (code, body) = filter
        .admin
        .request(method, &filter.query(), Duration::from_secs(10))?;
    if code != 200 {
        bail!("{addr} answered {code}: {}", body.trim());
    }
    if json {
        print!("{body}");
        return Ok(());
    }
    let flows: Vec<gateway::conntrack::FlowEntry> = serde_json::from_str(&body)
        .with_context(|| format!("{addr}/conntrack is not a flow list"))?;
    println!(
        "{:<8} {:<6} {:>40} {:>40} {:<13} {:<9} {:>5} {:>9}  window (orig; reply)",
        "dir", "proto", "source", "destination", "state", "assured", "gen", "idle ms"
    );
    for f in &flows {
        let proto = policy::key::proto::name(f.proto);
        println!(
            "{:<8} {:<6} {:>40} {:>40} {:<13} {:<9} {:>5} {:>9}  {}",
            f.direction,
            proto,
            format!("{}:{}", f.src, f.sport),
            format!("{}:{}", f.dst, f.dport),
            format!("{:?}", f.state).to_lowercase(),
            if f.assured { "assured" } else { "unassured" },
            f.generation,
            f.idle_ms,
            f.window.map_or(String::new(), |w| {
                let side = |s: &gateway::conntrack::WindowView| {
                    format!(
                        "end {} maxend {} maxwin {} scale {}",
                        s.end, s.maxend, s.maxwin, s.scale
                    )
                };
                format!("{}; {}", side(&w[0]), side(&w[1]))
            })
        );
    }
    println!("{} flow(s)", flows.len());
    Ok(())
}

fn replay(
    config: &std::path::Path,
    ext: &std::path::Path,
    int: &std::path::Path,
    changes: &[gateway::replay::Change],
    json: bool,
) -> Result<()> {
    let cfg = Config::load(config)?;
    let lines = gateway::replay::replay_files(&cfg, ext, int, changes)
        .with_context(|| format!("replaying {} and {}", ext.display(), int.display()))?;
    for l in &lines {
        if json {
            println!("{}", serde_json::to_string(l)?);
        } else {
            println!(
                "{} {:>5} {:.6} {:<5} {:<12} {:<16} {}",
                l.iface,
                l.index,
                l.ts,
                l.verdict,
                l.state,
                l.reason.as_deref().unwrap_or("-"),
                l.rule.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

fn crds(write: Option<&std::path::Path>) -> Result<()> {
    for g in control::crd::all() {
        match write {
            Some(dir) => {
                let path = dir.join(g.file);
                std::fs::write(&path, &g.yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            None => print!("---\n{}", g.yaml),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI reference: every command's full help, as `--help` prints it.
    fn cli_reference() -> String {
        fn walk(cmd: &mut clap::Command, path: &str, out: &mut String) {
            let help = cmd.render_long_help().to_string();
            out.push_str(&format!(
                "## `{path}`\n\n```text\n{}\n```\n\n",
                help.trim_end()
            ));
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .filter(|n| n != "help")
                .collect();
            for n in names {
                if let Some(sub) = cmd.find_subcommand_mut(&n) {
                    walk(sub, &format!("{path} {n}"), out);
                }
            }
        }
        let mut cmd = <Cli as clap::CommandFactory>::command().term_width(100);
        cmd.build();
        let mut out = String::from("# CLI reference\n\nEvery command and flag of `portcullis`, as `--help` prints them, generated from the command definitions (CI fails when this file and the code disagree; `PORTCULLIS_WRITE_DOCS=1 cargo test -p portcullis --bin portcullis` rewrites it). `man portcullis` and `portcullis completions SHELL` come from the same definitions.\n\n");
        walk(&mut cmd, "portcullis", &mut out);
        out
    }

    #[test]
    fn the_cli_reference_matches_the_code() {
        let doc = cli_reference();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
        if std::env::var_os("PORTCULLIS_WRITE_DOCS").is_some() {
            std::fs::write(&path, &doc).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == doc,
            "docs/cli.md does not match the command definitions; run PORTCULLIS_WRITE_DOCS=1 cargo test -p portcullis --bin portcullis"
        );
    }

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = <Cli as clap::CommandFactory>::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "portcullis", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
