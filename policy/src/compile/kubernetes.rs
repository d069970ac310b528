//! The Kubernetes layer (DESIGN §6.2): Service frontends and, when pods are routable, pod IPs.
//!
//! For each frontend (a NodePort on a node's addresses, a LoadBalancer ingress IP, an external
//! IP) the backends are the ready endpoints of the Service's EndpointSlices (or, when none is
//! ready, the serving-but-terminating ones, as kube-proxy does), each on its target port as the
//! slice resolved it. A client is admitted at a frontend when *every* backend that may serve it
//! admits it, because kube-proxy picks the backend after the gateway. With
//! externalTrafficPolicy Local, NodePort traffic to node N may only be served by N's own
//! endpoints, and is dropped early (`no_local_endpoint`) when N has none.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::GatewayContext;
use crate::k8s::{Endpoint, Service, ServicePort, Workload};
use crate::netpol::{Admitted, Cluster};
use crate::rule::{
    Action, AddrSet, DenyReason, Direction, Layer, Match, Origin, PortRange, Prefix, PrefixSet,
    Rule, Verdict,
};
use crate::snapshot::{Located, Snapshot};

struct Frontend<'a> {
    what: String,
    addrs: Vec<IpAddr>,
    port: u16,
    backends: Vec<(&'a Endpoint, u16)>,
    local_node: Option<&'a str>,
    node_port: bool,
}

fn hosts(addrs: &[IpAddr]) -> AddrSet {
    AddrSet {
        include: addrs.iter().map(|a| Prefix::host(*a)).collect(),
        except: Vec::new(),
    }
}

