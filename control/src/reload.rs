//! The reload loop's state: load the policy directory, compile, publish; on any error keep the
//! last good table and say why.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::compile::{compile, CompileError, GatewayContext};
use crate::publish::{Publisher, RuleHits};
use crate::rule::RuleSet;
use crate::snapshot::Snapshot;
use crate::source::{load_dir, Fingerprint, SourceError};

/// Why a policy load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{} error(s) in the policy directory:\n  {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Source(Vec<SourceError>),
    #[error(transparent)]
    Compile(#[from] CompileError),
}

impl LoadError {
    /// One line per problem, for status output.
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Source(errs) => errs.iter().map(|e| e.to_string()).collect(),
            LoadError::Compile(e) => vec![e.to_string()],
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
    Ok((snap, compiled.rules, compiled.warnings))
}

/// What the last reload did, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReloadStatus {
    pub policy_dir: String,
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
}

/// Owns the publisher and the policy directory's state.
pub struct Reloader {
    dir: PathBuf,
    ctx: GatewayContext,
    publisher: Publisher,
    fingerprint: Fingerprint,
    status: ReloadStatus,
}

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
            status: ReloadStatus {
                policy_dir: dir.display().to_string(),
                ..ReloadStatus::default()
            },
        };
        r.record_ok(&snap, warnings, compile_ms);
        Ok(r)
    }

    fn record_ok(&mut self, snap: &Snapshot, warnings: Vec<String>, compile_ms: f64) {
        let t = self.publisher.current();
        let s = &mut self.status;
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
        s.last_error.clear();
        s.warnings = warnings;
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
        match load_and_compile(&self.dir, &self.ctx) {
            Ok((snap, rules, warnings)) => {
                let compile_ms = started.elapsed().as_secs_f64() * 1e3;
                self.publisher.publish(rules);
                self.record_ok(&snap, warnings, compile_ms);
                Some(Ok(self.status.generation))
            }
            Err(e) => {
                self.status.reloads_failed += 1;
                self.status.last_error = e.lines();
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
}
