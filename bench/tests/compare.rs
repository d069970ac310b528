//! `compare-classifiers` on every shared ClassBench set: our classifier and every rte_acl method
//! this CPU supports must agree with `.expected` on every header (the command fails otherwise),
//! and every row must say so. In CI, DPDK must be present (scripts/deps installs it).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn both_classifiers_agree_with_expected_on_every_set() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/classbench");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .args([
            "compare-classifiers",
            "--data",
            data.to_str().unwrap(),
            "--repeats",
            "1",
            "--ms",
            "5",
            "--bursts",
            "1,64",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| set"))
        .collect();
    for set in ["acl1_1k", "fw1_1k", "ipc1_1k", "acl1_10k"] {
        assert!(
            rows.iter()
                .any(|r| r.starts_with(&format!("| {set} |")) && r.contains("portcullis")),
            "{set} missing:\n{stdout}"
        );
    }
    for r in &rows {
        let agree = r.trim_end_matches(" |").rsplit("| ").next().unwrap();
        let (a, b) = agree.split_once(" / ").unwrap();
        assert_eq!(a, b, "row disagrees with .expected: {r}");
    }
    let dpdk_rows = rows.iter().filter(|r| r.contains("rte_acl")).count();
    if std::env::var_os("CI").is_some() {
        assert!(dpdk_rows >= 4 * 2 * 2, "CI must compare against rte_acl (scalar and default at least, per set and burst):\n{stdout}");
    }
}
