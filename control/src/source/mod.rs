//! Where policy objects come from. Today: a directory of YAML files (the embedded default).

pub mod files;

pub use files::{load_dir, Fingerprint, SourceError};
