//! The plan, rendered as svcproxy's nftables tables (`ip svcproxy` and `ip6 svcproxy`).
//!
//! # Layout, and why
//! Loading cost in the kernel grows with the number of chains, sets and rules that reference
//! maps, not with the number of map elements (../shared/NOTES-kernel.md: a chain per Service
//! with its own map took 6–11 s for 10k Services × 10 endpoints; a layout whose object count
//! does not grow with the Services took 1.2 s). So the shape here is fixed, and Services are
//! data:
//!
//! * `services` finds a destination with ONE verdict-map lookup on
//!   `daddr . l4proto . dport` (`service-ips`), or `l4proto . dport` for NodePorts
//!   (`service-nodeports`), exactly like kube-proxy's nftables mode, so the per-packet cost does
//!   not grow with the number of Services.
//! * The verdict goes to a chain shared by every destination with the same number N of
//!   endpoints, `endpoints-of-N`, that picks `numgen random mod N` through an inline verdict map
//!   to one of the chains `endpoints-K`; chain `endpoints-K` DNATs to the destination's K-th
//!   endpoint, found in map `endpoints-K` by `daddr . l4proto . dport`. So there is one map and
//!   one chain per endpoint *index* (as many as the largest Service has endpoints), one small
//!   chain per distinct endpoint count, and every map is read by exactly one rule (the kernel's
//!   cost of adding an element grows with the rules reading its map). A changed endpoint set is
//!   a few element updates.
//! * Every map has named types (no `typeof`): nft 1.0.6 cannot add a rule reading a `typeof`
//!   map whose data holds `th dport` unless the map is declared in the same file ("conflicting
//!   protocols specified"), which would force a full sync whenever a new endpoint count
//!   appears. With named types, every change can be a partial sync.
//! * Masquerading is decided by set lookups before dispatch (and marks the packet, as
//!   kube-proxy does, with the configurable masquerade bit); hairpin traffic (a pod reaching
//!   itself) is caught after DNAT by `saddr . daddr` in the `hairpin` set of local endpoints.
//! * Rejects (no endpoints, unknown ClusterIP port) happen in filter chains, since `reject` is
//!   not allowed in nat chains; `drop` (a Local traffic policy with no local endpoint) happens in
//!   the nat dispatch itself.
//! * loadBalancerSourceRanges are data too: `firewall-ips` holds the guarded destinations and
//!   the interval set `firewall-allow` each `destination . allowed source range` (nft 1.0.6
//!   accepts concatenated intervals, with element adds and deletes in a partial sync); one rule
//!   in `firewall-check`, run before DNAT for new connections, drops what is guarded and not
//!   allowed. kube-proxy uses a chain per firewalled Service; here the object count stays
//!   fixed. Unallocated ClusterIPs are one more rule in `endpoints-check`, on the interval set
//!   `service-cidrs`.
//! * ClientIP session affinity needs to remember, per client, one endpoint: those (rare)
//!   destinations get kube-proxy's proven shape, a chain per Service port with a dynamic
//!   timeout set per endpoint, shared by all addresses of that Service port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{IpFamily, Protocol};
use crate::nft::syntax::{
    Chain, Data, Element, Expr, Family, NatTo, Op, Reject, Rule, Ruleset, Set, Stmt, Table, Value,
    Verdict,
};
use crate::plan::{
    Address, Backends, ClusterIpMasquerade, Destination, DestinationKind, FamilyPlan, LocalTraffic,
    NodePortMatch, Plan, Route, Scope, stable_hash,
};

/// The name of svcproxy's tables (one per family).
pub const TABLE: &str = "svcproxy";

/// Priority of the NAT chains: kube-proxy's (dstnat/srcnat), as numbers since nft 1.0.6 refuses
/// the names in some places.
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;
/// Filter chains run just before the default filter priority, so that a reject happens before
/// a host firewall that might accept the packet.
const FILTER: i32 = -10;

const TRANSPORTS: [Value; 3] = [
    Value::Proto(Protocol::Tcp),
    Value::Proto(Protocol::Udp),
    Value::Proto(Protocol::Sctp),
];

/// Renders the whole plan.
pub fn render(plan: &Plan) -> Ruleset {
    Ruleset {
        tables: plan
            .families
            .iter()
            .map(|f| render_family(f, plan.masquerade_mark, true))
            .collect(),
    }
}

