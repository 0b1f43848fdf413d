//! A small typed model of the nftables objects svcproxy writes, and its two spellings: the
//! `nft -f` script and libnftables JSON (`nft -j`).
//!
//! Only what the renderer needs is modelled. Keeping it typed (instead of formatting strings in
//! the renderer) is what lets one ruleset be written both ways, and lets the apply layer diff
//! elements and chains as values.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::{Value as Json, json};

use crate::model::Protocol;

/// An nftables table family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }
}

/// A constant in a set element or a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Addr(IpAddr),
    Net(IpNet),
    Proto(Protocol),
    Port(u16),
    Int(u32),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Addr(a) => write!(f, "{a}"),
            Value::Net(n) => write!(f, "{n}"),
            Value::Proto(p) => write!(f, "{p}"),
            Value::Port(p) => write!(f, "{p}"),
            Value::Int(i) => write!(f, "{i}"),
        }
    }
}

impl Value {
    fn json(&self) -> Json {
        match self {
            Value::Addr(a) => json!(a.to_string()),
            Value::Net(n) => {
                json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}})
            }
            Value::Proto(p) => json!(p.as_str()),
            Value::Port(p) => json!(p),
            Value::Int(i) => json!(i),
        }
    }
}

/// Writes `a . b . c` straight into `out` (the script of a large cluster has 100k of these:
/// no intermediate strings).
fn write_concat(out: &mut (impl fmt::Write + ?Sized), values: &[Value]) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.write_str(" . ").unwrap();
        }
        write!(out, "{v}").unwrap();
    }
}

fn concat_json(values: &[Value]) -> Json {
    match values {
        [one] => one.json(),
        many => json!({"concat": many.iter().map(Value::json).collect::<Vec<_>>()}),
    }
}

/// A verdict: where a packet goes next.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

impl Verdict {
    fn json(&self) -> Json {
        match self {
            Verdict::Drop => json!({"drop": null}),
            Verdict::Return => json!({"return": null}),
            Verdict::Jump(c) => json!({"jump": {"target": c}}),
            Verdict::Goto(c) => json!({"goto": {"target": c}}),
        }
    }
}

/// The data of a map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Data {
    Verdict(Verdict),
    /// Two values concatenated (`10.1.0.5 . 8080`: an endpoint), held inline: a large
    /// cluster's endpoint maps have a million of these, and a `Vec` would add an allocation
    /// to each.
    Pair(Value, Value),
}

/// One set or map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    /// Shared: the endpoints of one destination, one element in each slot map, have one key.
    pub key: Arc<[Value]>,
    pub data: Option<Data>,
    pub comment: Option<String>,
}

impl Element {
    pub fn key(key: impl Into<Arc<[Value]>>) -> Element {
        Element {
            key: key.into(),
            data: None,
            comment: None,
        }
    }

    pub fn map(key: impl Into<Arc<[Value]>>, data: Data) -> Element {
        Element {
            key: key.into(),
            data: Some(data),
            comment: None,
        }
    }

    pub fn with_comment(mut self, comment: impl Into<String>) -> Element {
        self.comment = Some(comment.into());
        self
    }

    /// The element as it stands inside `elements = { ... }` or `add element ... { ... }`.
    pub fn text(&self) -> String {
        let mut s = String::new();
        self.write_text(&mut s);
        s
    }

    /// [`Element::text`], appended to `out`.
    pub fn write_text(&self, out: &mut (impl fmt::Write + ?Sized)) {
        write_concat(out, &self.key);
        if let Some(c) = &self.comment {
            write!(out, " comment {}", quote(c)).unwrap();
        }
        match &self.data {
            None => {}
            Some(Data::Verdict(v)) => write!(out, " : {v}").unwrap(),
            Some(Data::Pair(a, b)) => {
                out.write_str(" : ").unwrap();
                write_concat(out, &[*a, *b]);
            }
        }
    }

    /// The key alone (what `delete element` takes), appended to `out`.
    pub fn write_key(&self, out: &mut String) {
        write_concat(out, &self.key);
    }

