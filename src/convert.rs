//! From Kubernetes API objects (k8s-openapi types) to the proxy's model, validating as we go.
//!
//! This is the only place that reads k8s-openapi types. Every problem is reported as a
//! [`Rejected`] naming the object and the field. A bad element (one external IP, one port, one
//! endpoint, one ingress IP) costs only itself: it is left out and listed in
//! [`Usable::skipped`], and the rest of the object is used, as kube-proxy does. Only what leaves
//! nothing to program (no usable cluster IP, no usable port, an unknown Service type or address
//! type) costs the whole object, and never anything beyond it. Objects the proxy deliberately
//! leaves alone (headless and ExternalName Services, Services owned by another proxy, FQDN
//! slices) are not errors: they convert to `None`.
//!
//! Addresses are parsed as kube-proxy parses them (`k8s.io/utils/net`'s `ParseIPSloppy`): an
//! IPv4 octet with leading zeros, which the apiserver accepted for years, is read as decimal.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    Endpoint, EndpointHints, EndpointPort, EndpointSlice, IpFamily, NodeInfo, ObjectRef, Objects,
    Protocol, Service, ServicePort, TrafficPolicy,
};

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label by which another proxy claims a Service; svcproxy leaves such Services alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Node label holding the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation asking the EndpointSlice controller for topology-aware routing (`Auto`).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// Its deprecated predecessor, read by the controller when the first is absent.
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// kube-proxy's default ClientIP affinity timeout: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// The API's upper bound for `sessionAffinityConfig.clientIP.timeoutSeconds`: one day.
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// The kinds of object the proxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
            ObjectKind::ServiceCidr => "ServiceCIDR",
        })
    }
}

/// An object (or part of one) the proxy could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct Rejected {
    pub kind: ObjectKind,
    /// `namespace/name` (or just `name` for Nodes).
    pub object: String,
    /// The offending field, as a path into the object (`spec.ports[1].port`).
    pub field: String,
    pub reason: String,
}

/// A converted object, and the elements of it that were left out (each named, for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usable<T> {
    pub object: T,
    pub skipped: Vec<Rejected>,
}

/// What converting one object gives: the model object (with what was left out of it), nothing
/// (not svcproxy's business), or why the whole object cannot be used.
pub type ConvertResult<T> = Result<Option<Usable<T>>, Rejected>;

/// Parses an IP address as kube-proxy does (`k8s.io/utils/net.ParseIPSloppy`, Go's parser from
/// before 1.17): IPv4 octets may carry leading zeros and are read as decimal
/// (`192.168.064.100` is 192.168.64.100), also in an IPv6 address's trailing IPv4 part. An
/// IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is the IPv4 address, as Go's `To4` has it.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    match text.rsplit_once(':') {
        // IPv6 with a trailing dotted quad: rewrite the quad without its zeros and try again.
        Some((head, tail)) if tail.contains('.') => format!("{head}:{}", sloppy_ipv4(tail)?)
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical()),
        Some(_) => None,
        None => sloppy_ipv4(text).map(IpAddr::V4),
    }
}

/// A non-empty run of decimal digits, leading zeros allowed (Go's `dtoi`).
fn decimal(digits: &str) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.bytes().try_fold(0u32, |n, b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u32::from(d))
    })
}

/// Four dot-separated decimal numbers up to 255, any of them with leading zeros.
fn sloppy_ipv4(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        *octet = u8::try_from(decimal(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// Parses a CIDR as kube-proxy does (`ParseCIDRSloppy`): the address as [`parse_ip`] reads it
/// (but an IPv4-mapped address stays IPv6, as in Go), a decimal prefix length. Host bits may be
/// set (callers truncate).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let (addr, prefix) = text.split_once('/')?;
    let prefix = u8::try_from(decimal(prefix)?).ok()?;
    let ip = match addr.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if addr.contains(':') => {
            let (head, tail) = addr.rsplit_once(':')?;
            format!("{head}:{}", sloppy_ipv4(tail)?).parse().ok()?
        }
        Err(_) => IpAddr::V4(sloppy_ipv4(addr)?),
    };
    IpNet::new(ip, prefix).ok()
}

struct Ctx<'a> {
    kind: ObjectKind,
    object: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> Rejected {
        Rejected {
            kind: self.kind,
            object: self.object.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn ip(&self, field: impl Into<String>, text: &str) -> Result<IpAddr, Rejected> {
        parse_ip(text.trim())
            .ok_or_else(|| self.err(field, format!("{text:?} is not an IP address")))
    }

    fn port(&self, field: impl Into<String>, value: i32) -> Result<u16, Rejected> {
        match u16::try_from(value) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.err(field, format!("{value} is not a port number (1-65535)"))),
        }
    }

    fn protocol(
        &self,
        field: impl Into<String>,
        value: Option<&str>,
    ) -> Result<Protocol, Rejected> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(self.err(
                field,
                format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
            )),
        }
    }

    /// An unknown policy reads as kube-proxy reads it, `Cluster` (only "Local" is Local), and
    /// is reported.
    fn policy(
        &self,
        field: &str,
        value: Option<&str>,
        skipped: &mut Vec<Rejected>,
    ) -> TrafficPolicy {
        match value {
            None | Some("Cluster") => TrafficPolicy::Cluster,
            Some("Local") => TrafficPolicy::Local,
            Some(other) => {
                skipped.push(self.err(
                    field,
                    format!("unknown traffic policy {other:?} (expected Cluster or Local); Cluster is used"),
                ));
                TrafficPolicy::Cluster
            }
        }
    }
}

