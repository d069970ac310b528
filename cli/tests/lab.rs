//! Root integration tests: a real `portcullis run` on AF_XDP sockets between veths in network
//! namespaces that each test creates (with a unique prefix) and deletes again, even on failure.
//! The tests in this file take turns, so only one gateway competes for the two cores at a time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gateway::metrics::Status;
use gateway::stats::{CtEvent, Reason};
use lab::sh;
use lab::traffic::{addr, tcp_connect, udp_stream, udp_stream_from, wait_udp, Servers, TcpOutcome};
use lab::{in_netns, GatewayProcess, Lab, LabGuard, CLIENT_MAC, SERVER_MAC, SERVER_V4};
use testkit::raw::RawSender;

static SERIAL: Mutex<()> = Mutex::new(());

/// The lab tests are `#[ignore]`d with their reason, so a plain `cargo test` reports them as
/// skipped; when asked to run them (`--include-ignored`), they fail loudly without root.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab tests need root (AF_XDP sockets, network namespaces); run them as root"
    );
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running lab with a gateway, torn down on drop (gateway first, then the namespaces).
struct Fixture {
    gw: GatewayProcess,
    lab: Lab,
    _guard: LabGuard,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique_prefix(tag: &str) -> String {
    format!("{tag}{:x}", std::process::id() % 0xfff)
}

fn start(tag: &str, queues: u32, policy_dir: &Path) -> Fixture {
    start_with(tag, queues, policy_dir, |_| String::new())
}

/// Like [`start`]; `setup` runs once the lab is up and returns YAML appended to the config.
fn start_with(
    tag: &str,
    queues: u32,
    policy_dir: &Path,
    setup: impl FnOnce(&Lab) -> String,
) -> Fixture {
    let prefix = unique_prefix(tag);
    let lab = Lab::new(&prefix, queues).unwrap();
    // A leftover from a killed run of the same pid is not ours to keep.
    let _ = lab.down();
    lab.up().unwrap();
    let guard = LabGuard(lab.clone());
    let dir = TempDir(std::env::temp_dir().join(format!("portcullis-test-{prefix}")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let config = dir.0.join("gateway.yaml");
    lab.write_config(
        &repo().join("configs/lab/gateway.yaml"),
        policy_dir,
        &config,
    )
    .unwrap();
    let extra = setup(&lab);
    if !extra.is_empty() {
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}{extra}")).unwrap();
    }
    let metrics = "127.0.0.1:9477".parse().unwrap();
    let mut gw = GatewayProcess::spawn(
        &lab,
        Path::new(env!("CARGO_BIN_EXE_portcullis")),
        &config,
        metrics,
        &dir.0.join("gateway.log"),
    )
    .unwrap();
    gw.wait_ready(Duration::from_secs(20)).unwrap();
    Fixture {
        gw,
        lab,
        _guard: guard,
        _dir: dir,
    }
}

fn drops(status: &Status, reason: &str) -> u64 {
    status
        .totals
        .drops
        .iter()
        .find(|(r, _)| r == reason)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no drop reason {reason}"))
}

fn hits(status: &Status, object: &str) -> u64 {
    status
        .rules
        .iter()
        .filter(|r| r.object == object)
        .map(|r| r.hits)
        .sum()
}

#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn allowed_and_denied_flows_are_counted_by_rule_and_reason() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = start("ta", 1, &repo().join("configs/lab/policies"));
    let servers = Servers::start(&f.lab.server_ns(), &[80, 22, 8080], &[53, 514]).unwrap();
    let ns = f.lab.client_ns();
    let t = Duration::from_millis(1500);

    assert_eq!(
        tcp_connect(&ns, addr(SERVER_V4, 80), t).unwrap(),
        TcpOutcome::Connected
    );
    assert_eq!(
        tcp_connect(&ns, addr("fd99::2", 80), t).unwrap(),
        TcpOutcome::Connected,
        "IPv6 (and ND through the failsafe rules)"
    );
    let before = f.gw.status().unwrap();
    assert_eq!(
        tcp_connect(&ns, addr(SERVER_V4, 22), t).unwrap(),
        TcpOutcome::TimedOut
    );
    assert_eq!(
        tcp_connect(&ns, addr(SERVER_V4, 8080), t).unwrap(),
        TcpOutcome::TimedOut
    );
    let sent = udp_stream(&ns, addr(SERVER_V4, 53), 50, 500, Duration::from_secs(3)).unwrap();
    assert_eq!(sent, 50);
    let log = wait_udp(&servers, 53, 50, Duration::from_secs(3));
    let sum = log.summary(50);
    assert_eq!(
        (sum.received, sum.lost, sum.reordered, sum.duplicated),
        (50, 0, 0, 0),
        "every allowed datagram arrives once, in order"
    );
    let denied = udp_stream(&ns, addr(SERVER_V4, 514), 30, 500, Duration::from_secs(3)).unwrap();
    assert_eq!(denied, 30);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        servers.udp_log(514).seqs.is_empty(),
        "no denied datagram arrives"
    );

