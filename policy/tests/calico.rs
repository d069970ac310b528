//! Calico semantics, case by case, each built from the Calico reference page it cites
//! (docs.tigera.io/calico/latest/reference/resources/...). Every verdict is checked against the
//! linear reference too.

mod common;

use policy::compile::{compile, GatewayContext, PolicyEngine};
use policy::key::FlowKey;
use policy::object::add_object;
use policy::rule::{DenyReason, Direction, Layer, Verdict};
use policy::snapshot::Snapshot;
use policy::table::Table;

const DENY: Verdict = Verdict::Deny(DenyReason::Policy);
/// Nothing in the Calico layer decided: the configured default (deny ingress, allow egress).
const DEFAULT_IN: Verdict = Verdict::Deny(DenyReason::Default);

use common::{snapshot, table_with};

fn table(docs: &str) -> Table {
    table_with(docs, GatewayContext::default())
}

/// The verdict and the layer that decided it.
fn decide(
    t: &Table,
    dir: Direction,
    src: &str,
    dst: &str,
    proto: u8,
    dport: u16,
) -> (Verdict, Layer) {
    let k = FlowKey::new(
        dir,
        src.parse().unwrap(),
        dst.parse().unwrap(),
        proto,
        40000,
        dport,
    );
    let e = t.explain(&k);
    assert_eq!(
        e.verdict,
        t.reference_decision(&k),
        "{k}: classifier and reference disagree"
    );
    (e.verdict, e.steps.last().unwrap().layer)
}

fn ingress(t: &Table, src: &str, dst: &str, proto: u8, dport: u16) -> Verdict {
    decide(t, Direction::Ingress, src, dst, proto, dport).0
}

fn egress(t: &Table, src: &str, dst: &str, proto: u8, dport: u16) -> Verdict {
    decide(t, Direction::Egress, src, dst, proto, dport).0
}

const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ops}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {serviceAccountName: frontend, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.244.1.10}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: shop, labels: {app: api}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 9000}]}]}\nstatus: {podIP: 10.244.1.11}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: mon, namespace: ops, labels: {app: mon}}\nstatus: {podIP: 10.244.2.10}";

fn with(extra: &str) -> String {
    format!("{CLUSTER}\n---\n{extra}")
}

/// Tier doc: "If the Tier applies to the endpoint, but takes no action on the packet the packet
/// is dropped", for egress as for ingress.
#[test]
fn egress_has_an_end_of_tier_deny() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: egress-dns}\nspec:\n  selector: app == 'web'\n  types: [Egress]\n  egress: [{action: Allow, protocol: UDP, destination: {ports: [53]}}]"));
    assert_eq!(
        egress(&t, "10.244.1.10", "192.0.2.53", 17, 53),
        Verdict::Allow
    );
    assert_eq!(
        egress(&t, "10.244.1.10", "192.0.2.80", 6, 443),
        DENY,
        "end of tier"
    );
    assert_eq!(
        egress(&t, "10.244.1.11", "192.0.2.80", 6, 443),
        Verdict::Allow,
        "a pod the policy does not select: the egress default"
    );
}

/// GlobalNetworkPolicy spec table: omitted types are inferred from the rules; egress rules only
/// give [Egress], which leaves ingress alone.
#[test]
fn types_are_inferred_calicos_way() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: out-only, namespace: shop}\nspec:\n  selector: all()\n  egress: [{action: Allow, protocol: TCP}]"));
    assert_eq!(ingress(&t, "192.0.2.1", "10.244.1.10", 6, 80), DEFAULT_IN);
    assert_eq!(
        decide(&t, Direction::Ingress, "192.0.2.1", "10.244.1.10", 6, 80).1,
        Layer::Default
    );
    assert_eq!(egress(&t, "10.244.1.10", "192.0.2.1", 17, 53), DENY);
}

