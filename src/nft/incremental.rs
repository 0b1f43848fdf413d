//! Compile and apply only what changed: the nftables backend of a long-running process.
//!
//! A full compile of 10k Services (plan, render, compare every set with what was applied) costs
//! tens of milliseconds before nft even runs, for a change that is usually one EndpointSlice.
//! [`Incremental`] keeps the last snapshot, plan and ruleset; the backend-neutral
//! [`crate::incremental`] finds the Services whose objects changed and plans just those (old
//! and new); this module renders them (`render::fragment`, the same code as a full render) and
//! sends the difference as element and chain commands. The plan and ruleset it keeps are
//! patched to equal what a full compile of the new snapshot gives (a property test holds it to
//! that).
//!
//! It falls back to a whole compile, still sent as a difference when one can express it, when
//! the change is not local to some Services ([`Fallback`]: the Node changed, Services claim the
//! same destination, a Service shares a ClusterIP, session affinity chains change, too many
//! Services changed, or the kept state broke an invariant). A failed apply, or
//! [`Incremental::invalidate`], makes the next sync rewrite the tables whole (in place).
//!
//! Nothing is patched until nft has accepted the transaction: after a failure the state still
//! describes what the kernel holds, so the next sync's stale-flow list is right.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Instant;

use crate::conntrack::stale_udp;
use crate::incremental::{Compiled, Fallback, PlanDelta, adjust, plan_delta};
use crate::model::{ObjectRef, ProxyConfig, Snapshot};
use crate::nft::apply::{ApplyError, DiffParts, NftCommand, diff, full_report};
use crate::nft::render::{self, Fragment, Lane};
use crate::nft::syntax::{Element, Family, Ruleset, Value};
use crate::plan::{FamilyPlan, Plan};
use crate::report::follow_partial;

pub use crate::incremental::MAX_CHANGED;
pub use crate::report::Outcome;

/// What was last applied, whole.
struct State {
    compiled: Compiled,
    /// Per family: how many destinations use each endpoint count in each lane.
    lanes: Vec<BTreeMap<(Lane, usize), u32>>,
    ruleset: Ruleset,
}

impl State {
    fn new(compiled: Compiled) -> State {
        let ruleset = render::render(&compiled.plan);
        let lanes = compiled.plan.families.iter().map(lane_counts).collect();
        State {
            compiled,
            lanes,
            ruleset,
        }
    }
}

/// svcproxy's nftables tables, kept in step with a changing snapshot.
pub struct Incremental {
    config: ProxyConfig,
    nft: NftCommand,
    state: Option<State>,
    /// Whether the kernel holds `state.ruleset`.
    in_sync: bool,
    /// Why the next sync is a full one, when it must be.
    full_because: &'static str,
}

impl Incremental {
    pub fn new(nft: NftCommand, config: ProxyConfig) -> Self {
        Incremental {
            config,
            nft,
            state: None,
            in_sync: false,
            full_because: "nothing applied yet",
        }
    }

    /// The next sync rewrites the tables whole (to repair drift).
    pub fn invalidate(&mut self) {
        self.fail("full resync requested");
    }

    fn fail(&mut self, because: &'static str) {
        self.in_sync = false;
        self.full_because = because;
    }

