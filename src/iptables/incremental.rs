//! Compile and apply only what changed: the iptables backend of a long-running process.
//!
//! A whole compile re-plans and re-renders every Service (at 10k Services, about 200k rule
//! strings) and compares every chain with what was applied, for a change that is usually one
//! EndpointSlice. [`Incremental`] keeps the last plan ([`Compiled`]) and the rules applied; the
//! backend-neutral [`crate::incremental`] finds the changed Services and plans just those (old
//! and new); this module renders them with the same code as a whole render
//! (`render::service_chains`) and writes only the chains that differ:
//!
//! * a changed Service's own chains (`SVCP-SVC-`, `-SVL-`, `-EXT-`, `-SEP-`: named by a hash of
//!   the Service port, so no other Service writes them) are declared and refilled, new ones
//!   created, and the ones it no longer has flushed and deleted;
//! * the dispatch chains every Service has a rule in (`SVCP-SERVICES`, `SVCP-NODEPORTS`,
//!   `SVCP-FILTER`) are rebuilt, from the patched plan, only when the changed Services' rules in
//!   them differ (a Service or a port comes or goes, a Service loses its last endpoint) or a
//!   ClusterIP comes or goes, and then edited in place (`-D` by spec, `-I` at its position) when
//!   only a few rules in one stretch differ, else written whole;
//! * an endpoint on this node has a chain of its own (hairpin masquerade) in every Service that
//!   has it: when an address enters or leaves the node's set, the unchanged Services that name
//!   it are rendered again too.
//!
//! When the change is not local to some Services it compiles everything ([`Fallback`]) and
//! sends the chains that differ from what was applied (`Iptables::apply`). The kept rules are
//! patched to equal a whole render of the new plan (a property test holds it to that), and
//! only after iptables-restore accepted the input; a failed restore makes the next sync full.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::conntrack::stale_udp;
use crate::incremental::{Compiled, Fallback, PlanDelta, plan_delta};
use crate::iptables::apply::{Iptables, IptablesCommand, IptablesError};
use crate::iptables::render::{
    self, Chain, Ruleset, Table, dispatch_chains, is_service_chain, service_chains, write_table,
};
use crate::model::{IpFamily, ObjectRef, ProxyConfig, Snapshot};
use crate::plan::{Destination, Plan, Route};
use crate::report::{ApplyReport, Outcome, SyncKind, follow_partial};

/// svcproxy's iptables chains, kept in step with a changing snapshot.
#[derive(Debug)]
pub struct Incremental {
    config: ProxyConfig,
    ipt: Iptables,
    /// What the kernel holds when `ipt` has something applied.
    state: Option<Compiled>,
}

impl Incremental {
    pub fn new(cmd: IptablesCommand, config: ProxyConfig) -> Self {
        Incremental {
            config,
            ipt: Iptables::new(cmd),
            state: None,
        }
    }

    pub fn command(&self) -> &IptablesCommand {
        self.ipt.command()
    }

    /// The next sync rewrites every chain (and lists the kernel's, to repair drift).
    pub fn invalidate(&mut self) {
        self.ipt.invalidate();
    }

