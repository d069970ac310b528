//! What the compiler tests share: YAML documents into a snapshot and a table, through the entry
//! point every source uses (`add_object`).

use policy::compile::{compile, GatewayContext};
use policy::object::add_object;
use policy::snapshot::Snapshot;
use policy::table::Table;

/// `---`-separated YAML documents as a snapshot; a document that does not load fails the test.
pub(crate) fn snapshot(docs: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    for (i, doc) in docs.split("\n---\n").enumerate() {
        let v: serde_norway::Value = serde_norway::from_str(doc).unwrap();
        add_object(v, &format!("test#{i}"), &mut snap)
            .unwrap_or_else(|e| panic!("document {i}: {e}"));
    }
    snap
}

/// The documents compiled with `ctx` into a one-worker table.
pub(crate) fn table_with(docs: &str, ctx: GatewayContext) -> Table {
    Table::build(compile(&snapshot(docs), &ctx).unwrap().rules, 1, 1)
}