    fn key_json(&self) -> Json {
        let key = concat_json(&self.key);
        match &self.comment {
            Some(c) => json!({"elem": {"val": key, "comment": clean_comment(c)}}),
            None => key,
        }
    }

    fn json(&self) -> Json {
        match &self.data {
            None => self.key_json(),
            Some(Data::Verdict(v)) => json!([self.key_json(), v.json()]),
            Some(Data::Pair(a, b)) => json!([self.key_json(), concat_json(&[*a, *b])]),
        }
    }
}

/// A named set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    /// The key's type: named types, concatenated (`ipv4_addr . inet_proto . inet_service`).
    pub key: Vec<&'static str>,
    /// `None` for a set; the data type for a map (`verdict` for a verdict map).
    pub data: Option<Vec<&'static str>>,
    pub flags: Vec<&'static str>,
    /// Default element timeout in seconds (dynamic sets).
    pub timeout: Option<u32>,
    pub comment: Option<String>,
    pub elements: Vec<Element>,
}

impl Set {
    pub fn new(
        name: impl Into<String>,
        key: Vec<&'static str>,
        data: Option<Vec<&'static str>>,
    ) -> Set {
        Set {
            name: name.into(),
            key,
            data,
            flags: Vec::new(),
            timeout: None,
            comment: None,
            elements: Vec::new(),
        }
    }

    pub fn is_map(&self) -> bool {
        self.data.is_some()
    }

    /// `set` or `map`, as nft's commands say.
    pub fn keyword(&self) -> &'static str {
        if self.is_map() { "map" } else { "set" }
    }

    /// The declaration without elements: `{ type ...; flags ...; }` on one line.
    pub fn declaration(&self) -> String {
        let mut s = String::new();
        let ty = match &self.data {
            None => format!("type {}", self.key.join(" . ")),
            Some(d) => format!("type {} : {}", self.key.join(" . "), d.join(" . ")),
        };
        s.push_str(&ty);
        if !self.flags.is_empty() {
            write!(s, "; flags {}", self.flags.join(",")).unwrap();
        }
        if let Some(t) = self.timeout {
            write!(s, "; timeout {t}s").unwrap();
        }
        if let Some(c) = &self.comment {
            write!(s, "; comment {}", quote(c)).unwrap();
        }
        s
    }
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `nat` or `filter`.
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
}

/// A chain and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
    pub comment: Option<String>,
    pub rules: Vec<Rule>,
}

impl Chain {
    pub fn new(name: impl Into<String>) -> Chain {
        Chain {
            name: name.into(),
            hook: None,
            comment: None,
            rules: Vec::new(),
        }
    }

    pub fn base(
        name: impl Into<String>,
        kind: &'static str,
        hook: &'static str,
        priority: i32,
    ) -> Chain {
        Chain {
            hook: Some(Hook {
                kind,
                hook,
                priority,
            }),
            ..Chain::new(name)
        }
    }

    pub fn with_comment(mut self, comment: impl Into<String>) -> Chain {
        self.comment = Some(comment.into());
        self
    }

    pub fn rule(mut self, stmts: Vec<Stmt>) -> Chain {
        self.rules.push(Rule { stmts });
        self
    }
}

/// A rule: statements evaluated left to right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
}

