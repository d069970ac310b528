//! The generated CRDs: committed as generated, structural as the API server requires (the rules of
//! "Specifying a structural schema" and of apiextensions' validation, checked here because the
//! test API server validates nothing), and in agreement with the policy parser.

use serde_json::{json, Value};

use super::*;

fn crds() -> Vec<(String, Value)> {
    all()
        .into_iter()
        .map(|g| {
            let v: Value = serde_norway::from_str(&g.yaml).expect("generated YAML parses");
            (g.file.to_string(), v)
        })
        .collect()
}

#[test]
fn the_committed_crds_are_the_generated_ones() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/deploy");
    for g in all() {
        let path = dir.join(g.file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == g.yaml,
            "{} differs from what control/src/crd.rs generates: run `portcullis crds --write configs/deploy`",
            path.display()
        );
    }
}

/// One rule of the API server's CRD validation that `schema` breaks, as `path: problem`.
fn violations(crd: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &crd["spec"];
    let names = &spec["names"];
    let group = spec["group"].as_str().unwrap_or("");
    let plural = names["plural"].as_str().unwrap_or("");
    if crd["metadata"]["name"].as_str() != Some(&format!("{plural}.{group}")) {
        out.push("metadata.name: must be spec.names.plural+\".\"+spec.group".into());
    }
    if !group.contains('.') {
        out.push("spec.group: should be a domain with at least one dot".into());
    }
    if !matches!(spec["scope"].as_str(), Some("Cluster" | "Namespaced")) {
        out.push("spec.scope: Cluster or Namespaced".into());
    }
    let dns1035 = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.ends_with('-')
    };
    for key in ["plural", "singular"] {
        if !names[key].as_str().is_some_and(dns1035) {
            out.push(format!(
                "spec.names.{key}: must be a lowercase DNS-1035 label"
            ));
        }
    }
    for s in names["shortNames"].as_array().into_iter().flatten() {
        if !s.as_str().is_some_and(dns1035) {
            out.push(format!(
                "spec.names.shortNames: {s} is not a DNS-1035 label"
            ));
        }
    }
    if !names["kind"]
        .as_str()
        .is_some_and(|k| dns1035(&k.to_ascii_lowercase()))
    {
        out.push("spec.names.kind: required, DNS-1035 once lowercased".into());
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count()
        != 1
    {
        out.push("spec.versions: must have exactly one version marked as storage version".into());
    }
    for (i, v) in versions.iter().enumerate() {
        let at = format!("spec.versions[{i}]");
        if !v["name"].as_str().is_some_and(dns1035) {
            out.push(format!("{at}.name: must be a DNS-1035 label"));
        }
        for (j, c) in v["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{at}.additionalPrinterColumns[{j}]");
            if c["name"].as_str().is_none_or(str::is_empty) {
                out.push(format!("{at}.name: Required value"));
            }
            if !matches!(
                c["type"].as_str(),
                Some("boolean" | "date" | "integer" | "number" | "string")
            ) {
                out.push(format!(
                    "{at}.type: must be one of boolean,date,integer,number,string"
                ));
            }
            if !c["jsonPath"].as_str().is_some_and(|p| p.starts_with('.')) {
                out.push(format!(
                    "{at}.JSONPath: must be a simple json path starting with ."
                ));
            }
        }
        let root = &v["schema"]["openAPIV3Schema"];
        if root.is_null() {
            out.push(format!("{at}.schema.openAPIV3Schema: Required value"));
            continue;
        }
        check_node(
            root,
            &format!("{at}.schema.openAPIV3Schema"),
            Place::Root,
            &mut out,
        );
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Place {
    Root,
    Field,
    Item,
    /// Inside allOf/anyOf/oneOf/not: value validations only.
    Junctor,
}

const FORBIDDEN: &[&str] = &[
    "id",
    "$ref",
    "$schema",
    "definitions",
    "additionalItems",
    "patternProperties",
    "dependencies",
];
const TYPES: &[&str] = &["array", "boolean", "integer", "number", "object", "string"];

fn check_node(n: &Value, at: &str, place: Place, out: &mut Vec<String>) {
    let Some(m) = n.as_object() else {
        out.push(format!("{at}: must be a schema object"));
        return;
    };
    let flag = |k: &str| m.get(k).and_then(Value::as_bool);
    let int_or_string = flag("x-kubernetes-int-or-string") == Some(true);
    let preserve = flag("x-kubernetes-preserve-unknown-fields");
    let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
    for k in FORBIDDEN {
        if m.contains_key(*k) {
            out.push(format!("{at}.{k}: Forbidden: {k} is not supported"));
        }
    }
    if place == Place::Junctor {
        for k in [
            "type",
            "title",
            "description",
            "default",
            "additionalProperties",
            "nullable",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-embedded-resource",
            "x-kubernetes-int-or-string",
            "x-kubernetes-list-map-keys",
            "x-kubernetes-list-type",
            "x-kubernetes-map-type",
            "x-kubernetes-validations",
        ] {
            if m.contains_key(k) {
                out.push(format!("{at}.{k}: must be empty to be structural"));
            }
        }
    } else if ty.is_empty() && !int_or_string && preserve != Some(true) {
        out.push(format!(
            "{at}.type: Required value: must not be empty for specified {}",
            match place {
                Place::Root => "the root",
                Place::Item => "array items",
                _ => "object fields",
            }
        ));
    }
    if !ty.is_empty() && !TYPES.contains(&ty) {
        out.push(format!("{at}.type: Unsupported value: {ty:?}"));
    }
    if place == Place::Root {
        if ty != "object" {
            out.push(format!("{at}.type: must be object at the root"));
        }
        if m.contains_key("additionalProperties") {
            out.push(format!(
                "{at}.additionalProperties: Forbidden: must not be used at the root"
            ));
        }
        if flag("nullable") == Some(true) {
            out.push(format!(
                "{at}.nullable: Forbidden: nullable cannot be true at the root"
            ));
        }
        if let Some(meta) = m.get("properties").and_then(|p| p.get("metadata")) {
            let extra = meta["properties"]
                .as_object()
                .is_some_and(|p| p.keys().any(|k| k != "name" && k != "generateName"));
            if extra || meta.get("type").is_some_and(|t| t != "object") {
                out.push(format!("{at}.properties[metadata]: Forbidden: must not specify anything other than name and generateName"));
            }
        }
    }
    let props = m.get("properties").and_then(Value::as_object);
    if props.is_some_and(|p| !p.is_empty())
        && matches!(m.get("additionalProperties"), Some(v) if v != &json!(true))
    {
        out.push(format!(
            "{at}.additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"
        ));
    }
    if preserve == Some(false) {
        out.push(format!(
            "{at}.x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined"
        ));
    }
    if int_or_string && preserve == Some(true) {
        out.push(format!("{at}.x-kubernetes-preserve-unknown-fields: must be false if x-kubernetes-int-or-string is true"));
    }
    if flag("uniqueItems") == Some(true) {
        out.push(format!("{at}.uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic"));
    }
    if ty == "array" && !m.contains_key("items") {
        out.push(format!("{at}.items: Required value: must be specified"));
    }
    if m.get("items").is_some_and(Value::is_array) {
        out.push(format!(
            "{at}.items: Forbidden: items must be a schema object and not an array"
        ));
    }
    if let Some(lt) = m.get("x-kubernetes-list-type") {
        if ty != "array" {
            out.push(format!(
                "{at}.type: must be array if x-kubernetes-list-type is specified"
            ));
        }
        if !matches!(lt.as_str(), Some("atomic" | "set" | "map")) {
            out.push(format!(
                "{at}.x-kubernetes-list-type: Unsupported value: {lt}"
            ));
        }
    }
    for (i, r) in m
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let rule = r["rule"].as_str().unwrap_or("");
        if rule.trim().is_empty() {
            out.push(format!(
                "{at}.x-kubernetes-validations[{i}].rule: Required value"
            ));
        }
        if let Some(msg) = r.get("message").and_then(Value::as_str) {
            if msg.trim().is_empty() || msg.contains(['\n', '\r']) {
                out.push(format!(
                    "{at}.x-kubernetes-validations[{i}].message: must be non-empty and on one line"
                ));
            }
        } else if rule.contains('\n') {
            out.push(format!("{at}.x-kubernetes-validations[{i}].message: Required value: message must be specified if rule contains line breaks"));
        }
        if let Some(reason) = r.get("reason") {
            if !matches!(
                reason.as_str(),
                Some(
                    "FieldValueDuplicate"
                        | "FieldValueForbidden"
                        | "FieldValueInvalid"
                        | "FieldValueRequired"
                )
            ) {
                out.push(format!(
                    "{at}.x-kubernetes-validations[{i}].reason: Unsupported value"
                ));
            }
        }
    }
    let child = |p| {
        if place == Place::Junctor {
            Place::Junctor
        } else {
            p
        }
    };
    if let Some(p) = props {
        for (k, v) in p {
            check_node(
                v,
                &format!("{at}.properties[{k}]"),
                child(Place::Field),
                out,
            );
        }
    }
    if let Some(items) = m.get("items").filter(|i| i.is_object()) {
        check_node(items, &format!("{at}.items"), child(Place::Item), out);
    }
    if let Some(ap) = m.get("additionalProperties").filter(|a| a.is_object()) {
        check_node(
            ap,
            &format!("{at}.additionalProperties"),
            child(Place::Field),
            out,
        );
    }
    for j in ["allOf", "anyOf", "oneOf"] {
        for (i, s) in m
            .get(j)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            check_node(s, &format!("{at}.{j}[{i}]"), Place::Junctor, out);
            // Every property a junctor names must also be specified outside it.
            for k in s["properties"]
                .as_object()
                .into_iter()
                .flat_map(|o| o.keys())
            {
                if !props.is_some_and(|p| p.contains_key(k)) {
                    out.push(format!(
                        "{at}.properties[{k}]: Required value: because it is defined in {at}.{j}[{i}].properties[{k}]"
                    ));
                }
            }
        }
    }
    if let Some(not) = m.get("not") {
        check_node(not, &format!("{at}.not"), Place::Junctor, out);
    }
}

