//! Stale UDP conntrack entries.
//!
//! NAT is decided on a flow's first packet; conntrack then rewrites every later packet of the
//! flow the same way. For UDP (no connection to end) this means a client that keeps its socket,
//! like a DNS resolver, keeps sending to an endpoint that is gone, or, if its first packets were
//! refused while the Service had no endpoint, keeps sending to the bare ClusterIP. After a sync,
//! svcproxy deletes those entries so that the next datagram is NATed afresh.
//!
//! Two halves, as in kube-proxy since 1.32 (which talks netlink, not the `conntrack` tool):
//! - pure: [`stale_udp`] works out from two plans which flows a sync made stale, as filters
//!   ([`StaleFlows`]), and [`StaleFlows::matches`] says whether one kernel entry ([`UdpFlow`])
//!   is one of them;
//! - I/O, thin ([`Conntrack::flush`], in `netlink.rs`): dump the conntrack table of each family
//!   concerned over a netfilter netlink socket, keep the UDP entries some filter matches, and
//!   delete those one by one. That is what `conntrack -D` with a filter does too (the kernel
//!   has no delete-by-filter), minus a process per sync.
//!
//! Every filter names its address family. An entry without an address (a NodePort, which
//! answers on any local address) is still of one family: a dual-stack Service has a NodePort
//! destination in each family's plan, and the two are distinct filters, so that an IPv4 client
//! of a NodePort is moved on as surely as an IPv6 one.
//!
//! Where: conntrack tables are per network namespace. The rules' runner says where the rules go
//! (another namespace, in tests); [`Conntrack::at`] reads the same place, and the socket is then
//! opened in that namespace, on a short-lived thread that enters it
//! (`process::in_namespace`), so that the process's own threads never change namespace.

mod netlink;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::model::{IpFamily, Protocol};
use crate::plan::{Address, Plan, Route};
use crate::process::Place;

/// UDP entries to delete: those of `family` whose original destination is `dst`:`port` (any
/// address for a NodePort) and, when `dnat_to` is set, that were DNATed to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleFlows {
    pub family: IpFamily,
    pub dst: Option<IpAddr>,
    pub port: u16,
    /// `None`: every entry to the destination (it had no endpoint, so none was NATed to one).
    pub dnat_to: Option<IpAddr>,
}

/// What deciding staleness needs of one UDP conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UdpFlow {
    /// The destination the client sent to (a ClusterIP, a node address).
    pub orig_dst: IpAddr,
    pub orig_dst_port: u16,
    /// Who answers: the endpoint, when the flow was DNATed.
    pub reply_src: IpAddr,
    /// Whether the kernel DNATed the flow (`IPS_DST_NAT`).
    pub dnat: bool,
}

impl StaleFlows {
    /// Whether `flow` is one of these. The same test as `conntrack -D -p udp [--orig-dst DST]
    /// --orig-port-dst PORT [--dst-nat TO]` (the `-f` family being ours).
    pub fn matches(&self, flow: &UdpFlow) -> bool {
        IpFamily::of(&flow.orig_dst) == self.family
            && flow.orig_dst_port == self.port
            && self.dst.is_none_or(|d| d == flow.orig_dst)
            && self
                .dnat_to
                .is_none_or(|to| flow.dnat && flow.reply_src == to)
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

/// Each UDP destination of the plan, by family: a NodePort is `Address::NodePort` in both
/// families, so the family must be part of the key.
fn udp_routes(plan: &Plan) -> BTreeMap<(IpFamily, Address, u16), BTreeSet<SocketAddr>> {
    plan.families
        .iter()
        .flat_map(|f| f.destinations.iter().map(move |d| (f.family, d)))
        .filter(|(_, d)| d.protocol == Protocol::Udp)
        .map(|(family, d)| ((family, d.address, d.port), endpoints(&d.route)))
        .collect()
}

/// The UDP flows that `new` makes stale: those DNATed to an endpoint that is gone, and those to
/// a destination that had no endpoint and now has one.
pub fn stale_udp(old: &Plan, new: &Plan) -> Vec<StaleFlows> {
    let before = udp_routes(old);
    let after = udp_routes(new);
    let dst = |address: &Address| match address {
        Address::Ip(ip) => Some(*ip),
        Address::NodePort => None,
    };
    let mut out = BTreeSet::new();
    for (key @ (family, address, port), old_eps) in &before {
        let new_eps = after.get(key);
        for ep in old_eps {
            if !new_eps.is_some_and(|n| n.contains(ep)) {
                out.insert(StaleFlows {
                    family: *family,
                    dst: dst(address),
                    port: *port,
                    dnat_to: Some(ep.ip()),
                });
            }
        }
    }
    for (key @ (family, address, port), new_eps) in &after {
        let had_none = before.get(key).is_none_or(BTreeSet::is_empty);
        if had_none && !new_eps.is_empty() {
            out.insert(StaleFlows {
                family: *family,
                dst: dst(address),
                port: *port,
                dnat_to: None,
            });
        }
    }
    out.into_iter().collect()
}

/// Why listing or deleting conntrack entries failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netfilter netlink socket: {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel refused {what}: {source}")]
    Refused {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected netlink answer: {0}")]
    Protocol(String),
}

/// Where conntrack entries are listed and deleted: this process's network namespace, or a
/// named one (`/run/netns/NAME`, as `ip netns` makes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conntrack {
    netns: Option<PathBuf>,
}

/// What one [`Conntrack::flush`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// UDP entries looked at (of the families concerned).
    pub examined: usize,
    /// Entries deleted (an entry that expired meanwhile is not counted, and not an error).
    pub deleted: usize,
}

