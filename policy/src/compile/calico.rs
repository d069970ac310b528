//! Calico policy as felix evaluates it, lowered into the gateway layer.
//!
//! Felix decides per endpoint and direction: the tiers run in order; in a tier, the policies that
//! apply to the endpoint (selector, namespace, `types`) run in order, each rule in order; Allow
//! and Deny decide, Log goes on, Pass skips to the next tier; a tier that applies and decides
//! nothing ends in its `defaultAction` (Deny, or Pass). After the last tier the endpoint's
//! profiles decide: for a pod, its namespace's profile, which allows, so here the flow falls
//! through to the gateway's next layers. `../shared/data/calico/README.md` cites the source of
//! every rule.
//!
//! At the edge the endpoint is a packet's address: its destination for ingress, its source for
//! egress. Each written rule is lowered to matches whose endpoint side is narrowed to the
//! addresses of the endpoints its policy applies to, so one flat first-match list gives each
//! endpoint exactly its own policies. A tier's end is a Deny on the addresses of the endpoints it
//! applies to, per direction. Negated fields (`notProtocol`, `notICMP`, `notSelector`, named
//! `notPorts`) become guard rules before the written rule's matches: a guard that matches skips
//! the written rule ([`Action::Skip`]).
//!
//! Host endpoints: `doNotTrack` and `preDNAT` policies see a host endpoint's traffic before
//! anything else, which is what the edge sees (the node's address and the NodePort, before
//! DNAT). They have no end-of-tier drop: unmatched traffic goes on (felix gives those tiers
//! `Pass`). A Node with no HostEndpoint object stands for Calico's automatic host endpoint (its
//! labels, its addresses). Normal host-endpoint policies govern what the node itself terminates,
//! or forwards after DNAT; neither is visible as such at the edge, so they stay Calico's job.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use foldhash::{HashMap, HashMapExt};

use crate::gateway_policy::RuleAction;
use crate::k8s::{
    CalicoEntity, CalicoKind, CalicoPolicy, CalicoPort, CalicoRule, NamedPort, NetworkPolicy,
    NpRule, ServiceMatch, Tier,
};
use crate::key::proto;
use crate::rule::{
    Action, AddrSet, DenyReason, Direction, Layer, Match, Origin, PortRange, Prefix, PrefixSet,
    Rule, Verdict,
};
use crate::selector::{Expr, Labels};
use crate::snapshot::{Located, Snapshot};

const NS_LABEL: &str = "projectcalico.org/namespace";
const ORCH_LABEL: &str = "projectcalico.org/orchestrator";
const SA_LABEL: &str = "projectcalico.org/serviceaccount";
const NAME_LABEL: &str = "projectcalico.org/name";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpKind {
    Workload,
    Host,
    NetworkSet,
}

/// Something Calico's selectors see: a workload, a host endpoint or a network set, with the
/// labels Calico gives it.
struct Endpoint<'a> {
    kind: EpKind,
    namespace: Option<&'a str>,
    labels: Labels,
    addrs: Vec<Prefix>,
    ports: &'a [NamedPort],
    service_account: Option<&'a str>,
}

/// The endpoints of a snapshot, and the labels selectors read besides theirs.
pub(super) struct Model<'a> {
    snap: &'a Snapshot,
    endpoints: Vec<Endpoint<'a>>,
    /// Namespace labels plus `projectcalico.org/name`.
    namespaces: HashMap<&'a str, Labels>,
    /// Service account labels plus `projectcalico.org/name`, by (namespace, name).
    service_accounts: HashMap<(&'a str, &'a str), Labels>,
}