/// An expression inside a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// A packet header field: (`ip`, `daddr`), (`th`, `dport`).
    Payload(&'static str, &'static str),
    Meta(&'static str),
    /// `ct state` / `ct status`.
    Ct(&'static str),
    /// `fib daddr type` / `fib saddr type`.
    FibType(&'static str),
    Numgen(u32),
    Concat(Vec<Expr>),
    /// `meta mark & MASK`.
    MarkAnd(u32),
    Value(Value),
    /// A keyword on the right of a match (`local`, `new`, `dnat`).
    Keyword(&'static str),
    /// An anonymous set of constants.
    AnonSet(Vec<Value>),
    /// A named set or map (`@name`).
    SetRef(String),
    /// A string constant (an interface name; a trailing `*` is nft's prefix wildcard).
    Str(String),
}

impl Expr {
    pub fn ip(family: Family, field: &'static str) -> Expr {
        Expr::Payload(family.as_str(), field)
    }

    pub fn dport() -> Expr {
        Expr::Payload("th", "dport")
    }

    pub fn l4proto() -> Expr {
        Expr::Meta("l4proto")
    }

    pub fn set(name: &str) -> Expr {
        Expr::SetRef(name.to_string())
    }

    fn text(&self) -> String {
        match self {
            Expr::Payload(p, f) => format!("{p} {f}"),
            Expr::Meta(k) => format!("meta {k}"),
            Expr::Ct(k) => format!("ct {k}"),
            Expr::FibType(f) => format!("fib {f} type"),
            Expr::Numgen(m) => format!("numgen random mod {m}"),
            Expr::Concat(parts) => parts.iter().map(Expr::text).collect::<Vec<_>>().join(" . "),
            Expr::MarkAnd(m) => format!("meta mark & {m:#010x}"),
            Expr::Value(v) => v.to_string(),
            Expr::Keyword(k) => k.to_string(),
            Expr::AnonSet(vs) => format!(
                "{{ {} }}",
                vs.iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Expr::SetRef(n) => format!("@{n}"),
            Expr::Str(v) => format!("\"{v}\""),
        }
    }

    fn json(&self) -> Json {
        match self {
            Expr::Payload(p, f) => json!({"payload": {"protocol": p, "field": f}}),
            Expr::Meta(k) => json!({"meta": {"key": k}}),
            Expr::Ct(k) => json!({"ct": {"key": k}}),
            Expr::FibType(f) => json!({"fib": {"result": "type", "flags": [f]}}),
            Expr::Numgen(m) => json!({"numgen": {"mode": "random", "mod": m, "offset": 0}}),
            Expr::Concat(parts) => {
                json!({"concat": parts.iter().map(Expr::json).collect::<Vec<_>>()})
            }
            Expr::MarkAnd(m) => json!({"&": [{"meta": {"key": "mark"}}, m]}),
            Expr::Value(v) => v.json(),
            Expr::Keyword(k) => json!(k),
            Expr::AnonSet(vs) => json!({"set": vs.iter().map(Value::json).collect::<Vec<_>>()}),
            Expr::SetRef(n) => json!(format!("@{n}")),
            Expr::Str(v) => json!(v),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    /// A flag test (`ct state new`): implicit in text, `in` in JSON.
    Has,
}

/// How a rejected packet is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    TcpReset,
    /// ICMP (ICMPv6) port unreachable.
    PortUnreachable,
}

/// Where `dnat` sends a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatTo {
    /// The address and port found by looking `key` up in a map whose data is `addr . port`.
    Map {
        key: Expr,
        map: String,
    },
    Addr(SocketAddr),
}

/// A statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    Match {
        left: Expr,
        op: Op,
        right: Expr,
    },
    Verdict(Verdict),
    /// A verdict map lookup: a named map, or inline `{ value : verdict, ... }`.
    Vmap {
        key: Expr,
        map: String,
    },
    VmapInline {
        key: Expr,
        entries: Vec<(Value, Verdict)>,
    },
    Dnat {
        family: Family,
        to: NatTo,
    },
    Masquerade {
        fully_random: bool,
    },
    Reject(Family, Reject),
    /// `meta mark set meta mark | MASK`.
    MarkOr(u32),
    /// `meta mark set meta mark ^ MASK`.
    MarkXor(u32),
    /// `update @set { key }`: add the key, or refresh its timeout.
    Update {
        set: String,
        key: Expr,
    },
    Comment(String),
}

impl Stmt {
    pub fn eq(left: Expr, right: Expr) -> Stmt {
        Stmt::Match {
            left,
            op: Op::Eq,
            right,
        }
    }

    pub fn ne(left: Expr, right: Expr) -> Stmt {
        Stmt::Match {
            left,
            op: Op::Ne,
            right,
        }
    }

    pub fn goto(chain: impl Into<String>) -> Stmt {
        Stmt::Verdict(Verdict::Goto(chain.into()))
    }

    pub fn jump(chain: impl Into<String>) -> Stmt {
        Stmt::Verdict(Verdict::Jump(chain.into()))
    }

    fn text(&self) -> String {
        match self {
            Stmt::Match { left, op, right } => {
                let op = match (op, left) {
                    (Op::Ne, _) => " != ",
                    (Op::Eq, Expr::MarkAnd(_)) => " == ",
                    _ => " ",
                };
                format!("{}{op}{}", left.text(), right.text())
            }
            Stmt::Verdict(v) => v.to_string(),
            Stmt::Vmap { key, map } => format!("{} vmap @{map}", key.text()),
            Stmt::VmapInline { key, entries } => format!(
                "{} vmap {{ {} }}",
                key.text(),
                entries
                    .iter()
                    .map(|(v, verdict)| format!("{v} : {verdict}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Stmt::Dnat { family, to } => match to {
                NatTo::Map { key, map } => {
                    format!("dnat {} to {} map @{map}", family.as_str(), key.text())
                }
                NatTo::Addr(sa) => format!("dnat {} to {sa}", family.as_str()),
            },
            Stmt::Masquerade { fully_random } => {
                if *fully_random {
                    "masquerade fully-random".into()
                } else {
                    "masquerade".into()
                }
            }
            Stmt::Reject(_, Reject::TcpReset) => "meta l4proto tcp reject with tcp reset".into(),
            Stmt::Reject(Family::Ip, Reject::PortUnreachable) => {
                "reject with icmp type port-unreachable".into()
            }
            Stmt::Reject(Family::Ip6, Reject::PortUnreachable) => {
                "reject with icmpv6 type port-unreachable".into()
            }
            Stmt::MarkOr(m) => format!("meta mark set meta mark | {m:#010x}"),
            Stmt::MarkXor(m) => format!("meta mark set meta mark ^ {m:#010x}"),
            Stmt::Update { set, key } => format!("update @{set} {{ {} }}", key.text()),
            Stmt::Comment(c) => format!("comment {}", quote(c)),
        }
    }

    /// The statement as libnftables JSON expressions (a text statement can be two in JSON).
    fn json(&self, out: &mut Vec<Json>) {
        let j = match self {
            Stmt::Match { left, op, right } => {
                let op = match op {
                    Op::Eq => "==",
                    Op::Ne => "!=",
                    Op::Has => "in",
                };
                json!({"match": {"op": op, "left": left.json(), "right": right.json()}})
            }
            Stmt::Verdict(v) => v.json(),
            Stmt::Vmap { key, map } => {
                json!({"vmap": {"key": key.json(), "data": format!("@{map}")}})
            }
            Stmt::VmapInline { key, entries } => json!({"vmap": {"key": key.json(), "data": {"set":
                entries.iter().map(|(v, verdict)| json!([v.json(), verdict.json()])).collect::<Vec<_>>()}}}),
            Stmt::Dnat { family, to } => match to {
                NatTo::Map { key, map } => json!({"dnat": {"family": family.as_str(),
                    "addr": {"map": {"key": key.json(), "data": format!("@{map}")}}}}),
                NatTo::Addr(sa) => {
                    json!({"dnat": {"family": family.as_str(), "addr": sa.ip().to_string(), "port": sa.port()}})
                }
            },
            Stmt::Masquerade { fully_random } => {
                if *fully_random {
                    json!({"masquerade": {"flags": "fully-random"}})
                } else {
                    json!({"masquerade": null})
                }
            }
            Stmt::Reject(_, Reject::TcpReset) => {
                out.push(json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}));
                json!({"reject": {"type": "tcp reset"}})
            }
            Stmt::Reject(Family::Ip, Reject::PortUnreachable) => {
                json!({"reject": {"type": "icmp", "expr": "port-unreachable"}})
            }
            Stmt::Reject(Family::Ip6, Reject::PortUnreachable) => {
                json!({"reject": {"type": "icmpv6", "expr": "port-unreachable"}})
            }
            Stmt::MarkOr(m) => {
                json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, m]}}})
            }
            Stmt::MarkXor(m) => {
                json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, m]}}})
            }
            Stmt::Update { set, key } => {
                json!({"set": {"op": "update", "elem": key.json(), "set": format!("@{set}")}})
            }
            Stmt::Comment(_) => return, // carried as the rule's "comment" field
        };
        out.push(j);
    }
}

