//! The compiled rule model: plain data, no Kubernetes or YAML types.
//!
//! A [`RuleSet`] is an ordered list of [`Rule`]s; the first decisive match wins. It is what the
//! compiler produces and what the classifier is built from, so it is half of the contract between
//! `control` and `gateway` (the other half is [`crate::table::Table`]).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::str::FromStr;

/// Which way a frame crosses the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Direction {
    /// Received on `ext`, forwarded to `int` (clients towards the cluster).
    Ingress = 0,
    /// Received on `int`, forwarded to `ext` (the cluster towards clients, replies included).
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP prefix. IPv4 addresses live in the low 32 bits of `bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub v6: bool,
    pub bits: u128,
    pub len: u8,
}

impl Prefix {
    pub const fn width(v6: bool) -> u8 {
        if v6 {
            128
        } else {
            32
        }
    }

    /// The prefix that matches every address of a family.
    pub const fn any(v6: bool) -> Prefix {
        Prefix {
            v6,
            bits: 0,
            len: 0,
        }
    }

    /// Builds a prefix, clearing host bits. `len` must not exceed the family width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let (v6, bits) = addr_bits(addr);
        if len > Prefix::width(v6) {
            return None;
        }
        Some(Prefix {
            v6,
            bits: bits & mask(v6, len),
            len,
        })
    }

    pub fn host(addr: IpAddr) -> Prefix {
        let (v6, bits) = addr_bits(addr);
        Prefix {
            v6,
            bits,
            len: Prefix::width(v6),
        }
    }

    pub(crate) fn contains_bits(&self, v6: bool, bits: u128) -> bool {
        self.v6 == v6 && (bits ^ self.bits) & mask(v6, self.len) == 0
    }

    pub fn contains(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains_bits(other.v6, other.bits)
    }

    pub fn addr(&self) -> IpAddr {
        bits_addr(self.v6, self.bits)
    }

    /// The two halves of this prefix, one bit longer. `None` for a host prefix.
    fn split(&self) -> Option<(Prefix, Prefix)> {
        if self.len >= Prefix::width(self.v6) {
            return None;
        }
        let bit = 1u128 << (Prefix::width(self.v6) - self.len - 1);
        let lo = Prefix {
            len: self.len + 1,
            ..*self
        };
        let hi = Prefix {
            bits: self.bits | bit,
            ..lo
        };
        Some((lo, hi))
    }

    /// `self` minus `hole`, as a list of disjoint prefixes (at most one per bit of difference).
    pub(crate) fn subtract(&self, hole: &Prefix) -> Vec<Prefix> {
        if hole.contains(self) {
            return Vec::new();
        }
        if !self.contains(hole) {
            return vec![*self];
        }
        let mut out = Vec::new();
        let mut cur = *self;
        while let Some((lo, hi)) = cur.split() {
            if lo.contains(hole) {
                out.push(hi);
                if lo == *hole {
                    break;
                }
                cur = lo;
            } else {
                out.push(lo);
                if hi == *hole {
                    break;
                }
                cur = hi;
            }
        }
        out
    }
}

/// Mask with the top `len` bits of a `v6`-wide address set.
#[inline]
pub(crate) fn mask(v6: bool, len: u8) -> u128 {
    let width = Prefix::width(v6) as u32;
    let full = if v6 { u128::MAX } else { u32::MAX as u128 };
    match width - (len as u32).min(width) {
        0 => full,
        h if h >= width => 0,
        h => full & !((1u128 << h) - 1),
    }
}

pub(crate) fn addr_bits(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

pub(crate) fn bits_addr(v6: bool, bits: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(bits.into())
    } else {
        IpAddr::V4((bits as u32).into())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

/// Why a string is not a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
pub struct PrefixParseError(pub String);

impl FromStr for Prefix {
    type Err = PrefixParseError;

    /// Accepts `addr` (a host) or `addr/len`. Host bits beyond `len` are cleared, as Kubernetes
    /// and Calico do.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PrefixParseError(s.to_string());
        let s = s.trim();
        match s.split_once('/') {
            None => Ok(Prefix::host(s.parse().map_err(|_| err())?)),
            Some((a, l)) => {
                let addr: IpAddr = a.parse().map_err(|_| err())?;
                let len: u8 = l.parse().map_err(|_| err())?;
                Prefix::new(addr, len).ok_or_else(err)
            }
        }
    }
}

/// A set of addresses: the union of `include` (empty means any address of either family) minus
/// the union of `except`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AddrSet {
    pub include: Vec<Prefix>,
    pub except: Vec<Prefix>,
}

impl AddrSet {
    pub fn any() -> AddrSet {
        AddrSet::default()
    }

    pub fn contains(&self, v6: bool, bits: u128) -> bool {
        let included =
            self.include.is_empty() || self.include.iter().any(|p| p.contains_bits(v6, bits));
        included && !self.except.iter().any(|p| p.contains_bits(v6, bits))
    }

    /// Disjoint-enough prefixes whose union is exactly this set, for one family; `None` when the
    /// set places no constraint on that family at all (any address).
    pub fn lower(&self, v6: bool) -> Vec<Prefix> {
        self.lower_bounded(v6, usize::MAX).unwrap_or_default()
    }

    /// `lower_bounded(v6, max)`'s length, without building the prefixes when there are no
    /// exceptions (the common case, and the compiler asks for every rule).
    pub fn count(&self, v6: bool, max: usize) -> Option<usize> {
        if !self.except.is_empty() || self.include.len() > 64 {
            return self.lower_bounded(v6, max).map(|p| p.len());
        }
        if self.include.is_empty() {
            return (max >= 1).then_some(1);
        }
        let n = self
            .include
            .iter()
            .enumerate()
            .filter(|(i, p)| p.v6 == v6 && !self.include[..*i].contains(p))
            .count();
        (n <= max).then_some(n)
    }

    /// [`AddrSet::lower`], giving up (`None`) as soon as more than `max` prefixes are in play:
    /// each exception can split every prefix it falls in into up to 128 pieces, so a few long
    /// IPv6 exceptions would otherwise cost time and memory before any budget could say no.
    pub fn lower_bounded(&self, v6: bool, max: usize) -> Option<Vec<Prefix>> {
        let include: Vec<Prefix> = if self.include.is_empty() {
            vec![Prefix::any(v6)]
        } else {
            self.include
                .iter()
                .filter(|p| p.v6 == v6)
                .copied()
                .collect()
        };
        if self.except.is_empty() {
            // Nothing to cut out: the family's prefixes as they are.
            if include.len() > max {
                return None;
            }
            let mut parts = include;
            parts.sort();
            parts.dedup();
            return Some(parts);
        }
        let mut holes: Vec<Prefix> = self.except.iter().filter(|p| p.v6 == v6).copied().collect();
        holes.sort();
        let mut parts = Vec::new();
        for p in include {
            if holes.iter().any(|h| h.contains(&p)) {
                continue;
            }
            // The holes inside `p`: sorted by address, so each half's are a contiguous run.
            let inside: Vec<Prefix> = holes.iter().filter(|h| p.contains(h)).copied().collect();
            if !difference(p, &inside, &mut parts, max) {
                return None;
            }
        }
        parts.sort();
        parts.dedup();
        Some(parts)
    }
}

/// Appends `p` minus the union of `holes` to `out` as disjoint prefixes, splitting `p` in halves
/// only where a hole lies: O(holes x prefix length + output), however the holes are arranged.
/// Every hole lies inside `p`, and `holes` is sorted. Returns false once `out` exceeds `max`.
fn difference(p: Prefix, holes: &[Prefix], out: &mut Vec<Prefix>, max: usize) -> bool {
    if holes.is_empty() {
        out.push(p);
        return out.len() <= max;
    }
    if holes.iter().any(|h| h.contains(&p)) {
        return true;
    }
    let Some((lo, hi)) = p.split() else {
        return true;
    };
    // Holes strictly inside `p` are longer than it, so each lies in one half; sorted by address,
    // the low half's come first.
    let mid = holes.partition_point(|h| h.bits < hi.bits);
    difference(lo, &holes[..mid], out, max) && difference(hi, &holes[mid..], out, max)
}

/// An inclusive port range. `0..=65535` is the wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub(crate) const ANY: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    pub(crate) fn single(p: u16) -> PortRange {
        PortRange { lo: p, hi: p }
    }

    pub(crate) fn is_any(&self) -> bool {
        *self == PortRange::ANY
    }

    #[inline]
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}:{}", self.lo, self.hi)
        }
    }
}

/// Why the gateway denies a frame because of a rule. The gateway counts each separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// An explicit Deny in a policy.
    Policy,
    /// Nothing decided; the configured default for the direction is deny.
    Default,
    /// A Service frontend with no endpoints at all.
    NoEndpoints,
    /// externalTrafficPolicy: Local and the addressed node has no local ready endpoint.
    NoLocalEndpoint,
}

impl DenyReason {
    pub const ALL: [DenyReason; 4] = [
        DenyReason::Policy,
        DenyReason::Default,
        DenyReason::NoEndpoints,
        DenyReason::NoLocalEndpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Policy => "policy_deny",
            DenyReason::Default => "default_deny",
            DenyReason::NoEndpoints => "no_endpoints",
            DenyReason::NoLocalEndpoint => "no_local_endpoint",
        }
    }
}

/// The final verdict on a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny(DenyReason),
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Decisive: the frame gets this verdict.
    Decide(Verdict),
    /// Skip the rest of this rule's layer; evaluation continues at the next layer.
    Pass,
    /// Calico's Pass: skip the rest of this rule's tier; evaluation continues at the next tier
    /// (after the last tier, at the next layer).
    NextTier,
    /// A negated field of a written rule matched (`notProtocol`, `notICMP`, a named `notPorts`
    /// entry, `notSelector`): the written rule does not match, so evaluation continues after the
    /// rules it was lowered to.
    Skip,
    /// Count and log, then continue with the next rule.
    Log,
    /// An audit-mode rule: count what it would have done, then continue with the next rule.
    Audit(Verdict),
}

impl Action {
    pub(crate) fn is_decisive(&self) -> bool {
        matches!(self, Action::Decide(_))
    }
}

/// The evaluation layers, in order (DESIGN §6).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    Failsafe = 0,
    Gateway = 1,
    Kubernetes = 2,
    Default = 3,
}

impl Layer {
    pub const ALL: [Layer; 4] = [
        Layer::Failsafe,
        Layer::Gateway,
        Layer::Kubernetes,
        Layer::Default,
    ];
}

/// Where a rule came from, for `explain`, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Origin {
    pub layer: Layer,
    /// The object kind and name, e.g. `GatewayPolicy/deny-bad-clients` or `config/failsafe`.
    pub object: String,
    /// Which rule of the object (its position in the list), when the object has several.
    pub index: Option<usize>,
    /// The file (or API path) the object was read from.
    pub source: String,
    /// One line of why this rule exists.
    pub why: String,
}

impl Origin {
    /// `Kind/name rule N`, or the object alone: how logs, the monitor and replay name a rule.
    pub fn name(&self) -> String {
        match self.index {
            Some(i) => format!("{} rule {i}", self.object),
            None => self.object.clone(),
        }
    }
}

/// A stable identity for a rule: the same policy rule keeps its id across recompiles, so its
/// counters survive a table swap.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RuleId(pub u64);

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a rule matches. Every field is a conjunction; empty/`None`/ANY means "any".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Match {
    pub direction: Direction,
    pub src: AddrSet,
    pub dst: AddrSet,
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Source port range (TCP/UDP/SCTP), or ICMP type range.
    pub sport: PortRange,
    /// Destination port range (TCP/UDP/SCTP), or ICMP code range.
    pub dport: PortRange,
    /// 802.1Q VLAN id (the outer tag).
    pub vlan: Option<u16>,
}

impl Match {
    pub fn any(direction: Direction) -> Match {
        Match {
            direction,
            src: AddrSet::any(),
            dst: AddrSet::any(),
            proto: None,
            sport: PortRange::ANY,
            dport: PortRange::ANY,
            vlan: None,
        }
    }

    /// How many classifier atoms (single source prefix x single destination prefix, per address
    /// family) this match lowers to, or `None` when that is more than `max`. Computed without
    /// building them.
    pub fn atoms(&self, max: u64) -> Option<u64> {
        let cap = usize::try_from(max).unwrap_or(usize::MAX);
        let mut total = 0u64;
        for v6 in [false, true] {
            let s = self.src.count(v6, cap)? as u64;
            if s == 0 {
                continue;
            }
            let d = self.dst.count(v6, cap)? as u64;
            total = total.saturating_add(s.saturating_mul(d));
            if total > max {
                return None;
            }
        }
        Some(total)
    }

    /// Whether the match needs transport ports (so never matches a non-first fragment).
    pub(crate) fn needs_ports(&self) -> bool {
        !self.sport.is_any() || !self.dport.is_any()
    }

    /// The reference semantics, used by the linear oracle and `explain`.
    pub fn matches(&self, key: &crate::key::FlowKey) -> bool {
        self.direction == key.direction()
            && self.src.contains(key.v6, key.src)
            && self.dst.contains(key.v6, key.dst)
            && self.proto.is_none_or(|p| p == key.proto)
            && (!self.needs_ports() || key.ports_known)
            && self.sport.contains(key.sport)
            && self.dport.contains(key.dport)
            && self.vlan.is_none_or(|v| v == key.vlan)
    }
}

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: RuleId,
    pub matcher: Match,
    pub action: Action,
    /// Log flows that hit this rule (rate-limited).
    pub log: bool,
    pub origin: Origin,
    /// The rule's tier within its layer (Calico tiers; 0 elsewhere): where a
    /// [`Action::NextTier`] continues. Tiers never decrease along a rule list.
    pub tier: u32,
}

impl Rule {
    /// Builds a rule whose id is derived from its origin and match, so it is stable across
    /// recompiles of the same policy.
    pub fn new(matcher: Match, action: Action, log: bool, origin: Origin) -> Rule {
        let mut h = Fnv64::default();
        origin.layer.hash(&mut h);
        origin.object.hash(&mut h);
        origin.index.hash(&mut h);
        // The matcher is part of the identity: an edited rule starts a fresh counter, and the
        // several matches one written rule lowers to stay distinct.
        matcher.hash(&mut h);
        Rule {
            id: RuleId(h.finish()),
            matcher,
            action,
            log,
            origin,
            tier: 0,
        }
    }

    /// The same rule in tier `tier` of its layer.
    pub fn in_tier(mut self, tier: u32) -> Rule {
        self.tier = tier;
        self
    }

    /// Whether `other` was lowered from the same written rule (same object, position and
    /// direction).
    fn same_written_rule(&self, other: &Rule) -> bool {
        self.origin.object == other.origin.object
            && self.origin.index == other.origin.index
            && self.matcher.direction == other.matcher.direction
    }
}

/// FNV-1a: stable across Rust versions and runs, unlike `DefaultHasher`.
#[derive(Debug)]
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// An ordered rule list with its layer boundaries. Built only by [`RuleSet::new`], which checks
/// the invariants the table relies on.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// `layer_start[l]` is the index of the first rule of layer `l` (or of a later one).
    layer_start: [u32; 5],
}

/// Why a rule list cannot be a [`RuleSet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleSetError {
    #[error("rule {index} ({object}) is in layer {layer:?} after a rule of a later layer or tier")]
    LayerOrder {
        index: usize,
        object: String,
        layer: Layer,
    },
    #[error("no decisive catch-all rule for direction {0}: some frames would get no verdict")]
    NoCatchAll(Direction),
    #[error("two rules share the id {id} ({a} and {b}); rule origins must be unique")]
    DuplicateId { id: RuleId, a: String, b: String },
}

