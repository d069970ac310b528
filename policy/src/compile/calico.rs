//! Calico (Global)NetworkPolicy rules at the edge, in the gateway layer.
//!
//! A policy applies to the endpoints its selector picks: with `preDNAT: true`, host endpoints
//! (nodes, by label), so rules see the pre-DNAT destination (node addresses, NodePorts): exactly
//! the edge; otherwise workloads (pods, VMIs), by their addresses. A rule's destination is the
//! policy's endpoints narrowed by the rule's `destination` nets and selector; its source is the
//! rule's `source` nets and selector. `notNets` and `notPorts` are subtracted, named ports are
//! resolved against the selected workloads.
//!
//! End of tier: a workload selected by a (non-preDNAT) policy with Ingress in its types whose
//! rules all miss is denied, as in Calico; the deny covers the workloads' own addresses. preDNAT
//! policies have no such default: unmatched traffic continues.

use std::collections::BTreeSet;

use crate::gateway_policy::RuleAction;
use crate::k8s::{CalicoEntity, CalicoPolicy, CalicoPort, Workload};
use crate::rule::{
    Action, AddrSet, DenyReason, Direction, Layer, Match, Origin, PortRange, Prefix, PrefixSet,
    Rule, Verdict,
};
use crate::selector::{Expr, Labels};
use crate::snapshot::{Located, Snapshot};

/// An address set that may be "everything".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Set {
    All,
    Some(PrefixSet),
}

impl Set {
    fn and(self, o: Set) -> Set {
        match (self, o) {
            (Set::All, x) | (x, Set::All) => x,
            (Set::Some(a), Set::Some(b)) => Set::Some(a.intersect(&b)),
        }
    }

    fn to_addr(&self) -> Option<AddrSet> {
        match self {
            Set::All => Some(AddrSet::any()),
            Set::Some(s) => s.to_addr_set(),
        }
    }
}

fn ns_labels<'a>(snap: &'a Snapshot, ns: &str) -> Option<&'a Labels> {
    snap.namespaces
        .iter()
        .find(|n| n.object.name == ns)
        .map(|n| &n.object.labels)
}

/// Workloads a selector picks; `namespace`: only that namespace (namespaced policies).
fn workloads<'a>(
    snap: &'a Snapshot,
    sel: &Expr,
    ns_sel: Option<&Expr>,
    namespace: Option<&str>,
) -> Vec<&'a Workload> {
    snap.workloads
        .iter()
        .map(|w| &w.object)
        .filter(|w| namespace.is_none_or(|n| w.namespace == n))
        .filter(|w| {
            ns_sel.is_none_or(|s| ns_labels(snap, &w.namespace).is_some_and(|l| s.matches(l)))
        })
        .filter(|w| sel.matches(&w.labels))
        .collect()
}

fn addresses(ws: &[&Workload]) -> Set {
    Set::Some(PrefixSet::of(
        ws.iter()
            .flat_map(|w| w.ips.iter().map(|a| Prefix::host(*a))),
    ))
}

/// The endpoints a policy applies to, as addresses, and the workloads among them.
fn applies_to<'a>(snap: &'a Snapshot, p: &CalicoPolicy) -> (Set, Vec<&'a Workload>) {
    if p.pre_dnat {
        if p.selector == Expr::All {
            return (Set::All, Vec::new());
        }
        let nodes = snap
            .nodes
            .iter()
            .map(|n| &n.object)
            .filter(|n| p.selector.matches(&n.labels));
        return (
            Set::Some(PrefixSet::of(
                nodes.flat_map(|n| n.addresses.iter().map(|a| Prefix::host(*a))),
            )),
            Vec::new(),
        );
    }
    let ws = workloads(
        snap,
        &p.selector,
        p.namespace_selector.as_ref(),
        p.namespace.as_deref(),
    );
    if p.selector == Expr::All && p.namespace.is_none() && p.namespace_selector.is_none() {
        return (Set::All, ws);
    }
    (addresses(&ws), ws)
}

/// An entity's nets and selector as an address set (selected workloads of `namespace` by default).
fn entity_set(snap: &Snapshot, e: &CalicoEntity, namespace: Option<&str>) -> Set {
    let mut s = if e.nets.is_empty() {
        Set::All
    } else {
        Set::Some(PrefixSet::of(e.nets.iter().copied()))
    };
    if !e.not_nets.is_empty() {
        let base = match s {
            Set::All => PrefixSet::everything(),
            Set::Some(x) => x,
        };
        s = Set::Some(base.minus(&e.not_nets));
    }
    if let Some(sel) = &e.selector {
        let ns = if e.namespace_selector.is_some() {
            None
        } else {
            namespace
        };
        s = s.and(addresses(&workloads(
            snap,
            sel,
            e.namespace_selector.as_ref(),
            ns,
        )));
    }
    s
}

