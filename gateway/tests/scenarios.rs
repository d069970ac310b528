//! The policy scenarios in `configs/scenarios/`: each compiles, and gives the verdicts, reasons
//! and warnings its README entry promises, for the exact flows listed there.

use std::path::PathBuf;

use control::reload::load_and_compile;
use gateway::config::Config;
use policy::key::FlowKey;
use policy::rule::{DenyReason, Direction, Verdict};
use policy::table::Table;

fn scenario(name: &str) -> (Table, Vec<String>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../configs/scenarios/{name}/gateway.yaml"));
    let cfg = Config::load(&path).unwrap();
    let (_, rules, warnings) =
        load_and_compile(&cfg.policy_dir, &cfg.context).unwrap_or_else(|e| panic!("{name}: {e}"));
    (Table::build(rules, 1, 1), warnings)
}

const ALLOW: Verdict = Verdict::Allow;
const POLICY: Verdict = Verdict::Deny(DenyReason::Policy);
const DEFAULT: Verdict = Verdict::Deny(DenyReason::Default);
const NO_LOCAL: Verdict = Verdict::Deny(DenyReason::NoLocalEndpoint);
const NO_EP: Verdict = Verdict::Deny(DenyReason::NoEndpoints);

/// (source, destination, protocol, destination port or ICMP type, verdict, deciding object)
type Case<'a> = (&'a str, &'a str, u8, u16, Verdict, &'a str);

fn check(name: &str, cases: &[Case]) {
    let (table, _) = scenario(name);
    for (src, dst, proto, port, want, object) in cases {
        let key = if *proto == 1 {
            FlowKey::new(
                Direction::Ingress,
                src.parse().unwrap(),
                dst.parse().unwrap(),
                1,
                *port,
                0,
            )
        } else {
            FlowKey::new(
                Direction::Ingress,
                src.parse().unwrap(),
                dst.parse().unwrap(),
                *proto,
                40000,
                *port,
            )
        };
        let e = table.explain(&key);
        assert_eq!(e.verdict, *want, "{name}: {key}: {e:#?}");
        assert_eq!(
            table.reference_decision(&key),
            *want,
            "{name}: {key}: the reference scan disagrees"
        );
        let decided = &e.steps.last().unwrap().origin.object;
        assert!(
            decided.contains(object),
            "{name}: {key} decided by {decided}, expected {object}"
        );
    }
}

#[test]
fn nodeport_with_external_traffic_policy_cluster_and_local() {
    check(
        "nodeport-etp",
        &[
            (
                "198.51.100.7",
                "10.0.0.11",
                6,
                30080,
                ALLOW,
                "Service/shop/web-cluster",
            ),
            (
                "198.51.100.7",
                "10.0.0.12",
                6,
                30080,
                ALLOW,
                "Service/shop/web-cluster",
            ),
            (
                "198.51.100.200",
                "10.0.0.12",
                6,
                30080,
                POLICY,
                "Service/shop/web-cluster",
            ),
            (
                "203.0.113.5",
                "10.0.0.11",
                6,
                30080,
                POLICY,
                "Service/shop/web-cluster",
            ),
            (
                "203.0.113.5",
                "10.0.0.11",
                6,
                30090,
                ALLOW,
                "Service/shop/api-local",
            ),
            (
                "203.0.113.5",
                "10.0.0.12",
                6,
                30090,
                NO_LOCAL,
                "Service/shop/api-local",
            ),
            (
                "203.0.113.5",
                "10.0.0.11",
                17,
                30080,
                DEFAULT,
                "default/ingress",
            ),
            (
                "198.51.100.7",
                "10.0.0.11",
                6,
                22,
                DEFAULT,
                "default/ingress",
            ),
        ],
    );
    let (_, warnings) = scenario("nodeport-etp");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("SNAT pitfall") && w.contains("shop/web-cluster")),
        "{warnings:?}"
    );
    assert!(
        !warnings.iter().any(|w| w.contains("api-local")),
        "ETP Local preserves client IPs: {warnings:?}"
    );
}

#[test]
fn loadbalancer_and_no_endpoints() {
    check(
        "loadbalancer",
        &[
            (
                "198.51.100.7",
                "203.0.113.50",
                6,
                443,
                ALLOW,
                "Service/site/site",
            ),
            (
                "192.0.2.9",
                "203.0.113.50",
                6,
                443,
                POLICY,
                "Service/site/site",
            ),
            (
                "198.51.100.7",
                "10.0.0.11",
                6,
                31443,
                ALLOW,
                "Service/site/site",
            ),
            (
                "198.51.100.7",
                "203.0.113.51",
                6,
                80,
                NO_EP,
                "Service/site/legacy",
            ),
            (
                "198.51.100.7",
                "10.0.0.11",
                6,
                30800,
                NO_EP,
                "Service/site/legacy",
            ),
        ],
    );
}

#[test]
fn kubesphere_workspace_isolation() {
    check(
        "kubesphere-workspace",
        &[
            (
                "172.20.5.5",
                "10.0.0.11",
                6,
                30180,
                ALLOW,
                "Service/ws1-shop/shop",
            ),
            (
                "198.51.100.7",
                "10.0.0.11",
                6,
                30180,
                POLICY,
                "Service/ws1-shop/shop",
            ),
        ],
    );
}

#[test]
fn calico_global_network_policy_pre_dnat() {
    check(
        "calico-gnp",
        &[
            (
                "192.0.2.9",
                "10.0.0.21",
                6,
                30080,
                POLICY,
                "GlobalNetworkPolicy/edge-blocklist",
            ),
            (
                "198.51.100.7",
                "10.0.0.21",
                6,
                30080,
                ALLOW,
                "GlobalNetworkPolicy/edge-nodeports",
            ),
            (
                "203.0.113.9",
                "10.0.0.21",
                6,
                31999,
                DEFAULT,
                "default/ingress",
            ),
            (
                "203.0.113.9",
                "10.0.0.31",
                6,
                30080,
                DEFAULT,
                "default/ingress",
            ),
            (
                "203.0.113.9",
                "10.0.0.21",
                1,
                8,
                ALLOW,
                "GlobalNetworkPolicy/edge-nodeports",
            ),
        ],
    );
}

#[test]
fn kubevirt_vmi_behind_a_security_group() {
    check(
        "kubevirt-sg",
        &[
            (
                "172.30.1.1",
                "10.244.1.50",
                6,
                22,
                ALLOW,
                "SecurityGroup/vms/vm-ssh",
            ),
            ("198.51.100.7", "10.244.1.50", 6, 22, POLICY, "vm1"),
            ("172.30.1.1", "10.244.1.50", 6, 80, POLICY, "vm1"),
            (
                "172.30.1.1",
                "10.0.0.11",
                6,
                30022,
                ALLOW,
                "Service/vms/vm1-ssh",
            ),
            (
                "198.51.100.7",
                "10.0.0.11",
                6,
                30022,
                POLICY,
                "Service/vms/vm1-ssh",
            ),
        ],
    );
}
