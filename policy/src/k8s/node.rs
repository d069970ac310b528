//! Nodes: their addresses, which front NodePort services.

use std::net::IpAddr;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};
use crate::selector::Labels;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// InternalIP and ExternalIP addresses: where NodePorts listen.
    pub addresses: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct NodeAddressW {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

#[derive(Deserialize, Default)]
struct NodeStatusW {
    #[serde(default)]
    addresses: Vec<NodeAddressW>,
}

#[derive(Deserialize)]
struct NodeW {
    metadata: ObjectMeta,
    #[serde(default)]
    status: NodeStatusW,
}

impl Node {
    pub fn from_yaml(v: serde_norway::Value) -> Result<Node, FieldError> {
        let w: NodeW = from_value(v)?;
        let mut addresses = Vec::new();
        for (i, a) in w.status.addresses.iter().enumerate() {
            if a.kind == "InternalIP" || a.kind == "ExternalIP" {
                addresses.push(ip(&a.address, &format!("status.addresses[{i}].address"))?);
            }
        }
        Ok(Node {
            name: name_of(&w.metadata)?,
            labels: w.metadata.labels,
            addresses,
        })
    }
}
