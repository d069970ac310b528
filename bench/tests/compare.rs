//! `compare-classifiers` on the shared 1k and 10k ClassBench sets: the forest (with every walk
//! this CPU has), the tuple space and every rte_acl method this CPU supports must agree with
//! `.expected` on every header (the command fails otherwise), and every row must say so; in CI,
//! with DPDK present (scripts/deps installs it), there is a summary row against rte_acl per set
//! and burst. The 100k sets are left to the benchmark run: rte_acl alone takes most of a minute
//! to build them, and `policy/tests/classbench.rs` checks our classifiers on all nine.

use std::path::PathBuf;
use std::process::Command;

const SETS: [&str; 6] = [
    "acl1_1k", "fw1_1k", "ipc1_1k", "acl1_10k", "fw1_10k", "ipc1_10k",
];

#[test]
fn both_classifiers_agree_with_expected_on_the_1k_and_10k_sets() {
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
            "--sets",
            &SETS.join(","),
            "--pairs",
            "2",
            "--pair-ms",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The per-classifier table (agreement last), then the summary table; each starts with
    // its header line.
    let (mut rows, mut summary) = (Vec::new(), Vec::new());
    let mut table = None;
    for l in stdout.lines() {
        if l.starts_with("| set | rules |") {
            table = Some(&mut rows);
        } else if l.starts_with("| set | burst |") {
            table = Some(&mut summary);
        } else if l.starts_with("|---") {
            continue;
        } else if !l.starts_with("| ") {
            table = None;
        } else if let Some(t) = table.as_mut() {
            t.push(l);
        }
    }
    for set in SETS {
        assert!(
            rows.iter()
                .any(|r| r.starts_with(&format!("| {set} |")) && r.contains("portcullis forest")),
            "{set} missing:\n{stdout}"
        );
    }
    for r in rows.iter().filter(|r| !r.contains("not run:")) {
        let agree = r
            .trim_end_matches(" |")
            .rsplit("| ")
            .next()
            .unwrap_or_default();
        let (a, b) = agree
            .split_once(" / ")
            .unwrap_or_else(|| panic!("no agreement column in {r}"));
        assert_eq!(a, b, "row disagrees with .expected: {r}");
    }
    let dpdk_rows = rows
        .iter()
        .filter(|r| r.contains("rte_acl") && !r.contains("not run:"))
        .count();
    if std::env::var_os("CI").is_some() {
        assert!(dpdk_rows >= SETS.len() * 2 * 2, "CI must compare against rte_acl (at least scalar and SSE, per set and burst):\n{stdout}");
        assert_eq!(
            summary.len(),
            SETS.len() * 2,
            "one summary row per set and burst:\n{stdout}"
        );
        // The head-to-head ratios: a median and its quartiles for ours against the best, and
        // for AVX2 against AVX2 where both run.
        for r in &summary {
            assert!(
                r.contains(" [") && r.contains("-"),
                "no head-to-head ratio in {r}"
            );
        }
    }
}
