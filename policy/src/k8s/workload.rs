//! Pods and KubeVirt VMIs as one `Workload`: addresses, labels, node and named container ports.

use std::net::IpAddr;

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};
use crate::selector::Labels;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WorkloadKind {
    Pod,
    VirtualMachineInstance,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub proto: u8,
}

/// A pod or a KubeVirt VMI: something with labels and addresses that policies select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub ports: Vec<NamedPort>,
    /// The pod's service account (`spec.serviceAccountName`, `default` when unset, as the API
    /// server's admission sets it); `None` for VMIs.
    pub service_account: Option<String>,
}

impl Workload {
    /// A workload from its metadata (namespace and name required) and what its kind adds.
    fn from_parts(
        kind: WorkloadKind,
        meta: ObjectMeta,
        ips: Vec<IpAddr>,
        node: Option<String>,
        ports: Vec<NamedPort>,
        service_account: Option<String>,
    ) -> Result<Workload, FieldError> {
        Ok(Workload {
            kind,
            namespace: namespace_of(&meta)?,
            name: name_of(&meta)?,
            labels: meta.labels,
            ips,
            node,
            ports,
            service_account,
        })
    }
}

impl Workload {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The number a named port resolves to on this workload, for `proto`.
    pub fn resolve(&self, name: &str, proto: u8) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortW {
    #[serde(default)]
    name: Option<String>,
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct ContainerW {
    #[serde(default)]
    ports: Vec<ContainerPortW>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecW {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    containers: Vec<ContainerW>,
}

#[derive(Deserialize)]
struct PodIpW {
    ip: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatusW {
    // Kubernetes spells these podIP/podIPs, which camelCase would not produce.
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIpW>,
    #[serde(default)]
    phase: Option<String>,
}

#[derive(Deserialize)]
struct PodW {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpecW,
    #[serde(default)]
    status: PodStatusW,
}

impl Workload {
    /// A Pod. Host-network pods are skipped (`Ok(None)`): NetworkPolicy does not apply to them.
    pub(crate) fn pod_from_yaml(v: serde_norway::Value) -> Result<Option<Workload>, FieldError> {
        let w: PodW = from_value(v)?;
        if w.spec.host_network || matches!(w.status.phase.as_deref(), Some("Succeeded" | "Failed"))
        {
            return Ok(None);
        }
        let mut ips = Vec::new();
        for (i, p) in w.status.pod_ips.iter().enumerate() {
            ips.push(ip(&p.ip, &format!("status.podIPs[{i}].ip"))?);
        }
        if ips.is_empty() {
            if let Some(p) = &w.status.pod_ip {
                ips.push(ip(p, "status.podIP")?);
            }
        }
        let mut ports = Vec::new();
        for (c, ctr) in w.spec.containers.iter().enumerate() {
            for (i, p) in ctr.ports.iter().enumerate() {
                let field = format!("spec.containers[{c}].ports[{i}]");
                ports.push(NamedPort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.container_port,
                    proto: proto_of(p.protocol.as_deref(), &format!("{field}.protocol"))?,
                });
            }
        }
        Ok(Some(Workload::from_parts(
            WorkloadKind::Pod,
            w.metadata,
            ips,
            w.spec.node_name,
            ports,
            Some(
                w.spec
                    .service_account_name
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
            ),
        )?))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmiInterfaceW {
    #[serde(default)]
    ip_address: Option<String>,
    #[serde(default)]
    ip_addresses: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct VmiStatusW {
    #[serde(default)]
    interfaces: Vec<VmiInterfaceW>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize)]
struct VmiW {
    metadata: ObjectMeta,
    #[serde(default)]
    status: VmiStatusW,
}

impl Workload {
    /// A KubeVirt VirtualMachineInstance: its labels and the addresses in its status.
    pub(crate) fn vmi_from_yaml(v: serde_norway::Value) -> Result<Workload, FieldError> {
        let w: VmiW = from_value(v)?;
        let mut ips = Vec::new();
        for (i, itf) in w.status.interfaces.iter().enumerate() {
            for (j, a) in itf.ip_addresses.iter().enumerate() {
                ips.push(ip(a, &format!("status.interfaces[{i}].ipAddresses[{j}]"))?);
            }
            if itf.ip_addresses.is_empty() {
                if let Some(a) = &itf.ip_address {
                    ips.push(ip(a, &format!("status.interfaces[{i}].ipAddress"))?);
                }
            }
        }
        Workload::from_parts(
            WorkloadKind::VirtualMachineInstance,
            w.metadata,
            ips,
            w.status.node_name,
            Vec::new(),
            None,
        )
    }
}
