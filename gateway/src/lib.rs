//! Portcullis gateway: the datapath and the `portcullis` binary.
//!
//! The path of a frame, module by module:
//!
//! 1. [`sys::xsk`] — AF_XDP sockets on `ext:q` and `int:q` sharing one UMEM per worker; frame
//!    ownership lives in the types (the only `unsafe` code is under [`sys`]);
//! 2. [`worker`] — one pinned thread per queue: receive a burst, parse, classify, forward;
//! 3. [`parse`] — Ethernet/VLAN/IPv4/IPv6/TCP/UDP/SCTP/ICMP into a [`control::key::FlowKey`],
//!    or a drop [`stats::Reason`];
//! 4. the compiled [`control::table::Table`] decides the whole burst;
//! 5. [`stats`] — per-worker counters and latency, read by [`metrics`].
//!
//! Around it: [`config`] (strict YAML), [`preflight`] (start-up checks with instructions),
//! [`runtime`] (`portcullis run`), and the namespace [`lab`], [`probe`] traffic and [`demo`].

#![deny(unsafe_code)]

pub mod config;
pub mod demo;
pub mod lab;
pub mod metrics;
pub mod parse;
pub mod preflight;
pub mod probe;
pub mod runtime;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod worker;
