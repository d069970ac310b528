//! Where policy objects come from. Today: a directory of YAML files (the embedded default);
//! `add_object` is the entry point any other source (the Kubernetes API) feeds objects through.

pub mod files;

pub use files::{add_object, load_dir, load_dir_report, Fingerprint, SourceError};
