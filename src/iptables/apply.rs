//! Applying the iptables rendering: one `iptables-restore --noflush` per family per sync
//! (`nat` and `filter` in one input), rewriting only svcproxy's chains.
//!
//! `--noflush` leaves every other chain and rule alone; `:CHAIN - [0:0]` creates a chain or
//! flushes it if it exists, so a chain is rewritten by declaring it and appending its rules.
//! What was applied is kept in memory and never read back: after the first sync only chains
//! whose rules changed are declared and refilled, chains that disappeared are flushed and
//! deleted, and a sync that changes nothing runs nothing. A full sync (the first, after a
//! failure, or on request for drift repair) lists the svcproxy chains present (`*-save`), so
//! that chains left by an earlier run are deleted, and rewrites all of them.
//!
//! Atomicity, as verified on iptables 1.8.9 (both variants): each table section is committed
//! at its `COMMIT` line, all or nothing for that table; a refused line stops the restore, so
//! tables after it are not touched. svcproxy writes `nat` first: an error anywhere in `nat`
//! leaves both tables as they were; an error in `filter` leaves the new `nat` in place with the
//! old `filter` (a Service that just lost its endpoints may time out instead of being refused
//! until the next sync). Either way the error carries iptables-restore's own message and the
//! next sync is a full one.
//!
//! The jump rules from the built-in chains cannot be expressed idempotently in a restore input
//! (`-A` would add a duplicate each time, `-D` fails when missing), so after a full restore each
//! is checked with `-C` and inserted with `-I` only when missing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::iptables::detect::Variant;
use crate::iptables::render::{
    Chain, FamilyRules, PREFIX, Ruleset, Table, jump_rules, program, write_table,
};
use crate::model::IpFamily;
use crate::process::{RunError, Runner};
use crate::report::{ApplyReport, SyncKind};

/// How long iptables waits for the xtables lock (`-w`), in seconds.
const LOCK_WAIT: &str = "5";

/// Why an iptables operation failed. The tables keep what they had (see the module doc for
/// the one case where `nat` is ahead of `filter`).
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error(transparent)]
    Spawn(#[from] RunError),
    #[error("{program} refused the input (exit {status:?}): {stderr}")]
    Refused {
        program: String,
        status: Option<i32>,
        stderr: String,
    },
    #[error("`{command}` failed (exit {status:?}): {stderr}")]
    Failed {
        command: String,
        status: Option<i32>,
        stderr: String,
    },
    #[error("neither iptables-legacy nor iptables-nft is installed")]
    NotInstalled,
}

impl IptablesError {
    /// The `reason` label of `svcproxy_sync_failures_total` (see `nft::apply::ApplyError`'s).
    pub fn metric_label(&self) -> &'static str {
        match self {
            IptablesError::Spawn(_) => "spawn",
            IptablesError::Refused { .. } => "refused",
            IptablesError::Failed { .. } => "command_failed",
            IptablesError::NotInstalled => "not_installed",
        }
    }
}

/// How to run the iptables programs of one variant, and where: this namespace, another one
/// (tests), or an in-memory kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesCommand {
    pub runner: Runner,
    pub variant: Variant,
}

impl IptablesCommand {
    pub fn new(variant: Variant) -> Self {
        IptablesCommand::with(Runner::here(), variant)
    }

    pub fn with(runner: Runner, variant: Variant) -> Self {
        IptablesCommand { runner, variant }
    }

    /// The programs run inside the named network namespace.
    pub fn in_netns(name: &str, variant: Variant) -> Self {
        IptablesCommand::with(Runner::in_netns(name), variant)
    }

    /// `iptables-legacy-restore`, `ip6tables-nft-save`, `iptables-nft`, …
    fn program(&self, family: IpFamily, tool: &str) -> String {
        let base = program(family);
        if tool.is_empty() {
            format!("{base}-{}", self.variant)
        } else {
            format!("{base}-{}-{tool}", self.variant)
        }
    }

    /// Feeds `input` to `*-restore -w 5 --noflush`. Returns its stderr on failure.
    pub fn restore(&self, family: IpFamily, input: &str) -> Result<(), IptablesError> {
        let program = self.program(family, "restore");
        let ran = self
            .runner
            .run(&program, &["-w", LOCK_WAIT, "--noflush"], Some(input))?;
        if ran.success() {
            return Ok(());
        }
        Err(IptablesError::Refused {
            program,
            status: ran.status,
            stderr: ran.stderr,
        })
    }