impl Conntrack {
    /// The network namespace named `name` (`ip netns add NAME`).
    pub fn in_netns(name: &str) -> Self {
        Conntrack {
            netns: Some(PathBuf::from("/run/netns").join(name)),
        }
    }

    /// The conntrack table where a backend's programs act: this namespace's, the named one's,
    /// or none (an in-memory kernel has no connections to move).
    pub fn at(place: &Place) -> Option<Self> {
        match place {
            Place::Here => Some(Conntrack::default()),
            Place::Netns(name) => Some(Conntrack::in_netns(name)),
            Place::Fake => None,
        }
    }

    /// Deletes the UDP entries that any of `stale` matches. One dump of the table per family
    /// concerned, then one delete per matching entry.
    pub fn flush(&self, stale: &[StaleFlows]) -> Result<Flushed, ConntrackError> {
        let mut done = Flushed::default();
        if stale.is_empty() {
            return Ok(done);
        }
        let mut socket = netlink::Socket::open(self.netns.as_deref())?;
        for family in IpFamily::ALL {
            let filters: Vec<&StaleFlows> = stale.iter().filter(|s| s.family == family).collect();
            if filters.is_empty() {
                continue;
            }
            let (examined, doomed) =
                socket.dump_udp(family, |flow| filters.iter().any(|f| f.matches(flow)))?;
            done.examined += examined;
            done.deleted += socket.delete(family, &doomed)?;
        }
        Ok(done)
    }