/// Emits the layer's rules: Service frontends, and with routable pods, each pod's ingress and
/// its egress toward external addresses (replies are the connection tracker's).
///
/// `pod_policies`: NetworkPolicies decide traffic to and from pod addresses here. When Calico is
/// the policy engine they were decided in the Calico layer already, so pods count as not
/// isolated here (Calico's namespace profile, which allows); Service frontends still admit by
/// their backends' NetworkPolicies.
pub(super) fn compile(
    snap: &Snapshot,
    ctx: &GatewayContext,
    pod_policies: bool,
    rules: &mut Vec<Rule>,
    warnings: &mut BTreeSet<String>,
) {
    let objects = snap.cluster_objects();
    let cluster = objects.cluster();
    let mut pod_objects = objects.clone();
    if !pod_policies {
        pod_objects.policies.clear();
    }
    let pod_cluster = pod_objects.cluster();
    unknown_references(snap, warnings);
    let mut services: Vec<&Located<Service>> = snap.services.iter().collect();
    services.sort_by_key(|s| s.object.id());
    for l in services {
        for (pi, sp) in l.object.ports.iter().enumerate() {
            service_port(snap, ctx, &cluster, l, pi, sp, rules, warnings);
        }
    }
    if ctx.pods_routable {
        let mut workloads: Vec<&Located<Workload>> = snap
            .workloads
            .iter()
            .filter(|w| !w.object.ips.is_empty())
            .collect();
        workloads.sort_by_key(|w| w.object.id());
        for w in &workloads {
            pod_rules(&pod_cluster, w, rules);
        }
        for w in &workloads {
            pod_egress_rules(&pod_cluster, w, rules);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn service_port<'a>(
    snap: &'a Snapshot,
    ctx: &GatewayContext,
    cluster: &Cluster<'a>,
    l: &'a Located<Service>,
    pi: usize,
    sp: &ServicePort,
    rules: &mut Vec<Rule>,
    warnings: &mut BTreeSet<String>,
) {
    let svc = &l.object;
    let single = svc.ports.len() == 1;
    let mut all: Vec<(&Endpoint, u16)> = Vec::new();
    for sl in snap
        .endpoint_slices
        .iter()
        .map(|s| &s.object)
        .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
    {
        let port = sl
            .ports
            .iter()
            .find(|p| p.proto == sp.proto && (p.name == sp.name || (single && p.name.is_none())));
        if let Some(num) = port.and_then(|p| p.port) {
            all.extend(
                sl.endpoints
                    .iter()
                    .filter(|e| !e.addresses.is_empty())
                    .map(|e| (e, num)),
            );
        }
    }
    let ready: Vec<_> = all.iter().copied().filter(|(e, _)| e.ready).collect();
    let usable = if ready.is_empty() {
        all.iter()
            .copied()
            .filter(|(e, _)| e.serving && e.terminating)
            .collect()
    } else {
        ready
    };

    let proto_name = crate::key::proto::name(sp.proto).to_uppercase();
    let mut fronts = Vec::new();
    if let (Some(np), true) = (
        sp.node_port,
        svc.kind == "NodePort" || svc.kind == "LoadBalancer",
    ) {
        let mut nodes: Vec<_> = snap
            .nodes
            .iter()
            .map(|n| &n.object)
            .filter(|n| !n.addresses.is_empty())
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        for n in nodes {
            // ETP Local: kube-proxy on node N serves N's ready endpoints, or, when N has none,
            // N's serving-but-terminating ones (the fallback is per node, not cluster-wide).
            let backends = if svc.etp_local {
                let on_node = |e: &Endpoint| e.node.as_deref() == Some(n.name.as_str());
                let ready: Vec<_> = all
                    .iter()
                    .copied()
                    .filter(|(e, _)| on_node(e) && e.ready)
                    .collect();
                if ready.is_empty() {
                    all.iter()
                        .copied()
                        .filter(|(e, _)| on_node(e) && e.serving && e.terminating)
                        .collect()
                } else {
                    ready
                }
            } else {
                usable.clone()
            };
            fronts.push(Frontend {
                what: format!("NodePort {np}/{proto_name} on node {}", n.name),
                addrs: n.addresses.clone(),
                port: np,
                backends,
                local_node: svc.etp_local.then_some(n.name.as_str()),
                node_port: true,
            });
        }
    }
    if svc.kind == "LoadBalancer" && !svc.lb_ips.is_empty() {
        fronts.push(Frontend {
            what: format!("LoadBalancer port {}/{proto_name}", sp.port),
            addrs: svc.lb_ips.clone(),
            port: sp.port,
            backends: usable.clone(),
            local_node: None,
            node_port: false,
        });
    }
    if !svc.external_ips.is_empty() {
        fronts.push(Frontend {
            what: format!("external IP port {}/{proto_name}", sp.port),
            addrs: svc.external_ips.clone(),
            port: sp.port,
            backends: usable.clone(),
            local_node: None,
            node_port: false,
        });
    }

    let object = format!("Service/{}", svc.id());
    let etp = if svc.etp_local { "Local" } else { "Cluster" };
    let node_addrs: Vec<IpAddr> = snap
        .nodes
        .iter()
        .flat_map(|n| n.object.addresses.iter().copied())
        .collect();
    for f in fronts {
        let base = Match {
            dst: hosts(&f.addrs),
            proto: Some(sp.proto),
            dport: PortRange::single(f.port),
            ..Match::any(Direction::Ingress)
        };
        let origin = |why: String| Origin {
            layer: Layer::Kubernetes,
            object: object.clone(),
            index: Some(pi),
            source: l.source.clone(),
            why,
        };
        let deny = |reason, why: String| {
            Rule::new(
                base.clone(),
                Action::Decide(Verdict::Deny(reason)),
                false,
                origin(why),
            )
        };
        if usable.is_empty() {
            if ctx.drop_no_endpoints {
                rules.push(deny(DenyReason::NoEndpoints, format!("{} of Service {} has no ready or serving endpoint; kube-proxy would reject it, so it is dropped at the edge", f.what, svc.id())));
            }
            continue;
        }
        if f.backends.is_empty() {
            rules.push(deny(
                DenyReason::NoLocalEndpoint,
                format!("{} of Service {} (externalTrafficPolicy Local): node {} has no local ready endpoint; kube-proxy would drop it, so it is dropped at the edge", f.what, svc.id(), f.local_node.unwrap_or("?")),
            ));
            continue;
        }
        let mut per_backend = Vec::new();
        for (e, port) in &f.backends {
            let pod = e
                .pod
                .as_deref()
                .and_then(|p| cluster.workload(p))
                .or_else(|| e.addresses.iter().find_map(|a| cluster.workload_at(*a)));
            let Some(pod) = pod else {
                warnings.insert(format!("unknown reference: endpoint {} of Service {} has no known pod; it is treated as admitting every client", e.addresses[0], svc.id()));
                per_backend.push((format!("{}", e.addresses[0]), Admitted::All, false));
                continue;
            };
            per_backend.push((
                pod.id(),
                cluster.admitted_external(pod, sp.proto, *port),
                cluster.ingress_isolated(pod),
            ));
        }
        let admitted = per_backend
            .iter()
            .fold(Admitted::All, |acc, (_, a, _)| acc.intersect(a));
        if per_backend.windows(2).any(|w| w[0].1 != w[1].1) {
            let detail: Vec<String> = per_backend
                .iter()
                .map(|(p, a, _)| format!("{p}: {a}"))
                .collect();
            warnings.insert(format!(
                "inconsistent backends: Service {} port {}/{proto_name} has backends that admit different clients ({}); the gateway admits only what every backend admits",
                svc.id(), sp.port, detail.join("; ")
            ));
        }
        if f.node_port && !svc.etp_local {
            for (p, a, isolated) in &per_backend {
                let missing: Vec<String> = node_addrs
                    .iter()
                    .filter(|n| !a.contains(**n))
                    .map(|n| n.to_string())
                    .collect();
                if *isolated && !missing.is_empty() {
                    warnings.insert(format!(
                        "SNAT pitfall: Service {} (NodePort {}, externalTrafficPolicy Cluster) forwards between nodes with the source rewritten to the node address, but backend {p}'s policies do not admit node address(es) {}: such traffic is dropped at the pod. Admit the node addresses, or use externalTrafficPolicy: Local",
                        svc.id(), f.port, missing.join(", ")
                    ));
                }
            }
        }
        let why_backends: Vec<String> = per_backend.iter().map(|(p, _, _)| p.clone()).collect();
        match admitted {
            Admitted::Set(s) if s.to_addr_set() != Some(AddrSet::any()) => {
                if let Some(src) = s.to_addr_set() {
                    rules.push(Rule::new(
                        Match { src, ..base.clone() },
                        Action::Decide(Verdict::Allow),
                        false,
                        origin(format!("{} of Service {} (externalTrafficPolicy {etp}): every backend ({}) admits clients in {s}", f.what, svc.id(), why_backends.join(", "))),
                    ));
                }
                rules.push(deny(
                    DenyReason::Policy,
                    format!("{} of Service {}: not every backend ({}) admits this client; the backends' NetworkPolicies/SecurityGroups admit {s}", f.what, svc.id(), why_backends.join(", ")),
                ));
            }
            _ => rules.push(Rule::new(
                base.clone(),
                Action::Decide(Verdict::Allow),
                false,
                origin(format!("{} of Service {} (externalTrafficPolicy {etp}): every backend ({}) admits every client", f.what, svc.id(), why_backends.join(", "))),
            )),
        }
    }
}

/// Objects that name something the snapshot does not have.
fn unknown_references(snap: &Snapshot, warnings: &mut BTreeSet<String>) {
    let known_ns = |ns: &str| {
        snap.namespaces.is_empty() || snap.namespaces.iter().any(|n| n.object.name == ns)
    };
    for s in &snap.endpoint_slices {
        let sl = &s.object;
        if !snap
            .services
            .iter()
            .any(|v| v.object.namespace == sl.namespace && v.object.name == sl.service)
        {
            warnings.insert(format!("unknown reference: EndpointSlice {}/{} ({}) belongs to Service {}/{}, which does not exist", sl.namespace, sl.name, s.source, sl.namespace, sl.service));
        }
    }
    for (kind, ns, name, source) in snap
        .services
        .iter()
        .map(|s| ("Service", &s.object.namespace, &s.object.name, &s.source))
        .chain(snap.network_policies.iter().map(|p| {
            (
                "NetworkPolicy",
                &p.object.namespace,
                &p.object.name,
                &p.source,
            )
        }))
        .chain(
            snap.workloads
                .iter()
                .map(|w| ("workload", &w.object.namespace, &w.object.name, &w.source)),
        )
    {
        if !known_ns(ns) {
            warnings.insert(format!("unknown reference: {kind} {ns}/{name} ({source}) is in namespace {ns}, which does not exist; namespaceSelectors cannot see its labels"));
        }
    }
    let node_ports = snap.services.iter().any(|s| {
        s.object.ports.iter().any(|p| p.node_port.is_some()) && s.object.kind != "ClusterIP"
    });
    if node_ports && snap.nodes.iter().all(|n| n.object.addresses.is_empty()) {
        warnings.insert("unknown reference: Services have NodePorts but no Node (with an InternalIP or ExternalIP address) is known, so no NodePort frontend is compiled".into());
    }
}

/// Rules for traffic addressed to a pod's own IPs (routable pod networks).
fn pod_rules(cluster: &Cluster, l: &Located<Workload>, rules: &mut Vec<Rule>) {
    let w = &l.object;
    let dst = hosts(&w.ips);
    let object = format!("{:?}/{}", w.kind, w.id());
    let origin = |object: String, index: Option<usize>, why: String| Origin {
        layer: Layer::Kubernetes,
        object,
        index,
        source: l.source.clone(),
        why,
    };
    let Some(pod) = cluster.workload(&w.id()) else {
        return;
    };
    if !cluster.ingress_isolated(pod) {
        rules.push(Rule::new(
            Match {
                dst,
                ..Match::any(Direction::Ingress)
            },
            Action::Decide(Verdict::Allow),
            false,
            origin(
                object,
                None,
                format!(
                    "{} is not isolated by any NetworkPolicy or SecurityGroup",
                    w.id()
                ),
            ),
        ));
        return;
    }
    let policies = cluster
        .policies
        .iter()
        .filter(|p| {
            p.namespace == w.namespace && p.ingress_isolation && p.pod_selector.matches(&w.labels)
        })
        .map(|p| (format!("NetworkPolicy/{}", p.id()), &p.ingress));
    let groups = cluster
        .security_groups
        .iter()
        .filter(|g| g.namespace == w.namespace && g.selector.matches(&w.labels))
        .map(|g| {
            (
                format!("SecurityGroup/{}/{}", g.namespace, g.name),
                &g.ingress,
            )
        });
    for (owner, ingress) in policies.chain(groups) {
        for (ri, r) in ingress.iter().enumerate() {
            let Some(src) = external_peers(r) else {
                continue;
            };
            for (proto, dport) in rule_ports(r, |name, proto| w.resolve(name, proto)) {
                let why = format!(
                    "ingress rule {ri} of {owner} admits this client to {}",
                    w.id()
                );
                rules.push(allow(
                    Direction::Ingress,
                    (&src, &dst, proto, dport),
                    origin(owner.clone(), Some(ri), why),
                ));
            }
        }
    }
    rules.push(Rule::new(
        Match {
            dst,
            ..Match::any(Direction::Ingress)
        },
        Action::Decide(Verdict::Deny(DenyReason::Policy)),
        false,
        origin(
            object,
            None,
            format!(
                "{} is isolated by {} and no ingress rule admits this client",
                w.id(),
                cluster.isolating(pod).join(", ")
            ),
        ),
    ));
}

/// A routable pod's NetworkPolicy egress toward addresses outside the cluster (DESIGN §6): an
/// egress-isolated pod may send only what an egress rule admits (a rule without peers, or an
/// ipBlock peer: pod and namespace selectors never match an external address), on the rule's
/// numbered ports (a named port names a port of a destination pod, which an external address
/// is not); the rest is denied. A pod no policy isolates for egress sends anywhere.
fn pod_egress_rules(cluster: &Cluster, l: &Located<Workload>, rules: &mut Vec<Rule>) {
    let w = &l.object;
    let src = hosts(&w.ips);
    let object = format!("{:?}/{}", w.kind, w.id());
    let origin = |object: String, index: Option<usize>, why: String| Origin {
        layer: Layer::Kubernetes,
        object,
        index,
        source: l.source.clone(),
        why,
    };
    let Some(pod) = cluster.workload(&w.id()) else {
        return;
    };
    let policies = cluster.egress_policies(pod);
    if policies.is_empty() {
        rules.push(Rule::new(
            Match {
                src,
                ..Match::any(Direction::Egress)
            },
            Action::Decide(Verdict::Allow),
            false,
            origin(
                object,
                None,
                format!("{} is not isolated for egress by any NetworkPolicy", w.id()),
            ),
        ));
        return;
    }
    for p in &policies {
        let owner = format!("NetworkPolicy/{}", p.id());
        for (ri, r) in p.egress.iter().enumerate() {
            let Some(dst) = external_peers(r) else {
                continue;
            };
            // A named port names a destination pod's port: never an external address's.
            for (proto, dport) in rule_ports(r, |_, _| None) {
                let why = format!(
                    "egress rule {ri} of {owner} lets {} reach this address",
                    w.id()
                );
                rules.push(allow(
                    Direction::Egress,
                    (&src, &dst, proto, dport),
                    origin(owner.clone(), Some(ri), why),
                ));
            }
        }
    }
    let isolating: Vec<String> = policies
        .iter()
        .map(|p| format!("NetworkPolicy/{}", p.id()))
        .collect();
    rules.push(Rule::new(
        Match {
            src,
            ..Match::any(Direction::Egress)
        },
        Action::Decide(Verdict::Deny(DenyReason::Policy)),
        false,
        origin(
            object,
            None,
            format!(
                "{} is isolated for egress by {} and no egress rule admits this address",
                w.id(),
                isolating.join(", ")
            ),
        ),
    ));
}

/// The external addresses a NetworkPolicy (or SecurityGroup) rule's peers cover: every address
/// when it has none, else its ipBlocks. `None` when only selectors remain: they never match an
/// address outside the cluster.
fn external_peers(r: &crate::k8s::NpRule) -> Option<AddrSet> {
    if r.peers.is_empty() {
        return Some(AddrSet::any());
    }
    r.peers
        .iter()
        .filter_map(|p| p.block.as_ref())
        .fold(PrefixSet::empty(), |acc, b| {
            acc.union(&PrefixSet::block(b.cidr, &b.except))
        })
        .to_addr_set()
}

/// A rule's (protocol, port range) pairs, sorted and deduplicated: any port when it lists
/// none; `resolve` turns a named port into a number, or drops it.
fn rule_ports(
    r: &crate::k8s::NpRule,
    resolve: impl Fn(&str, u8) -> Option<u16>,
) -> Vec<(Option<u8>, PortRange)> {
    let mut ports: Vec<(Option<u8>, PortRange)> = Vec::new();
    if r.ports.is_empty() {
        ports.push((None, PortRange::ANY));
    }
    for p in &r.ports {
        let range = match &p.port {
            None => Some(PortRange::ANY),
            Some(crate::k8s::PortRef::Number(n)) => Some(PortRange {
                lo: *n,
                hi: p.end_port.unwrap_or(*n),
            }),
            Some(crate::k8s::PortRef::Name(name)) => resolve(name, p.proto).map(PortRange::single),
        };
        if let Some(range) = range {
            ports.push((Some(p.proto), range));
        }
    }
    ports.sort();
    ports.dedup();
    ports
}

/// An Allow rule for one (source, destination, protocol, port range) of a NetworkPolicy or
/// SecurityGroup rule.
fn allow(
    direction: Direction,
    (src, dst, proto, dport): (&AddrSet, &AddrSet, Option<u8>, PortRange),
    origin: Origin,
) -> Rule {
    Rule::new(
        Match {
            src: src.clone(),
            dst: dst.clone(),
            proto,
            dport,
            ..Match::any(direction)
        },
        Action::Decide(Verdict::Allow),
        false,
        origin,
    )
}
