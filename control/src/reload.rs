//! The reload loop's state: the policy directory's last good snapshot, the Kubernetes API's last
//! synced snapshot (when watching), their merged compile, and the publisher. On any error the last
//! good table stays and the status says why.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::publish::{Publisher, RuleHits};
use crate::source::{load_dir, Fingerprint, SourceError};
use policy::compile::{compile, compile_with, CompileError, GatewayContext, Memo, Rejected};
use policy::rule::RuleSet;
use policy::snapshot::{ClusterObjects, Snapshot};

/// Why a policy load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{} error(s) in the policy directory:\n  {}", .0.len(), .0.iter().map(|e| e.line()).collect::<Vec<_>>().join("\n  "))]
    Source(Vec<SourceError>),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("{} object(s) over the compile budget:\n  {}", .0.len(), .0.join("\n  "))]
    OverBudget(Vec<String>),
}

impl LoadError {
    /// One line per problem, for status output.
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Source(errs) => errs.iter().map(|e| e.line()).collect(),
            LoadError::Compile(e) => vec![e.to_string()],
            LoadError::OverBudget(lines) => lines.clone(),
        }
    }
}

/// Loads and compiles a directory in one go (used by `check`, `explain` and the reloader).
pub fn load_and_compile(
    dir: &Path,
    ctx: &GatewayContext,
) -> Result<(Snapshot, RuleSet, Vec<String>), LoadError> {
    let snap = load_dir(dir).map_err(LoadError::Source)?;
    let compiled = compile(&snap, ctx)?;
    let (from_files, _) = split_rejected(&compiled.rejected);
    if !from_files.is_empty() {
        return Err(LoadError::OverBudget(from_files));
    }
    Ok((snap, compiled.rules, compiled.warnings))
}

/// Objects the compiler left out, as status lines: those of the policy directory (which is
/// all-or-nothing, like any error in it) and those of the API (skipped and reported, like an
/// object that does not parse, while the rest applies).
fn split_rejected(rejected: &[Rejected]) -> (Vec<String>, Vec<String>) {
    let line = |r: &Rejected| format!("{} ({}): {}", r.object, r.source, r.message);
    let (api, files): (Vec<&Rejected>, Vec<&Rejected>) =
        rejected.iter().partition(|r| r.source.starts_with("api:"));
    (
        files.into_iter().map(line).collect(),
        api.into_iter().map(line).collect(),
    )
}

/// Time from a policy event (a watch event received) to the swap of the table that contains it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SwapLatency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What the last reload did, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReloadStatus {
    pub policy_dir: String,
    /// `files`, plus `kubernetes` once the API's first complete snapshot is in the table.
    pub sources: Vec<String>,
    pub event_to_swap: SwapLatency,
    pub generation: u64,
    pub rules: usize,
    pub objects: Vec<(String, usize)>,
    pub build_ms: f64,
    pub compile_ms: f64,
    pub memory_bytes: usize,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Unix seconds of the last successful publish.
    pub last_publish_unix: u64,
    /// The errors of the last failed reload, cleared by the next good one.
    pub last_error: Vec<String>,
    pub warnings: Vec<String>,
    /// API objects left out of the table for exceeding the compile budget.
    #[serde(default)]
    pub rejected: Vec<String>,
}

/// Owns the publisher and every source's last good snapshot.
pub struct Reloader {
    dir: PathBuf,
    ctx: GatewayContext,
    publisher: Publisher,
    fingerprint: Fingerprint,
    files: Snapshot,
    kube: Option<Snapshot>,
    status: ReloadStatus,
    /// Event-to-swap latency in microseconds, and the exact sum of what it recorded.
    swap_latency: Histogram<u64>,
    swap_sum_us: u128,
    /// The objects behind the current table, for `explain`'s Kubernetes verdicts.
    objects: ClusterObjects,
    /// Why the policy directory does not load, until it does again. A table published for the
    /// API's sake in the meantime must not hide it.
    files_errors: Vec<String>,
    /// The warnings (and rejected objects) already logged: each is logged when it appears.
    logged: std::collections::BTreeSet<String>,
    /// What the last compiles made of each object: a change recompiles only what it touched.
    memo: Memo,
}