    /// `*-save` of the family (all tables, or one), as text. `Ok(None)`: the program is not
    /// installed.
    pub fn save(
        &self,
        family: IpFamily,
        table: Option<Table>,
    ) -> Result<Option<String>, IptablesError> {
        let program = self.program(family, "save");
        let args: &[&str] = match &table {
            Some(t) => &["-t", t.as_str()],
            None => &[],
        };
        let ran = match self.runner.run(&program, args, None) {
            Ok(r) => r,
            Err(e) if e.not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !ran.success() {
            return Err(IptablesError::Failed {
                command: program,
                status: ran.status,
                stderr: ran.stderr,
            });
        }
        Ok(Some(ran.stdout))
    }

    /// Runs the family's `iptables` command with `args`; `Ok(false)` when it exits with 1
    /// (`-C`: the rule is not there).
    pub fn run(&self, family: IpFamily, args: &[String]) -> Result<bool, IptablesError> {
        let program = self.program(family, "");
        let mut argv = vec!["-w", LOCK_WAIT];
        argv.extend(args.iter().map(String::as_str));
        let ran = self.runner.run(&program, &argv, None)?;
        match ran.status {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            status => Err(IptablesError::Failed {
                command: format!("{program} {}", args.join(" ")),
                status,
                stderr: ran.stderr,
            }),
        }
    }

    /// Inserts each jump rule that is missing (checked with `-C`).
    pub fn ensure_jumps(&self, family: IpFamily) -> Result<usize, IptablesError> {
        let mut inserted = 0;
        for j in jump_rules() {
            if !self.run(family, &j.args("-C"))? {
                if !self.run(family, &j.args("-I"))? {
                    return Err(IptablesError::Failed {
                        command: j.shell(&self.program(family, ""), "-I"),
                        status: Some(1),
                        stderr: "could not insert the jump rule".into(),
                    });
                }
                inserted += 1;
            }
        }
        Ok(inserted)
    }
}

/// svcproxy's chains in one table of a `*-save` output, and the rules elsewhere that jump to
/// them (as `-A CHAIN …` lines).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    pub chains: BTreeSet<String>,
    pub jumps: Vec<String>,
}

/// Reads svcproxy's chains and the jumps into them, per table, from a `*-save` output.
pub fn parse_save(text: &str) -> BTreeMap<String, Found> {
    let mut out: BTreeMap<String, Found> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.starts_with(PREFIX) {
                out.entry(table.clone())
                    .or_default()
                    .chains
                    .insert(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let words: Vec<&str> = rule.split_whitespace().collect();
            let jumps_in = words
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(PREFIX));
            if !chain.starts_with(PREFIX) && jumps_in {
                out.entry(table.clone())
                    .or_default()
                    .jumps
                    .push(line.to_string());
            }
        }
    }
    out
}

/// svcproxy's chains in the kernel, as far as this process has applied them.
#[derive(Debug)]
pub struct Iptables {
    cmd: IptablesCommand,
    applied: Option<Ruleset>,
}

impl Iptables {
    pub fn new(cmd: IptablesCommand) -> Self {
        Iptables { cmd, applied: None }
    }

    pub fn command(&self) -> &IptablesCommand {
        &self.cmd
    }

    /// The rules last applied successfully, if any.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Forgets what was applied, so that the next apply is a full sync (to repair drift).
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// The rules applied, for the incremental backend to patch as its restore inputs did.
    pub(crate) fn applied_mut(&mut self) -> Option<&mut Ruleset> {
        self.applied.as_mut()
    }

