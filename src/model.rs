//! The cluster as one node's proxy sees it: plain Rust types, converted once from the Kubernetes
//! API objects (see [`crate::convert`]) and validated there, so that nothing downstream has to
//! second-guess an address, a port or a protocol.
//!
//! Everything here is ordered (ordered maps, sorted `Vec`s) so that the compiler's output depends only
//! on the content of the snapshot, never on the order in which objects arrived.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// A transport protocol a Service port can carry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name nftables and Kubernetes (lower-cased) use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IPv4 or IPv6: the proxy keeps one ruleset per family.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(addr: &IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
}

/// Namespace and name of an object.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// externalTrafficPolicy / internalTrafficPolicy.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// One port of a Service. The target port is not kept: EndpointSlices carry the resolved number
/// per slice, matched by the Service port's name and protocol.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ServicePort {
    /// The port's name ("" for the single unnamed port); EndpointSlice ports are matched by it.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service that the proxy implements (headless and ExternalName Services never get this far).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Service {
    pub id: ObjectRef,
    /// The cluster IPs, at most one per family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`, both families (unparsable ones left out on conversion):
    /// only these sources may reach the load-balancer IPs. Empty: every source may.
    #[serde(with = "nets")]
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// ClientIP session affinity timeout in seconds, if affinity is on.
    pub affinity_timeout: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
}

/// One endpoint address as an EndpointSlice reports it.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared: a cluster has millions of endpoints and a few thousand nodes and zones, so each
    /// name is held once ([`crate::convert`] interns them) instead of once per endpoint.
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `hints`: where the EndpointSlice controller wants this endpoint used (topology-aware
    /// routing, `trafficDistribution`). `None` when the endpoint has no hint at all; boxed
    /// because most endpoints have none and a cluster has millions of endpoints.
    pub hints: Option<Box<EndpointHints>>,
}

/// An endpoint's topology hints (`hints.forZones[].name`, `hints.forNodes[].name`), each list
/// sorted and without duplicates; at least one of them is non-empty.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct EndpointHints {
    pub for_zones: Vec<String>,
    pub for_nodes: Vec<String>,
}

/// One port of an EndpointSlice: the Service port name it serves and the number the pods listen on.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice of a Service (only IPv4/IPv6 slices; FQDN slices are ignored on conversion).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointSlice {
    pub id: ObjectRef,
    /// The Service this slice belongs to (label `kubernetes.io/service-name`), in the slice's namespace.
    pub service: ObjectRef,
    pub family: IpFamily,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// What the proxy knows about the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// The node's addresses, primary (first InternalIP per family) first.
    pub addresses: Vec<IpAddr>,
    pub zone: Option<String>,
    #[serde(with = "nets")]
    pub pod_cidrs: Vec<IpNet>,
    /// The Node has a `deletionTimestamp`: it is going away.
    pub deleting: bool,
    /// The Node carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint.
    pub autoscaler_removing: bool,
}

impl NodeInfo {
    /// Whether load balancers should keep sending traffic to this node: not while it is being
    /// deleted or the cluster autoscaler is removing it (kube-proxy's "node eligible", which
    /// its `/healthz` reports so that load balancers drain the node first).
    pub fn eligible(&self) -> bool {
        !self.deleting && !self.autoscaler_removing
    }

    /// The node's primary address of a family: the first one listed.
    pub fn primary(&self, family: IpFamily) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| IpFamily::of(a) == family)
    }
}

/// Which local addresses answer NodePorts (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum NodePortAddresses {
    /// Every local address of the node except loopback.
    #[default]
    All,
    /// The node's primary address of each family.
    Primary,
    /// Local addresses inside these CIDRs (loopback never).
    Cidrs(#[serde(with = "nets")] Vec<IpNet>),
}

/// How traffic from this node's pods is told apart from other traffic (kube-proxy's
/// `detectLocalMode`). "Local" traffic is what ClusterIP masquerading leaves alone (unless
/// masquerade-all) and what reaches externalTrafficPolicy Local addresses through any endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DetectLocal {
    /// Sources inside [`ProxyConfig::cluster_cidrs`] (of the packet's family).
    #[default]
    ClusterCidr,
    /// Sources inside the Node's `spec.podCIDRs` (of the packet's family).
    NodeCidr,
    /// Packets arriving on an interface whose name starts with this prefix (`veth`, `cali`).
    InterfaceNamePrefix(String),
    /// Packets arriving on this bridge (`cbr0`).
    BridgeInterface(String),
}

