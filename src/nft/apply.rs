//! Applying rulesets to the kernel: one atomic `nft -f` transaction per sync, and after the
//! first one, only the difference from what was last applied.
//!
//! What was applied is kept in memory and never read back from the kernel (listing a large
//! table takes seconds). A full sync replaces svcproxy's tables in one transaction
//! (`table …; delete table …; table … { … }`), so traffic never sees a missing table. A partial
//! sync is element adds and deletes (a changed endpoint set), plus chain rewrites only for the
//! few chains that changed (a new endpoint count, a session-affinity Service). Any failure
//! leaves the kernel as it was (the transaction is atomic) and makes the next sync a full one.
//!
//! svcproxy talks to the kernel through the `nft` program rather than the `nftables` crate: the
//! crate speaks JSON, and nft 1.0.6's JSON parser cannot declare maps whose data is a
//! concatenation (`ipv4_addr . inet_service`), which the endpoint maps are; running `nft`
//! ourselves also lets us return nft's own error message.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::nft::syntax::{Chain, Element, Ruleset, Set, Spill, Table, quote};
use crate::process::{RunError, Runner};
pub use crate::report::{ApplyReport, SyncKind};

/// How to run `nft`, and where: this namespace, another one (tests), or an in-memory kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftCommand {
    pub runner: Runner,
}

impl NftCommand {
    pub fn new(runner: Runner) -> Self {
        NftCommand { runner }
    }

    /// `nft` run inside the named network namespace.
    pub fn in_netns(name: &str) -> Self {
        NftCommand::new(Runner::in_netns(name))
    }

    /// Runs `nft -f -` on `script`: one transaction. Returns nft's stderr on failure.
    pub fn run_script(&self, script: &str) -> Result<(), ApplyError> {
        let ran = self.runner.run("nft", &["-f", "-"], Some(script))?;
        if ran.success() {
            return Ok(());
        }
        Err(ApplyError::Refused {
            status: ran.status,
            stderr: ran.stderr,
        })
    }

    /// Runs `nft -f -` on the script `write` writes, handed to nft as it is written ([`Spill`]):
    /// one transaction, and never the whole script in memory. Returns the script's size, or
    /// nft's stderr on failure (also when nft stopped reading: the script could not be
    /// written whole).
    pub fn run_script_from(&self, write: impl FnOnce(&mut Spill<'_>)) -> Result<usize, ApplyError> {
        let (mut write, mut written) = (Some(write), None);
        let ran = self.runner.run_writing("nft", &["-f", "-"], &mut |input| {
            let mut spill = Spill::new(input);
            if let Some(write) = write.take() {
                write(&mut spill);
            }
            written = Some(spill.finish());
        })?;
        match written {
            Some(Ok(bytes)) if ran.success() => Ok(bytes),
            Some(Err(e)) if ran.success() || ran.stderr.is_empty() => Err(ApplyError::Refused {
                status: ran.status,
                stderr: format!("writing the script: {e}"),
            }),
            _ => Err(ApplyError::Refused {
                status: ran.status,
                stderr: ran.stderr,
            }),
        }
    }

    /// `nft -j list table FAMILY NAME` (`terse`: `-t`, the sets without their elements), handed
    /// to `read` as nft prints it, so that a large table is never held as text; `None` when
    /// there is no such table (for `svcproxy verify` and the agent's drift check).
    pub fn read_table_json<T>(
        &self,
        family: &str,
        name: &str,
        terse: bool,
        read: impl FnOnce(&mut dyn std::io::Read) -> T,
    ) -> Result<Option<T>, ApplyError> {
        let terse: &[&str] = if terse { &["-t"] } else { &[] };
        self.read_json(terse, &["table", family, name], read)
    }

    /// One set or map (`keyword` is `set` or `map`) of table `family table`, as `nft -j list
    /// set` prints it, handed to `read` as it comes; `None` if it is not there.
    pub fn read_set_json<T>(
        &self,
        keyword: &str,
        family: &str,
        table: &str,
        name: &str,
        read: impl FnOnce(&mut dyn std::io::Read) -> T,
    ) -> Result<Option<T>, ApplyError> {
        self.read_json(&[], &[keyword, family, table, name], read)
    }

    /// `nft -j [OPTIONS] list WHAT…` read by `read`. What `read` made of the output counts
    /// only when nft succeeded: nft's own error comes first.
    fn read_json<T>(
        &self,
        options: &[&str],
        what: &[&str],
        read: impl FnOnce(&mut dyn std::io::Read) -> T,
    ) -> Result<Option<T>, ApplyError> {
        let args: Vec<&str> = ["-j"]
            .iter()
            .chain(options)
            .chain(&["list"])
            .chain(what)
            .copied()
            .collect();
        let (mut read, mut made) = (Some(read), None);
        let ran = self.runner.run_reading("nft", &args, &mut |out| {
            made = read.take().map(|read| read(out));
        })?;
        if ran.success() {
            return Ok(made);
        }
        if ran.stderr.contains("No such file or directory") {
            return Ok(None);
        }
        Err(ApplyError::Refused {
            status: ran.status,
            stderr: ran.stderr,
        })
    }

    /// Whether `nft` is installed where this command runs.
    pub fn installed(&self) -> bool {
        self.runner.installed("nft")
    }
}

/// Why an apply failed. The kernel keeps what it had before.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Spawn(#[from] RunError),
    #[error("nft refused the transaction (exit {status:?}): {stderr}")]
    Refused { status: Option<i32>, stderr: String },
}

