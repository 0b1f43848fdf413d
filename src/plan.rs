//! Kubernetes Service semantics, resolved into a backend-independent plan.
//!
//! [`plan`] is the one place that knows which endpoints serve which traffic: readiness and the
//! terminating fallback, internal and external traffic policies, session affinity, what is
//! masqueraded, rejected or dropped. It is pure and deterministic (no I/O, no clock, ordered
//! collections only): the same snapshot always gives the same plan. Backends only render it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{
    DetectLocal, Endpoint, EndpointHints, EndpointSlice, IpFamily, NodeInfo, NodePortAddresses,
    ObjectRef, Protocol, ProxyConfig, Service, ServicePort, Snapshot, TrafficPolicy,
};

/// The whole plan: one part per IP family, IPv4 first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// The packet mark bit (as a mask) that flags a packet for masquerading.
    pub masquerade_mark: u32,
    pub families: Vec<FamilyPlan>,
    /// Drop forwarded packets that conntrack marks INVALID (unless `conntrack.tcpBeLiberal`).
    /// kube-proxy does so in its iptables mode only (an out-of-window TCP packet that is not
    /// dropped reaches the pod unNATed and is answered with a reset that kills the
    /// connection); its nftables mode does not, and neither does svcproxy's.
    pub drop_invalid: bool,
    /// Destinations claimed by more than one Service: the first Service (in namespace/name
    /// order) keeps it, the others are listed here so that the caller can report them.
    pub conflicts: Vec<Conflict>,
}

/// Two Services claiming the same address, protocol and port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    pub destination: String,
    pub kept: String,
    pub dropped: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is claimed by both {} and {}; {} keeps it",
            self.destination, self.kept, self.dropped, self.kept
        )
    }
}

/// Which traffic to a ClusterIP is masqueraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ClusterIpMasquerade {
    /// None (pod traffic cannot be recognised, and masquerade-all is off).
    Never,
    /// Traffic that is not from a pod ([`FamilyPlan::local_traffic`]): its reply would not
    /// find its way back through this node otherwise.
    NotLocal,
    /// All of it (`--masquerade-all`).
    Always,
}

/// How a packet from a pod is recognised, for one family: kube-proxy's "local traffic
/// detector" (`detectLocalMode`). It decides two things only: which ClusterIP traffic is
/// masqueraded ([`ClusterIpMasquerade::NotLocal`]), and which clients of an
/// externalTrafficPolicy Local address are pods, sent to any endpoint ([`Route::ExternalLocal`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum LocalTraffic {
    /// Not recognisable (no CIDR of this family is known): nothing is treated as pod traffic.
    Unknown,
    /// Sources inside these CIDRs (`ClusterCIDR`: the cluster's pod network; `NodeCIDR`: the
    /// Node's `spec.podCIDRs`).
    FromCidrs(#[serde(serialize_with = "crate::model::nets::serialize")] Vec<IpNet>),
    /// Packets arriving on an interface whose name starts with this prefix
    /// (`InterfaceNamePrefix`).
    FromInterfacePrefix(String),
    /// Packets arriving on this interface (`BridgeInterface`).
    FromInterface(String),
}

impl LocalTraffic {
    /// The detector for `family`, from the configured mode and the Node.
    pub fn new(
        mode: &DetectLocal,
        cluster_cidrs: &[IpNet],
        node: &NodeInfo,
        family: IpFamily,
    ) -> Self {
        let cidrs = |nets: &[IpNet]| {
            let mine: Vec<IpNet> = nets
                .iter()
                .filter(|n| IpFamily::of_net(n) == family)
                .map(IpNet::trunc)
                .collect();
            if mine.is_empty() {
                LocalTraffic::Unknown
            } else {
                LocalTraffic::FromCidrs(mine)
            }
        };
        match mode {
            DetectLocal::ClusterCidr => cidrs(cluster_cidrs),
            DetectLocal::NodeCidr => cidrs(&node.pod_cidrs),
            DetectLocal::InterfaceNamePrefix(p) => LocalTraffic::FromInterfacePrefix(p.clone()),
            DetectLocal::BridgeInterface(i) => LocalTraffic::FromInterface(i.clone()),
        }
    }

    pub fn is_known(&self) -> bool {
        *self != LocalTraffic::Unknown
    }
}

/// Which destination addresses answer NodePorts, for one family.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum NodePortMatch {
    /// Every local address except loopback: the kernel knows them, no list needed.
    AnyLocal,
    /// Local addresses inside these CIDRs.
    LocalIn(#[serde(serialize_with = "crate::model::nets::serialize")] Vec<IpNet>),
    /// Exactly these addresses.
    Addresses(Vec<IpAddr>),
    /// No address of this family answers NodePorts.
    Nothing,
}

/// The plan for one IP family.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FamilyPlan {
    pub family: IpFamily,
    pub local_traffic: LocalTraffic,
    pub clusterip_masquerade: ClusterIpMasquerade,
    pub nodeports: NodePortMatch,
    /// Every ClusterIP in use, with its Service: traffic to a port the Service lacks is rejected.
    pub cluster_ips: BTreeMap<IpAddr, ObjectRef>,
    /// The Service CIDRs of this family (aggregated): traffic to an address inside them that is
    /// not in [`FamilyPlan::cluster_ips`] is dropped.
    #[serde(serialize_with = "crate::model::nets::serialize")]
    pub service_cidrs: Vec<IpNet>,
    /// Endpoints on this node: a pod reaching itself through a Service is masqueraded so that
    /// its reply comes back through the proxy's NAT.
    pub hairpin: BTreeSet<IpAddr>,
    /// Every address, protocol and port the proxy handles, sorted by [`Destination::key`].
    pub destinations: Vec<Destination>,
}

/// Where traffic is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Address {
    Ip(IpAddr),
    /// Any of the node's NodePort addresses ([`FamilyPlan::nodeports`]).
    NodePort,
}

/// FNV-1a, 64 bits: a stable hash (the same in every build and run) for the names both
/// backends derive from the plan's identities (chains, sets, affinity maps), where a name
/// must be short and must not change between syncs.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Why the proxy handles a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum DestinationKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl DestinationKind {
    /// What the destination is, in words: both backends' rule comments and the plan's
    /// messages say it the same way.
    pub fn label(self) -> &'static str {
        match self {
            DestinationKind::ClusterIp => "cluster IP",
            DestinationKind::ExternalIp => "external IP",
            DestinationKind::LoadBalancer => "load balancer IP",
            DestinationKind::NodePort => "node port",
        }
    }
}

/// One address, protocol and port of a Service, and what happens to traffic sent there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    pub address: Address,
    pub protocol: Protocol,
    pub port: u16,
    pub kind: DestinationKind,
    pub service: ObjectRef,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    pub route: Route,
    /// loadBalancerSourceRanges of a load-balancer IP: new connections from sources outside
    /// these (aggregated, sorted) are dropped, whatever the route. Empty: no firewall.
    #[serde(serialize_with = "crate::model::nets::serialize")]
    pub allowed_sources: Vec<IpNet>,
}

impl Destination {
    pub fn key(&self) -> (Address, Protocol, u16) {
        (self.address, self.protocol, self.port)
    }

    /// `namespace/name:port` (the port's name, or its number when unnamed), for comments and logs.
    pub fn service_port(&self) -> String {
        service_port_label(&self.service, &self.port_name, self.protocol, self.port)
    }
}

fn service_port_label(svc: &ObjectRef, port_name: &str, protocol: Protocol, port: u16) -> String {
    if port_name.is_empty() {
        format!("{svc}:{port}/{protocol}")
    } else {
        format!("{svc}:{port_name}/{protocol}")
    }
}

/// What happens to new connections to a destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Route {
    /// The Service has no usable endpoint at all: refuse at once (TCP reset / ICMP unreachable),
    /// so that clients fail fast instead of timing out.
    Reject,
    /// internalTrafficPolicy Local and no usable endpoint on this node: drop, as kube-proxy does.
    Drop,
    /// A ClusterIP: every client goes to these endpoints. Masquerading follows
    /// [`FamilyPlan::clusterip_masquerade`].
    Internal(Backends),
    /// An external destination (NodePort, external IP, load balancer IP) with
    /// externalTrafficPolicy Cluster: every client goes to these endpoints, always masqueraded
    /// (the endpoint may be on another node, and its reply must come back through this one).
    ExternalCluster(Backends),
    /// An external destination with externalTrafficPolicy Local. Clients outside the cluster go
    /// to this node's endpoints only, unmasqueraded so that the pod sees the real client address;
    /// with none (`local: None`) their traffic is dropped (the load balancer's health check sees
    /// this node as empty). Pods ([`FamilyPlan::local_traffic`]) and the node itself are not
    /// "external": they go to the cluster-wide endpoints, and the node's traffic is masqueraded.
    ExternalLocal {
        cluster: Backends,
        local: Option<Backends>,
    },
}

