//! The benchmark's smoke test: gen -> gateway -> sink on AF_XDP sockets in a namespace lab, a few
//! seconds. Allowed packets all arrive (in order, per flow); denied ones do not.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lab::{GatewayProcess, Lab, LabGuard, CLIENT_MAC, CLIENT_V4, SERVER_MAC, SERVER_V4};

fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("portcullis");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

#[test]
#[ignore = "needs root (AF_XDP sockets, network namespaces): scripts/test runs it with --include-ignored"]
fn gen_through_the_gateway_to_the_sink() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the smoke test needs root (AF_XDP sockets, network namespaces); run it as root"
    );
    let bench = env!("CARGO_BIN_EXE_portcullis-bench");
    let prefix = format!("bs{:x}", std::process::id() % 0xfff);
    let lab = Lab::new(&prefix, 1).unwrap();
    let _ = lab.down();
    lab.up().unwrap();
    let _guard = LabGuard(lab.clone());
    let dir = std::env::temp_dir().join(format!("portcullis-smoke-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = dir.join("gateway.yaml");
    lab.write_config(
        &repo.join("configs/lab/gateway.yaml"),
        &repo.join("configs/lab/policies"),
        &config,
    )
    .unwrap();
    let mut gw = GatewayProcess::spawn(
        &lab,
        &gateway_binary(),
        &config,
        "127.0.0.1:9477".parse().unwrap(),
        &dir.join("gateway.log"),
    )
    .unwrap();
    gw.wait_ready(Duration::from_secs(20)).unwrap();

    let server_if = lab.server_if();
    let mut sink = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.server_ns(),
            bench,
            "sink",
            "--iface",
            &server_if,
            "--seconds",
            "6",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for "sink ready" (bounded), so no generated packet arrives before the socket.
    let stderr = sink.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("sink ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the sink did not become ready");

    let gen = |dport: &str, count: &str| -> serde_json::Value {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.client_ns(),
                bench,
                "gen",
                "--iface",
                &lab.client_if(),
            ])
            .args([
                "--src-mac",
                CLIENT_MAC,
                "--dst-mac",
                SERVER_MAC,
                "--src-ip",
                CLIENT_V4,
                "--dst-ip",
                SERVER_V4,
            ])
            .args([
                "--dport",
                dport,
                "--count",
                count,
                "--rate",
                "20000",
                "--seconds",
                "3",
                "--flows",
                "8",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let allowed = gen("53", "4000");
    let denied = gen("514", "2000");
    assert_eq!(allowed["sent"], 4000);
    assert_eq!(denied["sent"], 2000);

    let started = Instant::now();
    let status = loop {
        if let Some(s) = sink.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the sink did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut sink.stdout.take().unwrap(), &mut out).unwrap();
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("sink: {report}");
    assert_eq!(
        report["per_dport"]["53"], 4000,
        "every allowed packet arrives"
    );
    assert!(
        report["per_dport"].get("514").is_none(),
        "no denied packet arrives"
    );
    assert_eq!(report["flows"], 8);
    assert_eq!(report["reordered"], 0);
    assert_eq!(report["lost"], 0, "no gaps in any flow");
    assert_eq!(report["per_flow"].as_array().unwrap().len(), 8);
    let gw_status = gw.status().unwrap();
    let default_deny = gw_status
        .totals
        .drop_count(gateway::stats::Reason::DefaultDeny);
    assert!(
        default_deny >= 2000,
        "the gateway counted the denied packets: {default_deny}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
