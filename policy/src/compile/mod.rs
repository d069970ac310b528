//! The compiler: a pure function from a [`Snapshot`] and the gateway's own [`GatewayContext`] to
//! an ordered [`RuleSet`] (DESIGN §6). Layers, in order:
//!
//! 0. failsafe rules from the config, which no policy can override;
//! 1. gateway policies, by `priority` then name, each rule in its written order;
//! 2. the Kubernetes layer (NetworkPolicy, Services; not compiled yet);
//! 3. the per-direction default.

mod calico;
mod kubernetes;

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};

use crate::gateway_policy::{GatewayPolicy, PolicyRule, RuleAction};
use crate::rule::{
    Action, DenyReason, Direction, Layer, Match, Origin, Rule, RuleId, RuleSet, RuleSetError,
    Verdict,
};
use crate::snapshot::Snapshot;

/// What the gateway itself contributes: config, not policy objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayContext {
    /// Verdict for ext→int traffic nothing decided.
    pub default_ingress: Verdict,
    /// Verdict for int→ext traffic nothing decided. With no connection tracker yet, `Allow` here is
    /// the stateless reply rule that lets return traffic of admitted connections out.
    pub default_egress: Verdict,
    /// Validated failsafe rules, with their position in the config list.
    pub failsafe: Vec<(usize, PolicyRule)>,
    /// Pod IPs are reachable through the gateway (routed pod networks): compile rules for them.
    pub pods_routable: bool,
    /// Drop traffic to Service frontends that have no endpoint at all (`no_endpoints`).
    pub drop_no_endpoints: bool,
    /// How much classifier work one object, and the whole table, may cost.
    pub budget: Budget,
    /// Who enforces Kubernetes NetworkPolicies: Calico (as its order-1000 default-tier
    /// policies) or plain Kubernetes semantics (their own layer).
    pub policy_engine: PolicyEngine,
}

/// Which semantics Kubernetes NetworkPolicies get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyEngine {
    /// Calico's when the cluster runs Calico (the Kubernetes source finds Calico's API group,
    /// or the policy files hold Calico objects); Kubernetes' otherwise.
    #[default]
    Auto,
    Calico,
    Kubernetes,
}

/// Compile budgets, in classifier atoms: a rule lowers to (source prefixes x destination
/// prefixes) per address family, after its exceptions are cut out. One object over
/// `atoms_per_object` is rejected and reported like any bad object while the rest applies; a table
/// over `atoms_per_table` is not published (the last good one stays). Together they bound the
/// table's build time and memory (the README gives the build time at the limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    pub atoms_per_object: u64,
    pub atoms_per_table: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            atoms_per_object: 100_000,
            atoms_per_table: 1_000_000,
        }
    }
}

impl Default for GatewayContext {
    fn default() -> Self {
        GatewayContext {
            default_ingress: Verdict::Deny(DenyReason::Default),
            default_egress: Verdict::Allow,
            failsafe: Vec::new(),
            pods_routable: false,
            drop_no_endpoints: true,
            budget: Budget::default(),
            policy_engine: PolicyEngine::Auto,
        }
    }
}

/// Why a snapshot does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("`{name}` is defined twice: in {first} and in {second}")]
    DuplicatePolicy {
        name: String,
        first: String,
        second: String,
    },
    #[error("the compiled rules are inconsistent: {0}")]
    RuleSet(#[from] RuleSetError),
    #[error("the table would hold more than {max} classifier atoms (its objects' source x destination prefixes); the largest: {largest}. Raise `limits.atoms_per_table` or split the address lists")]
    TooLarge { max: u64, largest: String },
    #[error("{object} lowers to more than {max} classifier atoms (limits.atoms_per_object): the gateway config itself must fit")]
    ConfigTooLarge { object: String, max: u64 },
}

/// A compiled rule set and what the operator should know about it.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub rules: RuleSet,
    pub warnings: Vec<String>,
    /// Objects left out of the table, each with where it came from and why.
    pub rejected: Vec<Rejected>,
}