fn object_ref(meta: &ObjectMeta) -> Option<ObjectRef> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some(ObjectRef::new(namespace, name))
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// Converts a Service. `Ok(None)`: a Service that gets no rules by design.
///
/// What kube-proxy does with each field decides what a bad value costs: a bad external IP,
/// ingress IP, port, node port or health check port is left out (kube-proxy's per-port and
/// per-IP handling drops it too); an unknown traffic policy or session affinity reads as
/// kube-proxy reads it (`Cluster`, no affinity); only a Service left with no cluster IP or no
/// port is rejected whole.
pub fn service(svc: &core::Service) -> ConvertResult<Service> {
    let Some(id) = object_ref(&svc.metadata) else {
        return Err(Rejected {
            kind: ObjectKind::Service,
            object: "<unnamed>".into(),
            field: "metadata.name".into(),
            reason: "missing".into(),
        });
    };
    let object = id.to_string();
    let cx = Ctx {
        kind: ObjectKind::Service,
        object: &object,
    };
    if label(&svc.metadata, SERVICE_PROXY_NAME_LABEL).is_some() {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err(cx.err("spec", "missing"));
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match svc_type {
        "ExternalName" => return Ok(None),
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => return Err(cx.err("spec.type", format!("unknown Service type {other:?}"))),
    }
    let mut skipped = Vec::new();

    // clusterIPs is authoritative when set; clusterIP is its first element for older clients.
    let (ip_field, ip_texts): (&str, Vec<&str>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => {
            ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
        }
        (_, Some(ip)) if !ip.is_empty() => ("spec.clusterIP", vec![ip.as_str()]),
        _ => return Err(cx.err("spec.clusterIP", "not set (no cluster IP allocated yet)")),
    };
    if ip_texts.contains(&"None") {
        return Ok(None); // headless: DNS points straight at the pods
    }
    // One cluster IP per family; a bad one costs its family only.
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for (i, text) in ip_texts.iter().enumerate() {
        let field = if ip_field == "spec.clusterIPs" {
            format!("{ip_field}[{i}]")
        } else {
            ip_field.to_string()
        };
        match cx.ip(&field, text) {
            Ok(ip)
                if cluster_ips
                    .iter()
                    .any(|other| IpFamily::of(other) == IpFamily::of(&ip)) =>
            {
                skipped.push(cx.err(field, format!("{ip}: a second cluster IP of its family")));
            }
            Ok(ip) => cluster_ips.push(ip),
            Err(e) => skipped.push(e),
        }
    }
    if cluster_ips.is_empty() {
        // Nothing to program: the (only) reason is the object's rejection.
        return Err(skipped.remove(0));
    }

    let exposes_node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let mut ports = Vec::new();
    let mut port_problems = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = cx
            .protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())
            .and_then(|protocol| Ok((protocol, cx.port(format!("spec.ports[{i}].port"), p.port)?)));
        let (protocol, port) = match port {
            Ok(pp) => pp,
            Err(e) => {
                port_problems.push(e);
                continue;
            }
        };
        if ports
            .iter()
            .any(|q: &ServicePort| q.port == port && q.protocol == protocol)
        {
            port_problems.push(cx.err(
                format!("spec.ports[{i}]"),
                format!("duplicate port {port}/{protocol}"),
            ));
            continue;
        }
        let node_port = match p.node_port {
            Some(np) if np != 0 && exposes_node_ports => {
                match cx.port(format!("spec.ports[{i}].nodePort"), np) {
                    Ok(np) => Some(np),
                    Err(e) => {
                        skipped.push(e);
                        None
                    }
                }
            }
            _ => None,
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
            node_port,
        });
    }
    if ports.is_empty() {
        return Err(if port_problems.is_empty() {
            cx.err("spec.ports", "no ports")
        } else {
            port_problems.remove(0)
        });
    }
    skipped.append(&mut port_problems);

    let mut external_ips = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        match cx.ip(format!("spec.externalIPs[{i}]"), text) {
            Ok(ip) => external_ips.push(ip),
            Err(e) => skipped.push(e),
        }
    }

    let mut load_balancer_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer proxies and sends traffic to the nodes, not to
            // this IP; kube-proxy does not capture such IPs either.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(text) = ing.ip.as_deref().filter(|t| !t.is_empty()) {
                match cx.ip(format!("status.loadBalancer.ingress[{i}].ip"), text) {
                    Ok(ip) => load_balancer_ips.push(ip),
                    Err(e) => skipped.push(e),
                }
            }
        }
    }

    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(t) if t >= 1 && t as i64 <= MAX_AFFINITY_TIMEOUT as i64 => Some(t as u32),
                Some(t) => {
                    skipped.push(cx.err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!(
                            "{t} is out of range (1-{MAX_AFFINITY_TIMEOUT}); \
                             the default {DEFAULT_AFFINITY_TIMEOUT} is used"
                        ),
                    ));
                    Some(DEFAULT_AFFINITY_TIMEOUT)
                }
            }
        }
        Some(other) => {
            // kube-proxy: anything but ClientIP is no affinity.
            skipped.push(cx.err(
                "spec.sessionAffinity",
                format!(
                    "unknown session affinity {other:?} (expected None or ClientIP); none is used"
                ),
            ));
            None
        }
    };

    let external_policy = cx.policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        &mut skipped,
    );
    let internal_policy = cx.policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        &mut skipped,
    );
    let health_check_node_port = match spec.health_check_node_port {
        Some(p)
            if p != 0 && svc_type == "LoadBalancer" && external_policy == TrafficPolicy::Local =>
        {
            match cx.port("spec.healthCheckNodePort", p) {
                Ok(p) => Some(p),
                Err(e) => {
                    skipped.push(e);
                    None
                }
            }
        }
        _ => None,
    };

    // Logged once and counted (svcproxy_skipped_fields) with the other skipped fields.
    skipped.extend(
        topology_warnings(svc)
            .into_iter()
            .map(|(field, reason)| cx.err(field, reason)),
    );

    let (load_balancer_source_ranges, bad_ranges) = source_ranges(svc, &cx);
    skipped.extend(bad_ranges);
    Ok(Some(Usable {
        object: Service {
            id,
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges,
            affinity_timeout,
            external_policy,
            internal_policy,
            health_check_node_port,
        },
        skipped,
    }))
}