/// Which endpoints a backend set was chosen from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Scope {
    /// Endpoints anywhere in the cluster.
    Cluster,
    /// Endpoints on this node only.
    Local,
}

/// The endpoints a destination's traffic is spread over (uniformly at random per connection).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Backends {
    pub scope: Scope,
    /// Never empty; sorted.
    pub endpoints: Vec<SocketAddr>,
    /// ClientIP session affinity: a client keeps its endpoint until it has made no new
    /// connection for this many seconds.
    pub affinity_timeout: Option<u32>,
}

/// One endpoint of one Service port, merged over all slices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    hints: Option<&'a EndpointHints>,
    /// The endpoint as its (first) slice reports it, for explanations.
    endpoint: &'a Endpoint,
}

/// Why an endpoint of a Service port gets none of a destination's traffic. Each variant is
/// produced by the function that makes the decision ([`candidates`], [`usable`],
/// [`cluster_usable`], [`local_usable`]), while it decides, so that an explanation
/// (`svcproxy trace`) and the plan cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exclusion {
    /// Its slice is of the other IP family than the destination.
    WrongFamily,
    /// Its slice has no port with the Service port's name and protocol (a named targetPort
    /// the pods do not define, or a slice for other ports).
    NoSuchPort,
    /// Not ready, and not a usable fallback (ready endpoints exist, or it is not serving).
    NotReady,
    /// Serving but terminating, while ready endpoints exist: terminating endpoints are a
    /// fallback only.
    TerminatingWhileReadyExist,
    /// On another node, and a Local traffic policy keeps this traffic on this node.
    OtherNode,
    /// Topology: every ready endpoint has node hints and some name this node; this one's do not.
    NotHintedForThisNode,
    /// Topology: every ready endpoint has zone hints and some name this node's zone; this
    /// one's do not.
    NotHintedForThisZone,
}

impl Exclusion {
    /// In words, for `svcproxy trace`.
    pub fn describe(self) -> &'static str {
        match self {
            Exclusion::WrongFamily => "its EndpointSlice is of the other IP family",
            Exclusion::NoSuchPort => {
                "its EndpointSlice has no port of the Service port's name and protocol"
            }
            Exclusion::NotReady => "not ready (and not a serving-terminating fallback)",
            Exclusion::TerminatingWhileReadyExist => {
                "terminating (still serving), and ready endpoints exist: terminating ones are a fallback only"
            }
            Exclusion::OtherNode => "on another node, and a Local traffic policy applies",
            Exclusion::NotHintedForThisNode => {
                "topology: its hints name other nodes (every ready endpoint has node hints, some for this node)"
            }
            Exclusion::NotHintedForThisZone => {
                "topology: its hints name other zones (every ready endpoint has zone hints, some for this node's zone)"
            }
        }
    }
}

/// Which endpoint set an exclusion is about: the cluster-wide one, or the one a Local policy
/// keeps on this node.
pub(crate) trait Explain<'a> {
    /// `c` gets none of `scope`'s traffic, because of `why`.
    fn candidate(&mut self, _scope: Scope, _c: &Candidate<'a>, _why: Exclusion) {}
    /// An endpoint of `slice` is not a candidate at all for the port, because of `why`.
    fn slice_endpoint(&mut self, _slice: &'a EndpointSlice, _e: &'a Endpoint, _why: Exclusion) {}
}

/// The plan's explainer: says nothing (compiled away).
pub(crate) struct Silent;
impl Explain<'_> for Silent {}

/// The usable endpoints among `candidates`: the ready ones; if there are none, the ones that
/// are serving but terminating (so that a rolling update or a scale-down to zero does not cut
/// traffic while the last pods finish).
fn usable<'a, 'c, E: Explain<'a>>(
    candidates: impl Iterator<Item = &'c Candidate<'a>> + Clone,
    scope: Scope,
    ex: &mut E,
) -> Vec<SocketAddr>
where
    'a: 'c,
{
    let any_ready = candidates.clone().any(|c| c.ready);
    let mut out = Vec::new();
    for c in candidates {
        let fallback = c.serving && c.terminating;
        if c.ready || (!any_ready && fallback) {
            out.push(c.addr);
        } else if any_ready && fallback {
            ex.candidate(scope, c, Exclusion::TerminatingWhileReadyExist);
        } else {
            ex.candidate(scope, c, Exclusion::NotReady);
        }
    }
    out
}

/// The endpoints traffic kept on this node (a Local policy) uses: the usable ones among this
/// node's. Topology hints do not apply: this node is as close as can be.
fn local_usable<'a, E: Explain<'a>>(cands: &[Candidate<'a>], ex: &mut E) -> Vec<SocketAddr> {
    for c in cands.iter().filter(|c| !c.local) {
        ex.candidate(Scope::Local, c, Exclusion::OtherNode);
    }
    usable(cands.iter().filter(|c| c.local), Scope::Local, ex)
}

/// Which endpoints cluster-wide traffic may use on this node, as the EndpointSlice controller's
/// hints say (kube-proxy's `topologyModeFromHints`, pkg/proxy/topology.go). kube-proxy reads
/// neither `trafficDistribution` nor the `topology-mode` annotation: the controller turns
/// them into hints, and the proxy follows the hints it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// No usable hints: every endpoint.
    Any,
    /// Endpoints hinted for this node (`hints.forNodes`, `PreferSameNode`).
    SameNode,
    /// Endpoints hinted for this node's zone (`hints.forZones`, `PreferClose`,
    /// `PreferSameZone`, `topology-mode: Auto`).
    SameZone,
}

