//! Every file in `configs/` is loaded by a test: gateway configs validate, and every policy
//! directory loads and compiles. A YAML file this test does not know how to load fails it.

use std::path::{Path, PathBuf};

use control::compile::GatewayContext;
use control::reload::load_and_compile;
use gateway::config::Config;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

#[test]
fn every_config_file_loads() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files = Vec::new();
    walk(&root, &mut files);
    assert!(!files.is_empty());
    let mut policy_dirs = std::collections::BTreeSet::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        let parent = f.parent().unwrap();
        if name.starts_with("gateway") {
            let cfg = Config::load(f).unwrap_or_else(|e| panic!("{e}"));
            let (_, rules, warnings) = load_and_compile(&cfg.policy_dir, &cfg.context)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            // Scenarios may carry deliberate warnings (tests/scenarios.rs checks them).
            if !f.starts_with(root.join("scenarios")) {
                assert!(warnings.is_empty(), "{}: {warnings:?}", f.display());
            }
            assert!(rules.len() > 2, "{}: compiles to real rules", f.display());
        } else if parent.file_name().is_some_and(|n| n == "policies") {
            policy_dirs.insert(parent.to_path_buf());
        } else {
            panic!(
                "{}: no test knows how to load this file; add it here",
                f.display()
            );
        }
    }
    for d in policy_dirs {
        let (snap, rules, _) = load_and_compile(&d, &GatewayContext::default())
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        assert!(
            snap.counts().iter().any(|(_, n)| *n > 0),
            "{}: no objects",
            d.display()
        );
        assert!(rules.len() > 2, "{}: compiles to real rules", d.display());
    }
}
