//! Compiler regressions on Kubernetes and Calico objects, fed through the same entry point every
//! source uses (`add_object`).

mod common;

use policy::compile::GatewayContext;
use policy::key::FlowKey;
use policy::rule::{DenyReason, Direction, Verdict};
use policy::table::Table;

use common::{snapshot, table_with as table};

fn verdict(t: &Table, src: &str, dst: &str, proto: u8, dport: u16) -> Verdict {
    let k = FlowKey::new(
        Direction::Ingress,
        src.parse().unwrap(),
        dst.parse().unwrap(),
        proto,
        40000,
        dport,
    );
    let v = t.decide(&k).verdict;
    assert_eq!(
        v,
        t.reference_decision(&k),
        "{k}: classifier and reference disagree"
    );
    v
}

#[test]
fn calico_ip_version_restricts_the_family() {
    // A GlobalNetworkPolicy applies to endpoints (here one dual-stack pod), never to addresses
    // that are no endpoint.
    let t = table(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nstatus: {podIPs: [{ip: 10.0.0.1}, {ip: '2001:db8::2'}]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: v6-only}\nspec:\n  order: 1\n  ingress: [{action: Deny, ipVersion: 6}, {action: Allow, ipVersion: 4}]",
        GatewayContext::default(),
    );
    assert_eq!(verdict(&t, "192.0.2.1", "10.0.0.1", 6, 80), Verdict::Allow);
    assert_eq!(
        verdict(&t, "2001:db8::1", "2001:db8::2", 6, 80),
        Verdict::Deny(DenyReason::Policy)
    );
    assert_eq!(
        verdict(&t, "192.0.2.1", "10.0.0.9", 6, 80),
        Verdict::Deny(DenyReason::Default),
        "an address that is no endpoint gets no Calico verdict"
    );
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {app: x}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}\nstatus: {podIP: 10.244.0.5}";

#[test]
fn calico_default_deny_without_rules_denies_the_selected_workloads_only() {
    let docs = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: a}}\n---\n{POD}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: default-deny}}\nspec: {{selector: all(), types: [Ingress]}}\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nstatus: {{addresses: [{{type: InternalIP, address: 10.0.0.1}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: a}}\nspec: {{type: NodePort, ports: [{{port: 80, nodePort: 30080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: a, labels: {{kubernetes.io/service-name: s}}}}\nports: [{{port: 80}}]\nendpoints: [{{addresses: [10.244.0.5], nodeName: n1, targetRef: {{kind: Pod, name: p, namespace: a}}}}]"
    );
    let ctx = GatewayContext {
        pods_routable: true,
        default_ingress: Verdict::Allow,
        ..GatewayContext::default()
    };
    let t = table(&docs, ctx);
    assert_eq!(
        verdict(&t, "192.0.2.1", "10.244.0.5", 6, 80),
        Verdict::Deny(DenyReason::Policy),
        "end-of-tier deny on the workload"
    );
    assert_eq!(
        verdict(&t, "192.0.2.1", "10.0.0.1", 6, 30080),
        Verdict::Allow,
        "the NodePort frontend is not blackholed"
    );
}

#[test]
fn repeated_ports_and_shared_addresses_compile() {
    let gw = "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: twice}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [8080, 8080, \"8080:8080\"]}}]}";
    let vmi = "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {name: vm, namespace: a, labels: {app: x}}\nstatus: {interfaces: [{ipAddress: 10.244.0.5}]}";
    let sg = "apiVersion: portcullis.io/v1alpha1\nkind: SecurityGroup\nmetadata: {name: g, namespace: a}\nspec: {selector: {matchLabels: {app: x}}, ingress: [{from: [{cidr: 198.51.100.0/24}], ports: [{protocol: TCP, port: 22}]}]}";
    let lb = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: a}\nspec: {type: LoadBalancer, externalIPs: [203.0.113.9], ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.9}]}}";
    let docs = format!("{gw}\n---\n{POD}\n---\n{vmi}\n---\n{sg}\n---\n{lb}");
    let ctx = GatewayContext {
        pods_routable: true,
        ..GatewayContext::default()
    };
    let t = table(&docs, ctx);
    assert_eq!(
        verdict(&t, "198.51.100.7", "10.244.0.5", 6, 22),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&t, "192.0.2.7", "10.244.0.5", 6, 22),
        Verdict::Deny(DenyReason::Policy)
    );
    assert_eq!(
        verdict(&t, "192.0.2.7", "203.0.113.9", 6, 80),
        Verdict::Deny(DenyReason::NoEndpoints)
    );
    assert_eq!(
        verdict(&t, "192.0.2.7", "10.1.1.1", 6, 8080),
        Verdict::Allow
    );
}

#[test]
fn etp_local_falls_back_to_terminating_endpoints_per_node() {
    let docs = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.1}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n2}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.2}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n3}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.3}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: a, labels: {kubernetes.io/service-name: s}}\nports: [{port: 80}]\nendpoints:\n  - {addresses: [10.244.1.1], conditions: {ready: true}, nodeName: n1}\n  - {addresses: [10.244.2.1], conditions: {ready: false, serving: true, terminating: true}, nodeName: n2}\n  - {addresses: [10.244.3.1], conditions: {ready: false, serving: false, terminating: true}, nodeName: n3}";
    let t = table(docs, GatewayContext::default());
    assert_eq!(
        verdict(&t, "192.0.2.1", "10.0.0.1", 6, 30080),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&t, "192.0.2.1", "10.0.0.2", 6, 30080),
        Verdict::Allow,
        "n2 serves its terminating endpoint"
    );
    assert_eq!(
        verdict(&t, "192.0.2.1", "10.0.0.3", 6, 30080),
        Verdict::Deny(DenyReason::NoLocalEndpoint),
        "n3's endpoint is not serving"
    );
}
#[test]
fn pod_addresses_are_read_from_pod_ip_and_pod_ips() {
    let snap = snapshot(&format!(
        "{POD}\n---\n{}",
        POD.replace("name: p,", "name: q,").replace(
            "{podIP: 10.244.0.5}",
            "{podIP: 10.244.0.6, podIPs: [{ip: 10.244.0.6}, {ip: 'fd00::6'}]}"
        )
    ));
    let ips: Vec<String> = snap
        .workloads
        .iter()
        .flat_map(|w| w.object.ips.iter().map(|a| a.to_string()))
        .collect();
    assert_eq!(ips, ["10.244.0.5", "10.244.0.6", "fd00::6"]);
}