impl Rule {
    pub fn text(&self) -> String {
        self.stmts
            .iter()
            .map(Stmt::text)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One set or map of a table block, its elements included.
fn write_set(s: &mut impl ScriptOut, set: &Set) {
    writeln!(s, "\n\t{} {} {{", set.keyword(), set.name).unwrap();
    for part in set.declaration().split("; ") {
        writeln!(s, "\t\t{part}").unwrap();
    }
    if !set.elements.is_empty() {
        writeln!(s, "\t\telements = {{").unwrap();
        let n = set.elements.len();
        for (i, e) in set.elements.iter().enumerate() {
            s.write_str("\t\t\t").unwrap();
            e.write_text(s);
            s.write_str(if i + 1 < n { ",\n" } else { "\n" }).unwrap();
            s.safe_point();
        }
        writeln!(s, "\t\t}}").unwrap();
    }
    writeln!(s, "\t}}").unwrap();
}

/// Every script's first lines.
fn write_script_start(s: &mut impl ScriptOut) {
    s.write_str("#!/usr/sbin/nft -f\n# svcproxy ruleset: generated, do not edit.\n")
        .unwrap();
}

/// Where a script is written: a `String`, or [`Spill`] (a pipe to nft).
pub trait ScriptOut: fmt::Write {
    /// Here, inside a table's `{ }` block, the script so far may be handed on. A script cut
    /// at such a place (its writer died) is a syntax error to nft, and nft parses the whole
    /// input before it sends the kernel anything, so a cut script changes nothing: between two
    /// commands it could have been a whole, shorter transaction (`delete table` and no more).
    fn safe_point(&mut self) {}
}

impl ScriptOut for String {}

/// A [`ScriptOut`] that hands the script on to `out` in parts of at least [`Spill::PART`]
/// bytes, each ending at a safe point, so that a whole sync's script (40 MiB at 10k Services,
/// 400 MiB at 100k) is never held whole. An error of `out` (nft gone) is kept and ends the
/// writing; nft's own answer says why.
pub struct Spill<'a> {
    buf: String,
    out: &'a mut dyn std::io::Write,
    written: usize,
    error: Option<std::io::Error>,
}

impl<'a> Spill<'a> {
    /// The smallest part handed on.
    pub const PART: usize = 1 << 16;

