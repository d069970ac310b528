//! The `portcullis` binary's non-datapath commands: check, explain, and start-up errors.

use std::path::PathBuf;
use std::process::Command;

fn portcullis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_summarises_the_lab_policies() {
    let (code, out, err) = portcullis(&["check", "--config", "configs/lab/gateway.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("GatewayPolicy: 3"), "{out}");
    assert!(out.contains("compiled rules: 11"), "{out}");
    assert!(
        out.contains("classifier build:") && out.contains("table memory:"),
        "{out}"
    );
    assert!(out.contains("warnings: none"), "{out}");
}

#[test]
fn explain_names_rule_origin_and_reason() {
    let base = [
        "explain",
        "--config",
        "configs/lab/gateway.yaml",
        "--src",
        "198.51.100.7",
        "--dst",
        "10.99.0.2",
        "--proto",
        "tcp",
    ];
    let (code, out, err) = portcullis(&[&base[..], &["--dport", "22"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("verdict: DENY (policy_deny)"), "{out}");
    assert!(out.contains("GatewayPolicy/deny-ssh rule 0"), "{out}");
    assert!(
        out.contains("10-deny-ssh.yaml#0"),
        "origin names the file and document: {out}"
    );
    assert!(out.contains("no SSH from outside the edge"), "{out}");

    let (_, out, _) = portcullis(&[&base[..], &["--dport", "443"]].concat());
    assert!(
        out.contains("verdict: ALLOW") && out.contains("GatewayPolicy/allow-web"),
        "{out}"
    );
    let (_, out, _) = portcullis(&[&base[..], &["--dport", "8080"]].concat());
    assert!(
        out.contains("DENY (default_deny)") && out.contains("default/ingress"),
        "{out}"
    );
    // The excepted client range does not get the web allow.
    let (_, out, _) = portcullis(&[
        "explain",
        "--config",
        "configs/lab/gateway.yaml",
        "--src",
        "203.0.113.9",
        "--dst",
        "10.99.0.2",
        "--dport",
        "80",
    ]);
    assert!(out.contains("DENY (default_deny)"), "{out}");
    // Egress is the stateless reply rule.
    let (_, out, _) = portcullis(&[
        "explain",
        "--config",
        "configs/lab/gateway.yaml",
        "--direction",
        "egress",
        "--src",
        "10.99.0.2",
        "--sport",
        "80",
        "--dst",
        "198.51.100.7",
        "--dport",
        "40000",
    ]);
    assert!(
        out.contains("verdict: ALLOW") && out.contains("default/egress"),
        "{out}"
    );
    // ICMPv6 neighbour solicitation hits the failsafe.
    let (_, out, _) = portcullis(&[
        "explain",
        "--config",
        "configs/lab/gateway.yaml",
        "--src",
        "fd99::1",
        "--dst",
        "ff02::1:ff00:2",
        "--proto",
        "icmpv6",
        "--icmp-type",
        "135",
    ]);
    assert!(
        out.contains("verdict: ALLOW") && out.contains("config/failsafe rule 2"),
        "{out}"
    );
    let (_, out, _) = portcullis(&[&base[..], &["--dport", "22", "--json"]].concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["explanation"]["steps"][0]["origin"]["object"],
        "GatewayPolicy/deny-ssh"
    );
}

#[test]
fn startup_errors_say_what_to_fix() {
    let dir = std::env::temp_dir().join(format!("portcullis-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "interfaces: {ext: a0, int: b0}\npolicy_dir: x\nburst: 9999\n",
    )
    .unwrap();
    let (code, _, err) = portcullis(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.yaml: burst: 9999 is out of range"),
        "{err}"
    );

    let missing_if = dir.join("missing.yaml");
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/lab/policies");
    std::fs::write(
        &missing_if,
        format!(
            "interfaces: {{ext: pcnone0, int: pcnone1}}\npolicy_dir: {}\n",
            policies.display()
        ),
    )
    .unwrap();
    let (code, _, err) = portcullis(&["run", "--config", missing_if.to_str().unwrap()]);
    assert_eq!(code, 1);
    if nix::unistd::geteuid().is_root() {
        assert!(
            err.contains("interface `pcnone0` (interfaces.ext in")
                && err.contains("does not exist"),
            "{err}"
        );
    } else {
        assert!(err.contains("missing privileges"), "{err}");
    }
    let (code, _, err) = portcullis(&["check", "--policies", "/nonexistent/dir"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read the policy directory"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