/// Entity rule doc: a namespaceSelector alone matches only workload endpoints in the selected
/// namespaces; `global()` matches only non-namespaced endpoints, so never a pod.
#[test]
fn a_rule_namespace_selector_matches_pods_of_those_namespaces_only() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: from-team-a}\nspec:\n  order: 1\n  selector: app == 'mon'\n  ingress:\n  - {action: Allow, source: {namespaceSelector: team == 'a'}}\n  - {action: Allow, protocol: UDP, source: {namespaceSelector: global()}}"));
    assert_eq!(
        ingress(&t, "10.244.1.11", "10.244.2.10", 6, 80),
        Verdict::Allow
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.2.10", 6, 80),
        DENY,
        "the internet is no pod"
    );
    assert_eq!(
        ingress(&t, "10.244.1.11", "10.244.2.10", 17, 53),
        Verdict::Allow
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.2.10", 17, 53),
        DENY,
        "global() is no pod either"
    );
}

/// `order` doc: equal orders are "applied in alphanumerical order based on the Policy Name";
/// felix compares `name/namespace/kind`, whatever the kind.
#[test]
fn equal_orders_break_ties_by_name_not_kind() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: b-allow, namespace: shop}\nspec: {order: 5, selector: all(), ingress: [{action: Allow}]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: a-deny}\nspec: {order: 5, selector: all(), ingress: [{action: Deny}]}"));
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 80),
        DENY,
        "a-deny before b-allow"
    );
}

/// GlobalNetworkPolicy doc: it applies to workload and host endpoints, so `selector: all()` puts
/// no verdict on an address that is neither.
#[test]
fn all_selects_endpoints_not_addresses() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: allow-all}\nspec: {selector: all(), ingress: [{action: Allow}]}"));
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 80),
        Verdict::Allow
    );
    assert_eq!(ingress(&t, "192.0.2.1", "10.244.9.9", 6, 80), DEFAULT_IN);
}

/// Rule doc, ports: a named port is resolved per endpoint; each pod opens only its own number,
/// and an address that is no endpoint never matches a named port.
#[test]
fn named_ports_open_each_pods_own_number() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: http, namespace: shop}\nspec:\n  selector: all()\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [http]}}]\n  egress: [{action: Allow, destination: {ports: [http]}}]\n  types: [Ingress, Egress]"));
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 8080),
        Verdict::Allow
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 9000),
        DENY,
        "web's http is 8080"
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.11", 6, 9000),
        Verdict::Allow
    );
    assert_eq!(ingress(&t, "192.0.2.1", "10.244.1.11", 6, 8080), DENY);
    // Without a protocol the name matches its own (TCP here); an external address never.
    assert_eq!(
        egress(&t, "10.244.1.10", "10.244.1.11", 6, 9000),
        Verdict::Allow
    );
    assert_eq!(egress(&t, "10.244.1.10", "10.244.1.11", 17, 9000), DENY);
    assert_eq!(egress(&t, "10.244.1.10", "192.0.2.1", 6, 8080), DENY);
}

/// Calico's labels doc: `projectcalico.org/namespace` and `projectcalico.org/orchestrator` on
/// every workload; the recommended global default deny, as written in Calico's docs, selects
/// the pods outside the system namespaces.
#[test]
fn automatic_labels_make_calicos_default_deny_work() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: default-deny}\nspec:\n  selector: projectcalico.org/namespace not in {'kube-system', 'calico-system', 'calico-apiserver'}\n  types: [Ingress, Egress]\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: ops-by-name}\nspec:\n  order: 1\n  selector: projectcalico.org/orchestrator == 'k8s'\n  ingress: [{action: Allow, source: {namespaceSelector: projectcalico.org/name == 'ops'}}]"));
    assert_eq!(ingress(&t, "192.0.2.1", "10.244.1.10", 6, 80), DENY);
    assert_eq!(egress(&t, "10.244.1.10", "192.0.2.1", 6, 80), DENY);
    assert_eq!(
        ingress(&t, "10.244.2.10", "10.244.1.10", 6, 80),
        Verdict::Allow
    );
}