/// The elements of [`render`]'s sets, rendered `size` destinations at a time: each part is a
/// ruleset whose sets hold the elements of its destinations (the first part also those of the
/// family-wide sets: ClusterIPs, hairpin, CIDRs, NodePort addresses). Only the parts' set
/// elements mean anything (their chains, and which sets they declare, are not the whole
/// ruleset's); together they hold every element of the whole ruleset once. For the drift
/// check's order-free digests, which then never hold more than one part of the rendering (at
/// 100k Services the whole rendered ruleset is about 200 MiB).
pub fn element_parts(plan: &Plan, size: usize) -> impl Iterator<Item = Ruleset> + '_ {
    let size = size.max(1);
    let parts = plan
        .families
        .iter()
        .map(|f| f.destinations.len().div_ceil(size))
        .max()
        .unwrap_or(0)
        .max(1);
    (0..parts).map(move |p| {
        let first = p == 0;
        let tables = plan
            .families
            .iter()
            .map(|f| {
                let n = f.destinations.len();
                let part = FamilyPlan {
                    family: f.family,
                    local_traffic: match &f.local_traffic {
                        l if first => l.clone(),
                        _ => LocalTraffic::Unknown,
                    },
                    clusterip_masquerade: f.clusterip_masquerade,
                    nodeports: match &f.nodeports {
                        m if first => m.clone(),
                        _ => NodePortMatch::Nothing,
                    },
                    cluster_ips: if first {
                        f.cluster_ips.clone()
                    } else {
                        BTreeMap::new()
                    },
                    service_cidrs: if first {
                        f.service_cidrs.clone()
                    } else {
                        Vec::new()
                    },
                    hairpin: if first {
                        f.hairpin.clone()
                    } else {
                        BTreeSet::new()
                    },
                    destinations: f.destinations[(p * size).min(n)..((p + 1) * size).min(n)]
                        .to_vec(),
                };
                render_family(&part, plan.masquerade_mark, true)
            })
            .collect();
        Ruleset { tables }
    })
}

/// Every table, chain and set of [`render`]'s ruleset, without the sets' elements: what a
/// refresh in place needs of the tables it replaces (which chains and sets to flush or delete),
/// at a fraction of the memory (at 100k Services a whole ruleset is a few hundred MiB).
pub fn skeleton(plan: &Plan) -> Ruleset {
    Ruleset {
        tables: plan
            .families
            .iter()
            .map(|f| render_family(f, plan.masquerade_mark, false))
            .collect(),
    }
}

/// The nft family of an IP family.
pub fn family_of(f: IpFamily) -> Family {
    match f {
        IpFamily::V4 => Family::Ip,
        IpFamily::V6 => Family::Ip6,
    }
}

/// Which endpoint map a backend set is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Lane {
    /// Keyed by `l4proto . dport` (NodePorts) instead of `daddr . l4proto . dport`.
    nodeport: bool,
    /// The node-local endpoints for external clients of a Local-policy destination.
    local: bool,
}

impl Lane {
    fn name(self) -> &'static str {
        match (self.nodeport, self.local) {
            (false, false) => "endpoints",
            (false, true) => "local-endpoints",
            (true, false) => "nodeport-endpoints",
            (true, true) => "nodeport-local-endpoints",
        }
    }

    /// The map (and the chain reading it) of the endpoint at index `slot` of every destination
    /// in this lane.
    pub(crate) fn slot(self, slot: usize) -> String {
        format!("{}-{slot}", self.name())
    }

    /// The chain that picks one of `n` endpoints at random.
    pub(crate) fn pick(self, n: usize) -> String {
        format!("{}-of-{n}", self.name())
    }
}

/// What one lane holds.
#[derive(Default)]
struct LaneUse {
    /// The endpoint counts (above one) in use: each has a chain picking among them.
    counts: BTreeSet<usize>,
    /// `slots[k]`: the elements of map `<lane>-k`, the k-th endpoint of each destination.
    slots: Vec<Vec<Element>>,
}

/// Everything one family's table is built from, filled in destination by destination.
struct Builder {
    family: Family,
    /// Whether set elements are kept ([`skeleton`] leaves them out; the sets are declared
    /// all the same).
    elements: bool,
    sets: BTreeMap<&'static str, Vec<Element>>,
    /// What each lane holds.
    lanes: BTreeMap<Lane, LaneUse>,
    /// Affinity chains and sets, by name.
    affinity_chains: BTreeMap<String, Chain>,
    affinity_sets: BTreeMap<String, Set>,
}

impl Builder {
    fn add(&mut self, set: &'static str, e: Element) {
        let elements = self.sets.entry(set).or_default();
        if self.elements {
            elements.push(e);
        }
    }

    /// The destination's key in every map: one allocation, shared by all its elements.
    fn ip_key(d: &Destination) -> Arc<[Value]> {
        match d.address {
            Address::Ip(ip) => Arc::new([
                Value::Addr(ip),
                Value::Proto(d.protocol),
                Value::Port(d.port),
            ]),
            Address::NodePort => Arc::new([Value::Proto(d.protocol), Value::Port(d.port)]),
        }
    }

    fn comment(d: &Destination) -> String {
        match d.kind {
            // The set's own name says it is the ClusterIP's.
            DestinationKind::ClusterIp => d.service_port(),
            kind => format!("{} {}", d.service_port(), kind.label()),
        }
    }

