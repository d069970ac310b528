//! One Kubernetes-style object (YAML or JSON, as kubectl prints it, `List`s included) into the
//! plain model of a [`Snapshot`]. The file source and the Kubernetes source both read objects
//! through [`add_object`], so they cannot disagree on what an object means.

use serde::Deserialize;

use crate::gateway_policy::{FieldError, GatewayPolicy, API_VERSION};
use crate::k8s::{
    CalicoPolicy, EndpointSlice, HostEndpoint, Namespace, NetworkPolicy, NetworkSet, Node,
    SecurityGroup, Service, ServiceAccount, Tier, Workload,
};
use crate::snapshot::{Located, Snapshot};

/// Why one object was not accepted: which object, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", object.as_ref().map(|o| format!("{o}: ")).unwrap_or_default(), self.detail())]
pub struct ObjectError {
    /// `Kind/name` (or `Kind/namespace/name`), when known.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl ObjectError {
    /// `field: message`, or the message alone.
    pub(crate) fn detail(&self) -> String {
        match &self.field {
            Some(f) => format!("{f}: {}", self.message),
            None => self.message.clone(),
        }
    }

    /// As it follows a location: ` (Kind/name): field: message`.
    pub fn after_location(&self) -> String {
        let object = self
            .object
            .as_ref()
            .map(|o| format!(" ({o})"))
            .unwrap_or_default();
        format!("{object}: {}", self.detail())
    }
}

/// Enough of a document to dispatch on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Option<crate::gateway_policy::ObjectMeta>,
}

/// Adds one object (or every item of a `List`) to the snapshot. `source` names it in origins.
pub fn add_object(
    value: serde_norway::Value,
    source: &str,
    snap: &mut Snapshot,
) -> Result<(), ObjectError> {
    let err = |object: Option<String>, field: Option<String>, message: String| ObjectError {
        object,
        field,
        message,
    };
    let meta: TypeMeta = serde_norway::from_value(value.clone())
        .map_err(|e| err(None, None, format!("not a Kubernetes-style object: {e}")))?;
    let name = meta.metadata.as_ref().map(|m| match &m.namespace {
        Some(ns) => format!("{ns}/{}", m.name),
        None => m.name.clone(),
    });
    let object = Some(format!("{}/{}", meta.kind, name.unwrap_or_default()));
    let field = |e: FieldError| err(object.clone(), Some(e.field), e.message);
    match (meta.api_version.as_str(), meta.kind.as_str()) {
        (_, "") => return Err(err(None, Some("kind".into()), "missing".into())),
        ("", k) => {
            return Err(err(
                object.clone(),
                Some("apiVersion".into()),
                format!(
                    "missing (a {k} needs one, e.g. {})",
                    match k {
                        "GatewayPolicy" | "SecurityGroup" => API_VERSION,
                        "NetworkPolicy" => "networking.k8s.io/v1 or projectcalico.org/v3",
                        "GlobalNetworkPolicy" | "Tier" | "GlobalNetworkSet" | "NetworkSet" | "HostEndpoint" => "projectcalico.org/v3",
                        "EndpointSlice" => "discovery.k8s.io/v1",
                        "VirtualMachineInstance" => "kubevirt.io/v1",
                        _ => "v1",
                    }
                ),
            ))
        }
        ("v1", "List") => {
            let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                add_object(item, &format!("{source}.items[{j}]"), snap).map_err(|mut e| {
                    e.field = Some(format!("items[{j}]{}", e.field.map(|f| format!(".{f}")).unwrap_or_default()));
                    e
                })?;
            }
        }
        (v, "GatewayPolicy") if v == API_VERSION => snap.gateway_policies.push(Located::new(source, GatewayPolicy::from_yaml(value).map_err(field)?)),
        (v, "SecurityGroup") if v == API_VERSION => snap.security_groups.push(Located::new(source, SecurityGroup::from_yaml(value).map_err(field)?)),
        ("v1", "Namespace") => snap.namespaces.push(Located::new(source, Namespace::from_yaml(value).map_err(field)?)),
        ("v1", "Pod") => {
            if let Some(w) = Workload::pod_from_yaml(value).map_err(field)? {
                snap.workloads.push(Located::new(source, w));
            }
        }
        ("kubevirt.io/v1", "VirtualMachineInstance") => snap.workloads.push(Located::new(source, Workload::vmi_from_yaml(value).map_err(field)?)),
        ("v1", "Node") => snap.nodes.push(Located::new(source, Node::from_yaml(value).map_err(field)?)),
        ("v1", "Service") => snap.services.push(Located::new(source, Service::from_yaml(value).map_err(field)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => snap.endpoint_slices.push(Located::new(source, EndpointSlice::from_yaml(value).map_err(field)?)),
        ("networking.k8s.io/v1", "NetworkPolicy") => snap.network_policies.push(Located::new(source, NetworkPolicy::from_yaml(value).map_err(field)?)),
        ("projectcalico.org/v3" | "crd.projectcalico.org/v1", k @ ("GlobalNetworkPolicy" | "NetworkPolicy")) => {
            snap.calico_policies.push(Located::new(source, CalicoPolicy::from_yaml(value, k == "GlobalNetworkPolicy").map_err(field)?))
        }
        ("projectcalico.org/v3" | "crd.projectcalico.org/v1", "Tier") => snap.tiers.push(Located::new(source, Tier::from_yaml(value).map_err(field)?)),
        ("projectcalico.org/v3" | "crd.projectcalico.org/v1", k @ ("GlobalNetworkSet" | "NetworkSet")) => {
            snap.network_sets.push(Located::new(source, NetworkSet::from_yaml(value, k == "GlobalNetworkSet").map_err(field)?))
        }
        ("projectcalico.org/v3" | "crd.projectcalico.org/v1", "HostEndpoint") => snap.host_endpoints.push(Located::new(source, HostEndpoint::from_yaml(value).map_err(field)?)),
        ("v1", "ServiceAccount") => snap.service_accounts.push(Located::new(source, ServiceAccount::from_yaml(value).map_err(field)?)),
        // CRD manifests may sit beside the objects (configs/deploy); they change no verdict.
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {}
        (v, k) => {
            return Err(err(
                object.clone(),
                Some("kind".into()),
                format!(
                    "`{v}` `{k}` is not a kind this source reads (expected Namespace, Pod, ServiceAccount, Node, Service, EndpointSlice, NetworkPolicy, Calico (Global)NetworkPolicy, Tier, (Global)NetworkSet or HostEndpoint, VirtualMachineInstance, {API_VERSION} GatewayPolicy or SecurityGroup, or a List of them)"
                ),
            ))
        }
    }
    Ok(())
}