    let after = f.gw.status().unwrap();
    // SYN retransmissions may add to the TCP counts, so those are lower bounds.
    assert!(drops(&after, "policy_deny") - drops(&before, "policy_deny") >= 1);
    assert!(hits(&after, "GatewayPolicy/deny-ssh") >= 1);
    assert!(
        drops(&after, "default_deny") - drops(&before, "default_deny") >= 31,
        "port 8080 SYN(s) + 30 datagrams"
    );
    assert_eq!(
        hits(&after, "GatewayPolicy/allow-dns"),
        1,
        "the stream's first datagram opened the flow"
    );
    assert!(
        after.totals.ct_count(CtEvent::Established) - before.totals.ct_count(CtEvent::Established)
            >= 49,
        "the other 49 passed as an established flow"
    );
    assert!(hits(&after, "GatewayPolicy/allow-web") >= 2);
    assert!(after.totals.l2_forwarded >= 2, "ARP crossed the gateway");
    assert_eq!(drops(&after, "tx_ring_full"), 0);
    assert_eq!(after.policy.generation, 1);
    let kernel = &after.kernel;
    assert_eq!(kernel.len(), 2, "one entry per AF_XDP socket: {kernel:?}");
    for k in kernel {
        assert_eq!(k.stats.rx_ring_full, 0, "{k:?}");
    }
    let (code, metrics) = f.gw.get("/metrics").unwrap();
    assert_eq!(code, 200);
    for needle in [
        "portcullis_drops_total{worker=\"0\",reason=\"policy_deny\"}",
        "portcullis_rule_hits_total{rule=",
        "object=\"GatewayPolicy/allow-dns\"",
        "portcullis_xsk_kernel_drops_total{worker=\"0\"",
        "portcullis_table_generation 1",
        "portcullis_burst_service_seconds{quantile=\"0.99\"}",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}");
    }
}

