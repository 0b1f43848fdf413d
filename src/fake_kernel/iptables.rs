//! The iptables half of the in-memory kernel: one family's tables of one variant, changed by
//! `*-restore --noflush` inputs and single `iptables` commands, listed by `*-save`.
//!
//! As iptables 1.8.9 does: a restore commits each table at its `COMMIT` line, all or nothing
//! for that table, and stops at the first refused line (tables committed before it stay
//! changed). A jump to a chain that does not exist, deleting a chain that has rules or is
//! jumped to, and deleting a rule that is not there are refused.

use std::collections::BTreeMap;

/// One family's tables (`nat`, `filter`, …) of one variant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub tables: BTreeMap<String, Table>,
}

/// One table: its chains by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub chains: BTreeMap<String, Chain>,
}

/// A chain: a built-in one has a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub policy: Option<String>,
    /// Each rule's words after `-A CHAIN`, unquoted.
    pub rules: Vec<Vec<String>>,
}

/// iptables' targets that are not chains.
const TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
    "CONNMARK",
    "LOG",
    "NOTRACK",
    "CT",
];

fn builtin(table: &str) -> Option<&'static [&'static str]> {
    Some(match table {
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        "filter" => &["INPUT", "FORWARD", "OUTPUT"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        "raw" => &["PREROUTING", "OUTPUT"],
        _ => return None,
    })
}

impl Table {
    fn new(name: &str) -> Result<Table, String> {
        let chains = builtin(name)
            .ok_or_else(|| {
                format!("can't initialize iptables table `{name}': Table does not exist")
            })?
            .iter()
            .map(|c| {
                (
                    c.to_string(),
                    Chain {
                        policy: Some("ACCEPT".into()),
                        rules: Vec::new(),
                    },
                )
            })
            .collect();
        Ok(Table { chains })
    }

    /// The rules of chain `name`, each as its words joined (empty when there is no such
    /// chain).
    pub fn rules(&self, name: &str) -> Vec<String> {
        self.chains
            .get(name)
            .map(|c| c.rules.iter().map(|r| r.join(" ")).collect())
            .unwrap_or_default()
    }

    fn chain(&mut self, name: &str) -> Result<&mut Chain, String> {
        self.chains
            .get_mut(name)
            .ok_or_else(|| format!("Couldn't find chain `{name}'"))
    }

    /// Checks the rule's target: a built-in target or a chain of this table.
    fn check_target(&self, rule: &[String]) -> Result<(), String> {
        for w in rule.windows(2) {
            if (w[0] == "-j" || w[0] == "-g")
                && !TARGETS.contains(&w[1].as_str())
                && !self.chains.contains_key(&w[1])
            {
                return Err(format!(
                    "Couldn't load target `{}':No such file or directory",
                    w[1]
                ));
            }
        }
        Ok(())
    }

    fn jumped_to(&self, name: &str) -> bool {
        self.chains.values().any(|c| {
            c.rules.iter().any(|r| {
                r.windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == name)
            })
        })
    }

    /// One change (`-A`, `-I`, `-D`, `-F`, `-X`, `-N`, or `:CHAIN` in a restore input).
    fn change(
        &mut self,
        action: &str,
        chain: Option<&str>,
        rule: Vec<String>,
    ) -> Result<bool, String> {
        match (action, chain) {
            ("-A", Some(c)) => {
                self.check_target(&rule)?;
                self.chain(c)?.rules.push(rule);
            }
            ("-I", Some(c)) => {
                // `-I CHAIN [N] spec`: at rule N (from 1), else first.
                let (at, rule) = match rule.split_first() {
                    Some((n, spec)) if n.parse::<usize>().is_ok() => {
                        (n.parse::<usize>().unwrap_or(1), spec.to_vec())
                    }
                    _ => (1, rule),
                };
                self.check_target(&rule)?;
                let rules = &mut self.chain(c)?.rules;
                if at == 0 || at > rules.len() + 1 {
                    return Err("Index of insertion too big.".into());
                }
                rules.insert(at - 1, rule);
            }
            ("-C", Some(c)) => return Ok(self.chain(c)?.rules.contains(&rule)),
            ("-D", Some(c)) => {
                let rules = &mut self.chain(c)?.rules;
                let at = rules.iter().position(|r| *r == rule).ok_or_else(|| {
                    "Bad rule (does a matching rule exist in that chain?)".to_string()
                })?;
                rules.remove(at);
            }
            ("-F", Some(c)) => self.chain(c)?.rules.clear(),
            ("-F", None) => self.chains.values_mut().for_each(|c| c.rules.clear()),
            ("-N", Some(c)) => {
                if self.chains.contains_key(c) {
                    return Err("Chain already exists".into());
                }
                self.chains.insert(c.to_string(), Chain::default());
            }
            (":", Some(c)) => match self.chains.get_mut(c) {
                // `--noflush`: a user chain declared again is flushed; a built-in one keeps
                // its rules.
                Some(ch) if ch.policy.is_none() => ch.rules.clear(),
                Some(_) => {}
                None => {
                    self.chains.insert(c.to_string(), Chain::default());
                }
            },
            ("-X", Some(c)) => {
                let ch = self.chain(c)?;
                if ch.policy.is_some() {
                    return Err(format!("CHAIN_DEL failed (Invalid argument): chain {c}"));
                }
                if !ch.rules.is_empty() || self.jumped_to(c) {
                    return Err(format!(
                        "CHAIN_DEL failed (Device or resource busy): chain {c}"
                    ));
                }
                self.chains.remove(c);
            }
            _ => return Err(format!("unknown option `{action}'")),
        }
        Ok(true)
    }
}

