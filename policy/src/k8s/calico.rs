//! Calico `GlobalNetworkPolicy` and `NetworkPolicy` (`projectcalico.org/v3` and its CRD storage form).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{parse_port, FieldError, ObjectMeta, PortSpec, RuleAction};
use crate::key::proto;
use crate::rule::{PortRange, Prefix};
use crate::selector::{Expr, Labels};

/// A Calico port: a range, or a named port resolved against the selected workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalicoPort {
    Range(PortRange),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalicoEntity {
    pub nets: Vec<Prefix>,
    pub not_nets: Vec<Prefix>,
    pub selector: Option<Expr>,
    pub namespace_selector: Option<Expr>,
    pub ports: Vec<CalicoPort>,
    pub not_ports: Vec<PortRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalicoRule {
    pub action: RuleAction,
    /// `ipVersion`: 4 or 6 restricts the rule to that family.
    pub ip_version: Option<u8>,
    pub proto: Option<u8>,
    pub icmp: Option<(u8, Option<u8>)>,
    pub source: CalicoEntity,
    pub destination: CalicoEntity,
}

/// A Calico GlobalNetworkPolicy (`namespace: None`) or namespaced NetworkPolicy.
#[derive(Debug, Clone, PartialEq)]
pub struct CalicoPolicy {
    pub namespace: Option<String>,
    pub name: String,
    /// Lower first; absent means after every ordered policy.
    pub order: Option<f64>,
    pub selector: Expr,
    pub namespace_selector: Option<Expr>,
    /// The selector picks host endpoints (nodes) and rules see pre-DNAT destinations.
    pub pre_dnat: bool,
    /// `types` includes Ingress: the selected endpoints get Calico's end-of-tier deny even when
    /// the policy has no ingress rule (the standard default-deny policy).
    pub ingress_type: bool,
    pub ingress: Vec<CalicoRule>,
    pub egress: Vec<CalicoRule>,
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
    service_accounts: Option<serde_norway::Value>,
    #[serde(default)]
    services: Option<serde_norway::Value>,
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
    not_protocol: Option<serde_norway::Value>,
    #[serde(default)]
    icmp: Option<IcmpW>,
    #[serde(default, rename = "notICMP")]
    not_icmp: Option<serde_norway::Value>,
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
    /// Where Calico enforces the policy on a host; the gateway enforces it at the edge either way.
    #[serde(default)]
    #[allow(dead_code)]
    apply_on_forward: bool,
    #[serde(default)]
    #[allow(dead_code)]
    do_not_track: bool,
    #[serde(default)]
    ingress: Vec<CalicoRuleW>,
    #[serde(default)]
    egress: Vec<CalicoRuleW>,
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

fn entity(e: &CalicoEntityW, field: &str) -> Result<CalicoEntity, FieldError> {
    let unsupported = |what: &str| {
        FieldError::new(
            format!("{field}.{what}"),
            "is not supported at the edge (the gateway sees addresses, not identities)",
        )
    };
    if e.service_accounts.is_some() {
        return Err(unsupported("serviceAccounts"));
    }
    if e.services.is_some() {
        return Err(unsupported("services"));
    }
    if e.not_selector.is_some() {
        return Err(unsupported("notSelector"));
    }
    let nets = |v: &[String], f: &str| -> Result<Vec<Prefix>, FieldError> {
        v.iter()
            .enumerate()
            .map(|(i, n)| {
                n.parse().map_err(|x: crate::rule::PrefixParseError| {
                    FieldError::new(format!("{field}.{f}[{i}]"), x.to_string())
                })
            })
            .collect()
    };
    let mut ports = Vec::new();
    for (i, p) in e.ports.iter().enumerate() {
        let f = format!("{field}.ports[{i}]");
        ports.push(match p {
            PortSpec::Text(t)
                if !t.is_empty() && t.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) =>
            {
                CalicoPort::Named(t.clone())
            }
            other => CalicoPort::Range(parse_port(other, &f)?),
        });
    }
    let mut not_ports = Vec::new();
    for (i, p) in e.not_ports.iter().enumerate() {
        not_ports.push(parse_port(p, &format!("{field}.notPorts[{i}]"))?);
    }
    Ok(CalicoEntity {
        nets: nets(&e.nets, "nets")?,
        not_nets: nets(&e.not_nets, "notNets")?,
        selector: expr(&e.selector, &format!("{field}.selector"))?,
        namespace_selector: expr(&e.namespace_selector, &format!("{field}.namespaceSelector"))?,
        ports,
        not_ports,
    })
}

impl CalicoPolicy {
    /// `global`: GlobalNetworkPolicy (cluster-scoped) rather than a namespaced NetworkPolicy.
    pub fn from_yaml(v: serde_norway::Value, global: bool) -> Result<CalicoPolicy, FieldError> {
        let w: CalicoW = from_value(v)?;
        let s = &w.spec;
        if s.tier.as_deref().is_some_and(|t| t != "default") {
            return Err(FieldError::new(
                "spec.tier",
                "only the default tier is supported (tiers would need their own order)",
            ));
        }
        if s.service_account_selector.is_some() {
            return Err(FieldError::new(
                "spec.serviceAccountSelector",
                "is not supported at the edge",
            ));
        }
        let mut rules = [Vec::new(), Vec::new()];
        for (k, (list, key)) in [(&s.ingress, "ingress"), (&s.egress, "egress")]
            .into_iter()
            .enumerate()
        {
            for (i, r) in list.iter().enumerate() {
                let f = format!("spec.{key}[{i}]");
                if r.not_protocol.is_some() || r.not_icmp.is_some() || r.http.is_some() {
                    return Err(FieldError::new(
                        &f,
                        "notProtocol, notICMP and http match are not supported at the edge",
                    ));
                }
                let proto = match &r.protocol {
                    None => None,
                    Some(crate::gateway_policy::ProtocolSpec::Number(n)) => Some(*n),
                    Some(crate::gateway_policy::ProtocolSpec::Name(n)) => {
                        Some(proto::parse(n).ok_or_else(|| {
                            FieldError::new(
                                format!("{f}.protocol"),
                                format!("`{n}` is not a protocol"),
                            )
                        })?)
                    }
                };
                if let Some(v) = r.ip_version {
                    if v != 4 && v != 6 {
                        return Err(FieldError::new(format!("{f}.ipVersion"), "must be 4 or 6"));
                    }
                }
                let source = entity(&r.source, &format!("{f}.source"))?;
                let destination = entity(&r.destination, &format!("{f}.destination"))?;
                let has_ports = !source.ports.is_empty()
                    || !destination.ports.is_empty()
                    || !source.not_ports.is_empty()
                    || !destination.not_ports.is_empty();
                if has_ports && !matches!(proto, Some(proto::TCP | proto::UDP | proto::SCTP)) {
                    return Err(FieldError::new(
                        format!("{f}.protocol"),
                        "ports need protocol TCP, UDP or SCTP",
                    ));
                }
                rules[k].push(CalicoRule {
                    action: r.action,
                    ip_version: r.ip_version,
                    proto,
                    icmp: r.icmp.as_ref().map(|i| (i.icmp_type, i.code)),
                    source,
                    destination,
                });
            }
        }
        let [ingress, egress] = rules;
        let types = s.types.clone().unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_string()];
            if !egress.is_empty() {
                t.push("Egress".into());
            }
            t
        });
        Ok(CalicoPolicy {
            namespace: if global {
                None
            } else {
                Some(namespace_of(&w.metadata)?)
            },
            name: name_of(&w.metadata)?,
            order: s.order,
            selector: expr(&s.selector, "spec.selector")?.unwrap_or(Expr::All),
            namespace_selector: expr(&s.namespace_selector, "spec.namespaceSelector")?,
            pre_dnat: s.pre_dnat,
            ingress_type: types.iter().any(|t| t == "Ingress"),
            ingress: if types.iter().any(|t| t == "Ingress") {
                ingress
            } else {
                Vec::new()
            },
            egress: if types.iter().any(|t| t == "Egress") {
                egress
            } else {
                Vec::new()
            },
        })
    }

    pub fn id(&self) -> String {
        match &self.namespace {
            None => format!("GlobalNetworkPolicy/{}", self.name),
            Some(ns) => format!("CalicoNetworkPolicy/{ns}/{}", self.name),
        }
    }
}

/// Labels of namespaces by name, for selector evaluation.
pub type NamespaceLabels = BTreeMap<String, Labels>;
