//! The nftables half of the in-memory kernel: `nft -f` scripts applied to a model of the
//! tables, all or nothing, refused where the kernel would refuse them.
//!
//! It reads the forms svcproxy writes (`nft::syntax`'s table blocks, `nft::apply`'s one-line
//! commands) and refuses anything else, so a new form shows up as a failing test rather than
//! as a fake that agrees with everything. Sets, chains and elements are kept as text, keyed as
//! nft keys them (a chain by name, an element by its key); what a test asserts on is what the
//! kernel would list.

use std::collections::BTreeMap;

/// The kernel's nftables tables, keyed by (family, name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub tables: BTreeMap<(String, String), Table>,
}

/// One table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub comment: Option<String>,
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
}

/// A named set or map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Set {
    /// `set` or `map`.
    pub keyword: String,
    /// The declaration's parts (`type …`, `flags …`, `timeout …`, `comment …`), as written.
    pub declaration: Vec<String>,
    /// Each element's whole text (key, comment, data), by its key.
    pub elements: BTreeMap<String, String>,
}

/// A chain: a base chain has a hook line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub comment: Option<String>,
    /// `type nat hook prerouting priority -100; policy accept;`
    pub hook: Option<String>,
    pub rules: Vec<String>,
}

impl Table {
    /// The element texts of set `name` (empty when there is no such set).
    pub fn elements(&self, name: &str) -> Vec<&str> {
        self.sets
            .get(name)
            .map(|s| s.elements.values().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// The rules of chain `name` (empty when there is no such chain).
    pub fn rules(&self, name: &str) -> &[String] {
        self.chains
            .get(name)
            .map(|c| c.rules.as_slice())
            .unwrap_or(&[])
    }
}

/// Why the kernel refused a script: nft's message, and the command it was about.
pub type Refusal = String;

/// Applies `script` to `tables` as one transaction: all of it, or (refused) none of it.
/// Returns the number of operations (each table, set, chain, element and rule added,
/// flushed or deleted counts one), as knftables' fake counts a transaction's.
pub fn apply(tables: &mut Tables, script: &str) -> Result<usize, Refusal> {
    let mut work = tables.clone();
    let mut ops = 0;
    let lines: Vec<&str> = script.lines().map(str::trim).collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("table ") && line.ends_with('{') {
            let start = i - 1;
            let mut depth = braces(line);
            while depth > 0 && i < lines.len() {
                depth += braces(lines[i]);
                i += 1;
            }
            if depth != 0 {
                return Err(format!("syntax error: unclosed block at `{line}`"));
            }
            let block = parse_block(&lines[start..i])?;
            ops += block.apply(&mut work)?;
        } else {
            ops += command(&mut work, line).map_err(|e| format!("{e}\n{line}"))?;
        }
    }
    *tables = work;
    Ok(ops)
}

/// The change in brace depth over `line`, outside quotes.
fn braces(line: &str) -> i32 {
    let mut depth = 0;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// Splits `s` on `sep` outside quotes and braces, trimming each part and dropping empty ones.
fn split_outside(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let (mut quoted, mut depth) = (false, 0);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            _ => {}
        }
        if c == sep && !quoted && depth == 0 {
            parts.push(std::mem::take(&mut part));
        } else {
            part.push(c);
        }
    }
    parts.push(part);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The words of `s`, a quoted string counting as one word (quotes kept).
fn words(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(st) = start.take() {
                    out.push(&s[st..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(st) = start {
        out.push(&s[st..]);
    }
    out
}

/// What a rule or an element's data names: chains it jumps to, sets it reads.
fn references(text: &str) -> (Vec<String>, Vec<String>) {
    let clean = |w: &str| {
        w.trim_matches(|c: char| c == ',' || c == '}' || c == '{' || c == ';')
            .to_string()
    };
    let ws = words(text);
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        if w.starts_with('"') {
            continue;
        }
        if (*w == "jump" || *w == "goto")
            && let Some(target) = ws.get(i + 1)
        {
            chains.push(clean(target));
        }
        if let Some(set) = w.strip_prefix('@') {
            sets.push(clean(set));
        }
    }
    (chains, sets)
}

/// An element's key: its text before the comment or the data.
fn element_key(text: &str) -> String {
    let ws = words(text);
    let end = ws
        .iter()
        .position(|w| *w == "comment" || *w == ":")
        .unwrap_or(ws.len());
    ws[..end].join(" ")
}

/// An element's data (after ` : `), if it has any.
fn element_data(text: &str) -> Option<String> {
    let ws = words(text);
    let at = ws.iter().position(|w| *w == ":")?;
    Some(ws[at + 1..].join(" "))
}

/// A quoted string's content (`"a b"` → `a b`).
fn unquote(s: &str) -> String {
    s.trim().trim_matches('"').to_string()
}

fn enoent(what: impl std::fmt::Display) -> Refusal {
    format!("Error: No such file or directory; {what}")
}

fn ebusy(what: impl std::fmt::Display) -> Refusal {
    format!("Error: Could not process rule: Device or resource busy; {what}")
}

fn eexist(what: impl std::fmt::Display) -> Refusal {
    format!("Error: Could not process rule: File exists; {what}")
}

fn table_mut<'a>(
    tables: &'a mut Tables,
    family: &str,
    name: &str,
) -> Result<&'a mut Table, Refusal> {
    tables
        .tables
        .get_mut(&(family.to_string(), name.to_string()))
        .ok_or_else(|| enoent(format!("no table {family} {name}")))
}

fn check_family(family: &str) -> Result<(), Refusal> {
    match family {
        "ip" | "ip6" | "inet" => Ok(()),
        _ => Err(format!("syntax error: unknown family `{family}`")),
    }
}

/// One line that is not a table block: `[add|delete|flush] OBJECT FAMILY TABLE [NAME] [...]`.
fn command(tables: &mut Tables, line: &str) -> Result<usize, Refusal> {
    let ws = words(line);
    let (verb, rest) = match ws.first() {
        Some(&"table") => ("add", &ws[..]),
        Some(v @ (&"add" | &"delete" | &"flush")) => (*v, &ws[1..]),
        _ => return Err(format!("syntax error: unknown command `{line}`")),
    };
    let [object, family, table, args @ ..] = rest else {
        return Err(format!("syntax error: too short `{line}`"));
    };
    check_family(family)?;
    // What follows the object's name: the rest of the line, from the original text (rules
    // keep their spacing).
    let after = |n: usize| -> String {
        let mut s = line;
        for w in ws.iter().take(n) {
            s = s[s.find(w).expect("word of line") + w.len()..].trim_start();
        }
        s.to_string()
    };
    let skip = if ws[0] == "table" { 3 } else { 4 };
    match (verb, *object) {
        ("add", "table") => {
            tables
                .tables
                .entry((family.to_string(), table.to_string()))
                .or_default();
            Ok(1)
        }
        ("delete", "table") => {
            tables
                .tables
                .remove(&(family.to_string(), table.to_string()))
                .ok_or_else(|| enoent(format!("no table {family} {table}")))?;
            Ok(1)
        }
        (_, "set" | "map" | "chain" | "rule" | "element") => {
            let Some(name) = args.first() else {
                return Err(format!("syntax error: no name in `{line}`"));
            };
            let body = after(skip + 1);
            let t = table_mut(tables, family, table)?;
            match (verb, *object) {
                ("add", "set" | "map") => {
                    let decl = body
                        .strip_prefix('{')
                        .and_then(|b| b.strip_suffix('}'))
                        .ok_or_else(|| format!("syntax error: no declaration in `{line}`"))?;
                    declare_set(t, object, name, split_outside(decl, ';'))?;
                    Ok(1)
                }
                ("delete", "set" | "map") => {
                    set_of(t, object, name)?;
                    if let Some(user) = set_user(t, name) {
                        return Err(ebusy(format!("{object} {name} is used by chain {user}")));
                    }
                    t.sets.remove(*name);
                    Ok(1)
                }
                ("flush", "set" | "map") => {
                    set_of(t, object, name)?.elements.clear();
                    Ok(1)
                }
                ("add", "chain") => {
                    let comment = match body.strip_prefix('{').and_then(|b| b.strip_suffix('}')) {
                        None if body.is_empty() => None,
                        None => return Err(format!("syntax error: after the chain in `{line}`")),
                        Some(inner) => split_outside(inner, ';')
                            .iter()
                            .find_map(|p| p.strip_prefix("comment ").map(unquote)),
                    };
                    declare_chain(t, name, comment, None)?;
                    Ok(1)
                }
                ("flush", "chain") => {
                    chain_of(t, name)?.rules.clear();
                    Ok(1)
                }
                ("delete", "chain") => {
                    if !chain_of(t, name)?.rules.is_empty() {
                        return Err(ebusy(format!("chain {name} has rules")));
                    }
                    if let Some(user) = chain_user(t, name) {
                        return Err(ebusy(format!("chain {name} is the target of {user}")));
                    }
                    t.chains.remove(*name);
                    Ok(1)
                }
                ("add", "rule") => {
                    add_rule(t, name, &body)?;
                    Ok(1)
                }
                (verb @ ("add" | "delete"), "element") => {
                    let list = body
                        .strip_prefix('{')
                        .and_then(|b| b.strip_suffix('}'))
                        .ok_or_else(|| format!("syntax error: no elements in `{line}`"))?;
                    let elements = split_outside(list, ',');
                    for e in &elements {
                        if verb == "add" {
                            add_element(t, name, e)?;
                        } else {
                            delete_element(t, name, e)?;
                        }
                    }
                    Ok(elements.len())
                }
                _ => Err(format!("syntax error: `{verb} {object}` in `{line}`")),
            }
        }
        _ => Err(format!("syntax error: unknown object in `{line}`")),
    }
}

fn set_of<'a>(t: &'a mut Table, keyword: &str, name: &str) -> Result<&'a mut Set, Refusal> {
    match t.sets.get_mut(name) {
        Some(s) if s.keyword == keyword => Ok(s),
        _ => Err(enoent(format!("no {keyword} {name}"))),
    }
}