impl Topology {
    /// The mode for one Service port. Only ready endpoints count: node hints are used when
    /// every ready endpoint has one and at least one names this node; otherwise zone hints,
    /// when every ready endpoint has one and at least one names this node's zone; otherwise
    /// none. Hints are all or nothing, so that a half-updated slice (the controller adding
    /// hints one slice at a time) never concentrates the traffic on the hinted few.
    fn from_hints(cands: &[Candidate], node_name: &str, zone: Option<&str>) -> Topology {
        let mut any_ready = false;
        let (mut all_node_hints, mut for_node) = (true, false);
        let (mut all_zone_hints, mut for_zone) = (true, false);
        for c in cands.iter().filter(|c| c.ready) {
            any_ready = true;
            let (nodes, zones) = match c.hints {
                Some(h) => (h.for_nodes.as_slice(), h.for_zones.as_slice()),
                None => (&[][..], &[][..]),
            };
            if nodes.is_empty() {
                all_node_hints = false;
            } else if !node_name.is_empty() && nodes.iter().any(|n| n == node_name) {
                for_node = true;
            }
            if zones.is_empty() {
                all_zone_hints = false;
            } else if zone.is_some_and(|z| zones.iter().any(|h| h == z)) {
                for_zone = true;
            }
        }
        if !any_ready {
            Topology::Any
        } else if all_node_hints && for_node {
            Topology::SameNode
        } else if all_zone_hints && for_zone {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    fn admits(self, c: &Candidate, node_name: &str, zone: Option<&str>) -> bool {
        let hints = c.hints;
        match self {
            Topology::Any => true,
            Topology::SameNode => hints.is_some_and(|h| h.for_nodes.iter().any(|n| n == node_name)),
            Topology::SameZone => {
                hints.is_some_and(|h| zone.is_some_and(|z| h.for_zones.iter().any(|x| x == z)))
            }
        }
    }
}

/// The endpoints cluster-wide traffic uses: the ready ones the hints give this node; if none is
/// ready anywhere, the serving-but-terminating ones, hints aside (as kube-proxy's
/// `CategorizeEndpoints`: the hints only ever name ready endpoints).
fn cluster_usable<'a, E: Explain<'a>>(
    cands: &[Candidate<'a>],
    topology: Topology,
    node_name: &str,
    zone: Option<&str>,
    ex: &mut E,
) -> Vec<SocketAddr> {
    match topology {
        Topology::Any => usable(cands.iter(), Scope::Cluster, ex),
        mode => {
            let mut out = Vec::new();
            for c in cands {
                if !c.ready {
                    // Topology is only ever used when some endpoint is ready.
                    let why = if c.serving && c.terminating {
                        Exclusion::TerminatingWhileReadyExist
                    } else {
                        Exclusion::NotReady
                    };
                    ex.candidate(Scope::Cluster, c, why);
                } else if mode.admits(c, node_name, zone) {
                    out.push(c.addr);
                } else if mode == Topology::SameNode {
                    ex.candidate(Scope::Cluster, c, Exclusion::NotHintedForThisNode);
                } else {
                    ex.candidate(Scope::Cluster, c, Exclusion::NotHintedForThisZone);
                }
            }
            out
        }
    }
}

/// The endpoints of one Service port in one family, from every slice of the Service: each
/// slice resolves the target port by the Service port's name and protocol in its own port list.
fn candidates<'a, E: Explain<'a>>(
    slices: &[&'a EndpointSlice],
    family: IpFamily,
    port: &ServicePort,
    node_name: &str,
    ex: &mut E,
) -> Vec<Candidate<'a>> {
    let mut by_addr: BTreeMap<SocketAddr, Candidate<'a>> = BTreeMap::new();
    for slice in slices {
        if slice.family != family {
            for e in &slice.endpoints {
                ex.slice_endpoint(slice, e, Exclusion::WrongFamily);
            }
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            for e in &slice.endpoints {
                ex.slice_endpoint(slice, e, Exclusion::NoSuchPort);
            }
            continue;
        };
        for ep in &slice.endpoints {
            let c = Candidate {
                addr: SocketAddr::new(ep.address, target.port),
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                hints: ep.hints.as_deref(),
                endpoint: ep,
            };
            // The same endpoint in two slices (a pod moving between slices): merge the views.
            by_addr
                .entry(c.addr)
                .and_modify(|m| {
                    m.ready |= c.ready;
                    m.serving |= c.serving;
                    m.terminating &= c.terminating;
                    m.local |= c.local;
                    m.hints = m.hints.or(c.hints);
                })
                .or_insert(c);
        }
    }
    by_addr.into_values().collect()
}

/// An endpoint of a Service port, with the state the decisions read: what
/// [`explain_endpoints`] reports, for `svcproxy trace` and `svcproxy services`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointState {
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// The EndpointSlice it came from (the first, if several list it).
    pub slice: String,
}

/// An endpoint left out of an endpoint set, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Excluded {
    /// The address, with the target port when its slice resolves one.
    pub address: IpAddr,
    pub port: Option<u16>,
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub slice: String,
    pub reason: Exclusion,
}

/// How one Service port's endpoints are chosen in one family, every decision explained: the
/// same functions as the plan's, with a recording explainer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointChoice {
    /// Every candidate endpoint (merged over slices).
    pub endpoints: Vec<EndpointState>,
    /// Endpoints of the Service's slices that are no candidate for this port at all.
    pub not_candidates: Vec<Excluded>,
    /// The topology mode of cluster-wide traffic.
    pub topology: Topology,
    /// The cluster-wide endpoint set, and what it leaves out.
    pub cluster: Vec<SocketAddr>,
    pub cluster_excluded: Vec<Excluded>,
    /// The endpoints a Local policy keeps traffic on, and what it leaves out.
    pub local: Vec<SocketAddr>,
    pub local_excluded: Vec<Excluded>,
}

/// Records exclusions.
#[derive(Default)]
struct Recorder {
    not_candidates: Vec<Excluded>,
    cluster: Vec<Excluded>,
    local: Vec<Excluded>,
}

impl<'a> Explain<'a> for Recorder {
    fn candidate(&mut self, scope: Scope, c: &Candidate<'a>, why: Exclusion) {
        let e = Excluded {
            address: c.addr.ip(),
            port: Some(c.addr.port()),
            node: c.endpoint.node_name.clone(),
            zone: c.endpoint.zone.clone(),
            slice: String::new(),
            reason: why,
        };
        match scope {
            Scope::Cluster => self.cluster.push(e),
            Scope::Local => self.local.push(e),
        }
    }

    fn slice_endpoint(&mut self, slice: &'a EndpointSlice, e: &'a Endpoint, why: Exclusion) {
        self.not_candidates.push(Excluded {
            address: e.address,
            port: None,
            node: e.node_name.clone(),
            zone: e.zone.clone(),
            slice: slice.id.to_string(),
            reason: why,
        });
    }
}

/// [`plan_service`]'s endpoint choice for one port of `svc` in `ctx`'s family, explained.
pub fn explain_endpoints(
    ctx: &FamilyContext,
    svc_port: &ServicePort,
    slices: &[&EndpointSlice],
) -> EndpointChoice {
    let mut rec = Recorder::default();
    let cands = candidates(slices, ctx.family, svc_port, &ctx.node_name, &mut rec);
    // The slice each candidate came from, for the report.
    let slice_of = |addr: &SocketAddr| {
        slices
            .iter()
            .find(|s| s.family == ctx.family && s.endpoints.iter().any(|e| e.address == addr.ip()))
            .map(|s| s.id.to_string())
            .unwrap_or_default()
    };
    let topology = Topology::from_hints(&cands, &ctx.node_name, ctx.zone.as_deref());
    let cluster = cluster_usable(
        &cands,
        topology,
        &ctx.node_name,
        ctx.zone.as_deref(),
        &mut rec,
    );
    let local = local_usable(&cands, &mut rec);
    let fill = |v: &mut Vec<Excluded>| {
        for e in v.iter_mut() {
            if let Some(p) = e.port {
                e.slice = slice_of(&SocketAddr::new(e.address, p));
            }
        }
    };
    fill(&mut rec.cluster);
    fill(&mut rec.local);
    // An endpoint that is a candidate through another slice is not "no candidate".
    rec.not_candidates
        .retain(|x| !cands.iter().any(|c| c.addr.ip() == x.address));
    EndpointChoice {
        endpoints: cands
            .iter()
            .map(|c| EndpointState {
                address: c.addr,
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
                local: c.local,
                node: c.endpoint.node_name.clone(),
                zone: c.endpoint.zone.clone(),
                slice: slice_of(&c.addr),
            })
            .collect(),
        not_candidates: rec.not_candidates,
        topology,
        cluster,
        cluster_excluded: rec.cluster,
        local,
        local_excluded: rec.local,
    }
}

/// Resolves the Service semantics of a snapshot into a plan.
pub fn plan(snapshot: &Snapshot, config: &ProxyConfig) -> Plan {
    plan_counted(snapshot, config).0
}

/// How many Services contribute each shared entry of a family's plan: a ClusterIP or a hairpin
/// address stays in the plan while any Service still needs it. The incremental compiler
/// (`nft::incremental`) keeps these to patch a plan one Service at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyRefs {
    pub cluster_ips: BTreeMap<IpAddr, u32>,
    pub hairpin: BTreeMap<IpAddr, u32>,
}

/// [`plan`], with the reference counts of each family's shared entries.
pub fn plan_counted(snapshot: &Snapshot, config: &ProxyConfig) -> (Plan, Vec<FamilyRefs>) {
    let mut slices_by_service: BTreeMap<&ObjectRef, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in snapshot.slices.values() {
        slices_by_service
            .entry(&slice.service)
            .or_default()
            .push(slice);
    }
    let mut conflicts = Vec::new();
    let mut refs = Vec::new();
    let families = IpFamily::ALL
        .into_iter()
        .map(|family| {
            let (plan, r) =
                plan_family(snapshot, config, &slices_by_service, family, &mut conflicts);
            refs.push(r);
            plan
        })
        .collect();
    let plan = Plan {
        masquerade_mark: config.masquerade_mark(),
        families,
        drop_invalid: !config.tcp_be_liberal,
        conflicts,
    };
    (plan, refs)
}