/// What a Service asks of topology that svcproxy does not know. Like kube-proxy, svcproxy
/// reads neither `spec.trafficDistribution` nor the topology annotations: the EndpointSlice
/// controller turns them into hints, and the hints decide (see `plan`). A value the controller
/// does not know publishes no hints, so every endpoint is used: that is worth a warning.
/// Each is `(field, reason)`.
pub fn topology_warnings(svc: &core::Service) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(td) = svc
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref())
        && !matches!(td, "" | "PreferClose" | "PreferSameZone" | "PreferSameNode")
    {
        out.push((
            "spec.trafficDistribution".into(),
            format!(
                "{td:?} is not known to svcproxy (PreferClose, \
                 PreferSameZone, PreferSameNode); the EndpointSlice hints are followed as \
                 published"
            ),
        ));
    }
    let annotations = svc.metadata.annotations.as_ref();
    let annotation = [TOPOLOGY_MODE_ANNOTATION, TOPOLOGY_HINTS_ANNOTATION]
        .into_iter()
        .find_map(|key| Some((key, annotations?.get(key)?)));
    if let Some((key, value)) = annotation
        && !matches!(
            value.as_str(),
            "" | "Auto" | "auto" | "Disabled" | "disabled"
        )
    {
        out.push((
            format!("metadata.annotations[{key}]"),
            format!(
                "{value:?} is neither Auto nor Disabled: the EndpointSlice controller \
                 publishes no hints for it, and every endpoint is used"
            ),
        ));
    }
    out
}

