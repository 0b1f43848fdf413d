//! `svcproxy trace`: where a new connection (or a ping) from a source to a destination goes on
//! this node, and why, before any packet is sent.
//!
//! Built on the plan, not beside it: the destination, its route, its firewall, the ClusterIPs,
//! the Service CIDRs and the hairpin set are read from the [`Plan`] the backends render, and
//! the reasons an endpoint is left out come from the same functions that chose the route's
//! endpoints ([`plan::explain_endpoints`], which runs the plan's selection with a recording
//! explainer). What is walked here is the order of the rendered rules (`src/nft/render.rs`):
//! firewall (before DNAT), the `services` dispatch (ClusterIP masquerading, the destination
//! maps, NodePorts), the Local-policy split, masquerading after DNAT (hairpin), and the filter
//! checks for what found no endpoint (no endpoints, a port the ClusterIP lacks, unallocated
//! ClusterIPs). The dataplane tests (tests/dataplane.rs) compare every prediction with real
//! packets on every backend.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::Serialize;

use crate::model::{
    EndpointSlice, IpFamily, ObjectRef, Protocol, ProxyConfig, Snapshot, TrafficPolicy,
};
use crate::plan::{
    self, Address, Backends, ClusterIpMasquerade, Destination, DestinationKind, EndpointChoice,
    EndpointState, Excluded, Exclusion, FamilyContext, FamilyPlan, LocalTraffic, NodePortMatch,
    Plan, Route, Scope, Topology,
};

/// What is sent: a new connection of a transport protocol to a port, or an ICMP echo (ping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    Port { protocol: Protocol, port: u16 },
    Icmp,
}

/// `DST[:PORT][/tcp|udp|sctp|icmp]`: `10.96.0.10:80`, `10.96.0.10:53/udp`, `[fd00::1]:80`,
/// `10.96.0.10` or `10.96.0.10/icmp` (a ping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub address: IpAddr,
    pub probe: Probe,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (rest, proto) = match s.rsplit_once('/') {
            Some((r, p)) => (r, Some(p.to_ascii_lowercase())),
            None => (s, None),
        };
        let (addr, port): (&str, Option<&str>) = if let Some(v6) = rest.strip_prefix('[') {
            let (a, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: a '[' without ']'"))?;
            match after.strip_prefix(':') {
                Some(p) => (a, Some(p)),
                None if after.is_empty() => (a, None),
                None => return Err(format!("{s:?}: expected [IPv6]:PORT")),
            }
        } else if rest.parse::<IpAddr>().is_ok() {
            (rest, None)
        } else {
            match rest.rsplit_once(':') {
                Some((a, p)) => (a, Some(p)),
                None => (rest, None),
            }
        };
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
            })
            .transpose()?;
        let protocol = match proto.as_deref() {
            None => None,
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") => Some(Protocol::Udp),
            Some("sctp") => Some(Protocol::Sctp),
            Some("icmp" | "icmpv6" | "ping") => {
                if port.is_some() {
                    return Err(format!("{s:?}: ICMP has no port"));
                }
                return Ok(Target {
                    address,
                    probe: Probe::Icmp,
                });
            }
            Some(other) => {
                return Err(format!(
                    "{other:?} is not a protocol (tcp, udp, sctp or icmp)"
                ));
            }
        };
        let probe = match (port, protocol) {
            (Some(port), p) => Probe::Port {
                protocol: p.unwrap_or(Protocol::Tcp),
                port,
            },
            (None, None) => Probe::Icmp,
            (None, Some(p)) => return Err(format!("{s:?}: {p} needs a port (DST:PORT/{p})")),
        };
        Ok(Target { address, probe })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.probe {
            Probe::Port { protocol, port } => {
                write!(f, "{}/{protocol}", SocketAddr::new(self.address, port))
            }
            Probe::Icmp => write!(f, "{} (ICMP echo, a ping)", self.address),
        }
    }
}

/// Which backend's rules are traced: they agree except where said (`src/iptables/render.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Nftables,
    Iptables,
}

/// A question for [`trace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub source: IpAddr,
    pub target: Target,
    /// The interface the packet arrives on, for `detectLocalMode` InterfaceNamePrefix and
    /// BridgeInterface; `None`: not a pod's interface (and the node's own packets have none).
    pub iifname: Option<String>,
    pub backend: Backend,
}

/// Who sends, as the rules tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceClass {
    /// A pod (`detectLocalMode` recognises it).
    Pod,
    /// This node itself (a local address: `fib saddr type local`).
    Node,
    /// Anything else: a client outside the cluster, or a pod the rules cannot recognise.
    Outside,
}

/// The Service port a destination belongs to, and as what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frontend {
    pub service: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    pub kind: &'static str,
    /// In words: "the ClusterIP", "a NodePort on this node", ...
    pub as_what: &'static str,
}

/// One decision, in the order the rules take them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// A short name: `source`, `firewall`, `service`, `traffic-policy`, `topology`,
    /// `endpoints`, `session-affinity`, `masquerade`, `no-endpoints`, `unknown-port`,
    /// `unallocated`, `left-alone`.
    pub decision: &'static str,
    pub reason: String,
}

/// An endpoint the packet may be DNATed to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chosen {
    #[serde(flatten)]
    pub state: EndpointState,
    /// The chance that a new connection (from a client without affinity) goes there.
    pub probability: f64,
    /// Whether the endpoint sees the packet from the node instead of from the source.
    pub masquerade: bool,
}

/// An endpoint left out, and why, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Left {
    #[serde(flatten)]
    pub excluded: Excluded,
    pub why: &'static str,
}

/// What becomes of the packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// DNATed to one of `endpoints` endpoints.
    Dnat { endpoints: usize },
    /// Dropped: the client gets no answer and times out.
    Drop { reason: String },
    /// Refused at once: `with` is a TCP reset or an ICMP port unreachable.
    Reject { with: &'static str, reason: String },
    /// svcproxy's rules do not touch it.
    LeftAlone { reason: String },
}

