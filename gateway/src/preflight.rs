//! Start-up checks that turn the kernel's terse errnos into instructions: missing interface, too
//! few queues, interface down, MTU too large for the frame size, missing privileges, memlock,
//! bpffs, and an XDP program that is already attached.

use std::path::Path;

use crate::config::Config;
use crate::sys::xdp;

/// A start-up problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("interfaces.ext `{ext}` and interfaces.int `{int}` name one device (ifindex {ifindex}; an alternative name?); the gateway forwards between two")]
    SameDevice {
        ext: String,
        int: String,
        ifindex: u32,
    },
    #[error("interface `{iface}` (interfaces.{role} in {config}) does not exist in this network namespace; create it or fix the config")]
    MissingInterface {
        iface: String,
        role: &'static str,
        config: String,
    },
    #[error("interface `{iface}` has {have} RX queue(s) but the config asks for queues: {want}; lower `queues`, or raise the channels (`ethtool -L {iface} combined {want}`; for veth, recreate it with `numrxqueues {want} numtxqueues {want}`)")]
    TooFewQueues { iface: String, have: u32, want: u32 },
    #[error("interface `{iface}` is down; bring it up with `ip link set dev {iface} up`")]
    Down { iface: String },
    #[error("interface `{iface}` has MTU {mtu}, too large for frame_size {frame_size} (at most {max} with XDP headroom); lower the MTU or raise frame_size to 4096")]
    Mtu {
        iface: String,
        mtu: u32,
        frame_size: u32,
        max: u32,
    },
    #[error("missing privileges ({missing}); run as root, or grant CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF (or CAP_SYS_ADMIN) and CAP_IPC_LOCK")]
    Privileges { missing: String },
    #[error("the memlock limit is {have} bytes but the UMEMs need {need}; run with `ulimit -l unlimited` (systemd: LimitMEMLOCK=infinity), or lower `frames`")]
    Memlock { have: u64, need: u64 },
    #[error(
        "cannot read the kubeconfig {path} (kubernetes.api.kubeconfig in {config}): {message}"
    )]
    Kubeconfig {
        path: String,
        config: String,
        message: String,
    },
    #[error("interface `{iface}` already runs XDP program id {id}; portcullis will not replace another program. If it was left by a crashed run, remove it with `ip link set dev {iface} xdp off`")]
    XdpBusy { iface: String, id: u32 },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn sysfs(iface: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(iface).join(file))
        .ok()
        .map(|s| s.trim().to_string())
}

fn rx_queues(iface: &str) -> Option<u32> {
    let dir = Path::new("/sys/class/net").join(iface).join("queues");
    let n = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Some(n as u32)
}

/// Interface indexes of (ext, int) once every check passed.
pub struct Interfaces {
    pub ext: u32,
    pub int: u32,
}

/// Runs every check. Warnings (bpffs missing, queue count unverifiable) are logged, not fatal.
pub fn check(cfg: &Config) -> Result<Interfaces, PreflightError> {
    if let Some(path) = cfg
        .kubernetes_api
        .as_ref()
        .and_then(|a| a.kubeconfig.as_ref())
    {
        if let Err(e) = std::fs::File::open(path) {
            return Err(PreflightError::Kubeconfig {
                path: path.display().to_string(),
                config: cfg.path.display().to_string(),
                message: e.to_string(),
            });
        }
    }
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    for (c, name) in [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_NET_RAW, "CAP_NET_RAW"),
    ] {
        if !has(c) {
            missing.push(name);
        }
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        return Err(PreflightError::Privileges {
            missing: missing.join(", "),
        });
    }

    let mut idx = [0u32; 2];
    for (i, (role, iface)) in [("ext", &cfg.interfaces.ext), ("int", &cfg.interfaces.int)]
        .into_iter()
        .enumerate()
    {
        idx[i] = nix::net::if_::if_nametoindex(iface.as_str()).map_err(|_| {
            PreflightError::MissingInterface {
                iface: iface.clone(),
                role,
                config: cfg.path.display().to_string(),
            }
        })?;
        match rx_queues(iface) {
            Some(have) if have < cfg.queues => {
                return Err(PreflightError::TooFewQueues {
                    iface: iface.clone(),
                    have,
                    want: cfg.queues,
                })
            }
            Some(_) => {}
            None => tracing::warn!(
                iface = iface.as_str(),
                "cannot read the queue count from /sys (sysfs of another network namespace?); not verified"
            ),
        }
        if let Some(flags) = sysfs(iface, "flags")
            .and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok())
        {
            if flags & 1 == 0 {
                return Err(PreflightError::Down {
                    iface: iface.clone(),
                });
            }
        }
        if let Some(mtu) = sysfs(iface, "mtu").and_then(|m| m.parse::<u32>().ok()) {
            // XDP_PACKET_HEADROOM (256) plus Ethernet and one VLAN tag.
            let max = cfg.frame_size.saturating_sub(256 + 18);
            if mtu > max {
                return Err(PreflightError::Mtu {
                    iface: iface.clone(),
                    mtu,
                    frame_size: cfg.frame_size,
                    max,
                });
            }
        }
        if let Ok(Some(id)) = xdp::attached(idx[i], cfg.xdp.mode) {
            return Err(PreflightError::XdpBusy {
                iface: iface.clone(),
                id,
            });
        }
    }

    let need = cfg.queues as u64 * cfg.frames as u64 * cfg.frame_size as u64;
    if !has(CAP_IPC_LOCK) {
        use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
        let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap_or((0, 0));
        if soft != RLIM_INFINITY && soft < need {
            let raised = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard).is_ok()
                && (hard == RLIM_INFINITY || hard >= need);
            if !raised {
                return Err(PreflightError::Memlock { have: soft, need });
            }
        }
    }

    if idx[0] == idx[1] {
        return Err(PreflightError::SameDevice {
            ext: cfg.interfaces.ext.clone(),
            int: cfg.interfaces.int.clone(),
            ifindex: idx[0],
        });
    }
    match nix::sys::statfs::statfs("/sys/fs/bpf") {
        Ok(s) if s.filesystem_type().0 == BPF_FS_MAGIC => {}
        _ => tracing::warn!(
            "bpffs is not mounted at /sys/fs/bpf: libxdp cannot track its program, so portcullis detaches it itself on exit; mount it with `mount -t bpf bpf /sys/fs/bpf`"
        ),
    }
    Ok(Interfaces {
        ext: idx[0],
        int: idx[1],
    })
}
