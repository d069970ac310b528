//! `portcullis replay`: frames captured on the two interfaces, merged by timestamp and run through
//! the real parser, table and connection tracker, with time taken from the capture. Offline, no
//! root, no sockets: what a user checks a policy change against, and what the tests check the
//! stateful semantics with.
//!
//! The per-packet logic is the worker's own ([`crate::worker::track_packet`] and
//! [`crate::worker::settle`] around [`Table::decide_batch`]), applied one packet at a time.

use control::publish::Publisher;
use control::reload::{load_and_compile, LoadError};
use policy::rule::RuleSet;
use policy::rule::{Direction, Verdict};
use policy::table::{Decision, Table};

use crate::config::{Config, L2Action};
use crate::conntrack::Conntrack;
use crate::parse::{parse_tracked, Frame};
use crate::pcap::{self, Packet, PcapError};
use crate::stats::{CtEvent, Reason, Tally};
use crate::worker::{settle, track_packet, Outcome, Pending, Tracked};

/// One packet's verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    /// `ext` or `int`: where the frame arrived.
    pub iface: String,
    /// 0-based index within that interface's capture.
    pub index: usize,
    /// Capture time, seconds since the Unix epoch.
    pub ts: f64,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The drop reason, for a deny.
    pub reason: Option<String>,
    /// The rule that decided, when the table decided.
    pub rule: Option<String>,
    /// `new`, `established`, `related`, `invalid` or `untracked`.
    pub state: String,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Pcap(#[from] PcapError),
    #[error("the policies do not compile")]
    Policy(#[source] LoadError),
    #[error("the policies of the change at {ts} s ({dir}) do not compile")]
    Change {
        ts: f64,
        dir: String,
        #[source]
        source: LoadError,
    },
}

/// A policy change during a replay: from capture time `ts` (seconds since the Unix epoch) on,
/// the policies are those in `dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub ts: f64,
    pub dir: std::path::PathBuf,
}

impl std::str::FromStr for Change {
    type Err = String;

    /// `TS=DIR`.
    fn from_str(s: &str) -> Result<Change, String> {
        let (ts, dir) = s.split_once('=').ok_or_else(|| {
            format!("`{s}`: expected TS=DIR (capture time in seconds, a policy directory)")
        })?;
        let ts: f64 = ts
            .trim()
            .parse()
            .map_err(|_| format!("`{ts}`: not a time in seconds"))?;
        if !ts.is_finite() || ts < 0.0 {
            return Err(format!("`{ts}`: not a time in seconds"));
        }
        Ok(Change {
            ts,
            dir: dir.into(),
        })
    }
}

/// Replays `ext` and `int` captures against `cfg`'s policies, swapping to each change's
/// policies at its time.
pub fn replay_files(
    cfg: &Config,
    ext: &std::path::Path,
    int: &std::path::Path,
    changes: &[Change],
) -> Result<Vec<Line>, ReplayError> {
    let (ext, int) = (pcap::read(ext)?, pcap::read(int)?);
    let (_, rules, _) =
        load_and_compile(&cfg.policy_dir, &cfg.context).map_err(ReplayError::Policy)?;
    // Every change compiles before the replay starts, so a bad one fails the command.
    let mut compiled = Vec::new();
    for c in changes {
        let (_, rules, _) =
            load_and_compile(&c.dir, &cfg.context).map_err(|source| ReplayError::Change {
                ts: c.ts,
                dir: c.dir.display().to_string(),
                source,
            })?;
        compiled.push(((c.ts * 1e9) as u64, rules));
    }
    compiled.sort_by_key(|(ts, _)| *ts);
    Ok(replay(cfg, Publisher::new(rules, 1), compiled, &ext, &int))
}