/// An endpoint's `hints`, sorted and without duplicates or empty names; `None` when it has none.
fn endpoint_hints(hints: Option<&discovery::EndpointHints>) -> Option<Box<EndpointHints>> {
    let hints = hints?;
    let names = |names: Vec<&str>| {
        let mut v: Vec<String> = names
            .into_iter()
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let h = EndpointHints {
        for_zones: names(
            hints
                .for_zones
                .iter()
                .flatten()
                .map(|z| z.name.as_str())
                .collect(),
        ),
        for_nodes: names(
            hints
                .for_nodes
                .iter()
                .flatten()
                .map(|n| n.name.as_str())
                .collect(),
        ),
    };
    (!h.for_zones.is_empty() || !h.for_nodes.is_empty()).then(|| Box::new(h))
}

/// `spec.loadBalancerSourceRanges`, read as kube-proxy reads them: each trimmed of whitespace
/// (`" 203.0.113.0/25"` is valid) and truncated to its network; an unparsable one is left out
/// (the others still guard the load balancer) and reported.
fn source_ranges(svc: &core::Service, cx: &Ctx) -> (Vec<IpNet>, Vec<Rejected>) {
    let mut ranges = Vec::new();
    let mut problems = Vec::new();
    let texts = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref());
    for (i, text) in texts.into_iter().flatten().enumerate() {
        match text.trim().parse::<IpNet>() {
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => problems.push(cx.err(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{text:?} is not a CIDR; this range is ignored"),
            )),
        }
    }
    ranges.sort();
    ranges.dedup();
    (ranges, problems)
}

/// The CIDRs of a `networking.k8s.io/v1` ServiceCIDR (`spec.cidrs`); an unparsable one is left
/// out and reported.
pub fn service_cidr(obj: &networking::ServiceCIDR) -> (Vec<IpNet>, Vec<Rejected>) {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let cx = Ctx {
        kind: ObjectKind::ServiceCidr,
        object: &name,
    };
    let mut cidrs = Vec::new();
    let mut problems = Vec::new();
    let texts = obj.spec.as_ref().and_then(|s| s.cidrs.as_ref());
    for (i, text) in texts.into_iter().flatten().enumerate() {
        match text.trim().parse::<IpNet>() {
            Ok(net) => cidrs.push(net.trunc()),
            Err(_) => problems.push(cx.err(
                format!("spec.cidrs[{i}]"),
                format!("{text:?} is not a CIDR"),
            )),
        }
    }
    (cidrs, problems)
}

/// Converts an EndpointSlice. `Ok(None)`: a slice the proxy does not use (FQDN, or no owning
/// Service label).
///
/// As in kube-proxy's EndpointSliceCache, a bad port or endpoint is left out and the rest of
/// the slice is used: an endpoint without addresses, or whose first address is not an address
/// of the slice's family; a port without a number. Only the first address of an endpoint is
/// read (the API documents the others as unused; kube-proxy ignores them too).
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> ConvertResult<EndpointSlice> {
    let Some(id) = object_ref(&slice.metadata) else {
        return Err(Rejected {
            kind: ObjectKind::EndpointSlice,
            object: "<unnamed>".into(),
            field: "metadata.name".into(),
            reason: "missing".into(),
        });
    };
    let object = id.to_string();
    let cx = Ctx {
        kind: ObjectKind::EndpointSlice,
        object: &object,
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(None),
        other => {
            return Err(cx.err(
                "addressType",
                format!("unknown address type {other:?} (expected IPv4, IPv6 or FQDN)"),
            ));
        }
    };
    let Some(service_name) = label(&slice.metadata, SERVICE_NAME_LABEL).filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    let mut skipped = Vec::new();

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A port without a number means "all ports", which a proxy cannot use.
        let Some(number) = p.port else {
            skipped.push(cx.err(
                format!("ports[{i}].port"),
                "no port number (\"all ports\"), which a proxy cannot use",
            ));
            continue;
        };
        let port = cx
            .protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())
            .and_then(|protocol| Ok((protocol, cx.port(format!("ports[{i}].port"), number)?)));
        match port {
            Ok((protocol, port)) => ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
            }),
            Err(e) => skipped.push(e),
        }
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(text) = ep.addresses.first() else {
            skipped.push(cx.err(format!("endpoints[{i}].addresses"), "empty"));
            continue;
        };
        let field = format!("endpoints[{i}].addresses[0]");
        let address = match cx.ip(&field, text) {
            Ok(a) if IpFamily::of(&a) == family => a,
            Ok(a) => {
                skipped.push(cx.err(
                    field,
                    format!("{a} is not an {} address", slice.address_type),
                ));
                continue;
            }
            Err(e) => {
                skipped.push(e);
                continue;
            }
        };
        let conditions = ep.conditions.as_ref();
        // Absent conditions read as kube-proxy reads them: ready and serving unless said
        // otherwise, not terminating.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        endpoints.push(Endpoint {
            address,
            ready,
            serving,
            terminating,
            node_name: ep
                .node_name
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(intern),
            zone: ep.zone.as_deref().filter(|z| !z.is_empty()).map(intern),
            hints: endpoint_hints(ep.hints.as_ref()),
        });
    }

    Ok(Some(Usable {
        object: EndpointSlice {
            service: ObjectRef::new(id.namespace.clone(), service_name),
            id,
            family,
            ports,
            endpoints,
        },
        skipped,
    }))
}