impl<'a> Model<'a> {
    pub(super) fn new(snap: &'a Snapshot) -> Model<'a> {
        let mut endpoints = Vec::new();
        for w in snap.workloads.iter().map(|w| &w.object) {
            let mut labels = w.labels.clone();
            labels.insert(NS_LABEL.into(), w.namespace.clone());
            labels.insert(ORCH_LABEL.into(), "k8s".into());
            if let Some(sa) = &w.service_account {
                labels.insert(SA_LABEL.into(), sa.clone());
            }
            endpoints.push(Endpoint {
                kind: EpKind::Workload,
                namespace: Some(&w.namespace),
                labels,
                addrs: w.ips.iter().map(|a| Prefix::host(*a)).collect(),
                ports: &w.ports,
                service_account: w.service_account.as_deref(),
            });
        }
        for h in snap.host_endpoints.iter().map(|h| &h.object) {
            let mut addrs: Vec<Prefix> = h.expected_ips.iter().map(|a| Prefix::host(*a)).collect();
            if addrs.is_empty() {
                // The gateway knows endpoints by address: an interface-only host endpoint owns
                // its node's addresses.
                if let Some(n) = snap
                    .nodes
                    .iter()
                    .find(|n| Some(&n.object.name) == h.node.as_ref())
                {
                    addrs = n
                        .object
                        .addresses
                        .iter()
                        .map(|a| Prefix::host(*a))
                        .collect();
                }
            }
            endpoints.push(Endpoint {
                kind: EpKind::Host,
                namespace: None,
                labels: h.labels.clone(),
                addrs,
                ports: &h.ports,
                service_account: None,
            });
        }
        // Calico's automatic host endpoints: a node's labels and addresses.
        for n in snap.nodes.iter().map(|n| &n.object) {
            if snap
                .host_endpoints
                .iter()
                .any(|h| h.object.node.as_deref() == Some(&n.name))
            {
                continue;
            }
            endpoints.push(Endpoint {
                kind: EpKind::Host,
                namespace: None,
                labels: n.labels.clone(),
                addrs: n.addresses.iter().map(|a| Prefix::host(*a)).collect(),
                ports: &[],
                service_account: None,
            });
        }
        for s in snap.network_sets.iter().map(|s| &s.object) {
            let mut labels = s.labels.clone();
            if let Some(ns) = &s.namespace {
                labels.insert(NS_LABEL.into(), ns.clone());
            }
            endpoints.push(Endpoint {
                kind: EpKind::NetworkSet,
                namespace: s.namespace.as_deref(),
                labels,
                addrs: s.nets.clone(),
                ports: &[],
                service_account: None,
            });
        }
        let mut namespaces = HashMap::new();
        for n in snap.namespaces.iter().map(|n| &n.object) {
            let mut labels = n.labels.clone();
            labels.insert(NAME_LABEL.into(), n.name.clone());
            namespaces.insert(n.name.as_str(), labels);
        }
        let mut service_accounts = HashMap::new();
        for s in snap.service_accounts.iter().map(|s| &s.object) {
            let mut labels = s.labels.clone();
            labels.insert(NAME_LABEL.into(), s.name.clone());
            service_accounts.insert((s.namespace.as_str(), s.name.as_str()), labels);
        }
        Model {
            snap,
            endpoints,
            namespaces,
            service_accounts,
        }
    }

    /// A namespaceSelector as felix evaluates it (rules.go): over the `pcns.` labels every
    /// endpoint inherits from its namespace, which an endpoint in no namespace (host endpoint,
    /// global network set) does not have; `all()` is `has(projectcalico.org/namespace)`,
    /// `global()` its negation. So a negated selector (`!has(x)`) matches those endpoints too.
    fn in_namespaces(&self, e: &Endpoint, sel: &Expr) -> bool {
        match (sel, e.namespace) {
            (Expr::Global, ns) => ns.is_none(),
            (Expr::All, ns) => ns.is_some(),
            (sel, None) => sel.matches(&Labels::new()),
            (sel, Some(ns)) => match self.namespaces.get(ns) {
                Some(l) => sel.matches(l),
                // A namespace the gateway has not read has only its name label.
                None => sel.matches(&Labels::from([(NAME_LABEL.to_string(), ns.to_string())])),
            },
        }
    }

    /// A service-account selector over the `pcsa.` labels an endpoint inherits from its service
    /// account (none without one); `all()` is `has(projectcalico.org/serviceaccount)`.
    fn sa_matches(&self, e: &Endpoint, sel: &Expr) -> bool {
        let (Some(ns), Some(sa)) = (e.namespace, e.service_account) else {
            return *sel != Expr::All && sel.matches(&Labels::new());
        };
        match self.service_accounts.get(&(ns, sa)) {
            Some(l) => sel.matches(l),
            // A service account the gateway has not read has only its name label.
            None => sel.matches(&Labels::from([(NAME_LABEL.to_string(), sa.to_string())])),
        }
    }

    /// Every address of the family that is no host endpoint's: traffic to such an address (a
    /// LoadBalancer IP, an external IP, a pod) arrives on the edge nodes' interfaces, so the
    /// host endpoints' preDNAT and untracked policies see it.
    fn not_hosts(&self, v6: bool) -> PrefixSet {
        let hosts: Vec<Prefix> = self
            .endpoints
            .iter()
            .filter(|e| e.kind == EpKind::Host)
            .flat_map(|e| e.addrs.iter().copied())
            .filter(|p| p.v6 == v6)
            .collect();
        family(v6).minus(&hosts)
    }

    /// The endpoints a policy applies to (indices into `endpoints`).
    fn applies_to(&self, p: &CalicoPolicy) -> Vec<usize> {
        let host_only = p.pre_dnat || p.do_not_track;
        self.endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| match (e.kind, p.kind) {
                (EpKind::NetworkSet, _) => false,
                (EpKind::Host, CalicoKind::GlobalNetworkPolicy) => host_only,
                (EpKind::Host, _) => false,
                (EpKind::Workload, CalicoKind::GlobalNetworkPolicy) => !host_only,
                (EpKind::Workload, _) => e.namespace == p.namespace.as_deref(),
            })
            .filter(|(_, e)| {
                p.namespace_selector
                    .as_ref()
                    .is_none_or(|s| self.in_namespaces(e, s))
            })
            .filter(|(_, e)| {
                p.service_account_selector
                    .as_ref()
                    .is_none_or(|s| self.sa_matches(e, s))
            })
            .filter(|(_, e)| p.selector.matches(&e.labels))
            .map(|(i, _)| i)
            .collect()
    }

