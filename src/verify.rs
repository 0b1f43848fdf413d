//! `svcproxy verify`: what the kernel holds of svcproxy's tables, compared with what the plan
//! says must be there, every difference in words and named after its Service.
//!
//! The comparison is pure: [`compare_nft`] and [`compare_iptables`] take the desired and the
//! observed rulesets, both already in the normalised forms below ([`NftState`],
//! [`IptState`]); only reading the kernel ([`read_nft`], [`read_iptables`]) runs a program,
//! through the backends' own command runners.
//!
//! # Normalisation, and why
//! The kernel prints back what it was given in its own words; two rulesets compare equal here
//! when they are equal after a fresh apply (the first test of this module's scenario tests is
//! exactly that). nftables (JSON of `nft -j list table`, both sides: the desired side is our own
//! [`crate::nft::Ruleset::json`]):
//! * set and map elements are compared as sets (the kernel lists them in hash order), keyed by
//!   their key; a `/32` (`/128`) prefix in an interval set lists as the bare address;
//! * the elements of dynamic sets (ClientIP affinity: which client went where) are the kernel's
//!   to learn, and are not compared; their declarations are;
//! * table and chain comments are not compared (nft 1.0.6 does not list them in JSON), nor a
//!   set's `size` (the kernel's default for dynamic sets) or handles;
//! * in rules, the `meta l4proto tcp` we write before `reject with tcp reset` is nft's implicit
//!   dependency and is listed without it; `dnat ip to` lists without its family; the members of
//!   an anonymous set are compared in any order.
//!
//! iptables (`*-save`, svcproxy's `SVCP-` chains and the jump rules into them): a rule is
//! compared as its options, the way iptables-save prints them back: `-s`/`-d` with a prefix
//! length, the fields (`-p`, `-s`, …) in any order before the matches, each match's options in
//! any order and without the defaults iptables adds (`recent --mask … --rsource`), a
//! `statistic` probability to 6 decimals (the kernel keeps it as a fraction of 2³²), and
//! `MARK --or-mark M` / `--xor-mark M` as the `--set-xmark M/M` / `M/0` they list as.
//!
//! # Why not the `nftables` crate's schema types
//! The issue asks for them; nftables 0.6.3 (the newest) cannot parse what svcproxy's tables
//! hold: a map's data type is a `SetType` without `verdict`, and it cannot take nft's
//! concatenated `"map": "ipv4_addr . inet_service"` (so none of the verdict maps nor the
//! endpoint maps parse), its `masquerade` flags do not take nft's `"fully-random"`, and its
//! `Table` and `Chain` have no comment. The JSON is read with `serde_json` instead, in the
//! schema libnftables documents (`libnftables-json(5)`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value as Json;

use crate::iptables;
use crate::model::IpFamily;

/// One difference between the kernel and the plan.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    /// What differs, in words (`table ip svcproxy: map services: element … is missing`).
    pub what: String,
    /// The Service (`namespace/name:port`, as the ruleset's comments name it) the thing belongs
    /// to, when one can be told.
    pub service: Option<String>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if let Some(s) = &self.service {
            write!(f, " (Service {s})")?;
        }
        Ok(())
    }
}

/// The kernel could not be read, or did not answer in a form we know.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Nft(#[from] crate::nft::apply::ApplyError),
    #[error(transparent)]
    Iptables(#[from] crate::iptables::IptablesError),
    #[error("reading nft's JSON: {0}")]
    Json(String),
    #[error("{0} is not installed")]
    NotInstalled(String),
}

/// The Service a comment names: its first word when that is `namespace/name[:port]`.
fn service_of(comment: &str) -> Option<String> {
    let first = comment.split_whitespace().next()?;
    let first = first.trim_end_matches(':');
    (first.contains('/') && !first.starts_with("svcproxy")).then(|| first.to_string())
}