    /// Feeds prepared restore inputs (the incremental backend's); a failure forgets what was
    /// applied, so that the next apply is full.
    pub(crate) fn restore_partial(
        &mut self,
        inputs: &[(IpFamily, String)],
    ) -> Result<(), IptablesError> {
        for (family, input) in inputs {
            if let Err(e) = self.cmd.restore(*family, input) {
                self.applied = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes the kernel hold `desired`: only the changed chains when something was applied
    /// before, else everything.
    pub fn apply(&mut self, desired: Ruleset) -> Result<ApplyReport, IptablesError> {
        let Some(old) = self.applied.take() else {
            return self.full(desired, "nothing applied yet (or the last apply failed)");
        };
        if old.families.iter().map(|f| f.family).collect::<Vec<_>>()
            != desired
                .families
                .iter()
                .map(|f| f.family)
                .collect::<Vec<_>>()
        {
            return self.full(desired, "the set of families changed");
        }
        let start = Instant::now();
        let (inputs, mut report) = diff(&old, &desired);
        for (family, input) in inputs {
            self.cmd.restore(family, &input)?;
        }
        self.applied = Some(desired);
        report.duration = start.elapsed();
        Ok(report)
    }

    /// Rewrites all of svcproxy's chains, deletes the ones not wanted any more, and makes sure
    /// the jump rules are there.
    pub fn apply_full(&mut self, desired: Ruleset) -> Result<ApplyReport, IptablesError> {
        self.full(desired, "requested")
    }

    fn full(&mut self, desired: Ruleset, because: &str) -> Result<ApplyReport, IptablesError> {
        self.applied = None;
        let start = Instant::now();
        let mut report = report(SyncKind::Full, Some(because.to_string()));
        for f in &desired.families {
            let stale = self.stale_chains(f)?;
            let input = f.restore_input(&stale);
            report.commands += 1;
            report.script_bytes += input.len();
            report.chains_changed += f.tables.iter().map(|t| t.chains.len()).sum::<usize>()
                + stale.values().map(Vec::len).sum::<usize>();
            report.elements_added += f.tables.iter().map(|t| t.rule_count()).sum::<usize>();
            self.cmd.restore(f.family, &input)?;
            report.commands += self.cmd.ensure_jumps(f.family)?;
        }
        self.applied = Some(desired);
        report.duration = start.elapsed();
        Ok(report)
    }

    /// svcproxy chains in the kernel that `f` does not have, per table.
    fn stale_chains(&self, f: &FamilyRules) -> Result<BTreeMap<Table, Vec<String>>, IptablesError> {
        let mut stale = BTreeMap::new();
        for t in &f.tables {
            let text = self
                .cmd
                .save(f.family, Some(t.table))?
                .ok_or(IptablesError::NotInstalled)?;
            let found = parse_save(&text)
                .remove(t.table.as_str())
                .unwrap_or_default();
            let wanted: BTreeSet<&str> = t.chains.iter().map(|c| c.name.as_str()).collect();
            let gone: Vec<String> = found
                .chains
                .into_iter()
                .filter(|c| !wanted.contains(c.as_str()))
                .collect();
            if !gone.is_empty() {
                stale.insert(t.table, gone);
            }
        }
        Ok(stale)
    }
}

/// The restore inputs of an incremental sync from `old` to `new` (same families): per family,
/// the chains whose rules changed or that are new (declared and refilled) and the chains that
/// are gone (flushed and deleted); families with no change have no input. In the report,
/// `elements_added` counts rules written and `elements_deleted` rules removed.
pub fn diff(old: &Ruleset, new: &Ruleset) -> (Vec<(IpFamily, String)>, ApplyReport) {
    let mut report = report(SyncKind::Partial, None);
    let mut inputs = Vec::new();
    for (o, n) in old.families.iter().zip(&new.families) {
        let mut input = String::new();
        for t in &n.tables {
            let old_chains: BTreeMap<&str, &Chain> = o
                .table(t.table)
                .map(|b| b.chains.iter().map(|c| (c.name.as_str(), c)).collect())
                .unwrap_or_default();
            let new_names: BTreeSet<&str> = t.chains.iter().map(|c| c.name.as_str()).collect();
            let changed: Vec<&Chain> = t
                .chains
                .iter()
                .filter(|c| old_chains.get(c.name.as_str()) != Some(c))
                .collect();
            let gone: Vec<String> = old_chains
                .keys()
                .filter(|name| !new_names.contains(*name))
                .map(|s| s.to_string())
                .collect();
            report.chains_changed += changed.len() + gone.len();
            report.elements_added += changed.iter().map(|c| c.rules.len()).sum::<usize>();
            report.elements_deleted += changed
                .iter()
                .filter_map(|c| old_chains.get(c.name.as_str()))
                .chain(gone.iter().filter_map(|g| old_chains.get(g.as_str())))
                .map(|c| c.rules.len())
                .sum::<usize>();
            write_table(&mut input, t.table, &changed, &[], &gone);
        }
        if !input.is_empty() {
            report.commands += 1;
            report.script_bytes += input.len();
            inputs.push((n.family, input));
        }
    }
    (inputs, report)
}

fn report(kind: SyncKind, full_because: Option<String>) -> ApplyReport {
    ApplyReport {
        kind,
        commands: 0,
        elements_added: 0,
        elements_deleted: 0,
        chains_changed: 0,
        script_bytes: 0,
        duration: Duration::ZERO,
        full_because,
    }
}

/// What [`cleanup`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub chains: usize,
    pub jumps: usize,
    /// `iptables-legacy (IPv4)`, … where something was removed.
    pub places: Vec<String>,
}

/// Deletes svcproxy's chains and every rule jumping into them, in `variants` (both, for
/// `svcproxy cleanup`) and both families, touching nothing else (only `nat` and `filter`, where
/// svcproxy writes). A variant that is not installed is skipped. `runner` says where the
/// programs run.
pub fn cleanup(runner: &Runner, variants: &[Variant]) -> Result<Cleaned, IptablesError> {
    let mut cleaned = Cleaned::default();
    for &variant in variants {
        let cmd = IptablesCommand::with(runner.clone(), variant);
        for family in IpFamily::ALL {
            // No `-t`: iptables-legacy-save then only reads tables that exist, and does not
            // load kernel modules on a node that never used legacy iptables.
            let text = match cmd.save(family, None) {
                Ok(Some(text)) => text,
                Ok(None) => continue,
                // A variant the kernel has no tables for (its modules never loaded) may make
                // `*-save` fail: then it holds nothing of svcproxy's either.
                Err(e @ IptablesError::Failed { .. }) => {
                    tracing::debug!("cleanup: skipping iptables-{variant}: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let found = parse_save(&text);
            let mut input = String::new();
            for table in Table::ALL {
                let Some(f) = found.get(table.as_str()) else {
                    continue;
                };
                if f.chains.is_empty() && f.jumps.is_empty() {
                    continue;
                }
                input.push_str(&format!("*{}\n", table.as_str()));
                for j in &f.jumps {
                    input.push_str(&format!("-D {}\n", &j[3..]));
                }
                for c in &f.chains {
                    input.push_str(&format!("-F {c}\n"));
                }
                for c in &f.chains {
                    input.push_str(&format!("-X {c}\n"));
                }
                input.push_str("COMMIT\n");
                cleaned.chains += f.chains.len();
                cleaned.jumps += f.jumps.len();
            }
            if input.is_empty() {
                continue;
            }
            cmd.restore(family, &input)?;
            cleaned.places.push(format!(
                "{}-{variant} ({})",
                program(family),
                match family {
                    IpFamily::V4 => "IPv4",
                    IpFamily::V6 => "IPv6",
                }
            ));
        }
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(snapshot: &crate::model::Snapshot) -> Ruleset {
        let config = crate::model::ProxyConfig::default();
        crate::iptables::render(&crate::plan::plan(snapshot, &config))
    }

    #[test]
    fn an_incremental_sync_rewrites_only_the_changed_service() {
        let mut snapshot = crate::synthetic::cluster(20, 3);
        let old = rendered(&snapshot);
        assert_eq!(
            diff(&old, &old).0,
            vec![],
            "nothing changed, nothing to run"
        );
        // Service 5's remote endpoint replaced: its endpoint chain only.
        let slice = std::sync::Arc::make_mut(crate::synthetic::nth_mut(&mut snapshot.slices, 5));
        slice.endpoints[1].address = "10.127.0.1".parse().unwrap();
        let (inputs, report) = diff(&old, &rendered(&snapshot));
        assert_eq!(report.chains_changed, 1, "{inputs:?}");
        let (family, input) = &inputs[0];
        assert_eq!(*family, IpFamily::V4);
        assert!(input.starts_with("*nat\n:SVCP-SVC-"), "{input}");
        assert!(
            !input.contains("SVCP-SERVICES") && !input.contains("*filter"),
            "{input}"
        );
        // A Service removed: the dispatch chains change, its chains are deleted.
        let gone = snapshot.services.keys().nth(3).unwrap().clone();
        snapshot.services.remove(&gone);
        let (inputs, _) = diff(&old, &rendered(&snapshot));
        let input = &inputs[0].1;
        assert!(
            input.contains(":SVCP-SERVICES - [0:0]") && input.contains("*filter\n:SVCP-FILTER"),
            "{input}"
        );
        assert!(input.contains("\n-X SVCP-SVC-"), "{input}");
    }

    #[test]
    fn parse_save_finds_svcproxy_chains_and_jumps_only() {
        let text = "\
*mangle
:PREROUTING ACCEPT [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:SVCP-SERVICES - [0:0]
:SVCP-SVC-0123456789ABCDEF - [0:0]
-A PREROUTING -m comment --comment \"svcproxy: Kubernetes Services\" -j SVCP-SERVICES
-A PREROUTING -j KUBE-SERVICES
-A SVCP-SERVICES -d 10.0.0.1/32 -j SVCP-SVC-0123456789ABCDEF
COMMIT
*filter
:INPUT ACCEPT [0:0]
:SVCP-FILTER - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -m conntrack --ctstate NEW -j SVCP-FILTER
COMMIT
";
        let found = parse_save(text);
        assert!(!found.contains_key("mangle"));
        let nat = &found["nat"];
        assert_eq!(
            nat.chains.iter().collect::<Vec<_>>(),
            ["SVCP-SERVICES", "SVCP-SVC-0123456789ABCDEF"]
        );
        assert_eq!(nat.jumps.len(), 1, "{:?}", nat.jumps);
        assert_eq!(
            found["filter"].jumps,
            ["-A INPUT -m conntrack --ctstate NEW -j SVCP-FILTER"]
        );
    }
}
