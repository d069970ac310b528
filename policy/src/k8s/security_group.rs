//! Our `SecurityGroup` kind (strict): allow rules attached to pods or VMIs by label.

use serde::Deserialize;

use super::network_policy::{np_ports, peers, IpBlockW, NpPortW, PeerW};
use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};
use crate::selector::LabelSelector;

/// `portcullis.io/v1alpha1 SecurityGroup`: allow rules attached to pods or VMIs by label. A
/// workload selected by a SecurityGroup is isolated for ingress, like AWS security groups: only
/// what some group or NetworkPolicy admits reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroup {
    pub namespace: String,
    pub name: String,
    pub selector: LabelSelector,
    pub ingress: Vec<NpRule>,
}

/// A client network.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
pub struct SgPeer {
    /// A CIDR (IPv4 or IPv6).
    pub cidr: String,
    /// CIDRs inside `cidr` that are not admitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 4096)))]
    pub except: Vec<String>,
}

/// A port or port range, as in a NetworkPolicy.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.endPort) || (has(self.port) && type(self.port) == int && self.endPort >= self.port)",
     "message": "endPort needs a numeric port, and must not be below it"}
])))]
pub struct SgPort {
    /// TCP (the default), UDP or SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(extend("enum" = ["TCP", "UDP", "SCTP"])))]
    pub protocol: Option<String>,
    /// A port number, or a named container port of the selected pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    /// The last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 65535)))]
    pub end_port: Option<u16>,
}

/// One allow rule: traffic from any of `from` to any of `ports`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
pub struct SgRule {
    /// Client networks; empty admits every client.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = 4096)))]
    pub from: Vec<SgPeer>,
    /// Ports; empty admits every port.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = 256)))]
    pub ports: Vec<SgPort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SgSpecW {
    selector: LabelSelector,
    #[serde(default)]
    ingress: Vec<SgRule>,
}

/// The fields of a SecurityGroup's `spec`, for the CRD generator to check its schema against.
pub const SPEC_FIELDS: &[&str] = &["selector", "ingress"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SgW {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: SgSpecW,
}

impl SecurityGroup {
    pub fn from_yaml(v: serde_norway::Value) -> Result<SecurityGroup, FieldError> {
        let w: SgW = from_value(v)?;
        w.spec
            .selector
            .validate()
            .map_err(|m| FieldError::new("spec.selector", m.to_string()))?;
        let mut ingress = Vec::new();
        for (i, r) in w.spec.ingress.iter().enumerate() {
            let f = format!("spec.ingress[{i}]");
            let mut peers_out = Vec::new();
            for (j, p) in r.from.iter().enumerate() {
                let pw = PeerW {
                    pod_selector: None,
                    namespace_selector: None,
                    ip_block: Some(IpBlockW {
                        cidr: p.cidr.clone(),
                        except: Some(p.except.clone()),
                    }),
                };
                let mut one =
                    peers(std::slice::from_ref(&pw), &format!("{f}.from[{j}]")).map_err(|e| {
                        FieldError::new(
                            e.field.replace(".ipBlock", "").replace("[0]", ""),
                            e.message,
                        )
                    })?;
                peers_out.append(&mut one);
            }
            let ports_w: Vec<NpPortW> = r
                .ports
                .iter()
                .map(|p| NpPortW {
                    protocol: p.protocol.clone(),
                    port: p.port.clone(),
                    end_port: p.end_port,
                })
                .collect();
            ingress.push(NpRule {
                ports: np_ports(&ports_w, &format!("{f}.ports"))?,
                peers: peers_out,
            });
        }
        Ok(SecurityGroup {
            namespace: namespace_of(&w.metadata)?,
            name: name_of(&w.metadata)?,
            selector: w.spec.selector,
            ingress,
        })
    }
}