    /// Writes a backend set for destination `d` and returns the verdict that sends traffic to it.
    fn backends(&mut self, d: &Destination, b: &Backends, lane: Lane) -> Verdict {
        if let Some(timeout) = b.affinity_timeout {
            return Verdict::Goto(self.affinity(d, b, timeout));
        }
        let key = Self::ip_key(d);
        let n = b.endpoints.len();
        let keep = self.elements;
        let lane_use = self.lanes.entry(lane).or_default();
        if lane_use.slots.len() < n {
            lane_use.slots.resize_with(n, Vec::new);
        }
        if keep {
            for (slot, ep) in lane_use.slots.iter_mut().zip(&b.endpoints) {
                slot.push(Element::map(
                    key.clone(),
                    Data::Pair(Value::Addr(ep.ip()), Value::Port(ep.port())),
                ));
            }
        }
        if n == 1 {
            return Verdict::Goto(lane.slot(0));
        }
        lane_use.counts.insert(n);
        Verdict::Goto(lane.pick(n))
    }

    /// The affinity chain of a Service port's backend set (shared by all its addresses):
    /// a client seen recently goes back to its endpoint, a new one picks at random and is
    /// remembered in that endpoint's set.
    fn affinity(&mut self, d: &Destination, b: &Backends, timeout: u32) -> String {
        let scope = match b.scope {
            Scope::Cluster => "cluster",
            Scope::Local => "local",
        };
        let id = format!(
            "{}/{}/{}/{}/{scope}",
            d.service,
            d.port_name,
            d.protocol,
            self.family.as_str()
        );
        let name = format!("affinity-{:016x}", stable_hash(&id));
        if self.affinity_chains.contains_key(&name) {
            return name;
        }
        let saddr = Expr::ip(self.family, "saddr");
        let addr_type = addr_type(self.family);
        let mut chain = Chain::new(&name).with_comment(format!(
            "{} session affinity, {scope} endpoints",
            d.service_port()
        ));
        let mut pick = Vec::new();
        for (i, ep) in b.endpoints.iter().enumerate() {
            let ep_name = format!("{name}-{:016x}", stable_hash(&ep.to_string()));
            chain.rules.push(Rule {
                stmts: vec![
                    Stmt::eq(saddr.clone(), Expr::set(&ep_name)),
                    Stmt::goto(&ep_name),
                ],
            });
            pick.push((Value::Int(i as u32), Verdict::Goto(ep_name.clone())));
            let mut set = Set::new(&ep_name, vec![addr_type], None);
            set.flags = vec!["dynamic", "timeout"];
            set.timeout = Some(timeout);
            self.affinity_sets.insert(ep_name.clone(), set);
            let ep_chain = Chain::new(&ep_name)
                .with_comment(format!("{} to {ep}", d.service_port()))
                .rule(vec![Stmt::Update {
                    set: ep_name.clone(),
                    key: saddr.clone(),
                }])
                .rule(vec![
                    Stmt::eq(Expr::l4proto(), Expr::Value(Value::Proto(d.protocol))),
                    Stmt::Dnat {
                        family: self.family,
                        to: NatTo::Addr(*ep),
                    },
                ]);
            self.affinity_chains.insert(ep_name, ep_chain);
        }
        chain.rules.push(Rule {
            stmts: vec![Stmt::VmapInline {
                key: Expr::Numgen(b.endpoints.len() as u32),
                entries: pick,
            }],
        });
        self.affinity_chains.insert(name.clone(), chain);
        name
    }

    /// loadBalancerSourceRanges as data: the destination in `firewall-ips` (guarded), and one
    /// `destination . source range` interval per allowed range in `firewall-allow`; the one
    /// rule of `firewall-check` drops a new connection to a guarded destination whose source is
    /// in none of its ranges. No chain per Service, whatever the number of ranges.
    fn firewall(&mut self, d: &Destination) {
        if d.allowed_sources.is_empty() {
            return;
        }
        let key = Self::ip_key(d);
        self.add(
            "firewall-ips",
            Element::key(key.clone()).with_comment(Self::comment(d)),
        );
        for net in &d.allowed_sources {
            let mut k = key.to_vec();
            k.push(Value::Net(*net));
            self.add("firewall-allow", Element::key(k));
        }
    }

    fn destination(&mut self, d: &Destination) {
        self.firewall(d);
        let nodeport = d.address == Address::NodePort;
        let key = Self::ip_key(d);
        let comment = Self::comment(d);
        let tagged = |data: Option<Data>| Element {
            key: key.clone(),
            data,
            comment: Some(comment.clone()),
        };
        let (dispatch, masq, policy_chain, policy_internal, policy_external, no_endpoints) =
            if nodeport {
                (
                    "service-nodeports",
                    "nodeport-masquerade",
                    "nodeport-local-policy",
                    "local-policy-nodeports-internal",
                    "local-policy-nodeports",
                    "no-endpoint-nodeports",
                )
            } else {
                (
                    "service-ips",
                    "external-masquerade",
                    "local-policy",
                    "local-policy-ips-internal",
                    "local-policy-ips",
                    "no-endpoint-ips",
                )
            };
        let cluster_lane = Lane {
            nodeport,
            local: false,
        };
        let local_lane = Lane {
            nodeport,
            local: true,
        };
        match &d.route {
            Route::Reject => {
                self.add(
                    no_endpoints,
                    tagged(Some(Data::Verdict(Verdict::Goto("reject-traffic".into())))),
                );
            }
            Route::Drop => self.add(dispatch, tagged(Some(Data::Verdict(Verdict::Drop)))),
            Route::Internal(b) => {
                let v = self.backends(d, b, cluster_lane);
                self.add(dispatch, tagged(Some(Data::Verdict(v))));
            }
            Route::ExternalCluster(b) => {
                self.add(masq, Element::key(key.clone()));
                let v = self.backends(d, b, cluster_lane);
                self.add(dispatch, tagged(Some(Data::Verdict(v))));
            }
            Route::ExternalLocal { cluster, local } => {
                self.add(
                    dispatch,
                    tagged(Some(Data::Verdict(Verdict::Goto(policy_chain.into())))),
                );
                let v = self.backends(d, cluster, cluster_lane);
                self.add(policy_internal, Element::map(key.clone(), Data::Verdict(v)));
                let v = match local {
                    Some(b) => self.backends(d, b, local_lane),
                    None => Verdict::Drop,
                };
                self.add(policy_external, Element::map(key.clone(), Data::Verdict(v)));
            }
        }
    }
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::Ip => "ipv4_addr",
        Family::Ip6 => "ipv6_addr",
    }
}