#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn a_hundred_table_swaps_lose_and_reorder_nothing() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = start("tb", 1, &repo().join("configs/lab/policies"));
    let servers = Servers::start(&f.lab.server_ns(), &[], &[53]).unwrap();
    let ns = f.lab.client_ns();
    // Resolve the server's MAC first: while a neighbour entry is incomplete the kernel queues the
    // first datagrams and flushes them after newer ones, which is reordering the gateway did not do.
    udp_stream(&ns, addr(SERVER_V4, 9), 1, 0, Duration::from_secs(1)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = settled_status(&f.gw);
    const COUNT: u64 = 20_000;
    let sender = std::thread::spawn(move || {
        udp_stream(
            &ns,
            addr(SERVER_V4, 53),
            COUNT,
            5_000,
            Duration::from_secs(10),
        )
        .unwrap()
    });
    // 100 forced reloads (SIGHUP) spread over the stream.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut generation = 1;
    for i in 0..100u64 {
        f.gw.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
        // Wait for this swap before the next signal, so signals do not coalesce.
        while generation < 2 + i && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
            generation = f.gw.status().unwrap().policy.generation;
        }
    }
    let swaps_done = started.elapsed();
    let sent = sender.join().unwrap();
    let log = wait_udp(&servers, 53, sent, Duration::from_secs(5));
    let sum = log.summary(sent);
    eprintln!("swaps: 100 in {swaps_done:?}; datagrams: sent {sent}, {sum:?}");
    let seen: std::collections::BTreeSet<u64> = log.seqs.iter().copied().collect();
    let missing: Vec<u64> = (0..sent).filter(|s| !seen.contains(s)).take(20).collect();
    eprintln!("missing: {missing:?}");
    assert_eq!(generation, 101, "every SIGHUP produced a swap");
    assert_eq!(sent, COUNT);
    let status = settled_status(&f.gw);
    let context = format!(
        "{sum:?}; gateway totals {:?}; kernel {:?}",
        status.totals, status.kernel
    );
    assert_eq!((sum.reordered, sum.duplicated), (0, 0), "{context}");
    // The gateway's own accounting is exact over the run, across 100 swaps: every frame it read
    // was forwarded or dropped under exactly one reason, and every frame that reached the table
    // was counted under exactly one rule.
    let (b, a) = (accounting(&before), accounting(&status));
    let delta = |f: fn(&Accounting) -> u64| f(&a) - f(&b);
    assert_eq!(
        delta(|x| x.rx),
        delta(|x| x.tx) + delta(|x| x.drops),
        "rx = tx + drops: {context}"
    );
    assert_eq!(
        delta(|x| x.hits),
        delta(|x| x.rx)
            - delta(|x| x.l2_forwarded)
            - delta(|x| x.unclassified_drops)
            - delta(|x| x.tracked),
        "every frame the tracker did not pass was classified and counted under one rule: {context}"
    );
    assert!(delta(|x| x.rx) >= sum.received, "{context}");
    // The gateway lost nothing across the swaps: the stream's first datagram, and the first
    // after each swap (the flow is decided again by the new table), were counted by the rule
    // (whose counter survived every swap); the rest passed as an established flow.
    // (Packets of one burst that see a new table are each decided again, so a swap can cost a
    // few classifications.)
    let hit = hits(&status, "GatewayPolicy/allow-dns") - hits(&before, "GatewayPolicy/allow-dns");
    assert!(
        hit >= 1 && hit < sum.received / 10,
        "the tracker passes the stream, the table decides it again after swaps ({hit} hits): {context}"
    );
    assert_eq!(
        status.totals.ct_count(CtEvent::New) - before.totals.ct_count(CtEvent::New),
        1,
        "one flow: {context}"
    );
    assert!(hit + delta(|x| x.tracked) >= sum.received, "{context}");
    assert_eq!(drops(&status, "tx_ring_full"), 0, "{context}");
    // What may go missing on this loaded 2-core VM is the kernel's: the veth's XDP ring or an
    // AF_XDP fill ring not yet refilled before the gateway, a full backlog queue after it. A
    // handful at most. A frame the gateway read and did not forward would show as a drop reason,
    // and tx_ring_full, the only one a swap could cause, stayed 0 above.
    assert!(sum.lost <= COUNT / 1000, "{context}");
}

/// Counter totals for exact accounting.
struct Accounting {
    rx: u64,
    tx: u64,
    drops: u64,
    l2_forwarded: u64,
    /// Drops decided before the table: malformed frames and the L2 policy.
    unclassified_drops: u64,
    hits: u64,
    /// Frames the connection tracker passed without the table.
    tracked: u64,
}

fn accounting(s: &Status) -> Accounting {
    let t = &s.totals;
    let drop = |r: Reason| t.drop_count(r);
    Accounting {
        rx: t.rx_ingress + t.rx_egress,
        tx: t.tx_ingress + t.tx_egress,
        drops: Reason::ALL.iter().map(|r| drop(*r)).sum(),
        l2_forwarded: t.l2_forwarded,
        unclassified_drops: Reason::ALL
            .iter()
            .filter(|r| !r.after_classification())
            .map(|r| drop(*r))
            .sum(),
        hits: s.rules.iter().map(|r| r.hits).sum(),
        tracked: t.ct_count(CtEvent::Established) + t.ct_count(CtEvent::Related),
    }
}

/// The status once the counters stop moving (workers flush after each busy burst).
fn settled_status(gw: &GatewayProcess) -> Status {
    let traffic = |s: &Status| {
        let t = &s.totals;
        let drops: u64 = t.drops.iter().map(|(_, n)| n).sum();
        (
            t.rx_ingress + t.rx_egress,
            t.tx_ingress + t.tx_egress,
            drops,
        )
    };
    let mut last = gw.status().unwrap();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = gw.status().unwrap();
        if traffic(&now) == traffic(&last) {
            return now;
        }
        last = now;
    }
    panic!("the counters never settled: {:?}", last.totals);
}