/// What a family's plan holds apart from its Services: it follows from the configuration and
/// the Node alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyContext {
    pub family: IpFamily,
    pub local_traffic: LocalTraffic,
    pub clusterip_masquerade: ClusterIpMasquerade,
    pub nodeports: NodePortMatch,
    /// The node's name: endpoints on it are local, and node hints name it.
    pub node_name: String,
    /// The node's zone (its `topology.kubernetes.io/zone` label), for zone hints.
    pub zone: Option<String>,
    /// The node's primary address of this family: if a load balancer's source ranges hold it,
    /// the node may reach the load-balancer IP (see [`allowed_sources`]).
    pub node_ip: Option<IpAddr>,
}

impl FamilyContext {
    pub fn new(node: &NodeInfo, config: &ProxyConfig, family: IpFamily) -> FamilyContext {
        let local_traffic =
            LocalTraffic::new(&config.detect_local, &config.cluster_cidrs, node, family);
        let clusterip_masquerade = if config.masquerade_all {
            ClusterIpMasquerade::Always
        } else if local_traffic.is_known() {
            ClusterIpMasquerade::NotLocal
        } else {
            ClusterIpMasquerade::Never
        };
        let nodeports = match &config.nodeport_addresses {
            NodePortAddresses::All => NodePortMatch::AnyLocal,
            NodePortAddresses::Primary => {
                match node.primary(family).filter(|ip| !ip.is_loopback()) {
                    Some(ip) => NodePortMatch::Addresses(vec![ip]),
                    None => NodePortMatch::Nothing,
                }
            }
            NodePortAddresses::Cidrs(cidrs) => {
                let mine: Vec<IpNet> = cidrs
                    .iter()
                    .filter(|n| IpFamily::of_net(n) == family)
                    .map(IpNet::trunc)
                    .collect();
                if mine.is_empty() {
                    NodePortMatch::Nothing
                } else {
                    NodePortMatch::LocalIn(mine)
                }
            }
        };
        FamilyContext {
            family,
            local_traffic,
            clusterip_masquerade,
            nodeports,
            node_name: node.name.clone(),
            zone: node.zone.clone().filter(|z| !z.is_empty()),
            node_ip: node.primary(family),
        }
    }
}

/// What one Service contributes to one family's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePart {
    pub cluster_ip: IpAddr,
    /// In the Service's port order; a destination named twice (two ports with one number)
    /// appears twice: the plan keeps the first.
    pub destinations: Vec<Destination>,
    /// Its endpoints on this node.
    pub hairpin: BTreeSet<IpAddr>,
}

/// The part of one Service in one family, from its slices (any order, any family); `None` when
/// the Service has no ClusterIP of the family.
pub fn plan_service(
    ctx: &FamilyContext,
    svc: &Service,
    slices: &[&EndpointSlice],
) -> Option<ServicePart> {
    let family = ctx.family;
    let in_family = |ip: &IpAddr| IpFamily::of(ip) == family;
    // A Service serves a family only where it has a ClusterIP of that family.
    let cluster_ip = svc.cluster_ips.iter().copied().find(in_family)?;
    let mut part = ServicePart {
        cluster_ip,
        destinations: Vec::new(),
        hairpin: BTreeSet::new(),
    };
    for port in &svc.ports {
        let cands = candidates(slices, family, port, &ctx.node_name, &mut Silent);
        part.hairpin.extend(
            cands
                .iter()
                .filter(|c| c.local && (c.ready || c.serving))
                .map(|c| c.addr.ip()),
        );
        let routes = Routes::new(ctx, svc, &cands);
        let mut add = |address: Address, port_no: u16, kind: DestinationKind, route: Route| {
            part.destinations.push(Destination {
                address,
                protocol: port.protocol,
                port: port_no,
                kind,
                service: svc.id.clone(),
                port_name: port.name.clone(),
                route,
                allowed_sources: Vec::new(),
            });
        };
        add(
            Address::Ip(cluster_ip),
            port.port,
            DestinationKind::ClusterIp,
            routes.internal.clone(),
        );
        for ip in svc.external_ips.iter().filter(|ip| in_family(ip)) {
            add(
                Address::Ip(*ip),
                port.port,
                DestinationKind::ExternalIp,
                routes.external.clone(),
            );
        }
        for ip in svc.load_balancer_ips.iter().filter(|ip| in_family(ip)) {
            add(
                Address::Ip(*ip),
                port.port,
                DestinationKind::LoadBalancer,
                routes.external.clone(),
            );
        }
        if let Some(np) = port.node_port
            && ctx.nodeports != NodePortMatch::Nothing
        {
            add(
                Address::NodePort,
                np,
                DestinationKind::NodePort,
                routes.external.clone(),
            );
        }
    }
    let firewall = allowed_sources(ctx, svc);
    if !firewall.is_empty() {
        for d in &mut part.destinations {
            if d.kind == DestinationKind::LoadBalancer {
                d.allowed_sources.clone_from(&firewall);
            }
        }
    }
    Some(part)
}

/// loadBalancerSourceRanges, as kube-proxy reads them, for one family: the Service's ranges of
/// the family (a Service whose ranges are all of the other family has no firewall in this one,
/// as kube-proxy's per-family proxier sees it); and, when the node's own address is inside
/// them, the load-balancer IPs themselves: a VIP-like load balancer often puts its IP on the
/// node, so the node's requests to it loop back with that IP as source ("SNATted to the LB
/// IP"). NodePorts are never guarded, as in kube-proxy. Aggregated, so that an interval set
/// never holds overlapping ranges.
pub fn allowed_sources(ctx: &FamilyContext, svc: &Service) -> Vec<IpNet> {
    let ranges: Vec<IpNet> = svc
        .load_balancer_source_ranges
        .iter()
        .filter(|n| IpFamily::of_net(n) == ctx.family)
        .map(IpNet::trunc)
        .collect();
    if ranges.is_empty() {
        return ranges;
    }
    let from_node = ctx
        .node_ip
        .is_some_and(|ip| ranges.iter().any(|n| n.contains(&ip)));
    let mut allowed = ranges;
    if from_node {
        allowed.extend(
            svc.load_balancer_ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == ctx.family)
                .map(|ip| IpNet::from(*ip)),
        );
    }
    IpNet::aggregate(&allowed)
}

/// The Service CIDRs of a family: the cluster's ServiceCIDR objects, else the configured ones
/// (kube-proxy only drops unallocated ClusterIPs when it knows the CIDRs).
fn service_cidrs(snapshot: &Snapshot, config: &ProxyConfig, family: IpFamily) -> Vec<IpNet> {
    let source = if snapshot.service_cidrs.is_empty() {
        &config.service_cidrs
    } else {
        &snapshot.service_cidrs
    };
    let mine: Vec<IpNet> = source
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .map(IpNet::trunc)
        .collect();
    IpNet::aggregate(&mine)
}

fn plan_family(
    snapshot: &Snapshot,
    config: &ProxyConfig,
    slices_by_service: &BTreeMap<&ObjectRef, Vec<&EndpointSlice>>,
    family: IpFamily,
    conflicts: &mut Vec<Conflict>,
) -> (FamilyPlan, FamilyRefs) {
    let ctx = FamilyContext::new(&snapshot.node, config, family);
    let mut destinations: BTreeMap<(Address, Protocol, u16), Destination> = BTreeMap::new();
    let mut cluster_ips = BTreeMap::new();
    let mut hairpin = BTreeSet::new();
    let mut refs = FamilyRefs::default();
    let no_slices = Vec::new();
    for svc in snapshot.services.values() {
        let slices = slices_by_service.get(&svc.id).unwrap_or(&no_slices);
        let Some(part) = plan_service(&ctx, svc, slices) else {
            continue;
        };
        cluster_ips.insert(part.cluster_ip, svc.id.clone());
        *refs.cluster_ips.entry(part.cluster_ip).or_default() += 1;
        for ip in &part.hairpin {
            *refs.hairpin.entry(*ip).or_default() += 1;
        }
        hairpin.extend(part.hairpin);
        for d in part.destinations {
            match destinations.get(&d.key()) {
                Some(existing) => conflicts.push(Conflict {
                    destination: describe(&d),
                    kept: existing.service_port(),
                    dropped: d.service_port(),
                }),
                None => {
                    destinations.insert(d.key(), d);
                }
            }
        }
    }

    let plan = FamilyPlan {
        family,
        local_traffic: ctx.local_traffic,
        clusterip_masquerade: ctx.clusterip_masquerade,
        nodeports: ctx.nodeports,
        cluster_ips,
        service_cidrs: service_cidrs(snapshot, config, family),
        hairpin,
        destinations: destinations.into_values().collect(),
    };
    (plan, refs)
}