impl Builder {
    fn new(family: Family, elements: bool) -> Builder {
        Builder {
            family,
            elements,
            sets: BTreeMap::new(),
            lanes: BTreeMap::new(),
            affinity_chains: BTreeMap::new(),
            affinity_sets: BTreeMap::new(),
        }
    }
}

/// The elements, chains and sets that some destinations (one Service's) add to their family's
/// table, by set or chain name. The incremental compiler renders a changed Service's old and
/// new destinations this way and sends the difference: the same code as a full render, so the
/// two cannot disagree.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Fragment {
    /// Elements by set name (endpoint slot maps included), each list sorted.
    pub sets: BTreeMap<String, Vec<Element>>,
    pub affinity_chains: BTreeMap<String, Chain>,
    pub affinity_sets: BTreeMap<String, Set>,
}

pub(crate) fn fragment<'a>(
    family: IpFamily,
    destinations: impl IntoIterator<Item = &'a Destination>,
) -> Fragment {
    let mut b = Builder::new(family_of(family), true);
    for d in destinations {
        b.destination(d);
    }
    let mut sets: BTreeMap<String, Vec<Element>> = b
        .sets
        .into_iter()
        .map(|(name, v)| (name.to_string(), v))
        .collect();
    for (lane, lane_use) in b.lanes {
        for (k, elements) in lane_use.slots.into_iter().enumerate() {
            sets.insert(lane.slot(k), elements);
        }
    }
    for v in sets.values_mut() {
        v.sort();
    }
    Fragment {
        sets,
        affinity_chains: b.affinity_chains,
        affinity_sets: b.affinity_sets,
    }
}

/// The endpoint counts a destination uses in each lane (none for session affinity, which has
/// chains of its own): lane `l` needs slot maps `0..n` and, for `n > 1`, the chain picking among
/// `n`.
pub(crate) fn lane_sizes(d: &Destination) -> Vec<(Lane, usize)> {
    let nodeport = d.address == Address::NodePort;
    let cluster = Lane {
        nodeport,
        local: false,
    };
    let local = Lane {
        nodeport,
        local: true,
    };
    let mut out = Vec::new();
    let mut add = |lane: Lane, b: &Backends| {
        if b.affinity_timeout.is_none() {
            out.push((lane, b.endpoints.len()));
        }
    };
    match &d.route {
        Route::Reject | Route::Drop => {}
        Route::Internal(b) | Route::ExternalCluster(b) => add(cluster, b),
        Route::ExternalLocal {
            cluster: c,
            local: l,
        } => {
            add(cluster, c);
            if let Some(l) = l {
                add(local, l);
            }
        }
    }
    out
}

/// Map `<lane>-k`: the k-th endpoint of each destination in the lane.
pub(crate) fn slot_set(family: Family, lane: Lane, k: usize) -> Set {
    let addr = addr_type(family);
    let key = if lane.nodeport {
        vec!["inet_proto", "inet_service"]
    } else {
        vec![addr, "inet_proto", "inet_service"]
    };
    let mut set = Set::new(lane.slot(k), key, Some(vec![addr, "inet_service"]));
    set.comment = Some(format!(
        "endpoint {k} of each {}",
        if lane.local {
            "destination, on this node"
        } else {
            "destination"
        }
    ));
    set
}

/// Chain `<lane>-k`: DNAT to the destination's k-th endpoint.
pub(crate) fn slot_chain(family: Family, lane: Lane, k: usize) -> Chain {
    let daddr = Expr::ip(family, "daddr");
    let key = if lane.nodeport {
        Expr::Concat(vec![Expr::l4proto(), Expr::dport()])
    } else {
        Expr::Concat(vec![daddr, Expr::l4proto(), Expr::dport()])
    };
    Chain::new(lane.slot(k)).rule(vec![
        Stmt::eq(Expr::l4proto(), Expr::AnonSet(TRANSPORTS.to_vec())),
        Stmt::Dnat {
            family,
            to: NatTo::Map {
                key,
                map: lane.slot(k),
            },
        },
    ])
}

