//! Our own policy kind, `GatewayPolicy` (portcullis.io/v1alpha1, cluster-scoped), and the rule
//! shape it shares with the config's failsafe rules.
//!
//! The YAML ("wire") types are strict: unknown fields are errors. Validation turns them into the
//! plain model ([`GatewayPolicy`], [`PolicyRule`]) and names the field that is wrong.
//!
//! ```yaml
//! apiVersion: portcullis.io/v1alpha1
//! kind: GatewayPolicy
//! metadata: {name: block-bad-clients}
//! spec:
//!   priority: 100            # lower runs first; ties break by name
//!   ingress:                 # ext -> int, in order
//!     - action: Deny         # Allow | Deny | Pass | Log
//!       source: {nets: [203.0.113.0/24], notNets: [203.0.113.7/32]}
//!     - action: Allow
//!       protocol: TCP
//!       destination: {nets: [10.99.0.2/32], ports: [80, "8000:8080"]}
//!   egress: []               # int -> ext
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::key::proto;
use crate::rule::{AddrSet, Direction, Match, PortRange, Prefix};

pub(crate) const API_VERSION: &str = "portcullis.io/v1alpha1";

/// Protocol names a rule may use (numbers 0-255 too).
const PROTOCOL_NAMES: &[&str] = &[
    "TCP", "tcp", "UDP", "udp", "SCTP", "sctp", "ICMP", "icmp", "ICMPv6", "icmpv6",
];

/// The most (source port range x destination port range) pairs one rule may expand to.
pub const MAX_PORT_PAIRS: usize = 4096;

/// A field that failed validation: the dotted path and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Kubernetes object metadata. Lenient on purpose: kubectl output carries uid,
/// resourceVersion, managedFields and more, none of which change a verdict.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum RuleAction {
    Allow,
    Deny,
    Pass,
    Log,
}

/// A protocol given by name (`TCP`, `udp`, `ICMPv6`...) or number.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum ProtocolSpec {
    Number(u8),
    Name(String),
}

/// A port given as a number or as `"lo:hi"` (or a name, where names resolve).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(u16),
    Text(String),
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::k8s::port_or_text(
            d,
            "1-65535, a \"lo:hi\" range or a name",
            PortSpec::Number,
            PortSpec::Text,
        )
    }
}

/// One side of a rule: addresses, exceptions, ports. Every field left out means "any".
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
pub struct EndpointSpec {
    /// CIDRs or addresses (IPv4 or IPv6); none means any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 4096)))]
    pub nets: Vec<String>,
    /// CIDRs or addresses cut out of `nets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 4096)))]
    pub not_nets: Vec<String>,
    /// Ports (0-65535) or ranges ("lo:hi"); none means any port. Needs protocol TCP, UDP or SCTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 1024)))]
    pub ports: Vec<PortSpec>,
}

/// An ICMP type, and optionally its code (any code when left out).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
pub struct IcmpSpec {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// One rule as written in YAML: first match wins.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.icmp) || (has(self.protocol) && string(self.protocol) in ['ICMP', 'ICMPv6', 'icmp', 'icmpv6', '1', '58'])",
     "message": "icmp needs protocol ICMP or ICMPv6"},
    {"rule": "!((has(self.source) && has(self.source.ports) && size(self.source.ports) > 0) || (has(self.destination) && has(self.destination.ports) && size(self.destination.ports) > 0)) || (has(self.protocol) && string(self.protocol) in ['TCP', 'UDP', 'SCTP', 'tcp', 'udp', 'sctp', '6', '17', '132'])",
     "message": "ports need protocol TCP, UDP or SCTP"}
])))]
pub struct RuleSpec {
    /// Allow, Deny, Pass (on to the next layer) or Log (count and log, then go on). Required in a
    /// GatewayPolicy; a failsafe rule of the gateway config defaults to Allow.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(required))]
    pub action: Option<RuleAction>,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number 0-255; any protocol when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolSpec>,
    /// Where the packet comes from.
    #[serde(default)]
    pub source: EndpointSpec,
    /// Where the packet goes.
    #[serde(default)]
    pub destination: EndpointSpec,
    /// ICMP type/code (with protocol ICMP or ICMPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpSpec>,
    /// Outer 802.1Q VLAN id (0-4094).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(max = 4094)))]
    pub vlan: Option<u16>,
    /// Log flows that hit this rule (rate-limited).
    #[serde(default)]
    pub log: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[cfg(feature = "schema")]
mod int_or_string {
    //! `x-kubernetes-int-or-string` schemas: a number, or text ("TCP", "8000:8080").
    use std::borrow::Cow;

    fn schema() -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }

    impl schemars::JsonSchema for super::ProtocolSpec {
        fn schema_name() -> Cow<'static, str> {
            "ProtocolSpec".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
            // Bounded, so the API server's CEL cost estimate of the rules that read it stays low.
            schemars::json_schema!({ "x-kubernetes-int-or-string": true, "maxLength": 8 })
        }
    }

    impl schemars::JsonSchema for super::PortSpec {
        fn schema_name() -> Cow<'static, str> {
            "PortSpec".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
            schema()
        }
    }
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub matcher: Match,
    pub action: RuleAction,
    pub log: bool,
    pub description: Option<String>,
}