impl RuleSet {
    /// Checks that layers are in order, that ids are unique, and that each direction ends in a
    /// decisive catch-all, so every frame gets a verdict.
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleSetError> {
        let mut layer_start = [rules.len() as u32; 5];
        let mut last = (Layer::Failsafe, 0);
        for (i, r) in rules.iter().enumerate() {
            if (r.origin.layer, r.tier) < last {
                return Err(RuleSetError::LayerOrder {
                    index: i,
                    object: r.origin.object.clone(),
                    layer: r.origin.layer,
                });
            }
            last = (r.origin.layer, r.tier);
            let l = r.origin.layer as usize;
            layer_start[l] = layer_start[l].min(i as u32);
        }
        for l in (0..4).rev() {
            layer_start[l] = layer_start[l].min(layer_start[l + 1]);
        }
        for d in Direction::ALL {
            let catch_all = rules
                .iter()
                .any(|r| r.action.is_decisive() && r.matcher == Match::any(d));
            if !catch_all {
                return Err(RuleSetError::NoCatchAll(d));
            }
        }
        let mut seen = foldhash::HashMap::with_capacity_and_hasher(rules.len(), Default::default());
        for r in &rules {
            if let Some(prev) = seen.insert(r.id, &r.origin) {
                return Err(RuleSetError::DuplicateId {
                    id: r.id,
                    a: prev.name(),
                    b: r.origin.name(),
                });
            }
        }
        Ok(RuleSet { rules, layer_start })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Index of the first rule after `layer` (where a Pass continues).
    pub(crate) fn next_layer_start(&self, layer: Layer) -> u32 {
        self.layer_start[layer as usize + 1]
    }

    /// Where evaluation continues after each rule when it does not decide: the next rule, or for
    /// [`Action::Pass`] the next layer, for [`Action::NextTier`] the next tier, for
    /// [`Action::Skip`] the first rule lowered from another written rule.
    pub(crate) fn continue_at(&self) -> Vec<u32> {
        let n = self.rules.len();
        let mut out = vec![0u32; n];
        // Scanning backwards, the start of the following tier and of the following written
        // rule are known at each step.
        let (mut next_tier, mut next_written) = (n as u32, n as u32);
        for i in (0..n).rev() {
            let r = &self.rules[i];
            if let Some(after) = self.rules.get(i + 1) {
                if (after.origin.layer, after.tier) != (r.origin.layer, r.tier) {
                    next_tier = i as u32 + 1;
                }
                if !after.same_written_rule(r) {
                    next_written = i as u32 + 1;
                }
            }
            out[i] = match r.action {
                Action::Pass => self.next_layer_start(r.origin.layer),
                Action::NextTier => next_tier,
                Action::Skip => next_written,
                _ => i as u32 + 1,
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_parse_and_mask() {
        assert_eq!(p("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("10.1.2.3").len, 32);
        assert_eq!(p("0.0.0.0/0").bits, 0);
        assert_eq!(p("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        assert!(p("10.0.0.0/8").contains(&p("10.9.0.0/16")));
        assert!(!p("10.0.0.0/8").contains(&p("11.0.0.0/16")));
        assert!(!p("10.0.0.0/8").contains(&p("::/0")));
        assert_eq!(mask(false, 32), 0xffff_ffff);
        assert_eq!(mask(true, 128), u128::MAX);
        assert_eq!(mask(false, 1), 0x8000_0000);
    }

    #[test]
    fn subtract_covers_exactly_the_difference() {
        let whole = p("10.0.0.0/24");
        let hole = p("10.0.0.64/28");
        let parts = whole.subtract(&hole);
        assert_eq!(parts.len(), 4);
        for host in 0u32..256 {
            let bits = (0x0a00_0000 + host) as u128;
            let in_parts = parts
                .iter()
                .filter(|q| q.contains_bits(false, bits))
                .count();
            let expected = usize::from(!hole.contains_bits(false, bits));
            assert_eq!(in_parts, expected, "host {host}");
        }
        assert!(whole.subtract(&p("10.0.0.0/16")).is_empty());
        assert_eq!(whole.subtract(&p("11.0.0.0/28")), vec![whole]);
    }

    #[test]
    fn addr_set_lowering_matches_contains() {
        let set = AddrSet {
            include: vec![p("10.0.0.0/24"), p("192.168.0.0/30")],
            except: vec![p("10.0.0.128/25"), p("192.168.0.1")],
        };
        let lowered = set.lower(false);
        for host in 0u32..256 {
            for base in [0x0a00_0000u32, 0xc0a8_0000] {
                let bits = (base + host) as u128;
                let by_parts = lowered.iter().any(|q| q.contains_bits(false, bits));
                assert_eq!(by_parts, set.contains(false, bits), "{base:x}+{host}");
            }
        }
        assert!(set.lower(true).is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any includes and exceptions (nested, overlapping, covering) inside 10.0.0.0/24: the
        /// lowered prefixes cover exactly the addresses the set contains, and are disjoint
        /// within one include.
        #[test]
        fn lowering_is_exact_for_any_holes(
            include in proptest::collection::vec((0u32..256, 24u8..=32), 0..3),
            except in proptest::collection::vec((0u32..256, 24u8..=32), 0..12),
        ) {
            let mk = |v: &[(u32, u8)]| -> Vec<Prefix> {
                v.iter()
                    .map(|&(h, len)| Prefix::new(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + h)), len).unwrap())
                    .collect()
            };
            let set = AddrSet { include: mk(&include), except: mk(&except) };
            let lowered = set.lower(false);
            for host in 0u32..256 {
                let bits = (0x0a00_0000 + host) as u128;
                let hits = lowered.iter().filter(|q| q.contains_bits(false, bits)).count();
                proptest::prop_assert_eq!(hits > 0, set.contains(false, bits), "host {}", host);
                if include.len() <= 1 {
                    proptest::prop_assert!(hits <= 1, "host {} in {} parts", host, hits);
                }
            }
            proptest::prop_assert_eq!(set.lower_bounded(false, 0).is_none(), !lowered.is_empty());
        }
    }

    #[test]
    fn ruleset_requires_catch_all_per_direction() {
        let origin = |o: &str| Origin {
            layer: Layer::Default,
            object: o.into(),
            index: None,
            source: "test".into(),
            why: String::new(),
        };
        let deny = Action::Decide(Verdict::Deny(DenyReason::Default));
        let only_ingress = vec![Rule::new(
            Match::any(Direction::Ingress),
            deny,
            false,
            origin("a"),
        )];
        assert_eq!(
            RuleSet::new(only_ingress.clone()).unwrap_err(),
            RuleSetError::NoCatchAll(Direction::Egress)
        );
        let mut both = only_ingress;
        both.push(Rule::new(
            Match::any(Direction::Egress),
            deny,
            false,
            origin("b"),
        ));
        let rs = RuleSet::new(both).unwrap();
        assert_eq!(rs.next_layer_start(Layer::Gateway), 0);
        assert_eq!(rs.next_layer_start(Layer::Default), 2);
    }
}

/// A set of addresses as disjoint prefixes (IPv4 and IPv6 mixed), closed under union and
/// intersection: the algebra for "clients every backend admits".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct PrefixSet(Vec<Prefix>);

impl PrefixSet {
    pub(crate) fn empty() -> PrefixSet {
        PrefixSet(Vec::new())
    }

    /// Both families, whole.
    #[cfg(test)]
    pub(crate) fn everything() -> PrefixSet {
        PrefixSet(vec![Prefix::any(false), Prefix::any(true)])
    }

    /// `cidr` minus every prefix of `except`.
    pub(crate) fn block(cidr: Prefix, except: &[Prefix]) -> PrefixSet {
        let mut parts = vec![cidr];
        for hole in except {
            parts = parts.iter().flat_map(|p| p.subtract(hole)).collect();
        }
        PrefixSet::normalized(parts)
    }

    pub(crate) fn of(prefixes: impl IntoIterator<Item = Prefix>) -> PrefixSet {
        PrefixSet::normalized(prefixes.into_iter().collect())
    }

    /// Sorts and drops prefixes covered by another.
    fn normalized(mut v: Vec<Prefix>) -> PrefixSet {
        // By family, start, then length: a prefix inside another comes after it, and prefixes
        // nest or are disjoint, so only the last one kept can cover the next (O(n log n), which
        // a 100,000-CIDR network set needs).
        v.sort();
        let mut out: Vec<Prefix> = Vec::with_capacity(v.len());
        for p in v {
            if !out.last().is_some_and(|q| q.contains(&p)) {
                out.push(p);
            }
        }
        PrefixSet(out)
    }

    pub(crate) fn union(&self, o: &PrefixSet) -> PrefixSet {
        PrefixSet::normalized(self.0.iter().chain(&o.0).copied().collect())
    }

    pub(crate) fn intersect(&self, o: &PrefixSet) -> PrefixSet {
        let mut v = Vec::new();
        for a in &self.0 {
            for b in &o.0 {
                if a.contains(b) {
                    v.push(*b);
                } else if b.contains(a) {
                    v.push(*a);
                }
            }
        }
        PrefixSet::normalized(v)
    }

    pub(crate) fn minus(&self, holes: &[Prefix]) -> PrefixSet {
        let mut parts = self.0.clone();
        for hole in holes {
            parts = parts.iter().flat_map(|p| p.subtract(hole)).collect();
        }
        PrefixSet::normalized(parts)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn prefixes(&self) -> &[Prefix] {
        &self.0
    }

    pub(crate) fn contains(&self, v6: bool, bits: u128) -> bool {
        self.0.iter().any(|p| p.contains_bits(v6, bits))
    }

    /// The same set as a rule's address match. An empty set has no `AddrSet` (it would read as
    /// "any"), so callers must not build a rule from it.
    pub(crate) fn to_addr_set(&self) -> Option<AddrSet> {
        if self.0.is_empty() {
            return None;
        }
        if self.0 == [Prefix::any(false), Prefix::any(true)] {
            return Some(AddrSet::any());
        }
        Some(AddrSet {
            include: self.0.clone(),
            except: Vec::new(),
        })
    }
}

impl fmt::Display for PrefixSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|p| p.to_string()).collect();
        write!(f, "{{{}}}", parts.join(", "))
    }
}

#[cfg(test)]
mod prefix_set_tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn algebra() {
        let a = PrefixSet::block(p("10.0.0.0/8"), &[p("10.1.0.0/16")]);
        let b = PrefixSet::of([p("10.1.2.0/24"), p("10.2.0.0/16"), p("192.0.2.0/24")]);
        let i = a.intersect(&b);
        assert_eq!(i, PrefixSet::of([p("10.2.0.0/16")]));
        let u = a.union(&b);
        assert!(u.contains(false, 0x0a01_0203) && u.contains(false, 0xc000_0201));
        assert!(!u.contains(false, 0x0a01_0301));
        assert!(PrefixSet::everything().intersect(&b) == b);
        assert_eq!(PrefixSet::everything().to_addr_set(), Some(AddrSet::any()));
        assert_eq!(PrefixSet::empty().to_addr_set(), None);
        assert!(b
            .minus(&[p("192.0.2.0/24")])
            .intersect(&PrefixSet::of([p("192.0.2.7")]))
            .is_empty());
    }
}