/// Chain `<lane>-of-n`: one of `n` endpoints, uniformly at random.
pub(crate) fn pick_chain(lane: Lane, n: usize) -> Chain {
    let entries = (0..n)
        .map(|k| (Value::Int(k as u32), Verdict::Goto(lane.slot(k))))
        .collect();
    Chain::new(lane.pick(n)).rule(vec![Stmt::VmapInline {
        key: Expr::Numgen(n as u32),
        entries,
    }])
}

/// The match for "this packet comes from a pod" (`Op::Eq`) or "does not" (`Op::Ne`), as
/// `detectLocalMode` says; `None` when pods cannot be recognised. Interfaces are matched by
/// name (`iifname`), so a bridge or a pod interface that does not exist yet when the rules are
/// loaded still counts once it appears.
fn local_match(plan: &FamilyPlan, op: Op) -> Option<Stmt> {
    let (left, right) = match &plan.local_traffic {
        LocalTraffic::Unknown => return None,
        LocalTraffic::FromCidrs(_) => (
            Expr::ip(family_of(plan.family), "saddr"),
            Expr::set("pod-cidrs"),
        ),
        LocalTraffic::FromInterfacePrefix(prefix) => {
            (Expr::Meta("iifname"), Expr::Str(format!("{prefix}*")))
        }
        LocalTraffic::FromInterface(name) => (Expr::Meta("iifname"), Expr::Str(name.clone())),
    };
    Some(Stmt::Match { left, op, right })
}

fn render_family(plan: &FamilyPlan, mark: u32, elements: bool) -> Table {
    let family = family_of(plan.family);
    let mut b = Builder::new(family, elements);
    for d in &plan.destinations {
        b.destination(d);
    }
    for (ip, svc) in &plan.cluster_ips {
        b.add(
            "cluster-ips",
            Element::key(vec![Value::Addr(*ip)]).with_comment(svc.to_string()),
        );
    }
    for ip in &plan.hairpin {
        b.add(
            "hairpin",
            Element::key(vec![Value::Addr(*ip), Value::Addr(*ip)]),
        );
    }
    for net in &plan.service_cidrs {
        b.add("service-cidrs", Element::key(vec![Value::Net(*net)]));
    }
    if let LocalTraffic::FromCidrs(nets) = &plan.local_traffic {
        for net in nets {
            b.add("pod-cidrs", Element::key(vec![Value::Net(*net)]));
        }
    }
    match &plan.nodeports {
        NodePortMatch::Addresses(ips) => {
            for ip in ips {
                b.add("nodeport-ips", Element::key(vec![Value::Addr(*ip)]));
            }
        }
        NodePortMatch::LocalIn(nets) => {
            for net in nets {
                b.add("nodeport-cidrs", Element::key(vec![Value::Net(*net)]));
            }
        }
        NodePortMatch::AnyLocal | NodePortMatch::Nothing => {}
    }

    let sets = declare_sets(&mut b);
    let chains = chains(&b, plan, mark);
    Table {
        family,
        name: TABLE.into(),
        comment: Some("svcproxy: Kubernetes Services on this node; generated, do not edit".into()),
        sets,
        chains,
    }
}

