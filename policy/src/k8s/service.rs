//! Services: type, ports, NodePorts, LoadBalancer/external IPs and `externalTrafficPolicy`.

use std::net::IpAddr;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub proto: u8,
    pub port: u16,
    pub target: PortRef,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// ClusterIP, NodePort, LoadBalancer or ExternalName.
    pub kind: String,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    /// externalTrafficPolicy: Local.
    pub etp_local: bool,
}

impl Service {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortW {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<PortRef>,
    #[serde(default)]
    node_port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecW {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    ports: Vec<ServicePortW>,
    #[serde(default, rename = "externalIPs")]
    external_ips: Vec<String>,
    #[serde(default)]
    external_traffic_policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LbIngressW {
    #[serde(default)]
    ip: Option<String>,
}

#[derive(Deserialize, Default)]
struct LbStatusW {
    #[serde(default)]
    ingress: Vec<LbIngressW>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceStatusW {
    #[serde(default)]
    load_balancer: LbStatusW,
}

#[derive(Deserialize)]
struct ServiceW {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: ServiceSpecW,
    #[serde(default)]
    status: ServiceStatusW,
}

impl Service {
    pub fn from_yaml(v: serde_norway::Value) -> Result<Service, FieldError> {
        let w: ServiceW = from_value(v)?;
        let kind = w.spec.kind.unwrap_or_else(|| "ClusterIP".into());
        if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&kind.as_str()) {
            return Err(FieldError::new(
                "spec.type",
                format!("`{kind}` is not a Service type"),
            ));
        }
        let etp_local = match w.spec.external_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(o) => {
                return Err(FieldError::new(
                    "spec.externalTrafficPolicy",
                    format!("`{o}` is not Cluster or Local"),
                ))
            }
        };
        let mut ports = Vec::new();
        for (i, p) in w.spec.ports.iter().enumerate() {
            ports.push(ServicePort {
                name: p.name.clone(),
                proto: proto_of(p.protocol.as_deref(), &format!("spec.ports[{i}].protocol"))?,
                port: p.port,
                target: p.target_port.clone().unwrap_or(PortRef::Number(p.port)),
                node_port: p.node_port,
            });
        }
        let mut external_ips = Vec::new();
        for (i, a) in w.spec.external_ips.iter().enumerate() {
            external_ips.push(ip(a, &format!("spec.externalIPs[{i}]"))?);
        }
        let mut lb_ips = Vec::new();
        for (i, a) in w.status.load_balancer.ingress.iter().enumerate() {
            if let Some(a) = &a.ip {
                lb_ips.push(ip(a, &format!("status.loadBalancer.ingress[{i}].ip"))?);
            }
        }
        Ok(Service {
            namespace: namespace_of(&w.metadata)?,
            name: name_of(&w.metadata)?,
            kind,
            ports,
            external_ips,
            lb_ips,
            etp_local,
        })
    }
}