    /// The endpoints a rule side selects (`None`: the side places no endpoint constraint),
    /// scoped as rules.go `getEndpointSelector` scopes them.
    fn entity(&self, e: &CalicoEntity, policy_ns: Option<&str>) -> Option<Vec<usize>> {
        let scoped_by_policy = e.not_selector.is_some() && policy_ns.is_some();
        if !e.selects_endpoints() && !scoped_by_policy {
            return None;
        }
        Some(
            self.endpoints
                .iter()
                .enumerate()
                .filter(|(_, x)| match (&e.namespace_selector, policy_ns) {
                    (Some(s), _) => self.in_namespaces(x, s),
                    (None, Some(ns)) => x.namespace == Some(ns),
                    (None, None) => true,
                })
                .filter(|(_, x)| e.selector.as_ref().is_none_or(|s| s.matches(&x.labels)))
                .filter(|(_, x)| {
                    e.service_accounts.as_ref().is_none_or(|m| {
                        (m.names.is_empty()
                            || x.service_account
                                .is_some_and(|sa| m.names.iter().any(|n| n == sa)))
                            && m.selector.as_ref().is_none_or(|s| self.sa_matches(x, s))
                    })
                })
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// A Service's members as felix's service IP sets hold them (felix `serviceindex`): each
    /// EndpointSlice address with each slice port (protocol, port), never the cluster IP.
    fn service_members(
        &self,
        svc: &ServiceMatch,
        policy_ns: Option<&str>,
    ) -> Vec<(IpAddr, u8, u16)> {
        let Some(ns) = svc.namespace.as_deref().or(policy_ns) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for sl in self
            .snap
            .endpoint_slices
            .iter()
            .map(|s| &s.object)
            .filter(|s| s.namespace == ns && s.service == svc.name)
        {
            for e in &sl.endpoints {
                for a in &e.addresses {
                    for p in &sl.ports {
                        if let Some(port) = p.port {
                            out.push((*a, p.proto, port));
                        }
                    }
                }
            }
        }
        out
    }

    fn addrs(&self, ids: &[usize], v6: bool) -> PrefixSet {
        PrefixSet::of(
            ids.iter()
                .flat_map(|&i| self.endpoints[i].addrs.iter().copied())
                .filter(|p| p.v6 == v6),
        )
    }
}

/// One family's address constraint on a rule side: `None` is any address of the family.
type Side = Option<PrefixSet>;

fn and(a: Side, b: Side) -> Side {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => Some(a.intersect(&b)),
    }
}

fn family(v6: bool) -> PrefixSet {
    PrefixSet::of([Prefix::any(v6)])
}

fn to_addr(s: &Side, v6: bool) -> Option<crate::rule::AddrSet> {
    match s {
        None => family(v6).to_addr_set(),
        Some(x) => x.to_addr_set(),
    }
}

/// A port constraint lowered: the protocol, the endpoint addresses it is limited to (named
/// ports), and the range.
#[derive(Clone)]
struct PortPart {
    proto: Option<u8>,
    only: Option<PrefixSet>,
    range: PortRange,
}

/// Above this many (source x destination) prefixes, a rule's smaller side becomes a guard.
const SPLIT_PRODUCT: usize = 4096;

const NAMED_PROTOS: [u8; 4] = [proto::TCP, proto::UDP, proto::SCTP, proto::UDPLITE];

/// Named port `name` on `candidates`, per (protocol, number): the addresses of the endpoints
/// that have it (felix `namedPortsToIPSets`: each endpoint opens its own number).
fn named_groups(
    m: &Model,
    candidates: &[usize],
    name: &str,
    rule_proto: Option<u8>,
    v6: bool,
) -> BTreeMap<(u8, u16), PrefixSet> {
    let mut groups: BTreeMap<(u8, u16), Vec<Prefix>> = BTreeMap::new();
    for &i in candidates {
        let e = &m.endpoints[i];
        for p in e.ports.iter().filter(|p| p.name == name) {
            if rule_proto.is_some_and(|r| r != p.proto) || !NAMED_PROTOS.contains(&p.proto) {
                continue;
            }
            groups
                .entry((p.proto, p.port))
                .or_default()
                .extend(e.addrs.iter().filter(|a| a.v6 == v6));
        }
    }
    groups
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, PrefixSet::of(v)))
        .collect()
}

