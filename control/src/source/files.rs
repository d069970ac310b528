//! The file source: every `*.yaml`/`*.yml` file under a directory (recursively, in path order),
//! each possibly holding several `---`-separated documents, exactly as kubectl prints objects.
//!
//! A directory loads all or nothing: any bad document fails the load and every error is
//! reported with its file, document index, kind/name and field, so the caller keeps the last good
//! table.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use policy::object::{add_object, ObjectError};
use policy::snapshot::Snapshot;

/// One problem with the policy directory, a file, or one document in a file. Every variant
/// names the file; document problems name the document (0-based) and, through
/// [`ObjectError`], the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory cannot be listed: nothing was loaded.
    #[error("{}: cannot read the policy directory", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("{}: cannot read", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A document is not YAML; later documents of the file are not trusted.
    #[error("{}: document {document}: not valid YAML", file.display())]
    Yaml {
        file: PathBuf,
        document: usize,
        #[source]
        source: serde_norway::Error,
    },
    /// A document is YAML but not an object the gateway accepts.
    #[error("{}: document {document}{}", file.display(), error.after_location())]
    Object {
        file: PathBuf,
        document: usize,
        error: ObjectError,
    },
}

impl SourceError {
    /// The message with its causes, on one line (for status output and logs).
    pub fn line(&self) -> String {
        let mut s = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        s
    }
}

/// Every `*.yaml`/`*.yml` file under `dir`, recursively, sorted, hidden entries skipped: the
/// files a policy directory is read from (tests walk `configs/` with it too).
pub fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
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
            vec![SourceError::Directory {
                dir: dir.to_path_buf(),
                source: e,
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
            return errors.push(SourceError::Read {
                file: file.to_path_buf(),
                source: e,
            })
        }
    };
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let value = match serde_norway::Value::deserialize(doc) {
            Ok(serde_norway::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(SourceError::Yaml {
                    file: file.to_path_buf(),
                    document: i,
                    source: e,
                });
                // The YAML stream is broken from here on; later documents cannot be trusted.
                return;
            }
        };
        let source = format!("{}#{}", file.display(), i);
        if let Err(e) = add_object(value, &source, snap) {
            errors.push(SourceError::Object {
                file: file.to_path_buf(),
                document: i,
                error: e,
            });
        }
    }
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
        assert!(
            matches!(&errs[0], SourceError::Yaml { document: 0, .. }),
            "{}",
            errs[0].line()
        );
        assert!(errs[0]
            .line()
            .contains("x.yml: document 0: not valid YAML: "));
        let fp = Fingerprint::of(&d);
        std::fs::write(d.join("x.yml"), GOOD).unwrap();
        assert_ne!(fp, Fingerprint::of(&d));
        std::fs::remove_dir_all(&d).unwrap();
        assert!(matches!(
            &load_dir(&d).unwrap_err()[0],
            SourceError::Directory { .. }
        ));
    }

    #[test]
    fn deep_yaml_nesting_is_an_error_not_a_crash() {
        // Flow and block nesting thousands deep, loaded on a thread with the 2 MiB stack the
        // reload thread has: the YAML parser's recursion limit answers, nothing overflows.
        let d = tmpdir("deep");
        let flow = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let mut block = String::new();
        for i in 0..3000 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        std::fs::write(d.join("flow.yaml"), format!("{GOOD}---\nspec: {flow}\n")).unwrap();
        std::fs::write(d.join("block.yaml"), block).unwrap();
        let dir = d.clone();
        let errs = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || load_dir(&dir).unwrap_err())
            .unwrap()
            .join()
            .expect("no stack overflow");
        let lines: Vec<String> = errs.iter().map(SourceError::line).collect();
        assert_eq!(errs.len(), 2, "{lines:#?}");
        for l in &lines {
            assert!(l.contains("recursion limit exceeded"), "{l}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