/// What changed in the warnings since they were last logged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WarningChanges {
    /// Warnings (and objects over the compile budget) that were not there before.
    pub new: Vec<String>,
    /// How many of the earlier ones are gone.
    pub resolved: usize,
}

/// Buckets (seconds) of the Prometheus event-to-swap histogram.
pub const SWAP_BUCKETS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Reloader {
    /// The first load must succeed: without a table there is nothing safe to run.
    pub fn new(dir: &Path, ctx: GatewayContext, workers: usize) -> Result<Reloader, LoadError> {
        let fingerprint = Fingerprint::of(dir);
        let started = Instant::now();
        let (snap, rules, warnings) = load_and_compile(dir, &ctx)?;
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let publisher = Publisher::new(rules, workers);
        let mut r = Reloader {
            dir: dir.to_path_buf(),
            ctx,
            publisher,
            fingerprint,
            files: Snapshot::default(),
            kube: None,
            status: ReloadStatus {
                policy_dir: dir.display().to_string(),
                sources: vec!["files".into()],
                ..ReloadStatus::default()
            },
            // 1 µs to 1 hour, 3 significant digits: valid constants.
            swap_latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| unreachable!()),
            objects: ClusterObjects::default(),
            files_errors: Vec::new(),
            swap_sum_us: 0,
            logged: Default::default(),
            memo: Memo::default(),
        };
        r.record_ok(&snap, warnings, compile_ms);
        r.objects = snap.cluster_objects();
        r.files = snap;
        Ok(r)
    }

    /// Compiles the merged sources and publishes; on error nothing changes but the status.
    fn recompile(&mut self, started: Instant) -> Result<u64, LoadError> {
        // The Kubernetes objects are moved in behind a copy of the files' (small) and moved
        // back after, instead of being copied whole for every compile.
        let mut snap = self.files.clone();
        let kube = self.kube.as_mut().map(|k| (k.calico_api, snap.append(k)));
        let result = self.compile_merged(&snap, started);
        if let (Some((calico_api, at)), Some(k)) = (kube, self.kube.as_mut()) {
            *k = snap.split_off(at);
            k.calico_api = calico_api;
        }
        result
    }

    fn compile_merged(&mut self, snap: &Snapshot, started: Instant) -> Result<u64, LoadError> {
        match compile_with(snap, &self.ctx, &mut self.memo) {
            Ok(compiled) => {
                let (from_files, from_api) = split_rejected(&compiled.rejected);
                if !from_files.is_empty() {
                    let e = LoadError::OverBudget(from_files);
                    self.status.reloads_failed += 1;
                    self.status.last_error = e.lines();
                    return Err(e);
                }
                let compile_ms = started.elapsed().as_secs_f64() * 1e3;
                self.publisher.publish(compiled.rules);
                self.record_ok(snap, compiled.warnings, compile_ms);
                self.status.rejected = from_api;
                self.objects = snap.cluster_objects();
                Ok(self.status.generation)
            }
            Err(e) => {
                let e = LoadError::Compile(e);
                self.status.reloads_failed += 1;
                self.status.last_error = e.lines();
                Err(e)
            }
        }
    }

    /// Replaces the Kubernetes API's snapshot and publishes the merged table. `events` are the
    /// instants the watch events in this snapshot arrived; their latency to this swap is recorded.
    ///
    /// Each source's latest snapshot is kept even when the merged compile fails (a GatewayPolicy
    /// defined in both, say): the table stays the last good one, and the next change on either
    /// side recompiles from both sides' latest state, so fixing the conflict anywhere heals it.
    pub fn set_kubernetes(&mut self, snap: Snapshot, events: &[Instant]) -> Result<u64, LoadError> {
        let started = Instant::now();
        self.kube = Some(snap);
        match self.recompile(started) {
            Ok(generation) => {
                let now = self.publisher.last_swap();
                for t in events {
                    let us = now.saturating_duration_since(*t).as_micros() as u64;
                    let _ = self.swap_latency.record(us.clamp(1, 3_600_000_000));
                    self.swap_sum_us += u128::from(us);
                }
                self.status.event_to_swap = SwapLatency {
                    count: self.swap_latency.len(),
                    p50_ms: self.swap_latency.value_at_quantile(0.5) as f64 / 1e3,
                    p99_ms: self.swap_latency.value_at_quantile(0.99) as f64 / 1e3,
                    max_ms: self.swap_latency.max() as f64 / 1e3,
                };
                Ok(generation)
            }
            Err(e) => Err(e),
        }
    }

    /// Explains a flow against the live table (what the workers use right now).
    pub fn explain(
        &self,
        key: &policy::key::FlowKey,
    ) -> Result<policy::explain::Report, policy::explain::ExplainError> {
        policy::explain::explain(&self.publisher.current(), &self.objects, key)
    }

    /// The event-to-swap histogram (microseconds), for `/metrics`.
    pub fn swap_latency(&self) -> &Histogram<u64> {
        &self.swap_latency
    }

    /// The exact sum of every recorded event-to-swap latency, in seconds.
    pub fn swap_latency_sum_s(&self) -> f64 {
        self.swap_sum_us as f64 / 1e6
    }

    fn record_ok(&mut self, snap: &Snapshot, warnings: Vec<String>, compile_ms: f64) {
        let t = self.publisher.current();
        let files_errors = self.files_errors.clone();
        let mut sources = vec!["files".to_string()];
        if self.kube.is_some() {
            sources.push("kubernetes".into());
        }
        let s = &mut self.status;
        s.sources = sources;
        s.generation = t.generation();
        s.rules = t.rules().len();
        s.objects = snap
            .counts()
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect();
        s.build_ms = t.build_time().as_secs_f64() * 1e3;
        s.compile_ms = compile_ms;
        s.memory_bytes = t.memory_bytes();
        s.reloads_ok += 1;
        s.last_publish_unix = unix_now();
        s.last_error = files_errors;
        s.warnings = warnings;
    }

    /// The warnings to log now: those that appeared since the last call (a warning is logged when
    /// it appears or changes, not at every swap), and how many went away.
    pub fn warning_changes(&mut self) -> WarningChanges {
        let now: std::collections::BTreeSet<String> = self
            .status
            .warnings
            .iter()
            .cloned()
            .chain(
                self.status
                    .rejected
                    .iter()
                    .map(|r| format!("rejected: {r}")),
            )
            .collect();
        let changes = WarningChanges {
            new: now.difference(&self.logged).cloned().collect(),
            resolved: self.logged.difference(&now).count(),
        };
        self.logged = now;
        changes
    }

    /// Reloads if the directory changed, or unconditionally with `force` (SIGHUP). Returns `None`
    /// when nothing was done, else the new generation or the error (the old table stays).
    pub fn poll(&mut self, force: bool) -> Option<Result<u64, LoadError>> {
        let fp = Fingerprint::of(&self.dir);
        if !force && fp == self.fingerprint {
            return None;
        }
        self.fingerprint = fp;
        let started = Instant::now();
        match load_dir(&self.dir) {
            Ok(snap) => {
                // Kept even if the merged compile fails: see `set_kubernetes`.
                self.files = snap;
                self.files_errors.clear();
                Some(self.recompile(started))
            }
            Err(errs) => {
                let e = LoadError::Source(errs);
                self.status.reloads_failed += 1;
                self.status.last_error = e.lines();
                self.files_errors = e.lines();
                Some(Err(e))
            }
        }
    }

    pub fn status(&self) -> &ReloadStatus {
        &self.status
    }

    pub fn publisher(&mut self) -> &mut Publisher {
        &mut self.publisher
    }

    pub fn rule_hits(&mut self) -> Vec<RuleHits> {
        self.publisher.rule_hits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_edit_keeps_the_last_good_table() {
        let d = std::env::temp_dir().join(format!("portcullis-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let good = "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: a}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]}\n";
        std::fs::write(d.join("p.yaml"), good).unwrap();
        let mut r = Reloader::new(&d, GatewayContext::default(), 1).unwrap();
        assert_eq!(r.status().generation, 1);
        assert!(r.poll(false).is_none(), "no change, no reload");
        assert_eq!(r.poll(true).unwrap().unwrap(), 2, "forced reload publishes");

        std::fs::write(d.join("p.yaml"), good.replace("[80]", "[eighty]")).unwrap();
        let err = r.poll(false).unwrap().unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.ingress[0].destination.ports[0]"),
            "{err}"
        );
        assert_eq!(r.publisher().current().generation(), 2, "old table kept");
        assert_eq!(r.status().reloads_failed, 1);
        assert!(!r.status().last_error.is_empty());

        std::fs::write(d.join("p.yaml"), good.replace("[80]", "[81]")).unwrap();
        assert_eq!(r.poll(false).unwrap().unwrap(), 3);
        assert!(r.status().last_error.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_warning_is_logged_when_it_appears_not_at_every_swap() {
        let d = std::env::temp_dir().join(format!("portcullis-warn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        // Source and destination share no family: the compiler warns the rule matches nothing.
        let odd = "apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {name: odd}\nspec: {ingress: [{action: Allow, source: {nets: [10.0.0.0/8]}, destination: {nets: ['2001:db8::/32']}}]}\n";
        std::fs::write(d.join("p.yaml"), odd).unwrap();
        let mut r = Reloader::new(&d, GatewayContext::default(), 1).unwrap();
        let first = r.warning_changes();
        assert_eq!(first.new.len(), 1, "{first:?}");
        for _ in 0..3 {
            r.poll(true).unwrap().unwrap();
            assert_eq!(
                r.warning_changes(),
                WarningChanges::default(),
                "same warning, no log"
            );
        }
        std::fs::write(d.join("p.yaml"), odd.replace("odd}", "odder}")).unwrap();
        r.poll(false).unwrap().unwrap();
        let changed = r.warning_changes();
        assert_eq!((changed.new.len(), changed.resolved), (1, 1), "{changed:?}");
        assert!(changed.new[0].contains("GatewayPolicy/odder"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_conflict_between_files_and_the_api_heals_from_either_side() {
        let d =
            std::env::temp_dir().join(format!("portcullis-reload-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let policy = |name: &str, port: u16| {
            format!("apiVersion: portcullis.io/v1alpha1\nkind: GatewayPolicy\nmetadata: {{name: {name}}}\nspec: {{ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [{port}]}}}}]}}\n")
        };
        std::fs::write(d.join("p.yaml"), policy("web", 80)).unwrap();
        let mut r = Reloader::new(&d, GatewayContext::default(), 1).unwrap();
        let mut api = Snapshot::default();
        let v: serde_norway::Value = serde_norway::from_str(&policy("web", 443)).unwrap();
        crate::source::add_object(v, "api:GatewayPolicy/web", &mut api).unwrap();
        let err = r.set_kubernetes(api, &[Instant::now()]).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
        assert_eq!(
            r.publisher().current().generation(),
            1,
            "the last good table stays"
        );
        assert_eq!(r.status().sources, vec!["files"]);

        // Renaming the file's policy heals it, and the API's policy is in the new table.
        std::fs::write(d.join("p.yaml"), policy("web-files", 80)).unwrap();
        assert_eq!(r.poll(false).unwrap().unwrap(), 2);
        let t = r.publisher().current();
        let objects: Vec<&str> = t.rules().iter().map(|x| x.origin.object.as_str()).collect();
        assert!(
            objects.contains(&"GatewayPolicy/web") && objects.contains(&"GatewayPolicy/web-files"),
            "{objects:?}"
        );
        assert_eq!(r.status().sources, vec!["files", "kubernetes"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