fn chain_of<'a>(t: &'a mut Table, name: &str) -> Result<&'a mut Chain, Refusal> {
    t.chains
        .get_mut(name)
        .ok_or_else(|| enoent(format!("no chain {name}")))
}

/// A chain with a rule that reads set `name`.
fn set_user(t: &Table, name: &str) -> Option<String> {
    t.chains.iter().find_map(|(c, chain)| {
        chain
            .rules
            .iter()
            .any(|r| references(r).1.iter().any(|s| s == name))
            .then(|| c.clone())
    })
}

/// A rule or a map element that jumps to chain `name`.
fn chain_user(t: &Table, name: &str) -> Option<String> {
    let by_rule = t.chains.iter().find_map(|(c, chain)| {
        chain
            .rules
            .iter()
            .any(|r| references(r).0.iter().any(|x| x == name))
            .then(|| format!("a rule of chain {c}"))
    });
    by_rule.or_else(|| {
        t.sets.iter().find_map(|(s, set)| {
            set.elements
                .values()
                .any(|e| {
                    element_data(e).is_some_and(|d| references(&d).0.iter().any(|x| x == name))
                })
                .then(|| format!("an element of map {s}"))
        })
    })
}

/// Declares a set (again: the same declaration is no change; another one is refused).
fn declare_set(
    t: &mut Table,
    keyword: &str,
    name: &str,
    declaration: Vec<String>,
) -> Result<(), Refusal> {
    if !declaration.iter().any(|p| p.starts_with("type ")) {
        return Err(format!("syntax error: {keyword} {name} has no type"));
    }
    match t.sets.get(name) {
        Some(s) if s.keyword == keyword && s.declaration == declaration => Ok(()),
        Some(_) => Err(eexist(format!(
            "{keyword} {name} exists with another declaration"
        ))),
        None => {
            t.sets.insert(
                name.to_string(),
                Set {
                    keyword: keyword.to_string(),
                    declaration,
                    elements: BTreeMap::new(),
                },
            );
            Ok(())
        }
    }
}

