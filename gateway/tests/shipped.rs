//! Every object the project ships (`configs/`: deploy manifests, scenarios, the lab's policies,
//! policies inside ConfigMaps) is valid for a real API server: the fields its validation requires
//! beyond the OpenAPI schema, written from `k8s.io/kubernetes/pkg/apis/core/validation` and its
//! siblings (names, container images, ports, selectors...). The README says the scenario files
//! look as `kubectl get -o yaml` prints them; a Pod without an image could never have been
//! printed so.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

/// Every shipped object, `List` items and the policies inside ConfigMaps included, with where it
/// came from.
fn objects() -> Vec<(String, Value)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files = Vec::new();
    control::source::files::yaml_files(&root, &mut files).unwrap();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.strip_prefix(&root).unwrap().display().to_string();
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let v: Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            collect(&format!("{name}#{i}"), v, &mut out);
        }
    }
    out
}

fn collect(at: &str, v: Value, out: &mut Vec<(String, Value)>) {
    if !v.is_object() || v.get("kind").is_none() {
        return; // a gateway config, not an API object
    }
    if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
        for (j, item) in v["items"].as_array().into_iter().flatten().enumerate() {
            collect(&format!("{at}.items[{j}]"), item.clone(), out);
        }
        return;
    }
    if v["kind"] == "ConfigMap" {
        for (k, text) in v["data"].as_object().into_iter().flatten() {
            let Some(text) = text.as_str() else { continue };
            for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
                if let Ok(inner) = <Value as serde::Deserialize>::deserialize(doc) {
                    collect(&format!("{at}.data[{k}]#{i}"), inner, out);
                }
            }
        }
    }
    out.push((at.to_string(), v));
}

/// DNS-1123 label: what names of namespaces, containers and most ports must be.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain: what most object names must be.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// A Service's name: a DNS-1035 label (starts with a letter).
fn dns1035(s: &str) -> bool {
    dns_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// IANA_SVC_NAME: a named port (at most 15, lowercase letters, digits and single hyphens, at
/// least one letter).
fn port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn label_key(k: &str) -> bool {
    let (prefix, name) = k.rsplit_once('/').map_or((None, k), |(p, n)| (Some(p), n));
    prefix.is_none_or(dns_subdomain) && !name.is_empty() && label_value(name)
}

fn port_number(v: &Value) -> bool {
    v.as_u64().is_some_and(|p| (1..=65535).contains(&p))
}

struct Check<'a> {
    at: &'a str,
    errors: Vec<String>,
}

impl Check<'_> {
    fn need(&mut self, ok: bool, field: &str, what: &str) {
        if !ok {
            self.errors.push(format!("{}: {field}: {what}", self.at));
        }
    }

    fn meta(&mut self, v: &Value, name_ok: fn(&str) -> bool, namespaced: Option<bool>) {
        let m = &v["metadata"];
        let name = m["name"].as_str().unwrap_or("");
        self.need(
            name_ok(name),
            "metadata.name",
            "Required value, or invalid name",
        );
        if let Some(ns) = m["namespace"].as_str() {
            self.need(dns_label(ns), "metadata.namespace", "not a DNS-1123 label");
            self.need(
                namespaced != Some(false),
                "metadata.namespace",
                "not allowed on a cluster-scoped kind",
            );
        }
        for (k, val) in m["labels"].as_object().into_iter().flatten() {
            self.need(
                label_key(k),
                &format!("metadata.labels[{k}]"),
                "invalid label key",
            );
            self.need(
                val.as_str().is_some_and(label_value),
                &format!("metadata.labels[{k}]"),
                "invalid label value",
            );
        }
    }

    fn containers(&mut self, pod: &Value, field: &str) {
        let list = pod["containers"].as_array().cloned().unwrap_or_default();
        self.need(
            !list.is_empty(),
            &format!("{field}.containers"),
            "Required value",
        );
        let mut names = BTreeSet::new();
        for (i, c) in list.iter().enumerate() {
            let at = format!("{field}.containers[{i}]");
            let name = c["name"].as_str().unwrap_or("");
            self.need(
                dns_label(name),
                &format!("{at}.name"),
                "Required value, a DNS-1123 label",
            );
            self.need(
                names.insert(name.to_string()),
                &format!("{at}.name"),
                "Duplicate value",
            );
            self.need(
                c["image"].as_str().is_some_and(|s| !s.trim().is_empty()),
                &format!("{at}.image"),
                "Required value",
            );
            let mut ports = BTreeSet::new();
            for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                let pat = format!("{at}.ports[{j}]");
                self.need(
                    port_number(&p["containerPort"]),
                    &format!("{pat}.containerPort"),
                    "must be between 1 and 65535",
                );
                if let Some(n) = p.get("name") {
                    let n = n.as_str().unwrap_or("");
                    self.need(port_name(n), &format!("{pat}.name"), "not an IANA_SVC_NAME");
                    self.need(
                        ports.insert(n.to_string()),
                        &format!("{pat}.name"),
                        "Duplicate value",
                    );
                }
                if let Some(proto) = p.get("protocol") {
                    self.need(
                        matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP")),
                        &format!("{pat}.protocol"),
                        "Unsupported value",
                    );
                }
            }
        }
    }

    fn selector(&mut self, s: &Value, field: &str) {
        for (k, v) in s["matchLabels"].as_object().into_iter().flatten() {
            self.need(
                label_key(k) && v.as_str().is_some_and(label_value),
                &format!("{field}.matchLabels[{k}]"),
                "invalid label",
            );
        }
        for (i, e) in s["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let op = e["operator"].as_str().unwrap_or("");
            let n = e["values"].as_array().map_or(0, Vec::len);
            let ok = match op {
                "In" | "NotIn" => n > 0,
                "Exists" | "DoesNotExist" => n == 0,
                _ => false,
            };
            self.need(
                ok,
                &format!("{field}.matchExpressions[{i}]"),
                "invalid operator or values",
            );
        }
    }
}

