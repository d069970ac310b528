//! The compiled table: the contract between control and the gateway.
//!
//! A [`Table`] is immutable once built. It holds the rule set (for origins), the datapath
//! classifier, a compact per-rule action array for the hot loop, and per-worker rule-hit counters.
//! Each worker writes only its own counter row, with plain relaxed load+store (no atomic RMW, no
//! sharing), and the control thread sums rows whenever it likes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::classify::{Classifier, Forest, ForestStats, Linear, NO_MATCH};
use crate::key::FlowKey;
use crate::rule::{Action, DenyReason, Layer, Match, Rule, RuleSet, Verdict};

/// The table's answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Index of the deciding rule.
    pub rule: u32,
    /// Some rule on the way asked for the flow to be logged.
    pub log: bool,
    /// The first rule that asked for logging (an audit or Log rule, or the deciding rule), or
    /// `NO_MATCH`.
    pub log_rule: u32,
}

impl Default for Decision {
    fn default() -> Self {
        Decision {
            verdict: Verdict::Deny(DenyReason::Default),
            rule: NO_MATCH,
            log: false,
            log_rule: NO_MATCH,
        }
    }
}

/// Keys looked up together by [`Table::decide_batch`]: the classifier's burst walk groups this
/// many.
const BURST: usize = 64;

/// What the hot loop needs of a rule, packed.
#[derive(Debug, Clone, Copy)]
struct Step {
    action: Action,
    /// Where evaluation continues after this rule when it is not decisive.
    next: u32,
    log: bool,
}

/// Eight counters on one cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Line([AtomicU64; 8]);

/// One worker's rule-hit counters. Rows are separate allocations of whole cache lines, so two
/// workers never write the same line.
#[derive(Debug)]
struct HitRow(Box<[Line]>);

impl HitRow {
    fn new(rules: usize) -> HitRow {
        HitRow((0..rules.div_ceil(8)).map(|_| Line::default()).collect())
    }

    #[inline(always)]
    fn get(&self, i: usize) -> &AtomicU64 {
        &self.0[i / 8].0[i % 8]
    }
}

/// One step of an explanation: a rule that matched and what it did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExplainStep {
    pub index: u32,
    pub rule: String,
    pub layer: Layer,
    pub action: Action,
    pub origin: crate::rule::Origin,
}

/// Everything `explain` says about a key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    /// Every rule that matched on the way, the deciding one last.
    pub steps: Vec<ExplainStep>,
}

/// An immutable compiled table.
#[derive(Debug)]
pub struct Table {
    generation: u64,
    rules: RuleSet,
    /// Shared with the previous table when no rule's match changed.
    classifier: Arc<Forest>,
    steps: Box<[Step]>,
    hits: Box<[HitRow]>,
    build_time: Duration,
    classifier_reused: bool,
}

impl Table {
    /// Builds the classifier for `rules` with one hit-counter row per worker (plus one spare row
    /// for control-side lookups such as `explain`).
    pub fn build(rules: RuleSet, generation: u64, workers: usize) -> Table {
        Self::build_after(rules, generation, workers, None)
    }

    /// [`Table::build`], sharing `prev`'s classifier when every rule's match is the one at the
    /// same position in `prev`: the classifier depends on the matches and their order only, so
    /// a change of actions, logging or descriptions (or an EndpointSlice update that changed no
    /// match) swaps in a new table without rebuilding it.
    pub fn build_after(
        rules: RuleSet,
        generation: u64,
        workers: usize,
        prev: Option<&Table>,
    ) -> Table {
        let started = Instant::now();
        let same = |p: &&Table| {
            p.rules.len() == rules.len()
                && p.rules()
                    .iter()
                    .zip(rules.rules())
                    .all(|(a, b)| a.matcher == b.matcher)
        };
        let (classifier, classifier_reused) = match prev.filter(same) {
            Some(p) => (Arc::clone(&p.classifier), true),
            None => (
                Arc::new(Forest::build_from(rules.rules().iter().map(|r| &r.matcher))),
                false,
            ),
        };
        let steps = rules
            .rules()
            .iter()
            .zip(rules.continue_at())
            .map(|(r, next)| Step {
                action: r.action,
                next,
                // Audit rules log what they would have done (DESIGN §6).
                log: r.log || matches!(r.action, Action::Log | Action::Audit(_)),
            })
            .collect();
        let hits = (0..workers + 1).map(|_| HitRow::new(rules.len())).collect();
        Table {
            generation,
            rules,
            classifier,
            steps,
            hits,
            build_time: started.elapsed(),
            classifier_reused,
        }
    }

    /// Whether this table shares its predecessor's classifier (no match changed).
    pub fn classifier_reused(&self) -> bool {
        self.classifier_reused
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn rules(&self) -> &[Rule] {
        self.rules.rules()
    }

    /// The rule with id `id` (ids are stable across tables: a rule decided by an older table is
    /// found in a newer one while it is unchanged). A scan: for the rate-limited flow log and the
    /// monitor, never the datapath.
    pub fn rule_by_id(&self, id: crate::rule::RuleId) -> Option<&Rule> {
        self.rules().iter().find(|r| r.id == id)
    }

    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Classifier plus actions plus counters, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.classifier.memory_bytes()
            + self.steps.len() * std::mem::size_of::<Step>()
            + self.hits.len() * self.rules.len() * std::mem::size_of::<AtomicU64>()
    }

