//! Kubernetes Service semantics, resolved into a backend-independent plan.
//!
//! [`plan`] is the one place that knows which endpoints serve which traffic: readiness and the
//! terminating fallback, internal and external traffic policies, session affinity, what is
//! masqueraded, rejected or dropped. It is pure and deterministic (no I/O, no clock, ordered
//! collections only): the same snapshot always gives the same plan. Backends only render it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::{
    EndpointSlice, IpFamily, NodeInfo, NodePortAddresses, ObjectRef, Protocol, ProxyConfig,
    Service, ServicePort, Snapshot, TrafficPolicy,
};

/// The whole plan: one part per IP family, IPv4 first.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterIpMasquerade {
    /// None (no cluster CIDR is known, and masquerade-all is off).
    Never,
    /// Traffic whose source is outside the cluster CIDRs (it would not find its way back).
    OutsideClusterCidrs,
    /// All of it (`--masquerade-all`).
    Always,
}

/// Which destination addresses answer NodePorts, for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortMatch {
    /// Every local address except loopback: the kernel knows them, no list needed.
    AnyLocal,
    /// Local addresses inside these CIDRs.
    LocalIn(Vec<IpNet>),
    /// Exactly these addresses.
    Addresses(Vec<IpAddr>),
    /// No address of this family answers NodePorts.
    Nothing,
}

/// The plan for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: IpFamily,
    pub cluster_cidrs: Vec<IpNet>,
    pub clusterip_masquerade: ClusterIpMasquerade,
    pub nodeports: NodePortMatch,
    /// Every ClusterIP in use, with its Service: traffic to a port the Service lacks is rejected.
    pub cluster_ips: BTreeMap<IpAddr, ObjectRef>,
    /// The Service CIDRs of this family (aggregated): traffic to an address inside them that is
    /// not in [`FamilyPlan::cluster_ips`] is dropped.
    pub service_cidrs: Vec<IpNet>,
    /// Endpoints on this node: a pod reaching itself through a Service is masqueraded so that
    /// its reply comes back through the proxy's NAT.
    pub hairpin: BTreeSet<IpAddr>,
    /// Every address, protocol and port the proxy handles, sorted by [`Destination::key`].
    pub destinations: Vec<Destination>,
}

/// Where traffic is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    Ip(IpAddr),
    /// Any of the node's NodePort addresses ([`FamilyPlan::nodeports`]).
    NodePort,
}

/// Why the proxy handles a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DestinationKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl DestinationKind {
    fn as_str(self) -> &'static str {
        match self {
            DestinationKind::ClusterIp => "cluster IP",
            DestinationKind::ExternalIp => "external IP",
            DestinationKind::LoadBalancer => "load balancer IP",
            DestinationKind::NodePort => "node port",
        }
    }
}

/// One address, protocol and port of a Service, and what happens to traffic sent there.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// this node as empty). Pods (sources in the cluster CIDRs) and the node itself are not
    /// "external": they go to the cluster-wide endpoints, and the node's traffic is masqueraded.
    ExternalLocal {
        cluster: Backends,
        local: Option<Backends>,
    },
}

/// Which endpoints a backend set was chosen from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Endpoints anywhere in the cluster.
    Cluster,
    /// Endpoints on this node only.
    Local,
}

/// The endpoints a destination's traffic is spread over (uniformly at random per connection).
#[derive(Debug, Clone, PartialEq, Eq)]
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
struct Candidate {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// The usable endpoints among `candidates`: the ready ones; if there are none, the ones that
/// are serving but terminating (so that a rolling update or a scale-down to zero does not cut
/// traffic while the last pods finish).
fn usable(candidates: impl Iterator<Item = Candidate> + Clone) -> Vec<SocketAddr> {
    let ready: Vec<SocketAddr> = candidates
        .clone()
        .filter(|c| c.ready)
        .map(|c| c.addr)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .filter(|c| c.serving && c.terminating)
        .map(|c| c.addr)
        .collect()
}

/// The endpoints of one Service port in one family, from every slice of the Service: each
/// slice resolves the target port by the Service port's name and protocol in its own port list.
fn candidates(
    slices: &[&EndpointSlice],
    family: IpFamily,
    port: &ServicePort,
    node_name: &str,
) -> Vec<Candidate> {
    let mut by_addr: BTreeMap<SocketAddr, Candidate> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let c = Candidate {
                addr: SocketAddr::new(ep.address, target.port),
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
            };
            // The same endpoint in two slices (a pod moving between slices): merge the views.
            by_addr
                .entry(c.addr)
                .and_modify(|m| {
                    m.ready |= c.ready;
                    m.serving |= c.serving;
                    m.terminating &= c.terminating;
                    m.local |= c.local;
                })
                .or_insert(c);
        }
    }
    by_addr.into_values().collect()
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
    pub cluster_cidrs: Vec<IpNet>,
    pub clusterip_masquerade: ClusterIpMasquerade,
    pub nodeports: NodePortMatch,
    /// The node's name: endpoints on it are local.
    pub node_name: String,
    /// The node's primary address of this family: if a load balancer's source ranges hold it,
    /// the node may reach the load-balancer IP (see [`allowed_sources`]).
    pub node_ip: Option<IpAddr>,
}

impl FamilyContext {
    pub fn new(node: &NodeInfo, config: &ProxyConfig, family: IpFamily) -> FamilyContext {
        let cluster_cidrs: Vec<IpNet> = config
            .cluster_cidrs
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .map(IpNet::trunc)
            .collect();
        let clusterip_masquerade = if config.masquerade_all {
            ClusterIpMasquerade::Always
        } else if !cluster_cidrs.is_empty() {
            ClusterIpMasquerade::OutsideClusterCidrs
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
            cluster_cidrs,
            clusterip_masquerade,
            nodeports,
            node_name: node.name.clone(),
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
        let cands = candidates(slices, family, port, &ctx.node_name);
        part.hairpin.extend(
            cands
                .iter()
                .filter(|c| c.local && (c.ready || c.serving))
                .map(|c| c.addr.ip()),
        );
        let routes = Routes::new(svc, &cands);
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
        cluster_cidrs: ctx.cluster_cidrs,
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
    format!("{} {addr}/{}", d.kind.as_str(), d.protocol)
}

/// The two routes of one Service port: for its ClusterIP, and for its external destinations.
struct Routes {
    internal: Route,
    external: Route,
}

impl Routes {
    fn new(svc: &Service, cands: &[Candidate]) -> Routes {
        let cluster = usable(cands.iter().copied());
        let local = usable(cands.iter().copied().filter(|c| c.local));
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
            node_name: Some(node.to_string()),
            zone: None,
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
}