/// GlobalNetworkSet doc: labelled CIDRs that rule selectors match; a blocklist by label.
/// NetworkSet doc: a namespaced set is visible to the policies of its namespace.
#[test]
fn network_sets_are_matched_by_label_and_scoped() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: threats, labels: {feed: bad}}\nspec: {nets: [198.51.100.0/24, '2001:db8:bad::/48']}\n---\napiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: partners, namespace: shop, labels: {kind: partner}}\nspec: {nets: [203.0.113.0/24]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: blocklist}\nspec:\n  order: 1\n  selector: all()\n  types: [Ingress]\n  ingress: [{action: Deny, source: {selector: feed == 'bad'}}, {action: Pass}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: partners, namespace: shop}\nspec:\n  order: 2\n  selector: all()\n  ingress: [{action: Allow, source: {selector: kind == 'partner'}}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: partners, namespace: ops}\nspec:\n  order: 2\n  selector: all()\n  ingress: [{action: Allow, source: {selector: kind == 'partner'}}]"));
    assert_eq!(
        ingress(&t, "198.51.100.9", "10.244.1.10", 6, 80),
        DENY,
        "blocklisted"
    );
    assert_eq!(
        decide(&t, Direction::Ingress, "203.0.113.9", "10.244.1.10", 6, 80),
        (DEFAULT_IN, Layer::Default),
        "the blocklist's Pass skips the rest of the tier (the partners policy too): the profile"
    );
    let t2 = table(&with("apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: partners, namespace: shop, labels: {kind: partner}}\nspec: {nets: [203.0.113.0/24]}\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: partners, namespace: shop}\nspec:\n  selector: all()\n  ingress: [{action: Allow, source: {selector: kind == 'partner'}}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: partners, namespace: ops}\nspec:\n  selector: all()\n  ingress: [{action: Allow, source: {selector: kind == 'partner'}}]"));
    assert_eq!(
        ingress(&t2, "203.0.113.9", "10.244.1.10", 6, 80),
        Verdict::Allow
    );
    assert_eq!(
        ingress(&t2, "203.0.113.9", "10.244.2.10", 6, 80),
        DENY,
        "another namespace's set"
    );
}

/// Calico's Kubernetes policy conversion: with Calico as the engine, a NetworkPolicy is a
/// default-tier policy at order 1000; a GNP default-deny without `order` comes after it, and a
/// `Pass` earlier in the tier skips it.
#[test]
fn kubernetes_network_policies_join_the_default_tier_under_calico() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 192.0.2.0/24}}], ports: [{port: 8080}]}]";
    let gnp = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: default-deny}\nspec: {selector: all(), types: [Ingress]}";
    let t = table(&with(&format!("{np}\n---\n{gnp}")));
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 8080),
        Verdict::Allow
    );
    assert_eq!(
        decide(&t, Direction::Ingress, "192.0.2.1", "10.244.1.10", 6, 8080).1,
        Layer::Gateway
    );
    assert_eq!(ingress(&t, "198.51.100.1", "10.244.1.10", 6, 8080), DENY);
    let pass = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: trusted}\nspec: {order: 10, selector: all(), ingress: [{action: Pass, source: {nets: [198.51.100.0/24]}}]}";
    let t = table(&with(&format!("{np}\n---\n{gnp}\n---\n{pass}")));
    let (v, layer) = decide(
        &t,
        Direction::Ingress,
        "198.51.100.1",
        "10.244.1.10",
        6,
        8080,
    );
    assert_eq!(
        (v, layer),
        (DEFAULT_IN, Layer::Default),
        "Pass skips the NetworkPolicy and the end of tier"
    );
    // Without Calico the same NetworkPolicy keeps Kubernetes semantics in its own layer.
    let k8s = GatewayContext {
        policy_engine: PolicyEngine::Kubernetes,
        pods_routable: true,
        ..GatewayContext::default()
    };
    let t = table_with(&with(np), k8s);
    let (v, layer) = decide(&t, Direction::Ingress, "192.0.2.1", "10.244.1.10", 6, 8080);
    assert_eq!((v, layer), (Verdict::Allow, Layer::Kubernetes));
}

