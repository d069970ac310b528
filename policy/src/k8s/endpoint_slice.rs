//! EndpointSlices: a Service's backends with their conditions, node and target ports.

use std::net::IpAddr;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<u16>,
    pub proto: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    /// `namespace/name` of the pod behind the endpoint.
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlicePortW {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
struct ConditionsW {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct TargetRefW {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointW {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: ConditionsW,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    target_ref: Option<TargetRefW>,
}

#[derive(Deserialize)]
struct SliceW {
    metadata: ObjectMeta,
    #[serde(default)]
    ports: Option<Vec<SlicePortW>>,
    #[serde(default)]
    endpoints: Option<Vec<EndpointW>>,
}

impl EndpointSlice {
    pub fn from_yaml(v: serde_norway::Value) -> Result<EndpointSlice, FieldError> {
        let w: SliceW = from_value(v)?;
        let namespace = namespace_of(&w.metadata)?;
        let service = w
            .metadata
            .labels
            .get("kubernetes.io/service-name")
            .cloned()
            .ok_or_else(|| {
                FieldError::new(
                    "metadata.labels",
                    "an EndpointSlice needs the kubernetes.io/service-name label",
                )
            })?;
        let mut ports = Vec::new();
        for (i, p) in w.ports.iter().flatten().enumerate() {
            ports.push(SlicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: p.port,
                proto: proto_of(p.protocol.as_deref(), &format!("ports[{i}].protocol"))?,
            });
        }
        let mut endpoints = Vec::new();
        for (i, e) in w.endpoints.iter().flatten().enumerate() {
            let mut addresses = Vec::new();
            for (j, a) in e.addresses.iter().enumerate() {
                addresses.push(ip(a, &format!("endpoints[{i}].addresses[{j}]"))?);
            }
            // API semantics: a nil `ready` means ready; `serving` defaults to `ready`.
            let ready = e.conditions.ready.unwrap_or(true);
            let pod = e
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .and_then(|t| {
                    Some(format!(
                        "{}/{}",
                        t.namespace.clone().unwrap_or_else(|| namespace.clone()),
                        t.name.clone()?
                    ))
                });
            endpoints.push(Endpoint {
                addresses,
                ready,
                serving: e.conditions.serving.unwrap_or(ready),
                terminating: e.conditions.terminating.unwrap_or(false),
                node: e.node_name.clone(),
                pod,
            });
        }
        Ok(EndpointSlice {
            namespace,
            name: name_of(&w.metadata)?,
            service,
            ports,
            endpoints,
        })
    }
}
