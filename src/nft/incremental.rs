//! Compile and apply only what changed: the nftables backend of a long-running process.
//!
//! A full compile of 10k Services (plan, render, compare every set with what was applied) costs
//! tens of milliseconds before nft even runs, for a change that is usually one EndpointSlice.
//! [`Incremental`] keeps the last snapshot and plan; the backend-neutral
//! [`crate::incremental`] finds the Services whose objects changed and plans just those (old
//! and new); this module renders them (`render::fragment`, the same code as a full render) and
//! sends the difference as element and chain commands. The plan it keeps is patched to equal
//! what a full compile of the new snapshot gives, and the commands take the kernel from the old
//! plan's ruleset to the new one's (a property test holds both to that, through the in-memory
//! kernel).
//!
//! The rendered ruleset is not kept: it is a pure function of the plan, and at 10k Services it
//! was the largest thing the agent held (a third of its heap). A whole compile renders the old
//! plan again when it needs the old tables (to send a difference, or to refresh in place): tens
//! of milliseconds at 10k Services, on a path that costs a second.
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
}

impl State {
    fn new(compiled: Compiled) -> State {
        let lanes = compiled.plan.families.iter().map(lane_counts).collect();
        State { compiled, lanes }
    }

    /// The ruleset of the kept plan: what the kernel holds when `in_sync`.
    fn ruleset(&self) -> Ruleset {
        render::render(&self.compiled.plan)
    }
}

/// svcproxy's nftables tables, kept in step with a changing snapshot.
pub struct Incremental {
    config: ProxyConfig,
    nft: NftCommand,
    state: Option<State>,
    /// Whether the kernel holds the ruleset of `state`'s plan.
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
        let State { compiled, lanes } = state;
        let followed = follow_partial(
            compiled,
            plan,
            snapshot,
            || nft.apply(lanes),
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
        // A resync of the snapshot applied last (the hourly one, when nothing changed since)
        // needs no compile: the kept plan is that snapshot's (patched, it equals a whole
        // compile's), and compiling again would hold two plans at the agent's largest moment.
        // Comparing the two snapshots costs what differs between them (they share their maps).
        let reuse = fallback.is_none()
            && self
                .state
                .as_ref()
                .is_some_and(|kept| kept.compiled.snapshot == snapshot);
        let new = match self.state.take() {
            Some(kept) if reuse => kept,
            kept => {
                self.state = kept;
                State::new(Compiled::new(snapshot, &self.config))
            }
        };
        let ruleset = render::render(&new.compiled.plan);
        // The tables the kernel holds (or held, before a failure or a resync request), rendered
        // again from the kept plan, and dropped before nft runs: whole to send the difference,
        // as a skeleton (no elements) to refresh them in place. Two whole rulesets side by side
        // are the agent's largest moment, so the hourly resync does without.
        let kept = if reuse {
            Some(&new)
        } else {
            self.state.as_ref()
        };
        let old = kept.map(|old| {
            if self.in_sync {
                old.ruleset()
            } else {
                render::skeleton(&old.compiled.plan)
            }
        });
        let partial = match old.as_ref().filter(|_| self.in_sync) {
            Some(old) => diff(old, &ruleset).map_err(|e| e.to_string()),
            None => Err(self.full_because.to_string()),
        };
        let result = match partial {
            Ok(d) => {
                drop((old, ruleset));
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
                let size = (ruleset.element_count(), ruleset.chain_count());
                let t = Instant::now();
                // What replaces the tables if they are not refreshed in place.
                let replacing = match old.filter(|old| ruleset.refreshes(old)) {
                    Some(old) => {
                        match self
                            .nft
                            .run_script_from(|out| ruleset.drain_refresh_script(&old, out))
                        {
                            Ok(bytes) => Ok(bytes),
                            Err(e) => {
                                tracing::info!(
                                    "cannot refresh the tables in place, replacing them: {e}"
                                );
                                Err(render::render(&new.compiled.plan))
                            }
                        }
                    }
                    None => Err(ruleset),
                };
                let run = match replacing {
                    Ok(bytes) => Ok((bytes, format!("{because}; refreshed in place"))),
                    Err(ruleset) => self
                        .nft
                        .run_script_from(|out| ruleset.drain_script(out))
                        .map(|bytes| (bytes, because)),
                };
                run.map(|(bytes, because)| full_report(size, bytes, t.elapsed(), because))
            }
        };
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                if reuse {
                    // Still what the kernel held last (a refused transaction changes nothing).
                    self.state = Some(new);
                }
                self.fail("the last apply failed");
                return Err(e);
            }
        };
        let compile = start.elapsed().saturating_sub(report.duration);
        let stale_udp = match &self.state {
            Some(old) if !reuse => stale_udp(&old.compiled.plan, &new.compiled.plan),
            _ => Vec::new(),
        };
        let services = if reuse {
            0
        } else {
            new.compiled.snapshot.services.len()
        };
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