#[test]
fn the_generated_crds_are_structural() {
    for (file, crd) in crds() {
        let v = violations(&crd);
        assert!(v.is_empty(), "{file}:\n  {}", v.join("\n  "));
    }
}

#[test]
fn the_structural_check_catches_what_the_api_server_rejects() {
    // The hand-written CRD this generator replaced: additionalProperties beside properties.
    let (_, good) = crds().remove(0);
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        violations(&c)
    };
    let root = "/spec/versions/0/schema/openAPIV3Schema";
    let rule = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/ingress/items";
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "additionalProperties and properties are mutual exclusive",
            Box::new(move |c| {
                c.pointer_mut(rule).unwrap()["additionalProperties"] = json!(false);
            }),
        ),
        (
            "must not be empty for specified object fields",
            Box::new(move |c| {
                let n = c
                    .pointer_mut(&format!("{rule}/properties/description"))
                    .unwrap();
                n.as_object_mut().unwrap().remove("type");
            }),
        ),
        (
            "must be object at the root",
            Box::new(move |c| c.pointer_mut(root).unwrap()["type"] = json!("string")),
        ),
        (
            "must be empty to be structural",
            Box::new(move |c| {
                c.pointer_mut(rule).unwrap()["anyOf"] =
                    json!([{"type": "object", "required": ["action"]}])
            }),
        ),
        (
            "because it is defined in",
            Box::new(move |c| {
                c.pointer_mut(rule).unwrap()["oneOf"] =
                    json!([{"properties": {"unknown": {"maxLength": 3}}}])
            }),
        ),
        (
            "must be true or undefined",
            Box::new(move |c| {
                c.pointer_mut(rule).unwrap()["x-kubernetes-preserve-unknown-fields"] = json!(false)
            }),
        ),
        (
            "must be false if x-kubernetes-int-or-string is true",
            Box::new(move |c| {
                c.pointer_mut(&format!("{rule}/properties/protocol"))
                    .unwrap()["x-kubernetes-preserve-unknown-fields"] = json!(true)
            }),
        ),
        (
            "must be spec.names.plural",
            Box::new(|c| c["metadata"]["name"] = json!("gatewaypolicy.portcullis.io")),
        ),
        (
            "must be one of boolean,date,integer,number,string",
            Box::new(|c| {
                c.pointer_mut("/spec/versions/0/additionalPrinterColumns/0")
                    .unwrap()["type"] = json!("int")
            }),
        ),
        (
            "exactly one version marked as storage version",
            Box::new(|c| c.pointer_mut("/spec/versions/0").unwrap()["storage"] = json!(false)),
        ),
        (
            "uniqueItems cannot be set to true",
            Box::new(move |c| {
                c.pointer_mut(&format!("{rule}/properties/source/properties/nets"))
                    .unwrap()["uniqueItems"] = json!(true)
            }),
        ),
        (
            "must not specify anything other than name and generateName",
            Box::new(move |c| {
                c.pointer_mut(root).unwrap()["properties"]["metadata"] =
                    json!({"type": "object", "properties": {"labels": {"type": "object"}}})
            }),
        ),
        (
            "message must be specified if rule contains line breaks",
            Box::new(move |c| {
                c.pointer_mut(rule).unwrap()["x-kubernetes-validations"] =
                    json!([{"rule": "true &&\ntrue"}])
            }),
        ),
    ];
    for (want, f) in cases {
        let v = mutate(&*f);
        assert!(
            v.iter().any(|e| e.contains(want)),
            "expected `{want}`, got {v:#?}"
        );
    }
}