    /// The last snapshot applied.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.state.as_ref().map(|s| &s.compiled.snapshot)
    }

    /// The plan of the last snapshot applied.
    pub fn plan(&self) -> Option<&Plan> {
        self.state.as_ref().map(|s| &s.compiled.plan)
    }

    /// Makes the kernel hold the ruleset of `snapshot`.
    pub fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, ApplyError> {
        let start = Instant::now();
        let mut fallback = None;
        if let Some(state) = self.state.as_ref().filter(|_| self.in_sync) {
            match delta(state, &snapshot, &self.config) {
                Ok(d) => return self.apply_delta(d, snapshot, start),
                Err(reason) => fallback = Some(reason),
            }
        }
        self.whole(snapshot, start, fallback)
    }

    fn apply_delta(
        &mut self,
        d: Delta,
        snapshot: Snapshot,
        start: Instant,
    ) -> Result<Outcome, ApplyError> {
        let Delta { plan, parts, nft } = d;
        let diff = parts.finish();
        let compile = start.elapsed();
        let mut report = diff.report;
        let t = Instant::now();
        if report.commands > 0
            && let Err(e) = self.nft.run_script(&diff.script)
        {
            self.fail("the last apply failed");
            return Err(e);
        }
        report.duration = t.elapsed();
        let Some(state) = self.state.as_mut() else {
            // Unreachable (a delta is made from the state), but not worth a panic.
            self.fail("no state");
            return self.whole(
                snapshot,
                start,
                Some(Fallback::Invariant("no state".into())),
            );
        };
        let State {
            compiled,
            lanes,
            ruleset,
        } = state;
        let followed = follow_partial(
            compiled,
            plan,
            snapshot,
            || nft.apply(lanes, ruleset),
            report,
            compile,
        );
        followed.or_else(|back| {
            let (f, snapshot) = *back;
            // nft took the transaction, but the kept state cannot follow it: compile whole and
            // refresh the tables in place from what is kept (nft refusing that, replace them).
            tracing::warn!("incremental sync: {f}; compiling every Service");
            self.fail("the kept state is inconsistent");
            self.whole(snapshot, start, Some(f))
        })
    }

    /// Compiles everything; sends the difference if the kernel holds the last ruleset and a
    /// difference can express the change, else the whole tables.
    fn whole(
        &mut self,
        snapshot: Snapshot,
        start: Instant,
        fallback: Option<Fallback>,
    ) -> Result<Outcome, ApplyError> {
        let new = State::new(Compiled::new(snapshot, &self.config));
        let ruleset = &new.ruleset;
        let partial = match self.state.as_ref().filter(|_| self.in_sync) {
            Some(old) => diff(&old.ruleset, ruleset).map_err(|e| e.to_string()),
            None => Err(self.full_because.to_string()),
        };
        let result = match partial {
            Ok(d) => {
                let mut report = d.report;
                let t = Instant::now();
                if report.commands > 0 {
                    self.nft.run_script(&d.script).map(|()| {
                        report.duration = t.elapsed();
                        report
                    })
                } else {
                    Ok(report)
                }
            }
            Err(because) => {
                // The kernel holds the last ruleset applied (a refused transaction changes
                // nothing), so it can be refreshed in place, keeping session affinity; if it
                // drifted, nft refuses that and the tables are replaced.
                let refresh = self
                    .state
                    .as_ref()
                    .and_then(|old| ruleset.refresh_script(&old.ruleset));
                let t = Instant::now();
                let refreshed = match &refresh {
                    Some(script) => match self.nft.run_script(script) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::info!(
                                "cannot refresh the tables in place, replacing them: {e}"
                            );
                            false
                        }
                    },
                    None => false,
                };
                let (script, because, run) = match refresh.filter(|_| refreshed) {
                    Some(script) => (script, format!("{because}; refreshed in place"), Ok(())),
                    None => {
                        let script = ruleset.script();
                        let run = self.nft.run_script(&script);
                        (script, because, run)
                    }
                };
                run.map(|()| full_report(ruleset, script.len(), t.elapsed(), because))
            }
        };
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                self.fail("the last apply failed");
                return Err(e);
            }
        };
        let compile = start.elapsed().saturating_sub(report.duration);
        let stale_udp = match &self.state {
            Some(old) => stale_udp(&old.compiled.plan, &new.compiled.plan),
            None => Vec::new(),
        };
        let services = new.compiled.snapshot.services.len();
        // The old state is dropped here, after the kernel has the new rules.
        self.state = Some(new);
        self.in_sync = true;
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

/// How many destinations use each endpoint count in each lane.
fn lane_counts(f: &FamilyPlan) -> BTreeMap<(Lane, usize), u32> {
    let mut out = BTreeMap::new();
    for d in &f.destinations {
        for key in render::lane_sizes(d) {
            *out.entry(key).or_default() += 1;
        }
    }
    out
}

/// A sync of the changed Services only: the plan's changes, the commands, and how to patch the
/// kept ruleset once nft accepted them.
struct Delta {
    plan: PlanDelta,
    parts: DiffParts,
    nft: Patches,
}

/// Changes to the kept ruleset and lane counts, per family.
#[derive(Default)]
struct Patches {
    families: Vec<FamilyPatch>,
}

#[derive(Default)]
struct FamilyPatch {
    lanes: BTreeMap<(Lane, usize), i32>,
    /// Per set: elements deleted and added.
    elements: BTreeMap<String, (Vec<Element>, Vec<Element>)>,
    new_sets: Vec<crate::nft::syntax::Set>,
    gone_sets: Vec<String>,
    new_chains: Vec<crate::nft::syntax::Chain>,
    gone_chains: Vec<String>,
}