fn parse_nets(nets: &[String], field: &str) -> Result<Vec<Prefix>, FieldError> {
    nets.iter()
        .enumerate()
        .map(|(i, n)| {
            n.parse::<Prefix>()
                .map_err(|e| FieldError::new(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

/// Parses `80` or `"1000:2000"` (Calico's range syntax; `-` is accepted too).
pub(crate) fn parse_port(p: &PortSpec, field: &str) -> Result<PortRange, FieldError> {
    let bad = |what: &str| FieldError::new(field, what.to_string());
    match p {
        PortSpec::Number(n) => Ok(PortRange::single(*n)),
        PortSpec::Text(t) => {
            let t = t.trim();
            let (lo, hi) = t.split_once([':', '-']).unwrap_or((t, t));
            let num = |s: &str| s.trim().parse::<u16>();
            match (num(lo), num(hi)) {
                (Ok(lo), Ok(hi)) if lo <= hi => Ok(PortRange { lo, hi }),
                (Ok(_), Ok(_)) => Err(bad(&format!("`{t}`: the range's start is above its end"))),
                _ if !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                    Err(bad(&format!(
                        "`{t}` looks like a named port; GatewayPolicy rules need port numbers \
                         (named ports resolve only against pods)"
                    )))
                }
                _ => Err(bad(&format!(
                    "`{t}` is not a port (expected 0-65535 or \"lo:hi\")"
                ))),
            }
        }
    }
}

impl RuleSpec {
    /// Validates the rule for one direction. `field` is the rule's path, e.g. `spec.ingress[2]`.
    /// A rule with several port ranges lowers to one match per (source, destination) port pair.
    pub fn to_rules(
        &self,
        direction: Direction,
        field: &str,
    ) -> Result<Vec<PolicyRule>, FieldError> {
        let action = self.action.unwrap_or(RuleAction::Allow);
        let protocol = match &self.protocol {
            None => None,
            Some(ProtocolSpec::Number(n)) => Some(*n),
            // The spellings the CRD's CEL rules know (upper or lower case, or a number), so the
            // API server and the files accept the same rules.
            Some(ProtocolSpec::Name(s)) => Some(
                PROTOCOL_NAMES
                    .iter()
                    .any(|n| n == s)
                    .then(|| proto::parse(s))
                    .flatten()
                    .or_else(|| s.parse().ok())
                    .ok_or_else(|| {
                        FieldError::new(
                            format!("{field}.protocol"),
                            format!(
                        "`{s}` is not a protocol (expected TCP, UDP, SCTP, ICMP, ICMPv6 or 0-255)"
                    ),
                        )
                    })?,
            ),
        };
        let has_ports = !self.source.ports.is_empty() || !self.destination.ports.is_empty();
        if has_ports && !matches!(protocol, Some(proto::TCP | proto::UDP | proto::SCTP)) {
            return Err(FieldError::new(
                format!("{field}.protocol"),
                "ports need `protocol: TCP`, `UDP` or `SCTP`",
            ));
        }
        if self.icmp.is_some() && !protocol.is_some_and(proto::is_icmp) {
            return Err(FieldError::new(
                format!("{field}.icmp"),
                "icmp needs `protocol: ICMP` or `ICMPv6`",
            ));
        }
        if let Some(v) = self.vlan {
            if v > 4094 {
                return Err(FieldError::new(
                    format!("{field}.vlan"),
                    format!("{v} is not a VLAN id (expected 0-4094)"),
                ));
            }
        }
        let set = |e: &EndpointSpec, side: &str| -> Result<AddrSet, FieldError> {
            Ok(AddrSet {
                include: parse_nets(&e.nets, &format!("{field}.{side}.nets"))?,
                except: parse_nets(&e.not_nets, &format!("{field}.{side}.notNets"))?,
            })
        };
        let ports = |e: &EndpointSpec, side: &str| -> Result<Vec<PortRange>, FieldError> {
            if e.ports.is_empty() {
                return Ok(vec![PortRange::ANY]);
            }
            e.ports
                .iter()
                .enumerate()
                .map(|(i, p)| parse_port(p, &format!("{field}.{side}.ports[{i}]")))
                .collect()
        };
        let base = Match {
            direction,
            src: set(&self.source, "source")?,
            dst: set(&self.destination, "destination")?,
            proto: protocol,
            sport: PortRange::ANY,
            dport: PortRange::ANY,
            vlan: self.vlan,
        };
        let (sports, dports) = match &self.icmp {
            Some(icmp) => (
                vec![PortRange::single(icmp.icmp_type.into())],
                vec![icmp.code.map_or(PortRange { lo: 0, hi: 255 }, |c| {
                    PortRange::single(c.into())
                })],
            ),
            None => (
                ports(&self.source, "source")?,
                ports(&self.destination, "destination")?,
            ),
        };
        if sports.len() * dports.len() > MAX_PORT_PAIRS {
            return Err(FieldError::new(
                field.to_string(),
                format!(
                    "{} source x {} destination port ranges make more than {MAX_PORT_PAIRS} rules; list fewer, or merge them into ranges",
                    sports.len(),
                    dports.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(sports.len() * dports.len());
        for s in &sports {
            for d in &dports {
                out.push(PolicyRule {
                    matcher: Match {
                        sport: *s,
                        dport: *d,
                        ..base.clone()
                    },
                    action,
                    log: self.log || action == RuleAction::Log,
                    description: self.description.clone(),
                });
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewayPolicySpecWire {
    #[serde(default = "default_priority")]
    priority: i32,
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    ingress: Vec<RuleSpec>,
    #[serde(default)]
    egress: Vec<RuleSpec>,
}

/// The fields of a GatewayPolicy's `spec`, for the CRD generator to check its schema against.
pub const SPEC_FIELDS: &[&str] = &["priority", "audit", "ingress", "egress"];

pub fn default_priority() -> i32 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewayPolicyWire {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: GatewayPolicySpecWire,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_norway::Value>,
}

/// A validated GatewayPolicy. Each source rule keeps its position, because a rule with several
/// port ranges becomes several [`PolicyRule`]s that share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPolicy {
    pub name: String,
    pub priority: i32,
    pub audit: bool,
    /// `(position in spec.ingress / spec.egress, rule)`, ingress rules first.
    pub rules: Vec<(Direction, usize, PolicyRule)>,
}

/// Deserializes with the failing field's path in the error.
pub fn from_value<T: serde::de::DeserializeOwned>(v: serde_norway::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        FieldError::new(
            if path == "." {
                "(document)".into()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })
}

impl GatewayPolicy {
    /// Parses and validates one YAML document already known to be a GatewayPolicy.
    pub fn from_yaml(value: serde_norway::Value) -> Result<GatewayPolicy, FieldError> {
        let wire: GatewayPolicyWire = from_value(value)?;
        if wire.metadata.name.is_empty() {
            return Err(FieldError::new(
                "metadata.name",
                "a GatewayPolicy needs a name",
            ));
        }
        let mut rules = Vec::new();
        for (direction, list, key) in [
            (Direction::Ingress, &wire.spec.ingress, "ingress"),
            (Direction::Egress, &wire.spec.egress, "egress"),
        ] {
            for (i, r) in list.iter().enumerate() {
                if r.action.is_none() {
                    // A rule must say what it does: a missing (or misspelt) action must never
                    // turn into an Allow.
                    return Err(FieldError::new(
                        format!("spec.{key}[{i}].action"),
                        "missing: Allow, Deny, Pass or Log",
                    ));
                }
                for pr in r.to_rules(direction, &format!("spec.{key}[{i}]"))? {
                    rules.push((direction, i, pr));
                }
            }
        }
        Ok(GatewayPolicy {
            name: wire.metadata.name,
            priority: wire.spec.priority,
            audit: wire.spec.audit,
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<GatewayPolicy, FieldError> {
        GatewayPolicy::from_yaml(serde_norway::from_str(y).unwrap())
    }

    #[test]
    fn parses_a_full_policy() {
        let p = parse(
            r#"
apiVersion: portcullis.io/v1alpha1
kind: GatewayPolicy
metadata: {name: web, uid: abc, resourceVersion: "7"}
spec:
  priority: 10
  ingress:
    - action: Deny
      source: {nets: [203.0.113.0/24], notNets: [203.0.113.7]}
    - action: Allow
      protocol: TCP
      destination: {nets: [10.0.0.2/32], ports: [80, "8000:8080"]}
    - action: Allow
      protocol: ICMP
      icmp: {type: 8}
  egress:
    - action: Allow
"#,
        )
        .unwrap();
        assert_eq!(p.name, "web");
        assert_eq!(p.priority, 10);
        assert_eq!(p.rules.len(), 5);
        assert_eq!(p.rules[2].2.matcher.dport, PortRange { lo: 8000, hi: 8080 });
        assert_eq!(p.rules[2].1, 1);
        assert_eq!(p.rules[3].2.matcher.sport, PortRange::single(8));
        assert_eq!(p.rules[4].0, Direction::Egress);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("spec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [\"9:1\"]}}]}", "spec.ingress[0].destination.ports[0]"),
            ("spec: {ingress: [{action: Allow, source: {nets: [10.0.0/8]}}]}", "spec.ingress[0].source.nets[0]"),
            ("spec: {ingress: [{action: Allow, destination: {ports: [80]}}]}", "spec.ingress[0].protocol"),
            ("spec: {ingress: [{action: Maybe}]}", "spec.ingress[0].action"),
            ("spec: {ingress: [{action: Allow, colour: red}]}", "spec.ingress[0]"),
            ("spec: {priority: high}", "spec.priority"),
            ("spec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [http]}}]}", "spec.ingress[0].destination.ports[0]"),
        ];
        for (spec, field) in cases {
            let y = format!("apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {{name: x}}\n{spec}\n");
            let e = parse(&y).unwrap_err();
            assert!(e.field.starts_with(field), "{spec}: got {e}");
        }
    }
}
