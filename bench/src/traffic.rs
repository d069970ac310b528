//! `gen` and `sink`: an AF_XDP traffic generator and sink for throughput and smoke runs.
//!
//! The generator writes every UMEM frame once (Ethernet/IPv4/UDP, a flow per frame) and recycles
//! them, patching only a sequence number and a CLOCK_MONOTONIC timestamp into the payload. The
//! sink reads those back: per-flow loss and reordering, latency percentiles (both ends on one
//! machine share the clock).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gateway::config::{XdpMode, ZeroCopy};
use gateway::sys::xdp;
use gateway::sys::xsk::SocketOptions;

use crate::xsk::Endpoint;
use serde::Serialize;

/// Payload marker: "PCB1".
const MAGIC: [u8; 4] = *b"PCB1";
/// Ethernet (14) + IPv4 (20) + UDP (8).
const PAYLOAD: usize = 42;
/// Ethernet (14) + IPv4 (20) + TCP (20): the marker's place in a TCP frame.
const PAYLOAD_TCP: usize = 54;

/// Where the marker starts in a frame of IP protocol `proto`.
fn payload_at(proto: u8) -> usize {
    if proto == 6 {
        PAYLOAD_TCP
    } else {
        PAYLOAD
    }
}

/// Rewrites a template frame as the trace header `k`: addresses, protocol (TCP with ACK set, or
/// UDP), ports, the IP checksum, and the marker at that protocol's payload offset. The frame must
/// be long enough for a TCP marker (see [`TRACE_FRAME`]).
fn stamp_trace(buf: &mut [u8], k: &policy::key::FlowKey, stride: u16) {
    let tcp = k.proto == 6;
    buf[23] = if tcp { 6 } else { 17 };
    buf[26..30].copy_from_slice(&(k.src as u32).to_be_bytes());
    buf[30..34].copy_from_slice(&(k.dst as u32).to_be_bytes());
    buf[24..26].fill(0);
    let c = checksum(&buf[14..34]);
    buf[24..26].copy_from_slice(&c.to_be_bytes());
    let l4_len = u16::from_be_bytes([buf[16], buf[17]]).saturating_sub(20);
    buf[34..PAYLOAD_TCP].fill(0);
    buf[34..36].copy_from_slice(&k.sport.to_be_bytes());
    buf[36..38].copy_from_slice(&k.dport.to_be_bytes());
    if tcp {
        buf[46] = 5 << 4; // data offset: 20 bytes
        buf[47] = 0x10; // ACK
        buf[48..50].copy_from_slice(&8192u16.to_be_bytes()); // window
    } else {
        buf[38..40].copy_from_slice(&l4_len.to_be_bytes());
    }
    let at = payload_at(buf[23]);
    buf[at..at + 4].copy_from_slice(&MAGIC);
    buf[at + 20..at + 22].copy_from_slice(&stride.to_be_bytes());
}

/// Frame size for trace replay: a TCP header and the marker (sequence, timestamp, stride) fit.
const TRACE_FRAME: usize = PAYLOAD_TCP + 22 + 4;

fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("`{s}` is not a MAC address"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("`{s}` is not a MAC address"))
}

fn options(mode: &str) -> Result<SocketOptions> {
    Ok(SocketOptions {
        ring_size: 2048,
        frame_size: 2048,
        frames: 8192,
        xdp_mode: match mode {
            "native" => XdpMode::Native,
            "skb" => XdpMode::Skb,
            o => bail!("--xdp-mode `{o}`: expected native or skb"),
        },
        zero_copy: ZeroCopy::Auto,
    })
}

/// Detaches the XDP program libxdp attached for our socket when dropped.
struct Detach(u32, XdpMode);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = xdp::detach(self.0, self.1);
    }
}