    /// The last snapshot applied.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.state.as_ref().map(|s| &s.snapshot)
    }

    /// The plan of the last snapshot applied.
    pub fn plan(&self) -> Option<&Plan> {
        self.state.as_ref().map(|s| &s.plan)
    }

    /// The rules last applied, if the kernel holds them.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.ipt.applied()
    }

    /// Makes the kernel hold the rules of `snapshot`.
    pub fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, IptablesError> {
        let start = Instant::now();
        let mut fallback = None;
        if let (Some(kept), Some(applied)) = (self.state.as_ref(), self.ipt.applied()) {
            match delta(kept, applied, &snapshot, &self.config) {
                Ok(d) => return self.apply_delta(d, snapshot, start),
                Err(f) => fallback = Some(f),
            }
        }
        self.whole(snapshot, start, fallback)
    }

    fn apply_delta(
        &mut self,
        d: Delta,
        snapshot: Snapshot,
        start: Instant,
    ) -> Result<Outcome, IptablesError> {
        let Delta {
            plan,
            families,
            mut report,
        } = d;
        let mut inputs = Vec::new();
        for f in &families {
            let mut input = String::new();
            for t in &f.tables {
                let chains: Vec<&Chain> = t.changed.iter().collect();
                let edits: Vec<String> = t.edited.iter().flat_map(|(_, e)| e.clone()).collect();
                write_table(&mut input, t.table, &chains, &edits, &t.gone);
            }
            if !input.is_empty() {
                report.commands += 1;
                report.script_bytes += input.len();
                inputs.push((f.family, input));
            }
        }
        let compile = start.elapsed();
        let t = Instant::now();
        self.ipt.restore_partial(&inputs)?;
        report.duration = t.elapsed();
        let Some(kept) = self.state.as_mut() else {
            self.ipt.invalidate();
            return self.whole(
                snapshot,
                start,
                Some(Fallback::Invariant("no state".into())),
            );
        };
        let ipt = &mut self.ipt;
        let rendering = || match ipt.applied_mut() {
            Some(rules) => patch(rules, families),
            None => Err(Fallback::Invariant("nothing applied".into())),
        };
        let followed = follow_partial(kept, plan, snapshot, rendering, report, compile);
        followed.or_else(|back| {
            let (f, snapshot) = *back;
            // The kernel took the input, but the kept state cannot follow it: rewrite every
            // chain from a whole compile.
            tracing::warn!("incremental sync: {f}; compiling every Service");
            self.ipt.invalidate();
            self.whole(snapshot, start, Some(f))
        })
    }

    /// Compiles everything and applies the chains that differ from what was applied (all of
    /// them when nothing is known to be applied).
    fn whole(
        &mut self,
        snapshot: Snapshot,
        start: Instant,
        fallback: Option<Fallback>,
    ) -> Result<Outcome, IptablesError> {
        let compiled = Compiled::new(snapshot, &self.config);
        let rules = render::render(&compiled.plan);
        let compile = start.elapsed();
        let report = self.ipt.apply(rules)?;
        let stale_udp = match &self.state {
            Some(old) => stale_udp(&old.plan, &compiled.plan),
            None => Vec::new(),
        };
        let services = compiled.snapshot.services.len();
        self.state = Some(compiled);
        if let Some(f) = &fallback {
            tracing::debug!("compiled every Service: {f}");
        }
        Ok(Outcome {
            report,
            compile,
            services_compiled: services,
            stale_udp,
            fallback,
        })
    }
}

/// The chains to write for the changed Services, and the plan's changes.
struct Delta {
    plan: PlanDelta,
    families: Vec<FamilyChange>,
    report: ApplyReport,
}

/// One family's chains to write.
struct FamilyChange {
    /// Index in the ruleset's families.
    index: usize,
    family: IpFamily,
    tables: Vec<TableChange>,
}

struct TableChange {
    table: Table,
    /// Chains declared (created, or flushed) and filled.
    changed: Vec<Chain>,
    /// Chains edited in place, as they will be, with the `-D`/`-I` lines that edit them.
    edited: Vec<(Chain, Vec<String>)>,
    /// Chains flushed and deleted.
    gone: Vec<String>,
}

/// At most this many rules deleted and inserted edit a dispatch chain in place; more, and it
/// is written whole.
const MAX_EDITS: usize = 16;

/// The `-D` and `-I` lines that turn `old` into `new` when they differ only in one stretch of
/// at most [`MAX_EDITS`] rules (a Service or a port come or gone), else `None` (write it whole).
///
/// A dispatch chain (`SVCP-SERVICES`: a rule per Service port) is written whole in one
/// restore: at 10k Services, 10k rules that iptables-nft parses and the kernel adds, about a
/// second for one new Service. Rules are deleted by their spec, so a kernel that drifted makes
/// the restore fail (and the next sync full) rather than lose another rule; `None` too when
/// a rule to delete appears twice, which a spec cannot tell apart.
fn edit_lines(old: &Chain, new: &Chain) -> Option<Vec<String>> {
    let (a, b) = (&old.rules, &new.rules);
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let removed = &a[prefix..a.len() - suffix];
    let inserted = &b[prefix..b.len() - suffix];
    if removed.len() + inserted.len() > MAX_EDITS
        || removed
            .iter()
            .any(|r| a.iter().filter(|x| *x == r).count() > 1)
    {
        return None;
    }
    let name = &new.name;
    let deletes = removed.iter().map(|r| format!("-D {name} {r}"));
    let inserts = inserted
        .iter()
        .enumerate()
        .map(|(i, r)| format!("-I {name} {} {r}", prefix + i + 1));
    Some(deletes.chain(inserts).collect())
}