/// Who owns each chain: the one Service whose elements or rules lead to it (directly, or
/// through chains it owns). A chain reached from several Services (shared ones such as
/// `endpoints-of-2`) has no owner.
fn owners(edges: &[(Option<String>, String, String)]) -> BTreeMap<String, String> {
    // edges: (service named at the edge, from chain ("" for a map element), to chain)
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for _ in 0..4 {
        let mut changed = false;
        for (svc, from, to) in edges {
            let via = match svc {
                Some(s) => Some(BTreeSet::from([s.clone()])),
                None => seen.get(from).cloned(),
            };
            if let Some(v) = via {
                let e = seen.entry(to.clone()).or_default();
                let n = e.len();
                e.extend(v);
                changed |= e.len() != n;
            }
        }
        if !changed {
            break;
        }
    }
    seen.into_iter()
        .filter(|(_, s)| s.len() == 1)
        .map(|(c, s)| (c, s.into_iter().next().unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// nftables

/// svcproxy's nftables tables, normalised for comparison.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NftState {
    /// By `(family, name)`.
    pub tables: BTreeMap<(String, String), NftTable>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NftTable {
    pub sets: BTreeMap<String, NftSet>,
    pub chains: BTreeMap<String, NftChain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSet {
    /// `set` or `map`.
    pub keyword: String,
    /// `type … [: …]; flags …; timeout …`.
    pub declaration: String,
    /// Elements the kernel adds itself (dynamic sets): not compared.
    pub dynamic: bool,
    /// By key, in words.
    pub elements: BTreeMap<String, NftElement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NftElement {
    /// A map element's data, in words.
    pub data: Option<String>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    /// `type nat hook prerouting priority -100`, empty for a regular chain.
    pub declaration: String,
    /// The chain's comment (the desired side only: nft 1.0.6 does not list it).
    pub comment: Option<String>,
    pub rules: Vec<NftRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    /// The normalised statements, as compact JSON: what is compared.
    pub canonical: String,
    /// The statements, in nft's words.
    pub text: String,
    pub comment: Option<String>,
    /// Chains it jumps or goes to.
    pub targets: Vec<String>,
}

fn json_err(what: impl fmt::Display) -> VerifyError {
    VerifyError::Json(what.to_string())
}

/// Reads `{"nftables": [...]}` documents (one per table, as `nft -j list table` prints, or our
/// whole ruleset) into an [`NftState`].
pub fn nft_state(docs: &[Json]) -> Result<NftState, VerifyError> {
    let mut state = NftState::default();
    for doc in docs {
        let objects = doc["nftables"]
            .as_array()
            .ok_or_else(|| json_err("no \"nftables\" array"))?;
        for o in objects {
            nft_object(&mut state, o)?;
        }
    }
    Ok(state)
}

/// Adds one object of an `nftables` array (a table, set, map, chain or rule) to `state`.
fn nft_object(state: &mut NftState, o: &Json) -> Result<(), VerifyError> {
    let Some((kind, body)) = o.as_object().and_then(|m| m.iter().next()) else {
        return Ok(());
    };
    let s = |k: &str| body[k].as_str().unwrap_or_default().to_string();
    let key = (
        s("family"),
        s(if kind == "table" { "name" } else { "table" }),
    );
    match kind.as_str() {
        "table" => {
            state.tables.entry(key).or_default();
        }
        "set" | "map" => {
            let set = nft_set(kind, body)?;
            add_set(state, key, s("name"), set);
        }
        "chain" => {
            let declaration = match body["hook"].as_str() {
                Some(h) => format!(
                    "type {} hook {h} priority {} policy {}",
                    s("type"),
                    body["prio"],
                    body["policy"].as_str().unwrap_or("accept")
                ),
                None => String::new(),
            };
            let chain = state
                .tables
                .entry(key)
                .or_default()
                .chains
                .entry(s("name"))
                .or_insert_with(|| NftChain {
                    declaration: String::new(),
                    comment: None,
                    rules: Vec::new(),
                });
            chain.declaration = declaration;
            chain.comment = body["comment"].as_str().map(String::from);
        }
        "rule" => {
            let rule = nft_rule(body)?;
            state
                .tables
                .entry(key)
                .or_default()
                .chains
                .entry(s("chain"))
                .or_insert_with(|| NftChain {
                    declaration: String::new(),
                    comment: None,
                    rules: Vec::new(),
                })
                .rules
                .push(rule);
        }
        _ => {}
    }
    Ok(())
}

/// Adds a set to `state`, or its elements to the set already there: both sides hand a large set
/// on in parts ([`crate::nft::Table::json_each`], [`read_nft_doc`]).
fn add_set(state: &mut NftState, table: (String, String), name: String, set: NftSet) {
    let sets = &mut state.tables.entry(table).or_default().sets;
    match sets.get_mut(&name) {
        Some(have) if (&have.keyword, &have.declaration) == (&set.keyword, &set.declaration) => {
            have.elements.extend(set.elements);
        }
        _ => {
            sets.insert(name, set);
        }
    }
}

/// Reads one `nft -j list` document object by object as nft prints it, handing each to `sink`:
/// the kernel's listing of a large table is tens of MiB of JSON, and as one `serde_json::Value`
/// ten times that (at 10k Services the agent's hourly drift check peaked at 450 MiB above its
/// steady state). Only one object, or [`CHUNK`] elements of a set, is a `Value` at a time.
fn read_nft_doc(input: &mut dyn std::io::Read, sink: &mut Sink<'_>) -> Result<(), VerifyError> {
    use serde::de::{DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess};

    /// Each reader's `DeserializeSeed`: the map or sequence it reads, read with itself.
    macro_rules! seed {
        ($reader:ident, $read:ident) => {
            impl<'de> DeserializeSeed<'de> for $reader<'_, '_> {
                type Value = ();
                fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                    d.$read(self)
                }
            }
        };
    }

    struct Doc<'a, 'b>(&'a mut Sink<'b>);
    struct Objects<'a, 'b>(&'a mut Sink<'b>);

    seed!(Doc, deserialize_map);
    impl<'de> serde::de::Visitor<'de> for Doc<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an nft JSON document")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = false;
            while let Some(key) = map.next_key::<String>()? {
                if key == "nftables" {
                    map.next_value_seed(Objects(&mut *self.0))?;
                    seen = true;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if seen {
                Ok(())
            } else {
                Err(A::Error::custom("no \"nftables\" array"))
            }
        }
    }
    seed!(Objects, deserialize_seq);
    impl<'de> serde::de::Visitor<'de> for Objects<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of nft objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Object(&mut *self.0))?.is_some() {}
            Ok(())
        }
    }

    /// One object; a set or map is handed on in parts of [`CHUNK`] elements (nft lists
    /// `elem` last, after the declaration).
    struct Object<'a, 'b>(&'a mut Sink<'b>);
    seed!(Object, deserialize_map);
    impl<'de> serde::de::Visitor<'de> for Object<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an nft object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(kind) = map.next_key::<String>()? {
                if kind == "set" || kind == "map" {
                    map.next_value_seed(Body {
                        kind: &kind,
                        sink: &mut *self.0,
                    })?;
                } else {
                    let body: Json = map.next_value()?;
                    (self.0)(&serde_json::json!({ kind: body })).map_err(A::Error::custom)?;
                }
            }
            Ok(())
        }
    }

    struct Body<'a, 'b> {
        kind: &'a str,
        sink: &'a mut Sink<'b>,
    }
    seed!(Body, deserialize_map);
    impl<'de> serde::de::Visitor<'de> for Body<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a set or map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut header = serde_json::Map::new();
            let mut sent = false;
            while let Some(key) = map.next_key::<String>()? {
                if key == "elem" {
                    map.next_value_seed(Elements {
                        kind: self.kind,
                        header: &header,
                        sink: &mut *self.sink,
                        sent: &mut sent,
                    })?;
                } else {
                    header.insert(key, map.next_value()?);
                }
            }
            if !sent {
                emit(self.kind, &header, Vec::new(), self.sink).map_err(A::Error::custom)?;
            }
            Ok(())
        }
    }

    struct Elements<'a, 'b> {
        kind: &'a str,
        header: &'a serde_json::Map<String, Json>,
        sink: &'a mut Sink<'b>,
        sent: &'a mut bool,
    }
    seed!(Elements, deserialize_seq);
    impl<'de> serde::de::Visitor<'de> for Elements<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("set elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut part = Vec::new();
            while let Some(e) = seq.next_element::<Json>()? {
                part.push(e);
                if part.len() == CHUNK {
                    let full = std::mem::take(&mut part);
                    emit(self.kind, self.header, full, self.sink).map_err(A::Error::custom)?;
                    *self.sent = true;
                }
            }
            if !part.is_empty() {
                emit(self.kind, self.header, part, self.sink).map_err(A::Error::custom)?;
                *self.sent = true;
            }
            Ok(())
        }
    }

    /// A set's declaration with some of its elements, as one object.
    fn emit(
        kind: &str,
        header: &serde_json::Map<String, Json>,
        elements: Vec<Json>,
        sink: &mut Sink<'_>,
    ) -> Result<(), VerifyError> {
        let mut body = header.clone();
        if !elements.is_empty() {
            body.insert("elem".into(), Json::Array(elements));
        }
        sink(&serde_json::json!({ kind: body }))
    }

    // Buffered here, so that the parser's byte-by-byte reads are not calls through `dyn`.
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(input));
    Doc(sink).deserialize(&mut de).map_err(json_err)?;
    de.end().map_err(json_err)
}

/// Where [`read_nft_doc`] hands each object.
type Sink<'a> = dyn FnMut(&Json) -> Result<(), VerifyError> + 'a;

