//! Readers for ClassBench filter sets, header traces and first-match oracles
//! (format: `../shared/data/classbench/README.md`).

use std::net::Ipv4Addr;
use std::path::Path;

use crate::key::FlowKey;
use crate::rule::{AddrSet, Direction, Match, PortRange, Prefix};

/// A ClassBench file that does not parse, with the line that broke.
#[derive(Debug, thiserror::Error)]
pub enum ClassBenchError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Syntax {
        path: String,
        line: usize,
        what: String,
    },
}

fn read(path: &Path) -> Result<String, ClassBenchError> {
    std::fs::read_to_string(path).map_err(|source| ClassBenchError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn syntax(path: &Path, line: usize, what: impl Into<String>) -> ClassBenchError {
    ClassBenchError::Syntax {
        path: path.display().to_string(),
        line: line + 1,
        what: what.into(),
    }
}

fn parse_prefix(s: &str) -> Option<Prefix> {
    let (a, l) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    Prefix::new(addr.into(), l.parse().ok()?)
}

fn parse_range(s: &str) -> Option<PortRange> {
    let (lo, hi) = s.split_once(':')?;
    let r = PortRange {
        lo: lo.trim().parse().ok()?,
        hi: hi.trim().parse().ok()?,
    };
    (r.lo <= r.hi).then_some(r)
}

fn parse_hex_u8(s: &str) -> Option<u8> {
    u8::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Parses a `.filters` file into ingress matches; index = priority. The TCP-flags column is
/// ignored, as the expected results do.
pub fn read_filters(path: &Path) -> Result<Vec<Match>, ClassBenchError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let line = line
            .strip_prefix('@')
            .ok_or_else(|| syntax(path, n, "a filter line starts with '@'"))?;
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 5 {
            return Err(syntax(path, n, "expected at least 5 tab-separated fields"));
        }
        let src = parse_prefix(f[0]).ok_or_else(|| syntax(path, n, "bad source prefix"))?;
        let dst = parse_prefix(f[1]).ok_or_else(|| syntax(path, n, "bad destination prefix"))?;
        let sport = parse_range(f[2]).ok_or_else(|| syntax(path, n, "bad source port range"))?;
        let dport =
            parse_range(f[3]).ok_or_else(|| syntax(path, n, "bad destination port range"))?;
        let (pv, pm) = f[4]
            .split_once('/')
            .and_then(|(v, m)| Some((parse_hex_u8(v)?, parse_hex_u8(m)?)))
            .ok_or_else(|| syntax(path, n, "bad protocol value/mask"))?;
        let proto = match pm {
            0xff => Some(pv),
            0x00 => None,
            _ => return Err(syntax(path, n, "protocol mask must be 0x00 or 0xFF")),
        };
        let set = |p: Prefix| AddrSet {
            include: if p.len == 0 { Vec::new() } else { vec![p] },
            except: Vec::new(),
        };
        let mut m = Match::any(Direction::Ingress);
        m.src = set(src);
        m.dst = set(dst);
        m.proto = proto;
        m.sport = sport;
        m.dport = dport;
        out.push(m);
    }
    Ok(out)
}

/// A 0/0 in ClassBench means any IPv4 address; our `AddrSet::any` also admits IPv6. The traces
/// are IPv4 only, so the two agree on them.
/// Parses a `.trace` file into ingress keys.
pub fn read_trace(path: &Path) -> Result<Vec<FlowKey>, ClassBenchError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<u64> = line
            .split_whitespace()
            .take(5)
            .map(|x| x.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| syntax(path, n, "expected unsigned integers"))?;
        if f.len() < 5 || f[0] > u32::MAX as u64 || f[1] > u32::MAX as u64 {
            return Err(syntax(path, n, "expected src dst sport dport proto"));
        }
        let port = |v: u64| u16::try_from(v).map_err(|_| syntax(path, n, "port out of range"));
        out.push(FlowKey {
            src: f[0] as u128,
            dst: f[1] as u128,
            sport: port(f[2])?,
            dport: port(f[3])?,
            proto: u8::try_from(f[4]).map_err(|_| syntax(path, n, "protocol out of range"))?,
            ..FlowKey::default()
        });
    }
    Ok(out)
}

/// Parses a `.expected` file: one 0-based filter index per line, `-1` for no match.
pub fn read_expected(path: &Path) -> Result<Vec<i64>, ClassBenchError> {
    let text = read(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            l.trim()
                .parse()
                .map_err(|_| syntax(path, n, "expected an integer"))
        })
        .collect()
}