/// Replays two captures in timestamp order (ext first on a tie) through the tables `publisher`
/// publishes: its current one, then each of `changes` (capture time in nanoseconds, rules) from
/// its time on, published the way the control thread publishes a reload.
pub fn replay(
    cfg: &Config,
    mut publisher: Publisher,
    mut changes: Vec<(u64, RuleSet)>,
    ext: &[Packet],
    int: &[Packet],
) -> Vec<Line> {
    let ct = cfg
        .conntrack
        .enabled
        .then(|| Conntrack::new(cfg.conntrack.capacity, cfg.conntrack.timeouts));
    let mut order: Vec<(u64, u8, usize)> = ext
        .iter()
        .enumerate()
        .map(|(i, p)| (p.ts_ns, 0, i))
        .chain(int.iter().enumerate().map(|(i, p)| (p.ts_ns, 1, i)))
        .collect();
    order.sort();
    changes.reverse();
    let mut reader = publisher.reader();
    let mut tally = Tally::default();
    order
        .into_iter()
        .map(|(ts, side, index)| {
            while changes.last().is_some_and(|(at, _)| *at <= ts) {
                if let Some((_, rules)) = changes.pop() {
                    publisher.publish(rules);
                }
            }
            let table: &Table = reader.load();
            let generation = table.generation() as u32;
            let (iface, dir, p) = if side == 0 {
                ("ext", Direction::Ingress, &ext[index])
            } else {
                ("int", Direction::Egress, &int[index])
            };
            // The tracker's clock starts at the capture's first packet, as a live one starts
            // before its first packet.
            let now = ts.max(1);
            let (verdict, state) = decide(
                cfg,
                table,
                ct.as_ref(),
                &mut tally,
                &p.data,
                dir,
                now,
                generation,
            );
            let (allow, reason, rule) = match verdict {
                Decided::Allow(rule) => (true, None, rule),
                Decided::Deny(reason, rule) => (false, Some(reason.as_str().to_string()), rule),
            };
            Line {
                iface: iface.into(),
                index,
                ts: ts as f64 / 1e9,
                verdict: if allow { "allow" } else { "deny" }.into(),
                reason,
                rule: rule.map(|r| rule_name(table, r)),
                state: state.into(),
            }
        })
        .collect()
}

enum Decided {
    Allow(Option<u32>),
    Deny(Reason, Option<u32>),
}

#[allow(clippy::too_many_arguments)]
fn decide(
    cfg: &Config,
    table: &Table,
    ct: Option<&Conntrack>,
    tally: &mut Tally,
    frame: &[u8],
    dir: Direction,
    now: u64,
    generation: u32,
) -> (Decided, &'static str) {
    let (k, track) = match parse_tracked(frame, dir) {
        Err(reason) => return (Decided::Deny(reason, None), "invalid"),
        Ok((Frame::Arp, _)) if cfg.l2.arp == L2Action::Forward => {
            return (Decided::Allow(None), "untracked")
        }
        Ok((Frame::OtherL2, _)) if cfg.l2.other == L2Action::Forward => {
            return (Decided::Allow(None), "untracked")
        }
        Ok((Frame::Arp | Frame::OtherL2, _)) => {
            return (Decided::Deny(Reason::L2Policy, None), "untracked")
        }
        Ok((Frame::Ip(k), track)) => (k, track),
    };
    let (key, pending) = match ct {
        Some(ct) => match track_packet(ct, &k, &track, generation, now) {
            Tracked::Pass(CtEvent::Related) => return (Decided::Allow(None), "related"),
            Tracked::Pass(_) => return (Decided::Allow(None), "established"),
            Tracked::Drop(reason) => return (Decided::Deny(reason, None), "invalid"),
            Tracked::Decide(key, pending) => (key, pending),
        },
        None => (k, Pending::Untracked),
    };
    let state = match (ct, &pending) {
        (None, _) | (_, Pending::Untracked) => "untracked",
        (_, Pending::Open(..)) => "new",
        (_, Pending::Recheck(..)) => "established",
        (_, Pending::RecheckRelated(..)) => "related",
        (_, Pending::Invalid) => "invalid",
    };
    let mut d = [Decision::default()];
    table.decide_batch(0, &[key], &mut d);
    let d = d[0];
    let outcome = match ct {
        Some(ct) => settle(ct, tally, &k, &pending, &track, d.verdict, generation, now),
        None => Outcome::Table,
    };
    let rule = Some(d.rule).filter(|r| (*r as usize) < table.rules().len());
    let decided = match (d.verdict, outcome) {
        (Verdict::Allow, Outcome::Full) => Decided::Deny(Reason::ConntrackFull, rule),
        (Verdict::Allow, _) => Decided::Allow(rule),
        (Verdict::Deny(_), Outcome::Invalid) => Decided::Deny(Reason::Invalid, rule),
        (Verdict::Deny(r), _) => Decided::Deny(Reason::from_deny(r), rule),
    };
    (decided, state)
}

fn rule_name(table: &Table, rule: u32) -> String {
    table.rules()[rule as usize].origin.name()
}