fn nft_set(kind: &str, body: &Json) -> Result<NftSet, VerifyError> {
    let types = |v: &Json| match v {
        Json::Array(a) => a
            .iter()
            .map(|t| t.as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" . "),
        other => other.as_str().unwrap_or_default().to_string(),
    };
    let mut declaration = format!("type {}", types(&body["type"]));
    if !body["map"].is_null() {
        declaration.push_str(&format!(" : {}", types(&body["map"])));
    }
    let mut flags: Vec<&str> = body["flags"]
        .as_array()
        .map(|f| f.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();
    flags.retain(|f| *f != "dynamic");
    flags.sort_unstable();
    if !flags.is_empty() {
        declaration.push_str(&format!("; flags {}", flags.join(",")));
    }
    if let Some(t) = body["timeout"].as_u64() {
        declaration.push_str(&format!("; timeout {t}s"));
    }
    let dynamic = flags.contains(&"timeout");
    let mut elements = BTreeMap::new();
    if !dynamic && let Some(elems) = body["elem"].as_array() {
        for e in elems {
            let e = &normalise(e);
            let (key, data) = match e {
                Json::Array(pair) if pair.len() == 2 && kind == "map" => (&pair[0], Some(&pair[1])),
                other => (other, None),
            };
            let (key, comment) = match key.get("elem") {
                Some(inner) => (&inner["val"], inner["comment"].as_str().map(String::from)),
                None => (key, None),
            };
            let parts: Vec<String> = match key.get("concat").and_then(Json::as_array) {
                Some(members) => members.iter().map(expr_text).collect(),
                None => vec![expr_text(key)],
            };
            // Kept by the key in words alone (`10.96.0.10 . tcp . 53`; no value holds " . "):
            // the drift check holds two rulesets' elements this way, a million at 100k
            // Services, so each is as few allocations as can be.
            let element = NftElement {
                data: data.map(expr_text),
                comment,
            };
            elements.insert(parts.join(" . "), element);
        }
    }
    Ok(NftSet {
        keyword: kind.to_string(),
        declaration,
        dynamic,
        elements,
    })
}

/// A rule's statements, normalised (see the module doc).
fn nft_rule(body: &Json) -> Result<NftRule, VerifyError> {
    let stmts = body["expr"]
        .as_array()
        .ok_or_else(|| json_err("a rule without \"expr\""))?;
    let mut out: Vec<Json> = Vec::new();
    for (i, st) in stmts.iter().enumerate() {
        let implicit_tcp = st
            == &serde_json::json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}})
            && stmts
                .get(i + 1)
                .is_some_and(|n| n["reject"]["type"] == "tcp reset");
        if implicit_tcp {
            continue;
        }
        let mut st = normalise(st);
        for nat in ["dnat", "snat"] {
            if let Some(o) = st.get_mut(nat).and_then(Json::as_object_mut) {
                o.remove("family");
            }
        }
        out.push(st);
    }
    let mut targets = Vec::new();
    collect_targets(&Json::Array(out.clone()), &mut targets);
    Ok(NftRule {
        canonical: Json::Array(out.clone()).to_string(),
        text: out.iter().map(stmt_text).collect::<Vec<_>>().join(" "),
        comment: body["comment"].as_str().map(String::from),
        targets,
    })
}

/// Host prefixes as addresses, anonymous sets in order: the forms that compare equal.
fn normalise(v: &Json) -> Json {
    match v {
        Json::Object(m) => {
            if let Some(p) = m.get("prefix")
                && let (Some(addr), Some(len)) = (p["addr"].as_str(), p["len"].as_u64())
                && ((addr.contains(':') && len == 128) || (!addr.contains(':') && len == 32))
            {
                return Json::String(addr.to_string());
            }
            let mut out = serde_json::Map::new();
            for (k, x) in m {
                let mut x = normalise(x);
                if k == "set"
                    && let Json::Array(members) = &mut x
                {
                    members.sort_by_key(|a| a.to_string());
                }
                out.insert(k.clone(), x);
            }
            Json::Object(out)
        }
        Json::Array(a) => Json::Array(a.iter().map(normalise).collect()),
        other => other.clone(),
    }
}

fn collect_targets(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(m) => {
            for (k, x) in m {
                if (k == "goto" || k == "jump")
                    && let Some(t) = x["target"].as_str()
                {
                    out.push(t.to_string());
                } else {
                    collect_targets(x, out);
                }
            }
        }
        Json::Array(a) => a.iter().for_each(|x| collect_targets(x, out)),
        _ => {}
    }
}

/// An expression in nft's words (best effort: anything unknown as compact JSON).
fn expr_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        Json::Bool(b) => b.to_string(),
        Json::Null => String::new(),
        Json::Array(a) => a.iter().map(expr_text).collect::<Vec<_>>().join(", "),
        Json::Object(m) => {
            let Some((k, x)) = m.iter().next() else {
                return "{}".into();
            };
            match k.as_str() {
                "prefix" => format!("{}/{}", expr_text(&x["addr"]), x["len"]),
                "range" => format!("{}-{}", expr_text(&x[0]), expr_text(&x[1])),
                "concat" => x
                    .as_array()
                    .map(|a| a.iter().map(expr_text).collect::<Vec<_>>().join(" . "))
                    .unwrap_or_default(),
                "set" => format!("{{ {} }}", expr_text(x)),
                "elem" => expr_text(&x["val"]),
                "payload" => format!("{} {}", expr_text(&x["protocol"]), expr_text(&x["field"])),
                "meta" => format!("meta {}", expr_text(&x["key"])),
                "ct" => format!("ct {}", expr_text(&x["key"])),
                "fib" => format!("fib {} {}", expr_text(&x["flags"]), expr_text(&x["result"])),
                "numgen" => format!("numgen {} mod {}", expr_text(&x["mode"]), x["mod"]),
                "map" => format!("{} map {}", expr_text(&x["key"]), expr_text(&x["data"])),
                "&" | "|" | "^" => format!("{} {k} {}", expr_text(&x[0]), expr_text(&x[1])),
                "goto" | "jump" => format!("{k} {}", expr_text(&x["target"])),
                "drop" | "accept" | "return" | "continue" => k.clone(),
                _ => v.to_string(),
            }
        }
    }
}

fn stmt_text(st: &Json) -> String {
    let Some((k, x)) = st.as_object().and_then(|m| m.iter().next()) else {
        return st.to_string();
    };
    match k.as_str() {
        "match" => {
            let op = match x["op"].as_str() {
                Some("==") | Some("in") | None => " ".to_string(),
                Some(op) => format!(" {op} "),
            };
            format!("{}{op}{}", expr_text(&x["left"]), expr_text(&x["right"]))
        }
        "vmap" => format!("{} vmap {}", expr_text(&x["key"]), expr_text(&x["data"])),
        "dnat" | "snat" => match x["port"].as_u64() {
            Some(p) => format!("{k} to {}:{p}", expr_text(&x["addr"])),
            None => format!("{k} to {}", expr_text(&x["addr"])),
        },
        "masquerade" if x.is_null() => "masquerade".into(),
        "masquerade" => format!("masquerade {}", expr_text(&x["flags"])),
        "reject" => format!(
            "reject with {} {}",
            expr_text(&x["type"]),
            expr_text(&x["expr"])
        )
        .trim_end()
        .to_string(),
        "mangle" => format!("{} set {}", expr_text(&x["key"]), expr_text(&x["value"])),
        "set" => format!(
            "{} {} {{ {} }}",
            expr_text(&x["op"]),
            expr_text(&x["set"]),
            expr_text(&x["elem"])
        ),
        _ => expr_text(st),
    }
}

/// Everything in `observed` that differs from `desired`, in words.
pub fn compare_nft(desired: &NftState, observed: &NftState) -> Vec<Difference> {
    let mut out = Vec::new();
    for ((family, name), want) in &desired.tables {
        let place = format!("table {family} {name}");
        match observed.tables.get(&(family.clone(), name.clone())) {
            None => out.push(Difference {
                what: format!("{place} is missing"),
                service: None,
            }),
            Some(have) => compare_nft_table(&place, want, have, &mut out),
        }
    }
    for (family, name) in observed.tables.keys() {
        if !desired.tables.contains_key(&(family.clone(), name.clone())) {
            out.push(Difference {
                what: format!("table {family} {name} is there, and the plan has none"),
                service: None,
            });
        }
    }
    out
}

/// What names a Service in a table: element comments (by key, and the key's leading parts:
/// the endpoint maps share the services map's keys), and the chains each Service's elements
/// lead to.
struct Naming<'a> {
    by_key: BTreeMap<&'a str, BTreeSet<String>>,
    owner: BTreeMap<String, String>,
}

