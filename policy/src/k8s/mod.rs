//! Kubernetes, Calico, KubeVirt and our own objects, as plain validated data: one file per kind.
//!
//! Upstream kinds are read as kubectl prints them (`kubectl get -o yaml`, `List` included) and
//! are lenient about fields the gateway does not use (status, managedFields, container images...),
//! because the API server already validated them. Fields the gateway does use are validated and
//! errors name them. Our own kinds (`GatewayPolicy`, `SecurityGroup`) are strict.

use std::net::IpAddr;

use serde::Deserialize;

pub use crate::gateway_policy::from_value;
use crate::gateway_policy::{FieldError, ObjectMeta};
use crate::key::proto;

mod calico;
mod endpoint_slice;
mod namespace;
mod network_policy;
mod node;
mod security_group;
mod service;
mod workload;

pub use calico::*;
pub use endpoint_slice::*;
pub use namespace::*;
pub use network_policy::*;
pub use node::*;
pub use security_group::*;
pub use service::*;
pub use workload::*;

fn proto_of(p: Option<&str>, field: &str) -> Result<u8, FieldError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        "SCTP" => Ok(proto::SCTP),
        other => Err(FieldError::new(
            field,
            format!("`{other}` is not TCP, UDP or SCTP"),
        )),
    }
}

fn ip(s: &str, field: &str) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| FieldError::new(field, format!("`{s}` is not an IP address")))
}

fn name_of(m: &ObjectMeta) -> Result<String, FieldError> {
    if m.name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing"));
    }
    Ok(m.name.clone())
}

fn namespace_of(m: &ObjectMeta) -> Result<String, FieldError> {
    m.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            FieldError::new(
                "metadata.namespace",
                "a namespaced object needs a namespace",
            )
        })
}

/// A port by number or by name (IntOrString).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl<'de> Deserialize<'de> for PortRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        port_or_text(d, "1-65535 or a name", PortRef::Number, PortRef::Name)
    }
}

/// Deserializes a port written as a number (1-65535, built with `number`) or as a string
/// (`text`). `forms` says what is accepted, in the errors: "port must be {forms}, not 0", and
/// "expected a port: {forms}".
pub(crate) fn port_or_text<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    forms: &'static str,
    number: fn(u16) -> T,
    text: fn(String) -> T,
) -> Result<T, D::Error> {
    struct V<T> {
        forms: &'static str,
        number: fn(u16) -> T,
        text: fn(String) -> T,
    }
    impl<T> V<T> {
        fn bad<E: serde::de::Error>(&self, n: impl std::fmt::Display) -> E {
            E::custom(format!("port must be {}, not {n}", self.forms))
        }
    }
    impl<T> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a port: {}", self.forms)
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<T, E> {
            match u16::try_from(n) {
                Ok(p) if p > 0 => Ok((self.number)(p)),
                _ => Err(self.bad(n)),
            }
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<T, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(self.bad(n)),
            }
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<T, E> {
            Err(self.bad(n))
        }
        fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<T, E> {
            Ok((self.text)(t.to_string()))
        }
    }
    d.deserialize_any(V {
        forms,
        number,
        text,
    })
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}