/// Opens the endpoint, retrying for up to 2 s while the queue is busy: the kernel releases a
/// closed socket's queue binding slightly after the previous process exits.
fn open_endpoint(iface: &str, queue: u32, o: &SocketOptions) -> Result<Endpoint> {
    let started = Instant::now();
    loop {
        match Endpoint::open(iface, queue, o) {
            Err(gateway::sys::xsk::SocketError::Socket { ref source, .. })
                if source.raw_os_error() == Some(libc::EBUSY)
                    && started.elapsed() < Duration::from_secs(2) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return Ok(other?),
        }
    }
}

fn ifindex(iface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(iface)
        .with_context(|| format!("interface `{iface}` does not exist in this network namespace"))
}

/// The interface and queues a generator or sink runs on: one socket and one thread per queue.
#[derive(clap::Args)]
pub(crate) struct Queues {
    #[arg(long)]
    iface: String,
    /// First queue; with --queues N, one socket and one thread per queue from here.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Core for each queue's thread (default: unpinned).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
}

#[derive(clap::Args)]
pub(crate) struct GenArgs {
    #[command(flatten)]
    q: Queues,
    #[arg(long)]
    src_mac: String,
    #[arg(long)]
    dst_mac: String,
    #[arg(long)]
    src_ip: Ipv4Addr,
    #[arg(long)]
    dst_ip: Ipv4Addr,
    #[arg(long)]
    dport: u16,
    /// Flows differ by source port, from this one up.
    #[arg(long, default_value_t = 20000)]
    sport: u16,
    #[arg(long, default_value_t = 16)]
    flows: u16,
    /// Frame size without FCS, 64-1500.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Target packets per second; 0 is as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Stop after this many packets.
    #[arg(long, default_value_t = u64::MAX)]
    count: u64,
    /// Stop after this long.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value = "native")]
    xdp_mode: String,
    /// Take the flows' addresses, ports and protocol from a ClassBench trace (one per packet,
    /// round-robin), instead of --src-ip/--dst-ip/--sport/--dport and --flows. TCP headers go as
    /// TCP (ACK), UDP as UDP; others have no ports to replay and are left out (and counted).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct GenReport {
    sent: u64,
    seconds: f64,
    mpps: f64,
    copy_mode: bool,
    /// Trace headers replayed (TCP and UDP).
    trace_headers: usize,
    /// Trace headers left out (no ports: ICMP, GRE, ...).
    trace_skipped: usize,
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn template(a: &GenArgs, src: [u8; 6], dst: [u8; 6], flow: u16, buf: &mut [u8]) -> usize {
    // The marker, sequence number and timestamp end at byte 62.
    let len = a.size.clamp(64, 1500);
    let f = &mut buf[..len];
    f.fill(0);
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[20] = 0x40; // DF
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&a.src_ip.octets());
    f[30..34].copy_from_slice(&a.dst_ip.octets());
    let c = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&a.sport.wrapping_add(flow).to_be_bytes());
    f[36..38].copy_from_slice(&a.dport.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[PAYLOAD..PAYLOAD + 4].copy_from_slice(&MAGIC);
    len
}

/// Offset of the generator's per-flow sequence stride (the flows per queue), after the timestamp.
const STRIDE: usize = PAYLOAD + 20;