/// Declares every set and map, in a fixed order, with the elements gathered by the builder.
fn declare_sets(b: &mut Builder) -> Vec<Set> {
    let f = b.family;
    let addr = addr_type(f);
    let ip_key = || vec![addr, "inet_proto", "inet_service"];
    let port_key = || vec!["inet_proto", "inet_service"];
    let verdict = || Some(vec!["verdict"]);
    let mut out = Vec::new();
    let mut push = |name: &'static str,
                    mut set: Set,
                    comment: &str,
                    sets: &mut BTreeMap<&'static str, Vec<Element>>| {
        set.comment = Some(comment.into());
        let mut elements = sets.remove(name).unwrap_or_default();
        elements.sort();
        set.elements = elements;
        out.push(set);
    };
    let sets = &mut b.sets;
    push(
        "cluster-ips",
        Set::new("cluster-ips", vec![addr], None),
        "every ClusterIP",
        sets,
    );
    if sets.contains_key("pod-cidrs") {
        let mut s = Set::new("pod-cidrs", vec![addr], None);
        s.flags = vec!["interval"];
        push(
            "pod-cidrs",
            s,
            "sources that are pods (detectLocalMode)",
            sets,
        );
    }
    if sets.contains_key("nodeport-ips") {
        push(
            "nodeport-ips",
            Set::new("nodeport-ips", vec![addr], None),
            "addresses that answer NodePorts",
            sets,
        );
    }
    if sets.contains_key("nodeport-cidrs") {
        let mut s = Set::new("nodeport-cidrs", vec![addr], None);
        s.flags = vec!["interval"];
        push(
            "nodeport-cidrs",
            s,
            "local addresses in these networks answer NodePorts",
            sets,
        );
    }
    let mut s = Set::new("service-cidrs", vec![addr], None);
    s.flags = vec!["interval"];
    push(
        "service-cidrs",
        s,
        "Service CIDRs: an address no Service holds is dropped",
        sets,
    );
    push(
        "firewall-ips",
        Set::new("firewall-ips", ip_key(), None),
        "load-balancer destinations with loadBalancerSourceRanges",
        sets,
    );
    let mut s = Set::new(
        "firewall-allow",
        vec![addr, "inet_proto", "inet_service", addr],
        None,
    );
    s.flags = vec!["interval"];
    push(
        "firewall-allow",
        s,
        "guarded destination . allowed source range",
        sets,
    );
    push(
        "hairpin",
        Set::new("hairpin", vec![addr, addr], None),
        "endpoint on this node reaching itself",
        sets,
    );
    push(
        "service-ips",
        Set::new("service-ips", ip_key(), verdict()),
        "destination address, protocol, port: what to do",
        sets,
    );
    push(
        "service-nodeports",
        Set::new("service-nodeports", port_key(), verdict()),
        "NodePorts: what to do",
        sets,
    );
    push(
        "external-masquerade",
        Set::new("external-masquerade", ip_key(), None),
        "external addresses with Cluster traffic policy",
        sets,
    );
    push(
        "nodeport-masquerade",
        Set::new("nodeport-masquerade", port_key(), None),
        "NodePorts with Cluster traffic policy",
        sets,
    );
    push(
        "local-policy-ips",
        Set::new("local-policy-ips", ip_key(), verdict()),
        "Local traffic policy, clients outside the cluster",
        sets,
    );
    push(
        "local-policy-ips-internal",
        Set::new("local-policy-ips-internal", ip_key(), verdict()),
        "Local traffic policy, pods and this node",
        sets,
    );
    push(
        "local-policy-nodeports",
        Set::new("local-policy-nodeports", port_key(), verdict()),
        "Local traffic policy, clients outside the cluster",
        sets,
    );
    push(
        "local-policy-nodeports-internal",
        Set::new("local-policy-nodeports-internal", port_key(), verdict()),
        "Local traffic policy, pods and this node",
        sets,
    );
    push(
        "no-endpoint-ips",
        Set::new("no-endpoint-ips", ip_key(), verdict()),
        "Services without endpoints: refused",
        sets,
    );
    push(
        "no-endpoint-nodeports",
        Set::new("no-endpoint-nodeports", port_key(), verdict()),
        "NodePorts without endpoints: refused",
        sets,
    );
    for (lane, lane_use) in &mut b.lanes {
        for (k, elements) in lane_use.slots.iter_mut().enumerate() {
            let mut set = slot_set(f, *lane, k);
            elements.sort();
            set.elements = std::mem::take(elements);
            out.push(set);
        }
    }
    debug_assert!(
        sets.is_empty(),
        "undeclared sets: {:?}",
        sets.keys().collect::<Vec<_>>()
    );
    out.extend(std::mem::take(&mut b.affinity_sets).into_values());
    out
}

/// loadBalancerSourceRanges, checked as kube-proxy's nftables mode does: for new connections,
/// before DNAT (so the destination is still the load-balancer IP), from prerouting (clients,
/// pods included) and output (the node). One fixed rule: the sets hold the ranges.
fn firewall_chains(f: Family) -> Vec<Chain> {
    let new_conn = || Stmt::Match {
        left: Expr::Ct("state"),
        op: Op::Has,
        right: Expr::Keyword("new"),
    };
    let ip_key = || Expr::Concat(vec![Expr::ip(f, "daddr"), Expr::l4proto(), Expr::dport()]);
    let with_source = Expr::Concat(vec![
        Expr::ip(f, "daddr"),
        Expr::l4proto(),
        Expr::dport(),
        Expr::ip(f, "saddr"),
    ]);
    vec![
        Chain::base("firewall-prerouting", "filter", "prerouting", DSTNAT - 10)
            .rule(vec![new_conn(), Stmt::jump("firewall-check")]),
        Chain::base("firewall-output", "filter", "output", DSTNAT - 10)
            .rule(vec![new_conn(), Stmt::jump("firewall-check")]),
        Chain::new("firewall-check")
            .with_comment("loadBalancerSourceRanges")
            .rule(vec![
                Stmt::eq(ip_key(), Expr::set("firewall-ips")),
                Stmt::ne(with_source, Expr::set("firewall-allow")),
                Stmt::Verdict(Verdict::Drop),
            ]),
    ]
}