/// An object the compiler left out (over its budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `Kind/[namespace/]name`.
    pub object: String,
    /// Where it was read (a file, or the API).
    pub source: String,
    pub message: String,
}

fn action_of(a: RuleAction, audit: bool) -> Action {
    let decide = |v| {
        if audit {
            Action::Audit(v)
        } else {
            Action::Decide(v)
        }
    };
    match a {
        RuleAction::Allow => decide(Verdict::Allow),
        RuleAction::Deny => decide(Verdict::Deny(DenyReason::Policy)),
        // An audit policy changes no verdict, so its Pass cannot skip anything either.
        RuleAction::Pass if audit => Action::Log,
        // On to the next segment of the gateway layer: Calico's tiers, then the next layer.
        RuleAction::Pass => Action::NextTier,
        RuleAction::Log => Action::Log,
    }
}

/// What one GatewayPolicy compiled to, kept for the next compile.
#[derive(Debug)]
struct Compiled1 {
    policy: GatewayPolicy,
    source: String,
    rules: Vec<Rule>,
    warnings: Vec<String>,
    /// The compile that last used it: entries no compile used are dropped.
    epoch: u64,
}

/// Per-object results of earlier compiles, so that a recompile redoes only the objects an event
/// changed (a reloader keeps one across compiles). A GatewayPolicy's rules depend on nothing but
/// the policy, where it was read and the budget, so an unchanged policy's rules are reused as
/// they were; everything after (ordering, de-duplication, budgets, validation) runs on the whole
/// rule list every time, so the result is exactly what [`compile`] gives.
#[derive(Debug, Default)]
pub struct Memo {
    budget: Option<Budget>,
    gateway: HashMap<String, Compiled1>,
    epoch: u64,
    /// GatewayPolicies compiled afresh and reused by the last compile (what a test or a profile
    /// asks of the memo).
    pub last_compiled: usize,
    pub last_reused: usize,
}

fn empty_warning(m: &Match, budget: Budget, what: &dyn std::fmt::Display) -> Option<String> {
    (m.atoms(budget.atoms_per_object) == Some(0)).then(|| {
        format!(
            "{what}: matches no packet (its source and destination share no address family, or its exceptions cover everything)"
        )
    })
}

/// One GatewayPolicy's rules, in its written order, with the warnings about them.
fn gateway_rules(
    p: &crate::snapshot::Located<GatewayPolicy>,
    budget: Budget,
    rules: &mut Vec<Rule>,
    warnings: &mut Vec<String>,
) {
    let object = format!("GatewayPolicy/{}", p.object.name);
    for (dir, pos, r) in &p.object.rules {
        warnings.extend(empty_warning(
            &r.matcher,
            budget,
            &format_args!("{object} {dir}[{pos}]"),
        ));
        let why = r.description.clone().unwrap_or_else(|| {
            format!(
                "{}{} rule {pos} of {object} (priority {})",
                if p.object.audit { "audit-mode " } else { "" },
                dir,
                p.object.priority
            )
        });
        rules.push(Rule::new(
            r.matcher.clone(),
            action_of(r.action, p.object.audit),
            r.log,
            Origin {
                layer: Layer::Gateway,
                object: object.clone(),
                index: Some(*pos),
                source: p.source.clone(),
                why,
            },
        ));
    }
}

/// Compiles a snapshot. Pure: no I/O, no clock.
pub fn compile(snap: &Snapshot, ctx: &GatewayContext) -> Result<Compiled, CompileError> {
    compile_with(snap, ctx, &mut Memo::default())
}

