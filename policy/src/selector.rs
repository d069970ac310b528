//! Label selectors: Kubernetes `LabelSelector` (matchLabels + matchExpressions) and Calico's
//! selector expressions (`role == 'web' && has(tier)`).

use std::collections::BTreeMap;

use serde::Deserialize;

pub(crate) type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// A selector the API server (or Calico) would reject, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("expected {expected} at offset {offset}")]
    Expected {
        expected: &'static str,
        offset: usize,
    },
    #[error("unexpected `{rest}` at offset {offset}")]
    Trailing { rest: String, offset: usize },
    #[error("nested deeper than {max} levels of `(` and `!` at offset {offset}")]
    TooDeep { max: usize, offset: usize },
    #[error("{len} bytes, longer than the {max} a selector may have")]
    TooLong { len: usize, max: usize },
    #[error("matchExpressions[{index}]: {operator} needs values")]
    NeedsValues { index: usize, operator: String },
    #[error("matchExpressions[{index}]: {operator} takes no values")]
    TakesNoValues { index: usize, operator: String },
}

/// A Kubernetes label selector. The empty selector matches everything. Strict: a misspelt
/// `matchLabel` is an error, not an empty selector that matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("x-kubernetes-preserve-unknown-fields" = true)))]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<Requirement>>,
}