/// Tier doc: tiers run by `order`; Pass goes to the next tier; `defaultAction: Pass` ends a tier
/// without a drop; the default tier comes last among the ordered ones.
#[test]
fn tiers_run_in_order_with_pass_and_default_actions() {
    let docs = with("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: platform}\nspec: {order: 200, defaultAction: Pass}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: security.block}\nspec:\n  tier: security\n  selector: all()\n  ingress: [{action: Deny, source: {nets: [198.51.100.0/24]}}, {action: Pass}]\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: platform.web}\nspec:\n  tier: platform\n  selector: app == 'web'\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [443]}}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: app, namespace: shop}\nspec:\n  selector: all()\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [8080]}}]");
    let t = table(&docs);
    assert_eq!(
        ingress(&t, "198.51.100.1", "10.244.1.10", 6, 443),
        DENY,
        "the first tier denies"
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 443),
        Verdict::Allow,
        "passed on, the platform tier allows"
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 8080),
        Verdict::Allow,
        "platform ends in Pass, the default tier allows"
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 22),
        DENY,
        "the default tier's end"
    );
    // A tier ending in Deny (security, had its Pass rule gone) stops a flow its policies apply to.
    let strict = docs.replace(", {action: Pass}]", "]");
    let t = table(&strict);
    assert_eq!(ingress(&t, "192.0.2.1", "10.244.1.10", 6, 443), DENY);
    // The default tier may not end in Pass.
    let mut snap = Snapshot::default();
    let e = add_object(serde_norway::from_str("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: default}\nspec: {defaultAction: Pass}").unwrap(), "t", &mut snap).unwrap_err();
    assert!(e.to_string().contains("spec.defaultAction"), "{e}");
}

/// HostEndpoint and preDNAT docs: a preDNAT GlobalNetworkPolicy sees a host endpoint's traffic
/// before DNAT (the node address and the NodePort); it has no end-of-tier drop.
#[test]
fn host_endpoints_with_pre_dnat_policy() {
    let docs = with("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: edge1-eth0, labels: {role: edge}}\nspec: {node: edge1, interfaceName: eth0, expectedIPs: [10.0.0.21]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: nodeport-clients}\nspec:\n  order: 10\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'edge'\n  ingress:\n  - {action: Deny, source: {nets: [198.51.100.0/24]}, destination: {ports: ['30000:32767']}, protocol: TCP}\n  - {action: Allow, source: {nets: [192.0.2.0/24]}, destination: {ports: ['30000:32767']}, protocol: TCP}");
    let t = table(&docs);
    assert_eq!(ingress(&t, "198.51.100.1", "10.0.0.21", 6, 30080), DENY);
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.0.0.21", 6, 30080),
        Verdict::Allow
    );
    assert_eq!(
        ingress(&t, "203.0.113.1", "10.0.0.21", 6, 30080),
        DEFAULT_IN,
        "no end of tier for preDNAT"
    );
    assert_eq!(
        ingress(&t, "198.51.100.1", "10.0.0.22", 6, 30080),
        DENY,
        "an address that is no host endpoint's arrives on the edge's interface too"
    );
    // preDNAT needs applyOnForward, and has no egress.
    let mut snap = Snapshot::default();
    let e = add_object(serde_norway::from_str("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: {preDNAT: true, selector: all(), ingress: [{action: Deny}]}").unwrap(), "t", &mut snap).unwrap_err();
    assert!(e.to_string().contains("applyOnForward"), "{e}");
}