/// A minimal Ethernet + IPv4 frame from the client to the server, built by hand.
fn v4_frame(ihl_words: u8, total_len: u16, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mac = |m: &str| {
        m.split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let mut f = mac(SERVER_MAC);
    f.extend(mac(CLIENT_MAC));
    f.extend_from_slice(&[0x08, 0x00, 0x40 | ihl_words, 0]);
    f.extend_from_slice(&total_len.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0, 0, 64, proto, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2]);
    for _ in 5..ihl_words {
        f.extend_from_slice(&[1, 1, 1, 1]);
    }
    f.extend_from_slice(payload);
    f
}

fn v6_frame(next: u8, payload_len: u16, rest: &[u8]) -> Vec<u8> {
    let mac = |m: &str| {
        m.split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let mut f = mac(SERVER_MAC);
    f.extend(mac(CLIENT_MAC));
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(rest);
    f
}

#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn malformed_frames_are_dropped_with_a_reason_and_forwarding_continues() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = start("tc", 1, &repo().join("configs/lab/policies"));
    let servers = Servers::start(&f.lab.server_ns(), &[80], &[]).unwrap();
    let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", v4_frame(5, 28, 17, &udp)[..20].to_vec()),
        ("bad_ipv4_header", v4_frame(3, 28, 17, &udp)),
        ("bad_ip_length", v4_frame(5, 1400, 17, &udp)),
        ("bad_ip_version", {
            let mut x = v4_frame(5, 28, 17, &udp);
            x[14] = 0x95;
            x
        }),
        (
            "bad_transport",
            v4_frame(
                5,
                40,
                6,
                &[
                    0, 1, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 2, 0, 0, 0, 0, 0, 0,
                ],
            ),
        ),
        ("tiny_fragment", {
            let mut x = v4_frame(5, 22, 6, &[0, 80]);
            x[20] = 0x20; // MF set, offset 0
            x
        }),
        // Destination options, then a hop-by-hop header that must come first: a bogus chain.
        (
            "bad_ip_extension",
            v6_frame(60, 16, &[0, 0, 1, 4, 0, 0, 0, 0, 17, 0, 1, 4, 0, 0, 0, 0]),
        ),
        // A hop-by-hop header claiming more bytes than the packet has.
        ("truncated", v6_frame(0, 8, &[17, 9, 1, 4, 0, 0, 0, 0])),
    ];
    let before = f.gw.status().unwrap();
    const REPEAT: u64 = 5;
    in_netns(&f.lab.client_ns(), || {
        let tx = RawSender::open(&f.lab.client_if()).unwrap();
        for _ in 0..REPEAT {
            for (_, frame) in &cases {
                tx.send(frame).unwrap();
            }
        }
    })
    .unwrap();
    let reasons = [
        "truncated",
        "bad_ipv4_header",
        "bad_ip_length",
        "bad_ip_version",
        "bad_transport",
        "tiny_fragment",
        "bad_ip_extension",
    ];
    // Wait (bounded) until every frame was counted, then a little longer for any extra count.
    let total = |s: &Status| reasons.iter().map(|r| drops(s, r)).sum::<u64>();
    let want = REPEAT * cases.len() as u64;
    let started = Instant::now();
    while total(&f.gw.status().unwrap()) - total(&before) < want
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = f.gw.status().unwrap();
    for reason in reasons {
        let expected = REPEAT * cases.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(
            drops(&after, reason) - drops(&before, reason),
            expected,
            "reason {reason}"
        );
    }
    // Each received frame is forwarded or dropped exactly once, so exact drop counts for all of
    // them prove none was forwarded. (Comparing forwarded totals would not: the hosts' own IPv6
    // neighbour discovery crosses the gateway meanwhile.)
    let total_delta: u64 = [
        "truncated",
        "bad_ipv4_header",
        "bad_ip_length",
        "bad_ip_version",
        "bad_transport",
        "tiny_fragment",
        "bad_ip_extension",
    ]
    .iter()
    .map(|r| drops(&after, r) - drops(&before, r))
    .sum();
    assert_eq!(
        total_delta,
        REPEAT * cases.len() as u64,
        "every malformed frame was dropped"
    );
    assert_eq!(
        tcp_connect(
            &f.lab.client_ns(),
            addr(SERVER_V4, 80),
            Duration::from_millis(1500)
        )
        .unwrap(),
        TcpOutcome::Connected,
        "the gateway keeps forwarding"
    );
    drop(servers);
}

