//! Every file in `configs/` is loaded by a test: gateway configs validate, and every policy
//! directory loads and compiles. A YAML file this test does not know how to load fails it.

use std::path::{Path, PathBuf};

use control::reload::load_and_compile;
use gateway::config::Config;
use policy::compile::GatewayContext;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    control::source::files::yaml_files(dir, out).unwrap();
}

#[test]
fn every_config_file_loads() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files = Vec::new();
    walk(&root, &mut files);
    // The Vagrant gateway's config and policies are held to the same standard.
    let vagrant = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vagrant/files");
    files.push(vagrant.join("gateway.yaml"));
    walk(&vagrant.join("policies"), &mut files);
    // So are the Debian package's default config and example policy.
    let packaging = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    files.push(packaging.join("gateway.yaml"));
    walk(&packaging.join("policies"), &mut files);
    assert!(!files.is_empty());
    let mut policy_dirs = std::collections::BTreeSet::new();
    let mut crds = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        let parent = f.parent().unwrap();
        if name == "gateway.yaml" {
            let cfg = Config::load(f).unwrap_or_else(|e| panic!("{e}"));
            let (_, rules, warnings) = load_and_compile(&cfg.policy_dir, &cfg.context)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            // Scenarios may carry deliberate warnings (tests/scenarios.rs checks them).
            if f.starts_with(&root) && !f.starts_with(root.join("scenarios")) {
                assert!(warnings.is_empty(), "{}: {warnings:?}", f.display());
            }
            assert!(rules.len() > 2, "{}: compiles to real rules", f.display());
        } else if parent.file_name().is_some_and(|n| n == "deploy") {
            // The CRDs are checked here; the rest by tests/deploy.rs.
            if name.contains("-crd-") {
                crds.push(f.clone());
            }
        } else if parent.file_name().is_some_and(|n| n == "monitoring") {
            // Alerts: promtool (scripts/test) and tests/metrics.rs check them; here, that each
            // file is the kind of document it says it is.
            let v: serde_json::Value =
                serde_norway::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            match name.as_ref() {
                "alerts.yaml" => assert!(v["groups"][0]["rules"].as_array().unwrap().len() >= 5),
                "podmonitor.yaml" => assert_eq!(v["kind"], "PodMonitor"),
                "scrape-config.yaml" => {
                    assert_eq!(v["scrape_configs"][0]["job_name"], "portcullis")
                }
                other => panic!("{}: no test knows how to load {other}", f.display()),
            }
        } else if parent.file_name().is_some_and(|n| n == "policies") {
            policy_dirs.insert(parent.to_path_buf());
        } else {
            panic!(
                "{}: no test knows how to load this file; add it here",
                f.display()
            );
        }
    }
    let schemas = crd_schemas(&crds);
    assert_eq!(schemas.len(), 2, "GatewayPolicy and SecurityGroup CRDs");
    // Every GatewayPolicy and SecurityGroup shipped in configs/ conforms to its CRD schema.
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if let Some(schema) = v["kind"].as_str().and_then(|k| schemas.get(k)) {
                if v["apiVersion"] == "portcullis.io/v1alpha1" {
                    if let Err(e) = conforms(&v, schema, "") {
                        panic!(
                            "{}: {} {} does not conform to its CRD: {e}",
                            f.display(),
                            v["kind"],
                            v["metadata"]["name"]
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked >= 4,
        "only {checked} objects were checked against the CRDs"
    );
    for d in policy_dirs {
        let (snap, rules, _) = load_and_compile(&d, &GatewayContext::default())
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        assert!(
            snap.counts().iter().any(|(_, n)| *n > 0),
            "{}: no objects",
            d.display()
        );
        assert!(rules.len() > 2, "{}: compiles to real rules", d.display());
    }
}

/// kind -> openAPIV3Schema of every CRD file.
fn crd_schemas(files: &[PathBuf]) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut out = std::collections::BTreeMap::new();
    for f in files {
        let v: serde_json::Value =
            serde_norway::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        assert_eq!(v["kind"], "CustomResourceDefinition", "{}", f.display());
        assert_eq!(v["spec"]["group"], "portcullis.io", "{}", f.display());
        let version = &v["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        let schema = version["schema"]["openAPIV3Schema"].clone();
        assert_eq!(schema["type"], "object", "{}", f.display());
        out.insert(
            v["spec"]["names"]["kind"].as_str().unwrap().to_string(),
            schema,
        );
    }
    out
}

/// A structural check of `v` against an OpenAPI v3 schema, as the API server would apply it.
fn conforms(v: &serde_json::Value, s: &serde_json::Value, path: &str) -> Result<(), String> {
    use serde_json::Value;
    if s["x-kubernetes-int-or-string"] == true {
        return if v.is_string() || v.is_u64() {
            Ok(())
        } else {
            Err(format!("{path}: expected int or string"))
        };
    }
    if s["x-kubernetes-preserve-unknown-fields"] == true {
        return Ok(());
    }
    if let Some(allowed) = s["enum"].as_array() {
        if !allowed.contains(v) {
            return Err(format!("{path}: {v} is not one of {allowed:?}"));
        }
    }
    match s["type"].as_str() {
        Some("object") => {
            let Value::Object(m) = v else {
                return Err(format!("{path}: expected an object"));
            };
            for r in s["required"].as_array().into_iter().flatten() {
                if !m.contains_key(r.as_str().unwrap()) {
                    return Err(format!("{path}: missing required {r}"));
                }
            }
            for (k, x) in m {
                match s["properties"].get(k) {
                    Some(ps) => conforms(x, ps, &format!("{path}.{k}"))?,
                    // The top level also carries apiVersion/kind/metadata, which the API server
                    // validates itself.
                    None if path.is_empty() => {}
                    None if s["additionalProperties"] == false => {
                        return Err(format!("{path}: unknown field {k}"))
                    }
                    None => {}
                }
            }
            Ok(())
        }
        Some("array") => {
            let Value::Array(a) = v else {
                return Err(format!("{path}: expected an array"));
            };
            a.iter()
                .enumerate()
                .try_for_each(|(i, x)| conforms(x, &s["items"], &format!("{path}[{i}]")))
        }
        Some("string") => v
            .is_string()
            .then_some(())
            .ok_or(format!("{path}: expected a string")),
        Some("integer") => v
            .is_i64()
            .then_some(())
            .ok_or(format!("{path}: expected an integer")),
        Some("boolean") => v
            .is_boolean()
            .then_some(())
            .ok_or(format!("{path}: expected a boolean")),
        _ => Ok(()),
    }
}
