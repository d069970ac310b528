//! A consistent view of every policy object, whatever source it came from.

use crate::policy::GatewayPolicy;

/// Where an object was read from: a file and document, or an API path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub source: String,
    pub object: T,
}

/// Everything the compiler needs, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub gateway_policies: Vec<Located<GatewayPolicy>>,
}

impl Snapshot {
    /// Object counts per kind, for `check` and status.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        vec![("GatewayPolicy", self.gateway_policies.len())]
    }
}
