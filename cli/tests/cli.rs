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
    assert_eq!(v["steps"][0]["origin"]["object"], "GatewayPolicy/deny-ssh");
}

#[test]
fn explain_reports_kubernetes_verdicts_and_batches_probes() {
    let cfg = "configs/scenarios/kubevirt-sg/gateway.yaml";
    let (code, out, err) = portcullis(&[
        "explain",
        "--config",
        cfg,
        "--src",
        "198.51.100.7",
        "--dst",
        "10.244.1.50",
        "--dport",
        "22",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("DENY (policy_deny)"), "{out}");
    assert!(
        out.contains(
            "kubernetes: 198.51.100.7 -> vms/vm1: ingress false, egress true, allowed false"
        ),
        "{out}"
    );

    let dir = std::env::temp_dir().join(format!("portcullis-probes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probes = dir.join("probes.jsonl");
    std::fs::write(
        &probes,
        "{\"src\": \"172.30.1.1\", \"dst\": \"10.0.0.11\", \"dport\": 30022}\n\n{\"src\": \"172.30.1.1\", \"dst\": \"10.244.1.50\", \"proto\": \"udp\", \"dport\": 53}\n{\"src\": \"nope\"}\n",
    )
    .unwrap();
    let (code, out, _) = portcullis(&[
        "explain",
        "--config",
        cfg,
        "--probes",
        probes.to_str().unwrap(),
    ]);
    assert_eq!(
        code, 1,
        "a bad probe line fails the run after the others were answered"
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["report"]["result"], "allow");
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[1]["report"]["result"], "policy_deny");
    assert_eq!(lines[1]["report"]["kubernetes"]["ingress_allowed"], false);
    assert!(lines[2]["error"]
        .as_str()
        .unwrap()
        .contains("invalid IP address"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_reports_invalid_objects_and_still_compiles_the_rest() {
    let dir = std::env::temp_dir().join(format!("portcullis-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {type: Balanced}\n---\napiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: ok}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan, namespace: x, labels: {kubernetes.io/service-name: gone}}\n",
    )
    .unwrap();
    let (code, out, err) = portcullis(&["check", "--policies", dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "a.yaml: document 0 (Service/x/s): spec.type: `Balanced` is not a Service type"
        ),
        "{err}"
    );
    assert!(
        out.contains("GatewayPolicy: 1") && out.contains("compiled rules: 3"),
        "{out}"
    );
    assert!(
        out.contains("unknown reference: EndpointSlice x/orphan"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
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
    // For log shippers: every line JSON, the error included. For files and journals (standard
    // error is not a terminal here): no colour codes.
    let (code, _, err) = portcullis(&[
        "--log-format",
        "json",
        "run",
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("burst: 9999 is out of range"))),
        "{err}"
    );
    assert!(!err.contains('\u{1b}'));

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

    let no_kubeconfig = dir.join("kube.yaml");
    std::fs::write(
        &no_kubeconfig,
        format!(
            "interfaces: {{ext: pcnone0, int: pcnone1}}\npolicy_dir: {}\nkubernetes: {{api: {{kubeconfig: nowhere/config}}}}\n",
            policies.display()
        ),
    )
    .unwrap();
    let (code, _, err) = portcullis(&["run", "--config", no_kubeconfig.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read the kubeconfig") && err.contains("nowhere/config"),
        "{err}"
    );

    // Live explain needs a running instance, and says so.
    let (code, _, err) = portcullis(&[
        "explain",
        "--admin",
        "/nonexistent/admin.sock",
        "--src",
        "10.0.0.1",
        "--dst",
        "10.0.0.2",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach a running portcullis at /nonexistent/admin.sock")
            && err.contains("no such socket"),
        "{err}"
    );
    // The admin API over TCP needs its token.
    let (code, _, err) = portcullis(&["stats", "--addr", "127.0.0.1:9"]);
    assert_eq!(code, 2);
    assert!(err.contains("--token-file"), "{err}");
    // `check` has no --addr at all (only `explain` asks a running instance).
    let (code, _, err) = portcullis(&["check", "--addr", "127.0.0.1:9"]);
    assert_eq!(code, 2);
    assert!(err.contains("unexpected argument '--addr'"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `check` and `explain` with a config that watches the API read one complete list from it (here
/// the test API server) and compile it with the policy directory, as `run` would.
#[test]
fn check_and_explain_read_the_kubernetes_api_when_configured() {
    let api = testkit::apiserver::ApiServer::start();
    let scenario =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/scenarios/nodeport-etp");
    for f in ["cluster.yaml", "netpol.yaml", "services.yaml"] {
        api.apply_yaml(&std::fs::read_to_string(scenario.join("policies").join(f)).unwrap());
    }
    api.apply(serde_json::json!({"apiVersion": "portcullis.io/v1alpha1", "kind": "GatewayPolicy",
        "metadata": {"name": "typo"},
        "spec": {"ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": ["eighty"]}}]}}));
    let dir = std::env::temp_dir().join(format!("portcullis-cli-kube-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("kubeconfig"), api.kubeconfig_yaml()).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        "interfaces: {ext: e0, int: i0}\npolicy_dir: policies\nkubernetes: {api: {kubeconfig: kubeconfig, startup_timeout_s: 3}}\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let (code, out, err) = portcullis(&["check", "--config", config]);
    assert_eq!(code, 1, "the malformed object makes check fail: {out}{err}");
    assert!(
        out.contains(&format!("+ Kubernetes API {}", api.url())),
        "{out}"
    );
    assert!(
        out.contains("Service: 2") && out.contains("Node: 2"),
        "{out}"
    );
    assert!(
        err.contains("GatewayPolicy.portcullis.io typo: spec.ingress[0].destination.ports[0]"),
        "{err}"
    );

    let (code, out, err) = portcullis(&[
        "explain",
        "--config",
        config,
        "--src",
        "198.51.100.7",
        "--dst",
        "10.0.0.12",
        "--dport",
        "30090",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("DENY (no_local_endpoint)"), "{out}");
    assert!(out.contains("origin:  api:Service/shop/api-local"), "{out}");

    let (code, out, _) = portcullis(&["check", "--config", config, "--files-only"]);
    assert_eq!(code, 0);
    assert!(!out.contains("Kubernetes API"), "{out}");

    api.go_down();
    let (code, _, err) = portcullis(&["check", "--config", config]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no complete list from the Kubernetes API"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_printing_command_stops_quietly_when_its_reader_goes_away() {
    // `portcullis check DIR | head -1`: the pipe closes after one line; the command must not
    // panic (exit 101) on the failed write, but end as a filter does (SIGPIPE).
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "check",
            "--policies",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lab/policies"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(status.code(), Some(101), "{err}");
}

#[test]
fn version_names_the_commit_and_build_date() {
    let (code, out, _) = portcullis(&["--version"]);
    assert_eq!(code, 0);
    let out = out.trim();
    assert!(out.starts_with("portcullis 0."), "{out}");
    let commit = out
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap();
    assert!(commit == "unknown" || commit.len() >= 12, "{out}");
    let date = out.split("built ").nth(1).unwrap().trim_end_matches(')');
    assert_eq!(date.len(), 10, "{out}");
    assert!(
        date.starts_with("20") && date.as_bytes()[4] == b'-',
        "{out}"
    );
}

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = portcullis(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("explain") && out.contains("conntrack"),
            "{shell}: {out}"
        );
    }
    let (code, out, err) = portcullis(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(".ie") || out.contains(".TH portcullis"),
        "{out}"
    );
    assert!(out.contains("explain"), "{out}");
}

#[test]
fn explain_icmp_flags_and_json_verdicts() {
    let base = [
        "explain",
        "--config",
        "configs/lab/gateway.yaml",
        "--src",
        "198.51.100.7",
        "--dst",
        "10.99.0.2",
    ];
    // --icmp-type alone means ICMP (ICMPv6 for IPv6 addresses), never a silently ignored flag.
    let (code, out, err) = portcullis(&[&base[..], &["--icmp-type", "8"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("icmp") && out.contains("type 8"), "{out}");
    let (code, _, err) = portcullis(&[&base[..], &["--icmp-type", "8", "--proto", "udp"]].concat());
    assert_eq!(code, 1);
    assert!(
        err.contains("--icmp-type needs --proto icmp or icmpv6"),
        "{err}"
    );
    // The JSON verdict is a word; `result` names the reason.
    let (code, out, err) = portcullis(&[&base[..], &["--dport", "22", "--json"]].concat());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["result"], "policy_deny");
    let (_, out, _) = portcullis(&[&base[..], &["--dport", "443", "--json"]].concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "allow");
    // Flags that make no sense together are refused.
    let (code, _, err) = portcullis(&[&base[..], &["--live"]].concat());
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = portcullis(&[&base[..], &["--admin", "/run/x.sock"]].concat());
    assert_eq!(code, 1);
    assert!(err.contains("give one or the other"), "{err}");
}

#[test]
fn object_errors_name_the_field_in_plain_words() {
    let dir = std::env::temp_dir().join(format!("portcullis-words-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "kind: GatewayPolicy\nmetadata: {name: x}\nspec: {}\n---\napiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: y}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [70000]}}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: true}]}]}\n",
    )
    .unwrap();
    let (code, _, err) = portcullis(&["check", "--policies", dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("(GatewayPolicy/x): apiVersion: missing (a GatewayPolicy needs one, e.g. portcullis.io/v1alpha1)"),
        "{err}"
    );
    assert!(
        err.contains(
            "destination.ports[0]: port must be 1-65535, a \"lo:hi\" range or a name, not 70000"
        ),
        "{err}"
    );
    assert!(err.contains("ports[0].port: "), "{err}");
    assert!(!err.contains("untagged enum"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An API server that refuses connections: a few lines that say so and what to check, not a
/// line per kind and retry, and the final error names the cause once.
#[test]
fn kubernetes_connection_errors_are_summarised_with_their_cause() {
    let dir = std::env::temp_dir().join(format!("portcullis-kbad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("kubeconfig"),
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\nusers: [{name: u, user: {token: abc}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.yaml"),
        "interfaces: {ext: e0, int: i0}\npolicy_dir: policies\nkubernetes: {api: {kubeconfig: kubeconfig, startup_timeout_s: 4}}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(dir.join("gateway.yaml"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() <= 6, "{} lines:\n{err}", lines.len());
    assert!(err.contains("connection refused"), "{err}");
    assert!(err.contains("server address"), "what to check: {err}");
    let last = lines.last().unwrap();
    assert_eq!(
        last.matches("connection refused").count(),
        1,
        "the cause once, with the kinds it stopped: {last}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