#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn two_queues_forward_and_sigterm_detaches_every_xdp_program() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = start("td", 2, &repo().join("configs/lab/policies"));
    for iface in [f.lab.ext(), f.lab.int()] {
        assert!(
            f.lab.xdp_program(&iface).is_some(),
            "XDP attached on {iface} while running"
        );
    }
    // Many flows, so the client's transmit hashing spreads them over both queues.
    let servers = Servers::start(&f.lab.server_ns(), &[80], &[]).unwrap();
    for _ in 0..16 {
        assert_eq!(
            tcp_connect(
                &f.lab.client_ns(),
                addr(SERVER_V4, 80),
                Duration::from_millis(1500)
            )
            .unwrap(),
            TcpOutcome::Connected
        );
    }
    let status = f.gw.status().unwrap();
    let per_worker: Vec<u64> = status.workers.iter().map(|w| w.rx_ingress).collect();
    eprintln!("ingress frames per worker: {per_worker:?}");
    assert_eq!(per_worker.len(), 2);
    assert!(per_worker.iter().sum::<u64>() >= 16 * 2);
    drop(servers);
    let exit = f.gw.stop(Duration::from_secs(10)).unwrap();
    assert!(
        exit.success(),
        "clean exit on SIGTERM: {exit}\n{}",
        f.gw.log()
    );
    for iface in [f.lab.ext(), f.lab.int()] {
        assert_eq!(
            f.lab.xdp_program(&iface),
            None,
            "no XDP program left on {iface}"
        );
    }
}

#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn a_broken_policy_edit_keeps_the_last_good_table() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let policies =
        std::env::temp_dir().join(format!("portcullis-test-policies-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&policies);
    std::fs::create_dir_all(&policies).unwrap();
    let _cleanup = TempDir(policies.clone());
    let allow80 =
        std::fs::read_to_string(repo().join("configs/lab/policies/20-allow-web.yaml")).unwrap();
    std::fs::write(policies.join("web.yaml"), &allow80).unwrap();
    let f = start("te", 1, &policies);
    let _servers = Servers::start(&f.lab.server_ns(), &[80], &[]).unwrap();
    let ns = f.lab.client_ns();
    assert_eq!(
        tcp_connect(&ns, addr(SERVER_V4, 80), Duration::from_millis(1500)).unwrap(),
        TcpOutcome::Connected
    );

    std::fs::write(
        policies.join("web.yaml"),
        allow80.replace("ports: [80, 443]", "ports: [http]"),
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        let s = f.gw.status().unwrap();
        if !s.policy.last_error.is_empty() || started.elapsed() > Duration::from_secs(5) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = status.policy.last_error[0].clone();
    assert!(
        err.contains("web.yaml") && err.contains("spec.ingress[0].destination.ports[0]"),
        "error names file and field: {err}"
    );
    assert_eq!(status.policy.generation, 1, "the last good table stays");
    assert_eq!(f.gw.get("/healthz").unwrap().0, 503);
    assert_eq!(
        tcp_connect(&ns, addr(SERVER_V4, 80), Duration::from_millis(1500)).unwrap(),
        TcpOutcome::Connected,
        "still forwarding on the old table"
    );
}

/// The Kubernetes layer on real traffic: a NodePort with externalTrafficPolicy Cluster admits the
/// client its backend's NetworkPolicy admits and drops another client at the edge (before any
/// SNAT could hide it), and one with Local drops traffic to a node without a local endpoint.
/// The server namespace plays both nodes (10.99.0.2 = n1, 10.99.0.4 = n2) and kube-proxy.
#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn kubernetes_frontends_decide_client_ips_before_snat() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let policies = std::env::temp_dir().join(format!("portcullis-test-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&policies);
    std::fs::create_dir_all(&policies).unwrap();
    let _cleanup = TempDir(policies.clone());
    std::fs::write(
        policies.join("cluster.yaml"),
        r#"
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Node, metadata: {name: n1}, status: {addresses: [{type: InternalIP, address: 10.99.0.2}]}}
  - {apiVersion: v1, kind: Node, metadata: {name: n2}, status: {addresses: [{type: InternalIP, address: 10.99.0.4}]}}
  - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: dns-1, namespace: shop, labels: {app: dns}}
    spec: {nodeName: n1, containers: [{name: dns, ports: [{name: dns, containerPort: 5353, protocol: UDP}]}]}
    status: {phase: Running, podIP: 10.244.1.10}
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: dns-from-one-client, namespace: shop}
    spec:
      podSelector: {matchLabels: {app: dns}}
      ingress: [{from: [{ipBlock: {cidr: 10.99.0.1/32}}], ports: [{protocol: UDP, port: dns}]}]
  - apiVersion: v1
    kind: Service
    metadata: {name: dns-cluster, namespace: shop}
    spec: {type: NodePort, externalTrafficPolicy: Cluster, ports: [{protocol: UDP, port: 53, targetPort: dns, nodePort: 30053}]}
  - apiVersion: v1
    kind: Service
    metadata: {name: dns-local, namespace: shop}
    spec: {type: NodePort, externalTrafficPolicy: Local, ports: [{protocol: UDP, port: 53, targetPort: dns, nodePort: 30054}]}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: dns-cluster-1, namespace: shop, labels: {kubernetes.io/service-name: dns-cluster}}
    ports: [{port: 5353, protocol: UDP}]
    endpoints: [{addresses: [10.244.1.10], conditions: {ready: true}, nodeName: n1, targetRef: {kind: Pod, name: dns-1, namespace: shop}}]
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: dns-local-1, namespace: shop, labels: {kubernetes.io/service-name: dns-local}}
    ports: [{port: 5353, protocol: UDP}]
    endpoints: [{addresses: [10.244.1.10], conditions: {ready: true}, nodeName: n1, targetRef: {kind: Pod, name: dns-1, namespace: shop}}]