/// Ranges a port list allows: the union of `ports` (named ones resolved against `ws`), or every
/// port, minus `not_ports`.
fn port_ranges(
    ports: &[CalicoPort],
    not_ports: &[PortRange],
    proto: Option<u8>,
    ws: &[&Workload],
    warn: &mut dyn FnMut(String),
) -> Vec<PortRange> {
    let mut v: Vec<PortRange> = Vec::new();
    for p in ports {
        match p {
            CalicoPort::Range(r) => v.push(*r),
            CalicoPort::Named(name) => {
                let found: BTreeSet<u16> = ws
                    .iter()
                    .filter_map(|w| proto.and_then(|pr| w.resolve(name, pr)))
                    .collect();
                if found.is_empty() {
                    warn(format!(
                        "named port `{name}` resolves on no selected workload"
                    ));
                }
                v.extend(found.into_iter().map(PortRange::single));
            }
        }
    }
    if ports.is_empty() {
        v.push(PortRange::ANY);
    }
    for hole in not_ports {
        v = v
            .into_iter()
            .flat_map(|r| {
                let mut out = Vec::new();
                if hole.hi < r.lo || hole.lo > r.hi {
                    out.push(r);
                } else {
                    if hole.lo > r.lo {
                        out.push(PortRange {
                            lo: r.lo,
                            hi: hole.lo - 1,
                        });
                    }
                    if hole.hi < r.hi {
                        out.push(PortRange {
                            lo: hole.hi + 1,
                            hi: r.hi,
                        });
                    }
                }
                out
            })
            .collect();
    }
    v.sort();
    v.dedup();
    v
}

/// Compiles one policy's rules; returns the addresses its end-of-tier deny covers.
pub(super) fn compile(
    snap: &Snapshot,
    l: &Located<CalicoPolicy>,
    rules: &mut Vec<Rule>,
    warnings: &mut BTreeSet<String>,
) -> Option<Set> {
    let p = &l.object;
    let object = p.id();
    let (applies, ws) = applies_to(snap, p);
    for (direction, list) in [
        (Direction::Ingress, &p.ingress),
        (Direction::Egress, &p.egress),
    ] {
        for (i, r) in list.iter().enumerate() {
            let what = format!("{object} {direction}[{i}]");
            let src_set = entity_set(snap, &r.source, p.namespace.as_deref());
            let dst_set = entity_set(snap, &r.destination, p.namespace.as_deref());
            let (mut src, mut dst) = match direction {
                Direction::Ingress => (src_set, applies.clone().and(dst_set)),
                Direction::Egress => (applies.clone().and(src_set), dst_set),
            };
            if let Some(v) = r.ip_version {
                let family = Set::Some(PrefixSet::of([Prefix::any(v == 6)]));
                src = src.and(family.clone());
                dst = dst.and(family);
            }
            let (Some(src), Some(dst)) = (src.to_addr(), dst.to_addr()) else {
                warnings.insert(format!("{what}: matches no address (its selectors pick no endpoint, or its nets and the policy's endpoints do not overlap)"));
                continue;
            };
            let port_ws: Vec<&Workload> = if direction == Direction::Ingress {
                ws.clone()
            } else {
                Vec::new()
            };
            let mut warn = |m: String| {
                warnings.insert(format!("{what}: {m}"));
            };
            let (sports, dports) = match r.icmp {
                Some((t, code)) => (
                    vec![PortRange::single(t.into())],
                    vec![code.map_or(PortRange { lo: 0, hi: 255 }, |c| {
                        PortRange::single(c.into())
                    })],
                ),
                None => (
                    port_ranges(
                        &r.source.ports,
                        &r.source.not_ports,
                        r.proto,
                        &[],
                        &mut warn,
                    ),
                    port_ranges(
                        &r.destination.ports,
                        &r.destination.not_ports,
                        r.proto,
                        &port_ws,
                        &mut warn,
                    ),
                ),
            };
            let action = match r.action {
                RuleAction::Allow => Action::Decide(Verdict::Allow),
                RuleAction::Deny => Action::Decide(Verdict::Deny(DenyReason::Policy)),
                RuleAction::Pass => Action::Pass,
                RuleAction::Log => Action::Log,
            };
            for s in &sports {
                for d in &dports {
                    rules.push(Rule::new(
                        Match {
                            direction,
                            src: src.clone(),
                            dst: dst.clone(),
                            proto: r.proto,
                            sport: *s,
                            dport: *d,
                            vlan: None,
                        },
                        action,
                        r.action == RuleAction::Log,
                        Origin {
                            layer: Layer::Gateway,
                            object: object.clone(),
                            index: Some(i),
                            source: l.source.clone(),
                            why: format!(
                                "{direction} rule {i} of {object} (order {})",
                                p.order.map_or("none".into(), |o| o.to_string())
                            ),
                        },
                    ));
                }
            }
        }
    }
    // The implicit deny covers the selected workloads' own addresses only, so a `selector: all()`
    // default-deny cannot blackhole Service frontends (node and LoadBalancer addresses).
    (!p.pre_dnat && p.ingress_type).then(|| addresses(&ws))
}

/// The end-of-tier deny for every endpoint some non-preDNAT Calico policy selected.
pub(super) fn end_of_tier(covered: Vec<Set>, rules: &mut Vec<Rule>) {
    let Some(all) = covered.into_iter().reduce(|a, b| match (a, b) {
        (Set::All, _) | (_, Set::All) => Set::All,
        (Set::Some(x), Set::Some(y)) => Set::Some(x.union(&y)),
    }) else {
        return;
    };
    let Some(dst) = all.to_addr() else { return };
    rules.push(Rule::new(
        Match { dst, ..Match::any(Direction::Ingress) },
        Action::Decide(Verdict::Deny(DenyReason::Policy)),
        false,
        Origin {
            layer: Layer::Gateway,
            object: "calico/end-of-tier".into(),
            index: None,
            source: "Calico semantics".into(),
            why: "the destination is selected by a Calico policy and no rule of the tier allowed this flow (Calico's end-of-tier deny)".into(),
        },
    ));
}