fn validate(at: &str, v: &Value) -> Vec<String> {
    let mut c = Check {
        at,
        errors: Vec::new(),
    };
    let kind = v["kind"].as_str().unwrap_or("");
    c.need(v["apiVersion"].is_string(), "apiVersion", "Required value");
    match kind {
        "Namespace" => c.meta(v, dns_label, Some(false)),
        "Node" => c.meta(v, dns_subdomain, Some(false)),
        "Pod" => {
            c.meta(v, dns_subdomain, Some(true));
            c.containers(&v["spec"], "spec");
        }
        "DaemonSet" | "Deployment" => {
            c.meta(v, dns_subdomain, Some(true));
            let sel = &v["spec"]["selector"];
            c.need(sel.is_object(), "spec.selector", "Required value");
            c.selector(sel, "spec.selector");
            let labels = &v["spec"]["template"]["metadata"]["labels"];
            for (k, want) in sel["matchLabels"].as_object().into_iter().flatten() {
                c.need(
                    &labels[k] == want,
                    "spec.template.metadata.labels",
                    "`selector` does not match template `labels`",
                );
            }
            c.containers(&v["spec"]["template"]["spec"], "spec.template.spec");
        }
        "Service" => {
            c.meta(v, dns1035, Some(true));
            let s = &v["spec"];
            let ty = s["type"].as_str().unwrap_or("ClusterIP");
            c.need(
                matches!(
                    ty,
                    "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
                ),
                "spec.type",
                "Unsupported value",
            );
            let ports = s["ports"].as_array().cloned().unwrap_or_default();
            let headless = s["clusterIP"] == "None";
            c.need(
                !ports.is_empty() || headless || ty == "ExternalName",
                "spec.ports",
                "Required value",
            );
            let mut names = BTreeSet::new();
            for (i, p) in ports.iter().enumerate() {
                let at = format!("spec.ports[{i}]");
                c.need(
                    port_number(&p["port"]),
                    &format!("{at}.port"),
                    "must be between 1 and 65535",
                );
                let name = p["name"].as_str().unwrap_or("");
                c.need(
                    ports.len() == 1 || !name.is_empty(),
                    &format!("{at}.name"),
                    "Required value (more than one port)",
                );
                c.need(
                    name.is_empty() || dns_label(name),
                    &format!("{at}.name"),
                    "not a DNS-1123 label",
                );
                c.need(
                    names.insert(name.to_string()),
                    &format!("{at}.name"),
                    "Duplicate value",
                );
                if let Some(np) = p.get("nodePort") {
                    c.need(
                        matches!(ty, "NodePort" | "LoadBalancer"),
                        &format!("{at}.nodePort"),
                        "Forbidden for this type",
                    );
                    c.need(
                        np.as_u64().is_some_and(|n| (30000..=32767).contains(&n)),
                        &format!("{at}.nodePort"),
                        "not in the default NodePort range 30000-32767",
                    );
                }
                if let Some(t) = p.get("targetPort") {
                    c.need(
                        port_number(t) || t.as_str().is_some_and(port_name),
                        &format!("{at}.targetPort"),
                        "a port number or an IANA_SVC_NAME",
                    );
                }
            }
            if let Some(etp) = s.get("externalTrafficPolicy") {
                c.need(
                    matches!(etp.as_str(), Some("Cluster" | "Local")),
                    "spec.externalTrafficPolicy",
                    "Unsupported value",
                );
                c.need(
                    matches!(ty, "NodePort" | "LoadBalancer"),
                    "spec.externalTrafficPolicy",
                    "may only be set for NodePort or LoadBalancer Services",
                );
            }
        }
        "EndpointSlice" => {
            c.meta(v, dns_subdomain, Some(true));
            c.need(
                matches!(v["addressType"].as_str(), Some("IPv4" | "IPv6" | "FQDN")),
                "addressType",
                "Required value",
            );
            for (i, e) in v["endpoints"].as_array().into_iter().flatten().enumerate() {
                let n = e["addresses"].as_array().map_or(0, Vec::len);
                c.need(
                    (1..=100).contains(&n),
                    &format!("endpoints[{i}].addresses"),
                    "must have between 1 and 100 addresses",
                );
            }
            for (i, p) in v["ports"].as_array().into_iter().flatten().enumerate() {
                if let Some(port) = p.get("port") {
                    c.need(
                        port_number(port),
                        &format!("ports[{i}].port"),
                        "must be between 1 and 65535",
                    );
                }
            }
        }
        "NetworkPolicy" if v["apiVersion"] == "networking.k8s.io/v1" => {
            c.meta(v, dns_subdomain, Some(true));
            c.need(
                v["spec"]["podSelector"].is_object(),
                "spec.podSelector",
                "Required value",
            );
            c.selector(&v["spec"]["podSelector"], "spec.podSelector");
            for t in v["spec"]["policyTypes"].as_array().into_iter().flatten() {
                c.need(
                    matches!(t.as_str(), Some("Ingress" | "Egress")),
                    "spec.policyTypes",
                    "Unsupported value",
                );
            }
        }
        "NetworkPolicy" | "GlobalNetworkPolicy" => {
            c.meta(v, dns_subdomain, Some(kind == "NetworkPolicy"));
        }
        "GatewayPolicy" | "SecurityGroup" => {
            c.meta(v, dns_subdomain, Some(kind == "SecurityGroup"));
        }
        "VirtualMachineInstance" => {
            c.meta(v, dns_subdomain, Some(true));
            c.need(
                v["spec"]["domain"]["devices"].is_object(),
                "spec.domain.devices",
                "Required value (KubeVirt)",
            );
        }
        "ConfigMap" => {
            c.meta(v, dns_subdomain, Some(true));
            for k in v["data"].as_object().into_iter().flat_map(|d| d.keys()) {
                c.need(
                    !k.is_empty()
                        && k.len() <= 253
                        && k.chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')),
                    &format!("data[{k}]"),
                    "a valid config key",
                );
            }
        }
        "ServiceAccount" => c.meta(v, dns_subdomain, Some(true)),
        // Prometheus Operator's (configs/monitoring): its CRD requires a selector and, per
        // endpoint, a port to scrape.
        "PodMonitor" => {
            c.meta(v, dns_subdomain, Some(true));
            c.need(
                v["apiVersion"] == "monitoring.coreos.com/v1",
                "apiVersion",
                "monitoring.coreos.com/v1",
            );
            c.need(
                v["spec"]["selector"].is_object(),
                "spec.selector",
                "Required value",
            );
            let endpoints = v["spec"]["podMetricsEndpoints"].as_array();
            c.need(
                endpoints.is_some_and(|e| !e.is_empty()),
                "spec.podMetricsEndpoints",
                "Required value",
            );
            for (i, e) in endpoints.into_iter().flatten().enumerate() {
                c.need(
                    e["port"].is_string(),
                    &format!("spec.podMetricsEndpoints[{i}].port"),
                    "a named container port",
                );
            }
        }
        "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition" => {
            c.meta(
                v,
                |s| !s.is_empty() && !s.contains('/') && s != "." && s != "..",
                Some(false),
            );
            if kind == "ClusterRole" {
                for (i, r) in v["rules"].as_array().into_iter().flatten().enumerate() {
                    c.need(
                        r["verbs"].as_array().is_some_and(|x| !x.is_empty()),
                        &format!("rules[{i}].verbs"),
                        "Required value",
                    );
                }
            }
            if kind == "ClusterRoleBinding" {
                c.need(
                    v["roleRef"]["kind"].is_string() && v["roleRef"]["name"].is_string(),
                    "roleRef",
                    "Required value",
                );
            }
        }
        other => c.need(
            false,
            "kind",
            &format!("`{other}`: no validation written for this kind"),
        ),
    }
    c.errors
}

#[test]
fn every_shipped_object_is_valid_for_a_real_api_server() {
    let objects = objects();
    assert!(objects.len() > 40, "found only {} objects", objects.len());
    let errors: Vec<String> = objects.iter().flat_map(|(at, v)| validate(at, v)).collect();
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

#[test]
fn the_validation_catches_what_the_api_server_refuses() {
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}]}]}});
    assert!(validate("ok", &pod).is_empty());
    for (field, bad, want) in [
        (
            "/spec/containers/0/image",
            Value::Null,
            "image: Required value",
        ),
        (
            "/spec/containers/0/name",
            "Web".into(),
            "name: Required value, a DNS-1123 label",
        ),
        (
            "/spec/containers/0/ports/0/containerPort",
            70000.into(),
            "must be between 1 and 65535",
        ),
        (
            "/spec/containers/0/ports/0/name",
            "http-alternate-1".into(),
            "IANA_SVC_NAME",
        ),
        ("/metadata/name", "Web_1".into(), "metadata.name"),
        ("/metadata/labels/app", "-web".into(), "invalid label value"),
    ] {
        let mut p = pod.clone();
        *p.pointer_mut(field).unwrap() = bad;
        let errors = validate("bad", &p);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{field}: {errors:?}"
        );
    }
}
