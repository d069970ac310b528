//! `portcullis lab`: the gateway's topology built from network namespaces on one machine, the
//! traffic that probes it, and the demo. A product feature for trying the gateway and for the
//! root tests and benchmarks, but not part of the datapath: nothing in `gateway` depends on it.
//!
//! - [`accounting`]: the gateway's own counters, and the identities they must satisfy;
//! - [`netns`]: the client / gateway / server namespaces and veths, named by prefix;
//! - [`process`]: the real `portcullis run` as a child process inside the gateway namespace;
//! - [`traffic`]: TCP connects, sequence-numbered UDP streams and servers, inside a namespace;
//! - [`http`]: the small HTTP client that reads a gateway's `/status`, `/healthz` and `/explain`;
//! - [`demo`]: `portcullis lab demo`, the README's first command.

pub mod accounting;
pub mod demo;
pub mod http;
pub mod netns;
pub mod process;
pub mod traffic;

pub use netns::{
    in_netns, sh, Lab, LabError, LabGuard, CLIENT_MAC, CLIENT_V4, EXT_MAC, INT_MAC, SERVER_MAC,
    SERVER_V4,
};
pub use process::{netns_command, GatewayProcess};
