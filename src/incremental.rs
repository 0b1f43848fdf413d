//! Compiling only what changed, for either backend: which Services changed between two
//! snapshots, and the plan patched Service by Service (pure; no backend, no I/O).
//!
//! A whole compile of 10k Services costs tens of milliseconds (100k: hundreds) for a change
//! that is usually one EndpointSlice. A backend of a long-running process keeps the last
//! [`Compiled`] state, asks [`plan_delta`] for the destinations and shared entries the changed
//! Services give up and add (planned with the same `plan::plan_service` as a whole compile),
//! renders just those in its own form, and once the kernel accepted the result, patches the
//! kept state with [`PlanDelta::apply`]. The patched plan equals a whole compile's (a property
//! test holds it to that; each backend has its own for its rendering).
//!
//! When the change is not local to some Services, [`plan_delta`] says why ([`Fallback`]) and
//! the backend compiles everything: the Node or the ServiceCIDRs changed, Services claim the same destination, a
//! Service shares a ClusterIP, more than [`max_changed`] Services changed, or the kept state
//! breaks one of its own invariants. None of these panics: a broken invariant is a fallback
//! like the others, logged and counted (`svcproxy_incremental_fallbacks_total{reason}`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use crate::model::{EndpointSlice, ObjectRef, Objects, ProxyConfig, Snapshot};
use crate::plan::{
    ClusterIpMasquerade, Destination, FamilyContext, FamilyPlan, FamilyRefs, LocalTraffic,
    NodePortMatch, Plan, ServicePart, plan_counted, plan_service,
};

/// Up to this many changed Services are always patched one by one.
pub const MAX_CHANGED: usize = 100;

/// Above this many changed Services (of `services` in the kept snapshot) a whole compile is
/// cheaper than patching one by one: a tenth of the cluster, and never fewer than
/// [`MAX_CHANGED`]. A whole compile costs the whole cluster (at 10k Services a second, and a
/// second plan beside the kept one, and the old and new rulesets rendered whole); patching
/// costs the changed Services only. A fixed bound would send ordinary churn in a large cluster (a few hundred
/// EndpointSlices in one `minSyncPeriod`) down the expensive path.
pub fn max_changed(services: usize) -> usize {
    MAX_CHANGED.max(services / 10)
}

/// Why a sync compiled every Service instead of only the changed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fallback {
    #[error("the Node changed")]
    NodeChanged,
    /// The cluster's ServiceCIDR objects changed (the unallocated-ClusterIP drop).
    #[error("the ServiceCIDRs changed")]
    ServiceCidrsChanged,
    #[error("Services claim the same destination")]
    Conflicts,
    #[error("{0} Services changed")]
    TooMany(usize),
    #[error("ClusterIP {0} is shared")]
    SharedClusterIp(IpAddr),
    /// A changed Service claims (or claimed) a destination another Service holds, or names one
    /// twice: the plan keeps the first claimant, which only a whole compile can tell.
    #[error("{0}")]
    Destination(String),
    /// nftables: a changed Service's session-affinity chains or sets change.
    #[error("session affinity chains changed")]
    Affinity,
    /// iptables: a changed Service's new chain has the name of another Service's chain.
    #[error("chain {0} is another Service's")]
    ChainName(String),
    /// The kept state contradicts itself (a reference count below zero, a set or destination
    /// missing): a bug, but never a reason to stop the agent.
    #[error("the kept state is inconsistent: {0}")]
    Invariant(String),
}

impl Fallback {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Fallback::NodeChanged => "node_changed",
            Fallback::ServiceCidrsChanged => "service_cidrs_changed",
            Fallback::Conflicts => "conflicts",
            Fallback::TooMany(_) => "too_many_changes",
            Fallback::SharedClusterIp(_) => "shared_cluster_ip",
            Fallback::Destination(_) => "destination_claimed",
            Fallback::Affinity => "session_affinity",
            Fallback::ChainName(_) => "chain_name",
            Fallback::Invariant(_) => "invariant",
        }
    }
}

/// A snapshot and its whole plan, with the reference counts that let the plan be patched.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub snapshot: Snapshot,
    pub plan: Plan,
    /// Per family (as `plan.families`).
    pub refs: Vec<FamilyRefs>,
}

impl Compiled {
    /// A whole compile.
    pub fn new(snapshot: Snapshot, config: &ProxyConfig) -> Compiled {
        let (plan, refs) = plan_counted(&snapshot, config);
        Compiled {
            snapshot,
            plan,
            refs,
        }
    }
}

