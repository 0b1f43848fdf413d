//! `svcproxy services`: every frontend this node proxies (address, protocol, port, kind), with
//! its endpoints and their state, its policies and affinity, and what an outside client and a
//! pod get there.
//!
//! The endpoints and their states are the plan's own explanation ([`Tracer::explain`]); what a
//! client gets is [`Tracer::trace`] of a packet from a representative source, so the table
//! says what trace says, and trace says what the rules do.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::model::{IpFamily, Protocol, ProxyConfig, Snapshot, TrafficPolicy};
use crate::plan::{self, Address, EndpointState, FamilyPlan, LocalTraffic, NodePortMatch};
use crate::trace::{Backend, Probe, Query, Target, Tracer, Verdict, state_words};

/// The whole table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub node: String,
    pub frontends: Vec<Frontend>,
}

/// One address, protocol and port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frontend {
    /// The IP, or `node` for a NodePort (every NodePort address of this node).
    pub address: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    pub kind: &'static str,
    pub service: String,
    pub port_name: String,
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
    /// ClientIP session affinity timeout, seconds.
    pub session_affinity: Option<u32>,
    /// loadBalancerSourceRanges (with the LB IPs themselves when the node is inside them).
    pub allowed_sources: Vec<String>,
    pub endpoints: Vec<EndpointState>,
    /// What a new connection from outside the cluster gets (from an allowed source, if the
    /// frontend has source ranges).
    pub outside_client: String,
    /// What a new connection from a pod gets.
    pub pod: String,
}