impl ApplyError {
    /// The `reason` label of `svcproxy_sync_failures_total`: what an operator acts on (a
    /// missing program is a deployment fault; a refusal is a ruleset or kernel one).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApplyError::Spawn(_) => "spawn",
            ApplyError::Refused { .. } => "refused",
        }
    }
}

/// svcproxy's tables in the kernel, as far as this process has applied them.
#[derive(Debug, Default)]
pub struct Nftables {
    nft: NftCommand,
    applied: Option<Ruleset>,
}

impl Nftables {
    pub fn new(nft: NftCommand) -> Self {
        Nftables { nft, applied: None }
    }

    /// The ruleset last applied successfully, if any.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Forgets what was applied, so that the next apply is a full sync (to repair drift).
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// Makes the kernel hold `desired`: a partial sync when a difference can express the change,
    /// else a full one.
    pub fn apply(&mut self, desired: Ruleset) -> Result<ApplyReport, ApplyError> {
        let start = Instant::now();
        let diff = match &self.applied {
            None => return self.full(desired, "nothing applied yet (or the last apply failed)"),
            Some(old) => match diff(old, &desired) {
                Ok(d) => d,
                Err(reason) => return self.full(desired, &reason.to_string()),
            },
        };
        let mut report = diff.report;
        if report.commands > 0 {
            report.script_bytes = diff.script.len();
            if let Err(e) = self.nft.run_script(&diff.script) {
                self.applied = None;
                return Err(e);
            }
        }
        self.applied = Some(desired);
        report.duration = start.elapsed();
        Ok(report)
    }

    /// Replaces svcproxy's tables with `desired` in one transaction.
    pub fn apply_full(&mut self, desired: Ruleset) -> Result<ApplyReport, ApplyError> {
        self.full(desired, "requested")
    }

    fn full(&mut self, desired: Ruleset, because: &str) -> Result<ApplyReport, ApplyError> {
        let start = Instant::now();
        let script = desired.script();
        if let Err(e) = self.nft.run_script(&script) {
            self.applied = None;
            return Err(e);
        }
        let report = full_report(
            (desired.element_count(), desired.chain_count()),
            script.len(),
            start.elapsed(),
            because.to_string(),
        );
        self.applied = Some(desired);
        Ok(report)
    }
}

/// The report of a full sync that wrote a ruleset of `(elements, chains)` whole (one `nft -f`
/// of `script_bytes`): the one-shot backend's and the incremental one's.
pub(crate) fn full_report(
    (elements, chains): (usize, usize),
    script_bytes: usize,
    duration: std::time::Duration,
    because: String,
) -> ApplyReport {
    ApplyReport {
        kind: SyncKind::Full,
        commands: 1,
        elements_added: elements,
        elements_deleted: 0,
        chains_changed: chains,
        script_bytes,
        duration,
        full_because: Some(because),
    }
}

/// Deletes svcproxy's tables (whether or not they exist) and nothing else.
pub fn cleanup(nft: &NftCommand, tables: &[(&str, &str)]) -> Result<(), ApplyError> {
    let mut script = String::new();
    for (family, name) in tables {
        writeln!(
            script,
            "table {family} {name}\ndelete table {family} {name}"
        )
        .unwrap();
    }
    nft.run_script(&script)
}

