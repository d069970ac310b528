//! A consistent view of every policy object, whatever source it came from.

use crate::gateway_policy::GatewayPolicy;
use crate::k8s::{
    CalicoPolicy, EndpointSlice, HostEndpoint, Namespace, NetworkPolicy, NetworkSet, Node,
    SecurityGroup, Service, ServiceAccount, Tier, Workload,
};

/// Where an object was read from: a file and document, or an API path.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub source: String,
    pub object: T,
}

impl<T> Located<T> {
    pub fn new(source: impl Into<String>, object: T) -> Located<T> {
        Located {
            source: source.into(),
            object,
        }
    }
}

/// Everything the compiler needs, as plain data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub gateway_policies: Vec<Located<GatewayPolicy>>,
    pub calico_policies: Vec<Located<CalicoPolicy>>,
    pub namespaces: Vec<Located<Namespace>>,
    /// Pods and KubeVirt VMIs.
    pub workloads: Vec<Located<Workload>>,
    pub nodes: Vec<Located<Node>>,
    pub services: Vec<Located<Service>>,
    pub endpoint_slices: Vec<Located<EndpointSlice>>,
    pub network_policies: Vec<Located<NetworkPolicy>>,
    pub security_groups: Vec<Located<SecurityGroup>>,
    pub tiers: Vec<Located<Tier>>,
    /// GlobalNetworkSets and NetworkSets.
    pub network_sets: Vec<Located<NetworkSet>>,
    pub host_endpoints: Vec<Located<HostEndpoint>>,
    pub service_accounts: Vec<Located<ServiceAccount>>,
    /// The Kubernetes source found Calico's API on the cluster (Calico is its policy engine).
    pub calico_api: bool,
}

fn plain<T: Clone>(v: &[Located<T>]) -> Vec<T> {
    v.iter().map(|l| l.object.clone()).collect()
}

/// The Kubernetes objects the NetworkPolicy engine reads, unwrapped.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
    pub policies: Vec<NetworkPolicy>,
    pub security_groups: Vec<SecurityGroup>,
}

impl ClusterObjects {
    pub fn cluster(&self) -> crate::netpol::Cluster<'_> {
        crate::netpol::Cluster {
            namespaces: &self.namespaces,
            workloads: &self.workloads,
            policies: &self.policies,
            security_groups: &self.security_groups,
        }
    }
}

impl Snapshot {
    /// Appends every object of `other` (merging sources: files plus the Kubernetes API).
    pub fn extend_from(&mut self, other: &Snapshot) {
        self.gateway_policies
            .extend_from_slice(&other.gateway_policies);
        self.calico_policies
            .extend_from_slice(&other.calico_policies);
        self.namespaces.extend_from_slice(&other.namespaces);
        self.workloads.extend_from_slice(&other.workloads);
        self.nodes.extend_from_slice(&other.nodes);
        self.services.extend_from_slice(&other.services);
        self.endpoint_slices
            .extend_from_slice(&other.endpoint_slices);
        self.network_policies
            .extend_from_slice(&other.network_policies);
        self.security_groups
            .extend_from_slice(&other.security_groups);
        self.tiers.extend_from_slice(&other.tiers);
        self.network_sets.extend_from_slice(&other.network_sets);
        self.host_endpoints.extend_from_slice(&other.host_endpoints);
        self.service_accounts
            .extend_from_slice(&other.service_accounts);
        self.calico_api |= other.calico_api;
    }

    /// Moves every object of `other` to the end of this snapshot's lists (no copies), and
    /// returns where they start: [`Snapshot::split_off`] gives them back.
    pub fn append(&mut self, other: &mut Snapshot) -> [usize; 13] {
        let at = [
            self.gateway_policies.len(),
            self.calico_policies.len(),
            self.namespaces.len(),
            self.workloads.len(),
            self.nodes.len(),
            self.services.len(),
            self.endpoint_slices.len(),
            self.network_policies.len(),
            self.security_groups.len(),
            self.tiers.len(),
            self.network_sets.len(),
            self.host_endpoints.len(),
            self.service_accounts.len(),
        ];
        self.gateway_policies.append(&mut other.gateway_policies);
        self.calico_policies.append(&mut other.calico_policies);
        self.namespaces.append(&mut other.namespaces);
        self.workloads.append(&mut other.workloads);
        self.nodes.append(&mut other.nodes);
        self.services.append(&mut other.services);
        self.endpoint_slices.append(&mut other.endpoint_slices);
        self.network_policies.append(&mut other.network_policies);
        self.security_groups.append(&mut other.security_groups);
        self.tiers.append(&mut other.tiers);
        self.network_sets.append(&mut other.network_sets);
        self.host_endpoints.append(&mut other.host_endpoints);
        self.service_accounts.append(&mut other.service_accounts);
        // The flag is restored by split_off's caller, which knows its own.
        self.calico_api |= other.calico_api;
        at
    }

    /// Takes back what [`Snapshot::append`] moved in at `at`.
    pub fn split_off(&mut self, at: [usize; 13]) -> Snapshot {
        Snapshot {
            gateway_policies: self.gateway_policies.split_off(at[0]),
            calico_policies: self.calico_policies.split_off(at[1]),
            namespaces: self.namespaces.split_off(at[2]),
            workloads: self.workloads.split_off(at[3]),
            nodes: self.nodes.split_off(at[4]),
            services: self.services.split_off(at[5]),
            endpoint_slices: self.endpoint_slices.split_off(at[6]),
            network_policies: self.network_policies.split_off(at[7]),
            security_groups: self.security_groups.split_off(at[8]),
            tiers: self.tiers.split_off(at[9]),
            network_sets: self.network_sets.split_off(at[10]),
            host_endpoints: self.host_endpoints.split_off(at[11]),
            service_accounts: self.service_accounts.split_off(at[12]),
            calico_api: false,
        }
    }

    /// Object counts per kind, for `check` and status.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        let pods = self
            .workloads
            .iter()
            .filter(|w| w.object.kind == crate::k8s::WorkloadKind::Pod)
            .count();
        vec![
            ("GatewayPolicy", self.gateway_policies.len()),
            ("Calico policy", self.calico_policies.len()),
            ("Namespace", self.namespaces.len()),
            ("Pod", pods),
            ("VirtualMachineInstance", self.workloads.len() - pods),
            ("Node", self.nodes.len()),
            ("Service", self.services.len()),
            ("EndpointSlice", self.endpoint_slices.len()),
            ("NetworkPolicy", self.network_policies.len()),
            ("SecurityGroup", self.security_groups.len()),
            ("Calico Tier", self.tiers.len()),
            ("Calico network set", self.network_sets.len()),
            ("Calico HostEndpoint", self.host_endpoints.len()),
            ("ServiceAccount", self.service_accounts.len()),
        ]
    }

    /// Whether any Calico object is present (then Calico is taken to be the policy engine).
    pub fn has_calico_objects(&self) -> bool {
        !self.calico_policies.is_empty()
            || !self.tiers.is_empty()
            || !self.network_sets.is_empty()
            || !self.host_endpoints.is_empty()
    }

    pub fn cluster_objects(&self) -> ClusterObjects {
        ClusterObjects {
            namespaces: plain(&self.namespaces),
            workloads: plain(&self.workloads),
            policies: plain(&self.network_policies),
            security_groups: plain(&self.security_groups),
        }
    }
}
