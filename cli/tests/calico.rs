//! The shared Calico truth tables (`../shared/data/calico/vectors`) through the CLI, as an operator
//! would ask: each case's namespaces, pods and policies written as YAML into a policy directory,
//! every probe through `portcullis explain --policies DIR --probes FILE`.
//!
//! A probe expecting `allow` or `deny` must be decided by a rule of the Calico layer (the
//! deciding step is in the `gateway` layer). One expecting `none` (no policy applies) or `pass`
//! must fall through that layer to the next ones. Each case runs twice: policies as submitted,
//! and in the stored form the API server would keep (`types` filled in Calico's way).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/calico/vectors")
}

/// Calico's defaulting of `types` (api/pkg/defaults `defaultPolicyTypesField`): no egress rules
/// gives Ingress, egress rules only give Egress, both give both.
fn stored_form(mut p: Value) -> Value {
    let spec = &mut p["spec"];
    if spec.get("types").is_none() {
        let has = |k: &str| {
            spec.get(k)
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        };
        let types = match (has("ingress"), has("egress")) {
            (_, false) => json!(["Ingress"]),
            (false, true) => json!(["Egress"]),
            (true, true) => json!(["Ingress", "Egress"]),
        };
        spec["types"] = types;
    }
    p
}

/// Where field `f` sits in a case's probe rows.
fn column(case: &Value, f: &str) -> usize {
    case["probe_fields"]
        .as_array()
        .unwrap()
        .iter()
        .position(|x| x == f)
        .unwrap_or_else(|| panic!("no probe field {f}"))
}

fn pod(p: &Value) -> Value {
    let ips: Vec<Value> = p["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| json!({"ip": ip}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p["name"], "namespace": p["namespace"], "labels": p["labels"]},
        "spec": {"containers": [{"name": "main", "ports": p["ports"]}]},
        "status": {"phase": "Running", "podIP": ips[0]["ip"], "podIPs": ips},
    })
}

/// Writes one case as YAML objects and its probes as JSON lines.
fn write_case(case: &Value, dir: &Path, stored: bool) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let mut docs = Vec::new();
    for n in case["namespaces"].as_array().unwrap() {
        docs.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": n["name"], "labels": n["labels"]}}));
    }
    docs.extend(case["pods"].as_array().unwrap().iter().map(pod));
    for p in case["policies"].as_array().unwrap() {
        docs.push(if stored {
            stored_form(p.clone())
        } else {
            p.clone()
        });
    }
    if let Some(k) = case.get("k8s_policies").and_then(Value::as_array) {
        docs.extend(k.iter().cloned());
    }
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| serde_norway::to_string(d).unwrap())
        .collect();
    std::fs::write(dir.join("policies/objects.yaml"), yaml.join("---\n")).unwrap();
    let at = |p: &Value, f: &str| p[column(case, f)].clone();
    let mut lines = String::new();
    for p in case["probes"].as_array().unwrap() {
        let mut q = json!({"src": at(p, "src"), "dst": at(p, "dst"), "proto": at(p, "proto"),
            "dport": at(p, "dport"), "direction": at(p, "direction")});
        if !at(p, "icmp_type").is_null() {
            q["icmp_type"] = at(p, "icmp_type");
        }
        lines.push_str(&q.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("probes.jsonl"), lines).unwrap();
    dir.join("policies")
}

/// What the gateway made of a probe: `allow`/`deny` from the Calico layer, or `through` it.
fn outcome(report: &Value) -> &'static str {
    let last = report["steps"].as_array().and_then(|s| s.last());
    let layer = last.map(|s| s["layer"].as_str().unwrap_or(""));
    match (layer, report["verdict"].as_str()) {
        (Some("gateway"), Some("allow")) => "allow",
        (Some("gateway"), _) => "deny",
        _ => "through",
    }
}

fn expected(e: &str) -> &'static str {
    match e {
        "allow" => "allow",
        "deny" => "deny",
        "pass" | "none" => "through",
        other => panic!("unknown expected outcome {other}"),
    }
}

#[derive(Default)]
struct Tally {
    probes: usize,
    agree: usize,
    alternative: usize,
    wrong: Vec<String>,
}

fn run(stored: bool) -> Tally {
    let dir = data_dir();
    assert!(
        dir.is_dir(),
        "{} is missing: the shared test data must sit beside the repository",
        dir.display()
    );
    let work = std::env::temp_dir().join(format!(
        "portcullis-calico-{}-{}",
        std::process::id(),
        stored
    ));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 100, "{} cases", files.len());
    let mut t = Tally::default();
    for f in &files {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let id = case["case_id"].as_str().unwrap().to_string();
        let policies = write_case(&case, &work.join(&id), stored);
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["explain", "--policies"])
            .arg(&policies)
            .arg("--probes")
            .arg(work.join(&id).join("probes.jsonl"))
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{id}: explain failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            stdout.lines().take(3).collect::<Vec<_>>().join("\n")
        );
        let col = |f: &str| column(&case, f);
        let probes = case["probes"].as_array().unwrap();
        let reports: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(reports.len(), probes.len(), "{id}: one report per probe");
        for (p, r) in probes.iter().zip(&reports) {
            t.probes += 1;
            let got = outcome(&r["report"]);
            let want = expected(p[col("expected")].as_str().unwrap());
            if got == want {
                t.agree += 1;
                continue;
            }
            let alt = p[col("alternatives")]
                .as_object()
                .is_some_and(|a| a.values().any(|v| v.as_str().map(expected) == Some(got)));
            if alt {
                t.alternative += 1;
                continue;
            }
            t.wrong.push(format!(
                "{id}: {} -> {} {} {} {} ({}): expected {want} ({}), got {got} via {}",
                p[col("src")],
                p[col("dst")],
                p[col("proto")],
                p[col("dport")],
                p[col("direction")],
                p[col("class")],
                p[col("why")],
                r["report"]["steps"]
                    .as_array()
                    .and_then(|s| s.last())
                    .map(|s| s["origin"]["why"].to_string())
                    .unwrap_or_default()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    t
}

fn check(stored: bool) {
    let t = run(stored);
    eprintln!(
        "calico ({}): {} probes, {} agree, {} by a documented alternative reading, {} wrong",
        if stored {
            "stored form"
        } else {
            "as submitted"
        },
        t.probes,
        t.agree,
        t.alternative,
        t.wrong.len()
    );
    assert!(t.probes > 30_000);
    assert!(
        t.wrong.is_empty(),
        "{} of {} probes differ; the first:\n{}",
        t.wrong.len(),
        t.probes,
        t.wrong[..t.wrong.len().min(40)].join("\n")
    );
}

#[test]
fn every_calico_probe_as_submitted() {
    check(false);
}

#[test]
fn every_calico_probe_in_stored_form() {
    check(true);
}