impl LabelSelector {
    /// The same selector as a Calico expression (how Calico converts a Kubernetes
    /// NetworkPolicy's selectors).
    pub fn to_expr(&self) -> Expr {
        let mut terms: Vec<Expr> = self
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Expr::Eq(k.clone(), v.clone()))
            .collect();
        for r in self.match_expressions.iter().flatten() {
            let values = r.values.clone().unwrap_or_default();
            terms.push(match r.operator {
                Operator::In => Expr::In(r.key.clone(), values),
                Operator::NotIn => Expr::NotIn(r.key.clone(), values),
                Operator::Exists => Expr::Has(r.key.clone()),
                Operator::DoesNotExist => Expr::Not(Box::new(Expr::Has(r.key.clone()))),
            });
        }
        match terms.len() {
            0 => Expr::All,
            1 => terms.pop().unwrap_or(Expr::All),
            _ => Expr::And(terms),
        }
    }

    /// `k8s.io/apimachinery/pkg/labels` semantics: NotIn and DoesNotExist match an object that
    /// lacks the key.
    pub fn matches(&self, labels: &Labels) -> bool {
        let by_label = self
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v));
        by_label
            && self.match_expressions.iter().flatten().all(|r| {
                let values = r.values.as_deref().unwrap_or(&[]);
                match r.operator {
                    Operator::In => labels.get(&r.key).is_some_and(|v| values.contains(v)),
                    Operator::NotIn => labels.get(&r.key).is_none_or(|v| !values.contains(v)),
                    Operator::Exists => labels.contains_key(&r.key),
                    Operator::DoesNotExist => !labels.contains_key(&r.key),
                }
            })
    }

    /// Checks what the API server would reject.
    pub fn validate(&self) -> Result<(), SelectorError> {
        for (i, r) in self.match_expressions.iter().flatten().enumerate() {
            let n = r.values.as_ref().map_or(0, Vec::len);
            match r.operator {
                Operator::In | Operator::NotIn if n == 0 => {
                    return Err(SelectorError::NeedsValues {
                        index: i,
                        operator: format!("{:?}", r.operator),
                    })
                }
                Operator::Exists | Operator::DoesNotExist if n > 0 => {
                    return Err(SelectorError::TakesNoValues {
                        index: i,
                        operator: format!("{:?}", r.operator),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A parsed Calico selector expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    All,
    /// `global()`: as a rule's `namespaceSelector`, only endpoints in no namespace (host
    /// endpoints, global network sets); elsewhere it matches like `all()`.
    Global,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Expr>),
    /// Every term (n-ary, so a long chain of `&&` stays one level deep).
    And(Vec<Expr>),
    /// Any term.
    Or(Vec<Expr>),
}

/// How deep `(` and `!` may nest in a Calico selector. Real selectors nest a few levels; the
/// limit keeps parsing, matching and dropping an expression within a small stack, whatever an API
/// user writes (each level costs a few frames of recursion).
pub const MAX_SELECTOR_DEPTH: usize = 64;

/// The longest Calico selector accepted, in bytes (Calico's own API has no limit; this one is far
/// beyond any real selector and bounds the work per object).
pub const MAX_SELECTOR_LEN: usize = 16 * 1024;

impl Expr {
    /// Calico semantics: `!=` and `not in` match when the label is absent.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Expr::All | Expr::Global => true,
            Expr::Has(k) => labels.contains_key(k),
            Expr::Eq(k, v) => labels.get(k) == Some(v),
            Expr::Ne(k, v) => labels.get(k) != Some(v),
            Expr::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Expr::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Expr::Contains(k, s) => labels.get(k).is_some_and(|v| v.contains(s.as_str())),
            Expr::StartsWith(k, s) => labels.get(k).is_some_and(|v| v.starts_with(s.as_str())),
            Expr::EndsWith(k, s) => labels.get(k).is_some_and(|v| v.ends_with(s.as_str())),
            Expr::Not(e) => !e.matches(labels),
            Expr::And(terms) => terms.iter().all(|e| e.matches(labels)),
            Expr::Or(terms) => terms.iter().any(|e| e.matches(labels)),
        }
    }

    /// Parses a Calico selector. The empty string means `all()`. Nesting deeper than
    /// [`MAX_SELECTOR_DEPTH`] or text longer than [`MAX_SELECTOR_LEN`] is an error, never a
    /// crash.
    pub fn parse(s: &str) -> Result<Expr, SelectorError> {
        if s.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong {
                len: s.len(),
                max: MAX_SELECTOR_LEN,
            });
        }
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
            depth: 0,
        };
        p.ws();
        if p.i == p.s.len() {
            return Ok(Expr::All);
        }
        let e = p.or()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(SelectorError::Trailing {
                rest: String::from_utf8_lossy(&p.s[p.i..]).into_owned(),
                offset: p.i,
            });
        }
        Ok(e)
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    /// `(` and `!` open around the current position.
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(tok.as_bytes()) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }

    fn err<T>(&self, expected: &'static str) -> Result<T, SelectorError> {
        Err(SelectorError::Expected {
            expected,
            offset: self.i,
        })
    }

    fn or(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.and()?];
        while self.eat("||") {
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.swap_remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.unary()?];
        while self.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.swap_remove(0)
        } else {
            Expr::And(terms)
        })
    }

    /// One more level of `(` or `!`, within the limit.
    fn deeper(&mut self) -> Result<(), SelectorError> {
        self.depth += 1;
        if self.depth > MAX_SELECTOR_DEPTH {
            return Err(SelectorError::TooDeep {
                max: MAX_SELECTOR_DEPTH,
                offset: self.i,
            });
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, SelectorError> {
        if self.eat("!") && !self.s[self.i..].starts_with(b"=") {
            self.deeper()?;
            let e = Expr::Not(Box::new(self.unary()?));
            self.depth -= 1;
            return Ok(e);
        }
        if self.eat("(") {
            self.deeper()?;
            let e = self.or()?;
            if !self.eat(")") {
                return self.err("`)`");
            }
            self.depth -= 1;
            return Ok(e);
        }
        if self.eat("all()") {
            return Ok(Expr::All);
        }
        if self.eat("global()") {
            return Ok(Expr::Global);
        }
        if self.eat("has(") {
            let k = self.key()?;
            if !self.eat(")") {
                return self.err("`)`");
            }
            return Ok(Expr::Has(k));
        }
        let k = self.key()?;
        if self.eat("==") {
            return Ok(Expr::Eq(k, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Expr::Ne(k, self.string()?));
        }
        if self.eat("not") {
            if !self.eat("in") {
                return self.err("`in` after `not`");
            }
            return Ok(Expr::NotIn(k, self.set()?));
        }
        if self.eat("in") {
            return Ok(Expr::In(k, self.set()?));
        }
        if self.eat("contains") {
            return Ok(Expr::Contains(k, self.string()?));
        }
        if self.eat("starts") && self.eat("with") {
            return Ok(Expr::StartsWith(k, self.string()?));
        }
        if self.eat("ends") && self.eat("with") {
            return Ok(Expr::EndsWith(k, self.string()?));
        }
        self.err("an operator (==, !=, in, not in, contains, starts with, ends with)")
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"._-/".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        if start == self.i {
            return self.err("a label key");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.ws();
        let Some(&q) = self.s.get(self.i) else {
            return self.err("a quoted string");
        };
        if q != b'\'' && q != b'"' {
            return self.err("a quoted string");
        }
        let start = self.i + 1;
        let Some(len) = self.s[start..].iter().position(|&c| c == q) else {
            return self.err("a closing quote");
        };
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        if !self.eat("{") {
            return self.err("`{`");
        }
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.string()?);
            if self.eat("}") {
                return Ok(out);
            }
            if !self.eat(",") {
                return self.err("`,` or `}`");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_semantics() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let sel: LabelSelector = serde_norway::from_str(
            "{matchLabels: {app: web}, matchExpressions: [{key: env, operator: NotIn, values: [prod]}, {key: tier, operator: Exists}]}",
        )
        .unwrap();
        assert!(sel.matches(&l), "NotIn matches a missing key");
        assert!(LabelSelector::default().matches(&l));
        let bad: LabelSelector =
            serde_norway::from_str("{matchExpressions: [{key: a, operator: In}]}").unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn calico_expressions() {
        let l = labels(&[("role", "web"), ("env", "prod"), ("zone", "eu-west-1a")]);
        let cases = [
            ("", true),
            ("all()", true),
            ("role == 'web'", true),
            ("role == \"db\"", false),
            ("role != 'db' && has(env)", true),
            ("!has(env) || role in {'a', 'web'}", true),
            ("env not in {'prod'}", false),
            ("missing != 'x'", true),
            (
                "zone starts with 'eu-' && zone ends with '1a' && zone contains 'west'",
                true,
            ),
            ("!(role == 'web')", false),
            ("(role == 'db' || env == 'prod') && !has(missing)", true),
        ];
        for (s, want) in cases {
            assert_eq!(Expr::parse(s).unwrap().matches(&l), want, "{s}");
        }
        for bad in [
            "role ==",
            "role = 'x'",
            "has(role",
            "role in {'a' 'b'}",
            "(a == 'b'",
            "a == 'b' junk",
        ] {
            assert!(Expr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nesting_and_length_are_bounded_with_an_error_never_a_crash() {
        // The report's case: ~2,600 parentheses (about 5 KB), parsed on a thread with the default
        // 2 MiB stack, as the Kubernetes source does.
        let deep = format!("{}a == 'b'{}", "(".repeat(2600), ")".repeat(2600));
        let bang = format!("{}has(a)", "!".repeat(2600));
        let r = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || (Expr::parse(&deep), Expr::parse(&bang)))
            .unwrap()
            .join()
            .expect("no stack overflow");
        for e in [r.0, r.1] {
            assert!(
                matches!(
                    e,
                    Err(SelectorError::TooDeep {
                        max: MAX_SELECTOR_DEPTH,
                        ..
                    })
                ),
                "{e:?}"
            );
        }
        // At the limit it parses and matches.
        let ok = format!(
            "{}a == 'b'{}",
            "(".repeat(MAX_SELECTOR_DEPTH),
            ")".repeat(MAX_SELECTOR_DEPTH)
        );
        let l = labels(&[("a", "b")]);
        assert!(Expr::parse(&ok).unwrap().matches(&l));
        // A long flat chain stays one level deep: matching and dropping it use no deep stack.
        let chain = vec!["a == 'b'"; 1000].join(" && ");
        match Expr::parse(&chain).unwrap() {
            Expr::And(terms) => assert_eq!(terms.len(), 1000),
            e => panic!("{e:?}"),
        }
        let long = "a == 'b' || ".repeat(2000) + "has(a)";
        assert!(matches!(
            Expr::parse(&long),
            Err(SelectorError::TooLong { .. })
        ));
    }
}