/// A sync of the changed Services only: the plan's changes, the commands, and how the kept
/// lane counts change once nft accepted them.
struct Delta {
    plan: PlanDelta,
    parts: DiffParts,
    nft: Patches,
}

/// Changes to the kept lane counts, per family.
#[derive(Default)]
struct Patches {
    families: Vec<FamilyPatch>,
}

#[derive(Default)]
struct FamilyPatch {
    lanes: BTreeMap<(Lane, usize), i32>,
    /// Per set: elements deleted and added.
    elements: BTreeMap<String, (Vec<Element>, Vec<Element>)>,
}

impl Patches {
    fn apply(self, lanes: &mut [BTreeMap<(Lane, usize), u32>]) -> Result<(), Fallback> {
        for (fi, p) in self.families.into_iter().enumerate() {
            let Some(lanes) = lanes.get_mut(fi) else {
                return Err(Fallback::Invariant(format!(
                    "no lane counts for family {fi}"
                )));
            };
            adjust(lanes, p.lanes)?;
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
            parts.add_set(prefix, &render::slot_set(family, lane, k));
            parts.add_chain(prefix, &render::slot_chain(family, lane, k));
        }
        for k in slots_is..slots_was {
            parts.delete_chain(prefix, &lane.slot(k));
            parts.delete_set(prefix, &render::slot_set(family, lane, k));
        }
        for n in is.difference(&was).filter(|n| **n > 1) {
            parts.add_chain(prefix, &render::pick_chain(lane, *n));
        }
        for n in was.difference(&is).filter(|n| **n > 1) {
            parts.delete_chain(prefix, &lane.pick(*n));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_kernel::FakeKernel;
    use crate::incremental::tests::generated;
    use crate::synthetic;
    use std::sync::Arc;

    /// A whole compile of `snapshot`, and an in-memory kernel holding its ruleset.
    fn whole(snapshot: Snapshot, config: &ProxyConfig) -> (State, Arc<FakeKernel>) {
        let state = State::new(Compiled::new(snapshot, config));
        let kernel = FakeKernel::new();
        NftCommand::new(kernel.runner())
            .run_script(&state.ruleset().script())
            .expect("the kernel takes a whole ruleset");
        (state, kernel)
    }

    /// Runs the delta path: sends its commands to `kernel` and patches the state as a
    /// successful apply does.
    fn step(
        state: &mut State,
        kernel: &Arc<FakeKernel>,
        new: Snapshot,
        config: &ProxyConfig,
    ) -> Result<(), Fallback> {
        let d = delta(state, &new, config)?;
        let diff = d.parts.finish();
        if diff.report.commands > 0 {
            NftCommand::new(kernel.runner())
                .run_script(&diff.script)
                .unwrap_or_else(|e| panic!("the kernel refused the delta: {e}\n{}", diff.script));
        }
        d.plan.apply(&mut state.compiled)?;
        d.nft.apply(&mut state.lanes)?;
        state.compiled.snapshot = new;
        Ok(())
    }

    /// The patched state is a whole compile's, and the commands sent took the kernel to the
    /// tables a whole compile writes.
    fn assert_same(patched: &State, kernel: &FakeKernel, config: &ProxyConfig) {
        let (fresh, fresh_kernel) = whole(patched.compiled.snapshot.clone(), config);
        assert_eq!(patched.compiled.plan, fresh.compiled.plan);
        assert_eq!(patched.compiled.refs, fresh.compiled.refs);
        assert_eq!(patched.lanes, fresh.lanes);
        assert_eq!(kernel.nft_tables(), fresh_kernel.nft_tables());
    }

    #[test]
    fn an_endpoint_change_compiles_one_service() {
        let config = ProxyConfig::default();
        let (mut state, kernel) = whole(synthetic::cluster(50, 3), &config);
        let mut next = state.compiled.snapshot.clone();
        Arc::make_mut(synthetic::nth_mut(&mut next.slices, 7)).endpoints[1].address =
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
        step(&mut state, &kernel, next, &config).unwrap();
        assert_same(&state, &kernel, &config);
    }

    /// A kept state that contradicts itself is a fallback to a whole compile, counted, and the
    /// sync still happens.
    #[test]
    fn an_inconsistent_state_falls_back_to_a_whole_compile() {
        let config = ProxyConfig::default();
        let (mut state, _) = whole(synthetic::cluster(50, 3), &config);
        // A lane count lost: removing the last Service with 3 endpoints would take it below 0.
        state.lanes[0].clear();
        let mut next = state.compiled.snapshot.clone();
        Arc::make_mut(synthetic::nth_mut(&mut next.slices, 7))
            .endpoints
            .pop();
        let err = delta(&state, &next, &config).err().unwrap();
        assert_eq!(err.reason(), "invariant", "{err}");
        // Through the backend, against the in-memory kernel.
        let kernel = FakeKernel::new();
        let mut inc = Incremental::new(NftCommand::new(kernel.runner()), config.clone());
        inc.sync(state.compiled.snapshot.clone()).unwrap();
        inc.state.as_mut().unwrap().lanes[0].clear();
        let out = inc.sync(next.clone()).unwrap();
        assert_eq!(
            out.fallback.as_ref().map(Fallback::reason),
            Some("invariant")
        );
        assert_eq!(out.services_compiled, 50);
        assert_same(inc.state.as_ref().unwrap(), &kernel, &config);
        // And the next change is incremental again.
        let mut again = next.clone();
        Arc::make_mut(synthetic::nth_mut(&mut again.slices, 9))
            .endpoints
            .pop();
        let out = inc.sync(again).unwrap();
        assert_eq!((out.services_compiled, out.fallback), (1, None));
    }

    #[test]
    fn a_resync_of_the_snapshot_applied_last_compiles_nothing_and_refreshes_in_place() {
        let config = ProxyConfig::default();
        let kernel = FakeKernel::new();
        let mut inc = Incremental::new(NftCommand::new(kernel.runner()), config.clone());
        let snapshot = synthetic::cluster(50, 3);
        inc.sync(snapshot.clone()).unwrap();
        inc.invalidate();
        let out = inc.sync(snapshot.clone()).unwrap();
        assert_eq!(out.report.kind, crate::report::SyncKind::Full);
        assert_eq!(out.services_compiled, 0);
        let because = out.report.full_because.unwrap_or_default();
        assert!(because.ends_with("refreshed in place"), "{because}");
        assert_same(inc.state.as_ref().unwrap(), &kernel, &config);
        // A resync of a changed snapshot compiles it.
        let mut next = snapshot;
        Arc::make_mut(synthetic::nth_mut(&mut next.slices, 9))
            .endpoints
            .pop();
        inc.invalidate();
        let out = inc.sync(next).unwrap();
        assert_eq!(
            (out.report.kind, out.services_compiled),
            (crate::report::SyncKind::Full, 50)
        );
        assert_same(inc.state.as_ref().unwrap(), &kernel, &config);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Patching Service by Service gives exactly what a whole compile gives, in the kept
        /// state and in the kernel.
        #[test]
        fn patched_state_equals_a_whole_compile(
            snapshots in proptest::collection::vec(generated::snapshot(), 2..8),
            cidrs in proptest::prelude::any::<bool>(),
        ) {
            let config = generated::config(cidrs);
            let mut it = snapshots.into_iter();
            let (mut state, mut kernel) = whole(it.next().unwrap(), &config);
            for next in it {
                match step(&mut state, &kernel, next.clone(), &config) {
                    Ok(()) => assert_same(&state, &kernel, &config),
                    Err(_) => (state, kernel) = whole(next, &config),
                }
            }
        }
    }
}