impl Verdict {
    /// `svcproxy trace`'s exit code: 0 the packet reaches an endpoint, 3 it is dropped or
    /// rejected, 5 svcproxy leaves it alone.
    pub fn exit_code(&self) -> u8 {
        match self {
            Verdict::Dnat { .. } => 0,
            Verdict::Drop { .. } | Verdict::Reject { .. } => 3,
            Verdict::LeftAlone { .. } => 5,
        }
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trace {
    pub source: IpAddr,
    pub source_is: SourceClass,
    pub destination: String,
    pub backend: Backend,
    pub frontend: Option<Frontend>,
    pub steps: Vec<Step>,
    /// The endpoints a new connection goes to, each equally likely.
    pub endpoints: Vec<Chosen>,
    /// The Service port's endpoints that do not get this packet, each with its reason.
    pub excluded: Vec<Left>,
    pub verdict: Verdict,
}

/// A question the inputs cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("the source {from} and the destination {to} are of different IP families")]
    MixedFamilies { from: IpAddr, to: IpAddr },
}

fn step(steps: &mut Vec<Step>, decision: &'static str, reason: impl Into<String>) {
    steps.push(Step {
        decision,
        reason: reason.into(),
    });
}

pub fn kind_names(kind: DestinationKind) -> (&'static str, &'static str) {
    match kind {
        DestinationKind::ClusterIp => ("ClusterIP", "the ClusterIP"),
        DestinationKind::NodePort => ("NodePort", "a NodePort on this node"),
        DestinationKind::LoadBalancer => ("LoadBalancer", "a load-balancer ingress IP"),
        DestinationKind::ExternalIp => ("ExternalIP", "an external IP"),
    }
}

/// Whether `addr` answers NodePorts on this node, as the rules decide it. The kernel's own
/// list of local addresses decides (`fib daddr type local`); trace knows the node's addresses
/// from its Node object (or `--node-ip`).
pub fn answers_nodeports(fp: &FamilyPlan, node_addresses: &[IpAddr], addr: IpAddr) -> bool {
    let local = node_addresses.contains(&addr) && !addr.is_loopback();
    match &fp.nodeports {
        NodePortMatch::AnyLocal => local,
        NodePortMatch::LocalIn(nets) => local && nets.iter().any(|n| n.contains(&addr)),
        NodePortMatch::Addresses(ips) => ips.contains(&addr),
        NodePortMatch::Nothing => false,
    }
}

/// Whether the rules see `source` (arriving on `iifname`) as a pod: `detectLocalMode`.
fn from_pod(fp: &FamilyPlan, source: IpAddr, iifname: Option<&str>) -> (bool, String) {
    match &fp.local_traffic {
        LocalTraffic::Unknown => (
            false,
            "pods cannot be recognised in this family (no pod CIDR known: --cluster-cidr, or the Node's podCIDRs for NodeCIDR)".into(),
        ),
        LocalTraffic::FromCidrs(nets) => match nets.iter().find(|n| n.contains(&source)) {
            Some(n) => (true, format!("{source} is inside the pod network {n}")),
            None => (
                false,
                format!(
                    "{source} is outside the pod network ({})",
                    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
            ),
        },
        LocalTraffic::FromInterfacePrefix(p) => match iifname {
            Some(i) if i.starts_with(p.as_str()) => {
                (true, format!("it arrives on {i}, whose name starts with {p}"))
            }
            Some(i) => (false, format!("it arrives on {i}, not on a {p}* interface")),
            None => (
                false,
                format!("no --iifname given: assumed not to arrive on a {p}* interface"),
            ),
        },
        LocalTraffic::FromInterface(b) => match iifname {
            Some(i) if i == b => (true, format!("it arrives on the pod bridge {b}")),
            Some(i) => (false, format!("it arrives on {i}, not on the pod bridge {b}")),
            None => (
                false,
                format!("no --iifname given: assumed not to arrive on the pod bridge {b}"),
            ),
        },
    }
}

fn reject_with(probe: Probe, family: IpFamily) -> &'static str {
    match (probe, family) {
        (
            Probe::Port {
                protocol: Protocol::Tcp,
                ..
            },
            _,
        ) => "TCP reset",
        (_, IpFamily::V4) => "ICMP port unreachable",
        (_, IpFamily::V6) => "ICMPv6 port unreachable",
    }
}

/// Traces one packet through the rules `plan` renders to, for `snapshot` and `config` (the
/// inputs `plan` was made from).
pub fn trace(
    snapshot: &Snapshot,
    config: &ProxyConfig,
    plan: &Plan,
    q: &Query,
) -> Result<Trace, TraceError> {
    Tracer::new(snapshot, config, plan).trace(q)
}

/// Answers many questions about one plan: the slices are indexed by Service once.
pub struct Tracer<'a> {
    snapshot: &'a Snapshot,
    config: &'a ProxyConfig,
    plan: &'a Plan,
    slices: BTreeMap<&'a ObjectRef, Vec<&'a EndpointSlice>>,
}

impl<'a> Tracer<'a> {
    pub fn new(snapshot: &'a Snapshot, config: &'a ProxyConfig, plan: &'a Plan) -> Self {
        let mut slices: BTreeMap<&ObjectRef, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in snapshot.slices.values() {
            slices.entry(&s.service).or_default().push(s);
        }
        Tracer {
            snapshot,
            config,
            plan,
            slices,
        }
    }

    pub fn plan(&self) -> &Plan {
        self.plan
    }

    /// The Service port of a destination, its endpoint choice explained by the plan's
    /// functions.
    pub fn explain(&self, family: IpFamily, d: &Destination) -> Option<EndpointChoice> {
        let svc = self.snapshot.services.get(&d.service)?;
        let port = svc
            .ports
            .iter()
            .find(|p| p.name == d.port_name && p.protocol == d.protocol)?;
        let slices = self.slices.get(&svc.id).map_or(&[][..], Vec::as_slice);
        let ctx = FamilyContext::new(&self.snapshot.node, self.config, family);
        Some(plan::explain_endpoints(&ctx, port, slices))
    }

