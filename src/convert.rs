//! From Kubernetes API objects (k8s-openapi types) to the proxy's model, validating as we go.
//!
//! This is the only place that reads k8s-openapi types. Every problem is reported as a
//! [`Rejected`] naming the object and the field, and costs only that object: the caller keeps
//! everything else. Objects the proxy deliberately leaves alone (headless and ExternalName
//! Services, Services owned by another proxy, FQDN slices) are not errors: they convert to `None`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, NodeInfo, ObjectRef, Protocol, Service,
    ServicePort, TrafficPolicy,
};

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label by which another proxy claims a Service; svcproxy leaves such Services alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Node label holding the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
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
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
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
        text.trim()
            .parse::<IpAddr>()
            .map_err(|_| self.err(field, format!("{text:?} is not an IP address")))
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

    fn policy(&self, field: &str, value: Option<&str>) -> Result<TrafficPolicy, Rejected> {
        match value {
            None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
            Some("Local") => Ok(TrafficPolicy::Local),
            Some(other) => Err(self.err(
                field,
                format!("unknown traffic policy {other:?} (expected Cluster or Local)"),
            )),
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
pub fn service(svc: &core::Service) -> Result<Option<Service>, Rejected> {
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
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for (i, text) in ip_texts.iter().enumerate() {
        let field = if ip_field == "spec.clusterIPs" {
            format!("{ip_field}[{i}]")
        } else {
            ip_field.to_string()
        };
        let ip = cx.ip(&field, text)?;
        if cluster_ips
            .iter()
            .any(|other| IpFamily::of(other) == IpFamily::of(&ip))
        {
            return Err(cx.err(field, "two cluster IPs of the same family"));
        }
        cluster_ips.push(ip);
    }

    let exposes_node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = cx.protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
        let port = cx.port(format!("spec.ports[{i}].port"), p.port)?;
        let node_port = match p.node_port {
            Some(np) if np != 0 && exposes_node_ports => {
                Some(cx.port(format!("spec.ports[{i}].nodePort"), np)?)
            }
            _ => None,
        };
        let name = p.name.clone().unwrap_or_default();
        if ports
            .iter()
            .any(|q: &ServicePort| q.port == port && q.protocol == protocol)
        {
            return Err(cx.err(
                format!("spec.ports[{i}]"),
                format!("duplicate port {port}/{protocol}"),
            ));
        }
        ports.push(ServicePort {
            name,
            protocol,
            port,
            node_port,
        });
    }
    if ports.is_empty() {
        return Err(cx.err("spec.ports", "no ports"));
    }

    let mut external_ips = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(cx.ip(format!("spec.externalIPs[{i}]"), text)?);
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
                load_balancer_ips
                    .push(cx.ip(format!("status.loadBalancer.ingress[{i}].ip"), text)?);
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
                    return Err(cx.err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range (1-{MAX_AFFINITY_TIMEOUT})"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(cx.err(
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?} (expected None or ClientIP)"),
            ));
        }
    };

    let external_policy = cx.policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    let internal_policy = cx.policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    let health_check_node_port = match spec.health_check_node_port {
        Some(p)
            if p != 0 && svc_type == "LoadBalancer" && external_policy == TrafficPolicy::Local =>
        {
            Some(cx.port("spec.healthCheckNodePort", p)?)
        }
        _ => None,
    };

    Ok(Some(Service {
        id,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        affinity_timeout,
        external_policy,
        internal_policy,
        health_check_node_port,
    }))
}