/// [`compile`], reusing what `memo` kept of unchanged objects and keeping this compile's for
/// the next. The result is the same as [`compile`]'s for any memo.
pub fn compile_with(
    snap: &Snapshot,
    ctx: &GatewayContext,
    memo: &mut Memo,
) -> Result<Compiled, CompileError> {
    // Sized for the gateway layer up front: growing a list of 10k rules copied it a dozen times.
    let mut rules = Vec::with_capacity(
        ctx.failsafe.len()
            + 2
            + snap
                .gateway_policies
                .iter()
                .map(|p| p.object.rules.len())
                .sum::<usize>(),
    );
    let mut warnings = Vec::new();
    let budget = ctx.budget;
    if memo.budget != Some(budget) {
        memo.gateway.clear();
        memo.budget = Some(budget);
    }
    memo.epoch += 1;
    memo.last_compiled = 0;
    memo.last_reused = 0;

    for (i, r) in &ctx.failsafe {
        let what = format!("failsafe[{i}]");
        warnings.extend(empty_warning(&r.matcher, budget, &what));
        rules.push(Rule::new(
            r.matcher.clone(),
            action_of(r.action, false),
            r.log,
            Origin {
                layer: Layer::Failsafe,
                object: "config/failsafe".into(),
                index: Some(*i),
                source: "gateway config".into(),
                why: r
                    .description
                    .clone()
                    .unwrap_or_else(|| "failsafe rule from the gateway config".into()),
            },
        ));
    }

    let mut seen: HashMap<&str, &str> = HashMap::new();
    for p in &snap.gateway_policies {
        if let Some(first) = seen.insert(&p.object.name, &p.source) {
            return Err(CompileError::DuplicatePolicy {
                name: p.object.name.clone(),
                first: first.to_string(),
                second: p.source.clone(),
            });
        }
    }
    // The gateway layer, in segments (tiers): the GatewayPolicies (the operator's own edge
    // policy, by priority then name), then Calico's untracked, preDNAT and normal tiers. A Pass
    // goes on to the next segment: a GatewayPolicy's to Calico's tiers, a Calico policy's to its
    // next tier; neither skips the other's policies.
    let mut gateway: Vec<&crate::snapshot::Located<GatewayPolicy>> =
        snap.gateway_policies.iter().collect();
    gateway.sort_by(|a, b| {
        a.object
            .priority
            .cmp(&b.object.priority)
            .then(a.object.name.cmp(&b.object.name))
    });
    for p in gateway {
        match memo.gateway.get_mut(&p.object.name) {
            Some(m) if m.source == p.source && m.policy == p.object => {
                rules.extend_from_slice(&m.rules);
                warnings.extend_from_slice(&m.warnings);
                m.epoch = memo.epoch;
                memo.last_reused += 1;
            }
            _ => {
                let (r0, w0) = (rules.len(), warnings.len());
                gateway_rules(p, budget, &mut rules, &mut warnings);
                memo.gateway.insert(
                    p.object.name.clone(),
                    Compiled1 {
                        policy: p.object.clone(),
                        source: p.source.clone(),
                        rules: rules[r0..].to_vec(),
                        warnings: warnings[w0..].to_vec(),
                        epoch: memo.epoch,
                    },
                );
                memo.last_compiled += 1;
            }
        }
    }
    let calico_engine = match ctx.policy_engine {
        PolicyEngine::Calico => true,
        PolicyEngine::Kubernetes => false,
        PolicyEngine::Auto => snap.calico_api || snap.has_calico_objects(),
    };
    let converted: Vec<crate::snapshot::Located<crate::k8s::CalicoPolicy>> = if calico_engine {
        snap.network_policies
            .iter()
            .map(|p| {
                crate::snapshot::Located::new(p.source.clone(), calico::from_kubernetes(&p.object))
            })
            .collect()
    } else {
        Vec::new()
    };
    let calico_policies: Vec<&crate::snapshot::Located<crate::k8s::CalicoPolicy>> =
        snap.calico_policies.iter().chain(&converted).collect();
    calico::duplicates(snap, &calico_policies)?;
    let mut notes = BTreeSet::new();
    let model = calico::Model::new(snap);
    let tiers = calico::tiers(snap, &calico_policies, &mut notes);
    let mut segment = 1u32;
    for phase in [
        calico::Phase::Untracked,
        calico::Phase::PreDnat,
        calico::Phase::Normal,
    ] {
        for (tier, _) in &tiers {
            let mut items: Vec<_> = calico_policies
                .iter()
                .filter(|p| p.object.tier == tier.name && calico::phase(&p.object) == phase)
                .map(|p| (calico::policy_key(&p.object), *p))
                .collect();
            if items.is_empty() {
                continue;
            }
            items.sort_by(|(a, _), (b, _)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut covered = [Vec::new(), Vec::new()];
            for (_, c) in items {
                let [i, e] = calico::compile(&model, c, segment, &mut rules, &mut notes);
                covered[0].extend(i);
                covered[1].extend(e);
            }
            if phase == calico::Phase::Normal {
                for c in &mut covered {
                    c.sort_unstable();
                    c.dedup();
                }
                calico::end_of_tier(&model, tier, segment, covered, &mut rules);
            }
            segment += 1;
        }
    }
    calico::snat_warnings(&model, snap, &calico_policies, &mut notes);
    let epoch = memo.epoch;
    memo.gateway.retain(|_, m| m.epoch == epoch);
    kubernetes::compile(snap, ctx, !calico_engine, &mut rules, &mut notes);
    warnings.extend(notes);

    for (dir, verdict) in [
        (Direction::Ingress, ctx.default_ingress),
        (Direction::Egress, ctx.default_egress),
    ] {
        rules.push(Rule::new(
            Match::any(dir),
            Action::Decide(verdict),
            false,
            Origin {
                layer: Layer::Default,
                object: format!("default/{dir}"),
                index: None,
                source: "gateway config".into(),
                why: format!("no policy decided this {dir} flow; the configured default applies"),
            },
        ));
    }
    let mut rules = dedup(rules);
    let rejected = enforce_budget(&mut rules, budget)?;
    Ok(Compiled {
        rules: RuleSet::new(rules)?,
        warnings,
        rejected,
    })
}

/// Drops a rule with the same origin and match as an earlier one (a port listed twice, a VMI and
/// its virt-launcher pod sharing an address, a LoadBalancer IP also listed in externalIPs): it
/// can never decide anything the first did not. Ids are hashes of origin and match, so an equal
/// id is only a candidate: a different rule whose id collides (by chance, or by an object written
/// to collide) is kept under the next free id, never dropped.
fn dedup(mut rules: Vec<Rule>) -> Vec<Rule> {
    // In place: the kept rules move to the front, so no second list of every rule is made.
    let mut seen: HashMap<RuleId, usize> = HashMap::with_capacity(rules.len());
    let mut kept = 0;
    for i in 0..rules.len() {
        if let Some(&j) = seen.get(&rules[i].id) {
            let (k, r) = (&rules[j], &rules[i]);
            let same = k.origin.layer == r.origin.layer
                && k.origin.object == r.origin.object
                && k.origin.index == r.origin.index
                && k.matcher == r.matcher;
            if same {
                continue;
            }
            let r = &mut rules[i];
            while seen.contains_key(&r.id) {
                r.id = RuleId(r.id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) ^ 1);
            }
        }
        seen.insert(rules[i].id, kept);
        rules.swap(kept, i);
        kept += 1;
    }
    rules.truncate(kept);
    rules
}