    /// One packet.
    pub fn trace(&self, q: &Query) -> Result<Trace, TraceError> {
        let (snapshot, config, plan) = (self.snapshot, self.config, self.plan);
        let dst = q.target.address;
        let family = IpFamily::of(&dst);
        if IpFamily::of(&q.source) != family {
            return Err(TraceError::MixedFamilies {
                from: q.source,
                to: dst,
            });
        }
        let fp = plan
            .families
            .iter()
            .find(|f| f.family == family)
            .expect("a plan has both families");
        let mut steps = Vec::new();
        let node = &snapshot.node;

        // Who sends.
        let is_node = q.source.is_loopback() || node.addresses.contains(&q.source);
        let iif = if is_node { None } else { q.iifname.as_deref() };
        let (pod, pod_why) = from_pod(fp, q.source, iif);
        let source_is = if pod {
            SourceClass::Pod
        } else if is_node {
            SourceClass::Node
        } else {
            SourceClass::Outside
        };
        let mode = config.detect_local.mode_name();
        step(
            &mut steps,
            "source",
            match source_is {
                SourceClass::Pod => format!(
                    "{} is a pod (detect-local-mode {mode}: {pod_why})",
                    q.source
                ),
                SourceClass::Node => format!(
                    "{} is this node ({}): its packets leave through the output hook",
                    q.source,
                    if q.source.is_loopback() {
                        "loopback"
                    } else {
                        "one of the Node's addresses"
                    }
                ),
                SourceClass::Outside => format!(
                    "{} is neither a pod nor this node (detect-local-mode {mode}: {pod_why}): an outside client",
                    q.source
                ),
            },
        );

        let find = |address: Address| match q.target.probe {
            Probe::Port { protocol, port } => fp
                .destinations
                .binary_search_by_key(&(address, protocol, port), Destination::key)
                .ok()
                .map(|i| &fp.destinations[i]),
            Probe::Icmp => None,
        };
        let ip_dest = find(Address::Ip(dst));
        let nodeport_addr = answers_nodeports(fp, &node.addresses, dst);
        let np_dest = if nodeport_addr {
            find(Address::NodePort)
        } else {
            None
        };
        let frontend_of = |d: &Destination| {
            let (kind, as_what) = kind_names(d.kind);
            Frontend {
                service: d.service.to_string(),
                port_name: d.port_name.clone(),
                protocol: d.protocol,
                port: d.port,
                kind,
                as_what,
            }
        };
        let finish = |steps: Vec<Step>,
                      frontend: Option<&Destination>,
                      endpoints: Vec<Chosen>,
                      excluded: Vec<Left>,
                      verdict: Verdict| Trace {
            source: q.source,
            source_is,
            destination: q.target.to_string(),
            backend: q.backend,
            frontend: frontend.map(frontend_of),
            steps,
            endpoints,
            excluded,
            verdict,
        };
        // The destination the packet is addressed to, if any (a NodePort only on a NodePort address).
        let addressed = ip_dest.or(np_dest);
        if let Some(d) = addressed {
            let (_, as_what) = kind_names(d.kind);
            let mut s = format!(
                "{} is {as_what} of {}{}",
                q.target,
                d.service,
                if d.port_name.is_empty() {
                    String::new()
                } else {
                    format!(", port \"{}\"", d.port_name)
                }
            );
            if d.kind == DestinationKind::NodePort {
                s.push_str(&format!(
                    "; {dst} answers NodePorts ({})",
                    match &fp.nodeports {
                        NodePortMatch::AnyLocal => "every local address but loopback".to_string(),
                        NodePortMatch::LocalIn(n) => format!(
                            "local addresses in {}",
                            n.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        NodePortMatch::Addresses(_) => "--nodeport-addresses primary".to_string(),
                        NodePortMatch::Nothing => String::new(),
                    }
                ));
            }
            step(&mut steps, "service", s);
        }

        // 1. The firewall, before DNAT: loadBalancerSourceRanges.
        if let Some(d) = ip_dest.filter(|d| !d.allowed_sources.is_empty()) {
            let ranges = d
                .allowed_sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            match d.allowed_sources.iter().find(|n| n.contains(&q.source)) {
                Some(n) => step(
                    &mut steps,
                    "firewall",
                    format!("loadBalancerSourceRanges allow {} (inside {n})", q.source),
                ),
                None => {
                    let reason = format!(
                        "loadBalancerSourceRanges: {} is outside the allowed sources ({ranges}); new connections to the load-balancer IP from it are dropped before DNAT, pods and the node included",
                        q.source
                    );
                    step(&mut steps, "firewall", reason.clone());
                    return Ok(finish(
                        steps,
                        Some(d),
                        vec![],
                        vec![],
                        Verdict::Drop { reason },
                    ));
                }
            }
        }

        // 2. The dispatch (nat): ClusterIP masquerading, then the destination maps (a destination
        // without endpoints is not in them), then NodePorts.
        let is_cluster_ip = fp.cluster_ips.contains_key(&dst);
        let (cluster_masq, cluster_masq_why) = match fp.clusterip_masquerade {
            ClusterIpMasquerade::Always => (true, "--masquerade-all".to_string()),
            ClusterIpMasquerade::NotLocal if !pod => (
                true,
                format!(
                    "ClusterIP traffic not from a pod, so that the reply comes back through this node (detect-local-mode {mode}: {pod_why})"
                ),
            ),
            ClusterIpMasquerade::NotLocal => (
                false,
                format!("traffic from a pod keeps its source address ({pod_why})"),
            ),
            ClusterIpMasquerade::Never => (
                false,
                format!(
                    "{pod_why}, so svcproxy cannot tell pods from other sources (as kube-proxy without --cluster-cidr)"
                ),
            ),
        };
        let dispatched = ip_dest
            .filter(|d| d.route != Route::Reject)
            .or(np_dest.filter(|d| d.route != Route::Reject));
        if let Some(d) = dispatched {
            return Ok(dispatch(
                self,
                fp,
                q,
                d,
                source_is,
                (is_cluster_ip && cluster_masq, cluster_masq_why),
                steps,
                finish,
            ));
        }

        // 3. Nothing DNATed it: the filter checks.
        let with = reject_with(q.target.probe, family);
        let no_endpoints = ip_dest.or(np_dest).filter(|d| d.route == Route::Reject);
        if let Some(d) = no_endpoints {
            let excluded = self
                .explain(fp.family, d)
                .map(|c| left(&c, Scope::Cluster))
                .unwrap_or_default();
            let mut reason = format!(
                "{} has no usable endpoint at all: new connections are refused at once, so that clients fail fast",
                d.service_port()
            );
            if excluded.is_empty() {
                reason.push_str(&format!(
                    " (no EndpointSlice lists any endpoint for it: does the Service's selector match the pods' labels? kubectl get endpointslices -n {} -l kubernetes.io/service-name={})",
                    d.service.namespace, d.service.name
                ));
            }
            if q.backend == Backend::Iptables && !d.allowed_sources.is_empty() {
                reason = format!(
                    "{} has no usable endpoint; in the iptables mode a load balancer with loadBalancerSourceRanges drops instead of refusing (its firewall chain DNATs nothing, and what it leaves is dropped, as kube-proxy's iptables mode)",
                    d.service_port()
                );
                step(&mut steps, "no-endpoints", reason.clone());
                return Ok(finish(
                    steps,
                    Some(d),
                    vec![],
                    excluded,
                    Verdict::Drop { reason },
                ));
            }
            step(&mut steps, "no-endpoints", reason.clone());
            return Ok(finish(
                steps,
                Some(d),
                vec![],
                excluded,
                Verdict::Reject { with, reason },
            ));
        }
        if let Some(svc) = fp.cluster_ips.get(&dst) {
            let reason = match q.target.probe {
                Probe::Icmp => format!(
                    "{dst} is the ClusterIP of {svc}: a ClusterIP is no host's address, svcproxy answers only its Service's ports and refuses everything else, a ping included (ping prints \"Destination Port Unreachable\"), as kube-proxy's nftables mode"
                ),
                Probe::Port { .. } => format!(
                    "{dst} is the ClusterIP of {svc}, which has no such port (its ports: {}; connect to the Service's port, not the pods' targetPort): refused at once",
                    fp.destinations
                        .iter()
                        .filter(|d| d.address == Address::Ip(dst))
                        .map(|d| format!("{}/{}", d.port, d.protocol))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            step(&mut steps, "unknown-port", reason.clone());
            return Ok(finish(
                steps,
                None,
                vec![],
                vec![],
                Verdict::Reject { with, reason },
            ));
        }
        if let Some(net) = fp.service_cidrs.iter().find(|n| n.contains(&dst)) {
            let reason = format!(
                "{dst} is inside the Service CIDR {net} but no Service holds it (an unallocated ClusterIP): dropped"
            );
            step(&mut steps, "unallocated", reason.clone());
            return Ok(finish(
                steps,
                None,
                vec![],
                vec![],
                Verdict::Drop { reason },
            ));
        }
        let reason = match q.target.probe {
            Probe::Icmp => format!(
                "svcproxy handles only TCP, UDP and SCTP to Service ports at {dst}; the ping goes where routing sends it (a host holding {dst} may answer)"
            ),
            Probe::Port { .. } if nodeport_addr => format!(
                "{dst} answers NodePorts, but no Service has NodePort {}: the packet is left alone (whatever listens on the node answers)",
                q.target.probe_port()
            ),
            Probe::Port { protocol, port } => {
                let mut r = format!(
                    "no Service this node proxies has {}: the packet is left alone",
                    q.target
                );
                if let Ok(i) = fp
                    .destinations
                    .binary_search_by_key(&(Address::NodePort, protocol, port), Destination::key)
                {
                    r.push_str(&format!(
                        " (if {dst} is one of this node's addresses, it is NodePort {port} of {}: the kernel's list of local addresses decides, and trace knows only the Node's: {})",
                        fp.destinations[i].service,
                        node.addresses
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                r
            }
        };
        step(&mut steps, "left-alone", reason.clone());
        Ok(finish(
            steps,
            None,
            vec![],
            vec![],
            Verdict::LeftAlone { reason },
        ))
    }
}

impl Target {
    fn probe_port(&self) -> u16 {
        match self.probe {
            Probe::Port { port, .. } => port,
            Probe::Icmp => 0,
        }
    }
}

fn left(c: &EndpointChoice, scope: Scope) -> Vec<Left> {
    let scoped = match scope {
        Scope::Cluster => &c.cluster_excluded,
        Scope::Local => &c.local_excluded,
    };
    c.not_candidates
        .iter()
        .chain(scoped)
        .map(|e| Left {
            excluded: e.clone(),
            why: e.reason.describe(),
        })
        .collect()
}

fn topology_words(t: Topology, zone: Option<&str>) -> String {
    match t {
        Topology::Any => "no topology hints apply (not every ready endpoint has a hint for this node or its zone): every endpoint".into(),
        Topology::SameNode => "every ready endpoint has node hints and some name this node: only those".into(),
        Topology::SameZone => format!(
            "every ready endpoint has zone hints and some name this node's zone {}: only those",
            zone.unwrap_or("?")
        ),
    }
}

/// A destination in the dispatch maps: which endpoint set, masquerading, affinity.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    tracer: &Tracer,
    fp: &FamilyPlan,
    q: &Query,
    d: &Destination,
    source_is: SourceClass,
    (cluster_masq, cluster_masq_why): (bool, String),
    mut steps: Vec<Step>,
    finish: impl Fn(Vec<Step>, Option<&Destination>, Vec<Chosen>, Vec<Left>, Verdict) -> Trace,
) -> Trace {
    let snapshot = tracer.snapshot;
    let choice = tracer.explain(fp.family, d);
    let svc = snapshot.services.get(&d.service);
    let policy = |p: TrafficPolicy| match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    };
    let itp = svc.map_or("?", |s| policy(s.internal_policy));
    let etp = svc.map_or("?", |s| policy(s.external_policy));
    // (backends, masquerade mark, why)
    let (backends, masq, masq_why): (Option<&Backends>, bool, String) = match &d.route {
        Route::Drop => {
            let reason = format!(
                "internalTrafficPolicy Local, and {} has no usable endpoint on this node: dropped (as kube-proxy)",
                d.service_port()
            );
            step(&mut steps, "traffic-policy", reason.clone());
            let excluded = choice
                .as_ref()
                .map(|c| left(c, Scope::Local))
                .unwrap_or_default();
            return finish(steps, Some(d), vec![], excluded, Verdict::Drop { reason });
        }
        Route::Reject => unreachable!("rejects are not dispatched"),
        Route::Internal(b) => {
            step(
                &mut steps,
                "traffic-policy",
                match b.scope {
                    Scope::Cluster => {
                        format!("internalTrafficPolicy {itp}: endpoints anywhere in the cluster")
                    }
                    Scope::Local => {
                        format!("internalTrafficPolicy {itp}: this node's endpoints only")
                    }
                },
            );
            (Some(b), cluster_masq, cluster_masq_why)
        }
        Route::ExternalCluster(b) => {
            step(
                &mut steps,
                "traffic-policy",
                format!("externalTrafficPolicy {etp}: endpoints anywhere in the cluster"),
            );
            (
                Some(b),
                true,
                "externalTrafficPolicy Cluster: the endpoint may be on another node, and its reply must come back through this one".into(),
            )
        }
        Route::ExternalLocal { cluster, local } => match source_is {
            SourceClass::Pod => {
                step(
                    &mut steps,
                    "traffic-policy",
                    "externalTrafficPolicy Local, but the source is a pod: pods reach every endpoint (as kube-proxy)",
                );
                (
                    Some(cluster),
                    false,
                    "a pod reaching an external address of an externalTrafficPolicy Local Service keeps its address (as kube-proxy)".into(),
                )
            }
            SourceClass::Node => {
                step(
                    &mut steps,
                    "traffic-policy",
                    "externalTrafficPolicy Local, but the source is this node: it reaches every endpoint",
                );
                (
                    Some(cluster),
                    true,
                    "this node's own traffic to an externalTrafficPolicy Local address (as kube-proxy)".into(),
                )
            }
            SourceClass::Outside => match local {
                Some(b) => {
                    step(
                        &mut steps,
                        "traffic-policy",
                        "externalTrafficPolicy Local: an outside client goes only to this node's endpoints",
                    );
                    (
                        Some(b),
                        false,
                        "externalTrafficPolicy Local: the pod sees the client's address".into(),
                    )
                }
                None => {
                    let reason = format!(
                        "externalTrafficPolicy Local, and {} has no usable endpoint on this node: an outside client's packet is dropped (the load balancer's health check sees this node as empty)",
                        d.service_port()
                    );
                    step(&mut steps, "traffic-policy", reason.clone());
                    let excluded = choice
                        .as_ref()
                        .map(|c| left(c, Scope::Local))
                        .unwrap_or_default();
                    return finish(steps, Some(d), vec![], excluded, Verdict::Drop { reason });
                }
            },
        },
    };
    let b = backends.expect("a forwarding route");
    if b.scope == Scope::Cluster
        && let Some(c) = &choice
    {
        step(
            &mut steps,
            "topology",
            topology_words(c.topology, snapshot.node.zone.as_deref()),
        );
    }
    let excluded = choice
        .as_ref()
        .map(|c| left(c, b.scope))
        .unwrap_or_default();
    if let Some(c) = &choice {
        let chosen = match b.scope {
            Scope::Cluster => &c.cluster,
            Scope::Local => &c.local,
        };
        // The explanation runs the plan's own selection: it cannot differ, unless the plan
        // was made from other inputs than the ones given here.
        if chosen != &b.endpoints {
            step(
                &mut steps,
                "endpoints",
                format!(
                    "warning: the explanation chose {chosen:?} but the plan has {:?}: the plan was not made from these inputs",
                    b.endpoints
                ),
            );
        }
    }
    let n = b.endpoints.len();
    step(
        &mut steps,
        "endpoints",
        if n == 1 {
            "1 endpoint".to_string()
        } else {
            format!("{n} endpoints, each equally likely (1/{n})")
        },
    );
    if let Some(t) = b.affinity_timeout {
        step(
            &mut steps,
            "session-affinity",
            format!(
                "sessionAffinity ClientIP: a client that made a connection in the last {t} s goes back to the endpoint it had; a new one picks at random"
            ),
        );
    }
    let hairpin = |ep: &SocketAddr| ep.ip() == q.source && fp.hairpin.contains(&q.source);
    let mut any_hairpin = false;
    let endpoints: Vec<Chosen> = b
        .endpoints
        .iter()
        .map(|ep| {
            let state = choice
                .as_ref()
                .and_then(|c| c.endpoints.iter().find(|s| s.address == *ep))
                .cloned()
                .unwrap_or(EndpointState {
                    address: *ep,
                    ready: true,
                    serving: true,
                    terminating: false,
                    local: false,
                    node: None,
                    zone: None,
                    slice: String::new(),
                });
            let h = hairpin(ep);
            any_hairpin |= h;
            Chosen {
                state,
                probability: 1.0 / n as f64,
                masquerade: masq || h,
            }
        })
        .collect();
    step(
        &mut steps,
        "masquerade",
        if masq {
            format!("masqueraded: {masq_why}")
        } else if any_hairpin {
            format!(
                "not masqueraded ({masq_why}), except to {} itself: a pod reaching itself through its Service is masqueraded (hairpin), so that its reply comes back through the NAT",
                q.source
            )
        } else {
            format!("not masqueraded: {masq_why}")
        },
    );
    finish(
        steps,
        Some(d),
        endpoints,
        excluded,
        Verdict::Dnat { endpoints: n },
    )
}

/// [`trace`], computing the plan.
pub fn trace_snapshot(
    snapshot: &Snapshot,
    config: &ProxyConfig,
    q: &Query,
) -> Result<Trace, TraceError> {
    let plan = plan::plan(snapshot, config);
    trace(snapshot, config, &plan, q)
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} → {}", self.source, self.destination)?;
        if let Some(fe) = &self.frontend {
            let port = if fe.port_name.is_empty() {
                fe.port.to_string()
            } else {
                format!("{} ({})", fe.port, fe.port_name)
            };
            writeln!(
                f,
                "service:  {} port {port}/{}, as {}",
                fe.service, fe.protocol, fe.kind
            )?;
        }
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(f, "{:>2}. {:<16} {}", i + 1, s.decision, s.reason)?;
        }
        if !self.endpoints.is_empty() {
            writeln!(f, "endpoints:")?;
            for c in &self.endpoints {
                writeln!(
                    f,
                    "  {:<22} {:>5.1}%  {}{}{}{}",
                    c.state.address.to_string(),
                    c.probability * 100.0,
                    state_words(&c.state),
                    c.state
                        .node
                        .as_deref()
                        .map(|n| format!(", node {n}"))
                        .unwrap_or_default(),
                    c.state
                        .zone
                        .as_deref()
                        .map(|z| format!(", zone {z}"))
                        .unwrap_or_default(),
                    if c.masquerade { ", masqueraded" } else { "" }
                )?;
            }
        }
        if !self.excluded.is_empty() {
            writeln!(f, "left out:")?;
            for l in &self.excluded {
                let addr = match l.excluded.port {
                    Some(p) => SocketAddr::new(l.excluded.address, p).to_string(),
                    None => l.excluded.address.to_string(),
                };
                writeln!(
                    f,
                    "  {:<22} {}{}",
                    addr,
                    l.why,
                    l.excluded
                        .node
                        .as_deref()
                        .map(|n| format!(" (node {n})"))
                        .unwrap_or_default()
                )?;
            }
        }
        match &self.verdict {
            Verdict::Dnat { endpoints: 1 } => writeln!(
                f,
                "verdict:  DNAT to {}",
                self.endpoints
                    .first()
                    .map_or(String::new(), |c| c.state.address.to_string())
            ),
            Verdict::Dnat { endpoints } => {
                writeln!(f, "verdict:  DNAT to one of {endpoints} endpoints")
            }
            Verdict::Drop { .. } => {
                writeln!(f, "verdict:  dropped (no answer: the client times out)")
            }
            Verdict::Reject { with, .. } => writeln!(f, "verdict:  rejected ({with})"),
            Verdict::LeftAlone { .. } => {
                writeln!(f, "verdict:  not svcproxy's: the packet is left alone")
            }
        }
    }
}

/// `ready`, `serving, terminating`, ... of an endpoint, and whether it is on this node.
pub fn state_words(s: &EndpointState) -> String {
    let mut w = Vec::new();
    if s.ready {
        w.push("ready");
    } else {
        w.push("not ready");
    }
    if s.serving && !s.ready {
        w.push("serving");
    }
    if s.terminating {
        w.push("terminating");
    }
    if s.local {
        w.push("local");
    }
    w.join(", ")
}

/// The exclusion reasons in `t`, for tests.
pub fn reasons(t: &Trace) -> Vec<(IpAddr, Exclusion)> {
    t.excluded
        .iter()
        .map(|l| (l.excluded.address, l.excluded.reason))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DetectLocal, NodeInfo};
    use std::path::Path;