impl DetectLocal {
    /// kube-proxy's name of the mode.
    pub fn mode_name(&self) -> &'static str {
        match self {
            DetectLocal::ClusterCidr => "ClusterCIDR",
            DetectLocal::NodeCidr => "NodeCIDR",
            DetectLocal::InterfaceNamePrefix(_) => "InterfaceNamePrefix",
            DetectLocal::BridgeInterface(_) => "BridgeInterface",
        }
    }
}

/// How the proxy is configured on this node: everything the compiler needs that is not a
/// Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyConfig {
    /// The pod network(s) of the cluster. With `detectLocalMode: ClusterCIDR` (the default),
    /// traffic from outside it to a ClusterIP is masqueraded; empty means unknown: then no such
    /// masquerading (as kube-proxy without `--cluster-cidr`).
    #[serde(with = "nets")]
    pub cluster_cidrs: Vec<IpNet>,
    pub nodeport_addresses: NodePortAddresses,
    /// Masquerade all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// The packet mark bit used to flag packets for masquerading (kube-proxy's default 14).
    pub masquerade_bit: u8,
    /// How pod traffic is recognised (`detectLocalMode`).
    pub detect_local: DetectLocal,
    /// The Service CIDRs to use when the cluster has no ServiceCIDR objects
    /// (`--service-cidr`): traffic to an address inside them that no Service holds is dropped.
    #[serde(with = "nets")]
    pub service_cidrs: Vec<IpNet>,
    /// `conntrack.tcpBeLiberal`: the kernel accepts out-of-window TCP packets, so the iptables
    /// mode does not drop `ctstate INVALID` in forward (as kube-proxy).
    pub tcp_be_liberal: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            cluster_cidrs: Vec::new(),
            nodeport_addresses: NodePortAddresses::All,
            masquerade_all: false,
            masquerade_bit: 14,
            detect_local: DetectLocal::ClusterCidr,
            service_cidrs: Vec::new(),
            tcp_be_liberal: false,
        }
    }
}

impl ProxyConfig {
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << self.masquerade_bit
    }
}

/// Converted objects by namespace/name, in a persistent map: a snapshot is a copy of two
/// pointers, two snapshots are diffed in the time of what changed between them (the subtrees
/// they share are skipped) and an old snapshot is freed in that time too. With a `BTreeMap`
/// every sync cloned, walked and freed all the keys: at 100k Services, 200k keys, tens of
/// milliseconds of a one-endpoint change.
pub type Objects<T> = imbl::OrdMap<ObjectRef, Arc<T>>;

/// The whole state the compiler works from: the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Shared, not owned: the agent's snapshots share unchanged objects with the previous one
    /// (and with its conversion cache), so building a snapshot is cheap and an unchanged object
    /// is recognised by its address without comparing it.
    #[serde(with = "by_id")]
    pub services: Objects<Service>,
    #[serde(with = "by_id")]
    pub slices: Objects<EndpointSlice>,
    pub node: NodeInfo,
    /// The cluster's Service CIDRs, from its `networking.k8s.io/v1` ServiceCIDR objects (both
    /// families, sorted). Empty: the cluster has none, and [`ProxyConfig::service_cidrs`] is used.
    #[serde(with = "nets")]
    pub service_cidrs: Vec<IpNet>,
}

/// `Vec<IpNet>` as a list of strings (`10.0.0.0/8`), for the agent's read-only state.
pub mod nets {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| n.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A map of objects by their identity, as the list of the objects (each carries its `id`).
pub mod by_id {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{EndpointSlice, ObjectRef, Service};

    /// An object that knows its identity.
    pub trait Keyed {
        fn key(&self) -> &ObjectRef;
    }

    impl Keyed for Service {
        fn key(&self) -> &ObjectRef {
            &self.id
        }
    }

    impl Keyed for EndpointSlice {
        fn key(&self) -> &ObjectRef {
            &self.id
        }
    }

    pub fn serialize<T: Serialize, S: Serializer>(
        map: &super::Objects<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.values().map(|v| &**v))
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<super::Objects<T>, D::Error>
    where
        T: Deserialize<'de> + Keyed,
        D: Deserializer<'de>,
    {
        Ok(Vec::<T>::deserialize(d)?
            .into_iter()
            .map(|v| (v.key().clone(), Arc::new(v)))
            .collect())
    }
}