/// A partial sync: the script and what it does.
#[derive(Debug)]
pub struct Diff {
    pub script: String,
    pub report: ApplyReport,
}

/// Why the kernel's tables cannot be patched into a new ruleset, so that they are rewritten
/// whole: a change of configuration (a table, a set's declaration, a base chain), never of
/// Services.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotPatchable {
    #[error("the set of tables changed")]
    Tables,
    #[error("table {family} {name} changed")]
    Table { family: &'static str, name: String },
    #[error("the declaration of {keyword} {name} changed")]
    SetDeclaration { keyword: &'static str, name: String },
    #[error("the hook or comment of chain {0} changed")]
    BaseChainChanged(String),
    #[error("new base chain {0}")]
    NewBaseChain(String),
    #[error("base chain {0} is gone")]
    BaseChainGone(String),
}

/// The commands that turn `old` into `new`, or why only a full sync can.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Result<Diff, NotPatchable> {
    if old.tables.len() != new.tables.len() {
        return Err(NotPatchable::Tables);
    }
    let mut parts = DiffParts::default();
    for (o, n) in old.tables.iter().zip(&new.tables) {
        if o.family != n.family || o.name != n.name || o.comment != n.comment {
            return Err(NotPatchable::Table {
                family: n.family.as_str(),
                name: n.name.clone(),
            });
        }
        diff_table(o, n, &mut parts)?;
    }
    Ok(parts.finish())
}

/// The commands of a partial sync, by phase: the order matters inside one transaction (a chain
/// must exist before an element points at it, and nothing may point at it when it goes).
#[derive(Default)]
pub(crate) struct DiffParts {
    add_sets: Vec<String>,
    add_chains: Vec<String>,
    rules: Vec<String>,
    delete_elements: Vec<String>,
    add_elements: Vec<String>,
    flush_old_chains: Vec<String>,
    delete_chains: Vec<String>,
    delete_sets: Vec<String>,
    elements_added: usize,
    elements_deleted: usize,
    chains_changed: usize,
}

impl DiffParts {
    /// Declares a new (empty) set or map; its elements come with [`DiffParts::elements`].
    pub(crate) fn add_set(&mut self, prefix: &str, set: &Set) {
        self.add_sets.push(format!(
            "add {} {prefix} {} {{ {}; }}",
            set.keyword(),
            set.name,
            set.declaration()
        ));
    }

    /// Deletes a set or map, after everything else (nothing may read it any more).
    pub(crate) fn delete_set(&mut self, prefix: &str, set: &Set) {
        self.delete_sets
            .push(format!("delete {} {prefix} {}", set.keyword(), set.name));
    }

    /// Creates a regular chain with its rules.
    pub(crate) fn add_chain(&mut self, prefix: &str, chain: &Chain) {
        self.chains_changed += 1;
        let comment = chain
            .comment
            .as_ref()
            .map(|c| format!(" {{ comment {}; }}", quote(c)))
            .unwrap_or_default();
        self.add_chains
            .push(format!("add chain {prefix} {}{comment}", chain.name));
        add_rules(prefix, chain, self);
    }

    /// Replaces the rules of an existing chain.
    pub(crate) fn rewrite_chain(&mut self, prefix: &str, chain: &Chain) {
        self.chains_changed += 1;
        self.rules
            .push(format!("flush chain {prefix} {}", chain.name));
        add_rules(prefix, chain, self);
    }

    /// Deletes a regular chain: emptied first, then deleted once no chain jumps to it.
    pub(crate) fn delete_chain(&mut self, prefix: &str, name: &str) {
        self.chains_changed += 1;
        self.flush_old_chains
            .push(format!("flush chain {prefix} {name}"));
        self.delete_chains
            .push(format!("delete chain {prefix} {name}"));
    }

    /// Element deletes (by key) and adds for set `set`; a changed element is in both.
    pub(crate) fn elements(
        &mut self,
        prefix: &str,
        set: &str,
        deleted: &[&Element],
        added: &[&Element],
    ) {
        self.elements_deleted += deleted.len();
        self.delete_elements.extend(element_commands(
            "delete",
            prefix,
            set,
            deleted,
            Element::write_key,
        ));
        self.elements_added += added.len();
        self.add_elements.extend(element_commands(
            "add",
            prefix,
            set,
            added,
            Element::write_text,
        ));
    }

