//! Calico's policy objects (`projectcalico.org/v3`, and the `crd.projectcalico.org/v1` storage
//! form): GlobalNetworkPolicy and NetworkPolicy, Tier, GlobalNetworkSet and NetworkSet,
//! HostEndpoint. The semantics they get are in `compile/calico.rs`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{parse_port, FieldError, ObjectMeta, PortSpec, RuleAction};
use crate::key::proto;
use crate::rule::{PortRange, Prefix};
use crate::selector::{Expr, Labels};

/// A Calico port: a range, or a named port resolved against the endpoints of the rule's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalicoPort {
    Range(PortRange),
    Named(String),
}

/// `serviceAccounts` in a rule: the endpoints running as one of `names` (when given) whose
/// service account matches `selector` (when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    pub names: Vec<String>,
    pub selector: Option<Expr>,
}

/// `services` in a rule: a Kubernetes Service, by name and namespace (the policy's own for a
/// namespaced policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMatch {
    pub name: String,
    pub namespace: Option<String>,
}

/// One side of a rule (Calico's EntityRule).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalicoEntity {
    pub nets: Vec<Prefix>,
    pub not_nets: Vec<Prefix>,
    pub selector: Option<Expr>,
    pub not_selector: Option<Expr>,
    pub namespace_selector: Option<Expr>,
    pub service_accounts: Option<ServiceAccountMatch>,
    pub services: Option<ServiceMatch>,
    pub ports: Vec<CalicoPort>,
    pub not_ports: Vec<CalicoPort>,
}

impl CalicoEntity {
    /// Whether the side is constrained to endpoints (workloads, host endpoints, network sets).
    pub fn selects_endpoints(&self) -> bool {
        self.selector.is_some()
            || self.namespace_selector.is_some()
            || self.service_accounts.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalicoRule {
    pub action: RuleAction,
    /// `ipVersion`: 4 or 6 restricts the rule to that family.
    pub ip_version: Option<u8>,
    pub proto: Option<u8>,
    pub not_proto: Option<u8>,
    /// `icmp`: type and optional code.
    pub icmp: Option<(u8, Option<u8>)>,
    pub not_icmp: Option<(u8, Option<u8>)>,
    pub source: CalicoEntity,
    pub destination: CalicoEntity,
}

/// Which API object a Calico-layer policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CalicoKind {
    GlobalNetworkPolicy,
    NetworkPolicy,
    /// A Kubernetes NetworkPolicy as Calico runs it (order 1000, default tier, Allow rules).
    KubernetesNetworkPolicy,
}

/// A Calico policy, validated and with `types` resolved Calico's way.
#[derive(Debug, Clone, PartialEq)]
pub struct CalicoPolicy {
    pub kind: CalicoKind,
    /// `None` for a GlobalNetworkPolicy.
    pub namespace: Option<String>,
    pub name: String,
    pub tier: String,
    /// Lower first; absent means after every ordered policy.
    pub order: Option<f64>,
    pub selector: Expr,
    /// A GlobalNetworkPolicy's `namespaceSelector`: only endpoints in matching namespaces.
    pub namespace_selector: Option<Expr>,
    /// Only endpoints whose service account matches.
    pub service_account_selector: Option<Expr>,
    /// Applies to host endpoints' traffic before DNAT (ingress only).
    pub pre_dnat: bool,
    /// Applies to host endpoints' forwarded traffic too.
    pub apply_on_forward: bool,
    /// Applies to host endpoints' traffic untracked (Calico's raw table), before anything else.
    pub do_not_track: bool,
    /// `types` includes Ingress / Egress (as given, or inferred from the rules as Calico does).
    pub ingress_type: bool,
    pub egress_type: bool,
    pub ingress: Vec<CalicoRule>,
    pub egress: Vec<CalicoRule>,
}

/// A Calico tier (`projectcalico.org/v3` Tier).
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub name: String,
    /// Lower first; absent means after every ordered tier.
    pub order: Option<f64>,
    /// What happens when the tier applies to an endpoint and no rule decides: Deny, or Pass to
    /// the next tier.
    pub default_pass: bool,
}

/// The order of the tier named `default` when no Tier object gives one (Calico creates it with
/// this order).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;

