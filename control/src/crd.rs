//! Portcullis' CustomResourceDefinitions, generated from Rust types with kube's `CustomResource`
//! derive and schemars (the ecosystem's way), never written by hand. The rule types are the ones
//! the policy parser reads (`policy::gateway_policy::RuleSpec`, `policy::k8s::SgRule`...), so the
//! schema the API server enforces and the parser cannot drift apart; `configs/deploy/0*-crd-*.yaml`
//! are this module's output (`portcullis crds`), and a test fails when they differ.
//!
//! **A typo never widens a rule.** A structural schema makes the API server *prune* fields it does
//! not know, and a client that skips field validation (`kubectl apply --validate=false`, most
//! controllers) gets no error: `sourc:` in an Allow rule would vanish and the rule would match
//! every source. So every object of these specs carries `x-kubernetes-preserve-unknown-fields`:
//! the API server stores what was written, and the gateway parses it with the same strict parser
//! as the policy files. An unknown or misspelt field makes the object invalid, reported with its
//! field (`/status`, `/healthz`, `portcullis_kubernetes_invalid_objects`); a new object is not
//! applied and an edit keeps the previous version in force. The known fields are still typed,
//! ranged and checked by CEL rules at admission.

// Several `printcolumn(type_ = ...)` arguments of one `#[kube]` attribute look like duplicates to
// clippy; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use policy::gateway_policy::RuleSpec;
use policy::k8s::SgRule;
use policy::selector::LabelSelector;

/// `GatewayPolicy`: the edge's own cluster-scoped policy (client-CIDR rules no upstream API can
/// express), in the rule shape of the gateway config's failsafe rules.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "portcullis.io",
    version = "v1alpha1",
    kind = "GatewayPolicy",
    plural = "gatewaypolicies",
    shortname = "gwp",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(
        name = "Ingress",
        type_ = "string",
        json_path = ".spec.ingress[*].action",
        description = "the actions of the ingress rules, in order"
    ),
    printcolumn(
        name = "Egress",
        type_ = "string",
        json_path = ".spec.egress[*].action",
        description = "the actions of the egress rules, in order"
    ),
    printcolumn(name = "Audit", type_ = "boolean", json_path = ".spec.audit"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct GatewayPolicySpec {
    /// Lower runs first; ties break by name. GatewayPolicies and Calico policies share one order.
    #[serde(default = "policy::gateway_policy::default_priority")]
    pub priority: i32,
    /// Count and log what the policy would do; change no verdict.
    #[serde(default)]
    pub audit: bool,
    /// Rules for ext -> int traffic, first match wins.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub ingress: Vec<RuleSpec>,
    /// Rules for int -> ext traffic, first match wins.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub egress: Vec<RuleSpec>,
}

/// `SecurityGroup`: allow rules attached to pods or KubeVirt VMIs by label. A selected workload is
/// isolated for ingress; only what some SecurityGroup or NetworkPolicy admits reaches it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "portcullis.io",
    version = "v1alpha1",
    kind = "SecurityGroup",
    plural = "securitygroups",
    shortname = "sg",
    namespaced,
    printcolumn(
        name = "Selector",
        type_ = "string",
        json_path = ".spec.selector",
        description = "the pods and VMIs the group is attached to"
    ),
    printcolumn(
        name = "Ports",
        type_ = "string",
        json_path = ".spec.ingress[*].ports[*].port"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct SecurityGroupSpec {
    /// Pods and VMIs of the namespace, by label.
    pub selector: LabelSelector,
    /// Allow rules; a selected workload admits only what some rule (or NetworkPolicy) admits.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub ingress: Vec<SgRule>,
}

/// One generated CRD: its file under `configs/deploy/`, a header comment, and the YAML.
pub struct Generated {
    pub file: &'static str,
    pub yaml: String,
}

/// Every CRD, as committed in `configs/deploy/`.
pub fn all() -> Vec<Generated> {
    [
        (
            "00-crd-gatewaypolicy.yaml",
            "GatewayPolicy: Portcullis's own cluster-scoped edge policy (the client-CIDR rules no upstream\n# API can express). Same rule shape as the gateway config's failsafe rules.",
            serde_json::to_value(GatewayPolicy::crd()),
        ),
        (
            "01-crd-securitygroup.yaml",
            "SecurityGroup: allow rules attached to pods or KubeVirt VMIs by label. A selected workload is\n# isolated for ingress; only what some SecurityGroup or NetworkPolicy admits reaches it.",
            serde_json::to_value(SecurityGroup::crd()),
        ),
    ]
    .into_iter()
    .map(|(file, about, crd)| {
        let mut crd = crd.unwrap_or_else(|e| unreachable!("a CRD always serializes: {e}"));
        structural(&mut crd);
        let body = serde_norway::to_string(&crd)
            .unwrap_or_else(|e| unreachable!("a JSON value always serializes: {e}"));
        Generated {
            file,
            yaml: format!(
                "# Generated by `portcullis crds` from control/src/crd.rs: do not edit by hand.\n# {about}\n{body}"
            ),
        }
    })
    .collect()
}

/// What schemars emits that a structural schema forbids or Kubernetes does not know:
/// `additionalProperties: false` beside `properties` (serde's `deny_unknown_fields`; these
/// objects preserve unknown fields instead, and the gateway's strict parser refuses them), and
/// Rust's `uint8`/`uint16` formats (the range says it).
fn structural(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties")
                && map.get("additionalProperties") == Some(&Value::Bool(false))
            {
                map.remove("additionalProperties");
            }
            if map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| f.starts_with("uint"))
            {
                map.remove("format");
            }
            for child in map.values_mut() {
                structural(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(structural),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
