//! Portcullis control: where policies come from, and how a compiled table reaches the workers.
//!
//! The pure part of the policy path (model, compiler, classifier, table, explain) is the
//! [`policy`] crate; this crate adds the I/O around it, in order:
//!
//! 1. [`source`] reads objects, from a directory of YAML files (the embedded default) or from
//!    the Kubernetes API through kube-rs watchers, into a [`policy::snapshot::Snapshot`];
//! 2. `policy::compile` and `policy::table::Table::build` turn it into an immutable table;
//! 3. [`publish`] swaps tables in atomically; workers load once per burst and never block;
//! 4. [`reload`] ties it together for a running gateway: reload on change, merge the files and
//!    the API, keep the last good table.

pub mod crd;
pub mod publish;
pub mod reload;
pub mod source;
