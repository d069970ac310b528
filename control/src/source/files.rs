//! The file source: every `*.yaml`/`*.yml` file under a directory (recursively, in path order),
//! each possibly holding several `---`-separated documents, exactly as kubectl prints objects.
//!
//! A directory loads all or nothing: any bad document fails the load and every error is
//! reported with its file, document index, kind/name and field, so the caller keeps the last good
//! table.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use crate::k8s::{
    CalicoPolicy, EndpointSlice, Namespace, NetworkPolicy, Node, SecurityGroup, Service, Workload,
};
use crate::policy::{FieldError, GatewayPolicy, API_VERSION};
use crate::snapshot::{Located, Snapshot};

/// One problem with one document (or file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub file: PathBuf,
    /// 0-based document index within the file, when the problem is in a document.
    pub document: Option<usize>,
    /// `Kind/name`, when known.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SourceError {}

/// Enough of a document to dispatch on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Option<crate::policy::ObjectMeta>,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        // Skip hidden entries, which also skips Kubernetes ConfigMap mounts' `..data` links.
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads every object under `dir`, all or nothing: on any error, returns every error found. This
/// is what a running gateway uses, so a typo in a Deny policy can never fail open.
pub fn load_dir(dir: &Path) -> Result<Snapshot, Vec<SourceError>> {
    let (snap, errors) = load_dir_report(dir);
    if errors.is_empty() {
        Ok(snap)
    } else {
        Err(errors)
    }
}

/// Loads every valid object under `dir` and reports the invalid ones (for `check`, `explain`).
pub fn load_dir_report(dir: &Path) -> (Snapshot, Vec<SourceError>) {
    let mut files = Vec::new();
    let mut snap = Snapshot::default();
    if let Err(e) = yaml_files(dir, &mut files) {
        return (
            snap,
            vec![SourceError {
                file: dir.to_path_buf(),
                document: None,
                object: None,
                field: None,
                message: format!("cannot read the policy directory: {e}"),
            }],
        );
    }
    let mut errors = Vec::new();
    for file in files {
        load_file(&file, &mut snap, &mut errors);
    }
    (snap, errors)
}

fn load_file(file: &Path, snap: &mut Snapshot, errors: &mut Vec<SourceError>) {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            return errors.push(SourceError {
                file: file.to_path_buf(),
                document: None,
                object: None,
                field: None,
                message: format!("cannot read: {e}"),
            })
        }
    };
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let value = match serde_norway::Value::deserialize(doc) {
            Ok(serde_norway::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(SourceError {
                    file: file.to_path_buf(),
                    document: Some(i),
                    object: None,
                    field: None,
                    message: format!("not valid YAML: {e}"),
                });
                // The YAML stream is broken from here on; later documents cannot be trusted.
                return;
            }
        };
        let source = format!("{}#{}", file.display(), i);
        if let Err(mut e) = add_object(value, &source, snap) {
            e.file = file.to_path_buf();
            e.document = Some(i);
            errors.push(e);
        }
    }
}

/// Adds one object (or every item of a `List`) to the snapshot. `source` names it in origins.
pub fn add_object(
    value: serde_norway::Value,
    source: &str,
    snap: &mut Snapshot,
) -> Result<(), SourceError> {
    let err = |object: Option<String>, field: Option<String>, message: String| SourceError {
        file: PathBuf::new(),
        document: None,
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
        // CRD manifests may sit beside the objects (configs/deploy); they change no verdict.
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {}
        (v, k) => {
            return Err(err(
                object.clone(),
                Some("kind".into()),
                format!(
                    "`{v}` `{k}` is not a kind this source reads (expected Namespace, Pod, Node, Service, EndpointSlice, NetworkPolicy, Calico (Global)NetworkPolicy, VirtualMachineInstance, {API_VERSION} GatewayPolicy or SecurityGroup, or a List of them)"
                ),
            ))
        }
    }
    Ok(())
}

/// Cheap change detection for a policy directory: every YAML file's path, size and mtime.
/// Polling this is robust where inotify is not (ConfigMap symlink swaps, editors' rename dance).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl Fingerprint {
    pub fn of(dir: &Path) -> Fingerprint {
        let mut files = Vec::new();
        let _ = yaml_files(dir, &mut files);
        Fingerprint(
            files
                .into_iter()
                .map(|f| {
                    let md = std::fs::metadata(&f).ok();
                    let len = md.as_ref().map_or(0, |m| m.len());
                    let mtime = md.and_then(|m| m.modified().ok());
                    (f, len, mtime)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("portcullis-src-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const GOOD: &str = "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: a}\nspec: {ingress: [{action: Allow}]}\n";

    #[test]
    fn loads_multi_document_files_and_reports_every_error() {
        let d = tmpdir("multi");
        std::fs::write(
            d.join("a.yaml"),
            format!("{GOOD}---\n{}", GOOD.replace("name: a", "name: b")),
        )
        .unwrap();
        std::fs::write(d.join("notes.txt"), "ignored").unwrap();
        let snap = load_dir(&d).unwrap();
        assert_eq!(snap.gateway_policies.len(), 2);
        assert!(snap.gateway_policies[1].source.ends_with("a.yaml#1"));

        std::fs::write(
            d.join("b.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: bad}\nspec: {ingress: [{action: Allow, source: {nets: [300.1.1.1/8]}}]}\n",
        )
        .unwrap();
        let errs = load_dir(&d).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text[0].contains("b.yaml: document 0 (ConfigMap/c): kind"),
            "{}",
            text[0]
        );
        assert!(
            text[1]
                .contains("b.yaml: document 1 (GatewayPolicy/bad): spec.ingress[0].source.nets[0]"),
            "{}",
            text[1]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn broken_yaml_and_missing_dir_are_errors() {
        let d = tmpdir("broken");
        std::fs::write(d.join("x.yml"), "spec: [unclosed\n").unwrap();
        let errs = load_dir(&d).unwrap_err();
        assert!(errs[0].message.contains("not valid YAML"), "{}", errs[0]);
        let fp = Fingerprint::of(&d);
        std::fs::write(d.join("x.yml"), GOOD).unwrap();
        assert_ne!(fp, Fingerprint::of(&d));
        std::fs::remove_dir_all(&d).unwrap();
        assert!(load_dir(&d).unwrap_err()[0]
            .message
            .contains("cannot read the policy directory"));
    }
}