/// The endpoints a destination's chains name.
fn endpoint_ips(d: &Destination) -> impl Iterator<Item = IpAddr> + '_ {
    let (a, b) = match &d.route {
        Route::Reject | Route::Drop => (None, None),
        Route::Internal(b) | Route::ExternalCluster(b) => (Some(b), None),
        Route::ExternalLocal { cluster, local } => (Some(cluster), local.as_ref()),
    };
    a.into_iter()
        .chain(b)
        .flat_map(|b| b.endpoints.iter().map(|e| e.ip()))
}

/// The chains that `new` changes, Service by Service; `Err` says why only a whole compile will
/// do.
fn delta(
    kept: &Compiled,
    applied: &Ruleset,
    new: &Snapshot,
    config: &ProxyConfig,
) -> Result<Delta, Fallback> {
    let plan = plan_delta(kept, new, config)?;
    let mut report = ApplyReport {
        kind: SyncKind::Partial,
        commands: 0,
        elements_added: 0,
        elements_deleted: 0,
        chains_changed: 0,
        script_bytes: 0,
        duration: Duration::ZERO,
        full_because: None,
    };
    let mut families = Vec::new();
    for (index, (fplan, fd)) in kept.plan.families.iter().zip(&plan.families).enumerate() {
        if fd.is_empty() {
            continue;
        }
        let Some(rules) = applied
            .families
            .get(index)
            .filter(|f| f.family == fplan.family)
        else {
            return Err(Fallback::Invariant(format!(
                "no rules applied for {:?}",
                fplan.family
            )));
        };
        let (Some(nat), Some(filter)) = (rules.table(Table::Nat), rules.table(Table::Filter))
        else {
            return Err(Fallback::Invariant("a table is missing".into()));
        };
        let hairpin_after = (!fd.hairpin.is_empty()).then(|| fd.hairpin_after(&fplan.hairpin));
        let hairpin_new = hairpin_after.as_ref().unwrap_or(&fplan.hairpin);
        // Unchanged Services whose endpoint chains depend on an address entering or leaving
        // this node's set.
        let flipped: HashSet<IpAddr> = fd
            .hairpin
            .iter()
            .map(|(ip, _)| *ip)
            .filter(|ip| fplan.hairpin.contains(ip) != hairpin_new.contains(ip))
            .collect();
        let mut also: Vec<&Destination> = Vec::new();
        if !flipped.is_empty() {
            let services: BTreeSet<&ObjectRef> = fplan
                .destinations
                .iter()
                .filter(|d| !fd.services.contains(&d.service))
                .filter(|d| endpoint_ips(d).any(|ip| flipped.contains(&ip)))
                .map(|d| &d.service)
                .collect();
            also = fplan
                .destinations
                .iter()
                .filter(|d| services.contains(&d.service))
                .collect();
        }
        let sorted = |v: &mut Vec<&Destination>| v.sort_by_key(|d| d.key());
        let mut before: Vec<&Destination> = fd.removed.iter().chain(also.iter().copied()).collect();
        let mut after: Vec<&Destination> = fd.added.iter().chain(also.iter().copied()).collect();
        sorted(&mut before);
        sorted(&mut after);
        let (old_dispatch, old_chains) = service_chains(fplan, &fplan.hairpin, before);
        let (new_dispatch, new_chains) = service_chains(fplan, hairpin_new, after);

        // The Services' own chains (all in nat).
        let old_by_name: HashMap<&str, &Chain> =
            old_chains.iter().map(|c| (c.name.as_str(), c)).collect();
        let new_names: HashSet<&str> = new_chains.iter().map(|c| c.name.as_str()).collect();
        let mut nat_change = TableChange {
            table: Table::Nat,
            changed: Vec::new(),
            edited: Vec::new(),
            gone: old_chains
                .iter()
                .filter(|c| !new_names.contains(c.name.as_str()))
                .map(|c| c.name.clone())
                .collect(),
        };
        for c in &new_chains {
            match old_by_name.get(c.name.as_str()) {
                Some(o) if *o == c => {}
                Some(o) => {
                    report.elements_deleted += o.rules.len();
                    nat_change.changed.push(c.clone());
                }
                None => {
                    if nat.chain(&c.name).is_some() {
                        return Err(Fallback::ChainName(c.name.clone()));
                    }
                    nat_change.changed.push(c.clone());
                }
            }
        }
        report.elements_deleted += nat_change
            .gone
            .iter()
            .filter_map(|g| old_by_name.get(g.as_str()))
            .map(|c| c.rules.len())
            .sum::<usize>();
        let mut filter_change = TableChange {
            table: Table::Filter,
            changed: Vec::new(),
            edited: Vec::new(),
            gone: Vec::new(),
        };
        // The dispatch chains, rebuilt only when the changed Services' rules in them changed.
        if old_dispatch != new_dispatch || !fd.cluster_ips.is_empty() {
            let cluster_ips = fd.cluster_ips_after(&fplan.cluster_ips);
            let chains = dispatch_chains(
                fplan,
                fd.destinations_after(&fplan.destinations),
                &cluster_ips,
            );
            for (table, chain) in chains {
                let (applied, change) = match table {
                    Table::Nat => (nat, &mut nat_change),
                    Table::Filter => (filter, &mut filter_change),
                };
                let old = applied.chain(&chain.name);
                if old == Some(&chain) {
                    continue;
                }
                match old.and_then(|o| edit_lines(o, &chain)) {
                    Some(edits) => {
                        // Each line deletes or inserts one rule.
                        let deletes = edits.iter().filter(|e| e.starts_with("-D ")).count();
                        report.elements_deleted += deletes;
                        report.elements_added += edits.len() - deletes;
                        change.edited.push((chain, edits));
                    }
                    None => {
                        report.elements_deleted += old.map_or(0, |c| c.rules.len());
                        change.changed.push(chain);
                    }
                }
            }
        }
        let mut tables = Vec::new();
        for t in [nat_change, filter_change] {
            report.chains_changed += t.changed.len() + t.edited.len() + t.gone.len();
            report.elements_added += t.changed.iter().map(|c| c.rules.len()).sum::<usize>();
            if !t.changed.is_empty() || !t.edited.is_empty() || !t.gone.is_empty() {
                tables.push(t);
            }
        }
        if !tables.is_empty() {
            families.push(FamilyChange {
                index,
                family: fplan.family,
                tables,
            });
        }
    }
    Ok(Delta {
        plan,
        families,
        report,
    })
}