    pub(crate) fn finish(self) -> Diff {
        let phases = [
            &self.add_sets,
            &self.add_chains,
            &self.rules,
            &self.delete_elements,
            &self.add_elements,
            &self.flush_old_chains,
            &self.delete_chains,
            &self.delete_sets,
        ];
        let commands = phases.iter().map(|p| p.len()).sum();
        let mut script = String::new();
        for phase in phases {
            for cmd in phase {
                script.push_str(cmd);
                script.push('\n');
            }
        }
        Diff {
            report: ApplyReport {
                kind: SyncKind::Partial,
                commands,
                elements_added: self.elements_added,
                elements_deleted: self.elements_deleted,
                chains_changed: self.chains_changed,
                script_bytes: script.len(),
                duration: Duration::ZERO,
                full_because: None,
            },
            script,
        }
    }
}

fn diff_table(old: &Table, new: &Table, parts: &mut DiffParts) -> Result<(), NotPatchable> {
    let prefix = format!("{} {}", new.family.as_str(), new.name);
    let old_sets: BTreeMap<&str, &Set> = old.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_sets: BTreeMap<&str, &Set> = new.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    for (name, set) in &new_sets {
        match old_sets.get(name) {
            None => {
                parts.add_set(&prefix, set);
                let elements: Vec<&Element> = set.elements.iter().collect();
                parts.elements(&prefix, name, &[], &elements);
            }
            Some(o) if o.declaration() != set.declaration() || o.keyword() != set.keyword() => {
                return Err(NotPatchable::SetDeclaration {
                    keyword: set.keyword(),
                    name: name.to_string(),
                });
            }
            Some(o) => diff_elements(&prefix, o, set, parts),
        }
    }
    for (name, set) in &old_sets {
        if !new_sets.contains_key(name) {
            parts.delete_set(&prefix, set);
        }
    }

    let old_chains: BTreeMap<&str, &Chain> =
        old.chains.iter().map(|c| (c.name.as_str(), c)).collect();
    let new_chains: BTreeMap<&str, &Chain> =
        new.chains.iter().map(|c| (c.name.as_str(), c)).collect();
    for (name, chain) in &new_chains {
        match old_chains.get(name) {
            Some(o) if *o == *chain => {}
            Some(o) => {
                if o.hook != chain.hook || o.comment != chain.comment {
                    return Err(NotPatchable::BaseChainChanged(name.to_string()));
                }
                parts.rewrite_chain(&prefix, chain);
            }
            None => {
                if chain.hook.is_some() {
                    return Err(NotPatchable::NewBaseChain(name.to_string()));
                }
                parts.add_chain(&prefix, chain);
            }
        }
    }
    for (name, chain) in &old_chains {
        if !new_chains.contains_key(name) {
            if chain.hook.is_some() {
                return Err(NotPatchable::BaseChainGone(name.to_string()));
            }
            parts.delete_chain(&prefix, name);
        }
    }
    Ok(())
}

fn add_rules(prefix: &str, chain: &Chain, parts: &mut DiffParts) {
    for rule in &chain.rules {
        parts
            .rules
            .push(format!("add rule {prefix} {} {}", chain.name, rule.text()));
    }
}

/// Elements are sent in batches of this many per command: long enough to keep nft's parsing
/// cheap, short enough to keep error messages readable.
const ELEMENTS_PER_COMMAND: usize = 1000;

/// `VERB element PREFIX SET { … }` commands for `elements`, in batches, each element written by
/// `write` (the whole element to add, the key alone to delete).
fn element_commands(
    verb: &str,
    prefix: &str,
    set: &str,
    elements: &[&Element],
    write: fn(&Element, &mut String),
) -> Vec<String> {
    elements
        .chunks(ELEMENTS_PER_COMMAND)
        .map(|chunk| {
            let mut cmd = format!("{verb} element {prefix} {set} {{ ");
            for (i, e) in chunk.iter().enumerate() {
                if i > 0 {
                    cmd.push_str(", ");
                }
                write(e, &mut cmd);
            }
            cmd.push_str(" }");
            cmd
        })
        .collect()
}