    pub fn classifier_stats(&self) -> ForestStats {
        self.classifier.stats()
    }

    /// Number of workers this table has counter rows for.
    pub fn workers(&self) -> usize {
        self.hits.len() - 1
    }

    /// Evaluates one key, calling `on_hit` for every rule that matched (non-decisive ones
    /// included). Never fails: a key no rule matches (impossible for a valid [`RuleSet`]) is
    /// denied, so the table fails closed.
    #[inline(always)]
    fn evaluate(&self, key: &FlowKey, on_hit: impl FnMut(u32)) -> Decision {
        self.evaluate_from(key, self.classifier.first_match(key, 0), on_hit)
    }

    /// [`Table::evaluate`] with the key's first match already found (by a burst lookup).
    #[inline(always)]
    fn evaluate_from(&self, key: &FlowKey, first: u32, mut on_hit: impl FnMut(u32)) -> Decision {
        let mut i = first;
        let mut log_rule = NO_MATCH;
        loop {
            let Some(step) = self.steps.get(i as usize) else {
                return Decision {
                    verdict: Verdict::Deny(DenyReason::Default),
                    rule: NO_MATCH,
                    log: log_rule != NO_MATCH,
                    log_rule,
                };
            };
            on_hit(i);
            if step.log && log_rule == NO_MATCH {
                log_rule = i;
            }
            match step.action {
                Action::Decide(verdict) => {
                    return Decision {
                        verdict,
                        rule: i,
                        log: log_rule != NO_MATCH,
                        log_rule,
                    }
                }
                Action::Pass | Action::NextTier | Action::Skip | Action::Log | Action::Audit(_) => {
                    i = self.classifier.first_match(key, step.next)
                }
            }
        }
    }

    /// Decides a burst for `worker`, counting rule hits in that worker's row. `worker` must be
    /// below the count the table was built for; others count in the spare row.
    #[inline]
    pub fn decide_batch(&self, worker: usize, keys: &[FlowKey], out: &mut [Decision]) {
        let row = &self.hits[worker.min(self.hits.len() - 1)];
        // The first lookup of the whole burst goes through the classifier's burst walk; only
        // keys that hit a rule which continues (Pass, Log, audit) look up again, one by one.
        let mut first = [NO_MATCH; BURST];
        for (keys, out) in keys.chunks(BURST).zip(out.chunks_mut(BURST)) {
            let first = &mut first[..keys.len()];
            self.classifier.classify_batch(keys, first);
            for ((k, o), &f) in keys.iter().zip(out.iter_mut()).zip(first.iter()) {
                *o = self.evaluate_from(k, f, |i| {
                    // Single writer per row: a relaxed load+store is enough and avoids a locked RMW.
                    let c = row.get(i as usize);
                    c.store(c.load(Relaxed) + 1, Relaxed);
                });
            }
        }
    }

    /// Decides one key without counting.
    pub fn decide(&self, key: &FlowKey) -> Decision {
        self.evaluate(key, |_| {})
    }

    /// Explains a key: every matching rule on the way and the verdict. Cross-checked against the
    /// linear reference, so an explanation never disagrees with the semantics.
    pub fn explain(&self, key: &FlowKey) -> Explanation {
        let mut hits = Vec::new();
        let d = self.evaluate(key, |i| hits.push(i));
        let steps = hits
            .into_iter()
            .map(|i| {
                let r = &self.rules.rules()[i as usize];
                ExplainStep {
                    index: i,
                    rule: r.id.to_string(),
                    layer: r.origin.layer,
                    action: r.action,
                    origin: r.origin.clone(),
                }
            })
            .collect();
        Explanation {
            verdict: d.verdict,
            steps,
        }
    }

    /// The reference answer for a key (linear scan over the same rules), for tests and checks.
    pub fn reference_decision(&self, key: &FlowKey) -> Verdict {
        let matches: Vec<Match> = self.rules().iter().map(|r| r.matcher.clone()).collect();
        let linear = Linear::build(&matches);
        let mut from = 0;
        loop {
            let i = linear.first_match(key, from);
            match self.steps.get(i as usize) {
                None => return Verdict::Deny(DenyReason::Default),
                Some(Step {
                    action: Action::Decide(v),
                    ..
                }) => return *v,
                Some(s) => from = s.next,
            }
        }
    }