"#,
    )
    .unwrap();
    let f = start("tk", 1, &policies);
    // A second client address, and the second node's address on the server side.
    sh(&[
        "ip",
        "-n",
        &f.lab.client_ns(),
        "addr",
        "add",
        "10.99.0.3/24",
        "dev",
        &f.lab.client_if(),
    ])
    .unwrap();
    sh(&[
        "ip",
        "-n",
        &f.lab.server_ns(),
        "addr",
        "add",
        "10.99.0.4/24",
        "dev",
        &f.lab.server_if(),
    ])
    .unwrap();
    let servers = Servers::start(&f.lab.server_ns(), &[], &[30053, 30054]).unwrap();
    let ns = f.lab.client_ns();
    let send = |src: &str, dst: &str, port: u16| {
        udp_stream_from(
            &ns,
            Some(src.parse().unwrap()),
            addr(dst, port),
            10,
            200,
            Duration::from_secs(2),
        )
        .unwrap()
    };
    let before = f.gw.status().unwrap();

    assert_eq!(send("10.99.0.1", "10.99.0.2", 30053), 10);
    assert_eq!(
        wait_udp(&servers, 30053, 10, Duration::from_secs(3))
            .seqs
            .len(),
        10,
        "the admitted client reaches the ETP Cluster NodePort"
    );
    send("10.99.0.3", "10.99.0.2", 30053);
    send("10.99.0.3", "10.99.0.4", 30053);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        servers.udp_log(30053).seqs.len(),
        10,
        "the other client is dropped at the edge, on every node"
    );

    assert_eq!(send("10.99.0.1", "10.99.0.2", 30054), 10);
    assert_eq!(
        wait_udp(&servers, 30054, 10, Duration::from_secs(3))
            .seqs
            .len(),
        10,
        "ETP Local: n1 has the endpoint"
    );
    send("10.99.0.1", "10.99.0.4", 30054);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        servers.udp_log(30054).seqs.len(),
        10,
        "ETP Local: n2 has no local endpoint"
    );

    let after = f.gw.status().unwrap();
    assert_eq!(
        drops(&after, "policy_deny") - drops(&before, "policy_deny"),
        20
    );
    assert_eq!(
        drops(&after, "no_local_endpoint") - drops(&before, "no_local_endpoint"),
        10
    );
    // One allowed flow each (its first datagram), plus every denied datagram.
    assert!(hits(&after, "Service/shop/dns-cluster") >= 21);
    assert!(hits(&after, "Service/shop/dns-local") >= 11);
}