/// The Services whose Service or EndpointSlice objects differ between two snapshots.
pub fn changed_services<'a>(old: &'a Snapshot, new: &'a Snapshot) -> BTreeSet<&'a ObjectRef> {
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
/// The subtrees both snapshots share are skipped unread: the time is that of the change, not of
/// the maps.
fn merge_diff<'a, V: PartialEq>(
    old: &'a Objects<V>,
    new: &'a Objects<V>,
    mut f: impl FnMut(&'a ObjectRef, Option<&'a V>, Option<&'a V>),
) {
    use imbl::ordmap::DiffItem;
    for d in old.diff(new) {
        match d {
            DiffItem::Add(k, v) => f(k, None, Some(&**v)),
            DiffItem::Remove(k, v) => f(k, Some(&**v), None),
            DiffItem::Update {
                old: (k, a),
                new: (_, b),
            } => f(k, Some(&**a), Some(&**b)),
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

/// What the changed Services do to the plan: per family, the destinations they give up and
/// add, and the shared entries that come or go.
#[derive(Debug)]
pub struct PlanDelta {
    /// How many Services changed (their objects did; their plan may not have).
    pub services: usize,
    /// Per family (as the kept plan's).
    pub families: Vec<FamilyDelta>,
}

/// One family's part of a [`PlanDelta`].
#[derive(Debug, Default)]
pub struct FamilyDelta {
    /// The changed Services' destinations in the kept plan, Service by Service, each Service's
    /// in its port order.
    pub removed: Vec<Destination>,
    /// Their destinations in the new plan, in the same order.
    pub added: Vec<Destination>,
    /// The changed Services whose part of the plan changed.
    pub services: BTreeSet<ObjectRef>,
    /// ClusterIP entries that go (`None`) or come (with their Service), in order.
    pub cluster_ips: Vec<(IpAddr, Option<ObjectRef>)>,
    cluster_ip_refs: Vec<(IpAddr, i32)>,
    /// Hairpin addresses that leave (`false`) or enter (`true`) the plan, in order: an address
    /// passed from one Service to another leaves and enters.
    pub hairpin: Vec<(IpAddr, bool)>,
    hairpin_refs: Vec<(IpAddr, i32)>,
}

impl FamilyDelta {
    /// Whether the family's plan changes at all.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.cluster_ips.is_empty()
            && self.hairpin.is_empty()
    }

    /// The family's hairpin set after the change.
    pub fn hairpin_after(&self, before: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        let mut out = before.clone();
        for (ip, present) in &self.hairpin {
            if *present {
                out.insert(*ip);
            } else {
                out.remove(ip);
            }
        }
        out
    }

    /// The family's ClusterIP map after the change.
    pub fn cluster_ips_after(
        &self,
        before: &BTreeMap<IpAddr, ObjectRef>,
    ) -> BTreeMap<IpAddr, ObjectRef> {
        let mut out = before.clone();
        for (ip, owner) in &self.cluster_ips {
            match owner {
                Some(svc) => out.insert(*ip, svc.clone()),
                None => out.remove(ip),
            };
        }
        out
    }

    /// The family's destinations after the change, in key order, from the kept ones (`before`).
    pub fn destinations_after<'a>(
        &'a self,
        before: &'a [Destination],
    ) -> impl Iterator<Item = &'a Destination> + 'a {
        let gone: HashSet<_> = self.removed.iter().map(Destination::key).collect();
        let mut added: Vec<&Destination> = self.added.iter().collect();
        added.sort_by_key(|d| d.key());
        let mut kept = before
            .iter()
            .filter(move |d| !gone.contains(&d.key()))
            .peekable();
        let mut added = added.into_iter().peekable();
        std::iter::from_fn(move || match (kept.peek(), added.peek()) {
            (Some(a), Some(b)) if b.key() < a.key() => added.next(),
            (Some(_), _) => kept.next(),
            (None, _) => added.next(),
        })
    }
}

/// The changes that `new` makes to `kept`, Service by Service; `Err` says why only a whole
/// compile will do. Nothing is changed: [`PlanDelta::apply`] does that, once the kernel took it.
pub fn plan_delta(
    kept: &Compiled,
    new: &Snapshot,
    config: &ProxyConfig,
) -> Result<PlanDelta, Fallback> {
    let old = &kept.snapshot;
    if old.node != new.node {
        return Err(Fallback::NodeChanged);
    }
    if old.service_cidrs != new.service_cidrs {
        return Err(Fallback::ServiceCidrsChanged);
    }
    if !kept.plan.conflicts.is_empty() {
        return Err(Fallback::Conflicts);
    }
    if kept.refs.len() != kept.plan.families.len() {
        return Err(Fallback::Invariant("reference counts per family".into()));
    }
    let changed = changed_services(old, new);
    if changed.len() > max_changed(old.services.len()) {
        return Err(Fallback::TooMany(changed.len()));
    }
    let old_slices = slices_of(old, &changed);
    let new_slices = slices_of(new, &changed);
    let mut families = Vec::with_capacity(kept.plan.families.len());
    for (fi, fplan) in kept.plan.families.iter().enumerate() {
        let ctx = FamilyContext::new(&new.node, config, fplan.family);
        let part = |snapshot: &Snapshot,
                    slices: &HashMap<&ObjectRef, Vec<&EndpointSlice>>,
                    id: &ObjectRef|
         -> Option<ServicePart> {
            let svc = snapshot.services.get(id)?;
            plan_service(&ctx, svc, slices.get(id).map_or(&[][..], Vec::as_slice))
        };
        let find = |d: &Destination| {
            fplan
                .destinations
                .binary_search_by(|x| x.key().cmp(&d.key()))
                .ok()
        };
        let mut p = FamilyDelta::default();
        let mut claimed: HashSet<_> = HashSet::new();
        for id in &changed {
            let before = part(old, &old_slices, id);
            let after = part(new, &new_slices, id);
            if before == after {
                continue;
            }
            let mut own = HashSet::new();
            for d in before.iter().flat_map(|b| &b.destinations) {
                // The kept plan must hold this Service's destination (not a rival's), once.
                match find(d) {
                    Some(i) if fplan.destinations[i] == *d => {}
                    _ => return Err(Fallback::Destination(format!("{id} did not own {d:?}"))),
                }
                if !own.insert(d.key()) {
                    return Err(Fallback::Destination(format!("{id} named {d:?} twice")));
                }
            }
            for d in after.iter().flat_map(|a| &a.destinations) {
                if !claimed.insert(d.key()) {
                    return Err(Fallback::Destination(format!(
                        "{id} names {:?} twice",
                        d.key()
                    )));
                }
                if !own.contains(&d.key()) && find(d).is_some() {
                    return Err(Fallback::Destination(format!(
                        "{id} claims {:?}, which is taken",
                        d.key()
                    )));
                }
            }
            shared_entries(&kept.refs[fi], id, before.as_ref(), after.as_ref(), &mut p)?;
            p.services.insert((*id).clone());
            if let Some(b) = before {
                p.removed.extend(b.destinations);
            }
            if let Some(a) = after {
                p.added.extend(a.destinations);
            }
        }
        families.push(p);
    }
    Ok(PlanDelta {
        services: changed.len(),
        families,
    })
}

/// The ClusterIP and hairpin entries a changed Service adds or gives up; an entry shared with
/// another Service stays (hairpin) or needs a whole compile (a shared ClusterIP: the plan names
/// one Service for it).
fn shared_entries(
    refs: &FamilyRefs,
    id: &ObjectRef,
    before: Option<&ServicePart>,
    after: Option<&ServicePart>,
    p: &mut FamilyDelta,
) -> Result<(), Fallback> {
    let cip = |x: Option<&ServicePart>| x.map(|x| x.cluster_ip);
    if cip(before) != cip(after) {
        if let Some(ip) = cip(before) {
            if refs.cluster_ips.get(&ip) != Some(&1) {
                return Err(Fallback::SharedClusterIp(ip));
            }
            p.cluster_ips.push((ip, None));
            p.cluster_ip_refs.push((ip, -1));
        }
        if let Some(ip) = cip(after) {
            if refs.cluster_ips.contains_key(&ip)
                || p.cluster_ips.iter().any(|(x, o)| *x == ip && o.is_some())
            {
                return Err(Fallback::SharedClusterIp(ip));
            }
            p.cluster_ips.push((ip, Some(id.clone())));
            p.cluster_ip_refs.push((ip, 1));
        }
    }
    let empty = BTreeSet::new();
    let hb = before.map_or(&empty, |b| &b.hairpin);
    let ha = after.map_or(&empty, |a| &a.hairpin);
    let count = |p: &FamilyDelta, ip: &IpAddr| -> i64 {
        i64::from(refs.hairpin.get(ip).copied().unwrap_or(0))
            + p.hairpin_refs
                .iter()
                .filter(|(x, _)| x == ip)
                .map(|(_, d)| i64::from(*d))
                .sum::<i64>()
    };
    for ip in hb.difference(ha) {
        let now = count(p, ip);
        if now < 1 {
            return Err(Fallback::Invariant(format!(
                "{id} gives up hairpin address {ip}, which no Service holds"
            )));
        }
        p.hairpin_refs.push((*ip, -1));
        if now == 1 {
            p.hairpin.push((*ip, false));
        }
    }
    for ip in ha.difference(hb) {
        let now = count(p, ip);
        p.hairpin_refs.push((*ip, 1));
        if now == 0 {
            p.hairpin.push((*ip, true));
        }
    }
    Ok(())
}

impl PlanDelta {
    /// The changed Services' destinations before and after, as two plans (for the stale UDP
    /// flows, `conntrack::stale_udp`).
    pub fn stale_plans(&self, like: &Plan) -> (Plan, Plan) {
        let mut old = empty_plan(like);
        let mut new = empty_plan(like);
        for (fi, f) in self.families.iter().enumerate() {
            if let (Some(o), Some(n)) = (old.families.get_mut(fi), new.families.get_mut(fi)) {
                o.destinations = f.removed.clone();
                n.destinations = f.added.clone();
            }
        }
        (old, new)
    }

    /// Patches `kept`'s plan to that of the snapshot this delta was made for (the caller then
    /// keeps that snapshot). An `Err` leaves `kept` half patched: the caller compiles whole.
    pub fn apply(self, kept: &mut Compiled) -> Result<(), Fallback> {
        if self.families.len() != kept.plan.families.len() || kept.refs.len() != self.families.len()
        {
            return Err(Fallback::Invariant("the number of families changed".into()));
        }
        for ((p, plan), refs) in self
            .families
            .into_iter()
            .zip(&mut kept.plan.families)
            .zip(&mut kept.refs)
        {
            let key = |d: &Destination| d.key();
            // A destination that stays (most changes) is replaced in place below: removing and
            // inserting it would move every destination after it, twice (at 100k Services,
            // megabytes per change).
            let stays: HashSet<_> = p.added.iter().map(Destination::key).collect();
            for d in p.removed.iter().filter(|d| !stays.contains(&d.key())) {
                match plan.destinations.binary_search_by(|x| key(x).cmp(&d.key())) {
                    Ok(i) => {
                        plan.destinations.remove(i);
                    }
                    Err(_) => {
                        return Err(Fallback::Invariant(format!(
                            "destination {:?} is not in the plan",
                            d.key()
                        )));
                    }
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
            adjust(&mut refs.cluster_ips, p.cluster_ip_refs)?;
            adjust(&mut refs.hairpin, p.hairpin_refs)?;
        }
        Ok(())
    }
}

/// Adds `changes` to reference counts, dropping those that reach zero.
pub fn adjust<K: Ord + std::fmt::Debug>(
    counts: &mut BTreeMap<K, u32>,
    changes: impl IntoIterator<Item = (K, i32)>,
) -> Result<(), Fallback> {
    use std::collections::btree_map::Entry;
    for (k, d) in changes {
        let count = |c: u32, k: &K| {
            c.checked_add_signed(d)
                .ok_or_else(|| Fallback::Invariant(format!("reference count of {k:?} below zero")))
        };
        match counts.entry(k) {
            Entry::Occupied(mut e) => match count(*e.get(), e.key())? {
                0 => {
                    e.remove();
                }
                c => *e.get_mut() = c,
            },
            Entry::Vacant(e) => {
                if let c @ 1.. = count(0, e.key())? {
                    e.insert(c);
                }
            }
        }
    }
    Ok(())
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::synthetic;
    use std::sync::Arc;

    /// Runs the delta path: patches `kept` as a backend does once the kernel took it.
    pub(crate) fn step(
        kept: &mut Compiled,
        new: Snapshot,
        config: &ProxyConfig,
    ) -> Result<(), Fallback> {
        let d = plan_delta(kept, &new, config)?;
        d.apply(kept)?;
        kept.snapshot = new;
        Ok(())
    }

    pub(crate) fn assert_same_plan(patched: &Compiled, config: &ProxyConfig) {
        let fresh = Compiled::new(patched.snapshot.clone(), config);
        assert_eq!(patched.plan, fresh.plan);
        assert_eq!(patched.refs, fresh.refs);
    }

    #[test]
    fn an_endpoint_change_touches_one_service() {
        let config = ProxyConfig::default();
        let mut kept = Compiled::new(synthetic::cluster(50, 3), &config);
        let mut next = kept.snapshot.clone();
        Arc::make_mut(synthetic::nth_mut(&mut next.slices, 7)).endpoints[1].address =
            "10.200.0.1".parse().unwrap();
        let d = plan_delta(&kept, &next, &config).unwrap();
        assert_eq!(d.services, 1);
        assert_eq!(d.families[0].services.len(), 1);
        assert_eq!(
            (d.families[0].removed.len(), d.families[0].added.len()),
            (1, 1)
        );
        assert!(d.families[1].is_empty());
        let after: Vec<_> = d.families[0]
            .destinations_after(&kept.plan.families[0].destinations)
            .cloned()
            .collect();
        d.apply(&mut kept).unwrap();
        kept.snapshot = next;
        assert_eq!(after, kept.plan.families[0].destinations);
        assert_same_plan(&kept, &config);
    }

    /// Up to a tenth of the cluster (at least 100 Services) is patched; more is compiled whole.
    #[test]
    fn churn_in_a_large_cluster_is_still_patched() {
        assert_eq!(max_changed(50), MAX_CHANGED);
        assert_eq!(max_changed(10_000), 1000);
        let config = ProxyConfig::default();
        let kept = Compiled::new(synthetic::cluster(3000, 2), &config);
        let moved = |n: usize| {
            let mut next = kept.snapshot.clone();
            for i in 0..n {
                Arc::make_mut(synthetic::nth_mut(&mut next.slices, i)).endpoints[0].address =
                    "10.200.0.1".parse().unwrap();
            }
            next
        };
        let d = plan_delta(&kept, &moved(300), &config).unwrap();
        assert_eq!(d.services, 300);
        assert_eq!(
            plan_delta(&kept, &moved(301), &config).err(),
            Some(Fallback::TooMany(301))
        );
    }

    #[test]
    fn a_broken_reference_count_is_a_fallback_not_a_panic() {
        let config = ProxyConfig::default();
        let mut kept = Compiled::new(synthetic::cluster(200, 10), &config);
        // A Service with a local endpoint (node-0), and the count of its hairpin address lost.
        let (id, ip) = kept
            .snapshot
            .slices
            .values()
            .find_map(|s| {
                s.endpoints
                    .iter()
                    .find(|e| e.node_name.as_deref() == Some("node-0"))
                    .map(|e| (s.id.clone(), e.address))
            })
            .unwrap();
        kept.refs[0].hairpin.remove(&ip);
        let mut next = kept.snapshot.clone();
        Arc::make_mut(next.slices.get_mut(&id).unwrap())
            .endpoints
            .retain(|e| e.address != ip);
        let err = plan_delta(&kept, &next, &config).unwrap_err();
        assert_eq!(err.reason(), "invariant", "{err}");
        // And applying a delta to a state it was not made for is an error too.
        let fresh = Compiled::new(kept.snapshot.clone(), &config);
        let d = plan_delta(&fresh, &next, &config).unwrap();
        let mut other = Compiled::new(next, &config);
        assert_eq!(d.apply(&mut other).unwrap_err().reason(), "invariant");
        let mut counts = BTreeMap::from([(1, 1u32)]);
        assert!(adjust(&mut counts, [(1, -2)]).is_err());
    }

    /// Small clusters where Services often share addresses, endpoints and node ports, for the
    /// property tests of both backends.
    pub(crate) mod generated {
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
        pub(crate) fn snapshot() -> impl Strategy<Value = Snapshot> {
            (
                prop::option::of(service("a")),
                prop::option::of(service("b")),
                prop::option::of(service("c")),
                prop::option::of(slice("a-1", "a")),
                prop::option::of(slice("a-2", "a")),
                prop::option::of(slice("b-1", "b")),
                prop::option::of(slice("c-1", "c")),
                any::<bool>(),
            )
                .prop_map(|(a, b, c, s1, s2, s3, s4, cidrs)| Snapshot {
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
                    service_cidrs: if cidrs {
                        vec!["10.96.0.0/16".parse().unwrap()]
                    } else {
                        vec![]
                    },
                })
        }

        /// With and without cluster CIDRs (they change the masquerade rules).
        pub(crate) fn config(cidrs: bool) -> ProxyConfig {
            ProxyConfig {
                cluster_cidrs: if cidrs {
                    vec!["10.244.0.0/16".parse().unwrap()]
                } else {
                    vec![]
                },
                ..ProxyConfig::default()
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Patching the plan Service by Service gives exactly a whole compile's plan.
            #[test]
            fn patched_plan_equals_a_whole_compile(
                snapshots in prop::collection::vec(snapshot(), 2..8),
                cidrs in any::<bool>(),
            ) {
                let config = config(cidrs);
                let mut it = snapshots.into_iter();
                let mut kept = Compiled::new(it.next().unwrap(), &config);
                for next in it {
                    match step(&mut kept, next.clone(), &config) {
                        Ok(()) => assert_same_plan(&kept, &config),
                        Err(_) => kept = Compiled::new(next, &config),
                    }
                }
            }
        }
    }
}