/// Every property a schema node declares, by dotted path (`ingress[].source.nets`).
fn properties(n: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(p) = n["properties"].as_object() {
        for (k, v) in p {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            out.push(path.clone());
            properties(v, &path, out);
        }
    }
    if n["items"].is_object() {
        properties(&n["items"], &format!("{at}[]"), out);
    }
}

#[test]
fn the_schema_and_the_parser_agree_on_every_field() {
    // An object that uses every field the GatewayPolicy schema declares parses, and the spec's
    // top-level fields are the parser's.
    let tcp = json!({"action": "Deny", "protocol": "TCP", "log": true, "vlan": 7,
                     "description": "d",
                     "source": {"nets": ["10.0.0.0/8"], "notNets": ["10.1.0.0/16"], "ports": [1024, "2000:3000"]},
                     "destination": {"nets": ["192.0.2.0/24"], "notNets": ["192.0.2.7"], "ports": [443]}});
    let icmp = json!({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 3, "code": 4}});
    let full = GatewayPolicy::new(
        "full",
        serde_json::from_value(json!({
            "priority": 5, "audit": true,
            "ingress": [tcp.clone(), icmp.clone()],
            "egress": [icmp, tcp]
        }))
        .unwrap(),
    );
    let yaml = serde_norway::to_value(&full).unwrap();
    policy::gateway_policy::GatewayPolicy::from_yaml(yaml.clone()).expect("the parser reads it");
    let crd = serde_json::to_value(GatewayPolicy::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut declared = Vec::new();
    properties(spec, "", &mut declared);
    let mut used = Vec::new();
    properties(
        &schema_of(&serde_json::to_value(&full).unwrap()["spec"]),
        "",
        &mut used,
    );
    for d in &declared {
        assert!(used.contains(d), "the example does not use `{d}`");
    }
    let top: Vec<&str> = spec["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = policy::gateway_policy::SPEC_FIELDS.to_vec();
    want.sort_unstable();
    assert_eq!(top, want);

    let sg = serde_json::to_value(SecurityGroup::crd()).unwrap();
    let sg_spec = &sg["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut top: Vec<&str> = sg_spec["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    top.sort_unstable();
    let mut want = policy::k8s::SPEC_FIELDS.to_vec();
    want.sort_unstable();
    assert_eq!(top, want);
    let full_sg = json!({"apiVersion": "portcullis.io/v1alpha1", "kind": "SecurityGroup",
        "metadata": {"name": "sg", "namespace": "ns"},
        "spec": {"selector": {"matchLabels": {"app": "vm"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]},
                 "ingress": [{"from": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}],
                              "ports": [{"protocol": "TCP", "port": 22, "endPort": 23}]}]}});
    let mut declared = Vec::new();
    properties(sg_spec, "", &mut declared);
    let mut used = Vec::new();
    properties(&schema_of(&full_sg["spec"]), "", &mut used);
    for d in &declared {
        assert!(used.contains(d), "the example does not use `{d}`");
    }
    policy::k8s::SecurityGroup::from_yaml(serde_norway::to_value(&full_sg).unwrap())
        .expect("the parser reads it");
}

/// A value's shape as a schema with `properties`/`items`, to list the paths it uses (the items of
/// an array merged).
fn schema_of(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            json!({"properties": m.iter().map(|(k, v)| (k.clone(), schema_of(v))).collect::<serde_json::Map<_, _>>()})
        }
        Value::Array(a) => {
            let mut merged = json!({});
            for item in a {
                merge(&mut merged, schema_of(item));
            }
            json!({"items": merged})
        }
        _ => json!({}),
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(json!({})), v);
            }
        }
        (slot, v) => *slot = v,
    }
}