impl Tier {
    /// The `default` tier as Calico creates it.
    pub fn default_tier() -> Tier {
        Tier {
            name: "default".into(),
            order: Some(DEFAULT_TIER_ORDER),
            default_pass: false,
        }
    }
}

/// A GlobalNetworkSet (`namespace: None`) or namespaced NetworkSet: labelled CIDRs that rule
/// selectors match like endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSet {
    pub namespace: Option<String>,
    pub name: String,
    pub labels: Labels,
    pub nets: Vec<Prefix>,
}

/// A Calico HostEndpoint: a node's interface and the addresses it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEndpoint {
    pub name: String,
    pub node: Option<String>,
    /// `*` for every interface of the node.
    pub interface: Option<String>,
    pub expected_ips: Vec<IpAddr>,
    pub labels: Labels,
    /// Named ports (`spec.ports`).
    pub ports: Vec<NamedPort>,
}

/// A Kubernetes ServiceAccount: its labels are what `serviceAccountSelector`s match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceAccountsW {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    selector: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesW {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CalicoEntityW {
    #[serde(default)]
    nets: Vec<String>,
    #[serde(default)]
    not_nets: Vec<String>,
    #[serde(default)]
    selector: Option<String>,
    #[serde(default)]
    not_selector: Option<String>,
    #[serde(default)]
    namespace_selector: Option<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    not_ports: Vec<PortSpec>,
    #[serde(default)]
    service_accounts: Option<ServiceAccountsW>,
    #[serde(default)]
    services: Option<ServicesW>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IcmpW {
    #[serde(rename = "type")]
    icmp_type: u8,
    #[serde(default)]
    code: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CalicoRuleW {
    action: RuleAction,
    #[serde(default)]
    protocol: Option<crate::gateway_policy::ProtocolSpec>,
    #[serde(default)]
    not_protocol: Option<crate::gateway_policy::ProtocolSpec>,
    #[serde(default)]
    icmp: Option<IcmpW>,
    #[serde(default, rename = "notICMP")]
    not_icmp: Option<IcmpW>,
    #[serde(default)]
    ip_version: Option<u8>,
    #[serde(default)]
    source: CalicoEntityW,
    #[serde(default)]
    destination: CalicoEntityW,
    /// Rule annotations; they change no verdict.
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde_norway::Value>,
    #[serde(default)]
    http: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CalicoSpecW {
    #[serde(default)]
    order: Option<f64>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    selector: Option<String>,
    #[serde(default)]
    namespace_selector: Option<String>,
    #[serde(default)]
    service_account_selector: Option<String>,
    #[serde(default)]
    types: Option<Vec<String>>,
    #[serde(default, rename = "preDNAT")]
    pre_dnat: bool,
    #[serde(default)]
    apply_on_forward: bool,
    #[serde(default)]
    do_not_track: bool,
    #[serde(default)]
    ingress: Vec<CalicoRuleW>,
    #[serde(default)]
    egress: Vec<CalicoRuleW>,
    /// Staged and performance hints change no verdict.
    #[serde(default)]
    #[allow(dead_code)]
    performance_hints: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
struct CalicoW {
    metadata: ObjectMeta,
    spec: CalicoSpecW,
}

fn expr(s: &Option<String>, field: &str) -> Result<Option<Expr>, FieldError> {
    s.as_ref()
        .map(|s| Expr::parse(s).map_err(|m| FieldError::new(field, format!("selector `{s}`: {m}"))))
        .transpose()
}

fn protocol(p: &crate::gateway_policy::ProtocolSpec, field: &str) -> Result<u8, FieldError> {
    match p {
        crate::gateway_policy::ProtocolSpec::Number(n) => Ok(*n),
        crate::gateway_policy::ProtocolSpec::Name(n) => proto::parse(n).ok_or_else(|| {
            FieldError::new(
                field,
                format!("`{n}` is not a protocol (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 0-255)"),
            )
        }),
    }
}

fn nets(v: &[String], field: &str) -> Result<Vec<Prefix>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, n)| {
            n.parse().map_err(|x: crate::rule::PrefixParseError| {
                FieldError::new(format!("{field}[{i}]"), x.to_string())
            })
        })
        .collect()
}

fn ports(v: &[PortSpec], field: &str) -> Result<Vec<CalicoPort>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, p)| match p {
            PortSpec::Text(t)
                if !t.is_empty() && t.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) =>
            {
                Ok(CalicoPort::Named(t.clone()))
            }
            other => Ok(CalicoPort::Range(parse_port(
                other,
                &format!("{field}[{i}]"),
            )?)),
        })
        .collect()
}

