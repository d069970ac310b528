//! Every probe of the shared NetworkPolicy truth tables (`../shared/data/netpol/vectors`), read
//! as it is: the engine must give the same ingress, egress and overall verdicts. Policies are
//! taken as submitted (`policies`), so our own API-server defaulting is exercised too; the stored
//! (defaulted) form must give the same answers.

use std::collections::BTreeMap;
use std::path::PathBuf;

use policy::k8s::{NamedPort, Namespace, NetworkPolicy, Workload, WorkloadKind};
use policy::netpol::{Cluster, End};
use serde_json::Value;

fn proto(s: &str) -> u8 {
    match s {
        "TCP" => 6,
        "UDP" => 17,
        "SCTP" => 132,
        other => panic!("unknown protocol {other}"),
    }
}

fn state(st: &Value, key: &str) -> (Vec<Namespace>, Vec<Workload>, Vec<NetworkPolicy>) {
    let namespaces = st["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| Namespace {
            name: n["name"].as_str().unwrap().into(),
            labels: serde_json::from_value::<BTreeMap<String, String>>(n["labels"].clone())
                .unwrap(),
        })
        .collect();
    let workloads = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Workload {
            kind: WorkloadKind::Pod,
            namespace: p["namespace"].as_str().unwrap().into(),
            name: p["name"].as_str().unwrap().into(),
            labels: serde_json::from_value(p["labels"].clone()).unwrap(),
            // One generated pod has the IP "0" (no usable address): it keeps its labels, so
            // selectors still match it, but no ipBlock can.
            ips: p["ip"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .into_iter()
                .collect(),
            node: None,
            ports: p["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| NamedPort {
                    name: c["name"].as_str().unwrap().into(),
                    port: c["containerPort"].as_u64().unwrap() as u16,
                    proto: proto(c["protocol"].as_str().unwrap()),
                })
                .collect(),
            service_account: Some("default".into()),
        })
        .collect();
    let policies = st[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let yaml: serde_norway::Value = serde_json::from_value(p.clone()).unwrap();
            NetworkPolicy::from_yaml(yaml)
                .unwrap_or_else(|e| panic!("{}: {e}", p["metadata"]["name"]))
        })
        .collect();
    (namespaces, workloads, policies)
}

#[test]
fn engine_agrees_with_every_probe() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/netpol/vectors");
    assert!(
        dir.is_dir(),
        "{} is missing: the shared test data must sit beside the repository",
        dir.display()
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 176,
        "expected the 176 shared cases, found {}",
        files.len()
    );
    let (mut probes, mut cases) = (0usize, 0usize);
    for f in &files {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        cases += 1;
        for st in case["steps"].as_array().unwrap() {
            let id = st["id"].as_str().unwrap();
            for key in ["policies", "policies_as_stored"] {
                let (namespaces, workloads, policies) = state(st, key);
                let cluster = Cluster {
                    namespaces: &namespaces,
                    workloads: &workloads,
                    policies: &policies,
                    security_groups: &[],
                };
                let end = |s: &str| -> End {
                    if s.contains('/') {
                        End::Workload(
                            cluster
                                .workload(s)
                                .unwrap_or_else(|| panic!("{id}: no pod {s}")),
                        )
                    } else {
                        End::External(s.parse().unwrap())
                    }
                };
                for p in st["probes"].as_array().unwrap() {
                    let (from, to) = (end(p[0].as_str().unwrap()), end(p[1].as_str().unwrap()));
                    let pr = proto(p[2].as_str().unwrap());
                    let port = p[3].as_u64().unwrap() as u16;
                    let ingress = match to {
                        End::Workload(w) => cluster.ingress_allowed(from, w, pr, port),
                        End::External(_) => true,
                    };
                    let egress = match from {
                        End::Workload(w) => cluster.egress_allowed(w, to, pr, port),
                        End::External(_) => true,
                    };
                    let want = (
                        p[5].as_bool().unwrap(),
                        p[6].as_bool().unwrap(),
                        p[7].as_bool().unwrap(),
                    );
                    assert_eq!(
                        (ingress, egress, ingress && egress),
                        want,
                        "{id} ({key}): probe {p}"
                    );
                    if key == "policies" {
                        probes += 1;
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases, {probes} probes agree");
    assert!(probes > 100_000, "only {probes} probes were checked");
}

/// With routable pods, the compiled table decides a pod's traffic toward an external address as
/// the truth tables' egress verdict says, for every such probe.
#[test]
fn compiled_egress_to_external_addresses_agrees_with_the_truth_tables() {
    use policy::compile::{compile, GatewayContext};
    use policy::key::FlowKey;
    use policy::rule::{DenyReason, Direction, Verdict};
    use policy::snapshot::{Located, Snapshot};
    use policy::table::Table;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/netpol/vectors");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let ctx = GatewayContext {
        pods_routable: true,
        default_egress: Verdict::Deny(DenyReason::Default),
        ..GatewayContext::default()
    };
    let (mut checked, mut allowed) = (0usize, 0usize);
    for f in &files {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        for st in case["steps"].as_array().unwrap() {
            let id = st["id"].as_str().unwrap();
            let (namespaces, workloads, policies) = state(st, "policies");
            let snap = Snapshot {
                namespaces: namespaces
                    .iter()
                    .cloned()
                    .map(|n| Located::new("t", n))
                    .collect(),
                workloads: workloads
                    .iter()
                    .cloned()
                    .map(|w| Located::new("t", w))
                    .collect(),
                network_policies: policies.into_iter().map(|p| Located::new("t", p)).collect(),
                ..Snapshot::default()
            };
            let compiled = compile(&snap, &ctx).unwrap_or_else(|e| panic!("{id}: {e}"));
            let table = Table::build(compiled.rules, 1, 1);
            for p in st["probes"].as_array().unwrap() {
                let (from, to) = (p[0].as_str().unwrap(), p[1].as_str().unwrap());
                let Ok(dst) = to.parse::<std::net::IpAddr>() else {
                    continue; // to a pod: not through the gateway's egress
                };
                let Some(pod) = workloads
                    .iter()
                    .find(|w| format!("{}/{}", w.namespace, w.name) == from)
                else {
                    continue; // from an external address
                };
                let Some(&src) = pod.ips.first() else {
                    continue; // the generated pod without a usable address
                };
                if src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                let key = FlowKey::new(
                    Direction::Egress,
                    src,
                    dst,
                    proto(p[2].as_str().unwrap()),
                    40000,
                    p[3].as_u64().unwrap() as u16,
                );
                let want = p[6].as_bool().unwrap();
                let got = table.decide(&key).verdict == Verdict::Allow;
                assert_eq!(
                    got,
                    want,
                    "{id}: probe {p}: {:?}",
                    table.explain(&key).steps
                );
                checked += 1;
                allowed += usize::from(got);
            }
        }
    }
    eprintln!("{checked} pod-to-external egress probes agree ({allowed} allowed)");
    assert!(checked > 1000, "only {checked} probes were checked");
}