/// Declares a chain (again: no change, unless the hook differs, which is refused).
fn declare_chain(
    t: &mut Table,
    name: &str,
    comment: Option<String>,
    hook: Option<String>,
) -> Result<(), Refusal> {
    match t.chains.get_mut(name) {
        Some(c) if c.hook != hook => Err(eexist(format!("chain {name} has another hook"))),
        Some(c) => {
            if comment.is_some() {
                c.comment = comment;
            }
            Ok(())
        }
        None => {
            t.chains.insert(
                name.to_string(),
                Chain {
                    comment,
                    hook,
                    rules: Vec::new(),
                },
            );
            Ok(())
        }
    }
}

/// Appends a rule, whose jumps and sets must exist.
fn add_rule(t: &mut Table, chain: &str, rule: &str) -> Result<(), Refusal> {
    if rule.is_empty() {
        return Err(format!("syntax error: empty rule in chain {chain}"));
    }
    let (chains, sets) = references(rule);
    if let Some(missing) = chains.iter().find(|c| !t.chains.contains_key(*c)) {
        return Err(enoent(format!("jump to missing chain {missing}")));
    }
    if let Some(missing) = sets.iter().find(|s| !t.sets.contains_key(*s)) {
        return Err(enoent(format!("set @{missing} does not exist")));
    }
    chain_of(t, chain)?.rules.push(rule.to_string());
    Ok(())
}