fn naming<'a>(want: &'a NftTable, have: &'a NftTable) -> Naming<'a> {
    let mut by_key: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut edges = Vec::new();
    for t in [want, have] {
        for set in t.sets.values() {
            for (k, e) in &set.elements {
                let svc = e.comment.as_deref().and_then(service_of);
                if let Some(s) = &svc {
                    by_key.entry(k.as_str()).or_default().insert(s.clone());
                }
                if let Some(d) = &e.data
                    && let Some(target) = d.strip_prefix("goto ").or(d.strip_prefix("jump "))
                {
                    edges.push((svc.clone(), String::new(), target.to_string()));
                }
            }
        }
        for (name, chain) in &t.chains {
            if let Some(s) = chain.comment.as_deref().and_then(service_of) {
                edges.push((Some(s), String::new(), name.clone()));
            }
            for r in &chain.rules {
                for target in &r.targets {
                    let svc = r.comment.as_deref().and_then(service_of);
                    edges.push((svc, name.clone(), target.clone()));
                }
            }
        }
    }
    Naming {
        by_key,
        owner: owners(&edges),
    }
}

fn compare_nft_table(place: &str, want: &NftTable, have: &NftTable, out: &mut Vec<Difference>) {
    // Built only when a difference is to be named: at 100k Services it is 100k comments on
    // each side, and the hourly drift check usually finds nothing.
    let naming = std::cell::LazyCell::new(|| naming(want, have));
    let element_service = |k: &str, e: &NftElement| -> Option<String> {
        if let Some(s) = e.comment.as_deref().and_then(service_of) {
            return Some(s);
        }
        // The key, then its leading parts, longest first.
        let cuts = k.rmatch_indices(" . ").map(|(i, _)| &k[..i]);
        for prefix in std::iter::once(k).chain(cuts) {
            if let Some(s) = naming.by_key.get(prefix)
                && s.len() == 1
            {
                return s.iter().next().cloned();
            }
        }
        let target = e.data.as_deref()?;
        let target = target
            .strip_prefix("goto ")
            .or(target.strip_prefix("jump "))?;
        naming.owner.get(target).cloned()
    };
    for (name, w) in &want.sets {
        let what = format!("{place}: {} {name}", w.keyword);
        let Some(h) = have.sets.get(name) else {
            out.push(Difference {
                what: format!("{what} is missing"),
                service: None,
            });
            continue;
        };
        if (&w.keyword, &w.declaration) != (&h.keyword, &h.declaration) {
            out.push(Difference {
                what: format!(
                    "{what} is declared `{}` in the kernel, `{}` in the plan",
                    h.declaration, w.declaration
                ),
                service: None,
            });
            continue;
        }
        if w.dynamic {
            continue;
        }
        for (k, e) in &w.elements {
            let show = |e: &NftElement| match &e.data {
                Some(d) => format!("{k} : {d}"),
                None => k.clone(),
            };
            match h.elements.get(k) {
                None => out.push(Difference {
                    what: format!("{what}: element {} is missing", show(e)),
                    service: element_service(k, e),
                }),
                Some(he) if he.data != e.data => out.push(Difference {
                    what: format!(
                        "{what}: element {k} is `{}` in the kernel, `{}` in the plan",
                        he.data.as_deref().unwrap_or(""),
                        e.data.as_deref().unwrap_or("")
                    ),
                    service: element_service(k, e),
                }),
                Some(he) if he.comment != e.comment => out.push(Difference {
                    what: format!(
                        "{what}: element {k} has comment {:?} in the kernel, {:?} in the plan",
                        he.comment.as_deref().unwrap_or(""),
                        e.comment.as_deref().unwrap_or("")
                    ),
                    service: element_service(k, e),
                }),
                Some(_) => {}
            }
        }
        for (k, e) in &h.elements {
            if !w.elements.contains_key(k) {
                let shown = match &e.data {
                    Some(d) => format!("{k} : {d}"),
                    None => k.clone(),
                };
                out.push(Difference {
                    what: format!("{what}: element {shown} is not in the plan"),
                    service: element_service(k, e),
                });
            }
        }
    }
    for (name, h) in &have.sets {
        if !want.sets.contains_key(name) {
            out.push(Difference {
                what: format!("{place}: {} {name} is not in the plan", h.keyword),
                service: None,
            });
        }
    }
    let rule_service = |chain: &str, r: &NftRule| {
        r.comment
            .as_deref()
            .and_then(service_of)
            .or_else(|| naming.owner.get(chain).cloned())
    };
    for (name, w) in &want.chains {
        let what = format!("{place}: chain {name}");
        let chain_service = || {
            w.comment
                .as_deref()
                .and_then(service_of)
                .or_else(|| naming.owner.get(name).cloned())
        };
        let Some(h) = have.chains.get(name) else {
            out.push(Difference {
                what: format!("{what} is missing"),
                service: chain_service(),
            });
            continue;
        };
        if w.declaration != h.declaration {
            out.push(Difference {
                what: format!(
                    "{what} is `{}` in the kernel, `{}` in the plan",
                    h.declaration, w.declaration
                ),
                service: chain_service(),
            });
        }
        let same = |a: &NftRule, b: &NftRule| a.canonical == b.canonical && a.comment == b.comment;
        compare_rules(
            &what,
            &w.rules,
            &h.rules,
            same,
            |r| r.text.clone(),
            |r| rule_service(name, r).or_else(chain_service),
            out,
        );
    }
    for (name, h) in &have.chains {
        if !want.chains.contains_key(name) {
            let service = h
                .rules
                .iter()
                .find_map(|r| r.comment.as_deref().and_then(service_of));
            out.push(Difference {
                what: format!("{place}: chain {name} is not in the plan"),
                service,
            });
        }
    }
}

/// Rules of one chain: each missing, each extra, and if only the order differs, that.
fn compare_rules<R>(
    what: &str,
    want: &[R],
    have: &[R],
    same: impl Fn(&R, &R) -> bool,
    text: impl Fn(&R) -> String,
    service: impl Fn(&R) -> Option<String>,
    out: &mut Vec<Difference>,
) {
    if want.len() == have.len() && want.iter().zip(have).all(|(a, b)| same(a, b)) {
        return;
    }
    let mut unmatched: Vec<bool> = vec![true; have.len()];
    let mut any = false;
    for (i, w) in want.iter().enumerate() {
        match (0..have.len()).find(|&j| unmatched[j] && same(w, &have[j])) {
            Some(j) => unmatched[j] = false,
            None => {
                any = true;
                out.push(Difference {
                    what: format!("{what}: rule {} `{}` is missing", i + 1, text(w)),
                    service: service(w),
                });
            }
        }
    }
    for (j, h) in have.iter().enumerate() {
        if unmatched[j] {
            any = true;
            out.push(Difference {
                what: format!("{what}: rule {} `{}` is not in the plan", j + 1, text(h)),
                service: service(h),
            });
        }
    }
    if !any {
        out.push(Difference {
            what: format!("{what}: the rules are in another order than the plan's"),
            service: None,
        });
    }
}

/// Reads svcproxy's tables (`ip` and `ip6`) from the kernel; a table that is not there is left
/// out.
pub fn read_nft(nft: &crate::nft::apply::NftCommand) -> Result<NftState, VerifyError> {
    let mut state = NftState::default();
    for family in ["ip", "ip6"] {
        nft.read_table_json(family, crate::nft::TABLE, false, |out| {
            read_nft_doc(out, &mut |o| nft_object(&mut state, o))
        })?
        .transpose()?;
    }
    Ok(state)
}

/// The desired side: the ruleset svcproxy would apply, in the same normalised form (read from
/// its JSON one object at a time, as the kernel's listing is).
pub fn desired_nft(ruleset: &crate::nft::Ruleset) -> NftState {
    let mut state = NftState::default();
    for table in &ruleset.tables {
        table.json_each(CHUNK, &mut |o| {
            nft_object(&mut state, &o).expect("our own JSON reads back")
        });
    }
    state
}