/// The one shared copy of a node or zone name. The names seen are kept for the life of the
/// process: they are bounded by the cluster's nodes and zones (a node that goes leaves a few
/// bytes), and the result is the same as an unshared copy, so conversion stays a function of
/// its input.
fn intern(name: &str) -> Arc<str> {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<Arc<str>>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Arc<str> = Arc::from(name);
    names.insert(n.clone());
    n
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Converts the proxy's own Node. Unusable addresses or CIDRs are reported and left out; the rest
/// of the Node is still used, since losing the whole Node would lose more than the bad field.
/// Its deletion and the autoscaler's taint are kept for health only (kube-proxy's `/healthz`
/// fails on such a node so that load balancers drain it).
pub fn node(node: &core::Node) -> (NodeInfo, Vec<Rejected>) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let cx = Ctx {
        kind: ObjectKind::Node,
        object: &name,
    };
    let mut problems = Vec::new();
    let mut info = NodeInfo {
        name: name.clone(),
        zone: label(&node.metadata, ZONE_LABEL).map(str::to_string),
        ..NodeInfo::default()
    };
    // InternalIPs first, so that the first address of each family is the node's primary one.
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for wanted in ["InternalIP", "ExternalIP"] {
        for (i, a) in addresses.into_iter().flatten().enumerate() {
            if a.type_ != wanted {
                continue;
            }
            match cx.ip(format!("status.addresses[{i}].address"), &a.address) {
                Ok(ip) if !info.addresses.contains(&ip) => info.addresses.push(ip),
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
    }
    info.deleting = node.metadata.deletion_timestamp.is_some();
    info.autoscaler_removing = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    if let Some(spec) = node.spec.as_ref() {
        let (field, cidrs): (&str, Vec<&String>) = match (&spec.pod_cidrs, &spec.pod_cidr) {
            (Some(list), _) if !list.is_empty() => ("spec.podCIDRs", list.iter().collect()),
            (_, Some(one)) if !one.is_empty() => ("spec.podCIDR", vec![one]),
            _ => ("", Vec::new()),
        };
        for (i, text) in cidrs.into_iter().enumerate() {
            match parse_cidr(text.trim()) {
                Some(net) => info.pod_cidrs.push(net.trunc()),
                None => problems
                    .push(cx.err(format!("{field}[{i}]"), format!("{text:?} is not a CIDR"))),
            }
        }
    }
    (info, problems)
}

/// Everything converted from a set of API objects.
#[derive(Debug, Default)]
pub struct Converted {
    pub services: Objects<Service>,
    pub slices: Objects<EndpointSlice>,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Every ServiceCIDR's CIDRs, sorted and deduplicated.
    pub service_cidrs: Vec<IpNet>,
}

impl Converted {
    /// Adds a Service; returns what was left out of it, or (alone) what made it unusable.
    pub fn add_service(&mut self, svc: &core::Service) -> Vec<Rejected> {
        match service(svc) {
            Ok(Some(s)) => {
                self.services
                    .insert(s.object.id.clone(), Arc::new(s.object));
                s.skipped
            }
            Ok(None) => Vec::new(),
            Err(e) => vec![e],
        }
    }

    /// Adds an EndpointSlice; returns what was left out of it, or (alone) what made it unusable.
    pub fn add_slice(&mut self, slice: &discovery::EndpointSlice) -> Vec<Rejected> {
        match endpoint_slice(slice) {
            Ok(Some(s)) => {
                self.slices.insert(s.object.id.clone(), Arc::new(s.object));
                s.skipped
            }
            Ok(None) => Vec::new(),
            Err(e) => vec![e],
        }
    }

    /// Adds a ServiceCIDR; the problems are the CIDRs left out of it.
    pub fn add_service_cidr(&mut self, obj: &networking::ServiceCIDR) -> Vec<Rejected> {
        let (cidrs, problems) = service_cidr(obj);
        self.service_cidrs.extend(cidrs);
        self.service_cidrs.sort();
        self.service_cidrs.dedup();
        problems
    }

    /// Adds a Node; the problems are the fields left out of it.
    pub fn add_node(&mut self, n: &core::Node) -> Vec<Rejected> {
        let (info, problems) = node(n);
        self.nodes.insert(info.name.clone(), info);
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc_full(v: serde_json::Value) -> ConvertResult<Service> {
        service(&serde_json::from_value(v).unwrap())
    }

    /// The Service, asserting nothing was left out of it.
    fn svc(v: serde_json::Value) -> Result<Option<Service>, Rejected> {
        svc_full(v).map(|o| {
            o.map(|u| {
                assert_eq!(u.skipped, vec![], "nothing skipped");
                u.object
            })
        })
    }

    fn slice_full(v: serde_json::Value) -> ConvertResult<EndpointSlice> {
        endpoint_slice(&serde_json::from_value(v).unwrap())
    }

    fn fields(skipped: &[Rejected]) -> Vec<&str> {
        skipped.iter().map(|r| r.field.as_str()).collect()
    }

    #[test]
    fn service_defaults() {
        let s = svc(json!({
            "metadata": {"name": "a"},
            "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}], "sessionAffinity": "ClientIP"}
        }))
        .unwrap()
        .unwrap();
        assert_eq!(s.id, ObjectRef::new("default", "a"));
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(s.external_policy, TrafficPolicy::Cluster);
    }

    #[test]
    fn source_ranges_are_trimmed_and_a_bad_one_is_skipped_alone() {
        let obj: core::Service = serde_json::from_value(json!({
            "metadata": {"name": "lb", "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.1", "ports": [{"port": 80}],
                     "loadBalancerSourceRanges": [" 203.0.113.0/25", "bogus", "10.1.2.3/8 "]}
        }))
        .unwrap();
        let s = service(&obj).unwrap().unwrap();
        assert_eq!(
            s.object.load_balancer_source_ranges,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "203.0.113.0/25".parse().unwrap()
            ]
        );
        let w = s.skipped;
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].to_string(),
            "Service ns/lb: spec.loadBalancerSourceRanges[1]: \"bogus\" is not a CIDR; this range is ignored"
        );
    }

    #[test]
    fn service_cidrs_keep_the_good_ones() {
        let obj: networking::ServiceCIDR = serde_json::from_value(json!({
            "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": ["10.96.0.0/12", "fd00::/nope"]}
        }))
        .unwrap();
        let (cidrs, bad) = service_cidr(&obj);
        assert_eq!(cidrs, vec!["10.96.0.0/12".parse::<IpNet>().unwrap()]);
        assert_eq!(
            bad[0].to_string(),
            "ServiceCIDR kubernetes: spec.cidrs[1]: \"fd00::/nope\" is not a CIDR"
        );
    }

    #[test]
    fn headless_externalname_and_foreign_proxy_are_ignored() {
        for v in [
            json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "e"}, "spec": {"type": "ExternalName", "externalName": "x.example"}}),
            json!({"metadata": {"name": "f", "labels": {SERVICE_PROXY_NAME_LABEL: "other"}},
                   "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}),
        ] {
            assert_eq!(svc(v).unwrap(), None);
        }
    }

    #[test]
    fn addresses_parse_as_kube_proxy_parses_them() {
        let ip = |t: &str| parse_ip(t).map(|i| i.to_string());
        assert_eq!(ip("192.168.064.100").as_deref(), Some("192.168.64.100"));
        assert_eq!(
            ip("010.000.0.01").as_deref(),
            Some("10.0.0.1"),
            "decimal, not octal"
        );
        assert_eq!(ip("::ffff:10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(ip("fd00::010.1.2.3").as_deref(), Some("fd00::a01:203"));
        assert_eq!(ip("fd00::1").as_deref(), Some("fd00::1"));
        for bad in [
            "10.0.0.256",
            "10.0.0",
            "10.0.0.1.2",
            "10..0.1",
            "10.0.0.-1",
            "1.2.3.4/32",
            "",
            "x",
            "10.0.0.1 ",
            "fd00::1::2",
            "0x10.0.0.1",
            "1234.0.0.1",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
        let net = |t: &str| parse_cidr(t).map(|n| n.to_string());
        assert_eq!(net("10.244.001.0/024").as_deref(), Some("10.244.1.0/24"));
        assert_eq!(net("fd00:10:244::/56").as_deref(), Some("fd00:10:244::/56"));
        assert_eq!(net("10.0.0.1/32").as_deref(), Some("10.0.0.1/32"));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "fd00::/129",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_leading_zero_cluster_ip_keeps_its_service() {
        let s = svc(json!({"metadata": {"name": "a"},
                           "spec": {"clusterIP": "192.168.064.100", "ports": [{"port": 80}]}}))
        .unwrap()
        .unwrap();
        assert_eq!(
            s.cluster_ips,
            vec!["192.168.64.100".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn what_rejects_a_whole_service() {
        let e = svc(json!({"metadata": {"name": "a", "namespace": "ns"},
                           "spec": {"clusterIP": "10.0.0.300", "ports": [{"port": 80}]}}))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service ns/a: spec.clusterIP: \"10.0.0.300\" is not an IP address"
        );
        let e = svc(json!({"metadata": {"name": "a"},
                           "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80, "protocol": "ICMP"}]}}))
        .unwrap_err();
        assert_eq!(
            e.field, "spec.ports[0].protocol",
            "its only port is unusable"
        );
        let e =
            svc(json!({"metadata": {"name": "a"}, "spec": {"clusterIP": "10.0.0.1"}})).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("spec.ports", "no ports")
        );
        let e = svc(json!({"metadata": {"name": "a"},
                           "spec": {"type": "Magic", "clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}))
        .unwrap_err();
        assert_eq!(e.field, "spec.type");
    }

    #[test]
    fn a_bad_element_costs_only_itself() {
        let u = svc_full(json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIPs": ["10.0.0.1", "fd00::zz"],
                "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                          {"name": "b", "port": 70000},
                          {"name": "c", "port": 81, "protocol": "ICMP"},
                          {"name": "d", "port": 80},
                          {"name": "e", "port": 82, "nodePort": 99999}],
                "externalIPs": ["203.0.113.1", "bogus", "203.0.113.003"],
                "externalTrafficPolicy": "Sideways",
                "internalTrafficPolicy": "Local",
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                "healthCheckNodePort": 0
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.300"}, {"ip": "198.51.100.7"}]}}
        }))
        .unwrap()
        .unwrap();
        let s = &u.object;
        assert_eq!(s.cluster_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        let ports: Vec<(&str, u16, Option<u16>)> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.node_port))
            .collect();
        assert_eq!(ports, [("a", 80, Some(30080)), ("e", 82, None)]);
        assert_eq!(
            s.external_ips,
            [
                "203.0.113.1".parse::<IpAddr>().unwrap(),
                "203.0.113.3".parse().unwrap()
            ]
        );
        assert_eq!(
            s.load_balancer_ips,
            ["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            s.external_policy,
            TrafficPolicy::Cluster,
            "kube-proxy: only Local is Local"
        );
        assert_eq!(s.internal_policy, TrafficPolicy::Local);
        assert_eq!(s.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(
            fields(&u.skipped),
            [
                "spec.clusterIPs[1]",
                "spec.ports[4].nodePort",
                "spec.ports[1].port",
                "spec.ports[2].protocol",
                "spec.ports[3]",
                "spec.externalIPs[1]",
                "status.loadBalancer.ingress[0].ip",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                "spec.externalTrafficPolicy",
            ]
        );
        assert_eq!(
            u.skipped[5].to_string(),
            "Service ns/a: spec.externalIPs[1]: \"bogus\" is not an IP address"
        );
        let u = svc_full(json!({"metadata": {"name": "a"},
            "spec": {"clusterIPs": ["10.0.0.1", "10.0.0.2"], "ports": [{"port": 80}],
                     "sessionAffinity": "Sticky"}}))
        .unwrap()
        .unwrap();
        assert_eq!(u.object.cluster_ips.len(), 1);
        assert_eq!(u.object.affinity_timeout, None);
        assert_eq!(
            fields(&u.skipped),
            ["spec.clusterIPs[1]", "spec.sessionAffinity"]
        );
    }

    #[test]
    fn slice_elements_are_skipped_alone() {
        let e = slice_full(
            json!({"metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: "a"}},
                                  "addressType": "IPX", "endpoints": []}),
        )
        .unwrap_err();
        assert_eq!(e.field, "addressType");
        let u = slice_full(json!({
            "metadata": {"name": "s", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "a"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}, {"name": "all"}, {"name": "z", "port": 0},
                      {"name": "x", "port": 9090, "protocol": "ICMP"}],
            "endpoints": [{"addresses": ["fd00::1"]},
                          {"addresses": []},
                          {"addresses": ["10.1.0.1", "not-read"]},
                          {"addresses": ["10.1.0.bogus"]},
                          {"addresses": ["10.001.0.2"]}]
        }))
        .unwrap()
        .unwrap();
        assert_eq!(u.object.ports.len(), 1);
        let addrs: Vec<String> = u
            .object
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(
            fields(&u.skipped),
            [
                "ports[1].port",
                "ports[2].port",
                "ports[3].protocol",
                "endpoints[0].addresses[0]",
                "endpoints[1].addresses",
                "endpoints[3].addresses[0]",
            ]
        );
        assert_eq!(
            u.skipped[3].to_string(),
            "EndpointSlice ns/s: endpoints[0].addresses[0]: fd00::1 is not an IPv4 address"
        );
    }

    #[test]
    fn slice_condition_defaults() {
        let s = slice_full(json!({"metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: "a"}},
                             "addressType": "IPv4",
                             "ports": [{"port": 8080}],
                             "endpoints": [{"addresses": ["10.1.0.1"]},
                                           {"addresses": ["10.1.0.2"], "conditions": {"ready": false}},
                                           {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "terminating": true}}]}))
        .unwrap()
        .unwrap();
        assert_eq!(s.skipped, vec![]);
        let s = s.object;
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        // kube-proxy reads an unset `serving` as true, whatever `ready` says.
        assert!(!s.endpoints[1].ready && s.endpoints[1].serving);
        assert!(!s.endpoints[2].ready && s.endpoints[2].serving && s.endpoints[2].terminating);
        assert_eq!(s.service, ObjectRef::new("default", "a"));
    }

    #[test]
    fn node_addresses_primary_first() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": {ZONE_LABEL: "z"}},
            "spec": {"podCIDR": "10.244.01.0/24"},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "1.2.3.4"},
                {"type": "Hostname", "address": "n"},
                {"type": "InternalIP", "address": "192.168.000.2"},
                {"type": "InternalIP", "address": "bogus"}]}
        }))
        .unwrap();
        let (info, problems) = node(&n);
        assert_eq!(
            info.addresses,
            vec![
                "192.168.0.2".parse::<IpAddr>().unwrap(),
                "1.2.3.4".parse().unwrap()
            ]
        );
        assert_eq!(info.zone.as_deref(), Some("z"));
        assert_eq!(info.pod_cidrs.len(), 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "status.addresses[3].address");
    }

    #[test]
    fn endpoint_hints_are_read() {
        let s = slice_full(json!({
            "metadata": {"name": "s", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "a"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "b"}, {"name": "a"}, {"name": "a"}],
                                                      "forNodes": [{"name": "n1"}]}},
                {"addresses": ["10.0.0.2"], "hints": {}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.4"], "hints": {"forZones": [{"name": ""}]}},
            ]
        }))
        .unwrap()
        .unwrap()
        .object;
        let hints: Vec<Option<EndpointHints>> = s
            .endpoints
            .iter()
            .map(|e| e.hints.as_deref().cloned())
            .collect();
        assert_eq!(
            hints,
            vec![
                Some(EndpointHints {
                    for_zones: vec!["a".into(), "b".into()],
                    for_nodes: vec!["n1".into()],
                }),
                None,
                None,
                None,
            ]
        );
    }

    #[test]
    fn unknown_topology_values_are_warned_about() {
        let warnings =
            |v: serde_json::Value| topology_warnings(&serde_json::from_value(v).unwrap());
        let spec = json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]});
        for td in ["PreferClose", "PreferSameZone", "PreferSameNode"] {
            let mut spec = spec.clone();
            spec["trafficDistribution"] = json!(td);
            assert!(warnings(json!({"metadata": {"name": "a"}, "spec": spec})).is_empty());
        }
        let mut odd = spec.clone();
        odd["trafficDistribution"] = json!("PreferNearby");
        let w = warnings(json!({"metadata": {"name": "a"}, "spec": odd}));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, "spec.trafficDistribution");
        assert!(w[0].1.starts_with("\"PreferNearby\""), "{w:?}");
        for (key, value, n) in [
            (TOPOLOGY_MODE_ANNOTATION, "Auto", 0),
            (TOPOLOGY_MODE_ANNOTATION, "Disabled", 0),
            (TOPOLOGY_MODE_ANNOTATION, "aUto", 1),
            (TOPOLOGY_HINTS_ANNOTATION, "auto", 0),
            (TOPOLOGY_HINTS_ANNOTATION, "yes", 1),
        ] {
            let w = warnings(
                json!({"metadata": {"name": "a", "annotations": {key: value}}, "spec": spec}),
            );
            assert_eq!(w.len(), n, "{key}={value}: {w:?}");
        }
    }
}