/// A side's `ports` as parts. `candidates`: the endpoints a named port
/// may resolve on.
fn port_parts(
    m: &Model,
    ports: &[CalicoPort],
    rule_proto: Option<u8>,
    candidates: &[usize],
    v6: bool,
) -> Vec<PortPart> {
    // notPorts are guard rules (see the lowering), not holes cut here: cutting multiplied the
    // parts by the holes on each side.
    let mut out = Vec::new();
    if ports.is_empty() {
        out.push(PortPart {
            proto: rule_proto,
            only: None,
            range: PortRange::ANY,
        });
        return out;
    }
    for p in ports {
        match p {
            CalicoPort::Range(r) => {
                out.push(PortPart {
                    proto: rule_proto,
                    only: None,
                    range: *r,
                });
            }
            CalicoPort::Named(name) => {
                for ((pr, num), addrs) in named_groups(m, candidates, name, rule_proto, v6) {
                    out.push(PortPart {
                        proto: Some(pr),
                        only: Some(addrs),
                        range: PortRange::single(num),
                    });
                }
            }
        }
    }
    out
}

/// What a policy's lowering needs besides the policy.
struct Lowering<'m, 'a> {
    model: &'m Model<'a>,
    policy: &'m CalicoPolicy,
    /// The endpoints the policy applies to.
    own: &'m [usize],
    /// A preDNAT or untracked policy: its host endpoints also see traffic to addresses that are
    /// no host endpoint's (LoadBalancer and external IPs, pods).
    host_phase: bool,
    /// The tier's position among the layer's segments.
    tier: u32,
    /// Calico Allow decides (always, today: preDNAT and untracked Allow are the edge's decision).
    source: String,
}

