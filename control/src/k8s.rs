//! Kubernetes, Calico, KubeVirt and our own objects, as plain validated data.
//!
//! Upstream kinds are read as kubectl prints them (`kubectl get -o yaml`, `List` included) and
//! are lenient about fields the gateway does not use (status, managedFields, container images...),
//! because the API server already validated them. Fields the gateway does use are validated and
//! errors name them. Our own kinds (`GatewayPolicy`, `SecurityGroup`) are strict.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::key::proto;
pub use crate::policy::from_value;
use crate::policy::{parse_port, FieldError, ObjectMeta, PortSpec, RuleAction};
use crate::rule::{PortRange, Prefix};
use crate::selector::{Expr, LabelSelector, Labels};

fn proto_of(p: Option<&str>, field: &str) -> Result<u8, FieldError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        "SCTP" => Ok(proto::SCTP),
        other => Err(FieldError::new(
            field,
            format!("`{other}` is not TCP, UDP or SCTP"),
        )),
    }
}

fn ip(s: &str, field: &str) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| FieldError::new(field, format!("`{s}` is not an IP address")))
}

fn name_of(m: &ObjectMeta) -> Result<String, FieldError> {
    if m.name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing"));
    }
    Ok(m.name.clone())
}

fn namespace_of(m: &ObjectMeta) -> Result<String, FieldError> {
    m.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            FieldError::new(
                "metadata.namespace",
                "a namespaced object needs a namespace",
            )
        })
}

/// A port by number or by name (IntOrString).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

// ---------------------------------------------------------------- Namespace

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Deserialize)]
struct MetaOnly {
    metadata: ObjectMeta,
}

impl Namespace {
    pub fn from_yaml(v: serde_norway::Value) -> Result<Namespace, FieldError> {
        let w: MetaOnly = from_value(v)?;
        let name = name_of(&w.metadata)?;
        let mut labels = w.metadata.labels;
        // The API server always sets this label.
        labels.insert("kubernetes.io/metadata.name".into(), name.clone());
        Ok(Namespace { name, labels })
    }
}

// ---------------------------------------------------------------- Pods and VMIs

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
    pub fn pod_from_yaml(v: serde_norway::Value) -> Result<Option<Workload>, FieldError> {
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
        Ok(Some(Workload {
            kind: WorkloadKind::Pod,
            namespace: namespace_of(&w.metadata)?,
            name: name_of(&w.metadata)?,
            labels: w.metadata.labels,
            ips,
            node: w.spec.node_name,
            ports,
        }))
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
    pub fn vmi_from_yaml(v: serde_norway::Value) -> Result<Workload, FieldError> {
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
        Ok(Workload {
            kind: WorkloadKind::VirtualMachineInstance,
            namespace: namespace_of(&w.metadata)?,
            name: name_of(&w.metadata)?,
            labels: w.metadata.labels,
            ips,
            node: w.status.node_name,
            ports: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------- Node

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

// ---------------------------------------------------------------- Service

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

// ---------------------------------------------------------------- EndpointSlice

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

// ---------------------------------------------------------------- NetworkPolicy

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
struct IpBlockW {
    cidr: String,
    #[serde(default)]
    except: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerW {
    #[serde(default)]
    pod_selector: Option<LabelSelector>,
    #[serde(default)]
    namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    ip_block: Option<IpBlockW>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NpPortW {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<PortRef>,
    #[serde(default)]
    end_port: Option<u16>,
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

fn peers(list: &[PeerW], field: &str) -> Result<Vec<Peer>, FieldError> {
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
                    .map_err(|m| FieldError::new(format!("{f}.{name}"), m))?;
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

fn np_ports(list: &[NpPortW], field: &str) -> Result<Vec<NpPort>, FieldError> {
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
            .map_err(|m| FieldError::new("spec.podSelector", m))?;
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

// ---------------------------------------------------------------- SecurityGroup (ours)

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
            .map_err(|m| FieldError::new("spec.selector", m))?;
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

// ---------------------------------------------------------------- Calico

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
    protocol: Option<crate::policy::ProtocolSpec>,
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
                    Some(crate::policy::ProtocolSpec::Number(n)) => Some(*n),
                    Some(crate::policy::ProtocolSpec::Name(n)) => {
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
