//! `explain`: why a flow gets its verdict. The table's answer (checked against the linear
//! reference), every rule that matched on the way, and, when either end is a known pod or VMI,
//! the Kubernetes NetworkPolicy verdicts as the reference engine defines them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::key::{proto, FlowKey};
use crate::netpol::End;
use crate::rule::{Direction, Verdict};
use crate::snapshot::ClusterObjects;
use crate::table::{ExplainStep, Table};

/// The Kubernetes view of a flow (both ends as the netpol truth tables define them).
#[derive(Debug, Clone, Serialize)]
pub struct KubernetesVerdict {
    pub from: String,
    pub to: String,
    /// The destination side admits it (true when the destination is not a known workload).
    pub ingress_allowed: bool,
    /// The source side may send it (true when the source is not a known workload).
    pub egress_allowed: bool,
    pub allowed: bool,
}

/// Everything `explain` says about one flow.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub flow: String,
    /// `allow` or `deny` in JSON; `result` names the drop reason.
    #[serde(serialize_with = "verdict_word")]
    pub verdict: Verdict,
    /// `allow`, or the drop reason.
    pub result: &'static str,
    pub steps: Vec<ExplainStep>,
    pub kubernetes: Option<KubernetesVerdict>,
}

fn verdict_word<S: serde::Serializer>(v: &Verdict, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match v {
        Verdict::Allow => "allow",
        Verdict::Deny(_) => "deny",
    })
}

/// One line of `explain --probes`: a flow to explain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    pub src: IpAddr,
    pub dst: IpAddr,
    #[serde(default = "default_proto")]
    pub proto: String,
    #[serde(default = "default_sport")]
    pub sport: u16,
    #[serde(default)]
    pub dport: u16,
    /// ICMP type (with proto icmp/icmpv6); the code goes in `dport`.
    #[serde(default)]
    pub icmp_type: Option<u8>,
    #[serde(default = "default_direction")]
    pub direction: String,
}

fn default_proto() -> String {
    "tcp".into()
}
fn default_sport() -> u16 {
    40000
}
fn default_direction() -> String {
    "ingress".into()
}

/// Why a flow cannot be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("`{0}` is not a protocol (tcp, udp, sctp, icmp, icmpv6 or a number)")]
    Protocol(String),
    #[error("src and dst must be the same address family")]
    MixedFamilies,
    #[error("direction `{0}` is not ingress or egress")]
    Direction(String),
    /// The fast classifier and the linear reference disagree: a bug, never an input problem.
    #[error("internal error: the classifier says {classifier} but the reference scan says {reference}; please report this")]
    Disagreement {
        classifier: String,
        reference: String,
    },
}

impl FlowQuery {
    pub fn key(&self) -> Result<FlowKey, ExplainError> {
        let p =
            proto::parse(&self.proto).ok_or_else(|| ExplainError::Protocol(self.proto.clone()))?;
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(ExplainError::MixedFamilies);
        }
        let dir = match self.direction.as_str() {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            o => return Err(ExplainError::Direction(o.to_string())),
        };
        let sport = if proto::is_icmp(p) {
            self.icmp_type.map_or(self.sport, u16::from)
        } else {
            self.sport
        };
        Ok(FlowKey::new(dir, self.src, self.dst, p, sport, self.dport))
    }
}

/// Explains `key` against `table`, with the Kubernetes verdicts from `objects`.
pub fn explain(
    table: &Table,
    objects: &ClusterObjects,
    key: &FlowKey,
) -> Result<Report, ExplainError> {
    let e = table.explain(key);
    let reference = table.reference_decision(key);
    if reference != e.verdict {
        return Err(ExplainError::Disagreement {
            classifier: format!("{:?}", e.verdict),
            reference: format!("{reference:?}"),
        });
    }
    let cluster = objects.cluster();
    let (src, dst) = (key.src_addr(), key.dst_addr());
    let (from_w, to_w) = (cluster.workload_at(src), cluster.workload_at(dst));
    let kubernetes = (from_w.is_some() || to_w.is_some()).then(|| {
        let from = from_w.map_or(End::External(src), End::Workload);
        let to = to_w.map_or(End::External(dst), End::Workload);
        let ingress_allowed =
            to_w.is_none_or(|w| cluster.ingress_allowed(from, w, key.proto, key.dport));
        let egress_allowed =
            from_w.is_none_or(|w| cluster.egress_allowed(w, to, key.proto, key.dport));
        KubernetesVerdict {
            from: from_w.map_or(src.to_string(), |w| w.id()),
            to: to_w.map_or(dst.to_string(), |w| w.id()),
            ingress_allowed,
            egress_allowed,
            allowed: ingress_allowed && egress_allowed,
        }
    });
    Ok(Report {
        flow: key.to_string(),
        verdict: e.verdict,
        result: match e.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny(r) => r.as_str(),
        },
        steps: e.steps,
        kubernetes,
    })
}

impl Report {
    /// The human-readable explanation `portcullis explain` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let verdict = match self.verdict {
            Verdict::Allow => "ALLOW".to_string(),
            Verdict::Deny(d) => format!("DENY ({})", d.as_str()),
        };
        let _ = writeln!(o, "flow:    {}", self.flow);
        let _ = writeln!(o, "verdict: {verdict}");
        let Some(last) = self.steps.last() else {
            let _ = writeln!(o, "no rule matched (the table fails closed)");
            return o;
        };
        let origin = &last.origin;
        let pos = origin.index.map_or(String::new(), |i| format!(" rule {i}"));
        let _ = writeln!(o, "layer:   {:?}", last.layer);
        let _ = writeln!(
            o,
            "rule:    #{} {}{} (id {})",
            last.index, origin.object, pos, last.rule
        );
        let _ = writeln!(o, "origin:  {}", origin.source);
        let _ = writeln!(o, "reason:  {}", origin.why);
        if self.steps.len() > 1 {
            let _ = writeln!(o, "also matched on the way:");
            for s in &self.steps[..self.steps.len() - 1] {
                let _ = writeln!(o, "  #{} {} ({:?})", s.index, s.origin.object, s.action);
            }
        }
        if let Some(k) = &self.kubernetes {
            let _ = writeln!(
                o,
                "kubernetes: {} -> {}: ingress {}, egress {}, allowed {}",
                k.from, k.to, k.ingress_allowed, k.egress_allowed, k.allowed
            );
        }
        o
    }
}

/// Decodes one `%XX`-escaped query-string component (`+` is a space), for `/explain` and the test
/// API server. Malformed escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("fd00%3A%3A1"), "fd00::1");
        assert_eq!(percent_decode("1%3A500"), "1:500");
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz%"), "%zz%");
    }
}
