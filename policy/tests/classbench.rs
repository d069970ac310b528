//! The external check of DESIGN §5: on every header of every shared ClassBench set, the datapath
//! classifier's first match equals `.expected`. The linear oracle is held to the same data.

use std::path::PathBuf;

use policy::classbench::{read_expected, read_filters, read_trace};
use policy::classify::{Classifier, Forest, Linear, TupleSpace, Walk, NO_MATCH};

fn data_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/classbench");
    assert!(
        dir.is_dir(),
        "{} is missing: the shared test data must sit beside the repository",
        dir.display()
    );
    dir
}

fn sets() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            name.strip_suffix(".filters").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 4,
        "expected the acl1/fw1/ipc1 sets, found {names:?}"
    );
    names
}

fn as_index(v: u32) -> i64 {
    if v == NO_MATCH {
        -1
    } else {
        v as i64
    }
}

#[test]
fn forest_and_tuple_space_agree_with_expected_on_every_header() {
    let dir = data_dir();
    for set in sets() {
        let rules = read_filters(&dir.join(format!("{set}.filters"))).unwrap();
        let trace = read_trace(&dir.join(format!("{set}.trace"))).unwrap();
        let expected = read_expected(&dir.join(format!("{set}.expected"))).unwrap();
        assert_eq!(
            trace.len(),
            expected.len(),
            "{set}: trace and expected differ in length"
        );
        let forest = Forest::build(&rules);
        let tuples = TupleSpace::build(&rules);
        // Every walk this CPU runs, other than the detected one.
        let others: Vec<(Walk, Forest)> = [Walk::Avx2, Walk::Scalar]
            .into_iter()
            .filter(|&w| w != forest.walk())
            .filter_map(|w| {
                let mut f = Forest::build(&rules);
                f.set_walk(w).then_some((w, f))
            })
            .collect();
        // Bursts of 64, bursts of 5 (the small-burst path) and one key at a time.
        let mut runs: Vec<(String, &dyn Classifier, usize)> = vec![
            (format!("forest ({})", forest.walk().name()), &forest, 64),
            ("forest".into(), &forest, 5),
            ("forest".into(), &forest, 1),
            ("tuple space".into(), &tuples, 64),
        ];
        for (w, f) in &others {
            runs.push((format!("forest ({})", w.name()), f, 64));
        }
        for (name, c, burst) in runs {
            let mut out = vec![0u32; trace.len()];
            for (keys, res) in trace.chunks(burst).zip(out.chunks_mut(burst)) {
                if burst == 1 {
                    res[0] = c.first_match(&keys[0], 0);
                } else {
                    c.classify_batch(keys, res);
                }
            }
            let wrong: Vec<usize> = (0..trace.len())
                .filter(|&i| as_index(out[i]) != expected[i])
                .collect();
            assert!(
            wrong.is_empty(),
            "{set}: {name} at burst {burst}: {} of {} headers disagree, first at line {} (got {}, expected {})",
            wrong.len(),
            trace.len(),
            wrong[0] + 1,
            as_index(out[wrong[0]]),
            expected[wrong[0]]
        );
        }
        // Continuations (how Pass, Log and audit rules go on): the next match after the
        // first, against the linear reference, on a deterministic sample of headers. Leaves
        // stop at a covering atom, so these also need the atoms leaves dropped.
        let linear = Linear::build(&rules);
        let step = if rules.len() > 2000 { 50 } else { 5 };
        for i in (0..trace.len()).step_by(step) {
            let Ok(first) = u32::try_from(expected[i]) else {
                continue;
            };
            let k = &trace[i];
            assert_eq!(
                forest.first_match(k, first + 1),
                linear.first_match(k, first + 1),
                "{set} line {}: the match after rule {first}",
                i + 1
            );
        }
        eprintln!(
            "{set}: {} rules, {} headers agree, {:?}",
            rules.len(),
            trace.len(),
            forest.stats()
        );
    }
}

#[test]
fn linear_oracle_agrees_with_expected() {
    let dir = data_dir();
    for set in sets() {
        let rules = read_filters(&dir.join(format!("{set}.filters"))).unwrap();
        let trace = read_trace(&dir.join(format!("{set}.trace"))).unwrap();
        let expected = read_expected(&dir.join(format!("{set}.expected"))).unwrap();
        let oracle = Linear::build(&rules);
        // Every header of the 1k sets; a deterministic tenth of the larger ones.
        let step = if rules.len() > 2000 { 10 } else { 1 };
        for i in (0..trace.len()).step_by(step) {
            assert_eq!(
                as_index(oracle.first_match(&trace[i], 0)),
                expected[i],
                "{set} line {}",
                i + 1
            );
        }
    }
}