/// Leaves out every object whose rules lower to more atoms than the budget allows, and refuses a
/// table over the total.
fn enforce_budget(rules: &mut Vec<Rule>, budget: Budget) -> Result<Vec<Rejected>, CompileError> {
    // Per object: its atoms (saturating at "over"), its layer, where it came from.
    let mut cost: HashMap<&str, (u64, Layer, &str)> = HashMap::new();
    for r in rules.iter() {
        let atoms = r.matcher.atoms(budget.atoms_per_object).unwrap_or(u64::MAX);
        let e = cost.entry(r.origin.object.as_str()).or_insert((
            0,
            r.origin.layer,
            r.origin.source.as_str(),
        ));
        e.0 = e.0.saturating_add(atoms);
    }
    let mut rejected = Vec::new();
    let mut over = BTreeSet::new();
    for (object, (atoms, layer, source)) in &cost {
        if *atoms <= budget.atoms_per_object {
            continue;
        }
        if matches!(layer, Layer::Failsafe | Layer::Default) {
            return Err(CompileError::ConfigTooLarge {
                object: object.to_string(),
                max: budget.atoms_per_object,
            });
        }
        over.insert(object.to_string());
        rejected.push(Rejected {
            object: object.to_string(),
            source: source.to_string(),
            message: format!(
                "lowers to more than {} classifier atoms (limits.atoms_per_object: each rule costs its source prefixes x destination prefixes, after its exceptions split them); left out of the table",
                budget.atoms_per_object
            ),
        });
    }
    rejected.sort_by(|a, b| a.object.cmp(&b.object));
    let total: u64 = cost
        .iter()
        .filter(|(o, _)| !over.contains(**o))
        .map(|(_, c)| c.0)
        .fold(0, u64::saturating_add);
    if total > budget.atoms_per_table {
        let largest = cost
            .iter()
            .filter(|(o, _)| !over.contains(**o))
            .max_by_key(|(_, c)| c.0)
            .map(|(o, c)| format!("{o} ({} atoms)", c.0))
            .unwrap_or_default();
        return Err(CompileError::TooLarge {
            max: budget.atoms_per_table,
            largest,
        });
    }
    drop(cost);
    rules.retain(|r| !over.contains(&r.origin.object));
    Ok(rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway_policy::GatewayPolicy;
    use crate::snapshot::Located;

    fn policy(name: &str, priority: i32, audit: bool, ingress: &str) -> Located<GatewayPolicy> {
        let y = format!(
            "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {{name: {name}}}\nspec: {{priority: {priority}, audit: {audit}, ingress: {ingress}}}\n"
        );
        Located {
            source: format!("{name}.yaml#0"),
            object: GatewayPolicy::from_yaml(serde_norway::from_str(&y).unwrap()).unwrap(),
        }
    }

    #[test]
    fn dedup_drops_true_duplicates_and_keeps_colliding_rules() {
        let rule = |object: &str, index: usize, dir: Direction| {
            Rule::new(
                Match::any(dir),
                Action::Decide(Verdict::Deny(DenyReason::Policy)),
                false,
                Origin {
                    layer: Layer::Gateway,
                    object: object.into(),
                    index: Some(index),
                    source: "t".into(),
                    why: "t".into(),
                },
            )
        };
        let a = rule("GatewayPolicy/a", 0, Direction::Ingress);
        // The same rule again (a port listed twice): dropped.
        let twin = rule("GatewayPolicy/a", 0, Direction::Ingress);
        // A different rule made to collide with `a`'s id: kept, under another id.
        let mut other = rule("GatewayPolicy/b", 3, Direction::Egress);
        other.id = a.id;
        // And one that collides with the id `other` will move to, too.
        let mut third = rule("GatewayPolicy/c", 1, Direction::Egress);
        third.id = a.id;
        let kept = dedup(vec![a.clone(), twin, other, third]);
        assert_eq!(kept.len(), 3, "{kept:#?}");
        assert_eq!(kept[0], a);
        assert_eq!(kept[1].origin.object, "GatewayPolicy/b");
        assert_eq!(kept[2].origin.object, "GatewayPolicy/c");
        let ids: BTreeSet<RuleId> = kept.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 3, "every kept rule has its own id");
        // The result is a valid rule set (ids unique) once the defaults close it.
        let mut rules = kept;
        for dir in [Direction::Ingress, Direction::Egress] {
            rules.push(Rule::new(
                Match::any(dir),
                Action::Decide(Verdict::Allow),
                false,
                Origin {
                    layer: Layer::Default,
                    object: format!("default/{dir}"),
                    index: None,
                    source: "t".into(),
                    why: "t".into(),
                },
            ));
        }
        assert!(RuleSet::new(rules).is_ok());
    }

    #[test]
    fn layers_priorities_and_defaults() {
        let snap = Snapshot {
            gateway_policies: vec![
                policy("late", 200, false, "[{action: Allow}]"),
                policy(
                    "early",
                    100,
                    false,
                    "[{action: Deny, source: {nets: [192.0.2.0/24]}}, {action: Pass}]",
                ),
                policy("watch", 150, true, "[{action: Deny}]"),
            ],
            ..Snapshot::default()
        };
        let c = compile(&snap, &GatewayContext::default()).unwrap();
        let objects: Vec<&str> = c
            .rules
            .rules()
            .iter()
            .map(|r| r.origin.object.as_str())
            .collect();
        assert_eq!(
            objects,
            [
                "GatewayPolicy/early",
                "GatewayPolicy/early",
                "GatewayPolicy/watch",
                "GatewayPolicy/late",
                "default/ingress",
                "default/egress"
            ]
        );
        let actions: Vec<Action> = c.rules.rules().iter().map(|r| r.action).collect();
        assert_eq!(
            actions[0],
            Action::Decide(Verdict::Deny(DenyReason::Policy))
        );
        assert_eq!(actions[1], Action::NextTier);
        assert_eq!(actions[2], Action::Audit(Verdict::Deny(DenyReason::Policy)));
        assert_eq!(
            actions[4],
            Action::Decide(Verdict::Deny(DenyReason::Default))
        );
        assert_eq!(actions[5], Action::Decide(Verdict::Allow));
        // Pass continues after the gateway layer, i.e. at the defaults.
        assert_eq!(c.rules.next_layer_start(Layer::Gateway), 4);
    }

    #[test]
    fn a_memo_reuses_unchanged_policies_and_changes_no_result() {
        let ctx = GatewayContext::default();
        let mut memo = Memo::default();
        let same = |snap: &Snapshot, ctx: &GatewayContext, memo: &mut Memo| {
            let fresh = compile(snap, ctx).unwrap();
            let kept = compile_with(snap, ctx, memo).unwrap();
            assert_eq!(fresh.rules.rules(), kept.rules.rules());
            assert_eq!(fresh.warnings, kept.warnings);
            assert_eq!(fresh.rejected, kept.rejected);
            (memo.last_compiled, memo.last_reused)
        };
        let mut snap = Snapshot {
            gateway_policies: vec![
                policy(
                    "a",
                    1,
                    false,
                    "[{action: Allow, source: {nets: [10.0.0.0/8]}}]",
                ),
                policy(
                    "b",
                    2,
                    false,
                    "[{action: Deny, source: {nets: [10.0.0.0/8], notNets: [10.0.0.0/8]}}]",
                ),
                policy("c", 3, false, "[{action: Deny}]"),
            ],
            ..Snapshot::default()
        };
        assert_eq!(same(&snap, &ctx, &mut memo), (3, 0));
        assert_eq!(same(&snap, &ctx, &mut memo), (0, 3));
        // An edit recompiles that policy alone; so does a new priority (its `why` names it).
        snap.gateway_policies[0] = policy(
            "a",
            1,
            false,
            "[{action: Deny, source: {nets: [10.0.0.0/8]}}]",
        );
        assert_eq!(same(&snap, &ctx, &mut memo), (1, 2));
        snap.gateway_policies[2] = policy("c", 0, false, "[{action: Deny}]");
        assert_eq!(same(&snap, &ctx, &mut memo), (1, 2));
        // The same policy read from elsewhere is recompiled (its rules name their source).
        snap.gateway_policies[1].source = "moved.yaml#0".into();
        assert_eq!(same(&snap, &ctx, &mut memo), (1, 2));
        // A deleted policy leaves the memo; it comes back compiled afresh.
        let c = snap.gateway_policies.pop().unwrap();
        assert_eq!(same(&snap, &ctx, &mut memo), (0, 2));
        assert_eq!(memo.gateway.len(), 2);
        snap.gateway_policies.push(c);
        assert_eq!(same(&snap, &ctx, &mut memo), (1, 2));
        // Another budget changes the warnings: everything is recompiled.
        let tight = GatewayContext {
            budget: Budget {
                atoms_per_object: 10,
                atoms_per_table: 1000,
            },
            ..GatewayContext::default()
        };
        assert_eq!(same(&snap, &tight, &mut memo), (3, 0));
    }

    #[test]
    fn ids_are_stable_and_duplicates_rejected() {
        let snap = Snapshot {
            gateway_policies: vec![policy("a", 1, false, "[{action: Allow}]")],
            ..Snapshot::default()
        };
        let a = compile(&snap, &GatewayContext::default()).unwrap();
        let b = compile(&snap, &GatewayContext::default()).unwrap();
        let ids = |c: &Compiled| c.rules.rules().iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        let dup = Snapshot {
            gateway_policies: vec![policy("a", 1, false, "[]"), policy("a", 2, false, "[]")],
            ..Snapshot::default()
        };
        assert!(matches!(
            compile(&dup, &GatewayContext::default()),
            Err(CompileError::DuplicatePolicy { .. })
        ));
    }

    #[test]
    fn warns_about_rules_that_match_nothing() {
        let snap = Snapshot {
            gateway_policies: vec![policy(
                "mixed",
                1,
                false,
                "[{action: Allow, source: {nets: [10.0.0.0/8]}, destination: {nets: ['2001:db8::/32']}}]",
            )],
            ..Snapshot::default()
        };
        let c = compile(&snap, &GatewayContext::default()).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("GatewayPolicy/mixed ingress[0]"));
    }

    /// `n` long IPv6 exceptions inside one /16: each splits the set into up to 128 more pieces.
    fn exploding(name: &str, n: usize) -> Located<GatewayPolicy> {
        let holes: Vec<String> = (0..n)
            .map(|i| format!("'2001:db8:{:x}:{:x}::1/128'", i * 7 + 1, i * 13 + 3))
            .collect();
        let dsts: Vec<String> = (0..n)
            .map(|i| format!("'2001:db9:{:x}::1/128'", i + 1))
            .collect();
        policy(
            name,
            10,
            false,
            &format!(
                "[{{action: Allow, source: {{nets: ['2001:db8::/32'], notNets: [{}]}}, destination: {{nets: [{}]}}}}]",
                holes.join(", "),
                dsts.join(", ")
            ),
        )
    }

    #[test]
    fn an_object_over_the_atom_budget_is_left_out_and_the_rest_applies() {
        let snap = Snapshot {
            gateway_policies: vec![
                exploding("boom", 40),
                policy(
                    "fine",
                    20,
                    false,
                    "[{action: Deny, source: {nets: [192.0.2.0/24]}}]",
                ),
            ],
            ..Snapshot::default()
        };
        let started = std::time::Instant::now();
        let c = compile(&snap, &GatewayContext::default()).unwrap();
        // 40 holes x up to 96 pieces each, times 40 destinations: ~150,000 atoms, over 100,000.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(c.rejected.len(), 1, "{:?}", c.rejected);
        assert_eq!(c.rejected[0].object, "GatewayPolicy/boom");
        assert!(c.rejected[0].message.contains("100000 classifier atoms"));
        let objects: Vec<&str> = c
            .rules
            .rules()
            .iter()
            .map(|r| r.origin.object.as_str())
            .collect();
        assert!(objects.contains(&"GatewayPolicy/fine"));
        assert!(!objects.contains(&"GatewayPolicy/boom"));

        // Within a raised budget it compiles; a table over its own budget is refused whole.
        let roomy = GatewayContext {
            budget: Budget {
                atoms_per_object: 1_000_000,
                atoms_per_table: 1_000_000,
            },
            ..GatewayContext::default()
        };
        assert!(compile(&snap, &roomy).unwrap().rejected.is_empty());
        let tight = GatewayContext {
            budget: Budget {
                atoms_per_object: 1_000_000,
                atoms_per_table: 50_000,
            },
            ..GatewayContext::default()
        };
        match compile(&snap, &tight) {
            Err(CompileError::TooLarge {
                max: 50_000,
                largest,
            }) => {
                assert!(largest.starts_with("GatewayPolicy/boom"), "{largest}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn counting_atoms_gives_up_early_on_a_pathological_rule() {
        // 2,000 long exceptions would lower to ~250,000 prefixes per side before any cross
        // product; the count stops at the budget instead of building them.
        let snap = Snapshot {
            gateway_policies: vec![exploding("huge", 2000)],
            ..Snapshot::default()
        };
        let started = std::time::Instant::now();
        let c = compile(&snap, &GatewayContext::default()).unwrap();
        assert_eq!(c.rejected.len(), 1);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
