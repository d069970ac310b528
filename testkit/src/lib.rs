//! Test doubles for Portcullis, kept out of the product crates (`publish = false`; used as a
//! dev-dependency by the tests, and by `portcullis-bench kube-latency`, never by the
//! `portcullis` binary: `cargo tree -e normal -p portcullis` does not list it).
//!
//! - [`apiserver`]: a Kubernetes API server speaking list/watch with resourceVersions,
//!   pagination, bookmarks, compaction (`410 Gone`) and outages, so the live source is tested
//!   without a cluster;
//! - [`raw`]: an AF_PACKET sender for frames the kernel's own stack would never build;
//! - [`frames`]: hand-built frames (any tags, fragments, TCP flags and checksums, ICMP quotes)
//!   for the tracker's attack tests.

pub mod apiserver;
pub mod frames;
#[allow(unsafe_code)]
pub mod raw;
