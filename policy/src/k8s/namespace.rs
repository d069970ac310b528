//! Namespaces: a name and labels (the API server always sets `kubernetes.io/metadata.name`).

use serde::Deserialize;

use super::*;
use crate::gateway_policy::{FieldError, ObjectMeta};
use crate::selector::Labels;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Deserialize)]
struct MetaOnly {
    metadata: ObjectMeta,
}

impl Namespace {
    pub fn from_yaml(v: serde_norway::Value) -> Result<Namespace, FieldError> {
        let w: MetaOnly = from_value(v)?;
        let name = name_of(&w.metadata)?;
        let mut labels = w.metadata.labels;
        // The API server always sets this label.
        labels.insert("kubernetes.io/metadata.name".into(), name.clone());
        Ok(Namespace { name, labels })
    }
}