/// The real gateway watching a (test) Kubernetes API server in its own namespace: it waits for
/// the first complete list before opening sockets, a policy change over the API flips what real
/// traffic does, and losing the API keeps the last table while `/healthz` says so.
#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn the_gateway_follows_the_kubernetes_api_and_survives_losing_it() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let policies =
        std::env::temp_dir().join(format!("portcullis-test-kapi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&policies);
    std::fs::create_dir_all(&policies).unwrap();
    let _cleanup = TempDir(policies.clone());
    let api: std::sync::OnceLock<testkit::apiserver::ApiServer> = std::sync::OnceLock::new();
    let policy = |action: &str| {
        serde_json::json!({"apiVersion": "portcullis.io/v1alpha1", "kind": "GatewayPolicy",
            "metadata": {"name": "dns-clients"},
            "spec": {"ingress": [{"action": action, "protocol": "UDP",
                     "source": {"nets": ["10.99.0.1/32"]}, "destination": {"ports": [30053]}}]}})
    };
    let f = start_with("tka", 1, &policies, |lab| {
        // The API server listens on the gateway namespace's loopback.
        let server = in_netns(&lab.gw_ns(), testkit::apiserver::ApiServer::start).unwrap();
        server.apply(policy("Allow"));
        let kubeconfig = policies.join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
        let _ = api.set(server);
        format!(
            "kubernetes:\n  api:\n    kubeconfig: {}\n    startup: wait\n    debounce_ms: 20\n",
            kubeconfig.display()
        )
    });
    let api = api.get().unwrap();
    let servers = Servers::start(&f.lab.server_ns(), &[], &[30053]).unwrap();
    let ns = f.lab.client_ns();
    let send = || {
        udp_stream(
            &ns,
            addr("10.99.0.2", 30053),
            10,
            200,
            Duration::from_secs(2),
        )
        .unwrap()
    };

    let s = f.gw.status().unwrap();
    assert_eq!(s.policy.sources, ["files", "kubernetes"]);
    assert!(s.kubernetes.as_ref().unwrap().synced);
    assert_eq!(send(), 10);
    assert_eq!(
        wait_udp(&servers, 30053, 10, Duration::from_secs(3))
            .seqs
            .len(),
        10,
        "allowed by the GatewayPolicy served by the API"
    );

    let generation = s.policy.generation;
    api.apply(policy("Deny"));
    let started = Instant::now();
    while f.gw.status().unwrap().policy.generation == generation {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no swap after the API change"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = f.gw.status().unwrap();
    send();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        servers.udp_log(30053).seqs.len(),
        10,
        "denied after the update"
    );
    let after =
        f.gw.status()
            .unwrap_or_else(|e| panic!("{e}: {}", f.gw.log()));
    assert_eq!(
        drops(&after, "policy_deny") - drops(&before, "policy_deny"),
        10
    );
    assert_eq!(
        hits(&after, "GatewayPolicy/dns-clients") - hits(&before, "GatewayPolicy/dns-clients"),
        10
    );

    // Explain asks the running gateway about its live (API-fed) table.
    let (code, why) =
        f.gw.get("/explain?src=10.99.0.1&dst=10.99.0.2&proto=udp&dport=30053")
            .unwrap();
    assert_eq!(code, 200, "{why}");
    assert!(
        why.contains("DENY (policy_deny)") && why.contains("GatewayPolicy/dns-clients rule 0"),
        "{why}"
    );
    assert!(
        why.contains("origin:  api:GatewayPolicy.portcullis.io/dns-clients"),
        "{why}"
    );
    let (code, why) = f.gw.get("/explain?src=10.99.0.1&dst=nowhere").unwrap();
    assert_eq!(code, 400, "{why}");

    let (_, metrics) = f.gw.get("/metrics").unwrap();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_policy_event_to_swap_seconds_count "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(count >= 1, "{metrics}");
    assert!(
        metrics.contains("portcullis_kubernetes_synced 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_kubernetes_objects{kind=\"GatewayPolicy.portcullis.io\"} 1"),
        "{metrics}"
    );

    // The API goes away: the table stays, health says why.
    api.go_down();
    let started = Instant::now();
    loop {
        let (code, body) = f.gw.get("/healthz").unwrap();
        if code == 503 {
            assert!(body.contains("unreachable"), "{body}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "healthz stayed {code}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = f.gw.status().unwrap();
    send();
    std::thread::sleep(Duration::from_millis(300));
    let after = f.gw.status().unwrap();
    assert_eq!(
        drops(&after, "policy_deny") - drops(&before, "policy_deny"),
        10,
        "the last table still decides"
    );
    assert_eq!(after.policy.generation, before.policy.generation);

    in_netns(&f.lab.gw_ns(), || api.come_back()).unwrap();
    let started = Instant::now();
    while f.gw.get("/healthz").unwrap().0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "healthz never recovered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start-up without the API: `startup: wait` opens no socket (no XDP program attached) and says
/// why on `/healthz` until the API answers; `startup: files` forwards on the policy directory at
/// once and swaps in the merged table when the API is synced.
#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn startup_waits_for_the_api_or_starts_on_the_files() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let prefix = unique_prefix("tkw");
    let lab = Lab::new(&prefix, 1).unwrap();
    let _ = lab.down();
    lab.up().unwrap();
    let _guard = LabGuard(lab.clone());
    let dir = TempDir(std::env::temp_dir().join(format!("portcullis-test-{prefix}")));
    let policies = dir.0.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // The file source allows the client to the UDP port; the API adds nothing but must be synced.
    std::fs::write(
        policies.join("allow.yaml"),
        "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: from-files}\nspec: {ingress: [{action: Allow, protocol: UDP, destination: {ports: [30053]}}]}\n",
    )
    .unwrap();
    let api = in_netns(&lab.gw_ns(), testkit::apiserver::ApiServer::start).unwrap();
    api.go_down();
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml()).unwrap();
    let servers = Servers::start(&lab.server_ns(), &[], &[30053]).unwrap();
    let metrics = "127.0.0.1:9477".parse().unwrap();

    for startup in ["wait", "files"] {
        let config = dir.0.join(format!("gateway-{startup}.yaml"));
        lab.write_config(&repo().join("configs/lab/gateway.yaml"), &policies, &config)
            .unwrap();
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            format!(
                "{text}kubernetes:\n  api: {{kubeconfig: {}, startup: {startup}}}\n",
                kubeconfig.display()
            ),
        )
        .unwrap();
        let mut gw = GatewayProcess::spawn(
            &lab,
            Path::new(env!("CARGO_BIN_EXE_portcullis")),
            &config,
            metrics,
            &dir.0.join(format!("gateway-{startup}.log")),
        )
        .unwrap();
        // Unhealthy, and says why, while the API is away.
        let started = Instant::now();
        let body = loop {
            if let Ok((503, body)) = gw.get("/healthz") {
                break body;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{startup}: {}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(body.contains("not synced"), "{startup}: {body}");
        if startup == "wait" {
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                lab.xdp_program(&lab.ext()).is_none(),
                "wait: an XDP program was attached before the API synced"
            );
        } else {
            let started = Instant::now();
            while lab.xdp_program(&lab.ext()).is_none() {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "files: never attached: {}",
                    gw.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let before = servers.udp_log(30053).seqs.len();
            udp_stream(
                &lab.client_ns(),
                addr("10.99.0.2", 30053),
                10,
                200,
                Duration::from_secs(2),
            )
            .unwrap();
            assert_eq!(
                wait_udp(
                    &servers,
                    30053,
                    (before + 10) as u64,
                    Duration::from_secs(3)
                )
                .seqs
                .len(),
                before + 10,
                "files: forwarding on the file policies while the API is away"
            );
        }
        in_netns(&lab.gw_ns(), || api.come_back()).unwrap();
        gw.wait_ready(Duration::from_secs(20)).unwrap();
        let s = gw.status().unwrap();
        assert_eq!(s.policy.sources, ["files", "kubernetes"]);
        assert!(lab.xdp_program(&lab.ext()).is_some());
        assert_eq!(gw.stop(Duration::from_secs(10)).unwrap().code(), Some(0));
        api.go_down();
    }
}
