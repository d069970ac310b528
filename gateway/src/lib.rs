//! Portcullis gateway: the datapath.
//!
//! The path of a frame, module by module:
//!
//! 1. [`sys::xsk`] — AF_XDP sockets on `ext:q` and `int:q` sharing one UMEM per worker, behind
//!    the [`sys::ring::Rings`] trait; frame ownership lives in the types (the only `unsafe` code
//!    of the product is under [`sys`]);
//! 2. [`worker`] — one pinned thread per queue: receive a burst, parse, classify, forward;
//! 3. [`parse`] — Ethernet/VLAN/IPv4/IPv6/TCP/UDP/SCTP/ICMP into a [`policy::key::FlowKey`],
//!    or a drop [`stats::Reason`];
//! 4. the compiled [`policy::table::Table`], published by [`control::publish`], decides the
//!    whole burst;
//! 5. [`stats`] — per-worker counters and latency, served by [`metrics`].
//!
//! Around it: [`config`] (strict YAML), [`preflight`] (start-up checks with instructions) and
//! [`runtime`] (`portcullis run`: sockets, workers, the control loop). The `portcullis` binary
//! (crate `portcullis`, in `cli/`) wires this to the subcommands and the lab.
//!
//! Feature `runtime` (default) is everything that runs: sockets, workers, metrics, `run`,
//! `replay`. Without it the crate is the per-frame code alone (config, parse, conntrack, pcap,
//! stats, in-memory rings), light enough for the sanitizer builds of `fuzz/`.

#![deny(unsafe_code)]
// Without `runtime`, helpers only the workers use are unused; they are still the same code.
#![cfg_attr(not(feature = "runtime"), allow(dead_code))]

pub mod config;
pub mod conntrack;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod monitor;
pub mod parse;
pub mod pcap;
#[cfg(feature = "runtime")]
pub mod preflight;
#[cfg(feature = "runtime")]
pub mod replay;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
#[cfg(feature = "runtime")]
pub mod worker;