fn chains(b: &Builder, plan: &FamilyPlan, mark: u32) -> Vec<Chain> {
    let f = b.family;
    let daddr = || Expr::ip(f, "daddr");
    let saddr = || Expr::ip(f, "saddr");
    let ip_key = || Expr::Concat(vec![daddr(), Expr::l4proto(), Expr::dport()]);
    let port_key = || Expr::Concat(vec![Expr::l4proto(), Expr::dport()]);
    let loopback: IpAddr = match f {
        Family::Ip => "127.0.0.0".parse().unwrap(),
        Family::Ip6 => "::1".parse().unwrap(),
    };
    let not_loopback = || match f {
        Family::Ip => Stmt::ne(
            daddr(),
            Expr::Value(Value::Net("127.0.0.0/8".parse().unwrap())),
        ),
        Family::Ip6 => Stmt::ne(daddr(), Expr::Value(Value::Addr(loopback))),
    };
    let local_daddr = || Stmt::eq(Expr::FibType("daddr"), Expr::Keyword("local"));
    let local_saddr = || Stmt::eq(Expr::FibType("saddr"), Expr::Keyword("local"));
    // Which destination addresses are NodePort addresses. The kernel answers "is this one of
    // my addresses" itself (`fib daddr type local`), at the moment the packet arrives: an address
    // added to or removed from an interface (DHCP, a VIP moved by keepalived, a new interface)
    // counts at once, with no sync, no address list to keep up to date, and no window in which
    // that list is stale. `--nodeport-addresses CIDRS` narrows it with an interval set of the
    // CIDRs (constant until the configuration changes); loopback never answers. Only `primary`
    // names addresses, the Node object's, which change through the apiserver like any object.
    let nodeport_match: Option<Vec<Stmt>> = match &plan.nodeports {
        NodePortMatch::AnyLocal => Some(vec![local_daddr(), not_loopback()]),
        NodePortMatch::LocalIn(_) => Some(vec![
            local_daddr(),
            Stmt::eq(daddr(), Expr::set("nodeport-cidrs")),
            not_loopback(),
        ]),
        NodePortMatch::Addresses(_) => Some(vec![Stmt::eq(daddr(), Expr::set("nodeport-ips"))]),
        NodePortMatch::Nothing => None,
    };
    let from_pod = local_match(plan, Op::Eq);
    let mark_masq = || Stmt::jump("mark-for-masquerade");
    let with = |mut stmts: Vec<Stmt>, more: Vec<Stmt>| {
        stmts.extend(more);
        stmts
    };

    let mut chains = vec![
        Chain::base("prerouting", "nat", "prerouting", DSTNAT).rule(vec![Stmt::jump("services")]),
        Chain::base("output", "nat", "output", DSTNAT).rule(vec![Stmt::jump("services")]),
        Chain::base("postrouting", "nat", "postrouting", SRCNAT)
            .rule(vec![Stmt::jump("masquerading")]),
        Chain::base("filter-input", "filter", "input", FILTER).rule(vec![
            Stmt::Match {
                left: Expr::Ct("state"),
                op: Op::Has,
                right: Expr::Keyword("new"),
            },
            Stmt::jump("endpoints-check"),
        ]),
        Chain::base("filter-forward", "filter", "forward", FILTER).rule(vec![
            Stmt::Match {
                left: Expr::Ct("state"),
                op: Op::Has,
                right: Expr::Keyword("new"),
            },
            Stmt::jump("endpoints-check"),
        ]),
        Chain::base("filter-output", "filter", "output", FILTER).rule(vec![
            Stmt::Match {
                left: Expr::Ct("state"),
                op: Op::Has,
                right: Expr::Keyword("new"),
            },
            Stmt::jump("endpoints-check"),
        ]),
    ];

    let mut services = Chain::new("services").with_comment("find the Service of a new connection");
    match plan.clusterip_masquerade {
        ClusterIpMasquerade::Never => {}
        ClusterIpMasquerade::NotLocal => {
            if let Some(not_from_pod) = local_match(plan, Op::Ne) {
                services = services.rule(vec![
                    Stmt::eq(daddr(), Expr::set("cluster-ips")),
                    not_from_pod,
                    mark_masq(),
                    Stmt::Comment("ClusterIP traffic not from a pod".into()),
                ]);
            }
        }
        ClusterIpMasquerade::Always => {
            services = services.rule(vec![
                Stmt::eq(daddr(), Expr::set("cluster-ips")),
                mark_masq(),
                Stmt::Comment("masquerade-all".into()),
            ]);
        }
    }
    services = services
        .rule(vec![
            Stmt::eq(ip_key(), Expr::set("external-masquerade")),
            mark_masq(),
        ])
        .rule(vec![Stmt::Vmap {
            key: ip_key(),
            map: "service-ips".into(),
        }]);
    if let Some(m) = &nodeport_match {
        services = services.rule(with(m.clone(), vec![Stmt::jump("nodeports")]));
    }
    chains.push(services);
    chains.push(
        Chain::new("nodeports")
            .rule(vec![
                Stmt::eq(port_key(), Expr::set("nodeport-masquerade")),
                mark_masq(),
            ])
            .rule(vec![Stmt::Vmap {
                key: port_key(),
                map: "service-nodeports".into(),
            }]),
    );
    for (name, key, internal, external) in [
        (
            "local-policy",
            ip_key(),
            "local-policy-ips-internal",
            "local-policy-ips",
        ),
        (
            "nodeport-local-policy",
            port_key(),
            "local-policy-nodeports-internal",
            "local-policy-nodeports",
        ),
    ] {
        let mut c = Chain::new(name).with_comment("externalTrafficPolicy Local");
        if let Some(from_pod) = &from_pod {
            c = c.rule(vec![
                from_pod.clone(),
                Stmt::Vmap {
                    key: key.clone(),
                    map: internal.into(),
                },
            ]);
        }
        c = c
            .rule(vec![local_saddr(), mark_masq()])
            .rule(vec![
                local_saddr(),
                Stmt::Vmap {
                    key: key.clone(),
                    map: internal.into(),
                },
            ])
            .rule(vec![Stmt::Vmap {
                key,
                map: external.into(),
            }]);
        chains.push(c);
    }
    chains.push(Chain::new("mark-for-masquerade").rule(vec![Stmt::MarkOr(mark)]));
    chains.push(
        Chain::new("masquerading")
            .rule(vec![
                Stmt::Match {
                    left: Expr::Ct("status"),
                    op: Op::Has,
                    right: Expr::Keyword("dnat"),
                },
                Stmt::eq(Expr::Concat(vec![saddr(), daddr()]), Expr::set("hairpin")),
                Stmt::Masquerade {
                    fully_random: false,
                },
                Stmt::Comment("hairpin".into()),
            ])
            .rule(vec![
                Stmt::eq(Expr::MarkAnd(mark), Expr::Value(Value::Int(0))),
                Stmt::Verdict(Verdict::Return),
            ])
            .rule(vec![Stmt::MarkXor(mark)])
            .rule(vec![Stmt::Masquerade { fully_random: true }]),
    );
    let mut check = Chain::new("endpoints-check").rule(vec![Stmt::Vmap {
        key: ip_key(),
        map: "no-endpoint-ips".into(),
    }]);
    if let Some(m) = &nodeport_match {
        check = check.rule(with(
            m.clone(),
            vec![Stmt::Vmap {
                key: port_key(),
                map: "no-endpoint-nodeports".into(),
            }],
        ));
    }
    check = check.rule(vec![
        Stmt::eq(daddr(), Expr::set("cluster-ips")),
        Stmt::goto("reject-traffic"),
        Stmt::Comment("port the Service does not have".into()),
    ]);
    check = check.rule(vec![
        Stmt::eq(daddr(), Expr::set("service-cidrs")),
        Stmt::Verdict(Verdict::Drop),
        Stmt::Comment("unallocated ClusterIP".into()),
    ]);
    chains.push(check);
    chains.extend(firewall_chains(f));
    chains.push(
        Chain::new("reject-traffic")
            .rule(vec![Stmt::Reject(f, Reject::TcpReset)])
            .rule(vec![Stmt::Reject(f, Reject::PortUnreachable)]),
    );

    for (lane, lane_use) in &b.lanes {
        for n in &lane_use.counts {
            chains.push(pick_chain(*lane, *n));
        }
        for k in 0..lane_use.slots.len() {
            chains.push(slot_chain(f, *lane, k));
        }
    }
    chains.extend(b.affinity_chains.values().cloned());
    chains
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProxyConfig;
    use crate::synthetic;
    use std::sync::Arc;

    /// `n` load-balancer Services, each with `ranges` source ranges.
    fn guarded(n: usize, ranges: usize) -> Ruleset {
        let mut s = synthetic::cluster(n, 2);
        for i in 0..n {
            let svc = synthetic::nth_mut(&mut s.services, i);
            let mut v = svc.as_ref().clone();
            v.load_balancer_ips = vec![format!("198.51.{}.{}", i / 250, i % 250).parse().unwrap()];
            v.load_balancer_source_ranges = (0..ranges)
                .map(|r| format!("203.0.{}.0/24", 2 * r).parse().unwrap())
                .collect();
            *svc = Arc::new(v);
        }
        render(&crate::plan::plan(&s, &ProxyConfig::default()))
    }

    fn set<'a>(r: &'a Ruleset, name: &str) -> &'a Set {
        r.tables[0].sets.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn source_ranges_are_data_not_chains() {
        let small = guarded(1, 1);
        let big = guarded(300, 4);
        // The same chains and sets, however many Services and ranges: the kernel cost is flat.
        let names = |r: &Ruleset| {
            (
                r.tables[0]
                    .chains
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>(),
                r.tables[0]
                    .sets
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(names(&small), names(&big));
        assert_eq!(set(&big, "firewall-ips").elements.len(), 300);
        assert_eq!(set(&big, "firewall-allow").elements.len(), 1200);
        let e = &set(&small, "firewall-allow").elements[0];
        assert_eq!(
            e.key.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["198.51.0.0", "tcp", "80", "203.0.0.0/24"]
        );
        let check = small.tables[0]
            .chains
            .iter()
            .find(|c| c.name == "firewall-check")
            .unwrap();
        assert_eq!(check.rules.len(), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// A skeleton has every table, chain and set a whole render has, declared the same,
        /// and no elements.
        #[test]
        fn a_skeleton_is_the_ruleset_without_its_elements(
            snapshot in crate::incremental::tests::generated::snapshot(),
            cidrs in proptest::prelude::any::<bool>(),
        ) {
            let plan = crate::plan::plan(
                &snapshot,
                &crate::incremental::tests::generated::config(cidrs),
            );
            let mut whole = render(&plan);
            for table in &mut whole.tables {
                for set in &mut table.sets {
                    set.elements.clear();
                }
            }
            assert_eq!(skeleton(&plan), whole);
        }
    }
}
