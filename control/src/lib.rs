//! Portcullis control: everything that decides.
//!
//! A policy travels through these modules in order:
//!
//! 1. [`source`] reads objects (YAML files, or the Kubernetes API through kube-rs watchers) into a
//!    [`snapshot::Snapshot`];
//! 2. [`compile`] turns a snapshot plus the gateway's own context into an ordered
//!    [`rule::RuleSet`], every rule carrying its [`rule::Origin`];
//! 3. [`classify`] builds a packet classifier from the rule set;
//! 4. [`table`] pairs the two into an immutable [`table::Table`], the contract with the gateway;
//! 5. [`publish`] swaps tables in atomically; workers load once per burst and never block;
//! 6. [`reload`] ties it together for a running gateway: reload on change, keep the last good table.
//!
//! Nothing here touches sockets or packets; all of it is testable without root.

#[cfg(feature = "apiserver")]
pub mod apiserver;
pub mod classbench;
pub mod classify;
pub mod compile;
pub mod explain;
pub mod k8s;
pub mod key;
pub mod netpol;
pub mod policy;
pub mod publish;
pub mod reload;
pub mod rule;
pub mod selector;
pub mod snapshot;
pub mod source;
pub mod table;