pub(crate) fn gen(a: GenArgs) -> Result<()> {
    let (src, dst) = (parse_mac(&a.src_mac)?, parse_mac(&a.dst_mac)?);
    if a.flows == 0 || a.q.queues == 0 {
        bail!("--flows and --queues must be at least 1");
    }
    if !a.q.cores.is_empty() && a.q.cores.len() != a.q.queues as usize {
        bail!("--cores needs one core per queue");
    }
    // A trace replays its TCP and UDP headers; other protocols (ICMP, GRE) carry no ports to
    // replay and are left out, and counted.
    let (trace, skipped): (Vec<policy::key::FlowKey>, usize) = match &a.trace {
        Some(t) => {
            let all = policy::classbench::read_trace(t)?;
            let n = all.len();
            let kept: Vec<_> = all
                .into_iter()
                .filter(|k| k.proto == 6 || k.proto == 17)
                .collect();
            if kept.is_empty() {
                bail!("{}: no TCP or UDP header to replay", t.display());
            }
            let skipped = n - kept.len();
            (kept, skipped)
        }
        None => (Vec::new(), 0),
    };
    let o = options(&a.xdp_mode)?;
    let _detach = Detach(ifindex(&a.q.iface)?, o.xdp_mode);
    let started = Instant::now();
    let results: Vec<Result<(u64, bool)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..a.q.queues)
            .map(|idx| {
                let (a, o, trace) = (&a, &o, &trace);
                sc.spawn(move || gen_queue(a, o, idx, src, dst, trace))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a generator thread panicked")))
            })
            .collect()
    });
    let mut sent = 0;
    let mut copy_mode = false;
    for r in results {
        let (s, c) = r?;
        sent += s;
        copy_mode |= c;
    }
    let secs = started.elapsed().as_secs_f64();
    let r = GenReport {
        sent,
        seconds: secs,
        mpps: sent as f64 / secs / 1e6,
        copy_mode,
        trace_headers: trace.len(),
        trace_skipped: skipped,
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// One queue's generator: its own socket and UMEM, flows `sport + idx * flows ..`, sequence
/// numbers starting at `idx << 48`, its share of the count and rate.
fn gen_queue(
    a: &GenArgs,
    o: &SocketOptions,
    idx: u32,
    src: [u8; 6],
    dst: [u8; 6],
    trace: &[policy::key::FlowKey],
) -> Result<(u64, bool)> {
    if let Some(core) = a.q.cores.get(idx as usize) {
        core_affinity::set_for_current(core_affinity::CoreId { id: *core });
    }
    let queue = a.q.queue + idx;
    let mut ep = open_endpoint(&a.q.iface, queue, o)?;
    let flow_base = a.sport.wrapping_add((idx as u16).wrapping_mul(a.flows));
    let mut len = 0;
    ep.write_frames(|i, buf| {
        len = template(a, src, dst, (i % a.flows as usize) as u16, buf);
        if !trace.is_empty() && len < TRACE_FRAME {
            // Room for a TCP header before the marker.
            let ip_len = (TRACE_FRAME - 14) as u16;
            buf[len..TRACE_FRAME].fill(0);
            buf[16..18].copy_from_slice(&ip_len.to_be_bytes());
            len = TRACE_FRAME;
        }
        // Trace mode has no per-flow stride (0: the sink does not count gaps).
        let stride = if trace.is_empty() { a.flows } else { 0 };
        buf[STRIDE..STRIDE + 2].copy_from_slice(&stride.to_be_bytes());
        len
    });
    let count = a.count / a.q.queues as u64
        + if idx == 0 {
            a.count % a.q.queues as u64
        } else {
            0
        };
    let rate = a.rate / a.q.queues as u64;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(a.seconds);
    let mut local = 0u64;
    let mut sent = 0u64;
    let (mut last_report, mut last_sent) = (Instant::now(), 0u64);
    while sent < count && started.elapsed() < limit {
        let mut want = (count - sent).min(64) as usize;
        if rate > 0 {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            want = want.min(due.saturating_sub(sent) as usize);
            if want == 0 {
                ep.service_tx();
                std::hint::spin_loop();
                continue;
            }
        }
        sent += ep.send(want, len, |buf| {
            if trace.is_empty() {
                // Flows round-robin by sequence number (frames are reused in stack order, so a
                // flow per frame would leave most flows idle). The UDP checksum is 0 (unused).
                let flow = (local % a.flows as u64) as u16;
                buf[34..36].copy_from_slice(&flow_base.wrapping_add(flow).to_be_bytes());
            } else {
                let k = &trace[(local % trace.len() as u64) as usize];
                stamp_trace(buf, k, 0);
            }
            let at = payload_at(buf[23]);
            let seq = ((idx as u64) << 48) | local;
            buf[at + 4..at + 12].copy_from_slice(&seq.to_be_bytes());
            buf[at + 12..at + 20].copy_from_slice(&now_ns().to_be_bytes());
            local += 1;
        }) as u64;
        ep.service_tx();
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "gen q{queue}: {:.3} Mpps",
                (sent - last_sent) as f64 / last_report.elapsed().as_secs_f64() / 1e6
            );
            (last_report, last_sent) = (Instant::now(), sent);
        }
    }
    let drain = Instant::now();
    while ep.service_tx() > 0 && drain.elapsed() < Duration::from_secs(1) {}
    Ok((sent, ep.copy_mode))
}

