//! Where policy objects come from: a directory of YAML files (the embedded default) and the
//! Kubernetes API. Both feed objects through [`add_object`], so they cannot disagree on what an
//! object means.

pub mod files;
pub mod kubernetes;

pub use files::{load_dir, load_dir_report, Fingerprint, SourceError};
pub use policy::object::add_object;