fn diff_elements(prefix: &str, old: &Set, new: &Set, parts: &mut DiffParts) {
    // Most sets do not change from one sync to the next: compare them whole first.
    if old.elements == new.elements {
        return;
    }
    let mut deleted: Vec<&Element> = Vec::new();
    let mut added: Vec<&Element> = Vec::new();
    let sorted = |v: &[Element]| v.is_sorted_by(|a, b| a.key < b.key);
    if sorted(&old.elements) && sorted(&new.elements) {
        // The renderer sorts elements by key: one merge pass, no hashing.
        let (mut o, mut n) = (
            old.elements.iter().peekable(),
            new.elements.iter().peekable(),
        );
        loop {
            match (o.peek(), n.peek()) {
                (None, None) => break,
                (Some(a), None) => {
                    deleted.push(a);
                    o.next();
                }
                (None, Some(b)) => {
                    added.push(b);
                    n.next();
                }
                (Some(a), Some(b)) => match a.key.cmp(&b.key) {
                    std::cmp::Ordering::Less => {
                        deleted.push(a);
                        o.next();
                    }
                    std::cmp::Ordering::Greater => {
                        added.push(b);
                        n.next();
                    }
                    std::cmp::Ordering::Equal => {
                        // Same key, other data or comment: delete, then add again.
                        if a != b {
                            deleted.push(a);
                            added.push(b);
                        }
                        o.next();
                        n.next();
                    }
                },
            }
        }
    } else {
        let old_by_key: HashMap<&[_], &Element> =
            old.elements.iter().map(|e| (&*e.key, e)).collect();
        let new_by_key: HashMap<&[_], &Element> =
            new.elements.iter().map(|e| (&*e.key, e)).collect();
        deleted = old
            .elements
            .iter()
            .filter(|e| new_by_key.get(&*e.key) != Some(e))
            .collect();
        added = new
            .elements
            .iter()
            .filter(|e| old_by_key.get(&*e.key) != Some(e))
            .collect();
    }
    parts.elements(prefix, &new.name, &deleted, &added);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProxyConfig;
    use crate::synthetic;

    fn with_endpoints(counts: &[usize]) -> Ruleset {
        let mut snapshot = synthetic::cluster(counts.len(), 8);
        for (i, n) in counts.iter().enumerate() {
            std::sync::Arc::make_mut(synthetic::nth_mut(&mut snapshot.slices, i))
                .endpoints
                .truncate(*n);
        }
        crate::compile(&snapshot, &ProxyConfig::default()).1
    }

    #[test]
    fn endpoint_changes_are_element_operations() {
        let old = with_endpoints(&[2, 3]);
        // An endpoint replaced: a few element updates, no chain touched.
        let mut snapshot = synthetic::cluster(2, 8);
        for (i, n) in [2, 3].into_iter().enumerate() {
            let slice = synthetic::nth_mut(&mut snapshot.slices, i);
            std::sync::Arc::make_mut(slice).endpoints.truncate(n);
        }
        std::sync::Arc::make_mut(synthetic::nth_mut(&mut snapshot.slices, 0)).endpoints[1]
            .address = "10.200.0.1".parse().unwrap();
        let replaced = crate::compile(&snapshot, &ProxyConfig::default()).1;
        let d = diff(&old, &replaced).unwrap();
        assert_eq!(d.report.chains_changed, 0, "{}", d.script);
        assert_eq!(
            (d.report.elements_deleted, d.report.elements_added),
            (1, 1),
            "{}",
            d.script
        );
        // Another endpoint count, even one no Service had: elements, plus the small chains
        // for that count (a new slot map and its chain, a new picking chain).
        let d = diff(&old, &with_endpoints(&[3, 3])).unwrap();
        assert_eq!(d.report.chains_changed, 1, "{}", d.script);
        assert!(
            d.script.contains("delete chain ip svcproxy endpoints-of-2"),
            "{}",
            d.script
        );
        let d = diff(&old, &with_endpoints(&[2, 4])).unwrap();
        assert!(
            d.script.contains("add map ip svcproxy endpoints-3 {"),
            "{}",
            d.script
        );
        assert!(
            d.script.contains("add chain ip svcproxy endpoints-of-4"),
            "{}",
            d.script
        );
        assert_eq!(
            d.report.elements_added, 2,
            "the new endpoint, and the dispatch element: {}",
            d.script
        );
        // Back: the chains and the map go again.
        let d = diff(&with_endpoints(&[2, 4]), &old).unwrap();
        assert!(
            d.script.contains("delete map ip svcproxy endpoints-3"),
            "{}",
            d.script
        );
        // Nothing changed: nothing to send.
        assert_eq!(diff(&old, &old).unwrap().report.commands, 0);
    }
}