impl Lowering<'_, '_> {
    fn rule(
        &self,
        direction: Direction,
        i: usize,
        r: &CalicoRule,
        rules: &mut Vec<Rule>,
        warnings: &mut BTreeSet<String>,
    ) {
        let (m, p, own) = (self.model, self.policy, self.own);
        let object = p.id();
        let what = format!("{object} {direction}[{i}]");
        let origin = |why: String| Origin {
            layer: Layer::Gateway,
            object: object.clone(),
            index: Some(i),
            source: self.source.clone(),
            why,
        };
        let why = format!(
            "{direction} rule {i} of {object} (tier {}, order {})",
            p.tier,
            p.order.map_or("none".into(), |o| o.to_string())
        );
        let action = match r.action {
            RuleAction::Allow => Action::Decide(Verdict::Allow),
            RuleAction::Deny => Action::Decide(Verdict::Deny(DenyReason::Policy)),
            RuleAction::Pass => Action::NextTier,
            RuleAction::Log => Action::Log,
        };
        let start = rules.len();
        let ns = p.namespace.as_deref();
        let src_eps = m.entity(&r.source, ns);
        let dst_eps = m.entity(&r.destination, ns);
        // Guards: a negated field that matches skips the written rule.
        let guard = |rules: &mut Vec<Rule>, mat: Match, note: &str| {
            rules.push(
                Rule::new(mat, Action::Skip, false, origin(format!("{why}: {note}")))
                    .in_tier(self.tier),
            );
        };
        if let Some(np) = r.not_proto {
            guard(
                rules,
                Match {
                    proto: Some(np),
                    ..Match::any(direction)
                },
                "notProtocol matched, the rule does not apply",
            );
        }
        if let Some((t, code)) = r.not_icmp {
            for pr in [proto::ICMP, proto::ICMPV6] {
                if r.proto.is_some_and(|x| x != pr) {
                    continue;
                }
                guard(
                    rules,
                    Match {
                        proto: Some(pr),
                        sport: PortRange::single(t.into()),
                        dport: code.map_or(PortRange { lo: 0, hi: 255 }, |c| {
                            PortRange::single(c.into())
                        }),
                        ..Match::any(direction)
                    },
                    "notICMP matched, the rule does not apply",
                );
            }
        }
        for (side, e) in [(0, &r.source), (1, &r.destination)] {
            let Some(sel) = &e.not_selector else { continue };
            let ids: Vec<usize> = m
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, x)| sel.matches(&x.labels))
                .map(|(i, _)| i)
                .collect();
            for v6 in [false, true] {
                let Some(set) = m.addrs(&ids, v6).to_addr_set() else {
                    continue;
                };
                let mut mat = Match::any(direction);
                if side == 0 {
                    mat.src = set;
                } else {
                    mat.dst = set;
                }
                guard(rules, mat, "notSelector matched, the rule does not apply");
            }
        }
        for v6 in [false, true] {
            if r.ip_version.is_some_and(|v| (v == 6) != v6)
                || (r.proto == Some(proto::ICMP) && v6)
                || (r.proto == Some(proto::ICMPV6) && !v6)
            {
                continue;
            }
            // felix renders a rule per family with that family's CIDRs; a list that has CIDRs
            // of the other family only leaves the rule out (`FilterRuleToIPVersion`).
            let other_only = |l: &[Prefix]| !l.is_empty() && l.iter().all(|p| p.v6 != v6);
            if [
                &r.source.nets,
                &r.source.not_nets,
                &r.destination.nets,
                &r.destination.not_nets,
            ]
            .iter()
            .any(|l| other_only(l))
            {
                continue;
            }
            let side = |e: &CalicoEntity, eps: &Option<Vec<usize>>| -> Side {
                let mut s: Side = None;
                if !e.nets.is_empty() {
                    s = Some(PrefixSet::of(e.nets.iter().copied().filter(|p| p.v6 == v6)));
                }
                let holes: Vec<Prefix> =
                    e.not_nets.iter().copied().filter(|p| p.v6 == v6).collect();
                if !holes.is_empty() {
                    s = Some(s.unwrap_or_else(|| family(v6)).minus(&holes));
                }
                if let Some(ids) = eps {
                    s = and(s, Some(m.addrs(ids, v6)));
                }
                if let Some(svc) = &e.services {
                    s = and(
                        s,
                        Some(PrefixSet::of(
                            m.service_members(svc, ns)
                                .into_iter()
                                .map(|(a, _, _)| Prefix::host(a))
                                .filter(|p| p.v6 == v6),
                        )),
                    );
                }
                s
            };
            let own_set = Some(if self.host_phase {
                m.addrs(own, v6).union(&m.not_hosts(v6))
            } else {
                m.addrs(own, v6)
            });
            let (src, dst) = match direction {
                Direction::Ingress => (
                    side(&r.source, &src_eps),
                    and(own_set, side(&r.destination, &dst_eps)),
                ),
                Direction::Egress => (
                    and(own_set, side(&r.source, &src_eps)),
                    side(&r.destination, &dst_eps),
                ),
            };
            if src.as_ref().is_some_and(PrefixSet::is_empty)
                || dst.as_ref().is_some_and(PrefixSet::is_empty)
            {
                continue;
            }
            // Named ports resolve on the side's endpoints: the selected ones, the policy's own
            // on the endpoint side, every endpoint otherwise.
            let all: Vec<usize> = (0..m.endpoints.len()).collect();
            let candidates = |eps: &Option<Vec<usize>>, is_own: bool| -> Vec<usize> {
                let base = eps.clone().unwrap_or_else(|| all.clone());
                if is_own {
                    base.into_iter().filter(|i| own.contains(i)).collect()
                } else {
                    base
                }
            };
            let src_cands = candidates(&src_eps, direction == Direction::Egress);
            let dst_cands = candidates(&dst_eps, direction == Direction::Ingress);
            // notPorts: guards (numbers and ranges as written, names per endpoint number), so
            // holes never multiply the port list.
            for (which, e) in [(0, &r.source), (1, &r.destination)] {
                for p in &e.not_ports {
                    let CalicoPort::Range(range) = p else {
                        continue;
                    };
                    let mut mat = Match {
                        proto: r.proto,
                        ..Match::any(direction)
                    };
                    if which == 0 {
                        mat.sport = *range;
                    } else {
                        mat.dport = *range;
                    }
                    guard(
                        rules,
                        mat,
                        "a notPorts entry matched, the rule does not apply",
                    );
                }
            }
            for (which, e, cands) in [(0, &r.source, &src_cands), (1, &r.destination, &dst_cands)] {
                for p in &e.not_ports {
                    let CalicoPort::Named(name) = p else { continue };
                    for ((pr, num), addrs) in named_groups(m, cands, name, r.proto, v6) {
                        let Some(set) = addrs.to_addr_set() else {
                            continue;
                        };
                        let mut mat = Match {
                            proto: Some(pr),
                            ..Match::any(direction)
                        };
                        if which == 0 {
                            mat.src = set;
                            mat.sport = PortRange::single(num);
                        } else {
                            mat.dst = set;
                            mat.dport = PortRange::single(num);
                        }
                        guard(
                            rules,
                            mat,
                            "a named notPorts entry matched, the rule does not apply",
                        );
                    }
                }
            }
            let (sparts, dparts) = match r.icmp {
                Some((t, code)) => (
                    vec![PortPart {
                        proto: r.proto,
                        only: None,
                        range: PortRange::single(t.into()),
                    }],
                    vec![PortPart {
                        proto: r.proto,
                        only: None,
                        range: code.map_or(PortRange { lo: 0, hi: 255 }, |c| {
                            PortRange::single(c.into())
                        }),
                    }],
                ),
                None if r.destination.services.is_some() => {
                    // A destination Service matches its members' (address, protocol, port).
                    let mut groups: BTreeMap<(u8, u16), Vec<Prefix>> = BTreeMap::new();
                    for (a, pr, port) in r
                        .destination
                        .services
                        .as_ref()
                        .map(|svc| m.service_members(svc, ns))
                        .unwrap_or_default()
                    {
                        if r.proto.is_none_or(|x| x == pr) && a.is_ipv6() == v6 {
                            groups.entry((pr, port)).or_default().push(Prefix::host(a));
                        }
                    }
                    let src_parts = port_parts(m, &r.source.ports, r.proto, &src_cands, v6);
                    let dst_parts = groups
                        .into_iter()
                        .map(|((pr, port), v)| PortPart {
                            proto: Some(pr),
                            only: Some(PrefixSet::of(v)),
                            range: PortRange::single(port),
                        })
                        .collect();
                    (src_parts, dst_parts)
                }
                None => (
                    port_parts(m, &r.source.ports, r.proto, &src_cands, v6),
                    port_parts(m, &r.destination.ports, r.proto, &dst_cands, v6),
                ),
            };
            // A large set on one side (a threat feed) times the endpoints on the other would
            // lower to their product in the classifier. Past a bound the smaller side becomes a
            // guard, "elsewhere: skip the written rule", and the rule keeps the large side
            // alone: the sum of the two instead of their product.
            let (mut src, mut dst) = (src, dst);
            let size = |x: &Side| x.as_ref().map_or(1, PrefixSet::len);
            if size(&src) * size(&dst) > SPLIT_PRODUCT && size(&src).min(size(&dst)) > 1 {
                let small_is_dst = size(&dst) <= size(&src);
                let small = if small_is_dst { dst.take() } else { src.take() };
                let elsewhere = AddrSet {
                    include: vec![Prefix::any(v6)],
                    except: small.map(|p| p.prefixes().to_vec()).unwrap_or_default(),
                };
                let mut mat = Match::any(direction);
                if small_is_dst {
                    mat.dst = elsewhere;
                } else {
                    mat.src = elsewhere;
                }
                guard(
                    rules,
                    mat,
                    "the address is none of this side's, the rule does not apply",
                );
            }
            for s in &sparts {
                for d in &dparts {
                    let proto = match (s.proto, d.proto) {
                        (Some(a), Some(b)) if a != b => continue,
                        (a, b) => a.or(b),
                    };
                    let src = and(src.clone(), s.only.clone());
                    let dst = and(dst.clone(), d.only.clone());
                    let (Some(src), Some(dst)) = (to_addr(&src, v6), to_addr(&dst, v6)) else {
                        continue;
                    };
                    rules.push(
                        Rule::new(
                            Match {
                                direction,
                                src,
                                dst,
                                proto,
                                sport: s.range,
                                dport: d.range,
                                vlan: None,
                            },
                            action,
                            r.action == RuleAction::Log,
                            origin(why.clone()),
                        )
                        .in_tier(self.tier),
                    );
                }
            }
        }
        if !rules[start..].iter().any(|x| x.action != Action::Skip) {
            rules.truncate(start);
            warnings.insert(format!(
                "{what}: matches no address (its selectors pick no endpoint, its named ports resolve on none, or its nets and the policy's endpoints do not overlap)"
            ));
        }
    }
}