/// Adds an element: to a declared set, with data exactly when it is a map, jumping only to
/// chains that exist. The same element again is no change; the same key with other data is
/// refused, as the kernel refuses it.
fn add_element(t: &mut Table, set: &str, text: &str) -> Result<(), Refusal> {
    let data = element_data(text);
    if let Some(d) = &data
        && let Some(missing) = references(d).0.iter().find(|c| !t.chains.contains_key(*c))
    {
        return Err(enoent(format!(
            "element of {set} jumps to missing chain {missing}"
        )));
    }
    let s = t
        .sets
        .get_mut(set)
        .ok_or_else(|| enoent(format!("no set {set}")))?;
    if (s.keyword == "map") != data.is_some() {
        return Err(format!("Error: {} {set} cannot hold `{text}`", s.keyword));
    }
    let key = element_key(text);
    match s.elements.get(&key) {
        Some(old) if element_data(old) != data => {
            Err(eexist(format!("element {key} of {set} has other data")))
        }
        _ => {
            s.elements.insert(key, text.to_string());
            Ok(())
        }
    }
}

/// Deletes an element by its key; a missing one is refused.
fn delete_element(t: &mut Table, set: &str, key: &str) -> Result<(), Refusal> {
    let s = t
        .sets
        .get_mut(set)
        .ok_or_else(|| enoent(format!("no set {set}")))?;
    let key = element_key(key);
    s.elements
        .remove(&key)
        .map(|_| ())
        .ok_or_else(|| enoent(format!("no element {key} in {set}")))
}

/// A `table F N { … }` block, read.
#[derive(Debug, Default)]
struct Block {
    family: String,
    name: String,
    comment: Option<String>,
    sets: Vec<BlockSet>,
    /// Each chain by name, its rules in order.
    chains: Vec<(String, Chain)>,
}

/// A set or map of a block, with its elements in the order written.
#[derive(Debug)]
struct BlockSet {
    keyword: String,
    name: String,
    declaration: Vec<String>,
    elements: Vec<String>,
}