    /// The UDP entries of one family (for tests and diagnostics).
    pub fn udp_flows(&self, family: IpFamily) -> Result<Vec<UdpFlow>, ConntrackError> {
        let mut socket = netlink::Socket::open(self.netns.as_deref())?;
        let (_, entries) = socket.dump_udp(family, |_| true)?;
        Ok(entries.into_iter().map(|e| e.flow).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectRef, ProxyConfig};
    use crate::plan::{Backends, Destination, DestinationKind, FamilyPlan, Scope};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn destination(address: Address, port: u16, route: Route) -> Destination {
        Destination {
            address,
            protocol: Protocol::Udp,
            port,
            kind: match address {
                Address::Ip(_) => DestinationKind::ClusterIp,
                Address::NodePort => DestinationKind::NodePort,
            },
            service: ObjectRef::new("kube-system", "kube-dns"),
            port_name: "dns".into(),
            route,
            allowed_sources: vec![],
        }
    }

    /// A plan with these destinations in the IPv4 family and those in the IPv6 one.
    fn plan(v4: Vec<Destination>, v6: Vec<Destination>) -> Plan {
        let mut p = crate::plan::plan(&Default::default(), &ProxyConfig::default());
        for (fam, dests) in [(IpFamily::V4, v4), (IpFamily::V6, v6)] {
            let f: &mut FamilyPlan = p
                .families
                .iter_mut()
                .find(|f| f.family == fam)
                .expect("both families");
            f.destinations = dests;
        }
        p
    }

    fn plan_with(route: Route) -> Plan {
        plan(
            vec![destination(Address::Ip(ip("10.96.0.10")), 53, route)],
            vec![],
        )
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
                family: IpFamily::V4,
                dst: Some(ip("10.96.0.10")),
                port: 53,
                dnat_to: Some(ip("10.1.0.1")),
            }]
        );
        let rejected = plan_with(Route::Reject);
        assert_eq!(
            stale_udp(&rejected, &new),
            vec![StaleFlows {
                family: IpFamily::V4,
                dst: Some(ip("10.96.0.10")),
                port: 53,
                dnat_to: None,
            }]
        );
        assert!(stale_udp(&new, &new).is_empty());
    }

    /// A dual-stack NodePort Service: both families' NodePort flows go stale, each as its own
    /// filter (the IPv6 one used to replace the IPv4 one, leaving IPv4 clients pinned to a
    /// deleted pod).
    #[test]
    fn dual_stack_nodeport_flows_of_both_families() {
        let both = |v4: &[&str], v6: &[&str]| {
            plan(
                vec![destination(Address::NodePort, 30053, internal(v4))],
                vec![destination(Address::NodePort, 30053, internal(v6))],
            )
        };
        let old = both(&["10.1.0.1:53"], &["[fd01::1]:53"]);
        let new = both(&["10.1.0.2:53"], &["[fd01::2]:53"]);
        assert_eq!(
            stale_udp(&old, &new),
            vec![
                StaleFlows {
                    family: IpFamily::V4,
                    dst: None,
                    port: 30053,
                    dnat_to: Some(ip("10.1.0.1")),
                },
                StaleFlows {
                    family: IpFamily::V6,
                    dst: None,
                    port: 30053,
                    dnat_to: Some(ip("fd01::1")),
                },
            ]
        );
        // First endpoints in both families: every NodePort flow of each family goes.
        let none = both(&[], &[]);
        assert_eq!(
            stale_udp(&none, &new),
            [IpFamily::V4, IpFamily::V6].map(|family| StaleFlows {
                family,
                dst: None,
                port: 30053,
                dnat_to: None,
            })
        );
        // IPv6 gains its first endpoint while IPv4 keeps its own: IPv4 flows are left alone.
        let v6_empty = both(&["10.1.0.2:53"], &[]);
        assert_eq!(
            stale_udp(&v6_empty, &new),
            vec![StaleFlows {
                family: IpFamily::V6,
                dst: None,
                port: 30053,
                dnat_to: None,
            }]
        );
    }

    #[test]
    fn a_filter_matches_as_conntrack_delete_does() {
        let flow = |dst: &str, port: u16, reply: &str, dnat: bool| UdpFlow {
            orig_dst: ip(dst),
            orig_dst_port: port,
            reply_src: ip(reply),
            dnat,
        };
        let to_gone = StaleFlows {
            family: IpFamily::V4,
            dst: Some(ip("10.96.0.10")),
            port: 53,
            dnat_to: Some(ip("10.1.0.1")),
        };
        assert!(to_gone.matches(&flow("10.96.0.10", 53, "10.1.0.1", true)));
        assert!(!to_gone.matches(&flow("10.96.0.10", 53, "10.1.0.2", true)));
        assert!(!to_gone.matches(&flow("10.96.0.11", 53, "10.1.0.1", true)));
        assert!(!to_gone.matches(&flow("10.96.0.10", 54, "10.1.0.1", true)));
        assert!(!to_gone.matches(&flow("10.96.0.10", 53, "10.1.0.1", false)));
        let first = StaleFlows {
            dnat_to: None,
            ..to_gone.clone()
        };
        assert!(first.matches(&flow("10.96.0.10", 53, "10.96.0.10", false)));
        assert!(first.matches(&flow("10.96.0.10", 53, "10.1.0.7", true)));
        // A NodePort: any destination address of the family, never the other family.
        let nodeport = StaleFlows {
            family: IpFamily::V4,
            dst: None,
            port: 30053,
            dnat_to: Some(ip("10.1.0.1")),
        };
        assert!(nodeport.matches(&flow("203.0.113.1", 30053, "10.1.0.1", true)));
        assert!(nodeport.matches(&flow("192.168.1.1", 30053, "10.1.0.1", true)));
        assert!(!nodeport.matches(&flow("fd00::1", 30053, "10.1.0.1", true)));
        let nodeport6 = StaleFlows {
            family: IpFamily::V6,
            dst: None,
            port: 30053,
            dnat_to: None,
        };
        assert!(nodeport6.matches(&flow("fd00::1", 30053, "fd00::1", false)));
        assert!(!nodeport6.matches(&flow("203.0.113.1", 30053, "203.0.113.1", false)));
    }

    #[test]
    fn the_namespace_is_where_the_rules_go() {
        assert_eq!(Conntrack::at(&Place::Here), Some(Conntrack::default()));
        assert_eq!(
            Conntrack::at(&Place::Netns("svcp-1".into())),
            Some(Conntrack::in_netns("svcp-1"))
        );
        assert_eq!(
            Conntrack::in_netns("svcp-1").netns.unwrap(),
            PathBuf::from("/run/netns/svcp-1")
        );
        assert_eq!(Conntrack::at(&Place::Fake), None);
    }

    #[test]
    fn nothing_stale_opens_no_socket() {
        // A namespace that does not exist: only opening a socket there could fail.
        let ct = Conntrack::in_netns("svcproxy-test-no-such-namespace");
        assert_eq!(ct.flush(&[]).unwrap(), Flushed::default());
        // With something to delete it does, and says where.
        let stale = StaleFlows {
            family: IpFamily::V4,
            dst: None,
            port: 30053,
            dnat_to: None,
        };
        let e = ct.flush(&[stale]).unwrap_err();
        assert!(matches!(e, ConntrackError::Netns { .. }), "{e:?}");
        assert!(
            e.to_string().contains("svcproxy-test-no-such-namespace"),
            "{e}"
        );
    }
}