impl Patches {
    fn apply(
        self,
        lanes: &mut [BTreeMap<(Lane, usize), u32>],
        ruleset: &mut Ruleset,
    ) -> Result<(), Fallback> {
        for (fi, p) in self.families.into_iter().enumerate() {
            let (Some(lanes), Some(table)) = (lanes.get_mut(fi), ruleset.tables.get_mut(fi)) else {
                return Err(Fallback::Invariant(format!("no table for family {fi}")));
            };
            adjust(lanes, p.lanes)?;
            table.sets.extend(p.new_sets);
            for (name, (deleted, added)) in p.elements {
                let Some(set) = table.sets.iter_mut().find(|s| s.name == name) else {
                    return Err(Fallback::Invariant(format!("no set {name}")));
                };
                // A key deleted and added again (an endpoint slot's new endpoint) is replaced in
                // place: a remove and an insert would move every element after it, twice.
                let stays: std::collections::HashSet<&[Value]> =
                    added.iter().map(|e| &*e.key).collect();
                for e in deleted.iter().filter(|e| !stays.contains(&*e.key)) {
                    if let Ok(i) = set.elements.binary_search_by(|x| x.key.cmp(&e.key)) {
                        set.elements.remove(i);
                    }
                }
                for e in added {
                    match set.elements.binary_search_by(|x| x.key.cmp(&e.key)) {
                        Ok(i) => set.elements[i] = e,
                        Err(i) => set.elements.insert(i, e),
                    }
                }
            }
            table.sets.retain(|s| !p.gone_sets.contains(&s.name));
            table.chains.retain(|c| !p.gone_chains.contains(&c.name));
            table.chains.extend(p.new_chains);
        }
        Ok(())
    }
}

/// The nftables commands of the changes `new` makes to `state`, Service by Service; `Err`
/// says why only a whole compile will do.
fn delta(state: &State, new: &Snapshot, config: &ProxyConfig) -> Result<Delta, Fallback> {
    let plan = plan_delta(&state.compiled, new, config)?;
    let mut parts = DiffParts::default();
    let mut patches = Patches::default();
    for (fi, (fplan, fd)) in state
        .compiled
        .plan
        .families
        .iter()
        .zip(&plan.families)
        .enumerate()
    {
        let family = render::family_of(fplan.family);
        let prefix = format!("{} {}", family.as_str(), render::TABLE);
        let mut p = FamilyPatch::default();
        if fd.is_empty() {
            patches.families.push(p);
            continue;
        }
        // The shared entries first, so that one both deleted and added cancels out below.
        for (ip, owner) in &fd.cluster_ips {
            let svc = match owner {
                Some(svc) => svc,
                None => match state.compiled.plan.families[fi].cluster_ips.get(ip) {
                    Some(svc) => svc,
                    None => return Err(Fallback::Invariant(format!("no ClusterIP {ip}"))),
                },
            };
            let entry = p.elements.entry("cluster-ips".into()).or_default();
            let e = cluster_ip_element(*ip, svc);
            if owner.is_some() {
                entry.1.push(e);
            } else {
                entry.0.push(e);
            }
        }
        for (ip, present) in &fd.hairpin {
            let entry = p.elements.entry("hairpin".into()).or_default();
            if *present {
                entry.1.push(hairpin_element(*ip));
            } else {
                entry.0.push(hairpin_element(*ip));
            }
        }
        let old_frag = render::fragment(fplan.family, &fd.removed);
        let new_frag = render::fragment(fplan.family, &fd.added);
        if old_frag.affinity_chains != new_frag.affinity_chains
            || old_frag.affinity_sets != new_frag.affinity_sets
        {
            return Err(Fallback::Affinity);
        }
        for d in &fd.removed {
            for key in render::lane_sizes(d) {
                *p.lanes.entry(key).or_default() -= 1;
            }
        }
        for d in &fd.added {
            for key in render::lane_sizes(d) {
                *p.lanes.entry(key).or_default() += 1;
            }
        }
        let Some(lanes) = state.lanes.get(fi) else {
            return Err(Fallback::Invariant(format!(
                "no lane counts for family {fi}"
            )));
        };
        lane_chains(family, lanes, &mut p, &prefix, &mut parts)?;
        element_changes(&old_frag, &new_frag, &mut p);
        for (set, (deleted, added)) in &p.elements {
            let deleted: Vec<&Element> = deleted.iter().collect();
            let added: Vec<&Element> = added.iter().collect();
            parts.elements(&prefix, set, &deleted, &added);
        }
        patches.families.push(p);
    }
    Ok(Delta {
        plan,
        parts,
        nft: patches,
    })
}

