//! Compile and apply only what changed: the nftables backend of a long-running process.
//!
//! A full compile of 10k Services (plan, render, compare every set with what was applied) costs
//! tens of milliseconds before nft even runs, for a change that is usually one EndpointSlice.
//! [`Incremental`] keeps the last snapshot, plan and ruleset, finds the Services whose objects
//! changed, plans and renders just those (old and new, with the same functions as a full
//! compile: `plan::plan_service`, `render::fragment`) and sends the difference. The plan and
//! ruleset it keeps are patched to equal what a full compile of the new snapshot gives (a
//! property test holds it to that).
//!
//! It falls back to a whole compile, still sent as a difference when one can express it, when
//! the change is not local to some Services: the Node or the configuration changed, Services
//! claim the same destination, a Service shares a ClusterIP, session affinity chains change,
//! or more than [`MAX_CHANGED`] Services changed at once. A failed apply, or
//! [`Incremental::invalidate`], makes the next sync rewrite the tables whole.
//!
//! Nothing is patched until nft has accepted the transaction: after a failure the state still
//! describes what the kernel holds, so the next sync's stale-flow list is right.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conntrack::{StaleFlows, stale_udp};
use crate::model::{EndpointSlice, ObjectRef, ProxyConfig, Snapshot};
use crate::nft::apply::{ApplyError, ApplyReport, DiffParts, NftCommand, SyncKind, diff};
use crate::nft::render::{self, Fragment, Lane};
use crate::nft::syntax::{Element, Family, Ruleset, Value};
use crate::plan::{
    ClusterIpMasquerade, Destination, FamilyContext, FamilyPlan, FamilyRefs, LocalTraffic,
    NodePortMatch, Plan, ServicePart, plan_counted, plan_service,
};

/// Above this many changed Services a whole compile is cheaper than patching one by one.
pub const MAX_CHANGED: usize = 100;

/// The result of one sync.
#[derive(Debug)]
pub struct Outcome {
    /// What was sent to the kernel; its `duration` is nft's alone.
    pub report: ApplyReport,
    /// Planning, rendering and working out the difference, before nft ran.
    pub compile: Duration,
    /// How many Services were compiled: all of them, or only the changed ones.
    pub services_compiled: usize,
    /// UDP flows made stale by this sync (see `conntrack`).
    pub stale_udp: Vec<StaleFlows>,
}