    /// Total hits per rule index, summed over workers.
    pub fn hit_counts(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.rules.len()];
        for row in self.hits.iter() {
            for (i, o) in out.iter_mut().enumerate() {
                *o += row.get(i).load(Relaxed);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, GatewayContext};
    use crate::gateway_policy::GatewayPolicy;
    use crate::rule::Direction;
    use crate::snapshot::{Located, Snapshot};

    fn table(spec: &str) -> Table {
        let y = format!("apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {{name: t}}\nspec: {spec}\n");
        let snap = Snapshot {
            gateway_policies: vec![Located {
                source: "t".into(),
                object: GatewayPolicy::from_yaml(serde_norway::from_str(&y).unwrap()).unwrap(),
            }],
            ..Snapshot::default()
        };
        Table::build(
            compile(&snap, &GatewayContext::default()).unwrap().rules,
            1,
            2,
        )
    }

    fn k(src: &str, dport: u16) -> FlowKey {
        FlowKey::new(
            Direction::Ingress,
            src.parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            6,
            40000,
            dport,
        )
    }

    #[test]
    fn pass_log_and_audit_continue() {
        let t = table(
            "{audit: false, ingress: [{action: Log, protocol: TCP, destination: {ports: [22]}}, {action: Pass, source: {nets: [198.51.100.0/24]}}, {action: Allow, protocol: TCP, destination: {ports: [22, 80]}}]}",
        );
        // Log then Allow.
        let e = t.explain(&k("192.0.2.1", 22));
        assert_eq!(e.verdict, Verdict::Allow);
        assert_eq!(e.steps.len(), 2);
        // Pass skips the Allow and lands on the ingress default.
        let e = t.explain(&k("198.51.100.9", 80));
        assert_eq!(e.verdict, Verdict::Deny(DenyReason::Default));
        assert_eq!(e.steps.last().unwrap().origin.object, "default/ingress");
        let mut out = [Decision::default(); 2];
        t.decide_batch(0, &[k("192.0.2.1", 22), k("192.0.2.1", 80)], &mut out);
        assert!(out[0].log && !out[1].log);
        // The Allow lowers to one rule per port: 22 at index 2, 80 at index 3.
        assert_eq!(t.hit_counts()[..4], [1, 0, 1, 1]);
        for key in [
            k("192.0.2.1", 22),
            k("198.51.100.9", 80),
            k("192.0.2.1", 443),
        ] {
            assert_eq!(t.decide(&key).verdict, t.reference_decision(&key));
        }
        // A burst longer than one classifier walk (64), with keys that continue past Log and
        // Pass rules: the same decisions as one key at a time.
        let keys: Vec<FlowKey> = (0..150u16)
            .map(|i| match i % 3 {
                0 => k("192.0.2.1", 22),
                1 => k(&format!("198.51.100.{}", i % 250), 80),
                _ => k(&format!("192.0.2.{}", i % 250), 443 + i),
            })
            .collect();
        let mut out = vec![Decision::default(); keys.len()];
        t.decide_batch(1, &keys, &mut out);
        for (key, d) in keys.iter().zip(&out) {
            assert_eq!(*d, t.decide(key), "{key}");
        }
    }

    #[test]
    fn a_table_shares_the_classifier_only_when_no_match_changed() {
        let rules = |spec: &str| {
            let t = table(spec);
            RuleSet::new(t.rules().to_vec()).unwrap()
        };
        let deny = "{ingress: [{action: Deny, source: {nets: [192.0.2.0/24]}}, {action: Allow, protocol: TCP}]}";
        let first = Table::build(rules(deny), 1, 1);
        assert!(!first.classifier_reused());
        // Only the actions changed: the classifier is shared, and the verdicts are the new ones.
        let flipped = Table::build_after(
            rules("{ingress: [{action: Allow, source: {nets: [192.0.2.0/24]}}, {action: Deny, protocol: TCP}]}"),
            2,
            1,
            Some(&first),
        );
        assert!(flipped.classifier_reused());
        assert!(Arc::ptr_eq(&first.classifier, &flipped.classifier));
        assert_eq!(flipped.decide(&k("192.0.2.1", 80)).verdict, Verdict::Allow);
        assert_eq!(
            flipped.decide(&k("198.51.100.1", 80)).verdict,
            Verdict::Deny(DenyReason::Policy)
        );
        // A changed match, or one rule more, rebuilds it.
        for spec in [
            "{ingress: [{action: Deny, source: {nets: [192.0.2.0/25]}}, {action: Allow, protocol: TCP}]}",
            "{ingress: [{action: Deny, source: {nets: [192.0.2.0/24]}}, {action: Allow, protocol: TCP}, {action: Allow, protocol: UDP}]}",
        ] {
            let t = Table::build_after(rules(spec), 2, 1, Some(&first));
            assert!(!t.classifier_reused(), "{spec}");
            for key in [k("192.0.2.1", 80), k("192.0.2.200", 80), k("198.51.100.1", 80)] {
                assert_eq!(t.decide(&key).verdict, t.reference_decision(&key), "{spec} {key}");
            }
        }
    }

    #[test]
    fn audit_policy_changes_no_verdict() {
        let t = table("{audit: true, ingress: [{action: Deny}]}");
        let e = t.explain(&k("192.0.2.1", 80));
        assert_eq!(e.steps.len(), 2, "the audit rule is counted");
        assert_eq!(e.verdict, Verdict::Deny(DenyReason::Default));
        let mut eg = k("192.0.2.1", 80);
        eg.dir = Direction::Egress;
        assert_eq!(t.decide(&eg).verdict, Verdict::Allow);
    }
}