fn policy(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

/// A source the rules see as outside the cluster: a documentation address, unless it is a pod's.
fn outside_source(fp: &FamilyPlan) -> IpAddr {
    let candidates: [IpAddr; 3] = match fp.family {
        IpFamily::V4 => [
            Ipv4Addr::new(203, 0, 113, 1).into(),
            Ipv4Addr::new(198, 51, 100, 254).into(),
            Ipv4Addr::new(192, 0, 2, 1).into(),
        ],
        IpFamily::V6 => [
            "2001:db8::1".parse::<Ipv6Addr>().unwrap().into(),
            "2001:db8:1::1".parse::<Ipv6Addr>().unwrap().into(),
            "3fff::1".parse::<Ipv6Addr>().unwrap().into(),
        ],
    };
    let is_pod = |ip: &IpAddr| match &fp.local_traffic {
        LocalTraffic::FromCidrs(nets) => nets.iter().any(|n| n.contains(ip)),
        _ => false,
    };
    candidates
        .into_iter()
        .find(|ip| !is_pod(ip))
        .unwrap_or(candidates[0])
}

/// A source the rules see as a pod, and the interface it arrives on; `None`: pods cannot be
/// recognised in this family.
fn pod_source(fp: &FamilyPlan) -> Option<(IpAddr, Option<String>)> {
    match &fp.local_traffic {
        LocalTraffic::Unknown => None,
        LocalTraffic::FromCidrs(nets) => nets
            .first()
            .map(|n| (n.hosts().next().unwrap_or(n.addr()), None)),
        LocalTraffic::FromInterfacePrefix(p) => Some((outside_source(fp), Some(format!("{p}0")))),
        LocalTraffic::FromInterface(b) => Some((outside_source(fp), Some(b.clone()))),
    }
}

fn outcome(v: &Verdict, t: &crate::trace::Trace) -> String {
    match v {
        Verdict::Dnat { endpoints } => {
            let masq = t.endpoints.iter().all(|c| c.masquerade);
            format!(
                "DNAT to 1 of {endpoints}{}",
                if masq {
                    ", masqueraded"
                } else {
                    ", source kept"
                }
            )
        }
        Verdict::Drop { .. } => "dropped".into(),
        Verdict::Reject { with, .. } => format!("rejected ({with})"),
        Verdict::LeftAlone { .. } => "left alone".into(),
    }
}

/// The table for `snapshot` seen from its node.
pub fn services(snapshot: &Snapshot, config: &ProxyConfig) -> Table {
    let plan = plan::plan(snapshot, config);
    table(snapshot, config, &plan)
}

/// The table of `plan` (made from `snapshot` and `config`).
pub fn table(snapshot: &Snapshot, config: &ProxyConfig, plan: &plan::Plan) -> Table {
    let tracer = Tracer::new(snapshot, config, plan);
    let mut frontends = Vec::new();
    for fp in &plan.families {
        // A NodePort is asked at the node's first address that answers NodePorts.
        let nodeport_addr = match &fp.nodeports {
            NodePortMatch::Addresses(ips) => ips.first().copied(),
            NodePortMatch::Nothing => None,
            _ => snapshot.node.addresses.iter().copied().find(|a| {
                IpFamily::of(a) == fp.family
                    && crate::trace::answers_nodeports(fp, &snapshot.node.addresses, *a)
            }),
        };
        for d in &fp.destinations {
            let svc = snapshot.services.get(&d.service);
            let choice = tracer.explain(fp.family, d);
            let dst = match d.address {
                Address::Ip(ip) => Some(ip),
                Address::NodePort => nodeport_addr,
            };
            let ask = |source: IpAddr, iifname: Option<String>| -> String {
                let Some(address) = dst else {
                    return "unknown: no known node address answers NodePorts".into();
                };
                let q = Query {
                    source,
                    target: Target {
                        address,
                        probe: Probe::Port {
                            protocol: d.protocol,
                            port: d.port,
                        },
                    },
                    iifname,
                    backend: Backend::Nftables,
                };
                match tracer.trace(&q) {
                    Ok(t) => outcome(&t.verdict, &t),
                    Err(e) => e.to_string(),
                }
            };
            let outside = d
                .allowed_sources
                .first()
                .map(|n| n.hosts().next().unwrap_or(n.addr()))
                .unwrap_or_else(|| outside_source(fp));
            let pod = match pod_source(fp) {
                Some((ip, iif)) => ask(ip, iif),
                None => {
                    "as an outside client (pods cannot be recognised: no pod CIDR known)".into()
                }
            };
            let (kind, _) = crate::trace::kind_names(d.kind);
            frontends.push(Frontend {
                address: match d.address {
                    Address::Ip(ip) => ip.to_string(),
                    Address::NodePort => match fp.family {
                        IpFamily::V4 => "node".into(),
                        IpFamily::V6 => "node (IPv6)".into(),
                    },
                },
                protocol: d.protocol,
                port: d.port,
                kind,
                service: d.service.to_string(),
                port_name: d.port_name.clone(),
                internal_traffic_policy: svc.map_or("?", |s| policy(s.internal_policy)),
                external_traffic_policy: svc.map_or("?", |s| policy(s.external_policy)),
                session_affinity: svc.and_then(|s| s.affinity_timeout),
                allowed_sources: d.allowed_sources.iter().map(ToString::to_string).collect(),
                endpoints: choice.map(|c| c.endpoints).unwrap_or_default(),
                outside_client: ask(outside, None),
                pod,
            });
        }
    }
    Table {
        node: snapshot.node.name.clone(),
        frontends,
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Services proxied on node {:?}:", self.node)?;
        for fe in &self.frontends {
            let port = if fe.port_name.is_empty() {
                String::new()
            } else {
                format!(" ({})", fe.port_name)
            };
            let addr = if fe.address.contains(':') {
                format!("[{}]", fe.address)
            } else {
                fe.address.clone()
            };
            writeln!(
                f,
                "\n{addr}:{}/{}  {}  {}{port}",
                fe.port, fe.protocol, fe.kind, fe.service
            )?;
            let mut policies = format!(
                "internalTrafficPolicy {}, externalTrafficPolicy {}",
                fe.internal_traffic_policy, fe.external_traffic_policy
            );
            if let Some(t) = fe.session_affinity {
                policies.push_str(&format!(", sessionAffinity ClientIP {t}s"));
            }
            if !fe.allowed_sources.is_empty() {
                policies.push_str(&format!(
                    ", loadBalancerSourceRanges {}",
                    fe.allowed_sources.join(" ")
                ));
            }
            writeln!(f, "  policies: {policies}")?;
            if fe.endpoints.is_empty() {
                writeln!(f, "  endpoints: none")?;
            }
            for e in &fe.endpoints {
                writeln!(
                    f,
                    "  endpoint {:<22} {}{}{}",
                    e.address.to_string(),
                    state_words(e),
                    e.node
                        .as_deref()
                        .map(|n| format!(", node {n}"))
                        .unwrap_or_default(),
                    e.zone
                        .as_deref()
                        .map(|z| format!(", zone {z}"))
                        .unwrap_or_default(),
                )?;
            }
            writeln!(f, "  outside client: {}", fe.outside_client)?;
            writeln!(f, "  pod:            {}", fe.pod)?;
        }
        Ok(())
    }
}
