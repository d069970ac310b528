//! The NetworkPolicy v1 engine: the reference semantics for both directions, plus what the edge
//! needs from it (which external clients a workload admits, as an address set).
//!
//! - A workload is isolated for ingress when a NetworkPolicy in its namespace selects it with
//!   Ingress in its (defaulted) policyTypes, or a SecurityGroup selects it.
//! - Traffic is admitted when some ingress rule of some selecting policy matches both the port
//!   (empty, by number, by `port..endPort`, or by a named port resolved against the destination
//!   workload's container ports with the same protocol) and the peer (empty, an ipBlock holding the
//!   source address, or pod/namespace selectors matching a source *pod*).
//! - Egress is the mirror image from the source workload's side.
//!
//! Checked against every probe of `../shared/data/netpol` (see `tests/netpol.rs`).

use std::net::IpAddr;

use crate::k8s::{
    Namespace, NetworkPolicy, NpPort, NpRule, Peer, PortRef, SecurityGroup, Workload,
};
use crate::rule::{addr_bits, PrefixSet};
use crate::selector::Labels;

/// One end of a flow: a known workload or an address outside the cluster.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    Workload(&'a Workload),
    External(IpAddr),
}

impl End<'_> {
    fn addr(&self) -> Option<IpAddr> {
        match self {
            End::Workload(w) => w.ips.first().copied(),
            End::External(a) => Some(*a),
        }
    }
}

/// Which clients a workload admits: everyone, or an address set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admitted {
    All,
    Set(PrefixSet),
}

impl Admitted {
    pub(crate) fn intersect(&self, o: &Admitted) -> Admitted {
        match (self, o) {
            (Admitted::All, x) | (x, Admitted::All) => x.clone(),
            (Admitted::Set(a), Admitted::Set(b)) => Admitted::Set(a.intersect(b)),
        }
    }

    pub(crate) fn union(&self, o: &Admitted) -> Admitted {
        match (self, o) {
            (Admitted::All, _) | (_, Admitted::All) => Admitted::All,
            (Admitted::Set(a), Admitted::Set(b)) => Admitted::Set(a.union(b)),
        }
    }

    pub(crate) fn contains(&self, a: IpAddr) -> bool {
        match self {
            Admitted::All => true,
            Admitted::Set(s) => {
                let (v6, bits) = addr_bits(a);
                s.contains(v6, bits)
            }
        }
    }
}

impl std::fmt::Display for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admitted::All => f.write_str("every client"),
            Admitted::Set(s) if s.is_empty() => f.write_str("no client"),
            Admitted::Set(s) => write!(f, "{s}"),
        }
    }
}

/// The objects the engine reads.
#[derive(Debug, Clone, Copy)]
pub struct Cluster<'a> {
    pub namespaces: &'a [Namespace],
    pub workloads: &'a [Workload],
    pub policies: &'a [NetworkPolicy],
    pub security_groups: &'a [SecurityGroup],
}

