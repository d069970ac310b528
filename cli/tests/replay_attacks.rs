//! The tracker against an attacker, through `portcullis replay`: for each case of issue 24, a
//! capture built here, and the verdict netfilter (`ct state established,related accept; <rules>;
//! drop`) gives every packet. Frames come from `testkit::frames` (hand-written headers, the IPv6
//! Fragment header from RFC 8200's figure), so no parser under test builds its own input.
//!
//! Addresses: inside hosts 10.99.0.1 (a client) and 10.99.0.2 (a web server, TCP 80 open to
//! the world); outside 192.0.2.9 (a server the client talks to) and 198.51.100.7 (an
//! attacker); IPv6 fd99::1 / fd99::2 inside, 2001:db8::9 outside.

use std::path::PathBuf;
use std::process::Command;

use gateway::pcap::{write, Packet};
use gateway::replay::Line;
use testkit::frames::{self, eth, ipv4, ipv6, ACK, FIN, PSH, RST, SYN};

const CLIENT: [u8; 4] = [10, 99, 0, 1];
const WEB: [u8; 4] = [10, 99, 0, 2];
const REMOTE: [u8; 4] = [192, 0, 2, 9];
const ATTACKER: [u8; 4] = [198, 51, 100, 7];
const ROUTER: [u8; 4] = [192, 0, 2, 254];