/// `global()` means "no namespace" only on its own (Calico's validator refuses it combined).
fn global_alone(e: &Option<Expr>, field: &str) -> Result<(), FieldError> {
    fn has_global(e: &Expr) -> bool {
        match e {
            Expr::Global => true,
            Expr::Not(x) => has_global(x),
            Expr::And(v) | Expr::Or(v) => v.iter().any(has_global),
            _ => false,
        }
    }
    match e {
        Some(x) if *x != Expr::Global && has_global(x) => Err(FieldError::new(
            field,
            "global() must stand alone in a namespaceSelector",
        )),
        _ => Ok(()),
    }
}

fn entity(e: &CalicoEntityW, field: &str) -> Result<CalicoEntity, FieldError> {
    let namespace_selector = expr(&e.namespace_selector, &format!("{field}.namespaceSelector"))?;
    global_alone(&namespace_selector, &format!("{field}.namespaceSelector"))?;
    let service_accounts = match &e.service_accounts {
        None => None,
        Some(sa) => Some(ServiceAccountMatch {
            names: sa.names.clone(),
            selector: expr(&sa.selector, &format!("{field}.serviceAccounts.selector"))?,
        }),
    };
    let services = e.services.as_ref().map(|s| ServiceMatch {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
    });
    if services.is_some()
        && (e.selector.is_some()
            || e.not_selector.is_some()
            || e.namespace_selector.is_some()
            || e.service_accounts.is_some()
            || !e.nets.is_empty()
            || !e.not_nets.is_empty())
    {
        // Calico's validator: `services` cannot be combined with other selectors or nets.
        return Err(FieldError::new(
            format!("{field}.services"),
            "cannot be combined with nets, notNets, selector, notSelector, namespaceSelector or serviceAccounts",
        ));
    }
    Ok(CalicoEntity {
        nets: nets(&e.nets, &format!("{field}.nets"))?,
        not_nets: nets(&e.not_nets, &format!("{field}.notNets"))?,
        selector: expr(&e.selector, &format!("{field}.selector"))?,
        not_selector: expr(&e.not_selector, &format!("{field}.notSelector"))?,
        namespace_selector,
        service_accounts,
        services,
        ports: ports(&e.ports, &format!("{field}.ports"))?,
        not_ports: ports(&e.not_ports, &format!("{field}.notPorts"))?,
    })
}

fn rule(r: &CalicoRuleW, f: &str) -> Result<CalicoRule, FieldError> {
    if r.http.is_some() {
        return Err(FieldError::new(
            format!("{f}.http"),
            "is an L7 (HTTP) match, which needs Calico's application layer; the gateway decides on addresses, protocols and ports only",
        ));
    }
    let proto = r
        .protocol
        .as_ref()
        .map(|p| protocol(p, &format!("{f}.protocol")))
        .transpose()?;
    let not_proto = r
        .not_protocol
        .as_ref()
        .map(|p| protocol(p, &format!("{f}.notProtocol")))
        .transpose()?;
    if let Some(v) = r.ip_version {
        if v != 4 && v != 6 {
            return Err(FieldError::new(format!("{f}.ipVersion"), "must be 4 or 6"));
        }
    }
    for (i, which) in [(&r.icmp, "icmp"), (&r.not_icmp, "notICMP")] {
        if i.is_some() && !matches!(proto, Some(proto::ICMP | proto::ICMPV6)) {
            return Err(FieldError::new(
                format!("{f}.{which}"),
                "needs protocol ICMP or ICMPv6",
            ));
        }
    }
    let source = entity(&r.source, &format!("{f}.source"))?;
    let destination = entity(&r.destination, &format!("{f}.destination"))?;
    // Each (source port, destination port) pair is a classifier rule: bound the product as
    // GatewayPolicy does (Calico itself allows 50 entries per list).
    let pairs = source.ports.len().max(1) * destination.ports.len().max(1);
    if pairs > 4096 {
        return Err(FieldError::new(
            format!("{f}.destination.ports"),
            format!("{pairs} source x destination port pairs; at most 4096 (split the rule)"),
        ));
    }
    let numeric = |e: &CalicoEntity| {
        e.ports
            .iter()
            .chain(&e.not_ports)
            .any(|p| matches!(p, CalicoPort::Range(_)))
    };
    let named = |e: &CalicoEntity| {
        e.ports
            .iter()
            .chain(&e.not_ports)
            .any(|p| matches!(p, CalicoPort::Named(_)))
    };
    let port_proto = matches!(
        proto,
        Some(proto::TCP | proto::UDP | proto::SCTP | proto::UDPLITE)
    );
    if (numeric(&source) || numeric(&destination)) && !port_proto {
        return Err(FieldError::new(
            format!("{f}.protocol"),
            "port numbers need protocol TCP, UDP, SCTP or UDPLite",
        ));
    }
    // A named port may go without a protocol (it then matches the name's own protocol); with
    // one, the protocol must have ports.
    if (named(&source) || named(&destination)) && proto.is_some() && !port_proto {
        return Err(FieldError::new(
            format!("{f}.protocol"),
            "named ports need protocol TCP, UDP, SCTP or UDPLite, or none",
        ));
    }
    Ok(CalicoRule {
        action: r.action,
        ip_version: r.ip_version,
        proto,
        not_proto,
        icmp: r.icmp.as_ref().map(|i| (i.icmp_type, i.code)),
        not_icmp: r.not_icmp.as_ref().map(|i| (i.icmp_type, i.code)),
        source,
        destination,
    })
}