fn describe(d: &Destination) -> String {
    let addr = match d.address {
        Address::Ip(ip) => SocketAddr::new(ip, d.port).to_string(),
        Address::NodePort => format!("node port {}", d.port),
    };
    format!("{} {addr}/{}", d.kind.label(), d.protocol)
}

/// The two routes of one Service port: for its ClusterIP, and for its external destinations.
struct Routes {
    internal: Route,
    external: Route,
}

impl Routes {
    /// kube-proxy's `CategorizeEndpoints`: cluster-wide traffic (ClusterIPs under
    /// internalTrafficPolicy Cluster, external addresses under externalTrafficPolicy Cluster,
    /// and pods and the node itself under externalTrafficPolicy Local) follows the topology
    /// hints; traffic kept on this node by a Local policy ignores them (it is as close as can be).
    fn new(ctx: &FamilyContext, svc: &Service, cands: &[Candidate]) -> Routes {
        let (node, zone) = (ctx.node_name.as_str(), ctx.zone.as_deref());
        let topology = Topology::from_hints(cands, node, zone);
        let cluster = cluster_usable(cands, topology, node, zone, &mut Silent);
        let local = local_usable(cands, &mut Silent);
        if cluster.is_empty() {
            return Routes {
                internal: Route::Reject,
                external: Route::Reject,
            };
        }
        let backends = |scope, endpoints: Vec<SocketAddr>| Backends {
            scope,
            endpoints,
            affinity_timeout: svc.affinity_timeout,
        };
        let local_backends = (!local.is_empty()).then(|| backends(Scope::Local, local));
        let internal = match svc.internal_policy {
            TrafficPolicy::Cluster => Route::Internal(backends(Scope::Cluster, cluster.clone())),
            TrafficPolicy::Local => match &local_backends {
                Some(b) => Route::Internal(b.clone()),
                None => Route::Drop,
            },
        };
        let external = match svc.external_policy {
            TrafficPolicy::Cluster => Route::ExternalCluster(backends(Scope::Cluster, cluster)),
            TrafficPolicy::Local => Route::ExternalLocal {
                cluster: backends(Scope::Cluster, cluster),
                local: local_backends,
            },
        };
        Routes { internal, external }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointPort, NodeInfo, Service};
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn service(name: &str, cluster_ip: &str) -> Service {
        Service {
            id: ObjectRef::new("ns", name),
            cluster_ips: vec![ip(cluster_ip)],
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            affinity_timeout: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        }
    }