/// Patches the kept rules as the restore did: the fixed chains in place, the per-Service
/// chains in name order after them (as a whole render has them).
fn patch(rules: &mut Ruleset, families: Vec<FamilyChange>) -> Result<(), Fallback> {
    for f in families {
        let Some(family) = rules.families.get_mut(f.index) else {
            return Err(Fallback::Invariant(format!("no family {}", f.index)));
        };
        for change in f.tables {
            let Some(t) = family.tables.iter_mut().find(|t| t.table == change.table) else {
                return Err(Fallback::Invariant(format!(
                    "no table {}",
                    change.table.as_str()
                )));
            };
            let fixed = t
                .chains
                .iter()
                .position(|c| is_service_chain(&c.name))
                .unwrap_or(t.chains.len());
            for name in &change.gone {
                match t.chains[fixed..].binary_search_by(|c| c.name.as_str().cmp(name)) {
                    Ok(i) => {
                        t.chains.remove(fixed + i);
                    }
                    Err(_) => return Err(Fallback::Invariant(format!("no chain {name}"))),
                }
            }
            let edited = change.edited.into_iter().map(|(chain, _)| chain);
            for chain in change.changed.into_iter().chain(edited) {
                if is_service_chain(&chain.name) {
                    match t.chains[fixed..].binary_search_by(|c| c.name.cmp(&chain.name)) {
                        Ok(i) => t.chains[fixed + i] = chain,
                        Err(i) => t.chains.insert(fixed + i, chain),
                    }
                } else {
                    match t.chains[..fixed].iter_mut().find(|c| c.name == chain.name) {
                        Some(c) => *c = chain,
                        None => {
                            return Err(Fallback::Invariant(format!("no chain {}", chain.name)));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incremental::tests::generated;
    use crate::synthetic;
    use std::sync::Arc;

    #[test]
    fn a_dispatch_chain_is_edited_in_place_when_one_stretch_changed() {
        let chain = |rules: &[&str]| Chain {
            name: "SVCP-SERVICES".into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
        };
        let old = chain(&["-d a -j A", "-d c -j C", "-j NODEPORTS"]);
        // A Service added between two others: inserted at its place.
        assert_eq!(
            edit_lines(
                &old,
                &chain(&["-d a -j A", "-d b -j B", "-d c -j C", "-j NODEPORTS"])
            ),
            Some(vec!["-I SVCP-SERVICES 2 -d b -j B".to_string()])
        );
        // One gone, by its spec; one replaced: deleted, then inserted where it was.
        assert_eq!(
            edit_lines(&old, &chain(&["-d c -j C", "-j NODEPORTS"])),
            Some(vec!["-D SVCP-SERVICES -d a -j A".to_string()])
        );
        assert_eq!(
            edit_lines(&old, &chain(&["-d a -j A", "-d c -j X", "-j NODEPORTS"])),
            Some(vec![
                "-D SVCP-SERVICES -d c -j C".to_string(),
                "-I SVCP-SERVICES 2 -d c -j X".to_string(),
            ])
        );
        // Too much changed, or a rule to delete that a spec cannot single out: written whole.
        let many: Vec<String> = (0..MAX_EDITS).map(|i| format!("-d {i} -j S{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(edit_lines(&chain(&many), &chain(&["-j NODEPORTS"])), None);
        let twice = chain(&["-d a -j A", "-d a -j A", "-j NODEPORTS"]);
        assert_eq!(
            edit_lines(&twice, &chain(&["-d a -j A", "-j NODEPORTS"])),
            None
        );
    }

    /// Runs the delta path without iptables: patches the state as a successful restore would.
    /// Returns the restore inputs' chain counts.
    fn step(
        kept: &mut Compiled,
        rules: &mut Ruleset,
        new: Snapshot,
        config: &ProxyConfig,
    ) -> Result<ApplyReport, Fallback> {
        let d = delta(kept, rules, &new, config)?;
        patch(rules, d.families)?;
        d.plan.apply(kept)?;
        kept.snapshot = new;
        Ok(d.report)
    }

    fn whole(snapshot: Snapshot, config: &ProxyConfig) -> (Compiled, Ruleset) {
        let kept = Compiled::new(snapshot, config);
        let rules = render::render(&kept.plan);
        (kept, rules)
    }

    fn assert_same(kept: &Compiled, rules: &Ruleset, config: &ProxyConfig) {
        let (fresh, fresh_rules) = whole(kept.snapshot.clone(), config);
        assert_eq!(kept.plan, fresh.plan);
        assert_eq!(*rules, fresh_rules);
    }

    #[test]
    fn an_endpoint_change_rewrites_one_chain() {
        let config = ProxyConfig::default();
        let (mut kept, mut rules) = whole(synthetic::cluster(50, 3), &config);
        let mut next = kept.snapshot.clone();
        Arc::make_mut(synthetic::nth_mut(&mut next.slices, 7)).endpoints[1].address =
            "10.200.0.1".parse().unwrap();
        let d = delta(&kept, &rules, &next, &config).unwrap();
        assert_eq!(d.plan.services, 1);
        assert_eq!(d.report.chains_changed, 1);
        let t = &d.families[0].tables[0];
        assert_eq!(t.table, Table::Nat);
        assert!(
            t.changed[0].name.starts_with("SVCP-SVC-"),
            "{:?}",
            t.changed
        );
        let report = step(&mut kept, &mut rules, next, &config).unwrap();
        assert_eq!(report.chains_changed, 1);
        assert_same(&kept, &rules, &config);
    }

    #[test]
    fn a_local_endpoint_changes_every_service_naming_it() {
        let config = ProxyConfig::default();
        // Two Services with the same endpoint address, on this node in one slice only: the
        // other Service's endpoint chain follows the node's set.
        let mut s = synthetic::cluster(3, 2);
        let slices: Vec<ObjectRef> = s.slices.keys().cloned().collect();
        let ip: IpAddr = "10.250.0.1".parse().unwrap();
        for (i, id) in slices.iter().take(2).enumerate() {
            let sl = Arc::make_mut(s.slices.get_mut(id).unwrap());
            sl.endpoints[0].address = ip;
            sl.endpoints[0].node_name = Some(if i == 0 { "node-0" } else { "node-5" }.into());
        }
        let (mut kept, mut rules) = whole(s.clone(), &config);
        let mut next = s.clone();
        Arc::make_mut(next.slices.get_mut(&slices[0]).unwrap()).endpoints[0].node_name =
            Some("node-7".into());
        step(&mut kept, &mut rules, next, &config).unwrap();
        assert_same(&kept, &rules, &config);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Patching Service by Service gives exactly the chains a whole render gives.
        #[test]
        fn patched_rules_equal_a_whole_render(
            snapshots in proptest::collection::vec(generated::snapshot(), 2..8),
            cidrs in proptest::prelude::any::<bool>(),
        ) {
            let config = generated::config(cidrs);
            let mut it = snapshots.into_iter();
            let (mut kept, mut rules) = whole(it.next().unwrap(), &config);
            for next in it {
                match step(&mut kept, &mut rules, next.clone(), &config) {
                    Ok(_) => assert_same(&kept, &rules, &config),
                    Err(_) => (kept, rules) = whole(next, &config),
                }
            }
        }
    }
}