fn parse_block(lines: &[&str]) -> Result<Block, Refusal> {
    let head = words(lines[0]);
    let ["table", family, name, "{"] = head[..] else {
        return Err(format!("syntax error: `{}`", lines[0]));
    };
    check_family(family)?;
    let mut b = Block {
        family: family.to_string(),
        name: name.to_string(),
        ..Block::default()
    };
    let body = &lines[1..lines.len() - 1];
    let mut i = 0;
    while i < body.len() {
        let line = body[i];
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ws = words(line);
        match ws[..] {
            ["comment", c] => b.comment = Some(unquote(c)),
            [kw @ ("set" | "map"), name, "{"] => {
                let (mut decl, mut elements) = (Vec::new(), Vec::new());
                loop {
                    let Some(l) = body.get(i) else {
                        return Err(format!("syntax error: unclosed {kw} {name}"));
                    };
                    i += 1;
                    if *l == "}" {
                        break;
                    }
                    if *l == "elements = {" {
                        let mut list = String::new();
                        loop {
                            let Some(e) = body.get(i) else {
                                return Err(format!("syntax error: unclosed elements of {name}"));
                            };
                            i += 1;
                            if *e == "}" {
                                break;
                            }
                            list.push_str(e);
                            list.push(' ');
                        }
                        elements = split_outside(&list, ',');
                    } else {
                        decl.extend(split_outside(l, ';'));
                    }
                }
                b.sets.push(BlockSet {
                    keyword: kw.to_string(),
                    name: name.to_string(),
                    declaration: decl,
                    elements,
                });
            }
            ["chain", name, "{"] => {
                let (mut comment, mut hook, mut rules) = (None, None, Vec::new());
                loop {
                    let Some(l) = body.get(i) else {
                        return Err(format!("syntax error: unclosed chain {name}"));
                    };
                    i += 1;
                    let lw = words(l);
                    match lw[..] {
                        ["}"] => break,
                        ["comment", c] => comment = Some(unquote(c)),
                        ["type", ..] => hook = Some(l.to_string()),
                        [] => {}
                        _ => rules.push(l.to_string()),
                    }
                }
                b.chains.push((
                    name.to_string(),
                    Chain {
                        comment,
                        hook,
                        rules,
                    },
                ));
            }
            _ => return Err(format!("syntax error: `{line}` in table {family} {name}")),
        }
    }
    Ok(b)
}

impl Block {
    /// Applies the block as nft does: the table, then every set and chain it declares, then
    /// their elements and rules (so a rule may jump to a chain declared after it).
    fn apply(self, tables: &mut Tables) -> Result<usize, Refusal> {
        let t = tables
            .tables
            .entry((self.family.clone(), self.name.clone()))
            .or_default();
        if self.comment.is_some() {
            t.comment = self.comment.clone();
        }
        let mut ops = 1;
        for set in &self.sets {
            declare_set(t, &set.keyword, &set.name, set.declaration.clone())?;
            ops += 1;
        }
        for (name, chain) in &self.chains {
            declare_chain(t, name, chain.comment.clone(), chain.hook.clone())?;
            ops += 1;
        }
        for set in &self.sets {
            for e in &set.elements {
                add_element(t, &set.name, e).map_err(|m| format!("{m}\n{e}"))?;
                ops += 1;
            }
        }
        for (name, chain) in &self.chains {
            for r in &chain.rules {
                add_rule(t, name, r).map_err(|m| format!("{m}\n{r}"))?;
                ops += 1;
            }
        }
        Ok(ops)
    }
}

