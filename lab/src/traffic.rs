//! Traffic for the lab and the tests: TCP listeners and connects, sequence-numbered UDP streams,
//! and raw frames, each run inside a lab namespace. Every loop is bounded in count and time.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{in_netns, LabError};

/// What a TCP connect attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOutcome {
    Connected,
    Refused,
    TimedOut,
    Failed(String),
}

/// Connects from namespace `ns` to `addr` within `timeout`.
pub fn tcp_connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpOutcome, LabError> {
    in_netns(ns, || match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => TcpOutcome::Connected,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => TcpOutcome::Refused,
        Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            TcpOutcome::TimedOut
        }
        Err(e) => TcpOutcome::Failed(e.to_string()),
    })
}

/// Sends `count` UDP datagrams from `ns` to `addr`, each starting with its sequence number
/// (u64, big-endian), at about `pps` per second. Returns how many were sent.
pub fn udp_stream(
    ns: &str,
    addr: SocketAddr,
    count: u64,
    pps: u64,
    max_time: Duration,
) -> Result<u64, LabError> {
    udp_stream_from(ns, None, addr, count, pps, max_time)
}

/// [`udp_stream`] from a chosen source address of the namespace.
pub fn udp_stream_from(
    ns: &str,
    src: Option<IpAddr>,
    addr: SocketAddr,
    count: u64,
    pps: u64,
    max_time: Duration,
) -> Result<u64, LabError> {
    in_netns(ns, || {
        let any = if addr.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u8; 16])
        };
        let Ok(sock) = UdpSocket::bind(SocketAddr::new(src.unwrap_or(any), 0)) else {
            return 0;
        };
        let started = Instant::now();
        let mut payload = [0u8; 64];
        let mut sent = 0;
        for seq in 0..count {
            if started.elapsed() > max_time {
                break;
            }
            payload[..8].copy_from_slice(&seq.to_be_bytes());
            if sock.send_to(&payload, addr).is_ok() {
                sent += 1;
            }
            if pps > 0 {
                // Pace against the schedule rather than sleeping per packet.
                let due = Duration::from_secs_f64((seq + 1) as f64 / pps as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        sent
    })
}

/// What one UDP port received: sequence numbers in arrival order.
#[derive(Debug, Clone, Default)]
pub struct UdpLog {
    pub seqs: Vec<u64>,
}

impl UdpLog {
    /// What arrived of `sent` datagrams numbered `0..sent`.
    pub fn summary(&self, sent: u64) -> StreamSummary {
        let mut max = None;
        let mut reordered = 0;
        let mut seen = std::collections::HashSet::new();
        let mut duplicated = 0;
        for &s in &self.seqs {
            if !seen.insert(s) {
                duplicated += 1;
                continue;
            }
            if max.is_some_and(|m| s < m) {
                reordered += 1;
            }
            max = Some(max.map_or(s, |m: u64| m.max(s)));
        }
        let received = seen.len() as u64;
        StreamSummary {
            received,
            lost: sent.saturating_sub(received),
            reordered,
            duplicated,
        }
    }
}

/// Loss, reordering and duplication of a sequence-numbered stream. A datagram is reordered when
/// its number is below the highest one that arrived before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    pub received: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
}

/// TCP and UDP servers in one namespace, until dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    udp: Arc<Mutex<BTreeMap<u16, UdpLog>>>,
}

impl Servers {
    /// Listens on every TCP and UDP port given, on all addresses (IPv4 and IPv6) of `ns`.
    pub fn start(ns: &str, tcp: &[u16], udp: &[u16]) -> Result<Servers, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let logs = Arc::new(Mutex::new(BTreeMap::new()));
        let mut handles = Vec::new();
        for &port in tcp {
            let (ns, stop) = (ns.to_string(), Arc::clone(&stop));
            // One dual-stack socket serves IPv4 (as mapped addresses) and IPv6.
            let listeners = in_netns(&ns, || -> std::io::Result<Vec<TcpListener>> {
                let l = TcpListener::bind(("::", port))?;
                l.set_nonblocking(true)?;
                Ok(vec![l])
            })?
            .map_err(|source| LabError::Io {
                what: format!("listen on TCP port {port} in {ns}"),
                source,
            })?;
            handles.push(std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let mut idle = true;
                    for l in &listeners {
                        if let Ok((conn, _)) = l.accept() {
                            drop(conn);
                            idle = false;
                        }
                    }
                    if idle {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }));
        }
        for &port in udp {
            let (ns, stop, logs) = (ns.to_string(), Arc::clone(&stop), Arc::clone(&logs));
            logs.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(port, UdpLog::default());
            let socks = in_netns(&ns, || -> std::io::Result<Vec<UdpSocket>> {
                let s = UdpSocket::bind(("::", port))?;
                s.set_read_timeout(Some(Duration::from_millis(20)))?;
                // Room for a burst while the reader thread is descheduled (the default 208 KiB
                // holds a few hundred datagrams; CI's two cores are busy). Root may exceed
                // rmem_max; otherwise take what the limit allows.
                use nix::sys::socket::{setsockopt, sockopt};
                let want: usize = 8 << 20;
                if setsockopt(&s, sockopt::RcvBufForce, &want).is_err() {
                    let _ = setsockopt(&s, sockopt::RcvBuf, &want);
                }
                Ok(vec![s])
            })?
            .map_err(|source| LabError::Io {
                what: format!("bind UDP port {port} in {ns}"),
                source,
            })?;
            handles.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Relaxed) {
                    for s in &socks {
                        while let Ok((n, _)) = s.recv_from(&mut buf) {
                            if n >= 8 {
                                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                                if let Some(log) = logs
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_mut(&port)
                                {
                                    log.seqs.push(seq);
                                }
                            }
                        }
                    }
                }
            }));
        }
        Ok(Servers {
            stop,
            handles,
            udp: logs,
        })
    }

    /// What UDP `port` has received so far.
    pub fn udp_log(&self, port: u16) -> UdpLog {
        self.udp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Waits up to `timeout` for UDP `port` of `servers` to have `n` datagrams.
pub fn wait_udp(servers: &Servers, port: u16, n: u64, timeout: Duration) -> UdpLog {
    let started = Instant::now();
    loop {
        let log = servers.udp_log(port);
        if log.seqs.len() as u64 >= n || started.elapsed() > timeout {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses "a.b.c.d" or an IPv6 literal with a port into a socket address.
pub fn addr(ip: &str, port: u16) -> SocketAddr {
    let ip: IpAddr = ip.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, port)
}