/// The differences between the kernel and `plan` in the nftables mode.
///
/// Neither side is held whole: each set is kept as its element count and an order-free digest
/// of its normalised elements, with only the elements that name a Service (a comment, a jump
/// or goto) for the differences' words. The plan's side is rendered, summarised and dropped
/// before the kernel's is read. The kernel's is read as nft prints it: the table without its
/// elements (`nft -t`), then each set on its own (`nft -j list set`), so that no process, nft
/// included, holds more than one set's listing. Only a set whose digests differ is read again
/// whole, on both sides, and compared element by element. At 100k Services the two sides held
/// whole were gigabytes, every `--sync-period`, in the agent.
pub fn verify_nft(
    nft: &crate::nft::apply::NftCommand,
    plan: &crate::plan::Plan,
) -> Result<Vec<Difference>, VerifyError> {
    let mut desired = desired_summary(plan, PART);
    let mut observed = Summary::default();
    for family in ["ip", "ip6"] {
        nft.read_table_json(family, crate::nft::TABLE, true, |out| {
            read_nft_doc(out, &mut |o| observed.add(o))
        })?
        .transpose()?;
    }
    let sets: Vec<(SetId, String)> = observed
        .state
        .tables
        .iter()
        .flat_map(|((family, table), t)| {
            t.sets.iter().map(|(name, set)| {
                let id = (family.clone(), table.clone(), name.clone());
                (id, set.keyword.clone())
            })
        })
        .collect();
    for ((family, table, name), keyword) in &sets {
        nft.read_set_json(keyword, family, table, name, |out| {
            read_nft_doc(out, &mut |o| observed.add(o))
        })?
        .transpose()?;
    }
    let differ: BTreeSet<SetId> = desired
        .digests
        .iter()
        .filter(|(id, d)| observed.digests.get(*id).is_some_and(|o| o != *d))
        .map(|(id, _)| id.clone())
        .collect();
    if differ.is_empty() {
        return Ok(compare_nft(&desired.state, &observed.state));
    }
    // The differing sets' elements, gathered from the same parts (`add_set` joins them).
    let mut wholes = NftState::default();
    for rendered in crate::nft::render::element_parts(plan, PART) {
        for table in &rendered.tables {
            table.json_each(CHUNK, &mut |o| {
                if set_id(&o).is_some_and(|id| differ.contains(&id)) {
                    nft_object(&mut wholes, &o).expect("our own JSON reads back");
                }
            });
        }
    }
    for id in &differ {
        desired.replace(id, &mut wholes);
        let (family, table, name) = id;
        let keyword = desired
            .set_mut(id)
            .map_or("set".to_string(), |s| s.keyword.clone());
        let mut whole = NftState::default();
        nft.read_set_json(&keyword, family, table, name, |out| {
            read_nft_doc(out, &mut |o| nft_object(&mut whole, o))
        })?
        .transpose()?;
        observed.replace(id, &mut whole);
    }
    Ok(compare_nft(&desired.state, &observed.state))
}

/// The plan's side of [`verify_nft`]: the tables, chains and set declarations of the plan's
/// ruleset, and its elements rendered `part` destinations at a time
/// ([`crate::nft::render::element_parts`]), so that the rendered ruleset is never whole.
fn desired_summary(plan: &crate::plan::Plan, part: usize) -> Summary {
    let mut desired = Summary::default();
    for table in &crate::nft::render::skeleton(plan).tables {
        table.json_each(CHUNK, &mut |o| {
            desired.add(&o).expect("our own JSON reads back")
        });
    }
    for rendered in crate::nft::render::element_parts(plan, part) {
        for table in &rendered.tables {
            table.json_each(CHUNK, &mut |o| {
                if set_id(&o).is_some() {
                    desired.add(&o).expect("our own JSON reads back");
                }
            });
        }
    }
    desired
}

/// How many destinations' elements [`verify_nft`] renders at a time.
const PART: usize = 4096;

/// A set: (family, table, name).
type SetId = (String, String, String);

/// How many elements of one set are JSON values at a time, on either side.
const CHUNK: usize = 1000;

/// The set an nft JSON object declares, if it is one.
fn set_id(o: &Json) -> Option<SetId> {
    let (kind, body) = o.as_object()?.iter().next()?;
    matches!(kind.as_str(), "set" | "map").then(|| {
        let s = |k: &str| body[k].as_str().unwrap_or_default().to_string();
        (s("family"), s("table"), s("name"))
    })
}

/// One side of [`verify_nft`]: the normalised state with each set's elements reduced to those
/// that name a Service, and the digest of every set's elements.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    state: NftState,
    digests: BTreeMap<SetId, (usize, u64)>,
}

impl Summary {
    fn add(&mut self, o: &Json) -> Result<(), VerifyError> {
        let Some(((family, table, name), (kind, body))) =
            set_id(o).zip(o.as_object().and_then(|m| m.iter().next()))
        else {
            return nft_object(&mut self.state, o);
        };
        let mut set = nft_set(kind, body)?;
        let (n, sum) = digest(&set.elements);
        let d = self
            .digests
            .entry((family.clone(), table.clone(), name.clone()))
            .or_default();
        *d = (d.0 + n, d.1.wrapping_add(sum));
        set.elements.retain(|_, e| {
            e.comment.is_some()
                || e.data
                    .as_deref()
                    .is_some_and(|d| d.starts_with("goto ") || d.starts_with("jump "))
        });
        add_set(&mut self.state, (family, table), name, set);
        Ok(())
    }

    fn set_mut(&mut self, (family, table, name): &SetId) -> Option<&mut NftSet> {
        self.state
            .tables
            .get_mut(&(family.clone(), table.clone()))?
            .sets
            .get_mut(name)
    }

    /// Puts the set `id` of `whole` (read again with all its elements) in place of the reduced
    /// one; a set `whole` lacks (gone meanwhile) is left empty.
    fn replace(&mut self, id: &SetId, whole: &mut NftState) {
        let (family, table, name) = id;
        let elements = whole
            .tables
            .get_mut(&(family.clone(), table.clone()))
            .and_then(|t| t.sets.remove(name))
            .map(|s| s.elements)
            .unwrap_or_default();
        if let Some(set) = self.set_mut(id) {
            set.elements = elements;
        }
    }
}

/// How many elements, and an order-free digest of them: the sum of each element's hash (the
/// same hasher on both sides, in one process).
fn digest(elements: &BTreeMap<String, NftElement>) -> (usize, u64) {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let hasher = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    let sum = elements
        .iter()
        .fold(0u64, |sum, e| sum.wrapping_add(hasher.hash_one(e)));
    (elements.len(), sum)
}

/// The differences between the kernel and `plan` in the iptables mode.
pub fn verify_iptables(
    cmd: &iptables::IptablesCommand,
    plan: &crate::plan::Plan,
) -> Result<Vec<Difference>, VerifyError> {
    let ruleset = iptables::render(plan);
    let families: Vec<IpFamily> = ruleset.families.iter().map(|f| f.family).collect();
    let desired = desired_iptables(&ruleset);
    Ok(compare_iptables(&desired, &read_iptables(cmd, &families)?))
}

// ---------------------------------------------------------------------------------------------
// iptables