/// A Kubernetes NetworkPolicy as Calico runs it when Calico is the cluster's policy engine
/// (libcalico-go `K8sNetworkPolicyToCalico`): the default tier, order 1000, one Allow rule per
/// protocol and peer.
pub(super) fn from_kubernetes(np: &NetworkPolicy) -> CalicoPolicy {
    let rules = |list: &[NpRule], ingress: bool| -> Vec<CalicoRule> {
        let mut out = Vec::new();
        for r in list {
            // Ports grouped by protocol; an empty list: any protocol and port.
            let mut by_proto: BTreeMap<u8, Vec<CalicoPort>> = BTreeMap::new();
            for p in &r.ports {
                let e = by_proto.entry(p.proto).or_default();
                match (&p.port, p.end_port) {
                    (None, _) => {}
                    (Some(crate::k8s::PortRef::Number(n)), Some(end)) => {
                        e.push(CalicoPort::Range(PortRange {
                            lo: *n,
                            hi: end.max(*n),
                        }))
                    }
                    (Some(crate::k8s::PortRef::Number(n)), None) => {
                        e.push(CalicoPort::Range(PortRange::single(*n)))
                    }
                    (Some(crate::k8s::PortRef::Name(s)), _) => e.push(CalicoPort::Named(s.clone())),
                }
            }
            // A protocol listed once without a port opens the whole protocol.
            for p in &r.ports {
                if p.port.is_none() {
                    by_proto.insert(p.proto, Vec::new());
                }
            }
            let protos: Vec<(Option<u8>, Vec<CalicoPort>)> = if r.ports.is_empty() {
                vec![(None, Vec::new())]
            } else {
                by_proto.into_iter().map(|(p, v)| (Some(p), v)).collect()
            };
            let peers: Vec<CalicoEntity> = if r.peers.is_empty() {
                vec![CalicoEntity::default()]
            } else {
                r.peers
                    .iter()
                    .map(|peer| match &peer.block {
                        Some(b) => CalicoEntity {
                            nets: vec![b.cidr],
                            not_nets: b.except.clone(),
                            ..CalicoEntity::default()
                        },
                        None => CalicoEntity {
                            selector: Some(Expr::And(vec![
                                Expr::Eq(ORCH_LABEL.into(), "k8s".into()),
                                peer.pods.as_ref().map_or(Expr::All, |s| s.to_expr()),
                            ])),
                            namespace_selector: peer.namespaces.as_ref().map(|s| s.to_expr()),
                            ..CalicoEntity::default()
                        },
                    })
                    .collect()
            };
            for (proto, ports) in &protos {
                for peer in &peers {
                    let with_ports = CalicoEntity {
                        ports: ports.clone(),
                        ..CalicoEntity::default()
                    };
                    let (source, destination) = if ingress {
                        (peer.clone(), with_ports)
                    } else {
                        (
                            CalicoEntity::default(),
                            CalicoEntity {
                                ports: ports.clone(),
                                ..peer.clone()
                            },
                        )
                    };
                    out.push(CalicoRule {
                        action: RuleAction::Allow,
                        ip_version: None,
                        proto: *proto,
                        not_proto: None,
                        icmp: None,
                        not_icmp: None,
                        source,
                        destination,
                    });
                }
            }
        }
        out
    };
    CalicoPolicy {
        kind: CalicoKind::KubernetesNetworkPolicy,
        namespace: Some(np.namespace.clone()),
        name: np.name.clone(),
        tier: "default".into(),
        order: Some(1000.0),
        selector: Expr::And(vec![
            Expr::Eq(ORCH_LABEL.into(), "k8s".into()),
            np.pod_selector.to_expr(),
        ]),
        namespace_selector: None,
        service_account_selector: None,
        pre_dnat: false,
        apply_on_forward: false,
        do_not_track: false,
        ingress_type: np.ingress_isolation,
        egress_type: np.egress_isolation,
        ingress: if np.ingress_isolation {
            rules(&np.ingress, true)
        } else {
            Vec::new()
        },
        egress: if np.egress_isolation {
            rules(&np.egress, false)
        } else {
            Vec::new()
        },
    }
}

