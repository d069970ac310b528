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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SgPeerW {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SgPortW {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<PortRef>,
    #[serde(default)]
    end_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SgRuleW {
    #[serde(default)]
    from: Vec<SgPeerW>,
    #[serde(default)]
    ports: Vec<SgPortW>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SgSpecW {
    selector: LabelSelector,
    #[serde(default)]
    ingress: Vec<SgRuleW>,
}

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