fn v6(last: u8, outside: bool) -> [u8; 16] {
    let mut a = if outside {
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    } else {
        [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    };
    a[15] = last;
    a
}

const WEB_POLICY: &str = "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\n\
metadata: {name: web}\nspec:\n  priority: 100\n  ingress:\n    - action: Allow\n      protocol: TCP\n\
\x20     destination: {nets: [10.99.0.2/32, \"fd99::2/128\"], ports: [80]}\n";

/// Egress allowed for everything but TCP from the web server's port 80 (what a server that only
/// answers may not start).
const EGRESS_POLICY: &str = "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\n\
metadata: {name: out}\nspec:\n  priority: 50\n  egress:\n    - action: Deny\n      protocol: TCP\n\
\x20     source: {nets: [10.99.0.2/32], ports: [80]}\n    - action: Allow\n";

struct Capture {
    dir: PathBuf,
    ext: Vec<Packet>,
    int: Vec<Packet>,
    t: u64,
    changes: Vec<(f64, PathBuf)>,
}

impl Capture {
    /// Default deny both ways; the web server open; egress as [`EGRESS_POLICY`].
    fn new(name: &str) -> Capture {
        Self::with(name, "")
    }

    fn with(name: &str, conntrack: &str) -> Capture {
        let dir = std::env::temp_dir().join(format!("pc-attack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "interfaces: {{ext: ext0, int: int0}}\npolicy_dir: policies\n\
                 default: {{ingress: deny, egress: deny}}\nmetrics: {{listen: null}}\n\
                 conntrack: {{enabled: true{conntrack}}}\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("policies/web.yaml"), WEB_POLICY).unwrap();
        std::fs::write(dir.join("policies/out.yaml"), EGRESS_POLICY).unwrap();
        Capture {
            dir,
            ext: Vec::new(),
            int: Vec::new(),
            t: 1_000_000_000_000_000,
            changes: Vec::new(),
        }
    }

    /// A frame arriving on ext (from outside).
    fn inbound(&mut self, frame: Vec<u8>) {
        self.add(true, frame)
    }

    /// A frame arriving on int (from inside).
    fn outbound(&mut self, frame: Vec<u8>) {
        self.add(false, frame)
    }

    fn add(&mut self, inbound: bool, frame: Vec<u8>) {
        self.t += 1_000_000;
        let p = Packet {
            ts_ns: self.t,
            wire_len: frame.len() as u32,
            data: frame,
        };
        if inbound {
            self.ext.push(p);
        } else {
            self.int.push(p);
        }
    }

    /// The clock jumps ahead.
    fn wait(&mut self, seconds: u64) {
        self.t += seconds * 1_000_000_000;
    }

    /// From the next packet on, the policies are `files` (name, YAML).
    fn change(&mut self, files: &[(&str, &str)]) {
        let d = self.dir.join(format!("change{}", self.changes.len()));
        std::fs::create_dir_all(&d).unwrap();
        for (name, yaml) in files {
            std::fs::write(d.join(name), yaml).unwrap();
        }
        self.changes.push(((self.t + 500_000) as f64 / 1e9, d));
    }

    fn run(&self) -> Vec<Line> {
        let (ext, int) = (self.dir.join("ext.pcap"), self.dir.join("int.pcap"));
        write(&ext, &self.ext).unwrap();
        write(&int, &self.int).unwrap();
        let mut args: Vec<String> = [
            "replay",
            "--config",
            self.dir.join("gateway.yaml").to_str().unwrap(),
            "--ext",
            ext.to_str().unwrap(),
            "--int",
            int.to_str().unwrap(),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (ts, d) in &self.changes {
            args.push("--change".into());
            args.push(format!("{ts:.6}={}", d.display()));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines: Vec<Line> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        lines.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        lines
    }

    /// Runs the capture and checks each packet's verdict, in capture order: `"allow"`, `"deny"`,
    /// or `"deny:REASON"`.
    fn expect(&self, want: &[&str]) {
        let lines = self.run();
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
        for (i, (l, w)) in lines.iter().zip(want).enumerate() {
            let (verdict, reason) = w.split_once(':').map_or((*w, None), |(v, r)| (v, Some(r)));
            assert_eq!(l.verdict, verdict, "packet {i}: {l:?}\nall: {lines:#?}");
            if let Some(r) = reason {
                assert_eq!(l.reason.as_deref(), Some(r), "packet {i}: {l:?}");
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An IPv4 TCP segment as a frame.
#[allow(clippy::too_many_arguments)]
fn tcp4(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    let s = frames::tcp(
        &src,
        &dst,
        sport,
        dport,
        seq,
        ack,
        flags,
        8192,
        &[],
        data,
        false,
    );
    eth(&[], 0x0800, &ipv4(src, dst, 6, 1, 0x4000, &s))
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    eth(
        &[],
        0x0800,
        &ipv4(src, dst, 17, 2, 0, &frames::udp(sport, dport, b"data")),
    )
}

/// An ICMPv4 error from `from` to `to` quoting `quote` (an IP packet's bytes).
fn icmp4_error(from: [u8; 4], to: [u8; 4], ty: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    eth(
        &[],
        0x0800,
        &ipv4(from, to, 1, 3, 0, &frames::icmp(ty, code, [0; 4], quote)),
    )
}

/// The IP packet inside a frame built here (untagged).
fn l3(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// A client outside opens a connection to the web server and completes the handshake; returns
/// (client ISN + 1, server ISN + 1).
fn web_handshake(c: &mut Capture, sport: u16) -> (u32, u32) {
    c.inbound(tcp4(ATTACKER, WEB, sport, 80, 1000, 0, SYN, &[]));
    c.outbound(tcp4(WEB, ATTACKER, 80, sport, 5000, 1001, SYN | ACK, &[]));
    c.inbound(tcp4(ATTACKER, WEB, sport, 80, 1001, 5001, ACK, &[]));
    (1001, 5001)
}

/// The inside client opens a connection to a remote server's 443 and completes the handshake.
fn client_handshake(c: &mut Capture, sport: u16) {
    c.outbound(tcp4(CLIENT, REMOTE, sport, 443, 1000, 0, SYN, &[]));
    c.inbound(tcp4(REMOTE, CLIENT, 443, sport, 5000, 1001, SYN | ACK, &[]));
    c.outbound(tcp4(CLIENT, REMOTE, sport, 443, 1001, 5001, ACK, &[]));
}

#[test]
fn case_1_related_icmp_must_go_to_the_quoted_sender_quote_only_itself_and_be_of_its_family() {
    let mut c = Capture::new("related");
    let query = udp4(CLIENT, REMOTE, 5353, 53);
    c.outbound(query.clone());
    let quote = &l3(&query)[..28];
    // Addressed to the client: related.
    c.inbound(icmp4_error(ROUTER, CLIENT, 3, 3, quote));
    // To another inside host, or to the outside peer: not related.
    c.inbound(icmp4_error(ROUTER, WEB, 3, 3, quote));
    c.inbound(icmp4_error(ROUTER, REMOTE, 3, 3, quote));
    // Hundreds of bytes after the quoted datagram (which says it is 32 bytes long).
    let mut long = l3(&query).to_vec();
    long.extend_from_slice(&[0x41; 400]);
    c.inbound(icmp4_error(ROUTER, CLIENT, 3, 3, &long));
    // An ICMPv4 error quoting an IPv6 packet, and an ICMPv6 error quoting the IPv4 one.
    let q6 = ipv6(
        v6(1, false),
        v6(9, true),
        17,
        &frames::udp(5353, 53, b"data"),
    );
    c.inbound(icmp4_error(ROUTER, CLIENT, 3, 3, &q6));
    c.inbound(eth(
        &[],
        0x86dd,
        &ipv6(
            v6(254, true),
            v6(1, false),
            58,
            &frames::icmp6(v6(254, true), v6(1, false), 1, 4, [0; 4], quote),
        ),
    ));
    // Time exceeded about it, properly addressed: related.
    c.inbound(icmp4_error(ROUTER, CLIENT, 11, 0, quote));
    c.expect(&[
        "allow", "allow", "deny", "deny", "deny", "deny", "deny", "allow",
    ]);
}

#[test]
fn case_2_icmp_queries_pair_by_type_and_identifier() {
    let mut c = Capture::new("echo");
    let ping = |src, dst, ty, id| {
        eth(
            &[],
            0x0800,
            &ipv4(src, dst, 1, 4, 0, &frames::icmp_query(ty, id, 1)),
        )
    };
    c.outbound(ping(CLIENT, REMOTE, 8, 77)); // echo out
    c.inbound(ping(REMOTE, CLIENT, 8, 77)); // an echo *request* in with the same identifier
    c.inbound(ping(REMOTE, CLIENT, 14, 77)); // a timestamp reply to an echo
    c.inbound(ping(REMOTE, CLIENT, 0, 77)); // the echo reply
    c.outbound(ping(CLIENT, REMOTE, 13, 78)); // timestamp request out
    c.inbound(ping(REMOTE, CLIENT, 14, 78)); // its reply
    c.outbound(ping(CLIENT, ATTACKER, 0, 99)); // an echo reply sent out (egress allows it)...
    c.inbound(ping(ATTACKER, CLIENT, 8, 99)); // ...opened nothing for a request to come in
    c.outbound(ping(CLIENT, REMOTE, 17, 79)); // address mask request
    c.inbound(ping(REMOTE, CLIENT, 18, 79));
    c.outbound(ping(CLIENT, REMOTE, 15, 80)); // information request
    c.inbound(ping(REMOTE, CLIENT, 16, 80));
    // A reply must carry the request's code (netfilter keeps it in the tuple).
    c.outbound(ping(CLIENT, REMOTE, 8, 81));
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&81u16.to_be_bytes());
    c.inbound(eth(
        &[],
        0x0800,
        &ipv4(REMOTE, CLIENT, 1, 4, 0, &frames::icmp(0, 3, rest, b"query")),
    ));
    c.inbound(ping(REMOTE, CLIENT, 0, 81));
    c.expect(&[
        "allow", "deny", "deny", "allow", "allow", "allow", "allow", "deny", "allow", "allow",
        "allow", "allow", "allow", "deny", "allow",
    ]);
}

/// An IPv6 TCP segment from outside to the web server, in fragments given as (offset, more,
/// bytes of the segment).
fn v6_frags(id: u32, seg: &[u8], parts: &[(u16, bool, std::ops::Range<usize>)]) -> Vec<Vec<u8>> {
    parts
        .iter()
        .map(|(off, more, r)| {
            let mut body = frames::v6_fragment(6, *off, *more, id);
            body.extend_from_slice(&seg[r.clone()]);
            eth(&[], 0x86dd, &ipv6(v6(7, true), v6(2, false), 44, &body))
        })
        .collect()
}

#[test]
fn case_3_and_9_ipv6_fragments_are_read_right() {
    let mut c = Capture::new("frag6");
    let (src, dst) = (v6(7, true), v6(2, false));
    // A fake SYN to the open port inside a trailing fragment at offset 32/64/96/128: never a
    // whole packet, never a flow.
    for off in [32u16, 64, 96, 128] {
        let fake = frames::tcp(&src, &dst, 4000 + off, 80, 1, 0, SYN, 1024, &[], &[], false);
        for f in v6_frags(off as u32, &fake, &[(off, false, 0..fake.len())]) {
            c.inbound(f);
        }
    }
    // A real fragmented SYN (40 bytes of data): the first fragment carries the whole TCP
    // header and passes; so does the rest; the server's answer is established.
    let syn = frames::tcp(
        &src,
        &dst,
        5555,
        80,
        1000,
        0,
        SYN,
        1024,
        &[],
        &[7; 40],
        false,
    );
    for f in v6_frags(9, &syn, &[(0, true, 0..24), (24, false, 24..syn.len())]) {
        c.inbound(f);
    }
    let answer = frames::tcp(
        &dst,
        &src,
        80,
        5555,
        5000,
        1041,
        SYN | ACK,
        1024,
        &[],
        &[],
        false,
    );
    c.outbound(eth(&[], 0x86dd, &ipv6(dst, src, 6, &answer)));
    // A later fragment overlapping the first one's data (it could rewrite the header).
    let over = frames::tcp(&src, &dst, 6666, 80, 1, 0, SYN, 1024, &[], &[7; 40], false);
    for f in v6_frags(10, &over, &[(0, true, 0..24), (16, false, 16..over.len())]) {
        c.inbound(f);
    }
    // A first fragment too short for the TCP header (RFC 7112).
    for f in v6_frags(11, &over, &[(0, true, 0..16), (16, false, 16..over.len())]) {
        c.inbound(f);
    }
    c.expect(&[
        "deny:fragment_no_first",
        "deny:fragment_no_first",
        "deny:fragment_no_first",
        "deny:fragment_no_first",
        "allow",
        "allow",
        "allow",
        "allow",
        "deny:fragment_overlap",
        "deny:tiny_fragment",
        "deny:fragment_no_first",
    ]);
}

#[test]
fn case_3_ipv4_fragments_follow_their_first() {
    let mut c = Capture::new("frag4");
    let syn = frames::tcp(
        &ATTACKER,
        &WEB,
        7000,
        80,
        1,
        0,
        SYN,
        1024,
        &[],
        &[9; 40],
        false,
    );
    let frag = |id, fo: u16, data: &[u8]| eth(&[], 0x0800, &ipv4(ATTACKER, WEB, 6, id, fo, data));
    c.inbound(frag(20, 0x2000, &syn[..24])); // first: passes
    c.inbound(frag(20, 3, &syn[24..])); // at 24 bytes: passes
    c.inbound(frag(21, 3, &syn[24..])); // a datagram whose first never came
    c.inbound(frag(22, 0x2000, &syn[..24]));
    c.inbound(frag(22, 1, &syn[8..])); // RFC 1858: offset 8 rewrites the flags
                                       // To a closed port: the first is denied, so the rest is too.
    let closed = frames::tcp(
        &ATTACKER,
        &WEB,
        7001,
        22,
        1,
        0,
        SYN,
        1024,
        &[],
        &[9; 40],
        false,
    );
    c.inbound(frag(23, 0x2000, &closed[..24]));
    c.inbound(frag(23, 3, &closed[24..]));
    // Later fragments that overlap each other (not the first): the second is dropped.
    c.inbound(frag(24, 0x2000, &syn[..24]));
    c.inbound(frag(24, 0x2000 | 3, &syn[24..40]));
    c.inbound(frag(24, 4, &syn[32..]));
    c.expect(&[
        "allow",
        "allow",
        "deny:fragment_no_first",
        "allow",
        "deny:fragment_overlap",
        "deny",
        "deny:fragment_no_first",
        "allow",
        "allow",
        "deny:fragment_overlap",
    ]);
}

#[test]
fn case_4_a_syn_after_time_wait_is_a_new_flow_in_its_own_direction() {
    let mut c = Capture::new("timewait");
    let (cs, ss) = web_handshake(&mut c, 40000);
    c.inbound(tcp4(ATTACKER, WEB, 40000, 80, cs, ss, FIN | ACK, &[]));
    c.outbound(tcp4(WEB, ATTACKER, 80, 40000, ss, cs + 1, FIN | ACK, &[]));
    c.inbound(tcp4(ATTACKER, WEB, 40000, 80, cs + 1, ss + 1, ACK, &[]));
    // The former server opens towards the former client's port: egress denies TCP from :80.
    c.outbound(tcp4(WEB, ATTACKER, 80, 40000, 90_000, 0, SYN, &[]));
    // ... and opened nothing: the client's SYN-ACK "answer" is new (the rules, which open port
    // 80 to any segment, decide it).
    c.inbound(tcp4(ATTACKER, WEB, 40000, 80, 7, 90_001, SYN | ACK, &[]));
    // The client opening again on the same ports is a new flow the rules allow.
    c.inbound(tcp4(ATTACKER, WEB, 40000, 80, 50_000, 0, SYN, &[]));
    c.outbound(tcp4(
        WEB,
        ATTACKER,
        80,
        40000,
        60_000,
        50_001,
        SYN | ACK,
        &[],
    ));
    c.expect(&[
        "allow", "allow", "allow", "allow", "allow", "allow", "deny", "allow", "allow", "allow",
    ]);
    let lines = c.run();
    assert_eq!(lines[6].state, "new", "the server's SYN was decided as new");
    assert_eq!(lines[7].state, "new", "and opened no flow");
}

#[test]
fn case_5_and_10_flows_are_keyed_on_both_tags_and_vid_0_is_untagged() {
    let mut c = Capture::new("vlan");
    let q = |tags: &[u16], src, dst, sport, dport| {
        eth(
            tags,
            0x0800,
            &ipv4(src, dst, 17, 5, 0, &frames::udp(sport, dport, b"x")),
        )
    };
    c.outbound(q(&[100, 10], CLIENT, REMOTE, 5000, 53));
    c.inbound(q(&[100, 20], REMOTE, CLIENT, 53, 5000)); // another inner VLAN
    c.inbound(q(&[100], REMOTE, CLIENT, 53, 5000)); // no inner VLAN
    c.inbound(q(&[100, 10], REMOTE, CLIENT, 53, 5000)); // the reply
                                                        // Priority-tagged (VID 0) is untagged, both ways.
    c.outbound(q(&[], CLIENT, REMOTE, 5001, 53));
    c.inbound(q(&[0], REMOTE, CLIENT, 53, 5001));
    c.outbound(q(&[0], CLIENT, REMOTE, 5002, 53));
    c.inbound(q(&[], REMOTE, CLIENT, 53, 5002));
    c.expect(&[
        "allow", "deny", "deny", "allow", "allow", "allow", "allow", "allow",
    ]);
}

#[test]
fn case_6_forged_rst_and_fin_are_invalid_and_the_connection_lives_on() {
    let mut c = Capture::new("window");
    client_handshake(&mut c, 41000);
    // An RST far outside the window, an exact one with a bad checksum, a FIN outside the window.
    c.inbound(tcp4(
        REMOTE,
        CLIENT,
        443,
        41000,
        5001 + 3_000_000,
        0,
        RST,
        &[],
    ));
    let bad = frames::tcp(
        &REMOTE,
        &CLIENT,
        443,
        41000,
        5001,
        0,
        RST,
        0,
        &[],
        &[],
        true,
    );
    c.inbound(eth(&[], 0x0800, &ipv4(REMOTE, CLIENT, 6, 9, 0, &bad)));
    c.inbound(tcp4(
        REMOTE,
        CLIENT,
        443,
        41000,
        5001 + (1 << 30),
        1001,
        FIN | ACK,
        &[],
    ));
    // Data that acknowledges bytes never sent.
    c.inbound(tcp4(
        REMOTE,
        CLIENT,
        443,
        41000,
        5001,
        900_000,
        ACK | PSH,
        b"x",
    ));
    // An idle gap longer than any closing timeout: still established.
    c.wait(300);
    c.inbound(tcp4(
        REMOTE,
        CLIENT,
        443,
        41000,
        5001,
        1001,
        ACK | PSH,
        b"hello",
    ));
    c.outbound(tcp4(CLIENT, REMOTE, 41000, 443, 1001, 5006, ACK, &[]));
    // The real RST, exact: closes.
    c.inbound(tcp4(REMOTE, CLIENT, 443, 41000, 5006, 0, RST, &[]));
    c.expect(&[
        "allow",
        "allow",
        "allow",
        "deny:invalid",
        "deny:invalid",
        "deny:invalid",
        "deny:invalid",
        "allow",
        "allow",
        "allow",
    ]);
}

#[test]
fn case_7_an_answered_syn_flood_does_not_keep_a_new_flow_out() {
    // A 64-flow table, flooded with 300 answered SYNs from spoofed sources.
    let mut c = Capture::with("flood", ", capacity: 64");
    let mut want = Vec::new();
    for i in 0..300u32 {
        let src = [203, 0, (i >> 8) as u8, i as u8];
        c.inbound(tcp4(src, WEB, 1024 + i as u16, 80, i, 0, SYN, &[]));
        c.outbound(tcp4(
            WEB,
            src,
            80,
            1024 + i as u16,
            9,
            i + 1,
            SYN | ACK,
            &[],
        ));
        want.extend(["allow", "allow"]);
    }
    web_handshake(&mut c, 44444);
    c.inbound(tcp4(
        ATTACKER,
        WEB,
        44444,
        80,
        1001,
        5001,
        ACK | PSH,
        b"GET /",
    ));
    c.outbound(tcp4(
        WEB,
        ATTACKER,
        80,
        44444,
        5001,
        1006,
        ACK | PSH,
        b"200 OK",
    ));
    want.extend(["allow", "allow", "allow", "allow", "allow"]);
    c.expect(&want);
}

#[test]
fn case_8_protocols_without_ports_are_tracked() {
    let mut c = Capture::new("generic");
    let raw = |src, dst, p: u8| eth(&[], 0x0800, &ipv4(src, dst, p, 6, 0, &[0x11; 24]));
    c.outbound(raw(CLIENT, REMOTE, 50)); // ESP out
    c.inbound(raw(REMOTE, CLIENT, 50)); // ESP back
    c.inbound(raw(ATTACKER, CLIENT, 50)); // ESP from someone else
    c.outbound(raw(CLIENT, REMOTE, 47)); // GRE out
    c.inbound(raw(REMOTE, CLIENT, 47));
    c.inbound(raw(REMOTE, CLIENT, 132 - 17)); // another protocol, nothing opened it
    c.expect(&["allow", "allow", "deny", "allow", "allow", "deny"]);
}

#[test]
fn case_9_packet_too_big_quoting_extension_headers_is_related() {
    let mut c = Capture::new("ptb");
    let (client, server) = (v6(1, false), v6(9, true));
    let mut body = frames::v6_dest_opts(17);
    body.extend_from_slice(&frames::udp(7000, 443, &[0; 64]));
    let out = ipv6(client, server, 60, &body);
    c.outbound(eth(&[], 0x86dd, &out));
    // Packet too big from a router, quoting the packet with its Destination Options header.
    let router = v6(254, true);
    let ptb = |to| frames::icmp6(router, to, 2, 0, 1280u32.to_be_bytes(), &out);
    c.inbound(eth(&[], 0x86dd, &ipv6(router, client, 58, &ptb(client))));
    // The same error addressed to the other inside host is not related.
    let other = v6(2, false);
    c.inbound(eth(&[], 0x86dd, &ipv6(router, other, 58, &ptb(other))));
    // Related, but with a bad checksum: not related (netfilter verifies ICMP checksums).
    let mut bad = ptb(client);
    bad[2] ^= 0x55;
    c.inbound(eth(&[], 0x86dd, &ipv6(router, client, 58, &bad)));
    c.expect(&["allow", "allow", "deny", "deny"]);
}

#[test]
fn case_13_a_policy_change_cuts_open_flows_and_their_related_errors() {
    let mut c = Capture::new("change");
    client_handshake(&mut c, 42000);
    let query = udp4(CLIENT, REMOTE, 5353, 53);
    c.outbound(query.clone());
    // Egress now denies everything.
    c.change(&[("web.yaml", WEB_POLICY)]);
    // An error about the UDP flow, before any of its packets: the new table decides the flow.
    c.inbound(icmp4_error(ROUTER, CLIENT, 3, 3, &l3(&query)[..28]));
    c.inbound(tcp4(
        REMOTE,
        CLIENT,
        443,
        42000,
        5001,
        1001,
        ACK | PSH,
        b"late",
    ));
    // The web server stays open: its flows still pass after another change.
    let (cs, ss) = web_handshake(&mut c, 43000);
    c.change(&[("web.yaml", WEB_POLICY), ("out.yaml", EGRESS_POLICY)]);
    c.outbound(tcp4(WEB, ATTACKER, 80, 43000, ss, cs, ACK | PSH, b"hi"));
    c.expect(&[
        "allow", "allow", "allow", "allow", "deny", "deny", "allow", "allow", "allow", "allow",
    ]);
}