/// Rule doc: notProtocol, notICMP, notSelector, serviceAccounts, and the policy's
/// serviceAccountSelector.
#[test]
fn negations_and_service_accounts() {
    let docs = with("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: frontend, namespace: shop, labels: {tier: front}}\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: rules, namespace: shop}\nspec:\n  order: 1\n  selector: app == 'api'\n  ingress:\n  - {action: Deny, notProtocol: TCP, source: {nets: [192.0.2.0/24]}}\n  - {action: Allow, protocol: ICMP, notICMP: {type: 8}}\n  - {action: Allow, source: {serviceAccounts: {names: [frontend]}}}\n  - {action: Allow, protocol: TCP, source: {notSelector: app == 'web'}}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: front-sa}\nspec:\n  order: 2\n  serviceAccountSelector: tier == 'front'\n  egress: [{action: Deny, protocol: UDP}]");
    let t = table(&docs);
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.11", 17, 53),
        DENY,
        "not TCP: denied"
    );
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.11", 6, 80),
        DENY,
        "TCP skips the deny, but notSelector needs a pod of the namespace"
    );
    assert_eq!(
        ingress(&t, "10.244.1.11", "10.244.1.11", 6, 80),
        Verdict::Allow,
        "a pod of the namespace that is not web"
    );
    let icmp = |t: &Table, ty: u16| {
        let k = FlowKey::new(
            Direction::Ingress,
            "198.51.100.1".parse().unwrap(),
            "10.244.1.11".parse().unwrap(),
            1,
            ty,
            0,
        );
        assert_eq!(t.decide(&k).verdict, t.reference_decision(&k));
        t.decide(&k).verdict
    };
    assert_eq!(icmp(&t, 8), DENY, "echo request is the notICMP type");
    assert_eq!(
        icmp(&t, 0),
        Verdict::Allow,
        "echo reply (type 0) is allowed"
    );
    assert_eq!(
        ingress(&t, "10.244.1.10", "10.244.1.11", 17, 53),
        Verdict::Allow,
        "web runs as frontend"
    );
    assert_eq!(ingress(&t, "10.244.2.10", "10.244.1.11", 17, 53), DENY);
    // notSelector in a namespaced policy: endpoints of the namespace, less the selected.
    assert_eq!(
        ingress(&t, "10.244.1.10", "10.244.1.11", 6, 80),
        Verdict::Allow,
        "serviceAccounts rule first"
    );
    assert_eq!(
        ingress(&t, "10.244.2.10", "10.244.1.11", 6, 80),
        DENY,
        "another namespace"
    );
    // serviceAccountSelector: only the pods running as a `tier: front` account.
    assert_eq!(egress(&t, "10.244.1.10", "192.0.2.1", 17, 53), DENY);
    assert_eq!(
        egress(&t, "10.244.1.11", "192.0.2.1", 17, 53),
        Verdict::Allow
    );
}

/// Rule doc, `services`: a destination Service matches its endpoints' addresses and ports; a
/// source Service its endpoints' addresses.
#[test]
fn services_match_their_endpoints() {
    let docs = with("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80, targetPort: 9000}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}\nports: [{port: 9000, protocol: TCP}]\nendpoints: [{addresses: [10.244.1.11]}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: to-api, namespace: shop}\nspec:\n  selector: app == 'web'\n  types: [Egress]\n  egress: [{action: Allow, destination: {services: {name: api}}}]");
    let t = table(&docs);
    assert_eq!(
        egress(&t, "10.244.1.10", "10.244.1.11", 6, 9000),
        Verdict::Allow
    );
    assert_eq!(egress(&t, "10.244.1.10", "10.244.1.11", 6, 80), DENY);
    assert_eq!(egress(&t, "10.244.1.10", "192.0.2.1", 6, 9000), DENY);
}

/// What Calico accepts is accepted (a named port without protocol, UDPLite); what the gateway
/// cannot enforce is refused with the field named.
#[test]
fn accepted_and_refused_fields() {
    let ok = |y: &str| {
        let mut snap = Snapshot::default();
        add_object(serde_norway::from_str(y).unwrap(), "t", &mut snap)
    };
    ok("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: {ingress: [{action: Allow, destination: {ports: [http]}}, {action: Allow, protocol: UDPLite, destination: {ports: [5000]}}]}").unwrap();
    let e = ok("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: {ingress: [{action: Allow, http: {methods: [GET]}}]}").unwrap_err();
    assert!(e.to_string().contains("spec.ingress[0].http"), "{e}");
    let e = ok("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: x}\nspec: {allowedEgressDomains: [example.com]}").unwrap_err();
    assert!(e.to_string().contains("spec.allowedEgressDomains"), "{e}");
}