    const NODE: &str = "192.168.0.2";

    /// A snapshot from YAML, seen from node `me` (192.168.0.2, zone `zone-a`).
    fn world(yaml: &str) -> Snapshot {
        let mut loaded = crate::manifests::load_text(Path::new("t.yaml"), yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        Snapshot {
            services: std::mem::take(&mut loaded.converted.services),
            slices: std::mem::take(&mut loaded.converted.slices),
            node: NodeInfo {
                name: "me".into(),
                addresses: vec![NODE.parse().unwrap()],
                zone: Some("zone-a".into()),
                ..NodeInfo::default()
            },
            service_cidrs: std::mem::take(&mut loaded.converted.service_cidrs),
        }
    }

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            ..ProxyConfig::default()
        }
    }

    fn svc(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
        )
    }

    /// A slice of `service`; endpoints as `IP node [unready|terminating|dead] [z=ZONE] [n=NODE]`.
    fn slice(name: &str, service: &str, ports: &str, eps: &[&str]) -> String {
        let family = if eps.iter().any(|e| e.contains(':')) {
            "IPv6"
        } else {
            "IPv4"
        };
        let eps: Vec<String> = eps
            .iter()
            .map(|spec| {
                let mut w = spec.split_whitespace();
                let ip = w.next().unwrap();
                let node = w.next().unwrap();
                let mut cond = "{ready: true, serving: true, terminating: false}";
                let (mut zones, mut nodes) = (vec![], vec![]);
                for word in w {
                    match word {
                        "unready" => cond = "{ready: false, serving: false, terminating: false}",
                        "terminating" => cond = "{ready: false, serving: true, terminating: true}",
                        "dead" => cond = "{ready: false, serving: false, terminating: true}",
                        _ if word.starts_with("z=") => {
                            zones.push(format!("{{name: {}}}", &word[2..]))
                        }
                        _ if word.starts_with("n=") => {
                            nodes.push(format!("{{name: {}}}", &word[2..]))
                        }
                        other => panic!("{other}"),
                    }
                }
                let hints = if zones.is_empty() && nodes.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", hints: {{forZones: [{}], forNodes: [{}]}}",
                        zones.join(", "),
                        nodes.join(", ")
                    )
                };
                format!("{{addresses: ['{ip}'], nodeName: {node}, conditions: {cond}{hints}}}")
            })
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: {ports}\nendpoints: [{}]\n",
            eps.join(", ")
        )
    }

    fn ask(s: &Snapshot, c: &ProxyConfig, src: &str, dst: &str) -> Trace {
        ask_on(s, c, src, dst, Backend::Nftables)
    }

    fn ask_on(s: &Snapshot, c: &ProxyConfig, src: &str, dst: &str, backend: Backend) -> Trace {
        let q = Query {
            source: src.parse().unwrap(),
            target: dst.parse().unwrap(),
            iifname: None,
            backend,
        };
        trace_snapshot(s, c, &q).unwrap()
    }

    fn eps(t: &Trace) -> Vec<String> {
        t.endpoints
            .iter()
            .map(|c| c.state.address.to_string())
            .collect()
    }

    fn masq(t: &Trace) -> Vec<bool> {
        t.endpoints.iter().map(|c| c.masquerade).collect()
    }

    const POD: &str = "10.244.1.5";
    const OUTSIDE: &str = "203.0.113.9";

    fn web() -> String {
        svc(
            "web",
            "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}",
        )
    }

    #[test]
    fn targets_parse() {
        let t = |s: &str| s.parse::<Target>();
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        let port = |protocol, port| Probe::Port { protocol, port };
        assert_eq!(t("10.96.0.10:80").unwrap().probe, port(Protocol::Tcp, 80));
        assert_eq!(
            t("10.96.0.10:53/udp").unwrap().probe,
            port(Protocol::Udp, 53)
        );
        assert_eq!(
            t("10.96.0.10:9/SCTP").unwrap().probe,
            port(Protocol::Sctp, 9)
        );
        assert_eq!(
            t("10.96.0.10").unwrap(),
            Target {
                address: ip,
                probe: Probe::Icmp
            }
        );
        assert_eq!(t("10.96.0.10/icmp").unwrap().probe, Probe::Icmp);
        let v6 = t("[fd00::1]:80").unwrap();
        assert_eq!(
            (v6.address.to_string(), v6.probe),
            ("fd00::1".into(), port(Protocol::Tcp, 80))
        );
        assert_eq!(t("fd00::1").unwrap().probe, Probe::Icmp);
        assert_eq!(t("[fd00::1]").unwrap().probe, Probe::Icmp);
        for bad in [
            "10.96.0.10/tcp",
            "10.96.0.10:0",
            "10.96.0.10:70000",
            "x:80",
            "10.96.0.10:80/gre",
            "10.96.0.10:80/icmp",
            "[fd00::1",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clusterip_dnat_over_ready_endpoints_and_masquerade_by_source() {
        let s = world(
            &(web()
                + &slice(
                    "web-1",
                    "web",
                    "[{name: http, port: 8080}]",
                    &[
                        "10.244.1.1 me",
                        "10.244.2.1 other",
                        "10.244.2.2 other unready",
                        "10.244.2.3 other dead",
                    ],
                )),
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.10:80");
        assert_eq!(t.verdict, Verdict::Dnat { endpoints: 2 });
        assert_eq!(t.verdict.exit_code(), 0);
        assert_eq!(t.source_is, SourceClass::Pod);
        assert_eq!(eps(&t), ["10.244.1.1:8080", "10.244.2.1:8080"]);
        assert_eq!(t.endpoints[0].probability, 0.5);
        assert_eq!(masq(&t), [false, false], "a pod keeps its address");
        assert_eq!(t.frontend.as_ref().unwrap().kind, "ClusterIP");
        assert_eq!(
            reasons(&t),
            [
                ("10.244.2.2".parse().unwrap(), Exclusion::NotReady),
                ("10.244.2.3".parse().unwrap(), Exclusion::NotReady)
            ]
        );
        let t = ask(&s, &cfg(), OUTSIDE, "10.96.0.10:80");
        assert_eq!(
            (t.source_is, masq(&t)),
            (SourceClass::Outside, vec![true, true])
        );
        let t = ask(&s, &cfg(), NODE, "10.96.0.10:80");
        assert_eq!(
            (t.source_is, masq(&t)),
            (SourceClass::Node, vec![true, true])
        );
        // No pod network known: nothing is masqueraded (as kube-proxy without --cluster-cidr).
        let t = ask(&s, &ProxyConfig::default(), OUTSIDE, "10.96.0.10:80");
        assert_eq!(masq(&t), [false, false]);
        // --masquerade-all: pods too.
        let all = ProxyConfig {
            masquerade_all: true,
            ..cfg()
        };
        assert_eq!(masq(&ask(&s, &all, POD, "10.96.0.10:80")), [true, true]);
        // Text and JSON carry the same content.
        let text = t.to_string();
        assert!(text.contains("DNAT to one of 2 endpoints"), "{text}");
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["verdict"]["verdict"], "dnat");
        assert_eq!(json["endpoints"][0]["address"], "10.244.1.1:8080");
    }

    #[test]
    fn detect_local_by_interface_needs_the_interface() {
        let s = world(
            &(web()
                + &slice(
                    "web-1",
                    "web",
                    "[{name: http, port: 8080}]",
                    &["10.244.1.1 me"],
                )),
        );
        let c = ProxyConfig {
            detect_local: DetectLocal::InterfaceNamePrefix("veth".into()),
            ..cfg()
        };
        let mut q = Query {
            source: POD.parse().unwrap(),
            target: "10.96.0.10:80".parse().unwrap(),
            iifname: Some("veth12".into()),
            backend: Backend::Nftables,
        };
        let t = trace_snapshot(&s, &c, &q).unwrap();
        assert_eq!((t.source_is, masq(&t)), (SourceClass::Pod, vec![false]));
        q.iifname = Some("eth0".into());
        let t = trace_snapshot(&s, &c, &q).unwrap();
        assert_eq!((t.source_is, masq(&t)), (SourceClass::Outside, vec![true]));
    }

    #[test]
    fn terminating_endpoints_left_out_while_ready_ones_exist_and_used_otherwise() {
        let s = world(
            &(web()
                + &slice(
                    "web-1",
                    "web",
                    "[{name: http, port: 8080}]",
                    &["10.244.1.1 me", "10.244.2.1 other terminating"],
                )
                + &svc(
                    "drain",
                    "{clusterIP: 10.96.0.11, ports: [{port: 80, targetPort: 8080}]}",
                )
                + &slice(
                    "drain-1",
                    "drain",
                    "[{port: 8080}]",
                    &["10.244.2.5 other terminating", "10.244.2.6 other dead"],
                )),
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.10:80");
        assert_eq!(eps(&t), ["10.244.1.1:8080"]);
        assert_eq!(
            reasons(&t),
            [(
                "10.244.2.1".parse().unwrap(),
                Exclusion::TerminatingWhileReadyExist
            )]
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.11:80");
        assert_eq!(eps(&t), ["10.244.2.5:8080"]);
        assert_eq!(
            reasons(&t),
            [("10.244.2.6".parse().unwrap(), Exclusion::NotReady)]
        );
    }

    #[test]
    fn named_ports_per_slice_and_families() {
        let s = world(
            &(svc(
                "multi",
                "{clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP}]}",
            ) + &slice(
                "multi-a",
                "multi",
                "[{name: http, port: 8080}]",
                &["10.244.1.1 me"],
            ) + &slice(
                "multi-b",
                "multi",
                "[{name: dns, port: 5353, protocol: UDP}]",
                &["10.244.2.1 other"],
            ) + &slice(
                "multi-6",
                "multi",
                "[{name: http, port: 8080}]",
                &["fd00::1 other"],
            )),
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.20:80");
        assert_eq!(eps(&t), ["10.244.1.1:8080"]);
        let mut r = reasons(&t);
        r.sort();
        assert_eq!(
            r,
            [
                ("10.244.2.1".parse().unwrap(), Exclusion::NoSuchPort),
                ("fd00::1".parse().unwrap(), Exclusion::WrongFamily)
            ]
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.20:53/udp");
        assert_eq!(eps(&t), ["10.244.2.1:5353"]);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let yaml = svc(
            "loc",
            "{clusterIP: 10.96.0.12, internalTrafficPolicy: Local, ports: [{port: 80}]}",
        );
        let s = world(
            &(yaml.clone()
                + &slice(
                    "loc-1",
                    "loc",
                    "[{port: 80}]",
                    &["10.244.1.1 me", "10.244.2.1 other"],
                )),
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.12:80");
        assert_eq!(eps(&t), ["10.244.1.1:80"]);
        assert_eq!(
            reasons(&t),
            [("10.244.2.1".parse().unwrap(), Exclusion::OtherNode)]
        );
        let s = world(&(yaml + &slice("loc-1", "loc", "[{port: 80}]", &["10.244.2.1 other"])));
        let t = ask(&s, &cfg(), POD, "10.96.0.12:80");
        assert!(matches!(t.verdict, Verdict::Drop { .. }), "{t}");
        assert_eq!(t.verdict.exit_code(), 3);
        assert_eq!(
            reasons(&t),
            [("10.244.2.1".parse().unwrap(), Exclusion::OtherNode)]
        );
    }

    #[test]
    fn topology_hints_exclude_other_zones_and_nodes() {
        let s = world(
            &(web()
                + &slice(
                    "web-1",
                    "web",
                    "[{name: http, port: 8080}]",
                    &["10.244.1.1 me z=zone-a", "10.244.2.1 other z=zone-b"],
                )
                + &svc("near", "{clusterIP: 10.96.0.13, ports: [{port: 80}]}")
                + &slice(
                    "near-1",
                    "near",
                    "[{port: 80}]",
                    &["10.244.1.2 me n=me", "10.244.2.2 other n=other"],
                )),
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.10:80");
        assert_eq!(eps(&t), ["10.244.1.1:8080"]);
        assert_eq!(
            reasons(&t),
            [(
                "10.244.2.1".parse().unwrap(),
                Exclusion::NotHintedForThisZone
            )]
        );
        assert!(
            t.steps
                .iter()
                .any(|s| s.decision == "topology" && s.reason.contains("zone-a"))
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.13:80");
        assert_eq!(eps(&t), ["10.244.1.2:80"]);
        assert_eq!(
            reasons(&t),
            [(
                "10.244.2.2".parse().unwrap(),
                Exclusion::NotHintedForThisNode
            )]
        );
    }

    fn nodeport(etp: &str, eps: &[&str]) -> Snapshot {
        world(
            &(svc(
                "np",
                &format!(
                    "{{type: NodePort, clusterIP: 10.96.0.30, externalTrafficPolicy: {etp}, ports: [{{port: 80, nodePort: 30080}}]}}"
                ),
            ) + &slice("np-1", "np", "[{port: 80}]", eps)),
        )
    }

    #[test]
    fn nodeport_cluster_and_local() {
        let s = nodeport("Cluster", &["10.244.1.1 me", "10.244.2.1 other"]);
        let t = ask(&s, &cfg(), OUTSIDE, "192.168.0.2:30080");
        assert_eq!(t.frontend.as_ref().unwrap().kind, "NodePort");
        assert_eq!((eps(&t).len(), masq(&t)), (2, vec![true, true]));
        let s = nodeport("Local", &["10.244.1.1 me", "10.244.2.1 other"]);
        let t = ask(&s, &cfg(), OUTSIDE, "192.168.0.2:30080");
        assert_eq!(
            (eps(&t), masq(&t)),
            (vec!["10.244.1.1:80".to_string()], vec![false])
        );
        assert_eq!(
            reasons(&t),
            [("10.244.2.1".parse().unwrap(), Exclusion::OtherNode)]
        );
        // Pods and the node reach every endpoint; the node masqueraded, pods not.
        let t = ask(&s, &cfg(), POD, "192.168.0.2:30080");
        assert_eq!((eps(&t).len(), masq(&t)), (2, vec![false, false]));
        let t = ask(&s, &cfg(), NODE, "192.168.0.2:30080");
        assert_eq!((eps(&t).len(), masq(&t)), (2, vec![true, true]));
        // No endpoint on this node: outside clients are dropped.
        let s = nodeport("Local", &["10.244.2.1 other"]);
        let t = ask(&s, &cfg(), OUTSIDE, "192.168.0.2:30080");
        assert!(matches!(t.verdict, Verdict::Drop { .. }), "{t}");
        // Not a NodePort address: left alone; an unknown NodePort: left alone too.
        let t = ask(&s, &cfg(), OUTSIDE, "192.168.0.9:30080");
        assert!(matches!(t.verdict, Verdict::LeftAlone { .. }), "{t}");
        assert_eq!(t.verdict.exit_code(), 5);
        let t = ask(&s, &cfg(), OUTSIDE, "192.168.0.2:30081");
        assert!(matches!(t.verdict, Verdict::LeftAlone { .. }), "{t}");
        // --nodeport-addresses that exclude the node's address.
        let c = ProxyConfig {
            nodeport_addresses: crate::model::NodePortAddresses::Cidrs(vec![
                "10.0.0.0/8".parse().unwrap(),
            ]),
            ..cfg()
        };
        let s = nodeport("Cluster", &["10.244.1.1 me"]);
        assert!(matches!(
            ask(&s, &c, OUTSIDE, "192.168.0.2:30080").verdict,
            Verdict::LeftAlone { .. }
        ));
    }

    #[test]
    fn rejects_no_endpoints_unknown_port_and_ping() {
        let s = world(
            &(web()
                + &svc(
                    "empty",
                    "{clusterIP: 10.96.0.14, ports: [{port: 53, protocol: UDP}, {port: 80}]}",
                )),
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.10:80");
        assert_eq!(
            t.verdict,
            Verdict::Reject {
                with: "TCP reset",
                reason: t.steps.last().unwrap().reason.clone()
            }
        );
        assert_eq!(t.steps.last().unwrap().decision, "no-endpoints");
        assert_eq!(t.verdict.exit_code(), 3);
        let t = ask(&s, &cfg(), POD, "10.96.0.14:53/udp");
        assert!(
            matches!(
                t.verdict,
                Verdict::Reject {
                    with: "ICMP port unreachable",
                    ..
                }
            ),
            "{t}"
        );
        let t = ask(&s, &cfg(), POD, "10.96.0.10:81");
        assert_eq!(t.steps.last().unwrap().decision, "unknown-port");
        assert!(matches!(
            t.verdict,
            Verdict::Reject {
                with: "TCP reset",
                ..
            }
        ));
        let t = ask(&s, &cfg(), POD, "10.96.0.10");
        assert!(
            matches!(
                t.verdict,
                Verdict::Reject {
                    with: "ICMP port unreachable",
                    ..
                }
            ),
            "{t}"
        );
        assert!(t.to_string().contains("ping"), "{t}");
    }

    #[test]
    fn unallocated_cluster_ip_dropped_and_the_rest_left_alone() {
        let s = world(&web());
        let t = ask(&s, &cfg(), POD, "10.96.5.5:80");
        assert_eq!(t.steps.last().unwrap().decision, "unallocated");
        assert!(matches!(t.verdict, Verdict::Drop { .. }));
        let t = ask(&s, &cfg(), POD, "10.96.5.5");
        assert!(matches!(t.verdict, Verdict::Drop { .. }), "a ping too");
        let t = ask(&s, &cfg(), POD, "10.97.5.5:80");
        assert!(matches!(t.verdict, Verdict::LeftAlone { .. }));
        // Without Service CIDRs, nothing is dropped.
        let t = ask(&s, &ProxyConfig::default(), POD, "10.96.5.5:80");
        assert!(matches!(t.verdict, Verdict::LeftAlone { .. }));
    }

    #[test]
    fn load_balancer_source_ranges() {
        let yaml = |eps: &[&str]| {
            world(
                &(svc(
                    "lb",
                    "{type: LoadBalancer, clusterIP: 10.96.0.40, loadBalancerSourceRanges: [203.0.113.0/24], ports: [{port: 80, nodePort: 30040}]}",
                ) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n"
                    + &if eps.is_empty() {
                        String::new()
                    } else {
                        slice("lb-1", "lb", "[{port: 80}]", eps)
                    }),
            )
        };
        let s = yaml(&["10.244.1.1 me"]);
        let t = ask(&s, &cfg(), "203.0.113.9", "198.51.100.1:80");
        assert_eq!(t.frontend.as_ref().unwrap().kind, "LoadBalancer");
        assert_eq!(t.verdict, Verdict::Dnat { endpoints: 1 });
        let t = ask(&s, &cfg(), "198.18.0.1", "198.51.100.1:80");
        assert_eq!(t.steps.last().unwrap().decision, "firewall");
        assert!(matches!(t.verdict, Verdict::Drop { .. }));
        // Pods too; the NodePort and the ClusterIP are not guarded.
        assert!(matches!(
            ask(&s, &cfg(), POD, "198.51.100.1:80").verdict,
            Verdict::Drop { .. }
        ));
        assert_eq!(
            ask(&s, &cfg(), "198.18.0.1", "192.168.0.2:30040").verdict,
            Verdict::Dnat { endpoints: 1 }
        );
        // No endpoints: nftables refuses an allowed source; iptables drops.
        let s = yaml(&[]);
        assert!(matches!(
            ask(&s, &cfg(), "203.0.113.9", "198.51.100.1:80").verdict,
            Verdict::Reject { .. }
        ));
        assert!(matches!(
            ask_on(
                &s,
                &cfg(),
                "203.0.113.9",
                "198.51.100.1:80",
                Backend::Iptables
            )
            .verdict,
            Verdict::Drop { .. }
        ));
    }

    #[test]
    fn hairpin_and_affinity() {
        let s = world(
            &(svc(
                "web",
                "{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: 8080}]}",
            ) + &slice(
                "web-1",
                "web",
                "[{name: http, port: 8080}]",
                &["10.244.1.1 me", "10.244.2.1 other"],
            )),
        );
        let t = ask(&s, &cfg(), "10.244.1.1", "10.96.0.10:80");
        assert_eq!(masq(&t), [true, false], "to itself: hairpin");
        assert!(
            t.steps
                .iter()
                .any(|s| s.decision == "session-affinity" && s.reason.contains("10800"))
        );
    }

    #[test]
    fn external_ip_ping_is_left_alone_and_families_must_match() {
        let s = world(&svc(
            "x",
            "{clusterIP: 10.96.0.15, externalIPs: [198.51.100.7], ports: [{port: 80}]}",
        ));
        let t = ask(&s, &cfg(), OUTSIDE, "198.51.100.7");
        assert!(matches!(t.verdict, Verdict::LeftAlone { .. }));
        let t = ask(&s, &cfg(), OUTSIDE, "198.51.100.7:80");
        assert_eq!(t.frontend.as_ref().unwrap().kind, "ExternalIP");
        assert!(matches!(t.verdict, Verdict::Reject { .. }));
        let q = Query {
            source: "fd00::1".parse().unwrap(),
            target: "10.96.0.15:80".parse().unwrap(),
            iifname: None,
            backend: Backend::Nftables,
        };
        assert!(trace_snapshot(&s, &cfg(), &q).is_err());
    }

    /// For every destination of the examples, the explanation's endpoint sets are the plan's:
    /// the two come from the same functions.
    #[test]
    fn explanations_agree_with_the_plan_on_the_examples() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut loaded = crate::manifests::load(&[root]);
        let node = loaded.converted.nodes.remove("node-a").unwrap();
        let s = Snapshot {
            services: std::mem::take(&mut loaded.converted.services),
            slices: std::mem::take(&mut loaded.converted.slices),
            node,
            service_cidrs: std::mem::take(&mut loaded.converted.service_cidrs),
        };
        let c = cfg();
        let p = plan::plan(&s, &c);
        let mut checked = 0;
        for fp in &p.families {
            for d in &fp.destinations {
                let choice = Tracer::new(&s, &c, &p).explain(fp.family, d).unwrap();
                let sets: Vec<&Backends> = match &d.route {
                    Route::Internal(b) | Route::ExternalCluster(b) => vec![b],
                    Route::ExternalLocal { cluster, local } => {
                        std::iter::once(cluster).chain(local).collect()
                    }
                    Route::Drop | Route::Reject => vec![],
                };
                for b in sets {
                    let explained = match b.scope {
                        Scope::Cluster => &choice.cluster,
                        Scope::Local => &choice.local,
                    };
                    assert_eq!(explained, &b.endpoints, "{}", d.service_port());
                    checked += 1;
                }
            }
        }
        assert!(checked > 20, "{checked}");
    }
}