/// Converts an EndpointSlice. `Ok(None)`: a slice the proxy does not use (FQDN, or no owning
/// Service label).
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<Option<EndpointSlice>, Rejected> {
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

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = cx.protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())?;
        // A port without a number means "all ports", which a proxy cannot use.
        let Some(number) = p.port else { continue };
        let port = cx.port(format!("ports[{i}].port"), number)?;
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let mut first = None;
        for (j, text) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            let addr = cx.ip(&field, text)?;
            if IpFamily::of(&addr) != family {
                return Err(cx.err(
                    field,
                    format!("{addr} is not an {} address", slice.address_type),
                ));
            }
            first.get_or_insert(addr);
        }
        // Consumers use the first address only (the API documents the others as unused).
        let Some(address) = first else {
            return Err(cx.err(format!("endpoints[{i}].addresses"), "empty"));
        };
        let conditions = ep.conditions.as_ref();
        // Absent conditions follow the API's documented defaults: ready unless said otherwise,
        // serving as ready, not terminating.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        endpoints.push(Endpoint {
            address,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone().filter(|n| !n.is_empty()),
            zone: ep.zone.clone().filter(|z| !z.is_empty()),
        });
    }

    Ok(Some(EndpointSlice {
        service: ObjectRef::new(id.namespace.clone(), service_name),
        id,
        family,
        ports,
        endpoints,
    }))
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
            match text.parse::<IpNet>() {
                Ok(net) => info.pod_cidrs.push(net.trunc()),
                Err(_) => problems
                    .push(cx.err(format!("{field}[{i}]"), format!("{text:?} is not a CIDR"))),
            }
        }
    }
    (info, problems)
}

/// Everything converted from a set of API objects.
#[derive(Debug, Default)]
pub struct Converted {
    pub services: BTreeMap<ObjectRef, Arc<Service>>,
    pub slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
    pub nodes: BTreeMap<String, NodeInfo>,
}

impl Converted {
    /// Adds a Service; `Err` names what made it unusable (nothing is added then).
    pub fn add_service(&mut self, svc: &core::Service) -> Result<(), Rejected> {
        if let Some(s) = service(svc)? {
            self.services.insert(s.id.clone(), Arc::new(s));
        }
        Ok(())
    }

    /// Adds an EndpointSlice; `Err` names what made it unusable (nothing is added then).
    pub fn add_slice(&mut self, slice: &discovery::EndpointSlice) -> Result<(), Rejected> {
        if let Some(s) = endpoint_slice(slice)? {
            self.slices.insert(s.id.clone(), Arc::new(s));
        }
        Ok(())
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

    fn svc(v: serde_json::Value) -> Result<Option<Service>, Rejected> {
        service(&serde_json::from_value(v).unwrap())
    }

    fn slice(v: serde_json::Value) -> Result<Option<EndpointSlice>, Rejected> {
        endpoint_slice(&serde_json::from_value(v).unwrap())
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
    fn errors_name_the_field() {
        let e = svc(json!({"metadata": {"name": "a", "namespace": "ns"},
                           "spec": {"clusterIP": "10.0.0.300", "ports": [{"port": 80}]}}))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service ns/a: spec.clusterIP: \"10.0.0.300\" is not an IP address"
        );
        let e = svc(json!({"metadata": {"name": "a"},
                           "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}, {"port": 70000}]}}))
        .unwrap_err();
        assert_eq!(e.field, "spec.ports[1].port");
        let e = svc(json!({"metadata": {"name": "a"},
                           "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80, "protocol": "ICMP"}]}}))
        .unwrap_err();
        assert_eq!(e.field, "spec.ports[0].protocol");
        let e = slice(
            json!({"metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: "a"}},
                             "addressType": "IPX", "endpoints": []}),
        )
        .unwrap_err();
        assert_eq!(e.field, "addressType");
        let e = slice(
            json!({"metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: "a"}},
                             "addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]}),
        )
        .unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]");
    }

    #[test]
    fn slice_condition_defaults() {
        let s = slice(json!({"metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: "a"}},
                             "addressType": "IPv4",
                             "ports": [{"port": 8080}, {"name": "all"}],
                             "endpoints": [{"addresses": ["10.1.0.1"]},
                                           {"addresses": ["10.1.0.2"], "conditions": {"ready": false}}]}))
        .unwrap()
        .unwrap();
        assert_eq!(s.ports.len(), 1, "a port without a number is unusable");
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        assert!(!s.endpoints[1].ready && !s.endpoints[1].serving);
        assert_eq!(s.service, ObjectRef::new("default", "a"));
    }

    #[test]
    fn node_addresses_primary_first() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": {ZONE_LABEL: "z"}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "1.2.3.4"},
                {"type": "Hostname", "address": "n"},
                {"type": "InternalIP", "address": "192.168.0.2"},
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
}
