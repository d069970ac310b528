//! `portcullis replay`: frames captured on the two interfaces, merged by timestamp and run through
//! the real parser, table and connection tracker, with time taken from the capture. Offline, no
//! root, no sockets: what a user checks a policy change against, and what the tests check the
//! stateful semantics with.
//!
//! The per-packet logic is the worker's own ([`crate::worker::track_packet`] and
//! [`crate::worker::settle`] around [`Table::decide_batch`]), applied one packet at a time.

use control::reload::{load_and_compile, LoadError};
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
}

/// Replays `ext` and `int` captures against `cfg`'s policies.
pub fn replay_files(
    cfg: &Config,
    ext: &std::path::Path,
    int: &std::path::Path,
) -> Result<Vec<Line>, ReplayError> {
    let (ext, int) = (pcap::read(ext)?, pcap::read(int)?);
    let (_, rules, _) =
        load_and_compile(&cfg.policy_dir, &cfg.context).map_err(ReplayError::Policy)?;
    let table = Table::build(rules, 1, 1);
    Ok(replay(cfg, &table, &ext, &int))
}

/// Replays two captures in timestamp order (ext first on a tie) through `table`.
pub fn replay(cfg: &Config, table: &Table, ext: &[Packet], int: &[Packet]) -> Vec<Line> {
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
    let generation = table.generation() as u32;
    let mut tally = Tally::default();
    order
        .into_iter()
        .map(|(ts, side, index)| {
            let (iface, dir, p) = if side == 0 {
                ("ext", Direction::Ingress, &ext[index])
            } else {
                ("int", Direction::Egress, &int[index])
            };
            let (verdict, state) = decide(
                cfg,
                table,
                ct.as_ref(),
                &mut tally,
                &p.data,
                dir,
                ts,
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
            Tracked::Decide(key, pending) => (key, pending),
        },
        None => (k, Pending::Untracked),
    };
    let state = match (ct, &pending) {
        (None, _) | (_, Pending::Untracked) => "untracked",
        (_, Pending::Open(_)) => "new",
        (_, Pending::Recheck(_)) => "established",
    };
    let mut d = [Decision::default()];
    table.decide_batch(0, &[key], &mut d);
    let d = d[0];
    let outcome = match ct {
        Some(ct) => settle(ct, tally, &pending, &track, d.verdict, generation, now),
        None => Outcome::Table,
    };
    let rule = Some(d.rule).filter(|r| (*r as usize) < table.rules().len());
    let decided = match (d.verdict, outcome) {
        (Verdict::Allow, Outcome::Full) => Decided::Deny(Reason::ConntrackFull, rule),
        (Verdict::Allow, _) => Decided::Allow(rule),
        (Verdict::Deny(r), _) => Decided::Deny(Reason::from_deny(r), rule),
    };
    (decided, state)
}

fn rule_name(table: &Table, rule: u32) -> String {
    let r = &table.rules()[rule as usize];
    match r.origin.index {
        Some(i) => format!("{} rule {i}", r.origin.object),
        None => r.origin.object.clone(),
    }
}