/// A threat feed of 100,000 CIDRs in one GlobalNetworkSet, selected by one Deny rule: the set is
/// one source dimension of that rule, not 100,000 rules.
#[test]
fn a_network_set_of_100000_cidrs_compiles_as_one_rule() {
    let nets: Vec<String> = (0..100_000u32)
        .map(|i| {
            let a = 0x2c00_0000u32 + i * 256;
            format!("{}.{}.{}.0/24", a >> 24, (a >> 16) & 255, (a >> 8) & 255)
        })
        .collect();
    let docs = with(&format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: feed, labels: {{feed: threat}}}}\nspec: {{nets: [{}]}}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: feed}}\nspec:\n  order: 1\n  selector: all()\n  ingress: [{{action: Deny, source: {{selector: feed == 'threat'}}}}, {{action: Pass}}]", nets.join(", ")));
    let snap = snapshot(&docs);
    // The set costs its own size in atoms, not its size times the endpoints: a per-object
    // budget just above 100,000 (the default) is enough, whatever the number of pods.
    let ctx = GatewayContext {
        budget: policy::compile::Budget {
            atoms_per_object: 110_000,
            atoms_per_table: 1_000_000,
        },
        ..GatewayContext::default()
    };
    let started = std::time::Instant::now();
    let c = compile(&snap, &ctx).unwrap();
    let compiled = started.elapsed();
    let c_rejected = c.rejected.clone();
    let rules = c
        .rules
        .rules()
        .iter()
        .filter(|r| r.origin.object == "GlobalNetworkPolicy/feed")
        .count();
    let t = Table::build(c.rules, 1, 1);
    eprintln!(
        "100,000-CIDR network set: compile {:?}, table build {:?}, table memory {} KiB, {} rules from the policy",
        compiled,
        t.build_time(),
        t.memory_bytes() / 1024,
        rules
    );
    assert!(rules <= 6, "{rules} rules: the set must stay one dimension");
    assert!(c_rejected.is_empty(), "{c_rejected:?}");
    assert_eq!(ingress(&t, "44.0.0.9", "10.244.1.10", 6, 80), DENY);
    assert_eq!(ingress(&t, "44.134.159.1", "10.244.1.10", 6, 80), DENY);
    assert_eq!(ingress(&t, "46.0.0.1", "10.244.1.10", 6, 80), DEFAULT_IN);
    assert_eq!(
        ingress(&t, "44.0.0.9", "10.244.9.9", 6, 80),
        DEFAULT_IN,
        "an address that is no endpoint: the guard skips the rule"
    );
}

/// `check` warns when a Calico workload policy decides on client addresses for the backends of
/// a Cluster-policy NodePort Service: SNAT replaces the client with the node there.
#[test]
fn check_warns_about_client_address_policy_behind_snat() {
    let docs = with("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {type: NodePort, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\nports: [{port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.244.1.10]}]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: clients, namespace: shop}\nspec:\n  selector: app == 'web'\n  ingress: [{action: Allow, source: {nets: [192.0.2.0/24]}}]");
    let c = compile(&snapshot(&docs), &GatewayContext::default()).unwrap();
    assert!(
        c.warnings.iter().any(
            |w| w.starts_with("SNAT pitfall: CalicoNetworkPolicy/shop/clients")
                && w.contains("Service shop/web")
                && w.contains("preDNAT")
        ),
        "{:#?}",
        c.warnings
    );
    // With a preDNAT policy instead, nothing to warn about.
    let pre = docs.replace(
        "kind: NetworkPolicy\nmetadata: {name: clients, namespace: shop}\nspec:\n  selector: app == 'web'",
        "kind: GlobalNetworkPolicy\nmetadata: {name: clients}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: all()",
    );
    let c = compile(&snapshot(&pre), &GatewayContext::default()).unwrap();
    assert!(
        !c.warnings.iter().any(|w| w.starts_with("SNAT pitfall")),
        "{:#?}",
        c.warnings
    );
}

/// A GatewayPolicy's Pass goes on to Calico's tiers: it never skips a Calico end of tier.
#[test]
fn a_gateway_policy_pass_does_not_skip_calico() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: egress-lockdown}\nspec: {order: 10, selector: all(), types: [Egress], egress: [{action: Allow, destination: {nets: [192.0.2.0/24]}}]}\n---\napiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: partner}\nspec: {priority: 100, egress: [{action: Pass, destination: {nets: [198.51.100.0/24]}}]}"));
    assert_eq!(egress(&t, "10.244.1.10", "198.51.100.7", 6, 443), DENY);
    assert_eq!(
        egress(&t, "10.244.1.10", "192.0.2.7", 6, 443),
        Verdict::Allow
    );
}

