//! The policy loaders on any text: every kind the file and API sources read, selectors, and the
//! compiler with its budgets. Errors are fine; a panic, a stack overflow or a blow-up is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::compile::{compile, GatewayContext};
use policy::object::add_object;
use policy::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = policy::selector::Expr::parse(text);
    let mut snap = Snapshot::default();
    for (i, doc) in serde_norway::Deserializer::from_str(text)
        .enumerate()
        .take(64)
    {
        let Ok(value) = <serde_norway::Value as serde::Deserialize>::deserialize(doc) else {
            break;
        };
        let _ = add_object(value, &format!("fuzz#{i}"), &mut snap);
    }
    let _ = compile(&snap, &GatewayContext::default());
});
