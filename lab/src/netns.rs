//! `portcullis lab`: the gateway topology built from network namespaces and veth pairs.
//!
//! ```text
//!  {p}-client netns          {p}-gw netns                  {p}-server netns
//!  {p}-c0 10.99.0.1/24  <->  {p}-ext  [portcullis]  {p}-int  <->  {p}-s0 10.99.0.2/24
//!         fd99::1/64                                               fd99::2/64
//! ```
//!
//! The gateway is a bump in the wire: client and server share one subnet, and ARP/ND cross the
//! gateway like everything else. Everything is named with a prefix so that labs and tests never
//! collide, MACs and addresses are fixed, and veths are multi-queue when `queues > 1`.
//!
//! veth settings, and why:
//! - TX checksum offload (and with it TSO/GSO) is off on the hosts' ends. The gateway forwards
//!   raw frames through AF_XDP, which carries no checksum-offload metadata, so a frame whose
//!   checksum was left to "hardware" would arrive with a bad checksum.
//! - IPv6 is off on `ext`/`int`, so the gateway's own interfaces send no RS/MLD noise.
//! - GRO is on for `ext`/`int`, which lets threaded NAPI be enabled for benchmarks.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

/// Lab addresses and MACs.
pub const CLIENT_V4: &str = "10.99.0.1";
pub const SERVER_V4: &str = "10.99.0.2";
pub(crate) const CLIENT_V6: &str = "fd99::1";
pub(crate) const SERVER_V6: &str = "fd99::2";
pub const CLIENT_MAC: &str = "02:99:00:00:00:01";
pub const SERVER_MAC: &str = "02:99:00:00:00:02";
pub const EXT_MAC: &str = "02:99:00:00:01:01";
pub const INT_MAC: &str = "02:99:00:00:01:02";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab prefix `{0}` must be 1-8 lowercase letters or digits (it prefixes interface names, which are limited to 15 characters)")]
    Prefix(String),
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source} (is iproute2/ethtool installed? `scripts/deps` installs them)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a lab with prefix `{0}` is already up; tear it down with `portcullis lab down --prefix {0}`")]
    Exists(String),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {ns}")]
    Netns {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway's counters never settled: {0}")]
    Unsettled(String),
    #[error("cannot GET {path} from the gateway")]
    Http {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway answered {code} to {path}: {body}")]
    Answered {
        path: String,
        code: u16,
        body: String,
    },
    #[error("the gateway's /status does not parse")]
    StatusDocument(#[source] serde_json::Error),
    #[error("the gateway exited during start-up ({status}); its log:\n{log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the gateway was not ready after {timeout:?}; its log:\n{log}")]
    NotReady {
        timeout: std::time::Duration,
        log: String,
    },
    #[error("cannot signal the gateway")]
    Signal(#[source] nix::errno::Errno),
    #[error("the gateway ignored SIGTERM for {timeout:?} and was killed; its log:\n{log}")]
    Killed {
        timeout: std::time::Duration,
        log: String,
    },
}

/// Runs a command, returning its stdout or a [`LabError`] with its stderr.
pub fn sh(args: &[&str]) -> Result<String, LabError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has entered network namespace `ns`, and returns its result.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    let path = format!("/run/netns/{ns}");
    let err = |source: std::io::Error| LabError::Netns {
        ns: ns.to_string(),
        source,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).map_err(err)?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(e.into()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A lab topology, by prefix.
#[derive(Debug, Clone)]
pub struct Lab {
    pub prefix: String,
    pub queues: u32,
}

impl Lab {
    pub fn new(prefix: &str, queues: u32) -> Result<Lab, LabError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 8
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            return Err(LabError::Prefix(prefix.to_string()));
        }
        Ok(Lab {
            prefix: prefix.to_string(),
            queues: queues.max(1),
        })
    }

    fn name(&self, s: &str) -> String {
        format!("{}-{s}", self.prefix)
    }
    pub fn client_ns(&self) -> String {
        self.name("client")
    }
    pub fn gw_ns(&self) -> String {
        self.name("gw")
    }
    pub fn server_ns(&self) -> String {
        self.name("server")
    }
    pub fn ext(&self) -> String {
        self.name("ext")
    }
    pub fn int(&self) -> String {
        self.name("int")
    }
    pub fn client_if(&self) -> String {
        self.name("c0")
    }
    pub fn server_if(&self) -> String {
        self.name("s0")
    }

    fn namespaces(&self) -> [String; 3] {
        [self.client_ns(), self.gw_ns(), self.server_ns()]
    }

    pub fn exists(&self) -> bool {
        self.namespaces()
            .iter()
            .any(|ns| Path::new("/run/netns").join(ns).exists())
    }

    /// Builds the topology. On failure, whatever was built is torn down again.
    pub fn up(&self) -> Result<(), LabError> {
        if self.exists() {
            return Err(LabError::Exists(self.prefix.clone()));
        }
        let r = self.build();
        if r.is_err() {
            let _ = self.down();
        }
        r
    }

    fn build(&self) -> Result<(), LabError> {
        let q = self.queues.to_string();
        for ns in self.namespaces() {
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (cns, gns, sns) = (self.client_ns(), self.gw_ns(), self.server_ns());
        for (host_if, host_ns, gw_if) in [
            (self.client_if(), &cns, self.ext()),
            (self.server_if(), &sns, self.int()),
        ] {
            sh(&[
                "ip",
                "link",
                "add",
                &host_if,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                host_ns,
                "type",
                "veth",
                "peer",
                "name",
                &gw_if,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                &gns,
            ])?;
        }
        for (ns, iface, mac, v4, v6) in [
            (&cns, self.client_if(), CLIENT_MAC, CLIENT_V4, CLIENT_V6),
            (&sns, self.server_if(), SERVER_MAC, SERVER_V4, SERVER_V6),
        ] {
            sh(&["ip", "-n", ns, "link", "set", &iface, "address", mac])?;
            for (addr, extra) in [
                (format!("{v4}/24"), None),
                (format!("{v6}/64"), Some("nodad")),
            ] {
                let mut args = vec!["ip", "-n", ns, "addr", "add", &addr, "dev", &iface];
                args.extend(extra);
                sh(&args)?;
            }
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", &iface, "tx", "off", "tso", "off",
                "gso", "off",
            ])?;
            sh(&["ip", "-n", ns, "link", "set", &iface, "up"])?;
        }
        for (iface, mac) in [(self.ext(), EXT_MAC), (self.int(), INT_MAC)] {
            sh(&["ip", "-n", &gns, "link", "set", &iface, "address", mac])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &gns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{iface}.disable_ipv6=1"),
            ])?;
            sh(&[
                "ip", "netns", "exec", &gns, "ethtool", "-K", &iface, "gro", "on",
            ])?;
            sh(&["ip", "-n", &gns, "link", "set", &iface, "up"])?;
        }
        Ok(())
    }

    /// Deletes the namespaces (which deletes their veths). Missing pieces are not an error.
    pub fn down(&self) -> Result<(), LabError> {
        let mut first_err = None;
        for ns in self.namespaces() {
            if Path::new("/run/netns").join(&ns).exists() {
                if let Err(e) = sh(&["ip", "netns", "del", &ns]) {
                    first_err.get_or_insert(e);
                }
            }
        }
        // A veth left in the root namespace by a half-built lab.
        for iface in [self.client_if(), self.server_if(), self.ext(), self.int()] {
            if Path::new("/sys/class/net").join(&iface).exists() {
                let _ = sh(&["ip", "link", "del", &iface]);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// A human summary: namespaces, links and attached XDP programs.
    pub fn status(&self) -> String {
        if !self.exists() {
            return format!("lab `{}` is down\n", self.prefix);
        }
        let mut out = format!("lab `{}` ({} queue(s))\n", self.prefix, self.queues);
        for ns in self.namespaces() {
            out.push_str(&format!("== {ns}\n"));
            match sh(&["ip", "-n", &ns, "-br", "addr"]) {
                Ok(s) => out.push_str(&s),
                Err(e) => out.push_str(&format!("  {e}\n")),
            }
        }
        for iface in [self.ext(), self.int()] {
            let xdp = self
                .xdp_program(&iface)
                .map_or("none".to_string(), |id| format!("id {id}"));
            out.push_str(&format!("XDP on {iface}: {xdp}\n"));
        }
        out
    }

    /// The XDP program attached to a gateway-side interface, read with `ip -d link`.
    pub fn xdp_program(&self, iface: &str) -> Option<u32> {
        let s = sh(&[
            "ip",
            "-n",
            &self.gw_ns(),
            "-d",
            "link",
            "show",
            "dev",
            iface,
        ])
        .ok()?;
        let after = s.split("prog/xdp id ").nth(1)?;
        after.split_whitespace().next()?.parse().ok()
    }

    /// Writes a copy of a gateway config with this lab's interface names and queue count, and
    /// the policy directory made absolute.
    pub fn write_config(
        &self,
        template: &Path,
        policy_dir: &Path,
        out: &Path,
    ) -> std::io::Result<()> {
        let text = std::fs::read_to_string(template)?;
        let mut v: serde_norway::Value =
            serde_norway::from_str(&text).map_err(std::io::Error::other)?;
        let map = v
            .as_mapping_mut()
            .ok_or_else(|| std::io::Error::other("config is not a mapping"))?;
        let mut ifs = serde_norway::Mapping::new();
        ifs.insert("ext".into(), self.ext().into());
        ifs.insert("int".into(), self.int().into());
        map.insert("interfaces".into(), serde_norway::Value::Mapping(ifs));
        map.insert("queues".into(), (self.queues as u64).into());
        map.remove("cores");
        let dir = std::fs::canonicalize(policy_dir)?;
        map.insert("policy_dir".into(), dir.display().to_string().into());
        // Each lab gateway has its own admin socket, beside its config.
        let mut admin = serde_norway::Mapping::new();
        admin.insert(
            "socket".into(),
            admin_socket_for(out).display().to_string().into(),
        );
        map.insert("admin".into(), serde_norway::Value::Mapping(admin));
        std::fs::write(
            out,
            serde_norway::to_string(&v).map_err(std::io::Error::other)?,
        )
    }
}

/// Tears a lab down when dropped (on panic or early return too).
pub struct LabGuard(pub Lab);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("lab teardown: {e}");
        }
    }
}

/// The admin socket [`Lab::write_config`] gives the gateway whose config is `config`.
pub fn admin_socket_for(config: &Path) -> std::path::PathBuf {
    let dir = config.parent().unwrap_or(Path::new("."));
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .join("admin.sock")
}