#[derive(clap::Args)]
pub(crate) struct SinkArgs {
    #[command(flatten)]
    q: Queues,
    /// Stop after this long.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value = "native")]
    xdp_mode: String,
    /// Print JSON (default: a human summary).
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Flow {
    received: u64,
    min_seq: Option<u64>,
    max_seq: Option<u64>,
    reordered: u64,
    stride: u16,
}

/// What one queue's sink saw.
struct QueueStats {
    flows: HashMap<(u16, u16), Flow>,
    hist: hdrhistogram::Histogram<u64>,
    received: u64,
    other: u64,
}

/// One flow's counts. The generator numbers packets globally and deals them round-robin over
/// `flows` flows, so a flow's sequence numbers step by the flow count; `lost` is the gaps.
#[derive(Serialize)]
struct FlowReport {
    sport: u16,
    dport: u16,
    received: u64,
    lost: u64,
    reordered: u64,
}

#[derive(Serialize)]
struct SinkReport {
    received: u64,
    /// Frames that were not the generator's (ARP, other traffic).
    other: u64,
    flows: usize,
    reordered: u64,
    /// Received per destination port.
    per_dport: std::collections::BTreeMap<u16, u64>,
    lost: u64,
    mpps: f64,
    latency: gateway::stats::LatencySummary,
    seconds: f64,
    per_flow: Vec<FlowReport>,
}

pub(crate) fn sink(a: SinkArgs) -> Result<()> {
    if a.q.queues == 0 || (!a.q.cores.is_empty() && a.q.cores.len() != a.q.queues as usize) {
        bail!("--queues must be at least 1, and --cores needs one core per queue");
    }
    let o = options(&a.xdp_mode)?;
    let _detach = Detach(ifindex(&a.q.iface)?, o.xdp_mode);
    let ready = std::sync::Barrier::new(a.q.queues as usize + 1);
    let started = Instant::now();
    let results: Vec<Result<QueueStats>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..a.q.queues)
            .map(|idx| {
                let (a, o, ready) = (&a, &o, &ready);
                sc.spawn(move || sink_queue(a, o, idx, ready))
            })
            .collect();
        ready.wait();
        eprintln!(
            "sink ready on {} queue(s) {}..{}",
            a.q.iface,
            a.q.queue,
            a.q.queue + a.q.queues - 1
        );
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a sink thread panicked")))
            })
            .collect()
    });
    let mut flows: HashMap<(u16, u16), Flow> = HashMap::new();
    let mut hist = gateway::stats::new_histogram();
    let (mut received, mut other) = (0u64, 0u64);
    for r in results {
        let q = r?;
        received += q.received;
        other += q.other;
        let _ = hist.add(&q.hist);
        for (k, f) in q.flows {
            let m = flows.entry(k).or_default();
            m.received += f.received;
            m.reordered += f.reordered;
            m.stride = m.stride.max(f.stride);
            m.min_seq = m.min_seq.min(f.min_seq).or(f.min_seq).or(m.min_seq);
            m.max_seq = m.max_seq.max(f.max_seq);
        }
    }
    let mut per_dport = std::collections::BTreeMap::new();
    let mut per_flow: Vec<FlowReport> = flows
        .iter()
        .map(|((dport, sport), f)| {
            let lost = if f.stride == 0 {
                0 // trace mode: no per-flow numbering
            } else {
                let span = f.max_seq.unwrap_or(0) - f.min_seq.unwrap_or(0);
                (span / f.stride as u64 + 1).saturating_sub(f.received)
            };
            FlowReport {
                sport: *sport,
                dport: *dport,
                received: f.received,
                lost,
                reordered: f.reordered,
            }
        })
        .collect();
    per_flow.sort_by_key(|f| (f.dport, f.sport));
    for f in &per_flow {
        *per_dport.entry(f.dport).or_insert(0) += f.received;
    }
    let seconds = started.elapsed().as_secs_f64();
    let r = SinkReport {
        received,
        other,
        flows: flows.len(),
        reordered: flows.values().map(|f| f.reordered).sum(),
        per_dport,
        lost: per_flow.iter().map(|f| f.lost).sum(),
        mpps: received as f64 / seconds / 1e6,
        latency: gateway::stats::LatencySummary::of(&hist),
        seconds,
        per_flow,
    };
    if !a.json {
        println!(
            "sink: {} received in {} flows ({:.3} Mpps average over {:.1} s), {} lost, {} reordered, {} other frames; latency p50 {} ns, p99 {} ns, max {} ns",
            r.received, r.flows, r.mpps, r.seconds, r.lost, r.reordered, r.other, r.latency.p50_ns, r.latency.p99_ns, r.latency.max_ns
        );
        for f in &r.per_flow {
            println!(
                "  flow udp :{} -> :{}  received {}  lost {}  reordered {}",
                f.sport, f.dport, f.received, f.lost, f.reordered
            );
        }
        return Ok(());
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// One queue's receive loop.
fn sink_queue(
    a: &SinkArgs,
    o: &SocketOptions,
    idx: u32,
    ready: &std::sync::Barrier,
) -> Result<QueueStats> {
    if let Some(core) = a.q.cores.get(idx as usize) {
        core_affinity::set_for_current(core_affinity::CoreId { id: *core });
    }
    let opened = open_endpoint(&a.q.iface, a.q.queue + idx, o);
    ready.wait();
    let mut ep = opened?;
    let mut st = QueueStats {
        flows: HashMap::new(),
        hist: gateway::stats::new_histogram(),
        received: 0,
        other: 0,
    };
    let started = Instant::now();
    let limit = Duration::from_secs_f64(a.seconds);
    while started.elapsed() < limit {
        let n = ep.receive(|f| {
            let at = if f.len() > 23 {
                payload_at(f[23])
            } else {
                PAYLOAD
            };
            if f.len() < at + 22
                || f[12..14] != [0x08, 0x00]
                || (f[23] != 17 && f[23] != 6)
                || f[at..at + 4] != MAGIC
            {
                st.other += 1;
                return;
            }
            st.received += 1;
            let sport = u16::from_be_bytes([f[34], f[35]]);
            let dport = u16::from_be_bytes([f[36], f[37]]);
            let seq = u64::from_be_bytes(f[at + 4..at + 12].try_into().unwrap_or_default());
            let ts = u64::from_be_bytes(f[at + 12..at + 20].try_into().unwrap_or_default());
            st.hist.saturating_record(now_ns().saturating_sub(ts));
            let fl = st.flows.entry((dport, sport)).or_default();
            fl.received += 1;
            fl.stride = u16::from_be_bytes([f[at + 20], f[at + 21]]);
            if fl.max_seq.is_some_and(|m| seq < m) {
                fl.reordered += 1;
            }
            fl.max_seq = Some(fl.max_seq.map_or(seq, |m| m.max(seq)));
            fl.min_seq = Some(fl.min_seq.map_or(seq, |m| m.min(seq)));
        });
        if n == 0 {
            let _ = gateway::sys::wait_readable(&[ep.rx_fd()], 10);
        }
    }
    Ok(st)
}

#[derive(clap::Args)]
pub(crate) struct PktgenArgs {
    #[arg(long)]
    iface: String,
    #[arg(long)]
    dst_ip: Ipv4Addr,
    #[arg(long)]
    dst_mac: String,
    #[arg(long, default_value_t = 9)]
    dport: u16,
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// pktgen threads (one per queue).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Drives the kernel's pktgen through /proc/net/pktgen (UDP to `dst`, random source ports).
pub(crate) fn pktgen(a: PktgenArgs) -> Result<()> {
    let root = std::path::Path::new("/proc/net/pktgen");
    if !root.is_dir() {
        bail!("kernel pktgen is not available here (/proc/net/pktgen is missing: `modprobe pktgen`, or the kernel lacks CONFIG_NET_PKTGEN); use `portcullis-bench gen`, the AF_XDP generator, instead");
    }
    parse_mac(&a.dst_mac)?;
    ifindex(&a.iface)?;
    let write = |file: &str, cmd: &str| -> Result<()> {
        std::fs::write(root.join(file), format!("{cmd}\n"))
            .with_context(|| format!("pktgen: `{cmd}` to {file}"))
    };
    for t in 0..a.threads {
        let thread = format!("kpktgend_{t}");
        let dev = format!("{}@{t}", a.iface);
        write(&thread, "rem_device_all")?;
        write(&thread, &format!("add_device {dev}"))?;
        for cmd in [
            "count 0".to_string(),
            format!("pkt_size {}", a.size.clamp(64, 1500)),
            "delay 0".into(),
            format!("dst {}", a.dst_ip),
            format!("dst_mac {}", a.dst_mac),
            format!("udp_dst_min {}", a.dport),
            format!("udp_dst_max {}", a.dport),
            "udp_src_min 1024".into(),
            "udp_src_max 65000".into(),
            "flag UDPSRC_RND".into(),
            format!("queue_map_min {t}"),
            format!("queue_map_max {t}"),
        ] {
            write(&dev, &cmd)?;
        }
    }
    // "start" blocks until stopped; stop it from another thread after the run time.
    let stopper = std::thread::spawn({
        let secs = a.seconds;
        move || {
            std::thread::sleep(Duration::from_secs(secs));
            let _ = std::fs::write("/proc/net/pktgen/pgctrl", "stop\n");
        }
    });
    write("pgctrl", "start")?;
    let _ = stopper.join();
    for t in 0..a.threads {
        let text =
            std::fs::read_to_string(root.join(format!("{}@{t}", a.iface))).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("pps") || l.contains("Result"))
        {
            println!("[{t}] {}", line.trim());
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct PlainArgs {
    #[arg(long)]
    ext: String,
    #[arg(long)]
    int: String,
    /// Core to pin the forwarder to.
    #[arg(long, default_value_t = 1)]
    core: usize,
    #[arg(long, default_value = "native")]
    xdp_mode: String,
}

/// The ceiling: an AF_XDP forwarder on one queue pair with a shared UMEM and no rules at all (no
/// parsing, no classification), busy-polling until SIGINT/SIGTERM.
pub(crate) fn plain(a: PlainArgs) -> Result<()> {
    use gateway::config::MAX_BURST;
    use gateway::sys::ring::Side;
    use gateway::sys::xsk::open_pair;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop))?;
    }
    core_affinity::set_for_current(core_affinity::CoreId { id: a.core });
    let o = options(&a.xdp_mode)?;
    let _detach = (
        Detach(ifindex(&a.ext)?, o.xdp_mode),
        Detach(ifindex(&a.int)?, o.xdp_mode),
    );
    let mut pair = open_pair(&a.ext, &a.int, 0, &o)?;
    eprintln!("plain forwarder ready ({} <-> {})", a.ext, a.int);
    let keep = [true; MAX_BURST];
    let mut forwarded = 0u64;
    pair.refill();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        pair.reap();
        pair.refill();
        for side in [Side::Ext, Side::Int] {
            let rx = pair.receive(side, 64);
            let n = rx.len();
            if n > 0 {
                forwarded += rx.forward(&keep[..n]).0 as u64;
            }
        }
        pair.kick();
    }
    println!("{{\"forwarded\":{forwarded}}}");
    Ok(())
}
