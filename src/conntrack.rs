//! Stale UDP conntrack entries.
//!
//! NAT is decided on a flow's first packet; conntrack then rewrites every later packet of the
//! flow the same way. For UDP (no connection to end) this means a client that keeps its socket,
//! like a DNS resolver, keeps sending to an endpoint that is gone, or, if its first packets were
//! refused while the Service had no endpoint, keeps sending to the bare ClusterIP. After a sync,
//! svcproxy deletes those entries so that the next datagram is NATed afresh.
//!
//! [`stale_udp`] works out what to delete from two plans (pure); [`Conntrack::flush`] deletes it
//! with the `conntrack` tool (conntrack-tools). The tool, not a netlink crate: deleting by a
//! filter (original destination, DNAT target) is one well-tested command there, whereas the
//! netlink crates available offer no conntrack delete-by-filter and would mean hand-writing the
//! nfnetlink messages; these deletes are rare (a UDP endpoint going away), so a process spawn
//! per delete is cheap enough.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use crate::model::Protocol;
use crate::plan::{Address, Plan, Route};

/// One `conntrack -D` filter: UDP entries whose original destination is `dst`:`port` (any
/// local address for a NodePort) and, when `dnat_to` is set, that were DNATed to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleFlows {
    pub dst: Option<IpAddr>,
    pub port: u16,
    /// `None`: every entry to the destination (it had no endpoint, so none was NATed).
    pub dnat_to: Option<IpAddr>,
}

impl StaleFlows {
    fn args(&self) -> Vec<String> {
        let mut a = vec!["-D".to_string(), "-p".into(), "udp".into()];
        if let Some(dst) = self.dst {
            a.extend(["--orig-dst".into(), dst.to_string()]);
        }
        a.extend(["--orig-port-dst".into(), self.port.to_string()]);
        if let Some(to) = self.dnat_to {
            a.extend(["--dst-nat".into(), to.to_string()]);
        }
        a
    }
}

/// Every endpoint a route may send traffic to.
fn endpoints(route: &Route) -> BTreeSet<SocketAddr> {
    match route {
        Route::Reject | Route::Drop => BTreeSet::new(),
        Route::Internal(b) | Route::ExternalCluster(b) => b.endpoints.iter().copied().collect(),
        Route::ExternalLocal { cluster, local } => cluster
            .endpoints
            .iter()
            .chain(local.iter().flat_map(|l| &l.endpoints))
            .copied()
            .collect(),
    }
}

fn udp_routes(plan: &Plan) -> BTreeMap<(Address, u16), BTreeSet<SocketAddr>> {
    plan.families
        .iter()
        .flat_map(|f| &f.destinations)
        .filter(|d| d.protocol == Protocol::Udp)
        .map(|d| ((d.address, d.port), endpoints(&d.route)))
        .collect()
}

/// The UDP flows that `new` makes stale: those DNATed to an endpoint that is gone, and those to
/// a destination that had no endpoint and now has one.
pub fn stale_udp(old: &Plan, new: &Plan) -> Vec<StaleFlows> {
    let before = udp_routes(old);
    let after = udp_routes(new);
    let mut out = BTreeSet::new();
    for ((address, port), old_eps) in &before {
        let dst = match address {
            Address::Ip(ip) => Some(*ip),
            Address::NodePort => None,
        };
        let new_eps = after.get(&(*address, *port));
        for ep in old_eps {
            if !new_eps.is_some_and(|n| n.contains(ep)) {
                out.insert(StaleFlows {
                    dst,
                    port: *port,
                    dnat_to: Some(ep.ip()),
                });
            }
        }
    }
    for ((address, port), new_eps) in &after {
        let had_none = before
            .get(&(*address, *port))
            .is_none_or(BTreeSet::is_empty);
        if had_none && !new_eps.is_empty() {
            out.insert(StaleFlows {
                dst: match address {
                    Address::Ip(ip) => Some(*ip),
                    Address::NodePort => None,
                },
                port: *port,
                dnat_to: None,
            });
        }
    }
    out.into_iter().collect()
}

/// Why deleting conntrack entries failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`conntrack {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// How to run the `conntrack` tool (tests prefix `ip netns exec NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conntrack {
    pub program: Vec<String>,
}

impl Default for Conntrack {
    fn default() -> Self {
        Conntrack {
            program: vec!["conntrack".into()],
        }
    }
}

impl Conntrack {
    pub fn in_netns(name: &str) -> Self {
        Conntrack {
            program: ["ip", "netns", "exec", name, "conntrack"]
                .map(String::from)
                .to_vec(),
        }
    }

    /// Deletes the entries; returns how many filters ran. Finding no entry is not an error.
    pub fn flush(&self, stale: &[StaleFlows]) -> Result<usize, ConntrackError> {
        let (program, prefix) = self.program.split_first().expect("a program");
        for s in stale {
            let args = s.args();
            let out = Command::new(program)
                .args(prefix)
                .args(&args)
                .output()
                .map_err(|source| ConntrackError::Spawn {
                    program: self.program.join(" "),
                    source,
                })?;
            // conntrack exits 1 when no entry matched ("0 flow entries have been deleted").
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && !stderr.contains("0 flow entries") {
                return Err(ConntrackError::Failed {
                    args: args.join(" "),
                    stderr: stderr.trim().to_string(),
                });
            }
        }
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectRef, ProxyConfig};
    use crate::plan::{Backends, Destination, DestinationKind, FamilyPlan, Scope};

    fn plan_with(route: Route) -> Plan {
        let mut p = crate::plan::plan(&Default::default(), &ProxyConfig::default());
        let fam: &mut FamilyPlan = &mut p.families[0];
        fam.destinations.push(Destination {
            address: Address::Ip("10.96.0.10".parse().unwrap()),
            protocol: Protocol::Udp,
            port: 53,
            kind: DestinationKind::ClusterIp,
            service: ObjectRef::new("kube-system", "kube-dns"),
            port_name: "dns".into(),
            route,
            allowed_sources: vec![],
        });
        p
    }

    fn internal(eps: &[&str]) -> Route {
        Route::Internal(Backends {
            scope: Scope::Cluster,
            endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
            affinity_timeout: None,
        })
    }

    #[test]
    fn removed_endpoint_and_first_endpoint() {
        let old = plan_with(internal(&["10.1.0.1:53", "10.1.0.2:53"]));
        let new = plan_with(internal(&["10.1.0.2:53", "10.1.0.3:53"]));
        assert_eq!(
            stale_udp(&old, &new),
            vec![StaleFlows {
                dst: Some("10.96.0.10".parse().unwrap()),
                port: 53,
                dnat_to: Some("10.1.0.1".parse().unwrap()),
            }]
        );
        let rejected = plan_with(Route::Reject);
        assert_eq!(
            stale_udp(&rejected, &new),
            vec![StaleFlows {
                dst: Some("10.96.0.10".parse().unwrap()),
                port: 53,
                dnat_to: None,
            }]
        );
        assert!(stale_udp(&new, &new).is_empty());
        assert_eq!(
            StaleFlows {
                dst: None,
                port: 30053,
                dnat_to: Some("10.1.0.1".parse().unwrap())
            }
            .args(),
            [
                "-D",
                "-p",
                "udp",
                "--orig-port-dst",
                "30053",
                "--dst-nat",
                "10.1.0.1"
            ]
        );
    }
}