/// What was last applied, whole.
struct State {
    snapshot: Snapshot,
    plan: Plan,
    /// Per family (as `plan.families`).
    refs: Vec<FamilyRefs>,
    /// Per family: how many destinations use each endpoint count in each lane.
    lanes: Vec<BTreeMap<(Lane, usize), u32>>,
    ruleset: Ruleset,
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
        self.state.as_ref().map(|s| &s.snapshot)
    }

    /// The plan of the last snapshot applied.
    pub fn plan(&self) -> Option<&Plan> {
        self.state.as_ref().map(|s| &s.plan)
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
        let diff = d.parts.finish();
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
        let state = self.state.as_mut().expect("a delta needs a state");
        let stale_udp = stale_udp(&d.old_plan, &d.new_plan);
        d.patches.apply(state);
        state.snapshot = snapshot;
        Ok(Outcome {
            report,
            compile,
            services_compiled: d.services,
            stale_udp,
        })
    }

    /// Compiles everything; sends the difference if the kernel holds the last ruleset and a
    /// difference can express the change, else the whole tables.
    fn whole(
        &mut self,
        snapshot: Snapshot,
        start: Instant,
        reason: Option<String>,
    ) -> Result<Outcome, ApplyError> {
        let (plan, refs) = plan_counted(&snapshot, &self.config);
        let ruleset = render::render(&plan);
        let lanes = plan.families.iter().map(lane_counts).collect();
        let partial = match self.state.as_ref().filter(|_| self.in_sync) {
            Some(old) => diff(&old.ruleset, &ruleset),
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
                run.map(|()| ApplyReport {
                    kind: SyncKind::Full,
                    commands: 1,
                    elements_added: ruleset
                        .tables
                        .iter()
                        .flat_map(|t| &t.sets)
                        .map(|s| s.elements.len())
                        .sum(),
                    elements_deleted: 0,
                    chains_changed: ruleset.tables.iter().map(|t| t.chains.len()).sum(),
                    script_bytes: script.len(),
                    duration: t.elapsed(),
                    full_because: Some(because),
                })
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
            Some(old) => stale_udp(&old.plan, &plan),
            None => Vec::new(),
        };
        let services = snapshot.services.len();
        self.state = Some(State {
            snapshot,
            plan,
            refs,
            lanes,
            ruleset,
        });
        self.in_sync = true;
        if let Some(reason) = reason {
            tracing::debug!("compiled every Service: {reason}");
        }
        Ok(Outcome {
            report,
            compile,
            services_compiled: services,
            stale_udp,
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

/// The Services whose Service or EndpointSlice objects differ between two snapshots.
fn changed_services<'a>(old: &'a Snapshot, new: &'a Snapshot) -> BTreeSet<&'a ObjectRef> {
    let mut out = BTreeSet::new();
    merge_diff(&old.services, &new.services, |id, _, _| {
        out.insert(id);
    });
    merge_diff(&old.slices, &new.slices, |_, a, b| {
        out.extend(a.map(|s| &s.service));
        out.extend(b.map(|s| &s.service));
    });
    out
}

/// Calls `f` for every key whose value differs between two maps (missing on one side: `None`).
/// A value shared by both snapshots (the same `Arc`) is unchanged without comparing it.
fn merge_diff<'a, V: PartialEq>(
    old: &'a BTreeMap<ObjectRef, Arc<V>>,
    new: &'a BTreeMap<ObjectRef, Arc<V>>,
    mut f: impl FnMut(&'a ObjectRef, Option<&'a V>, Option<&'a V>),
) {
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((k, v)), None) => {
                f(k, Some(&**v), None);
                o.next();
            }
            (None, Some((k, v))) => {
                f(k, None, Some(&**v));
                n.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    f(ka, Some(&**va), None);
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    f(kb, None, Some(&**vb));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) && va != vb {
                        f(ka, Some(&**va), Some(&**vb));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

/// The slices of each of `services` in a snapshot. A Service's slices are in its namespace, so
/// only that namespace's slices are looked at (the whole map is slow to walk: at 10k slices,
/// 1 ms per walk, mostly cache misses).
fn slices_of<'a>(
    snapshot: &'a Snapshot,
    services: &BTreeSet<&ObjectRef>,
) -> HashMap<&'a ObjectRef, Vec<&'a EndpointSlice>> {
    let mut out: HashMap<&ObjectRef, Vec<&EndpointSlice>> = HashMap::new();
    let namespaces: BTreeSet<&str> = services.iter().map(|s| s.namespace.as_str()).collect();
    for ns in namespaces {
        let from = ObjectRef::new(ns, "");
        for s in snapshot
            .slices
            .range(from..)
            .map(|(_, s)| s)
            .take_while(|s| s.id.namespace == ns)
        {
            if services.contains(&s.service) {
                out.entry(&s.service).or_default().push(s);
            }
        }
    }
    out
}

/// A sync of the changed Services only: the commands, and how to patch the state once nft
/// accepted them.
struct Delta {
    parts: DiffParts,
    patches: Patches,
    /// The changed Services' destinations before and after (for stale UDP flows).
    old_plan: Plan,
    new_plan: Plan,
    services: usize,
}

/// Changes to the kept plan and ruleset, per family.
#[derive(Default)]
struct Patches {
    families: Vec<FamilyPatch>,
}

#[derive(Default)]
struct FamilyPatch {
    removed: Vec<Destination>,
    added: Vec<Destination>,
    cluster_ips: Vec<(IpAddr, Option<ObjectRef>)>,
    cluster_ip_refs: Vec<(IpAddr, i32)>,
    hairpin: Vec<(IpAddr, bool)>,
    hairpin_refs: Vec<(IpAddr, i32)>,
    lanes: BTreeMap<(Lane, usize), i32>,
    /// Per set: elements deleted and added.
    elements: BTreeMap<String, (Vec<Element>, Vec<Element>)>,
    new_sets: Vec<crate::nft::syntax::Set>,
    gone_sets: Vec<String>,
    new_chains: Vec<crate::nft::syntax::Chain>,
    gone_chains: Vec<String>,
}

impl Patches {
    fn apply(self, state: &mut State) {
        for (fi, p) in self.families.into_iter().enumerate() {
            let plan = &mut state.plan.families[fi];
            let key = |d: &Destination| d.key();
            for d in &p.removed {
                if let Ok(i) = plan.destinations.binary_search_by(|x| key(x).cmp(&d.key())) {
                    plan.destinations.remove(i);
                }
            }
            for d in p.added {
                match plan.destinations.binary_search_by(|x| key(x).cmp(&d.key())) {
                    Ok(i) => plan.destinations[i] = d,
                    Err(i) => plan.destinations.insert(i, d),
                }
            }
            for (ip, owner) in p.cluster_ips {
                match owner {
                    Some(svc) => plan.cluster_ips.insert(ip, svc),
                    None => plan.cluster_ips.remove(&ip),
                };
            }
            for (ip, present) in p.hairpin {
                if present {
                    plan.hairpin.insert(ip);
                } else {
                    plan.hairpin.remove(&ip);
                }
            }
            let refs = &mut state.refs[fi];
            adjust(&mut refs.cluster_ips, p.cluster_ip_refs);
            adjust(&mut refs.hairpin, p.hairpin_refs);
            adjust(&mut state.lanes[fi], p.lanes);

            let table = &mut state.ruleset.tables[fi];
            table.sets.extend(p.new_sets);
            for (name, (deleted, added)) in p.elements {
                let set = table
                    .sets
                    .iter_mut()
                    .find(|s| s.name == name)
                    .expect("elements of a declared set");
                for e in &deleted {
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
    }
}

/// Adds `changes` to reference counts, dropping those that reach zero.
fn adjust<K: Ord>(counts: &mut BTreeMap<K, u32>, changes: impl IntoIterator<Item = (K, i32)>) {
    use std::collections::btree_map::Entry;
    for (k, d) in changes {
        let count = |c: u32| c.checked_add_signed(d).expect("reference count below zero");
        match counts.entry(k) {
            Entry::Occupied(mut e) => match count(*e.get()) {
                0 => {
                    e.remove();
                }
                c => *e.get_mut() = c,
            },
            Entry::Vacant(e) => {
                if let c @ 1.. = count(0) {
                    e.insert(c);
                }
            }
        }
    }
}

/// The changes that `new` makes to `state`, Service by Service; `Err` says why only a whole
/// compile will do.
fn delta(state: &State, new: &Snapshot, config: &ProxyConfig) -> Result<Delta, String> {
    let old = &state.snapshot;
    if old.node != new.node {
        return Err("the Node changed".into());
    }
    if old.service_cidrs != new.service_cidrs {
        return Err("the ServiceCIDRs changed".into());
    }
    if !state.plan.conflicts.is_empty() {
        return Err("Services claim the same destination".into());
    }
    let changed = changed_services(old, new);
    if changed.len() > MAX_CHANGED {
        return Err(format!("{} Services changed", changed.len()));
    }
    let old_slices = slices_of(old, &changed);
    let new_slices = slices_of(new, &changed);
    let mut parts = DiffParts::default();
    let mut patches = Patches::default();
    let mut old_plan = empty_plan(&state.plan);
    let mut new_plan = empty_plan(&state.plan);
    for (fi, fplan) in state.plan.families.iter().enumerate() {
        let ctx = FamilyContext::new(&new.node, config, fplan.family);
        let family = render::family_of(fplan.family);
        let prefix = format!("{} {}", family.as_str(), render::TABLE);
        let mut p = FamilyPatch::default();
        let part = |snapshot: &Snapshot,
                    slices: &HashMap<&ObjectRef, Vec<&EndpointSlice>>,
                    id: &ObjectRef|
         -> Option<ServicePart> {
            let svc = snapshot.services.get(id)?;
            plan_service(&ctx, svc, slices.get(id).map_or(&[][..], Vec::as_slice))
        };
        let mut claimed: HashSet<_> = HashSet::new();
        for id in &changed {
            let before = part(old, &old_slices, id);
            let after = part(new, &new_slices, id);
            if before == after {
                continue;
            }
            for d in before.iter().flat_map(|b| &b.destinations) {
                // The kept plan must hold this Service's destination (not a rival's).
                match fplan
                    .destinations
                    .binary_search_by(|x| x.key().cmp(&d.key()))
                {
                    Ok(i) if fplan.destinations[i].service == **id => {}
                    _ => return Err(format!("{id} did not own {:?}", d.key())),
                }
            }
            let own: HashSet<_> = before
                .iter()
                .flat_map(|b| &b.destinations)
                .map(Destination::key)
                .collect();
            for d in after.iter().flat_map(|a| &a.destinations) {
                if !claimed.insert(d.key()) {
                    return Err(format!("{id} names {:?} twice", d.key()));
                }
                if !own.contains(&d.key())
                    && fplan
                        .destinations
                        .binary_search_by(|x| x.key().cmp(&d.key()))
                        .is_ok()
                {
                    return Err(format!("{id} claims {:?}, which is taken", d.key()));
                }
            }
            shared_entries(state, fi, id, before.as_ref(), after.as_ref(), &mut p)?;
            if let Some(b) = before {
                p.removed.extend(b.destinations);
            }
            if let Some(a) = after {
                p.added.extend(a.destinations);
            }
        }
        let old_frag = render::fragment(fplan.family, &p.removed);
        let new_frag = render::fragment(fplan.family, &p.added);
        if old_frag.affinity_chains != new_frag.affinity_chains
            || old_frag.affinity_sets != new_frag.affinity_sets
        {
            return Err("session affinity chains changed".into());
        }
        for d in &p.removed {
            for key in render::lane_sizes(d) {
                *p.lanes.entry(key).or_default() -= 1;
            }
        }
        for d in &p.added {
            for key in render::lane_sizes(d) {
                *p.lanes.entry(key).or_default() += 1;
            }
        }
        lane_chains(family, &state.lanes[fi], &mut p, &prefix, &mut parts);
        element_changes(&old_frag, &new_frag, &mut p);
        for (set, (deleted, added)) in &p.elements {
            let deleted: Vec<&Element> = deleted.iter().collect();
            let added: Vec<&Element> = added.iter().collect();
            parts.elements(&prefix, set, &deleted, &added);
        }
        old_plan.families[fi].destinations = p.removed.clone();
        new_plan.families[fi].destinations = p.added.clone();
        patches.families.push(p);
    }
    Ok(Delta {
        parts,
        patches,
        old_plan,
        new_plan,
        services: changed.len(),
    })
}

/// A plan with `like`'s families and no destinations.
fn empty_plan(like: &Plan) -> Plan {
    Plan {
        masquerade_mark: like.masquerade_mark,
        families: like
            .families
            .iter()
            .map(|f| FamilyPlan {
                family: f.family,
                local_traffic: LocalTraffic::Unknown,
                clusterip_masquerade: ClusterIpMasquerade::Never,
                nodeports: NodePortMatch::Nothing,
                cluster_ips: BTreeMap::new(),
                service_cidrs: Vec::new(),
                hairpin: BTreeSet::new(),
                destinations: Vec::new(),
            })
            .collect(),
        drop_invalid: like.drop_invalid,
        conflicts: Vec::new(),
    }
}

/// The ClusterIP and hairpin entries a changed Service adds or gives up; an entry shared with
/// another Service stays (hairpin) or needs a whole compile (a shared ClusterIP's comment names
/// one Service).
fn shared_entries(
    state: &State,
    fi: usize,
    id: &ObjectRef,
    before: Option<&ServicePart>,
    after: Option<&ServicePart>,
    p: &mut FamilyPatch,
) -> Result<(), String> {
    let refs = &state.refs[fi];
    let cip = |x: Option<&ServicePart>| x.map(|x| x.cluster_ip);
    if cip(before) != cip(after) {
        if let Some(ip) = cip(before) {
            if refs.cluster_ips.get(&ip) != Some(&1) {
                return Err(format!("ClusterIP {ip} is shared"));
            }
            p.cluster_ips.push((ip, None));
            p.cluster_ip_refs.push((ip, -1));
            p.elements
                .entry("cluster-ips".into())
                .or_default()
                .0
                .push(cluster_ip_element(ip, id));
        }
        if let Some(ip) = cip(after) {
            if refs.cluster_ips.contains_key(&ip)
                || p.cluster_ips.iter().any(|(x, o)| *x == ip && o.is_some())
            {
                return Err(format!("ClusterIP {ip} is shared"));
            }
            p.cluster_ips.push((ip, Some(id.clone())));
            p.cluster_ip_refs.push((ip, 1));
            p.elements
                .entry("cluster-ips".into())
                .or_default()
                .1
                .push(cluster_ip_element(ip, id));
        }
    }
    let empty = BTreeSet::new();
    let hb = before.map_or(&empty, |b| &b.hairpin);
    let ha = after.map_or(&empty, |a| &a.hairpin);
    let pending = |p: &FamilyPatch, ip: &IpAddr| -> i64 {
        p.hairpin_refs
            .iter()
            .filter(|(x, _)| x == ip)
            .map(|(_, d)| i64::from(*d))
            .sum()
    };
    for ip in hb.difference(ha) {
        let now = i64::from(refs.hairpin.get(ip).copied().unwrap_or(0)) + pending(p, ip);
        p.hairpin_refs.push((*ip, -1));
        if now == 1 {
            p.hairpin.push((*ip, false));
            p.elements
                .entry("hairpin".into())
                .or_default()
                .0
                .push(hairpin_element(*ip));
        }
    }
    for ip in ha.difference(hb) {
        let now = i64::from(refs.hairpin.get(ip).copied().unwrap_or(0)) + pending(p, ip);
        p.hairpin_refs.push((*ip, 1));
        if now == 0 {
            p.hairpin.push((*ip, true));
            p.elements
                .entry("hairpin".into())
                .or_default()
                .1
                .push(hairpin_element(*ip));
        }
    }
    Ok(())
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
) {
    let mut after = before.clone();
    adjust(&mut after, p.lanes.iter().map(|(k, d)| (*k, *d)));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::syntax::Table;
    use crate::synthetic;

    /// Runs the delta path without nft: patches the state as a successful apply would.
    fn step(state: &mut State, new: Snapshot, config: &ProxyConfig) -> Result<(), String> {
        let d = delta(state, &new, config)?;
        d.patches.apply(state);
        state.snapshot = new;
        Ok(())
    }

    fn whole(snapshot: Snapshot, config: &ProxyConfig) -> State {
        let (plan, refs) = plan_counted(&snapshot, config);
        let ruleset = render::render(&plan);
        let lanes = plan.families.iter().map(lane_counts).collect();
        State {
            snapshot,
            plan,
            refs,
            lanes,
            ruleset,
        }
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
        let fresh = whole(patched.snapshot.clone(), config);
        assert_eq!(patched.plan, fresh.plan);
        assert_eq!(patched.refs, fresh.refs);
        assert_eq!(patched.lanes, fresh.lanes);
        for (a, b) in patched.ruleset.tables.iter().zip(&fresh.ruleset.tables) {
            assert_eq!(canonical(a), canonical(b));
        }
    }

    #[test]
    fn an_endpoint_change_compiles_one_service() {
        let config = ProxyConfig::default();
        let mut state = whole(synthetic::cluster(50, 3), &config);
        let mut next = state.snapshot.clone();
        Arc::make_mut(next.slices.values_mut().nth(7).unwrap()).endpoints[1].address =
            "10.200.0.1".parse().unwrap();
        let d = delta(&state, &next, &config).unwrap();
        assert_eq!(d.services, 1);
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

    mod generated {
        use super::*;
        use crate::model::{
            Endpoint, EndpointPort, IpFamily, NodeInfo, Protocol, Service, ServicePort,
            TrafficPolicy,
        };
        use proptest::prelude::*;

        fn ip(pool: &'static [&'static str]) -> impl Strategy<Value = IpAddr> {
            prop::sample::select(pool).prop_map(|s| s.parse().unwrap())
        }

        const CLUSTER_IPS: &[&str] = &["10.96.0.1", "10.96.0.2", "10.96.0.3", "fd00::1"];
        const EXTERNAL: &[&str] = &["192.0.2.1", "192.0.2.2"];
        const LOAD_BALANCERS: &[&str] = &["198.51.100.1", "198.51.100.2"];
        const SOURCE_RANGES: &[&str] = &["203.0.113.0/25", "192.168.0.0/24", "2001:db8::/32"];
        const PODS: &[&str] = &["10.244.0.1", "10.244.0.2", "10.244.1.1", "10.244.1.2"];
        const PODS6: &[&str] = &["fd01::1", "fd01::2"];

        fn policy() -> impl Strategy<Value = TrafficPolicy> {
            prop::sample::select(vec![TrafficPolicy::Cluster, TrafficPolicy::Local])
        }

        fn service(name: &'static str) -> impl Strategy<Value = Service> {
            (
                prop::collection::vec(ip(CLUSTER_IPS), 1..3),
                prop::collection::vec(
                    (
                        prop::sample::select(vec!["", "http"]),
                        prop::sample::select(vec![Protocol::Tcp, Protocol::Udp]),
                        80u16..82,
                        prop::option::of(30000u16..30002),
                    ),
                    1..3,
                ),
                prop::collection::vec(ip(EXTERNAL), 0..2),
                prop::option::weighted(0.2, 1u32..100),
                policy(),
                policy(),
                prop::collection::vec(ip(LOAD_BALANCERS), 0..2),
                prop::sample::subsequence(SOURCE_RANGES, 0..3),
            )
                .prop_map(
                    move |(cips, ports, ext, affinity, etp, itp, lbs, ranges)| Service {
                        id: ObjectRef::new("ns", name),
                        cluster_ips: cips,
                        ports: ports
                            .into_iter()
                            .map(|(n, protocol, port, node_port)| ServicePort {
                                name: n.into(),
                                protocol,
                                port,
                                node_port,
                            })
                            .collect(),
                        external_ips: ext,
                        load_balancer_ips: lbs,
                        load_balancer_source_ranges: ranges
                            .into_iter()
                            .map(|r| r.parse().unwrap())
                            .collect(),
                        affinity_timeout: affinity,
                        external_policy: etp,
                        internal_policy: itp,
                        health_check_node_port: None,
                    },
                )
        }

        fn slice(name: &'static str, svc: &'static str) -> impl Strategy<Value = EndpointSlice> {
            (
                any::<bool>(),
                prop::sample::select(vec!["", "http"]),
                8080u16..8082,
                prop::collection::vec(
                    (
                        0usize..4,
                        any::<bool>(),
                        any::<bool>(),
                        any::<bool>(),
                        any::<bool>(),
                    ),
                    0..4,
                ),
            )
                .prop_map(move |(v6, port_name, port, eps)| EndpointSlice {
                    id: ObjectRef::new("ns", name),
                    service: ObjectRef::new("ns", svc),
                    family: if v6 { IpFamily::V6 } else { IpFamily::V4 },
                    ports: vec![
                        EndpointPort {
                            name: port_name.into(),
                            protocol: Protocol::Tcp,
                            port,
                        },
                        EndpointPort {
                            name: port_name.into(),
                            protocol: Protocol::Udp,
                            port,
                        },
                    ],
                    endpoints: eps
                        .into_iter()
                        .map(|(i, ready, serving, terminating, here)| Endpoint {
                            address: if v6 { PODS6[i % 2] } else { PODS[i] }.parse().unwrap(),
                            ready,
                            serving,
                            terminating,
                            node_name: Some(if here { "node-0" } else { "node-1" }.into()),
                            zone: None,
                            hints: None,
                        })
                        .collect(),
                })
        }

        /// A small cluster where Services often share addresses, endpoints and node ports.
        fn snapshot() -> impl Strategy<Value = Snapshot> {
            (
                prop::option::of(service("a")),
                prop::option::of(service("b")),
                prop::option::of(service("c")),
                prop::option::of(slice("a-1", "a")),
                prop::option::of(slice("a-2", "a")),
                prop::option::of(slice("b-1", "b")),
                prop::option::of(slice("c-1", "c")),
            )
                .prop_map(|(a, b, c, s1, s2, s3, s4)| Snapshot {
                    services: [a, b, c]
                        .into_iter()
                        .flatten()
                        .map(|s| (s.id.clone(), Arc::new(s)))
                        .collect(),
                    slices: [s1, s2, s3, s4]
                        .into_iter()
                        .flatten()
                        .map(|s| (s.id.clone(), Arc::new(s)))
                        .collect(),
                    node: NodeInfo {
                        name: "node-0".into(),
                        addresses: vec!["192.168.0.2".parse().unwrap()],
                        ..NodeInfo::default()
                    },
                    service_cidrs: vec![],
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Patching Service by Service gives exactly what a whole compile gives.
            #[test]
            fn patched_state_equals_a_whole_compile(
                snapshots in prop::collection::vec(snapshot(), 2..8),
                cidrs in any::<bool>(),
            ) {
                let config = ProxyConfig {
                    cluster_cidrs: if cidrs {
                        vec!["10.244.0.0/16".parse().unwrap()]
                    } else {
                        vec![]
                    },
                    ..ProxyConfig::default()
                };
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
}