/// Which of felix's policy passes a policy belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    /// `doNotTrack`: raw table, before anything else.
    Untracked,
    /// `preDNAT`: before kube-proxy's DNAT.
    PreDnat,
    Normal,
}

pub(super) fn phase(p: &CalicoPolicy) -> Phase {
    if p.do_not_track {
        Phase::Untracked
    } else if p.pre_dnat {
        Phase::PreDnat
    } else {
        Phase::Normal
    }
}

/// The tiers in felix's order (`TierLess`): tiers with an object first, by order (absent
/// last), then name; a tier a policy names without an object after them, with a warning.
pub(super) fn tiers(
    snap: &Snapshot,
    policies: &[&Located<CalicoPolicy>],
    warnings: &mut BTreeSet<String>,
) -> Vec<(Tier, bool)> {
    let mut out: Vec<(Tier, bool)> = snap
        .tiers
        .iter()
        .map(|t| (t.object.clone(), true))
        .collect();
    // The tiers Calico creates itself, where no object overrides them.
    for (name, order, pass) in [
        ("default", crate::k8s::DEFAULT_TIER_ORDER, false),
        ("kube-admin", 1_000.0, true),
        ("kube-baseline", 10_000_000.0, true),
    ] {
        if !out.iter().any(|(t, _)| t.name == name) {
            out.push((
                Tier {
                    name: name.into(),
                    order: Some(order),
                    default_pass: pass,
                },
                true,
            ));
        }
    }
    for p in policies {
        if !out.iter().any(|(t, _)| t.name == p.object.tier) {
            warnings.insert(format!(
                "{} ({}) is in tier `{}`, which has no Tier object; felix orders such a tier after every tier that exists",
                p.object.id(),
                p.source,
                p.object.tier
            ));
            out.push((
                Tier {
                    name: p.object.tier.clone(),
                    order: None,
                    default_pass: false,
                },
                false,
            ));
        }
    }
    out.sort_by(|(a, va), (b, vb)| {
        vb.cmp(va)
            .then(
                a.order
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.order.unwrap_or(f64::INFINITY)),
            )
            .then(a.name.cmp(&b.name))
    });
    out
}

/// felix's policy order within a tier: `order` (absent last), then the string
/// `name/namespace/kind` (`PolKVLess`).
pub(super) fn policy_key(p: &CalicoPolicy) -> (f64, String) {
    let (order, name, ns, kind) = p.sort_key();
    (order, format!("{name}/{ns}/{kind}"))
}

/// Lowers one policy's rules in tier position `tier`; returns the endpoints it applies to per
/// direction (for the tier's end).
pub(super) fn compile(
    model: &Model,
    l: &Located<CalicoPolicy>,
    tier: u32,
    rules: &mut Vec<Rule>,
    warnings: &mut BTreeSet<String>,
) -> [Vec<usize>; 2] {
    let p = &l.object;
    let own = model.applies_to(p);
    if own.is_empty() {
        return [Vec::new(), Vec::new()];
    }
    let low = Lowering {
        model,
        policy: p,
        own: &own,
        host_phase: phase(p) != Phase::Normal,
        tier,
        source: l.source.clone(),
    };
    for (direction, list) in [
        (Direction::Ingress, &p.ingress),
        (Direction::Egress, &p.egress),
    ] {
        for (i, r) in list.iter().enumerate() {
            low.rule(direction, i, r, rules, warnings);
        }
    }
    [
        if p.ingress_type {
            own.clone()
        } else {
            Vec::new()
        },
        if p.egress_type { own } else { Vec::new() },
    ]
}