impl<'a> Cluster<'a> {
    fn ns_labels(&self, ns: &str) -> Option<&'a Labels> {
        self.namespaces
            .iter()
            .find(|n| n.name == ns)
            .map(|n| &n.labels)
    }

    /// The workload with this address, if any.
    pub(crate) fn workload_at(&self, a: IpAddr) -> Option<&'a Workload> {
        self.workloads.iter().find(|w| w.ips.contains(&a))
    }

    /// The workload `namespace/name`, if any.
    pub fn workload(&self, id: &str) -> Option<&'a Workload> {
        let (ns, name) = id.split_once('/')?;
        self.workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == name)
    }

    fn selecting(
        &self,
        w: &'a Workload,
        ingress: bool,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        let w_ns = w.namespace.clone();
        let labels = &w.labels;
        self.policies.iter().filter(move |p| {
            p.namespace == w_ns
                && (if ingress {
                    p.ingress_isolation
                } else {
                    p.egress_isolation
                })
                && p.pod_selector.matches(labels)
        })
    }

    fn groups(&self, w: &'a Workload) -> impl Iterator<Item = &'a SecurityGroup> + 'a {
        let w_ns = w.namespace.clone();
        let labels = &w.labels;
        self.security_groups
            .iter()
            .filter(move |g| g.namespace == w_ns && g.selector.matches(labels))
    }

    /// The NetworkPolicies (and SecurityGroups) that isolate `w` for ingress, by id.
    pub(crate) fn isolating(&self, w: &'a Workload) -> Vec<String> {
        let mut v: Vec<String> = self
            .selecting(w, true)
            .map(|p| format!("NetworkPolicy/{}", p.id()))
            .collect();
        v.extend(
            self.groups(w)
                .map(|g| format!("SecurityGroup/{}/{}", g.namespace, g.name)),
        );
        v
    }

    /// The NetworkPolicies that isolate `w` for egress.
    pub(crate) fn egress_policies(&self, w: &'a Workload) -> Vec<&'a NetworkPolicy> {
        self.selecting(w, false).collect()
    }

    pub(crate) fn ingress_isolated(&self, w: &'a Workload) -> bool {
        self.selecting(w, true).next().is_some() || self.groups(w).next().is_some()
    }

    fn peer_matches(&self, policy_ns: &str, peer: &Peer, who: &End) -> bool {
        if let Some(b) = &peer.block {
            return who.addr().is_some_and(|a| b.contains(a));
        }
        let End::Workload(w) = who else {
            return false; // selectors never match an external address
        };
        let ns_ok = match &peer.namespaces {
            None => w.namespace == policy_ns,
            Some(sel) => self.ns_labels(&w.namespace).is_some_and(|l| sel.matches(l)),
        };
        ns_ok && peer.pods.as_ref().is_none_or(|sel| sel.matches(&w.labels))
    }

    fn port_matches(ports: &[NpPort], proto: u8, port: u16, dest: Option<&Workload>) -> bool {
        ports.is_empty()
            || ports.iter().any(|p| {
                p.proto == proto
                    && match &p.port {
                        None => true,
                        Some(PortRef::Number(n)) => match p.end_port {
                            Some(end) => *n <= port && port <= end,
                            None => *n == port,
                        },
                        Some(PortRef::Name(name)) => {
                            dest.and_then(|d| d.resolve(name, proto)) == Some(port)
                        }
                    }
            })
    }

    fn rule_admits(
        &self,
        ns: &str,
        r: &NpRule,
        from: &End,
        to: Option<&Workload>,
        proto: u8,
        port: u16,
    ) -> bool {
        Self::port_matches(&r.ports, proto, port, to)
            && (r.peers.is_empty() || r.peers.iter().any(|p| self.peer_matches(ns, p, from)))
    }

    /// Whether `to` admits traffic from `from` on `proto`/`port` (the destination side).
    pub fn ingress_allowed(&self, from: End, to: &'a Workload, proto: u8, port: u16) -> bool {
        if !self.ingress_isolated(to) {
            return true;
        }
        self.selecting(to, true).any(|p| {
            p.ingress
                .iter()
                .any(|r| self.rule_admits(&p.namespace, r, &from, Some(to), proto, port))
        }) || self.groups(to).any(|g| {
            g.ingress
                .iter()
                .any(|r| self.rule_admits(&g.namespace, r, &from, Some(to), proto, port))
        })
    }

    /// Whether `from` may send to `to` on `proto`/`port` (the source side).
    pub fn egress_allowed(&self, from: &'a Workload, to: End, proto: u8, port: u16) -> bool {
        let mut selecting = self.selecting(from, false).peekable();
        if selecting.peek().is_none() {
            return true;
        }
        let dest = match to {
            End::Workload(w) => Some(w),
            End::External(_) => None,
        };
        selecting.any(|p| {
            p.egress
                .iter()
                .any(|r| self.rule_admits(&p.namespace, r, &to, dest, proto, port))
        })
    }

    /// The external clients `to` admits on `proto`/`port`: only ipBlock peers (and rules with no
    /// peers) can admit an address outside the cluster.
    pub(crate) fn admitted_external(&self, to: &'a Workload, proto: u8, port: u16) -> Admitted {
        if !self.ingress_isolated(to) {
            return Admitted::All;
        }
        let rules = self
            .selecting(to, true)
            .flat_map(|p| p.ingress.iter())
            .chain(self.groups(to).flat_map(|g| g.ingress.iter()));
        let mut acc = Admitted::Set(PrefixSet::empty());
        for r in rules {
            if !Self::port_matches(&r.ports, proto, port, Some(to)) {
                continue;
            }
            if r.peers.is_empty() {
                return Admitted::All;
            }
            for p in &r.peers {
                if let Some(b) = &p.block {
                    acc = acc.union(&Admitted::Set(PrefixSet::block(b.cidr, &b.except)));
                }
            }
        }
        acc
    }
}