/// Splits a line into words as a shell would (double quotes group, `\"` inside).
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    word.get_or_insert_default().push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                word.get_or_insert_default();
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(w) = word.take() {
                    out.push(w);
                }
            }
            c => word.get_or_insert_default().push(c),
        }
    }
    out.extend(word);
    out
}

impl Tables {
    fn table(&mut self, name: &str) -> Result<&mut Table, String> {
        if !self.tables.contains_key(name) {
            self.tables.insert(name.to_string(), Table::new(name)?);
        }
        Ok(self.tables.get_mut(name).expect("inserted"))
    }

    /// Applies a `--noflush` restore input; returns the operations committed. On a refused
    /// line, the tables committed before it stay.
    pub fn restore(&mut self, input: &str) -> Result<usize, String> {
        let mut ops = 0;
        let mut open: Option<(String, Table, usize)> = None;
        for (n, line) in input.lines().enumerate() {
            let line = line.trim();
            let failed = |e: String| format!("iptables-restore: line {} failed: {e}", n + 1);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if open.is_some() {
                    return Err(failed("table opened before COMMIT".into()));
                }
                let t = self.table(name).map_err(failed)?.clone();
                open = Some((name.to_string(), t, 0));
                continue;
            }
            let Some((name, table, count)) = open.as_mut() else {
                return Err(failed("a line outside a table".into()));
            };
            if line == "COMMIT" {
                self.tables.insert(name.clone(), std::mem::take(table));
                ops += *count;
                open = None;
                continue;
            }
            let ws = words(line);
            let result = if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                table.change(":", Some(chain), Vec::new())
            } else {
                match &ws[..] {
                    [action, chain, rule @ ..] => table.change(action, Some(chain), rule.to_vec()),
                    [action] => table.change(action, None, Vec::new()),
                    [] => unreachable!("not empty"),
                }
            };
            result.map_err(failed)?;
            *count += 1;
        }
        if open.is_some() {
            return Err("iptables-restore: COMMIT expected at the end".into());
        }
        Ok(ops)
    }

    /// One `iptables` command's arguments (`-w 5 -t nat -C CHAIN …`): `Ok(false)` when a
    /// `-C` finds no such rule.
    pub fn command(&mut self, args: &[String]) -> Result<bool, String> {
        let mut table = "filter".to_string();
        let mut rest = args;
        loop {
            match rest {
                [w, _, tail @ ..] if w == "-w" => rest = tail,
                [t, name, tail @ ..] if t == "-t" => {
                    table = name.clone();
                    rest = tail;
                }
                _ => break,
            }
        }
        match rest {
            [action, chain, rule @ ..] if action.starts_with('-') => {
                self.table(&table)?
                    .change(action, Some(chain), rule.to_vec())
            }
            _ => Err(format!("unknown arguments {args:?}")),
        }
    }

    /// What `*-save` prints (all tables, or one).
    pub fn save(&self, only: Option<&str>) -> String {
        let mut s = String::from("# Generated by svcproxy's fake kernel\n");
        for (name, t) in &self.tables {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            s.push_str(&format!("*{name}\n"));
            let order = builtin(name).unwrap_or(&[]);
            let mut chains: Vec<(&String, &Chain)> = t.chains.iter().collect();
            chains.sort_by_key(|(n, _)| {
                (
                    order.iter().position(|b| b == n).unwrap_or(usize::MAX),
                    n.to_string(),
                )
            });
            for (n, c) in &chains {
                s.push_str(&format!(
                    ":{n} {} [0:0]\n",
                    c.policy.as_deref().unwrap_or("-")
                ));
            }
            for (n, c) in &chains {
                for r in &c.rules {
                    s.push_str(&format!("-A {n}"));
                    for w in r {
                        if w.contains(' ') || w.is_empty() {
                            s.push_str(&format!(" \"{w}\""));
                        } else {
                            s.push_str(&format!(" {w}"));
                        }
                    }
                    s.push('\n');
                }
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn a_restore_commits_per_table_and_stops_at_a_refused_line() {
        let mut t = Tables::default();
        let ops = t
            .restore("*nat\n:SVCP-A - [0:0]\n-A SVCP-A -m comment --comment \"a b\" -j DNAT --to-destination 1.2.3.4:80\nCOMMIT\n")
            .unwrap();
        assert_eq!(ops, 2);
        assert_eq!(
            t.tables["nat"].rules("SVCP-A"),
            ["-m comment --comment a b -j DNAT --to-destination 1.2.3.4:80"]
        );
        let before = t.clone();
        // filter is refused (a jump to a missing chain): nat, committed first, stays changed.
        let e = t
            .restore("*nat\n-F SVCP-A\nCOMMIT\n*filter\n:SVCP-F - [0:0]\n-A SVCP-F -j SVCP-NOPE\nCOMMIT\n")
            .unwrap_err();
        assert!(e.contains("SVCP-NOPE"), "{e}");
        assert!(t.tables["nat"].rules("SVCP-A").is_empty());
        assert!(!t.tables["filter"].chains.contains_key("SVCP-F"));
        assert_ne!(t, before);
    }

    #[test]
    fn chains_go_only_when_empty_and_unused() {
        let mut t = Tables::default();
        t.restore("*nat\n:SVCP-A - [0:0]\n:SVCP-B - [0:0]\n-A SVCP-A -j SVCP-B\nCOMMIT\n")
            .unwrap();
        assert!(t.restore("*nat\n-X SVCP-B\nCOMMIT\n").is_err());
        assert!(t.restore("*nat\n-X SVCP-A\nCOMMIT\n").is_err());
        t.restore("*nat\n:SVCP-A - [0:0]\n-X SVCP-B\n-X SVCP-A\nCOMMIT\n")
            .unwrap();
        assert_eq!(t.tables["nat"].chains.len(), 4);
    }

    #[test]
    fn check_insert_delete_and_save() {
        let mut t = Tables::default();
        t.restore("*nat\n:SVCP-S - [0:0]\nCOMMIT\n").unwrap();
        let jump = strings(&[
            "-w",
            "5",
            "-t",
            "nat",
            "-C",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "svcproxy: x",
            "-j",
            "SVCP-S",
        ]);
        assert!(!t.command(&jump).unwrap());
        let mut insert = jump.clone();
        insert[4] = "-I".into();
        assert!(t.command(&insert).unwrap());
        assert!(t.command(&jump).unwrap());
        let save = t.save(Some("nat"));
        assert!(
            save.contains(":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]"),
            "{save}"
        );
        assert!(
            save.contains("-A PREROUTING -m comment --comment \"svcproxy: x\" -j SVCP-S\n"),
            "{save}"
        );
        let mut delete = jump.clone();
        delete[4] = "-D".into();
        assert!(t.command(&delete).unwrap());
        assert!(t.command(&delete).is_err());
    }
}