/// svcproxy's iptables chains, normalised, by (family, table).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IptState {
    pub tables: BTreeMap<(IpFamily, String), IptTable>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IptTable {
    /// svcproxy's chains (`SVCP-…`) and their rules.
    pub chains: BTreeMap<String, Vec<IptRule>>,
    /// The rules in the built-in chains that jump into svcproxy's, by built-in chain.
    pub jumps: BTreeMap<String, Vec<IptRule>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptRule {
    pub canonical: String,
    /// As written (after `-A CHAIN`).
    pub text: String,
    pub comment: Option<String>,
    pub target: Option<String>,
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// Splits a rule into words as a shell would (iptables-save quotes comments, `\'` inside).
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn parse_int(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A rule's options in the form iptables-save lists them (see the module doc).
pub fn canonical_iptables(args: &[String]) -> (String, Option<String>, Option<String>) {
    let mut fields: Vec<String> = Vec::new();
    // (match or target name, its options)
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let mut target: Option<String> = None;
    let mut comment = None;
    let mut negate = false;
    let mut proto: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let neg = if negate { "! " } else { "" };
        match a {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-s" | "-d" | "--source" | "--destination" => {
                let mut v = args.get(i + 1).cloned().unwrap_or_default();
                if !v.contains('/') {
                    v.push_str(if v.contains(':') { "/128" } else { "/32" });
                }
                fields.push(format!("{neg}{} {v}", &a[..2.min(a.len())]));
                i += 2;
            }
            "-p" | "-i" | "-o" | "--protocol" | "--in-interface" | "--out-interface" => {
                let v = args.get(i + 1).cloned().unwrap_or_default().to_lowercase();
                if a == "-p" || a == "--protocol" {
                    proto = Some(v.clone());
                }
                fields.push(format!("{neg}{} {v}", &a[..2.min(a.len())]));
                i += 2;
            }
            "-m" | "--match" | "-j" | "--jump" | "-g" | "--goto" => {
                let name = args.get(i + 1).cloned().unwrap_or_default();
                if a.starts_with("-j") || a.starts_with("-g") || a == "--jump" || a == "--goto" {
                    target = Some(name.clone());
                    groups.push((format!("-j {name}"), Vec::new()));
                } else {
                    groups.push((format!("-m {name}"), Vec::new()));
                }
                i += 2;
            }
            opt if opt.starts_with("--") => {
                let mut vals = Vec::new();
                let mut j = i + 1;
                while j < args.len()
                    && !args[j].starts_with("--")
                    && args[j] != "!"
                    && !is_short(&args[j])
                {
                    vals.push(args[j].clone());
                    j += 1;
                }
                if groups.is_empty() {
                    groups.push((
                        format!("-m {}", proto.clone().unwrap_or_default()),
                        Vec::new(),
                    ));
                }
                let group = groups.last_mut().unwrap();
                if opt == "--comment" {
                    comment = vals.first().cloned();
                }
                if let Some(o) = option_form(&group.0, opt, &vals) {
                    group.1.push(format!("{neg}{o}"));
                }
                i = j;
            }
            other => {
                fields.push(other.to_string());
                i += 1;
            }
        }
        negate = false;
    }
    fields.sort();
    let mut parts = vec![fields.join(" ")];
    for (name, mut opts) in groups {
        let proto_match = ["-m tcp", "-m udp", "-m sctp"].contains(&name.as_str());
        if proto_match && opts.is_empty() {
            continue;
        }
        opts.sort();
        parts.push(format!("{name} {}", opts.join(" ")).trim_end().to_string());
    }
    (parts.join(" | "), comment, target)
}

fn is_short(w: &str) -> bool {
    w.len() == 2 && w.starts_with('-') && w.as_bytes()[1].is_ascii_alphabetic()
}

/// One option as iptables-save prints it back; `None` for a default it adds.
fn option_form(group: &str, opt: &str, vals: &[String]) -> Option<String> {
    let v = vals.join(" ");
    match (group, opt) {
        ("-m recent", "--mask") if v == "255.255.255.255" || v.starts_with("ffff:ffff:ffff") => {
            None
        }
        ("-m recent", "--rsource") => None,
        ("-m statistic", "--probability") => {
            let p: f64 = v.parse().unwrap_or(f64::NAN);
            Some(format!("{opt} {p:.6}"))
        }
        ("-j MARK", "--or-mark") => parse_int(&v).map(|m| format!("--set-xmark {m:#x}/{m:#x}")),
        ("-j MARK", "--xor-mark") => parse_int(&v).map(|m| format!("--set-xmark {m:#x}/0x0")),
        ("-j MARK", "--set-xmark") => {
            let (a, b) = v.split_once('/').unwrap_or((&v, "0xffffffff"));
            match (parse_int(a), parse_int(b)) {
                (Some(a), Some(b)) => Some(format!("--set-xmark {a:#x}/{b:#x}")),
                _ => Some(format!("{opt} {v}")),
            }
        }
        _ if v.is_empty() => Some(opt.to_string()),
        _ => Some(format!("{opt} {v}")),
    }
}

fn ipt_rule(text: &str) -> IptRule {
    let w = words(text);
    let (canonical, comment, target) = canonical_iptables(&w);
    IptRule {
        canonical,
        text: text.to_string(),
        comment,
        target,
    }
}

/// The desired side: what the iptables backend writes, with the jump rules it installs.
pub fn desired_iptables(ruleset: &iptables::Ruleset) -> IptState {
    let mut state = IptState::default();
    for f in &ruleset.families {
        for t in &f.tables {
            let table = state
                .tables
                .entry((f.family, t.table.as_str().to_string()))
                .or_default();
            for c in &t.chains {
                table.chains.insert(
                    c.name.clone(),
                    c.rules.iter().map(|r| ipt_rule(r)).collect(),
                );
            }
        }
        for j in iptables::render::jump_rules() {
            let text = j
                .spec
                .iter()
                .map(|w| {
                    if w.contains(' ') {
                        format!("\"{w}\"")
                    } else {
                        w.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            state
                .tables
                .entry((f.family, j.table.as_str().to_string()))
                .or_default()
                .jumps
                .entry(j.chain.to_string())
                .or_default()
                .push(ipt_rule(&text));
        }
    }
    state
}

/// Reads one family's `*-save` output (all tables, or some) into `state`: svcproxy's chains,
/// and the rules in other chains that jump into them.
pub fn iptables_state(state: &mut IptState, family: IpFamily, save: &str) {
    let prefix = iptables::render::PREFIX;
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.starts_with(prefix) {
                state
                    .tables
                    .entry((family, table.clone()))
                    .or_default()
                    .chains
                    .entry(name.to_string())
                    .or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            let r = ipt_rule(rest);
            let t = state.tables.entry((family, table.clone())).or_default();
            if chain.starts_with(prefix) {
                t.chains.entry(chain.to_string()).or_default().push(r);
            } else if r.target.as_deref().is_some_and(|x| x.starts_with(prefix)) {
                t.jumps.entry(chain.to_string()).or_default().push(r);
            }
        }
    }
}

/// Reads svcproxy's chains from the kernel, for the families `families`.
pub fn read_iptables(
    cmd: &iptables::IptablesCommand,
    families: &[IpFamily],
) -> Result<IptState, VerifyError> {
    let mut state = IptState::default();
    for &family in families {
        for table in iptables::render::Table::ALL {
            let Some(text) = cmd.save(family, Some(table))? else {
                return Err(VerifyError::NotInstalled(format!(
                    "{}-{}-save",
                    iptables::render::program(family),
                    cmd.variant
                )));
            };
            iptables_state(&mut state, family, &text);
        }
    }
    Ok(state)
}

/// Everything in `observed` that differs from `desired`, in words.
pub fn compare_iptables(desired: &IptState, observed: &IptState) -> Vec<Difference> {
    let mut out = Vec::new();
    let empty = IptTable::default();
    let keys: BTreeSet<&(IpFamily, String)> = desired
        .tables
        .keys()
        .chain(observed.tables.keys())
        .collect();
    for key @ (family, table) in keys {
        let place = format!("{} table {table}", family_name(*family));
        let want = desired.tables.get(key).unwrap_or(&empty);
        let have = observed.tables.get(key).unwrap_or(&empty);
        // Who owns each chain: the Service named by the comment of a rule leading to it.
        let mut edges = Vec::new();
        for t in [want, have] {
            for (name, rules) in t.chains.iter().chain(&t.jumps) {
                for r in rules {
                    if let Some(target) = &r.target {
                        let svc = r.comment.as_deref().and_then(service_of);
                        edges.push((svc, name.clone(), target.clone()));
                    }
                }
            }
        }
        let owner = owners(&edges);
        let service = |chain: &str, r: &IptRule| {
            r.comment
                .as_deref()
                .and_then(service_of)
                .or_else(|| owner.get(chain).cloned())
        };
        for (name, w) in &want.chains {
            let what = format!("{place}: chain {name}");
            let Some(h) = have.chains.get(name) else {
                out.push(Difference {
                    what: format!("{what} is missing"),
                    service: owner.get(name).cloned(),
                });
                continue;
            };
            compare_rules(
                &what,
                w,
                h,
                |a, b| a.canonical == b.canonical,
                |r| r.text.clone(),
                |r| service(name, r),
                &mut out,
            );
        }
        for (name, h) in &have.chains {
            if !want.chains.contains_key(name) {
                out.push(Difference {
                    what: format!("{place}: chain {name} is not in the plan"),
                    service: owner.get(name).cloned().or_else(|| {
                        h.iter()
                            .find_map(|r| r.comment.as_deref().and_then(service_of))
                    }),
                });
            }
        }
        // The jump rules: each wanted one present (anywhere in its chain: other tools insert
        // theirs around it), and no other rule into svcproxy's chains.
        let chains: BTreeSet<&String> = want.jumps.keys().chain(have.jumps.keys()).collect();
        for chain in chains {
            let w = want.jumps.get(chain).map(Vec::as_slice).unwrap_or(&[]);
            let h = have.jumps.get(chain).map(Vec::as_slice).unwrap_or(&[]);
            for r in w {
                if !h.iter().any(|x| x.canonical == r.canonical) {
                    out.push(Difference {
                        what: format!("{place}: chain {chain}: jump rule `{}` is missing", r.text),
                        service: None,
                    });
                }
            }
            for r in h {
                if !w.iter().any(|x| x.canonical == r.canonical) {
                    out.push(Difference {
                        what: format!(
                            "{place}: chain {chain}: rule `{}` jumps into svcproxy's chains and is not in the plan",
                            r.text
                        ),
                        service: None,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The summary of a whole render, as the drift check made it before it rendered in parts.
    fn whole_summary(plan: &crate::plan::Plan) -> Summary {
        let mut s = Summary::default();
        for table in &crate::nft::render(plan).tables {
            table.json_each(CHUNK, &mut |o| s.add(&o).unwrap());
        }
        s
    }

    #[test]
    fn the_plan_summarised_in_parts_is_the_plan_summarised_whole() {
        let mut snapshot = crate::synthetic::cluster(300, 4);
        snapshot.node.name = "node-1".into();
        let plan = crate::plan::plan(&snapshot, &crate::model::ProxyConfig::default());
        let whole = whole_summary(&plan);
        assert!(
            whole.digests.values().any(|(n, _)| *n >= 300),
            "{:?}",
            whole.digests
        );
        for part in [1, 7, 100, 300, 10_000] {
            assert!(desired_summary(&plan, part) == whole, "parts of {part}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// The same for generated clusters (NodePorts, Local policies, affinity, dual-stack,
        /// CIDRs), in parts of one and of three destinations.
        #[test]
        fn generated_plans_summarised_in_parts_are_summarised_whole(
            snapshot in crate::incremental::tests::generated::snapshot(),
            cidrs in proptest::prelude::any::<bool>(),
        ) {
            let config = crate::incremental::tests::generated::config(cidrs);
            let plan = crate::plan::plan(&snapshot, &config);
            let whole = whole_summary(&plan);
            for part in [1, 3] {
                proptest::prop_assert!(desired_summary(&plan, part) == whole, "parts of {}", part);
            }
        }
    }

    fn nft_doc(objects: Vec<Json>) -> Json {
        json!({ "nftables": objects })
    }

    fn services_map(elems: Vec<Json>) -> Json {
        json!({"map": {"family": "ip", "table": "svcproxy", "name": "services",
            "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict", "elem": elems}})
    }

    fn elem(addr: &str, port: u16, comment: &str, target: &str) -> Json {
        json!([{"elem": {"val": {"concat": [addr, "tcp", port]}, "comment": comment}},
            {"goto": {"target": target}}])
    }

    fn base() -> Vec<Json> {
        vec![
            json!({"table": {"family": "ip", "name": "svcproxy", "comment": "ours"}}),
            services_map(vec![
                elem(
                    "10.96.0.1",
                    443,
                    "default/kubernetes:https/tcp",
                    "endpoints-0",
                ),
                elem(
                    "10.96.0.10",
                    53,
                    "kube-system/kube-dns:dns-tcp/tcp",
                    "svc-dns",
                ),
            ]),
            json!({"chain": {"family": "ip", "table": "svcproxy", "name": "svc-dns", "comment": "kube-system/kube-dns:dns-tcp/tcp"}}),
            json!({"rule": {"family": "ip", "table": "svcproxy", "chain": "svc-dns", "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                {"reject": {"type": "tcp reset"}}]}}),
            json!({"rule": {"family": "ip", "table": "svcproxy", "chain": "svc-dns", "expr": [
                {"dnat": {"family": "ip", "addr": "10.1.0.5", "port": 53}}]}}),
            json!({"set": {"family": "ip", "table": "svcproxy", "name": "allow", "type": "ipv4_addr",
                "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.1", "len": 32}}]}}),
        ]
    }

    fn state(objects: Vec<Json>) -> NftState {
        nft_state(&[nft_doc(objects)]).unwrap()
    }

    /// What the kernel lists for [`base`]: elements reordered, handles, no table or chain
    /// comments, the implicit `meta l4proto tcp` and the dnat family gone, `/32` bare.
    fn as_listed() -> Vec<Json> {
        vec![
            json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
            json!({"table": {"family": "ip", "name": "svcproxy", "handle": 3}}),
            services_map(vec![
                elem(
                    "10.96.0.10",
                    53,
                    "kube-system/kube-dns:dns-tcp/tcp",
                    "svc-dns",
                ),
                elem(
                    "10.96.0.1",
                    443,
                    "default/kubernetes:https/tcp",
                    "endpoints-0",
                ),
            ]),
            json!({"chain": {"family": "ip", "table": "svcproxy", "name": "svc-dns", "handle": 9}}),
            json!({"rule": {"family": "ip", "table": "svcproxy", "chain": "svc-dns", "handle": 10,
                "expr": [{"reject": {"type": "tcp reset"}}]}}),
            json!({"rule": {"family": "ip", "table": "svcproxy", "chain": "svc-dns", "handle": 11,
                "expr": [{"dnat": {"addr": "10.1.0.5", "port": 53}}]}}),
            json!({"set": {"family": "ip", "table": "svcproxy", "name": "allow", "type": "ipv4_addr",
                "handle": 4, "flags": ["interval"], "elem": ["10.0.0.1"]}}),
        ]
    }

    #[test]
    fn what_the_kernel_lists_back_is_equal() {
        assert_eq!(compare_nft(&state(base()), &state(as_listed())), vec![]);
    }

    #[test]
    fn a_missing_element_names_its_service() {
        let mut listed = as_listed();
        listed[2] = services_map(vec![elem(
            "10.96.0.10",
            53,
            "kube-system/kube-dns:dns-tcp/tcp",
            "svc-dns",
        )]);
        let d = compare_nft(&state(base()), &state(listed));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].what.contains(
                "map services: element 10.96.0.1 . tcp . 443 : goto endpoints-0 is missing"
            ),
            "{}",
            d[0]
        );
        assert_eq!(
            d[0].service.as_deref(),
            Some("default/kubernetes:https/tcp")
        );
    }

    #[test]
    fn an_extra_or_changed_element_and_rule_are_found() {
        let mut listed = as_listed();
        listed[2] = services_map(vec![
            elem(
                "10.96.0.10",
                53,
                "kube-system/kube-dns:dns-tcp/tcp",
                "endpoints-0",
            ),
            elem(
                "10.96.0.1",
                443,
                "default/kubernetes:https/tcp",
                "endpoints-0",
            ),
            elem("10.96.9.9", 80, "default/hand-made:80/tcp", "endpoints-0"),
        ]);
        listed.push(
            json!({"rule": {"family": "ip", "table": "svcproxy", "chain": "svc-dns",
            "expr": [{"drop": null}]}}),
        );
        let d = compare_nft(&state(base()), &state(listed));
        let text: Vec<String> = d.iter().map(ToString::to_string).collect();
        assert_eq!(d.len(), 3, "{text:#?}");
        assert!(text[0].contains("element 10.96.0.10 . tcp . 53 is `goto endpoints-0` in the kernel, `goto svc-dns` in the plan (Service kube-system/kube-dns:dns-tcp/tcp)"), "{text:#?}");
        assert!(text[1].contains("element 10.96.9.9 . tcp . 80 : goto endpoints-0 is not in the plan (Service default/hand-made:80/tcp)"), "{text:#?}");
        assert!(text[2].contains("chain svc-dns: rule 3 `drop` is not in the plan (Service kube-system/kube-dns:dns-tcp/tcp)"), "{text:#?}");
    }

    #[test]
    fn a_missing_table_chain_or_set_is_one_difference() {
        let d = compare_nft(&state(base()), &NftState::default());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].what, "table ip svcproxy is missing");
        let listed: Vec<Json> = as_listed()
            .into_iter()
            .filter(|o| o.get("chain").is_none() && o.get("rule").is_none())
            .collect();
        let d = compare_nft(&state(base()), &state(listed));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            "table ip svcproxy: chain svc-dns is missing (Service kube-system/kube-dns:dns-tcp/tcp)"
        );
    }

    #[test]
    fn dynamic_set_elements_are_the_kernels() {
        let aff = |elems: Json| {
            json!({"set": {"family": "ip", "table": "svcproxy", "name": "aff", "type": "ipv4_addr",
                "flags": ["timeout"], "timeout": 10800, "elem": elems}})
        };
        let want = state(vec![aff(json!([]))]);
        let have = state(vec![aff(
            json!([{"elem": {"val": "10.0.0.9", "timeout": 10800, "expires": 5}}]),
        )]);
        assert_eq!(compare_nft(&want, &have), vec![]);
    }

    #[test]
    fn the_real_ruleset_reads_back_from_its_own_json() {
        let snapshot = crate::synthetic::cluster(20, 3);
        let (_, ruleset) = crate::compile(&snapshot, &Default::default());
        let s = desired_nft(&ruleset);
        assert!(!s.tables.is_empty());
        assert_eq!(compare_nft(&s, &s.clone()), vec![]);
    }

    #[test]
    fn iptables_rules_compare_as_iptables_save_prints_them() {
        let pairs = [
            (
                r#"-m statistic --mode random --probability 0.3333333333 -p tcp -m tcp -j DNAT --to-destination 10.1.0.5:80"#,
                r#"-p tcp -m statistic --mode random --probability 0.33333333349 -m tcp -j DNAT --to-destination 10.1.0.5:80"#,
            ),
            (
                r#"-m recent --name SVCP-SEP-X --rcheck --seconds 10800 --reap -j SVCP-SEP-X"#,
                r#"-m recent --rcheck --seconds 10800 --reap --name SVCP-SEP-X --mask 255.255.255.255 --rsource -j SVCP-SEP-X"#,
            ),
            (
                "-j MARK --or-mark 0x4000",
                "-j MARK --set-xmark 0x4000/0x4000",
            ),
            (
                "-j MARK --xor-mark 0x4000",
                "-j MARK --set-xmark 0x4000/0x0",
            ),
            (
                r#"-s 10.1.0.5 -m comment --comment "hairpin" -j SVCP-MARK-MASQ"#,
                r#"-s 10.1.0.5/32 -m comment --comment hairpin -j SVCP-MARK-MASQ"#,
            ),
            (
                r#"-m comment --comment "outside clients: this node's endpoints only" -j SVCP-SVL-1"#,
                r#"-m comment --comment "outside clients: this node\'s endpoints only" -j SVCP-SVL-1"#,
            ),
        ];
        for (ours, saved) in pairs {
            assert_eq!(
                ipt_rule(ours).canonical,
                ipt_rule(saved).canonical,
                "{ours}"
            );
        }
        assert_ne!(
            ipt_rule("-d 10.0.0.1/32 -j SVCP-SVC-1").canonical,
            ipt_rule("! -d 10.0.0.1/32 -j SVCP-SVC-1").canonical
        );
        assert_ne!(
            ipt_rule("-m statistic --mode random --probability 0.5 -j A").canonical,
            ipt_rule("-m statistic --mode random --probability 0.25 -j A").canonical
        );
    }

    #[test]
    fn iptables_differences_name_the_service() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:SVCP-SERVICES - [0:0]\n:SVCP-SVC-A - [0:0]\n\
            -A PREROUTING -m comment --comment \"svcproxy: Kubernetes Services\" -j SVCP-SERVICES\n\
            -A SVCP-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"default/web:http/tcp cluster IP\" -m tcp --dport 80 -j SVCP-SVC-A\n\
            -A SVCP-SVC-A -j DNAT --to-destination 10.1.0.5:80\nCOMMIT\n";
        let mut want = IptState::default();
        iptables_state(&mut want, IpFamily::V4, save);
        assert_eq!(compare_iptables(&want, &want.clone()), vec![]);
        let mut have = IptState::default();
        iptables_state(
            &mut have,
            IpFamily::V4,
            &save.replace("-A SVCP-SVC-A -j DNAT --to-destination 10.1.0.5:80\n", ""),
        );
        let d = compare_iptables(&want, &have);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            "IPv4 table nat: chain SVCP-SVC-A: rule 1 `-j DNAT --to-destination 10.1.0.5:80` is missing (Service default/web:http/tcp)"
        );
        let mut have = IptState::default();
        iptables_state(
            &mut have,
            IpFamily::V4,
            &save
                .replace(":SVCP-SVC-A - [0:0]\n", "")
                .replace("-A SVCP-SVC-A -j DNAT --to-destination 10.1.0.5:80\n", ""),
        );
        let d = compare_iptables(&want, &have);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            "IPv4 table nat: chain SVCP-SVC-A is missing (Service default/web:http/tcp)"
        );
    }
}