fn cluster_ip_element(ip: IpAddr, svc: &ObjectRef) -> Element {
    Element::key(vec![Value::Addr(ip)]).with_comment(svc.to_string())
}

fn hairpin_element(ip: IpAddr) -> Element {
    Element::key(vec![Value::Addr(ip), Value::Addr(ip)])
}

/// The element differences between the old and new fragments of the changed Services, merged
/// into `p.elements` (after the shared entries, so that an entry both deleted and added, like a
/// hairpin address passed between two Services, cancels out).
fn element_changes(old: &Fragment, new: &Fragment, p: &mut FamilyPatch) {
    let names: BTreeSet<&String> = old.sets.keys().chain(new.sets.keys()).collect();
    let none = Vec::new();
    for name in names {
        let a = old.sets.get(name).unwrap_or(&none);
        let b = new.sets.get(name).unwrap_or(&none);
        if a == b {
            continue;
        }
        let entry = p.elements.entry(name.clone()).or_default();
        let new_by_key: HashMap<&[Value], &Element> = b.iter().map(|e| (&*e.key, e)).collect();
        let old_by_key: HashMap<&[Value], &Element> = a.iter().map(|e| (&*e.key, e)).collect();
        entry.0.extend(
            a.iter()
                .filter(|e| new_by_key.get(&*e.key) != Some(e))
                .cloned(),
        );
        entry.1.extend(
            b.iter()
                .filter(|e| old_by_key.get(&*e.key) != Some(e))
                .cloned(),
        );
    }
    // A key both deleted and added with the same element: nothing to do.
    for (deleted, added) in p.elements.values_mut() {
        let common: Vec<Element> = deleted
            .iter()
            .filter(|e| added.contains(e))
            .cloned()
            .collect();
        deleted.retain(|e| !common.contains(e));
        added.retain(|e| !common.contains(e));
    }
    p.elements
        .retain(|_, (d, a)| !d.is_empty() || !a.is_empty());
}