/// A Calico Pass concerns Calico's tiers only: the GatewayPolicies (the edge's own client-CIDR
/// denies) run before them and are never skipped.
#[test]
fn a_calico_pass_does_not_skip_gateway_policies() {
    let t = table(&with("apiVersion: v1\nkind: Node\nmetadata: {name: edge1, labels: {role: edge}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.21}]}\n---\napiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: block-bad-clients}\nspec: {priority: 100, ingress: [{action: Deny, source: {nets: [203.0.113.0/24]}}]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: pass-nodeports}\nspec: {order: 10, preDNAT: true, applyOnForward: true, selector: role == 'edge', ingress: [{action: Pass, protocol: TCP, destination: {ports: ['30000:32767']}}]}"));
    assert_eq!(ingress(&t, "203.0.113.5", "10.0.0.21", 6, 30080), DENY);
}

/// HostEndpoint doc: preDNAT policy applies to everything arriving on the host endpoint's
/// interface, so a LoadBalancer IP (no node's address) is covered; another node's address is
/// that node's endpoint's business.
#[test]
fn pre_dnat_policy_covers_loadbalancer_addresses() {
    let t = table(&with("apiVersion: v1\nkind: Node\nmetadata: {name: edge1, labels: {role: edge}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.21}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: worker1, labels: {role: worker}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.31}]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: edge}\nspec:\n  order: 20\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'edge'\n  ingress:\n  - {action: Allow, source: {nets: [10.0.0.0/8]}}\n  - {action: Deny, protocol: TCP, destination: {nets: [192.0.2.50/32], ports: [80]}}"));
    assert_eq!(ingress(&t, "203.0.113.5", "192.0.2.50", 6, 80), DENY);
    assert_eq!(ingress(&t, "10.1.1.1", "192.0.2.50", 6, 80), Verdict::Allow);
    assert_eq!(
        ingress(&t, "203.0.113.5", "10.0.0.31", 6, 80),
        DEFAULT_IN,
        "the worker's address"
    );
}

/// notPorts are guards, so 50 ports and 50 notPorts on each side stay linear.
#[test]
fn many_ports_and_not_ports_stay_linear() {
    let ports: Vec<String> = (1..=50).map(|i| format!("'{i}:65535'")).collect();
    let holes: Vec<String> = (1..=50).map(|i| (i * 1000 + 1).to_string()).collect();
    let side = format!(
        "{{ports: [{}], notPorts: [{}]}}",
        ports.join(", "),
        holes.join(", ")
    );
    let docs = with(&format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: wide}}\nspec:\n  selector: all()\n  ingress: [{{action: Deny, protocol: TCP, source: {side}, destination: {side}}}, {{action: Allow}}]"));
    let started = std::time::Instant::now();
    let c = compile(&snapshot(&docs), &GatewayContext::default()).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(c.rules.len() < 5000, "{} rules", c.rules.len());
    let t = Table::build(c.rules, 1, 1);
    assert_eq!(ingress(&t, "192.0.2.1", "10.244.1.10", 6, 80), DENY);
    assert_eq!(
        ingress(&t, "192.0.2.1", "10.244.1.10", 6, 2001),
        Verdict::Allow,
        "a notPorts hole"
    );
}

/// rules.go: a rule namespaceSelector is evaluated over the `pcns.` labels every endpoint
/// inherits, so a negated one also matches endpoints in no namespace (global network sets).
#[test]
fn a_negated_namespace_selector_matches_global_network_sets() {
    let t = table(&with("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: scanners}\nspec: {nets: [198.51.100.0/24]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec: {order: 10, selector: app == 'web', ingress: [{action: Deny, source: {namespaceSelector: '!has(trusted)'}}, {action: Allow}]}"));
    assert_eq!(ingress(&t, "198.51.100.7", "10.244.1.10", 6, 8080), DENY);
    assert_eq!(
        ingress(&t, "203.0.113.7", "10.244.1.10", 6, 8080),
        Verdict::Allow
    );
}

/// The same Calico object twice (a stale file beside the live one) is refused, not merged.
#[test]
fn duplicate_calico_objects_are_refused() {
    let p = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: web-ingress}\nspec: {order: 10, selector: all(), ingress: [{action: Allow}]}";
    let e = compile(
        &snapshot(&with(&format!("{p}\n---\n{p}"))),
        &GatewayContext::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("GlobalNetworkPolicy/web-ingress` is defined twice"),
        "{e}"
    );
}
