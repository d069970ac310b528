//! Portcullis policy: the pure part of the policy path. No Kubernetes client, no sockets, no
//! clock: everything here is a function of its arguments, tested and benchmarked without a
//! cluster or root.
//!
//! A policy travels through these modules in order:
//!
//! 1. [`object`] converts one Kubernetes-style object (YAML or JSON, as kubectl prints it) into
//!    the plain model: [`k8s`] (one file per kind), [`gateway_policy`] (our own kind) and
//!    [`selector`] (label selectors and Calico expressions);
//! 2. [`snapshot`] holds every object, with where it came from;
//! 3. [`compile`] turns a snapshot plus the gateway's own context into an ordered
//!    [`rule::RuleSet`], every rule carrying its [`rule::Origin`] ([`netpol`] is the
//!    NetworkPolicy engine it uses);
//! 4. [`classify`] builds a packet classifier from the rule set ([`classify::Linear`] is the
//!    reference oracle);
//! 5. [`table`] pairs the two into an immutable [`table::Table`] that decides [`key::FlowKey`]s:
//!    the contract between control and the gateway;
//! 6. [`explain`] answers "why" for one flow.
//!
//! [`classbench`] reads the external ClassBench rule sets and traces the classifier is checked on.

pub mod classbench;
pub mod classify;
pub mod compile;
pub mod explain;
pub mod gateway_policy;
pub mod k8s;
pub mod key;
pub mod netpol;
pub mod object;
pub mod rule;
pub mod selector;
pub mod snapshot;
pub mod table;