/// The endpoint slot maps and chains, and the picking chains, that appear or go with the new
/// endpoint counts of each lane.
fn lane_chains(
    family: Family,
    before: &BTreeMap<(Lane, usize), u32>,
    p: &mut FamilyPatch,
    prefix: &str,
    parts: &mut DiffParts,
) -> Result<(), Fallback> {
    let mut after = before.clone();
    adjust(&mut after, p.lanes.iter().map(|(k, d)| (*k, *d)))?;
    let lanes: BTreeSet<Lane> = before.keys().chain(after.keys()).map(|(l, _)| *l).collect();
    for lane in lanes {
        let counts = |m: &BTreeMap<(Lane, usize), u32>| -> BTreeSet<usize> {
            m.keys()
                .filter(|(l, _)| *l == lane)
                .map(|(_, n)| *n)
                .collect()
        };
        let (was, is) = (counts(before), counts(&after));
        let slots = |c: &BTreeSet<usize>| c.last().copied().unwrap_or(0);
        let (slots_was, slots_is) = (slots(&was), slots(&is));
        for k in slots_was..slots_is {
            let set = render::slot_set(family, lane, k);
            parts.add_set(prefix, &set);
            p.new_sets.push(set);
            let chain = render::slot_chain(family, lane, k);
            parts.add_chain(prefix, &chain);
            p.new_chains.push(chain);
        }
        for k in slots_is..slots_was {
            let name = lane.slot(k);
            parts.delete_chain(prefix, &name);
            parts.delete_set(prefix, &render::slot_set(family, lane, k));
            p.gone_chains.push(name.clone());
            p.gone_sets.push(name);
        }
        for n in is.difference(&was).filter(|n| **n > 1) {
            let chain = render::pick_chain(lane, *n);
            parts.add_chain(prefix, &chain);
            p.new_chains.push(chain);
        }
        for n in was.difference(&is).filter(|n| **n > 1) {
            parts.delete_chain(prefix, &lane.pick(*n));
            p.gone_chains.push(lane.pick(*n));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incremental::tests::generated;
    use crate::nft::syntax::Table;
    use crate::synthetic;
    use std::sync::Arc;

    /// Runs the delta path without nft: patches the state as a successful apply would.
    fn step(state: &mut State, new: Snapshot, config: &ProxyConfig) -> Result<(), Fallback> {
        let d = delta(state, &new, config)?;
        d.plan.apply(&mut state.compiled)?;
        d.nft.apply(&mut state.lanes, &mut state.ruleset)?;
        state.compiled.snapshot = new;
        Ok(())
    }

    fn whole(snapshot: Snapshot, config: &ProxyConfig) -> State {
        State::new(Compiled::new(snapshot, config))
    }

    /// A table with its sets and chains in name order: the patched ruleset holds the same things
    /// as a fresh render, not always in the same order.
    fn canonical(table: &Table) -> Table {
        let mut t = table.clone();
        t.sets.sort_by(|a, b| a.name.cmp(&b.name));
        t.chains.sort_by(|a, b| a.name.cmp(&b.name));
        t
    }

    fn assert_same(patched: &State, config: &ProxyConfig) {
        let fresh = whole(patched.compiled.snapshot.clone(), config);
        assert_eq!(patched.compiled.plan, fresh.compiled.plan);
        assert_eq!(patched.compiled.refs, fresh.compiled.refs);
        assert_eq!(patched.lanes, fresh.lanes);
        for (a, b) in patched.ruleset.tables.iter().zip(&fresh.ruleset.tables) {
            assert_eq!(canonical(a), canonical(b));
        }
    }

    #[test]
    fn an_endpoint_change_compiles_one_service() {
        let config = ProxyConfig::default();
        let mut state = whole(synthetic::cluster(50, 3), &config);
        let mut next = state.compiled.snapshot.clone();
        Arc::make_mut(next.slices.values_mut().nth(7).unwrap()).endpoints[1].address =
            "10.200.0.1".parse().unwrap();
        let d = delta(&state, &next, &config).unwrap();
        assert_eq!(d.plan.services, 1);
        let diff = d.parts.finish();
        // Endpoints are sorted: the new one shifts the later ones by a slot.
        assert_eq!(
            (diff.report.elements_deleted, diff.report.elements_added),
            (2, 2),
            "{}",
            diff.script
        );
        assert_eq!(diff.report.chains_changed, 0, "{}", diff.script);
        step(&mut state, next, &config).unwrap();
        assert_same(&state, &config);
    }

    /// A kept state that contradicts itself is a fallback to a whole compile, counted, and the
    /// sync still happens (here without nft: the state is never in the kernel).
    #[test]
    fn an_inconsistent_state_falls_back_to_a_whole_compile() {
        let config = ProxyConfig::default();
        let mut state = whole(synthetic::cluster(50, 3), &config);
        // A lane count lost: removing the last Service with 3 endpoints would take it below 0.
        state.lanes[0].clear();
        let mut next = state.compiled.snapshot.clone();
        Arc::make_mut(next.slices.values_mut().nth(7).unwrap())
            .endpoints
            .pop();
        let err = delta(&state, &next, &config).err().unwrap();
        assert_eq!(err.reason(), "invariant", "{err}");
        // Through the backend, with tools that accept anything.
        #[derive(Debug)]
        struct Accept;
        impl crate::process::Tools for Accept {
            fn run(&self, _: &[String], _: Option<&str>) -> std::io::Result<crate::process::Ran> {
                Ok(crate::process::Ran::ok(""))
            }
        }
        let mut inc = Incremental::new(
            NftCommand::new(crate::process::Runner::fake(Arc::new(Accept))),
            config.clone(),
        );
        inc.sync(state.compiled.snapshot.clone()).unwrap();
        inc.state.as_mut().unwrap().lanes[0].clear();
        let out = inc.sync(next.clone()).unwrap();
        assert_eq!(
            out.fallback.as_ref().map(Fallback::reason),
            Some("invariant")
        );
        assert_eq!(out.services_compiled, 50);
        assert_same(inc.state.as_ref().unwrap(), &config);
        // And the next change is incremental again.
        let mut again = next.clone();
        Arc::make_mut(again.slices.values_mut().nth(9).unwrap())
            .endpoints
            .pop();
        let out = inc.sync(again).unwrap();
        assert_eq!((out.services_compiled, out.fallback), (1, None));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Patching Service by Service gives exactly what a whole compile gives.
        #[test]
        fn patched_state_equals_a_whole_compile(
            snapshots in proptest::collection::vec(generated::snapshot(), 2..8),
            cidrs in proptest::prelude::any::<bool>(),
        ) {
            let config = generated::config(cidrs);
            let mut it = snapshots.into_iter();
            let mut state = whole(it.next().unwrap(), &config);
            for next in it {
                match step(&mut state, next.clone(), &config) {
                    Ok(()) => assert_same(&state, &config),
                    Err(_) => state = whole(next, &config),
                }
            }
        }
    }
}