/// The table as `nft list table` prints it (the fake's own, plain form: sorted, one
/// element per line), for a test's failure message.
pub fn list(t: &Table, family: &str, name: &str) -> String {
    let mut s = format!("table {family} {name} {{\n");
    for (n, set) in &t.sets {
        s.push_str(&format!("\t{} {n} {{\n", set.keyword));
        for d in &set.declaration {
            s.push_str(&format!("\t\t{d}\n"));
        }
        for e in set.elements.values() {
            s.push_str(&format!("\t\telement {e}\n"));
        }
        s.push_str("\t}\n");
    }
    for (n, chain) in &t.chains {
        s.push_str(&format!("\tchain {n} {{\n"));
        if let Some(h) = &chain.hook {
            s.push_str(&format!("\t\t{h}\n"));
        }
        for r in &chain.rules {
            s.push_str(&format!("\t\t{r}\n"));
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "table ip t\ndelete table ip t\n
table ip t {
\tcomment \"ours\"

\tmap vm {
\t\ttype ipv4_addr : verdict
\t\tcomment \"a; b\"
\t\telements = {
\t\t\t10.0.0.1 comment \"x, y\" : goto c1,
\t\t\t10.0.0.2 : goto c2
\t\t}
\t}

\tset s {
\t\ttype ipv4_addr
\t\tflags interval
\t}

\tchain base {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tip daddr @s ip daddr vmap @vm comment \"jump nowhere\"
\t}

\tchain c1 {
\t\tcomment \"one\"
\t\tnumgen random mod 1 vmap { 0 : goto c2 }
\t}

\tchain c2 {
\t\tmeta l4proto { tcp, udp } accept
\t}
}
";

    fn base() -> Tables {
        let mut t = Tables::default();
        let ops = apply(&mut t, BASE).unwrap();
        // 2 (table, delete) + table + 2 sets + 3 chains + 2 elements + 3 rules.
        assert_eq!(ops, 13);
        t
    }

    fn table(t: &Tables) -> &Table {
        &t.tables[&("ip".to_string(), "t".to_string())]
    }

    #[test]
    fn a_block_declares_before_it_fills() {
        let t = base();
        let tb = table(&t);
        assert_eq!(tb.comment.as_deref(), Some("ours"));
        assert_eq!(
            tb.sets["vm"].declaration,
            ["type ipv4_addr : verdict", "comment \"a; b\""]
        );
        assert_eq!(
            tb.elements("vm"),
            ["10.0.0.1 comment \"x, y\" : goto c1", "10.0.0.2 : goto c2"]
        );
        assert_eq!(tb.rules("c1"), ["numgen random mod 1 vmap { 0 : goto c2 }"]);
        assert!(
            tb.chains["base"]
                .hook
                .as_deref()
                .unwrap()
                .contains("hook prerouting")
        );
    }

    #[test]
    fn element_commands_add_and_delete_by_key() {
        let mut t = base();
        let ops = apply(
            &mut t,
            "delete element ip t vm { 10.0.0.2 }\nadd element ip t vm { 10.0.0.3 : goto c1, 10.0.0.2 : goto c1 }\n",
        )
        .unwrap();
        assert_eq!(ops, 3);
        assert_eq!(
            table(&t).elements("vm")[1..],
            ["10.0.0.2 : goto c1", "10.0.0.3 : goto c1"]
        );
    }

    #[test]
    fn a_refused_command_leaves_everything_as_it_was() {
        let mut t = base();
        let before = t.clone();
        for bad in [
            "add element ip t s { 10.0.0.9 }\nadd rule ip t c2 jump nowhere",
            "add element ip t vm { 10.0.0.1 : goto c2 }",
            "add element ip t vm { 10.0.0.9 : goto missing }",
            "add element ip t s { 10.0.0.9 : goto c1 }",
            "add element ip t nope { 10.0.0.9 }",
            "delete element ip t s { 10.0.0.9 }",
            "add rule ip t c2 ip daddr @nope accept",
            "flush chain ip t nope",
            "delete chain ip t c2",
            "flush chain ip t c2\ndelete chain ip t c2",
            "delete set ip t s",
            "delete map ip t s",
            "add set ip t s { type ipv6_addr; }",
            "frobnicate ip t",
            "delete table ip nope",
        ] {
            assert!(apply(&mut t, bad).is_err(), "accepted: {bad}");
            assert_eq!(t, before, "{bad}");
        }
    }

    #[test]
    fn a_chain_goes_once_nothing_uses_it() {
        let mut t = base();
        let ops = apply(
            &mut t,
            "flush chain ip t c1\nflush map ip t vm\nflush chain ip t base\ndelete chain ip t c1\ndelete map ip t vm\n",
        )
        .unwrap();
        assert_eq!(ops, 5);
        assert!(!table(&t).chains.contains_key("c1"));
        assert!(!table(&t).sets.contains_key("vm"));
    }

    #[test]
    fn one_line_declarations() {
        let mut t = base();
        apply(
            &mut t,
            "add map ip t m2 { type ipv4_addr : verdict; comment \"new\"; }\nadd chain ip t c3 { comment \"three\"; }\nadd chain ip t c4\nadd rule ip t c3 goto c4\nadd element ip t m2 { 1.2.3.4 : jump c3 }\n",
        )
        .unwrap();
        let tb = table(&t);
        assert_eq!(tb.chains["c3"].comment.as_deref(), Some("three"));
        assert_eq!(tb.rules("c3"), ["goto c4"]);
        assert_eq!(tb.elements("m2"), ["1.2.3.4 : jump c3"]);
        // The same declaration again is no change.
        apply(
            &mut t,
            "add map ip t m2 { type ipv4_addr : verdict; comment \"new\"; }",
        )
        .unwrap();
    }
}