impl CalicoPolicy {
    /// `global`: GlobalNetworkPolicy (cluster-scoped) rather than a namespaced NetworkPolicy.
    pub fn from_yaml(v: serde_norway::Value, global: bool) -> Result<CalicoPolicy, FieldError> {
        let w: CalicoW = from_value(v)?;
        let s = &w.spec;
        let mut rules = [Vec::new(), Vec::new()];
        for (k, (list, key)) in [(&s.ingress, "ingress"), (&s.egress, "egress")]
            .into_iter()
            .enumerate()
        {
            for (i, r) in list.iter().enumerate() {
                let f = format!("spec.{key}[{i}]");
                let r = rule(r, &f)?;
                // Calico's validator: a Service is a destination of egress rules and a source
                // of ingress rules only, and a destination Service brings its own ports.
                let misplaced = if k == 0 {
                    r.destination.services.is_some().then_some("destination")
                } else {
                    r.source.services.is_some().then_some("source")
                };
                if let Some(side) = misplaced {
                    return Err(FieldError::new(
                        format!("{f}.{side}.services"),
                        "is allowed only in the source of ingress rules and the destination of egress rules",
                    ));
                }
                if r.destination.services.is_some()
                    && (!r.destination.ports.is_empty() || !r.destination.not_ports.is_empty())
                {
                    return Err(FieldError::new(
                        format!("{f}.destination.ports"),
                        "cannot be combined with destination.services (the Service's ports apply)",
                    ));
                }
                if global
                    && [&r.source, &r.destination]
                        .iter()
                        .any(|e| e.services.as_ref().is_some_and(|s| s.namespace.is_none()))
                {
                    return Err(FieldError::new(
                        format!("{f}.services.namespace"),
                        "is required in a GlobalNetworkPolicy",
                    ));
                }
                rules[k].push(r);
            }
        }
        let [ingress, egress] = rules;
        if s.order.is_some_and(|o| !o.is_finite()) {
            return Err(FieldError::new("spec.order", "must be a finite number"));
        }
        // Calico's defaulting (api/pkg/defaults `defaultPolicyTypesField`): egress rules only
        // give [Egress], both kinds give both, anything else [Ingress].
        let (ingress_type, egress_type) = match &s.types {
            Some(t) => {
                for (i, x) in t.iter().enumerate() {
                    if x != "Ingress" && x != "Egress" {
                        return Err(FieldError::new(
                            format!("spec.types[{i}]"),
                            format!("`{x}` is not Ingress or Egress"),
                        ));
                    }
                }
                (
                    t.iter().any(|x| x == "Ingress"),
                    t.iter().any(|x| x == "Egress"),
                )
            }
            None if !egress.is_empty() => (!ingress.is_empty(), true),
            None => (true, false),
        };
        if s.pre_dnat {
            if !global {
                return Err(FieldError::new(
                    "spec.preDNAT",
                    "only a GlobalNetworkPolicy can be preDNAT",
                ));
            }
            if egress_type || !egress.is_empty() {
                return Err(FieldError::new(
                    "spec.preDNAT",
                    "a preDNAT policy has ingress rules only (Calico refuses egress with preDNAT)",
                ));
            }
            if s.do_not_track {
                return Err(FieldError::new(
                    "spec.preDNAT",
                    "cannot be combined with doNotTrack",
                ));
            }
        }
        if (s.pre_dnat || s.do_not_track) && !s.apply_on_forward {
            return Err(FieldError::new(
                if s.pre_dnat {
                    "spec.preDNAT"
                } else {
                    "spec.doNotTrack"
                },
                "needs applyOnForward: true (Calico's rule)",
            ));
        }
        if !global && (s.do_not_track || s.apply_on_forward) {
            return Err(FieldError::new(
                if s.do_not_track {
                    "spec.doNotTrack"
                } else {
                    "spec.applyOnForward"
                },
                "only a GlobalNetworkPolicy applies to host endpoints",
            ));
        }
        if !global && s.namespace_selector.is_some() {
            return Err(FieldError::new(
                "spec.namespaceSelector",
                "only a GlobalNetworkPolicy has one (a NetworkPolicy selects in its own namespace)",
            ));
        }
        Ok(CalicoPolicy {
            kind: if global {
                CalicoKind::GlobalNetworkPolicy
            } else {
                CalicoKind::NetworkPolicy
            },
            namespace: if global {
                None
            } else {
                Some(namespace_of(&w.metadata)?)
            },
            name: name_of(&w.metadata)?,
            tier: s
                .tier
                .clone()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "default".into()),
            order: s.order,
            selector: expr(&s.selector, "spec.selector")?.unwrap_or(Expr::All),
            namespace_selector: expr(&s.namespace_selector, "spec.namespaceSelector")?,
            service_account_selector: expr(
                &s.service_account_selector,
                "spec.serviceAccountSelector",
            )?,
            pre_dnat: s.pre_dnat,
            apply_on_forward: s.apply_on_forward,
            do_not_track: s.do_not_track,
            ingress_type,
            egress_type,
            ingress: if ingress_type { ingress } else { Vec::new() },
            egress: if egress_type { egress } else { Vec::new() },
        })
    }

    pub fn id(&self) -> String {
        match (&self.kind, &self.namespace) {
            (CalicoKind::GlobalNetworkPolicy, _) | (_, None) => {
                format!("GlobalNetworkPolicy/{}", self.name)
            }
            (CalicoKind::NetworkPolicy, Some(ns)) => {
                format!("CalicoNetworkPolicy/{ns}/{}", self.name)
            }
            (CalicoKind::KubernetesNetworkPolicy, Some(ns)) => {
                format!("NetworkPolicy/{ns}/{}", self.name)
            }
        }
    }

    /// felix's order within a tier (`PolKVLess`): `order` (absent last), then name, then
    /// namespace, then kind.
    pub fn sort_key(&self) -> (f64, &str, &str, &'static str) {
        (
            self.order.unwrap_or(f64::INFINITY),
            &self.name,
            self.namespace.as_deref().unwrap_or(""),
            match self.kind {
                CalicoKind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
                CalicoKind::NetworkPolicy => "NetworkPolicy",
                CalicoKind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
            },
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TierSpecW {
    #[serde(default)]
    order: Option<f64>,
    #[serde(default)]
    default_action: Option<String>,
}

#[derive(Deserialize)]
struct TierW {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<TierSpecW>,
}

impl Tier {
    pub fn from_yaml(v: serde_norway::Value) -> Result<Tier, FieldError> {
        let w: TierW = from_value(v)?;
        let name = name_of(&w.metadata)?;
        let spec = w.spec.unwrap_or(TierSpecW {
            order: None,
            default_action: None,
        });
        let default_pass = match spec.default_action.as_deref() {
            None | Some("Deny") => false,
            Some("Pass") if name == "default" => {
                return Err(FieldError::new(
                    "spec.defaultAction",
                    "the default tier ends in Deny (Calico allows Pass only for other tiers)",
                ))
            }
            Some("Pass") => true,
            Some(other) => {
                return Err(FieldError::new(
                    "spec.defaultAction",
                    format!("`{other}` is not Deny or Pass"),
                ))
            }
        };
        if spec.order.is_some_and(|o| !o.is_finite()) {
            return Err(FieldError::new("spec.order", "must be a finite number"));
        }
        let order = match (name.as_str(), spec.order) {
            ("default", None) => Some(DEFAULT_TIER_ORDER),
            (_, o) => o,
        };
        Ok(Tier {
            name,
            order,
            default_pass,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkSetSpecW {
    #[serde(default)]
    nets: Vec<String>,
    #[serde(default)]
    allowed_egress_domains: Vec<String>,
}

#[derive(Deserialize)]
struct NetworkSetW {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<NetworkSetSpecW>,
}

impl NetworkSet {
    /// `global`: GlobalNetworkSet rather than a namespaced NetworkSet.
    pub fn from_yaml(v: serde_norway::Value, global: bool) -> Result<NetworkSet, FieldError> {
        let w: NetworkSetW = from_value(v)?;
        let spec = w.spec.unwrap_or(NetworkSetSpecW {
            nets: Vec::new(),
            allowed_egress_domains: Vec::new(),
        });
        if !spec.allowed_egress_domains.is_empty() {
            return Err(FieldError::new(
                "spec.allowedEgressDomains",
                "is not supported: the gateway matches addresses and does not snoop DNS (list the domains' CIDRs in nets instead)",
            ));
        }
        Ok(NetworkSet {
            namespace: if global {
                None
            } else {
                Some(namespace_of(&w.metadata)?)
            },
            name: name_of(&w.metadata)?,
            labels: w.metadata.labels,
            nets: nets(&spec.nets, "spec.nets")?,
        })
    }

    pub fn id(&self) -> String {
        match &self.namespace {
            None => format!("GlobalNetworkSet/{}", self.name),
            Some(ns) => format!("NetworkSet/{ns}/{}", self.name),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HepPortW {
    name: String,
    port: u16,
    protocol: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct HepSpecW {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    interface_name: Option<String>,
    #[serde(default, rename = "expectedIPs")]
    expected_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<HepPortW>,
    /// Profiles apply after the tiers; the gateway's next layers stand in for them.
    #[serde(default)]
    #[allow(dead_code)]
    profiles: Vec<String>,
}

#[derive(Deserialize)]
struct HepW {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: HepSpecW,
}

impl HostEndpoint {
    pub fn from_yaml(v: serde_norway::Value) -> Result<HostEndpoint, FieldError> {
        let w: HepW = from_value(v)?;
        let mut expected_ips = Vec::new();
        for (i, a) in w.spec.expected_ips.iter().enumerate() {
            expected_ips.push(ip(a, &format!("spec.expectedIPs[{i}]"))?);
        }
        let interface = w.spec.interface_name.filter(|s| !s.is_empty());
        if interface.is_none() && expected_ips.is_empty() {
            return Err(FieldError::new(
                "spec",
                "a host endpoint needs interfaceName or expectedIPs (Calico's rule)",
            ));
        }
        let mut ports = Vec::new();
        for (i, p) in w.spec.ports.iter().enumerate() {
            let field = format!("spec.ports[{i}].protocol");
            ports.push(NamedPort {
                name: p.name.clone(),
                port: p.port,
                proto: match proto::parse(&p.protocol) {
                    Some(x @ (proto::TCP | proto::UDP | proto::SCTP | proto::UDPLITE)) => x,
                    _ => {
                        return Err(FieldError::new(
                            field,
                            format!("`{}` is not TCP, UDP, SCTP or UDPLite", p.protocol),
                        ))
                    }
                },
            });
        }
        Ok(HostEndpoint {
            name: name_of(&w.metadata)?,
            node: w.spec.node,
            interface,
            expected_ips,
            labels: w.metadata.labels,
            ports,
        })
    }
}

impl ServiceAccount {
    pub fn from_yaml(v: serde_norway::Value) -> Result<ServiceAccount, FieldError> {
        #[derive(Deserialize)]
        struct W {
            metadata: ObjectMeta,
        }
        let w: W = from_value(v)?;
        Ok(ServiceAccount {
            namespace: namespace_of(&w.metadata)?,
            name: name_of(&w.metadata)?,
            labels: w.metadata.labels,
        })
    }
}

/// Labels of namespaces by name, for selector evaluation.
pub type NamespaceLabels = BTreeMap<String, Labels>;