/// A tier's end for the endpoints it applied to: Deny per direction (nothing for a tier whose
/// `defaultAction` is Pass, or for untracked and preDNAT tiers).
pub(super) fn end_of_tier(
    model: &Model,
    tier: &Tier,
    position: u32,
    covered: [Vec<usize>; 2],
    rules: &mut Vec<Rule>,
) {
    if tier.default_pass {
        return;
    }
    for (direction, ids) in [Direction::Ingress, Direction::Egress]
        .into_iter()
        .zip(covered)
    {
        for v6 in [false, true] {
            let Some(set) = model.addrs(&ids, v6).to_addr_set() else {
                continue;
            };
            let mut m = Match::any(direction);
            match direction {
                Direction::Ingress => m.dst = set,
                Direction::Egress => m.src = set,
            }
            rules.push(
                Rule::new(
                    m,
                    Action::Decide(Verdict::Deny(DenyReason::Policy)),
                    false,
                    Origin {
                        layer: Layer::Gateway,
                        object: format!("calico/end-of-tier/{}", tier.name),
                        index: None,
                        source: "Calico semantics".into(),
                        why: format!(
                            "the {} endpoint is selected by a policy of Calico tier `{}` for {direction}, and no rule of the tier decided this flow (end-of-tier deny)",
                            if direction == Direction::Ingress { "destination" } else { "source" },
                            tier.name
                        ),
                    },
                )
                .in_tier(position),
            );
        }
    }
}

/// `check`'s SNAT pitfall for Calico: with `externalTrafficPolicy: Cluster`, kube-proxy may
/// forward NodePort traffic to another node with the client's address replaced by the node's,
/// so a workload policy that decides on the client's address (`nets`, `notNets`) sees the node
/// instead. Calico's documented answer is a preDNAT policy on the host endpoints.
pub(super) fn snat_warnings(
    model: &Model,
    snap: &Snapshot,
    policies: &[&Located<CalicoPolicy>],
    warnings: &mut BTreeSet<String>,
) {
    for svc in snap.services.iter().map(|s| &s.object) {
        if svc.etp_local || !(svc.kind == "NodePort" || svc.kind == "LoadBalancer") {
            continue;
        }
        let backends: BTreeSet<IpAddr> = snap
            .endpoint_slices
            .iter()
            .map(|s| &s.object)
            .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
            .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.iter().copied()))
            .collect();
        if backends.is_empty() {
            continue;
        }
        for l in policies {
            let p = &l.object;
            if phase(p) != Phase::Normal || p.kind == CalicoKind::KubernetesNetworkPolicy {
                continue;
            }
            let by_client = p
                .ingress
                .iter()
                .any(|r| !r.source.nets.is_empty() || !r.source.not_nets.is_empty());
            if !by_client {
                continue;
            }
            let hit = model.applies_to(p).into_iter().find(|&i| {
                model.endpoints[i]
                    .addrs
                    .iter()
                    .any(|a| backends.contains(&a.addr()))
            });
            if hit.is_some() {
                warnings.insert(format!(
                    "SNAT pitfall: {} decides on client addresses (source nets) for backends of Service {} (NodePort, externalTrafficPolicy Cluster); kube-proxy may forward such traffic to another node with the source rewritten to the node address, so the pod's policy sees the node, not the client. Enforce client addresses with a preDNAT GlobalNetworkPolicy on the host endpoints (which the gateway enforces at the edge), or use externalTrafficPolicy: Local",
                    p.id(),
                    svc.id()
                ));
            }
        }
    }
}

/// Two Calico objects of one kind and name (a policy directory and the API both holding it, or
/// a stale copy) would both apply; refuse the table instead, as for GatewayPolicies.
pub(super) fn duplicates(
    snap: &Snapshot,
    policies: &[&Located<CalicoPolicy>],
) -> Result<(), super::CompileError> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    let ids = policies
        .iter()
        .map(|p| (p.object.id(), p.source.as_str()))
        .chain(
            snap.tiers
                .iter()
                .map(|t| (format!("Tier/{}", t.object.name), t.source.as_str())),
        )
        .chain(
            snap.network_sets
                .iter()
                .map(|n| (n.object.id(), n.source.as_str())),
        )
        .chain(
            snap.host_endpoints
                .iter()
                .map(|h| (format!("HostEndpoint/{}", h.object.name), h.source.as_str())),
        );
    for (id, source) in ids {
        if let Some(first) = seen.insert(id.clone(), source) {
            return Err(super::CompileError::DuplicatePolicy {
                name: id,
                first: first.to_string(),
                second: source.to_string(),
            });
        }
    }
    Ok(())
}
