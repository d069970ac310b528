//! `portcullis replay`: the shared stateful examples give exactly their expected verdicts, and
//! captures written here check echo pairing, related ICMP errors, replies under a default-deny
//! egress, the tracker switched off, and errors that name the file and offset.

use std::path::{Path, PathBuf};
use std::process::Command;

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
use gateway::pcap::{write, Packet};
use gateway::replay::Line;

const CLIENT: [u8; 4] = [10, 99, 0, 1];
const SERVER: [u8; 4] = [10, 99, 0, 2];
const REMOTE: [u8; 4] = [192, 0, 2, 9];
const MAC_A: [u8; 6] = [2, 0x99, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0x99, 0, 0, 0, 2];

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/stateful")
}

fn portcullis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn replay(config: &Path, ext: &Path, int: &Path) -> Vec<Line> {
    let (code, out, err) = portcullis(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--ext",
        ext.to_str().unwrap(),
        "--int",
        int.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_shared_stateful_examples_get_their_expected_verdicts() {
    let mut cases = 0;
    for entry in std::fs::read_dir(shared()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("expected.tsv").exists() {
            continue;
        }
        cases += 1;
        let lines = replay(
            &dir.join("gateway.yaml"),
            &dir.join("ext.pcap"),
            &dir.join("int.pcap"),
        );
        let expected = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
        let mut checked = 0;
        for row in expected.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = row.split('\t').collect();
            let (iface, index, verdict) = (f[0], f[1].parse::<usize>().unwrap(), f[2]);
            let got = lines
                .iter()
                .find(|l| l.iface == iface && l.index == index)
                .unwrap_or_else(|| panic!("{}: no line for {iface} {index}", dir.display()));
            assert_eq!(
                got.verdict,
                verdict,
                "{}: {iface} {index} ({}): {got:?}",
                dir.display(),
                f.get(3).unwrap_or(&"")
            );
            checked += 1;
        }
        assert_eq!(
            checked,
            lines.len(),
            "{}: every packet has a verdict",
            dir.display()
        );
    }
    assert!(cases >= 2, "the shared examples are there");
}

struct Capture {
    dir: PathBuf,
    ext: Vec<Packet>,
    int: Vec<Packet>,
    t: u64,
}

impl Capture {
    fn new(name: &str, egress: &str, conntrack: bool) -> Capture {
        let dir = std::env::temp_dir().join(format!("pc-replay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "interfaces: {{ext: ext0, int: int0}}\npolicy_dir: policies\n\
                 default: {{ingress: deny, egress: {egress}}}\nmetrics: {{listen: null}}\n\
                 conntrack: {{enabled: {conntrack}}}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("policies/web.yaml"),
            "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: web}\n\
             spec:\n  priority: 100\n  ingress:\n    - action: Allow\n      protocol: TCP\n\
             \x20     destination: {nets: [10.99.0.2/32], ports: [80]}\n",
        )
        .unwrap();
        Capture {
            dir,
            ext: Vec::new(),
            int: Vec::new(),
            t: 1_000_000_000_000,
        }
    }

    /// A frame that arrived on ext (`inbound`) or int.
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

    fn run(&self) -> Vec<Line> {
        let (ext, int) = (self.dir.join("ext.pcap"), self.dir.join("int.pcap"));
        write(&ext, &self.ext).unwrap();
        write(&int, &self.int).unwrap();
        replay(&self.dir.join("gateway.yaml"), &ext, &int)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn eth() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2(MAC_A, MAC_B)
}

fn echo(src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let ip = eth().ipv4(src, dst, 64);
    if reply {
        ip.icmpv4_echo_reply(id, 1).write(&mut f, b"ping").unwrap();
    } else {
        ip.icmpv4_echo_request(id, 1)
            .write(&mut f, b"ping")
            .unwrap();
    }
    f
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    eth()
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut f, b"data")
        .unwrap();
    f
}

fn unreachable(from: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    eth()
        .ipv4(from, SERVER, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut f, &quoted[14..14 + 28])
        .unwrap();
    f
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool, ack: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let mut b = eth().ipv4(src, dst, 64).tcp(sport, dport, 1, 1024);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(1);
    }
    b.write(&mut f, &[]).unwrap();
    f
}

fn verdicts(lines: &[Line]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| (l.verdict.clone(), l.state.clone()))
        .collect()
}

fn v(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn echo_replies_pair_by_identifier_and_errors_pass_as_related() {
    let mut c = Capture::new("echo", "allow", true);
    c.add(false, echo(SERVER, REMOTE, 7, false)); // ping out
    c.add(true, echo(REMOTE, SERVER, 7, true)); // its reply
    c.add(true, echo(REMOTE, SERVER, 8, true)); // a reply nobody asked for
    let query = udp(SERVER, REMOTE, 5353, 53);
    c.add(false, query.clone());
    c.add(true, unreachable([192, 0, 2, 254], &query)); // about the query: related
    let unknown = udp(SERVER, REMOTE, 6000, 53);
    c.add(true, unreachable([192, 0, 2, 254], &unknown)); // about nothing we sent
    c.add(true, echo(REMOTE, SERVER, 9, false)); // unsolicited ping in
    assert_eq!(
        verdicts(&c.run()),
        v(&[
            ("allow", "new"),
            ("allow", "established"),
            ("deny", "new"),
            ("allow", "new"),
            ("allow", "related"),
            ("deny", "untracked"),
            ("deny", "new"),
        ])
    );
}

#[test]
fn replies_pass_under_default_deny_egress_and_only_with_the_tracker() {
    for (conntrack, want) in [
        (
            true,
            v(&[
                ("allow", "new"),
                ("allow", "established"),
                ("allow", "established"),
                ("deny", "new"),
            ]),
        ),
        (
            false,
            v(&[
                ("allow", "untracked"),
                ("deny", "untracked"),
                ("allow", "untracked"),
                ("deny", "untracked"),
            ]),
        ),
    ] {
        let mut c = Capture::new(&format!("egress-{conntrack}"), "deny", conntrack);
        c.add(true, tcp(CLIENT, SERVER, 40000, 80, true, false)); // allowed SYN in
        c.add(false, tcp(SERVER, CLIENT, 80, 40000, true, true)); // SYN-ACK out
        c.add(true, tcp(CLIENT, SERVER, 40000, 80, false, true)); // ACK in
        c.add(false, tcp(SERVER, CLIENT, 22, 40000, true, true)); // not a reply to anything
        let lines = c.run();
        assert_eq!(verdicts(&lines), want, "conntrack {conntrack}: {lines:?}");
        if conntrack {
            assert_eq!(lines[0].rule.as_deref(), Some("GatewayPolicy/web rule 0"));
            assert_eq!(lines[3].reason.as_deref(), Some("default_deny"));
        }
    }
}

#[test]
fn a_malformed_capture_is_an_error_naming_file_and_offset() {
    let c = Capture::new("bad", "allow", true);
    let ext = c.dir.join("ext.pcap");
    write(
        &ext,
        &[Packet {
            ts_ns: 1,
            data: vec![0; 60],
            wire_len: 60,
        }],
    )
    .unwrap();
    let mut bytes = std::fs::read(&ext).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&ext, bytes).unwrap();
    let int = c.dir.join("int.pcap");
    write(&int, &[]).unwrap();
    let (code, _, err) = portcullis(&[
        "replay",
        "--config",
        c.dir.join("gateway.yaml").to_str().unwrap(),
        "--ext",
        ext.to_str().unwrap(),
        "--int",
        int.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("ext.pcap: offset 40: truncated record"),
        "{err}"
    );
}
