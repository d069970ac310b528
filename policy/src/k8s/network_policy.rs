//! `networking.k8s.io/v1` NetworkPolicy, defaulted as the API server does.

use std::net::IpAddr;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};
use crate::rule::Prefix;
use crate::selector::LabelSelector;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Prefix,
    pub except: Vec<Prefix>,
}

impl IpBlock {
    pub fn contains(&self, a: IpAddr) -> bool {
        let (v6, bits) = crate::rule::addr_bits(a);
        self.cidr.contains_bits(v6, bits) && !self.except.iter().any(|e| e.contains_bits(v6, bits))
    }
}

/// One peer of a rule. Selector peers match only pods; an ipBlock matches any address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pods: Option<LabelSelector>,
    pub namespaces: Option<LabelSelector>,
    pub block: Option<IpBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpPort {
    pub proto: u8,
    pub port: Option<PortRef>,
    pub end_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpRule {
    /// Empty: every port.
    pub ports: Vec<NpPort>,
    /// Empty: every peer.
    pub peers: Vec<Peer>,
}

/// A NetworkPolicy after API-server defaulting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    pub ingress_isolation: bool,
    pub egress_isolation: bool,
    pub ingress: Vec<NpRule>,
    pub egress: Vec<NpRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IpBlockW {
    pub(super) cidr: String,
    #[serde(default)]
    pub(super) except: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PeerW {
    #[serde(default)]
    pub(super) pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub(super) namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub(super) ip_block: Option<IpBlockW>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NpPortW {
    #[serde(default)]
    pub(super) protocol: Option<String>,
    #[serde(default)]
    pub(super) port: Option<PortRef>,
    #[serde(default)]
    pub(super) end_port: Option<u16>,
}

#[derive(Deserialize)]
struct NpIngressW {
    #[serde(default)]
    ports: Option<Vec<NpPortW>>,
    #[serde(default)]
    from: Option<Vec<PeerW>>,
}

#[derive(Deserialize)]
struct NpEgressW {
    #[serde(default)]
    ports: Option<Vec<NpPortW>>,
    #[serde(default)]
    to: Option<Vec<PeerW>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NpSpecW {
    #[serde(default)]
    pod_selector: LabelSelector,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
    #[serde(default)]
    ingress: Option<Vec<NpIngressW>>,
    #[serde(default)]
    egress: Option<Vec<NpEgressW>>,
}

#[derive(Deserialize)]
struct NpW {
    metadata: ObjectMeta,
    spec: NpSpecW,
}

pub(super) fn peers(list: &[PeerW], field: &str) -> Result<Vec<Peer>, FieldError> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let block = match &p.ip_block {
            None => None,
            Some(b) => {
                if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                    return Err(FieldError::new(
                        &f,
                        "ipBlock cannot be combined with a selector in one peer",
                    ));
                }
                let cidr: Prefix = b.cidr.parse().map_err(|e: crate::rule::PrefixParseError| {
                    FieldError::new(format!("{f}.ipBlock.cidr"), e.to_string())
                })?;
                let mut except = Vec::new();
                for (j, e) in b.except.iter().flatten().enumerate() {
                    let p: Prefix = e.parse().map_err(|x: crate::rule::PrefixParseError| {
                        FieldError::new(format!("{f}.ipBlock.except[{j}]"), x.to_string())
                    })?;
                    if !cidr.contains(&p) {
                        return Err(FieldError::new(
                            format!("{f}.ipBlock.except[{j}]"),
                            format!("{p} is not inside the cidr {cidr}"),
                        ));
                    }
                    except.push(p);
                }
                Some(IpBlock { cidr, except })
            }
        };
        for (sel, name) in [
            (&p.pod_selector, "podSelector"),
            (&p.namespace_selector, "namespaceSelector"),
        ] {
            if let Some(s) = sel {
                s.validate()
                    .map_err(|m| FieldError::new(format!("{f}.{name}"), m.to_string()))?;
            }
        }
        if block.is_none() && p.pod_selector.is_none() && p.namespace_selector.is_none() {
            return Err(FieldError::new(
                &f,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
        }
        out.push(Peer {
            pods: p.pod_selector.clone(),
            namespaces: p.namespace_selector.clone(),
            block,
        });
    }
    Ok(out)
}

pub(super) fn np_ports(list: &[NpPortW], field: &str) -> Result<Vec<NpPort>, FieldError> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let proto = proto_of(p.protocol.as_deref(), &format!("{f}.protocol"))?;
        if let Some(end) = p.end_port {
            match &p.port {
                Some(PortRef::Number(n)) if *n <= end => {}
                Some(PortRef::Number(_)) => {
                    return Err(FieldError::new(
                        format!("{f}.endPort"),
                        "must not be below port",
                    ))
                }
                _ => {
                    return Err(FieldError::new(
                        format!("{f}.endPort"),
                        "needs a numeric port",
                    ))
                }
            }
        }
        out.push(NpPort {
            proto,
            port: p.port.clone(),
            end_port: p.end_port,
        });
    }
    Ok(out)
}

impl NetworkPolicy {
    pub fn from_yaml(v: serde_norway::Value) -> Result<NetworkPolicy, FieldError> {
        let w: NpW = from_value(v)?;
        w.spec
            .pod_selector
            .validate()
            .map_err(|m| FieldError::new("spec.podSelector", m.to_string()))?;
        let mut ingress = Vec::new();
        for (i, r) in w.spec.ingress.iter().flatten().enumerate() {
            ingress.push(NpRule {
                ports: np_ports(
                    r.ports.as_deref().unwrap_or(&[]),
                    &format!("spec.ingress[{i}].ports"),
                )?,
                peers: peers(
                    r.from.as_deref().unwrap_or(&[]),
                    &format!("spec.ingress[{i}].from"),
                )?,
            });
        }
        let mut egress = Vec::new();
        for (i, r) in w.spec.egress.iter().flatten().enumerate() {
            egress.push(NpRule {
                ports: np_ports(
                    r.ports.as_deref().unwrap_or(&[]),
                    &format!("spec.egress[{i}].ports"),
                )?,
                peers: peers(
                    r.to.as_deref().unwrap_or(&[]),
                    &format!("spec.egress[{i}].to"),
                )?,
            });
        }
        // Defaulting (pkg/apis/networking/v1/defaults.go): no policyTypes means Ingress, plus
        // Egress when egress rules are present.
        let (mut ing, mut eg) = (false, false);
        match &w.spec.policy_types {
            Some(types) if !types.is_empty() => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => ing = true,
                        "Egress" => eg = true,
                        o => {
                            return Err(FieldError::new(
                                format!("spec.policyTypes[{i}]"),
                                format!("`{o}` is not Ingress or Egress"),
                            ))
                        }
                    }
                }
            }
            _ => {
                ing = true;
                eg = !egress.is_empty();
            }
        }
        Ok(NetworkPolicy {
            namespace: namespace_of(&w.metadata)?,
            name: name_of(&w.metadata)?,
            pod_selector: w.spec.pod_selector,
            ingress_isolation: ing,
            egress_isolation: eg,
            ingress,
            egress,
        })
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