    pub fn new(out: &'a mut dyn std::io::Write) -> Spill<'a> {
        Spill {
            buf: String::with_capacity(2 * Spill::PART),
            out,
            written: 0,
            error: None,
        }
    }

    fn hand_on(&mut self) {
        if self.error.is_none()
            && let Err(e) = self.out.write_all(self.buf.as_bytes())
        {
            self.error = Some(e);
        }
        self.written += self.buf.len();
        self.buf.clear();
    }

    /// Hands on the rest: the script's bytes, or the error that stopped it.
    pub fn finish(mut self) -> std::io::Result<usize> {
        self.hand_on();
        match self.error.take() {
            Some(e) => Err(e),
            None => self.out.flush().map(|()| self.written),
        }
    }
}

impl fmt::Write for Spill<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.buf.push_str(s);
        Ok(())
    }
}

impl ScriptOut for Spill<'_> {
    fn safe_point(&mut self) {
        if self.buf.len() >= Spill::PART {
            self.hand_on();
        }
    }
}

/// A table and everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub comment: Option<String>,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

/// The complete ruleset: svcproxy's tables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

/// The longest comment nft accepts (bytes).
const MAX_COMMENT: usize = 127;

/// A comment as nft takes it: printable ASCII without quotes (anything else becomes `_`), cut
/// to nft's limit. Kubernetes names are ASCII already; this only guards against the unexpected.
pub(crate) fn clean_comment(s: &str) -> String {
    s.chars()
        .take(MAX_COMMENT)
        .map(|c| {
            if c == '"' || c == '\\' || !c.is_ascii() || c.is_ascii_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// A comment, quoted for the nft script.
pub(crate) fn quote(s: &str) -> String {
    format!("\"{}\"", clean_comment(s))
}

impl Table {
    /// The table as an `nft -f` block.
    pub fn text(&self) -> String {
        let mut s = String::new();
        self.write_text(&mut s);
        s
    }

    /// [`Table::text`], appended to `s`.
    pub fn write_text(&self, s: &mut impl ScriptOut) {
        self.write_head(s);
        for set in &self.sets {
            write_set(s, set);
        }
        self.write_chains(s);
    }

    /// [`Table::write_text`], freeing each set's elements once they are written.
    fn drain_text(&mut self, s: &mut impl ScriptOut) {
        self.write_head(s);
        for set in &mut self.sets {
            write_set(s, set);
            set.elements = Vec::new();
        }
        self.write_chains(s);
    }

    fn write_head(&self, s: &mut impl ScriptOut) {
        writeln!(s, "table {} {} {{", self.family.as_str(), self.name).unwrap();
        if let Some(c) = &self.comment {
            writeln!(s, "\tcomment {}", quote(c)).unwrap();
        }
    }

    fn write_chains(&self, s: &mut impl ScriptOut) {
        for chain in &self.chains {
            writeln!(s, "\n\tchain {} {{", chain.name).unwrap();
            if let Some(c) = &chain.comment {
                writeln!(s, "\t\tcomment {}", quote(c)).unwrap();
            }
            if let Some(h) = &chain.hook {
                writeln!(
                    s,
                    "\t\ttype {} hook {} priority {}; policy accept;",
                    h.kind, h.hook, h.priority
                )
                .unwrap();
            }
            for rule in &chain.rules {
                writeln!(s, "\t\t{}", rule.text()).unwrap();
                s.safe_point();
            }
            writeln!(s, "\t}}").unwrap();
        }
        s.write_str("}\n").unwrap();
    }

    /// The table's objects as libnftables JSON, in the form `nft -j list table` prints them.
    ///
    /// Spelled by hand rather than with the `nftables` crate's schema types, because they do
    /// not cover every object we render (nftables 0.6.3, the newest): a map's data type is a
    /// `SetType` with no `verdict` and no concatenation (so neither the verdict maps nor the
    /// `ipv4_addr . inet_service` endpoint maps can be written), `NAT` flags cannot spell
    /// `masquerade fully-random` as nft does, and `Table` and `Chain` carry no comment. The
    /// same gaps keep `svcproxy verify` from parsing the kernel's listing with them
    /// (`src/verify.rs`).
    pub fn json(&self, out: &mut Vec<Json>) {
        self.json_each(usize::MAX, &mut |o| out.push(o));
    }

    /// [`Table::json`], one object at a time, and a set with more than `chunk` elements as
    /// several objects of `chunk` elements each (the same declaration repeated): at 100k
    /// Services the whole table as JSON values is gigabytes, and one endpoint map tens of MiB;
    /// `svcproxy verify` (the agent's drift check) reads them one at a time.
    pub fn json_each(&self, chunk: usize, f: &mut dyn FnMut(Json)) {
        let family = self.family.as_str();
        let mut table = json!({"family": family, "name": self.name});
        if let Some(c) = &self.comment {
            table["comment"] = json!(clean_comment(c));
        }
        f(json!({"table": table}));
        for set in &self.sets {
            let types = |names: &[&str]| -> Json {
                match names {
                    [one] => json!(one),
                    many => json!(many),
                }
            };
            let mut o = json!({"family": family, "name": set.name, "table": self.name, "type": types(&set.key)});
            if let Some(d) = &set.data {
                o["map"] = json!(d.join(" . "));
            }
            // nft's JSON has no "dynamic" flag (it lists and parses dynamic sets by "timeout").
            let flags: Vec<&str> = set
                .flags
                .iter()
                .copied()
                .filter(|f| *f != "dynamic")
                .collect();
            if !flags.is_empty() {
                o["flags"] = json!(flags);
            }
            if let Some(t) = set.timeout {
                o["timeout"] = json!(t);
            }
            if let Some(c) = &set.comment {
                o["comment"] = json!(clean_comment(c));
            }
            if set.elements.is_empty() {
                f(json!({ set.keyword(): o }));
            }
            for part in set.elements.chunks(chunk.max(1)) {
                let mut o = o.clone();
                o["elem"] = json!(part.iter().map(Element::json).collect::<Vec<_>>());
                f(json!({ set.keyword(): o }));
            }
        }
        for chain in &self.chains {
            let mut o = json!({"family": family, "table": self.name, "name": chain.name});
            if let Some(h) = &chain.hook {
                o["type"] = json!(h.kind);
                o["hook"] = json!(h.hook);
                o["prio"] = json!(h.priority);
                o["policy"] = json!("accept");
            }
            if let Some(c) = &chain.comment {
                o["comment"] = json!(clean_comment(c));
            }
            f(json!({"chain": o}));
        }
        for chain in &self.chains {
            for rule in &chain.rules {
                let mut expr = Vec::new();
                let mut comment = None;
                for stmt in &rule.stmts {
                    if let Stmt::Comment(c) = stmt {
                        comment = Some(c.clone());
                    }
                    stmt.json(&mut expr);
                }
                let mut o = json!({"family": family, "table": self.name, "chain": chain.name, "expr": expr});
                if let Some(c) = comment {
                    o["comment"] = json!(clean_comment(&c));
                }
                f(json!({"rule": o}));
            }
        }
    }
}

impl Ruleset {
    /// How many set and map elements the tables hold.
    pub fn element_count(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.sets)
            .map(|s| s.elements.len())
            .sum()
    }

    /// The whole ruleset as an `nft -f` script that replaces svcproxy's tables atomically: each
    /// table is created if missing, deleted, and written anew, all in one transaction.
    pub fn script(&self) -> String {
        let mut s = String::with_capacity(4096 + self.element_count() * 64);
        self.write_script_head(&mut s);
        for t in &self.tables {
            s.push('\n');
            t.write_text(&mut s);
        }
        s
    }

    /// [`Ruleset::script`] written to `out`, freeing each set's elements once written, so that
    /// the ruleset and its script are never both whole in memory (at 100k Services each is
    /// hundreds of MiB), and with a [`Spill`] the script is never whole either.
    pub fn drain_script(mut self, out: &mut impl ScriptOut) {
        self.write_script_head(out);
        for t in &mut self.tables {
            out.write_str("\n").unwrap();
            t.drain_text(out);
        }
    }

    /// A replacing script's first lines: each table created if missing, then deleted.
    fn write_script_head(&self, s: &mut impl ScriptOut) {
        write_script_start(s);
        for t in &self.tables {
            writeln!(s, "table {} {}", t.family.as_str(), t.name).unwrap();
            writeln!(s, "delete table {} {}", t.family.as_str(), t.name).unwrap();
        }
    }

    /// How many chains the tables have.
    pub fn chain_count(&self) -> usize {
        self.tables.iter().map(|t| t.chains.len()).sum()
    }

    /// A script that turns `old` (what svcproxy applied last; the kernel holds it unless someone
    /// changed it) into `self` without deleting the tables: every rule and every static element
    /// is written anew, but the dynamic sets (ClientIP session affinity: which client uses
    /// which endpoint) keep what the kernel learned. `old` need not have its elements (a
    /// [`crate::nft::render::skeleton`]): only its chains and sets are read. Written to `out`,
    /// each set's elements freed once written, as [`Ruleset::drain_script`] does. Only for an
    /// `old` that [`Ruleset::refreshes`]: when a table, a set's declaration or a chain's hook or
    /// comment changed, only a replacing script will do. If the kernel drifted from `old` (a
    /// chain or set deleted by someone), nft refuses this script, atomically, and the caller
    /// falls back to a replacing one.
    pub fn drain_refresh_script(mut self, old: &Ruleset, out: &mut impl ScriptOut) {
        debug_assert!(self.refreshes(old));
        write_script_start(out);
        for (o, n) in old.tables.iter().zip(&mut self.tables) {
            let prefix = format!("{} {}", n.family.as_str(), n.name);
            let new_sets: std::collections::HashSet<&str> =
                n.sets.iter().map(|x| x.name.as_str()).collect();
            let new_chains: std::collections::HashSet<&str> =
                n.chains.iter().map(|c| c.name.as_str()).collect();
            for c in &o.chains {
                writeln!(out, "flush chain {prefix} {}", c.name).unwrap();
            }
            for set in o.sets.iter().filter(|x| !x.flags.contains(&"dynamic")) {
                writeln!(out, "flush {} {prefix} {}", set.keyword(), set.name).unwrap();
            }
            for c in o
                .chains
                .iter()
                .filter(|c| !new_chains.contains(c.name.as_str()))
            {
                writeln!(out, "delete chain {prefix} {}", c.name).unwrap();
            }
            for set in o
                .sets
                .iter()
                .filter(|x| !new_sets.contains(x.name.as_str()))
            {
                writeln!(out, "delete {} {prefix} {}", set.keyword(), set.name).unwrap();
            }
            out.write_str("\n").unwrap();
            n.drain_text(out);
        }
    }

    /// Whether `old`'s tables can be refreshed in place into these: the same tables, and no
    /// chain or set that both have declared differently.
    pub fn refreshes(&self, old: &Ruleset) -> bool {
        old.tables.len() == self.tables.len()
            && old.tables.iter().zip(&self.tables).all(|(o, n)| {
                let new_sets: std::collections::HashMap<&str, &Set> =
                    n.sets.iter().map(|x| (x.name.as_str(), x)).collect();
                let new_chains: std::collections::HashMap<&str, &Chain> =
                    n.chains.iter().map(|c| (c.name.as_str(), c)).collect();
                (o.family, &o.name, &o.comment) == (n.family, &n.name, &n.comment)
                    && o.chains.iter().all(|c| {
                        new_chains
                            .get(c.name.as_str())
                            .is_none_or(|nc| nc.hook == c.hook && nc.comment == c.comment)
                    })
                    && o.sets.iter().all(|set| {
                        new_sets.get(set.name.as_str()).is_none_or(|ns| {
                            ns.keyword() == set.keyword() && ns.declaration() == set.declaration()
                        })
                    })
            })
    }

    /// The whole ruleset as libnftables JSON, in the form `nft -j list ruleset` prints it.
    pub fn json(&self) -> Json {
        let mut objects = vec![json!({"metainfo": {"json_schema_version": 1}})];
        for t in &self.tables {
            t.json(&mut objects);
        }
        json!({ "nftables": objects })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records where [`Spill`] cut the script.
    #[derive(Default)]
    struct Parts(Vec<Vec<u8>>);

    impl std::io::Write for Parts {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_spilled_script_is_the_whole_script_cut_only_inside_a_block() {
        let plan = crate::plan::plan(
            &crate::synthetic::cluster(3000, 10),
            &crate::model::ProxyConfig::default(),
        );
        let ruleset = crate::nft::render(&plan);
        let whole = ruleset.script();
        let mut parts = Parts::default();
        let mut spill = Spill::new(&mut parts);
        ruleset.drain_script(&mut spill);
        assert_eq!(spill.finish().unwrap(), whole.len());
        assert!(parts.0.len() > 10, "{} parts", parts.0.len());
        assert_eq!(parts.0.concat(), whole.as_bytes());
        // Every cut but the last leaves a block open: nft reads that as a syntax error and
        // applies nothing, whatever stopped the writer there.
        let mut sent = 0;
        for part in &parts.0[..parts.0.len() - 1] {
            sent += part.len();
            let prefix = &whole[..sent];
            assert!(
                prefix.matches('{').count() > prefix.matches('}').count(),
                "a cut outside every block at byte {sent}"
            );
        }
    }

    #[test]
    fn a_failed_pipe_is_reported_and_ends_the_writing() {
        struct Broken(usize);
        impl std::io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                self.0 += 1;
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let plan = crate::plan::plan(
            &crate::synthetic::cluster(1000, 10),
            &crate::model::ProxyConfig::default(),
        );
        let mut broken = Broken(0);
        let mut spill = Spill::new(&mut broken);
        crate::nft::render(&plan).drain_script(&mut spill);
        let e = spill.finish().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(broken.0, 1, "it went on writing after the pipe failed");
    }
}