    fn ep(addr: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            address: ip(addr),
            ready,
            serving,
            terminating,
            node_name: Some(node.into()),
            zone: None,
            hints: None,
        }
    }

    fn slice(
        name: &str,
        svc: &str,
        port_name: &str,
        port: u16,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        let family = IpFamily::of(
            &endpoints
                .first()
                .map(|e| e.address)
                .unwrap_or(ip("0.0.0.0")),
        );
        EndpointSlice {
            id: ObjectRef::new("ns", name),
            service: ObjectRef::new("ns", svc),
            family,
            ports: vec![EndpointPort {
                name: port_name.into(),
                protocol: Protocol::Tcp,
                port,
            }],
            endpoints,
        }
    }

    fn snapshot(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Snapshot {
        Snapshot {
            services: services
                .into_iter()
                .map(|s| (s.id.clone(), Arc::new(s)))
                .collect(),
            slices: slices
                .into_iter()
                .map(|s| (s.id.clone(), Arc::new(s)))
                .collect(),
            node: NodeInfo {
                name: "me".into(),
                addresses: vec![ip("192.168.0.2")],
                ..NodeInfo::default()
            },
            service_cidrs: vec![],
        }
    }

    fn v4(p: &Plan) -> &FamilyPlan {
        &p.families[0]
    }

    fn route_of(p: &Plan, addr: Address, port: u16) -> &Route {
        &v4(p)
            .destinations
            .iter()
            .find(|d| d.address == addr && d.port == port)
            .unwrap_or_else(|| panic!("no destination {addr:?}:{port}"))
            .route
    }

    fn endpoints(r: &Route) -> Vec<SocketAddr> {
        match r {
            Route::Internal(b) | Route::ExternalCluster(b) => b.endpoints.clone(),
            other => panic!("not a forwarding route: {other:?}"),
        }
    }

    #[test]
    fn only_ready_endpoints_merged_over_slices_and_deduplicated() {
        let s = snapshot(
            vec![service("a", "10.0.0.1")],
            vec![
                slice(
                    "a-1",
                    "a",
                    "",
                    8080,
                    vec![
                        ep("10.1.0.1", true, true, false, "x"),
                        ep("10.1.0.2", false, false, false, "x"),
                    ],
                ),
                slice(
                    "a-2",
                    "a",
                    "",
                    8080,
                    vec![
                        ep("10.1.0.1", true, true, false, "x"),
                        ep("10.1.0.3", true, true, false, "y"),
                    ],
                ),
            ],
        );
        let p = plan(&s, &ProxyConfig::default());
        assert_eq!(
            endpoints(route_of(&p, Address::Ip(ip("10.0.0.1")), 80)),
            vec![sa("10.1.0.1:8080"), sa("10.1.0.3:8080")]
        );
    }

    #[test]
    fn terminating_endpoints_are_a_fallback_only() {
        let with_ready = snapshot(
            vec![service("a", "10.0.0.1")],
            vec![slice(
                "a-1",
                "a",
                "",
                8080,
                vec![
                    ep("10.1.0.1", true, true, false, "x"),
                    ep("10.1.0.2", false, true, true, "x"),
                ],
            )],
        );
        let p = plan(&with_ready, &ProxyConfig::default());
        assert_eq!(
            endpoints(route_of(&p, Address::Ip(ip("10.0.0.1")), 80)),
            vec![sa("10.1.0.1:8080")]
        );
        let only_terminating = snapshot(
            vec![service("a", "10.0.0.1")],
            vec![slice(
                "a-1",
                "a",
                "",
                8080,
                vec![
                    ep("10.1.0.2", false, true, true, "x"),
                    ep("10.1.0.3", false, false, true, "x"),
                ],
            )],
        );
        let p = plan(&only_terminating, &ProxyConfig::default());
        assert_eq!(
            endpoints(route_of(&p, Address::Ip(ip("10.0.0.1")), 80)),
            vec![sa("10.1.0.2:8080")]
        );
    }

    #[test]
    fn no_endpoints_rejects_every_address() {
        let mut svc = service("a", "10.0.0.1");
        svc.external_ips = vec![ip("1.2.3.4")];
        svc.ports[0].node_port = Some(30000);
        let p = plan(&snapshot(vec![svc], vec![]), &ProxyConfig::default());
        assert_eq!(v4(&p).destinations.len(), 3);
        assert!(v4(&p).destinations.iter().all(|d| d.route == Route::Reject));
    }

    #[test]
    fn named_target_ports_resolve_per_slice() {
        let mut svc = service("a", "10.0.0.1");
        svc.ports[0].name = "http".into();
        let s = snapshot(
            vec![svc],
            vec![
                slice(
                    "a-1",
                    "a",
                    "http",
                    8080,
                    vec![ep("10.1.0.1", true, true, false, "x")],
                ),
                slice(
                    "a-2",
                    "a",
                    "http",
                    9090,
                    vec![ep("10.1.0.2", true, true, false, "x")],
                ),
                slice(
                    "a-3",
                    "a",
                    "metrics",
                    9100,
                    vec![ep("10.1.0.3", true, true, false, "x")],
                ),
            ],
        );
        let p = plan(&s, &ProxyConfig::default());
        assert_eq!(
            endpoints(route_of(&p, Address::Ip(ip("10.0.0.1")), 80)),
            vec![sa("10.1.0.1:8080"), sa("10.1.0.2:9090")]
        );
    }

    #[test]
    fn traffic_policies() {
        let mut svc = service("a", "10.0.0.1");
        svc.external_policy = TrafficPolicy::Local;
        svc.internal_policy = TrafficPolicy::Local;
        svc.ports[0].node_port = Some(30000);
        let s = snapshot(
            vec![svc.clone()],
            vec![slice(
                "a-1",
                "a",
                "",
                8080,
                vec![
                    ep("10.1.0.1", true, true, false, "me"),
                    ep("10.1.0.2", true, true, false, "other"),
                ],
            )],
        );
        let p = plan(&s, &ProxyConfig::default());
        let Route::Internal(b) = route_of(&p, Address::Ip(ip("10.0.0.1")), 80) else {
            panic!()
        };
        assert_eq!(
            (b.scope, b.endpoints.clone()),
            (Scope::Local, vec![sa("10.1.0.1:8080")])
        );
        let Route::ExternalLocal { cluster, local } = route_of(&p, Address::NodePort, 30000) else {
            panic!()
        };
        assert_eq!(cluster.endpoints.len(), 2);
        assert_eq!(local.as_ref().unwrap().endpoints, vec![sa("10.1.0.1:8080")]);
        assert_eq!(v4(&p).hairpin, BTreeSet::from([ip("10.1.0.1")]));

        // No local endpoint: internal traffic dropped, external clients dropped (local None).
        let s = snapshot(
            vec![svc],
            vec![slice(
                "a-1",
                "a",
                "",
                8080,
                vec![ep("10.1.0.2", true, true, false, "other")],
            )],
        );
        let p = plan(&s, &ProxyConfig::default());
        assert_eq!(route_of(&p, Address::Ip(ip("10.0.0.1")), 80), &Route::Drop);
        let Route::ExternalLocal { local: None, .. } = route_of(&p, Address::NodePort, 30000)
        else {
            panic!()
        };
    }

    #[test]
    fn conflicting_destinations_keep_the_first_service() {
        let mut a = service("a", "10.0.0.1");
        a.external_ips = vec![ip("1.2.3.4")];
        let mut b = service("b", "10.0.0.2");
        b.external_ips = vec![ip("1.2.3.4")];
        let p = plan(&snapshot(vec![b, a], vec![]), &ProxyConfig::default());
        assert_eq!(p.conflicts.len(), 1);
        let d = v4(&p)
            .destinations
            .iter()
            .find(|d| d.address == Address::Ip(ip("1.2.3.4")))
            .unwrap();
        assert_eq!(d.service.name, "a");
    }

    #[test]
    fn families_are_separate() {
        let mut svc = service("a", "10.0.0.1");
        svc.cluster_ips.push(ip("fd00::1"));
        let s = snapshot(
            vec![svc],
            vec![
                slice(
                    "a-4",
                    "a",
                    "",
                    8080,
                    vec![ep("10.1.0.1", true, true, false, "x")],
                ),
                slice(
                    "a-6",
                    "a",
                    "",
                    8080,
                    vec![ep("fd01::1", true, true, false, "x")],
                ),
            ],
        );
        let p = plan(&s, &ProxyConfig::default());
        assert_eq!(
            endpoints(&p.families[0].destinations[0].route),
            vec![sa("10.1.0.1:8080")]
        );
        assert_eq!(
            endpoints(&p.families[1].destinations[0].route),
            vec![sa("[fd01::1]:8080")]
        );
    }

    #[test]
    fn source_ranges_guard_load_balancer_ips_only() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let mut svc = service("a", "10.0.0.1");
        svc.ports[0].node_port = Some(30000);
        svc.external_ips = vec![ip("1.2.3.4")];
        svc.load_balancer_ips = vec![ip("5.6.7.8"), ip("fd00::8")];
        svc.load_balancer_source_ranges = vec![net("203.0.113.0/25"), net("2001:db8::/32")];
        let s = snapshot(vec![svc.clone()], vec![]);
        let p = plan(&s, &ProxyConfig::default());
        for d in &v4(&p).destinations {
            let want = if d.kind == DestinationKind::LoadBalancer {
                vec![net("203.0.113.0/25")]
            } else {
                vec![]
            };
            assert_eq!(d.allowed_sources, want, "{d:?}");
        }
        // A node inside the ranges: the LB IPs themselves are allowed sources too. Ranges are
        // aggregated (no overlap in the interval set).
        svc.load_balancer_source_ranges = vec![net("192.168.0.0/16"), net("192.168.1.0/24")];
        let p = plan(
            &snapshot(vec![svc.clone()], vec![]),
            &ProxyConfig::default(),
        );
        let lb = v4(&p)
            .destinations
            .iter()
            .find(|d| d.kind == DestinationKind::LoadBalancer)
            .unwrap();
        assert_eq!(
            lb.allowed_sources,
            vec![net("5.6.7.8/32"), net("192.168.0.0/16")]
        );
        // Ranges of the other family only: no firewall in this one (as kube-proxy).
        let v6lb = p.families[1]
            .destinations
            .iter()
            .find(|d| d.kind == DestinationKind::LoadBalancer);
        assert!(v6lb.is_none(), "no IPv6 ClusterIP, no IPv6 destinations");
    }

    #[test]
    fn service_cidrs_from_objects_else_from_the_configuration() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let cfg = ProxyConfig {
            service_cidrs: vec![net("10.0.0.0/16"), net("fd00::/108")],
            ..ProxyConfig::default()
        };
        let mut s = snapshot(vec![], vec![]);
        let p = plan(&s, &cfg);
        assert_eq!(p.families[0].service_cidrs, vec![net("10.0.0.0/16")]);
        assert_eq!(p.families[1].service_cidrs, vec![net("fd00::/108")]);
        s.service_cidrs = vec![net("10.96.0.0/12"), net("10.96.0.0/16")];
        let p = plan(&s, &cfg);
        assert_eq!(p.families[0].service_cidrs, vec![net("10.96.0.0/12")]);
        assert!(p.families[1].service_cidrs.is_empty());
        assert!(p.drop_invalid);
        let liberal = ProxyConfig {
            tcp_be_liberal: true,
            ..ProxyConfig::default()
        };
        assert!(!plan(&s, &liberal).drop_invalid);
    }

    #[test]
    fn nodeport_address_modes() {
        let mut cfg = ProxyConfig {
            nodeport_addresses: NodePortAddresses::Primary,
            ..ProxyConfig::default()
        };
        let s = snapshot(vec![], vec![]);
        let p = plan(&s, &cfg);
        assert_eq!(
            p.families[0].nodeports,
            NodePortMatch::Addresses(vec![ip("192.168.0.2")])
        );
        assert_eq!(p.families[1].nodeports, NodePortMatch::Nothing);
        cfg.nodeport_addresses = NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]);
        let p = plan(&s, &cfg);
        assert_eq!(
            p.families[0].nodeports,
            NodePortMatch::LocalIn(vec!["192.168.0.0/16".parse().unwrap()])
        );
    }

    /// One endpoint of a topology case, from a compact spelling: the address's last octet,
    /// then words: `ready`, `unready`, `terminating` (serving, terminating, not ready),
    /// `dead` (neither ready nor serving), `local`, `z=a,b` (zone hints), `n=me,x` (node hints).
    fn topo_ep(spec: &str) -> Endpoint {
        let mut words = spec.split_whitespace();
        let addr = format!("10.0.0.{}", words.next().unwrap());
        let mut e = ep(&addr, true, true, false, "other");
        let mut hints = EndpointHints::default();
        for w in words {
            match w {
                "ready" => {}
                "unready" | "dead" => (e.ready, e.serving) = (false, false),
                "terminating" => (e.ready, e.serving, e.terminating) = (false, true, true),
                "local" => e.node_name = Some("me".into()),
                _ if w.starts_with("z=") => {
                    hints.for_zones = w[2..].split(',').map(String::from).collect()
                }
                _ if w.starts_with("n=") => {
                    hints.for_nodes = w[2..].split(',').map(String::from).collect()
                }
                other => panic!("unknown word {other:?}"),
            }
        }
        if !hints.for_zones.is_empty() || !hints.for_nodes.is_empty() {
            e.hints = Some(Box::new(hints));
        }
        e
    }

    struct TopologyCase {
        name: &'static str,
        /// The node's `topology.kubernetes.io/zone` label.
        zone: Option<&'static str>,
        itp_local: bool,
        etp_local: bool,
        /// Externally accessible (a NodePort): only then does externalTrafficPolicy count.
        external: bool,
        endpoints: &'static [&'static str],
        /// The endpoints cluster-wide traffic uses (last octets); `None`: the Service never
        /// uses cluster-wide endpoints.
        cluster: Option<&'static [u8]>,
        /// The endpoints traffic kept on this node uses; `None`: no Local policy applies.
        local: Option<&'static [u8]>,
    }

    /// The backends of a forwarding route, as last octets (empty for reject and drop).
    fn octets(b: Option<&Backends>) -> Vec<u8> {
        b.map(|b| {
            b.endpoints
                .iter()
                .map(|a| match a.ip() {
                    IpAddr::V4(v4) => v4.octets()[3],
                    IpAddr::V6(_) => unreachable!(),
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// The cases of kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go in
    /// kubernetes/kubernetes, the table as of 1.31-1.35, endpoints 10.1.2.x renumbered to
    /// 10.0.0.x), followed by cases for node hints (`PreferSameNode`, KEP-3015) written from
    /// the rules of `topologyModeFromHints` in pkg/proxy/topology.go (1.33+), whose table
    /// the reference corpus here lacks. kube-proxy's `clusterEndpoints` is the plan's
    /// cluster-wide route (the ClusterIP's under internalTrafficPolicy Cluster, else the
    /// external addresses' cluster part); its `localEndpoints` the node-local one.
    #[test]
    fn topology_as_kube_proxy_categorizes_endpoints() {
        let a = Some("zone-a");
        let cases = [
            TopologyCase {
                name: "topology used: all endpoints have hints, some for the node's zone",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["3 z=zone-a", "4 z=zone-b", "5 z=zone-c", "6 z=zone-a"],
                cluster: Some(&[3, 6]),
                local: None,
            },
            TopologyCase {
                name: "externalTrafficPolicy: Local, topology ignored for Local endpoints",
                zone: a,
                itp_local: false,
                etp_local: true,
                external: true,
                endpoints: &[
                    "3 local z=zone-a",
                    "4 local z=zone-b",
                    "5 z=zone-c",
                    "6 z=zone-a",
                ],
                cluster: Some(&[3, 6]),
                local: Some(&[3, 4]),
            },
            TopologyCase {
                name: "internalTrafficPolicy: Local, topology ignored for Local endpoints",
                zone: a,
                itp_local: true,
                etp_local: false,
                external: true,
                endpoints: &[
                    "3 local z=zone-a",
                    "4 local z=zone-b",
                    "5 z=zone-c",
                    "6 z=zone-a",
                ],
                cluster: Some(&[3, 6]),
                local: Some(&[3, 4]),
            },
            TopologyCase {
                name: "empty node labels",
                zone: None,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["3 z=zone-a"],
                cluster: Some(&[3]),
                local: None,
            },
            TopologyCase {
                name: "empty zone label",
                zone: Some(""),
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["3 z=zone-a"],
                cluster: Some(&[3]),
                local: None,
            },
            TopologyCase {
                name: "node in different zone, no endpoint filtering",
                zone: Some("zone-b"),
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["3 z=zone-a"],
                cluster: Some(&[3]),
                local: None,
            },
            TopologyCase {
                name: "unready endpoint",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &[
                    "3 z=zone-a",
                    "4 z=zone-b",
                    "5 z=zone-c",
                    "6 unready z=zone-a",
                ],
                cluster: Some(&[3]),
                local: None,
            },
            TopologyCase {
                name: "only unready endpoints in same zone (should not filter)",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &[
                    "3 unready z=zone-a",
                    "4 z=zone-b",
                    "5 z=zone-c",
                    "6 unready z=zone-a",
                ],
                cluster: Some(&[4, 5]),
                local: None,
            },
            TopologyCase {
                name: "missing hints, no filtering applied",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["3 z=zone-a", "4 z=zone-b", "5", "6 z=zone-a"],
                cluster: Some(&[3, 4, 5, 6]),
                local: None,
            },
            TopologyCase {
                name: "multiple hints per endpoint, filtering includes any endpoint with zone included",
                zone: Some("zone-c"),
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &[
                    "3 z=zone-a,zone-b,zone-c",
                    "4 z=zone-b,zone-c",
                    "5 z=zone-b,zone-d",
                    "6 z=zone-c",
                ],
                cluster: Some(&[3, 4, 6]),
                local: None,
            },
            TopologyCase {
                name: "conflicting topology and localness require merging allEndpoints",
                zone: a,
                itp_local: false,
                etp_local: true,
                external: true,
                endpoints: &[
                    "0 local z=zone-a",
                    "1 local z=zone-b",
                    "2 z=zone-a",
                    "3 z=zone-b",
                ],
                cluster: Some(&[0, 2]),
                local: Some(&[0, 1]),
            },
            TopologyCase {
                name: "internalTrafficPolicy: Local, with empty endpoints",
                zone: None,
                itp_local: true,
                etp_local: false,
                external: false,
                endpoints: &[],
                cluster: None,
                local: Some(&[]),
            },
            TopologyCase {
                name: "internalTrafficPolicy: Local, but all endpoints are remote",
                zone: None,
                itp_local: true,
                etp_local: false,
                external: false,
                endpoints: &["0", "1"],
                cluster: None,
                local: Some(&[]),
            },
            TopologyCase {
                name: "internalTrafficPolicy: Local, all endpoints are local",
                zone: None,
                itp_local: true,
                etp_local: false,
                external: false,
                endpoints: &["0 local", "1 local"],
                cluster: None,
                local: Some(&[0, 1]),
            },
            TopologyCase {
                name: "internalTrafficPolicy: Local, some endpoints are local",
                zone: None,
                itp_local: true,
                etp_local: false,
                external: false,
                endpoints: &["0 local", "1"],
                cluster: None,
                local: Some(&[0]),
            },
            TopologyCase {
                name: "Cluster traffic policy, endpoints not Ready",
                zone: None,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 dead", "1 dead"],
                cluster: Some(&[]),
                local: None,
            },
            TopologyCase {
                name: "Cluster traffic policy, some endpoints are Ready",
                zone: None,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 dead", "1"],
                cluster: Some(&[1]),
                local: None,
            },
            TopologyCase {
                name: "Cluster traffic policy, all endpoints are terminating",
                zone: None,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 terminating local", "1 terminating"],
                cluster: Some(&[0, 1]),
                local: None,
            },
            TopologyCase {
                name: "iTP: Local, eTP: Cluster, some endpoints local",
                zone: None,
                itp_local: true,
                etp_local: false,
                external: true,
                endpoints: &["0 local", "1"],
                cluster: Some(&[0, 1]),
                local: Some(&[0]),
            },
            TopologyCase {
                name: "iTP: Cluster, eTP: Local, some endpoints local",
                zone: None,
                itp_local: false,
                etp_local: true,
                external: true,
                endpoints: &["0 local", "1"],
                cluster: Some(&[0, 1]),
                local: Some(&[0]),
            },
            TopologyCase {
                name: "iTP: Local, eTP: Local, some endpoints local",
                zone: None,
                itp_local: true,
                etp_local: true,
                external: true,
                endpoints: &["0 local", "1"],
                cluster: Some(&[0, 1]),
                local: Some(&[0]),
            },
            TopologyCase {
                name: "iTP: Local, eTP: Local, all endpoints remote",
                zone: None,
                itp_local: true,
                etp_local: true,
                external: true,
                endpoints: &["0", "1"],
                cluster: Some(&[0, 1]),
                local: Some(&[]),
            },
            TopologyCase {
                name: "iTP: Local, eTP: Local, all endpoints remote and terminating",
                zone: None,
                itp_local: true,
                etp_local: true,
                external: true,
                endpoints: &["0 terminating", "1 terminating"],
                cluster: Some(&[0, 1]),
                local: Some(&[]),
            },
            TopologyCase {
                name: "iTP: Cluster, eTP: Local, with terminating endpoints",
                zone: None,
                itp_local: false,
                etp_local: true,
                external: true,
                endpoints: &["0", "1 dead local", "2 terminating local", "3 terminating"],
                cluster: Some(&[0]),
                local: Some(&[2]),
            },
            TopologyCase {
                name: "externalTrafficPolicy ignored if not externally accessible",
                zone: None,
                itp_local: false,
                etp_local: true,
                external: false,
                endpoints: &["0", "1 local"],
                cluster: Some(&[0, 1]),
                local: None,
            },
            TopologyCase {
                name: "no cluster endpoints for iTP:Local internal-only service",
                zone: None,
                itp_local: true,
                etp_local: false,
                external: false,
                endpoints: &["0", "1 local"],
                cluster: None,
                local: Some(&[1]),
            },
            // Node hints (PreferSameNode), from topologyModeFromHints' rules.
            TopologyCase {
                name: "node hints: every ready endpoint has one, some name this node",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 local n=me z=zone-a", "1 n=x z=zone-a", "2 n=y z=zone-b"],
                cluster: Some(&[0]),
                local: None,
            },
            TopologyCase {
                name: "node hints win over zone hints even for an endpoint hinted elsewhere",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 n=me z=zone-b", "1 n=x z=zone-a"],
                cluster: Some(&[0]),
                local: None,
            },
            TopologyCase {
                name: "node hints, none for this node: zone hints decide",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 n=x z=zone-a", "1 n=y z=zone-a", "2 n=z z=zone-b"],
                cluster: Some(&[0, 1]),
                local: None,
            },
            TopologyCase {
                name: "node hints, one ready endpoint lacks one: zone hints decide",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 local n=me z=zone-a", "1 z=zone-a", "2 n=y z=zone-b"],
                cluster: Some(&[0, 1]),
                local: None,
            },
            TopologyCase {
                name: "node hints, neither complete: every endpoint",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 local n=me z=zone-a", "1", "2 n=y z=zone-b"],
                cluster: Some(&[0, 1, 2]),
                local: None,
            },
            TopologyCase {
                name: "node hints: an unready endpoint without hints does not count",
                zone: None,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 local n=me", "1 n=x", "2 unready"],
                cluster: Some(&[0]),
                local: None,
            },
            TopologyCase {
                name: "node hints only, node without a zone label",
                zone: None,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 local n=me", "1 n=x"],
                cluster: Some(&[0]),
                local: None,
            },
            TopologyCase {
                name: "node hints: externalTrafficPolicy Local ignores them for outside clients",
                zone: None,
                itp_local: false,
                etp_local: true,
                external: true,
                endpoints: &["0 local n=me", "1 local n=x", "2 n=y"],
                cluster: Some(&[0]),
                local: Some(&[0, 1]),
            },
            TopologyCase {
                name: "hints, but no endpoint is ready: terminating ones, hints aside",
                zone: a,
                itp_local: false,
                etp_local: false,
                external: false,
                endpoints: &["0 terminating z=zone-b", "1 terminating z=zone-a"],
                cluster: Some(&[0, 1]),
                local: None,
            },
        ];
        for case in &cases {
            let mut svc = service("a", "10.96.0.1");
            if case.itp_local {
                svc.internal_policy = TrafficPolicy::Local;
            }
            if case.etp_local {
                svc.external_policy = TrafficPolicy::Local;
            }
            if case.external {
                svc.ports[0].node_port = Some(30000);
            }
            let slices = if case.endpoints.is_empty() {
                vec![]
            } else {
                vec![slice(
                    "a-1",
                    "a",
                    "",
                    80,
                    case.endpoints.iter().map(|e| topo_ep(e)).collect(),
                )]
            };
            let mut s = snapshot(vec![svc], slices);
            s.node.zone = case.zone.map(String::from);
            let p = plan(&s, &ProxyConfig::default());
            let internal = route_of(&p, Address::Ip(ip("10.96.0.1")), 80);
            let external = case
                .external
                .then(|| route_of(&p, Address::NodePort, 30000));
            // The cluster-wide route: external traffic's when the Service is reachable from
            // outside (it is used even under eTP Local, for pods and the node), else the
            // ClusterIP's under iTP Cluster.
            let cluster = match (external, case.itp_local) {
                (Some(Route::ExternalCluster(b)), _) => Some(octets(Some(b))),
                (Some(Route::ExternalLocal { cluster, .. }), _) => Some(octets(Some(cluster))),
                (Some(Route::Reject), _) => Some(vec![]),
                (Some(other), _) => panic!("{}: external route {other:?}", case.name),
                (None, false) => match internal {
                    Route::Internal(b) => Some(octets(Some(b))),
                    Route::Reject => Some(vec![]),
                    other => panic!("{}: internal route {other:?}", case.name),
                },
                (None, true) => None,
            };
            let mut local = None;
            if case.itp_local {
                local = Some(match internal {
                    Route::Internal(b) => {
                        assert_eq!(b.scope, Scope::Local, "{}", case.name);
                        octets(Some(b))
                    }
                    Route::Drop | Route::Reject => vec![],
                    other => panic!("{}: internal route {other:?}", case.name),
                });
            }
            if case.external && case.etp_local {
                let l = match external {
                    Some(Route::ExternalLocal { local, .. }) => octets(local.as_ref()),
                    Some(Route::Reject) => vec![],
                    other => panic!("{}: external route {other:?}", case.name),
                };
                if let Some(from_itp) = &local {
                    assert_eq!(from_itp, &l, "{}: local endpoints differ", case.name);
                }
                local = Some(l);
            }
            assert_eq!(
                cluster.as_deref(),
                case.cluster,
                "{}: cluster endpoints",
                case.name
            );
            assert_eq!(
                local.as_deref(),
                case.local,
                "{}: local endpoints",
                case.name
            );
            // The explanation (svcproxy trace) runs the same selection: the same sets, and
            // every candidate it leaves out has a reason.
            let svc = s.services.values().next().unwrap();
            let slices: Vec<&EndpointSlice> = s.slices.values().map(|x| x.as_ref()).collect();
            let ctx = FamilyContext::new(&s.node, &ProxyConfig::default(), IpFamily::V4);
            let choice = explain_endpoints(&ctx, &svc.ports[0], &slices);
            let last = |v: &[SocketAddr]| {
                v.iter()
                    .map(|a| match a.ip() {
                        IpAddr::V4(v4) => v4.octets()[3],
                        IpAddr::V6(_) => unreachable!(),
                    })
                    .collect::<Vec<u8>>()
            };
            if let Some(c) = case.cluster {
                assert_eq!(last(&choice.cluster), c, "{}: explained cluster", case.name);
            }
            if let Some(l) = case.local {
                assert_eq!(last(&choice.local), l, "{}: explained local", case.name);
            }
            assert_eq!(
                choice.cluster.len() + choice.cluster_excluded.len(),
                choice.endpoints.len(),
                "{}: every endpoint is used or has a reason",
                case.name
            );
            assert_eq!(
                choice.local.len() + choice.local_excluded.len(),
                choice.endpoints.len(),
                "{}: every endpoint is used or has a reason (local)",
                case.name
            );
        }
    }

    #[test]
    fn local_traffic_follows_detect_local_mode() {
        let mut s = snapshot(vec![service("a", "10.96.0.1")], vec![]);
        s.node.pod_cidrs = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        let cluster: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        let families = |detect_local: DetectLocal, cluster_cidrs: &[IpNet]| {
            let cfg = ProxyConfig {
                detect_local,
                cluster_cidrs: cluster_cidrs.to_vec(),
                ..ProxyConfig::default()
            };
            let p = plan(&s, &cfg);
            p.families
                .iter()
                .map(|f| (f.local_traffic.clone(), f.clusterip_masquerade))
                .collect::<Vec<_>>()
        };
        use ClusterIpMasquerade::*;
        assert_eq!(
            families(DetectLocal::ClusterCidr, &cluster),
            vec![
                (LocalTraffic::FromCidrs(cluster.clone()), NotLocal),
                (LocalTraffic::Unknown, Never)
            ]
        );
        assert_eq!(
            families(DetectLocal::ClusterCidr, &[]),
            vec![
                (LocalTraffic::Unknown, Never),
                (LocalTraffic::Unknown, Never)
            ]
        );
        assert_eq!(
            families(DetectLocal::NodeCidr, &cluster),
            vec![
                (
                    LocalTraffic::FromCidrs(vec!["10.244.1.0/24".parse().unwrap()]),
                    NotLocal
                ),
                (
                    LocalTraffic::FromCidrs(vec!["fd00:1::/64".parse().unwrap()]),
                    NotLocal
                ),
            ]
        );
        let prefix = LocalTraffic::FromInterfacePrefix("veth".into());
        assert_eq!(
            families(DetectLocal::InterfaceNamePrefix("veth".into()), &[]),
            vec![(prefix.clone(), NotLocal), (prefix, NotLocal)]
        );
        let bridge = LocalTraffic::FromInterface("cbr0".into());
        assert_eq!(
            families(DetectLocal::BridgeInterface("cbr0".into()), &[]),
            vec![(bridge.clone(), NotLocal), (bridge, NotLocal)]
        );
    }
}
