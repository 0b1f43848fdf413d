//! kube-proxy's own packet-flow tables, sent as real packets through svcproxy's rules on every
//! backend (nftables, iptables-legacy, iptables-nft).
//!
//! kube-proxy's nftables tests (`pkg/proxy/nftables/proxier_test.go` in kubernetes/kubernetes)
//! check its ruleset with `runPacketFlowTests`: tables of {name, sourceIP, destIP, destPort,
//! output (the endpoints that may answer, or DROP / REJECT / "" for no rule), masq}. Here each
//! table's Services and EndpointSlices are written as manifests, applied in the node namespace
//! of a [`World`] (tests/common/netns.rs), and each flow is a real TCP or UDP exchange from the
//! right namespace: a pod on this node, the node itself, or the client outside the cluster.
//! What is asserted, flow by flow:
//! - an endpoint list: every answer comes from one of those endpoints (pod and port), all of
//!   them answer within a bounded number of connections, and each answer shows whether the
//!   connection was masqueraded (the endpoint saw an address other than the flow's source) as
//!   the table says;
//! - `DROP`: the connection attempt gets no answer at all; `REJECT`: it is refused (TCP reset,
//!   ICMP port unreachable), within a deadline that is never reached when it works;
//! - `""` (no rule matches): the node's own stack answers; a server listening on the node
//!   says so.
//!
//! The tables keep kube-proxy's names, addresses and outputs; a [`Kp`] per table translates
//! kube-proxy's addresses into this world's. The fixed translations, where kube-proxy's fake
//! node (`NewFakeProxier`) has addresses our world does not:
//! - the node, 192.168.0.2 (alternate 192.168.1.2; IPv6 2001:db8::1, alternate 2001:db8:1::2):
//!   [`NODE_IP`] (alternate [`NODE_IP_TO_REMOTE`]; [`NODE_IP6`], [`NODE_IP6_TO_REMOTE`]);
//! - the external client 203.0.113.2 is ours too ([`CLIENT_IP`]); the blocked one,
//!   203.0.113.130, is a second address of the client namespace, used through a source route;
//!   the IPv6 client 2600:5200::1 is [`CLIENT_IP6`];
//! - load-balancer IPs 1.2.3.4, 5.6.7.8, 9.10.11.12 are 198.51.100.4, .8, .12 (documentation
//!   addresses, as everywhere in these tests); the external IP 192.168.99.11 (one of the fake
//!   node's own addresses) is 198.51.100.11;
//! - pod sources (10.0.0.2, 10.180.0.2) are a pod `c` on this node; endpoint addresses are
//!   pods on this node when kube-proxy's endpoint has this node's `nodeName` and on the remote
//!   node otherwise (with kube-proxy's `nodeName`, or none, as written);
//! - ClusterIPs (172.30.0.0/16) and ports are kube-proxy's; its Service CIDR, 172.30.0.0/16,
//!   is given with `--service-cidr`, as the fake proxier has it.
//!
//! Flows this world cannot send are counted and printed, never silently passed: SCTP (the
//! kernel of the machines these tests run on has no SCTP: `socket(…, IPPROTO_SCTP)` fails with
//! EPROTONOSUPPORT; the test servers speak TCP and UDP).
//!
//! The tables are kube-proxy's nftables mode's, and svcproxy's iptables mode is held to them
//! as well: where kube-proxy's own iptables mode behaves otherwise, svcproxy differs from it on
//! purpose (README, "What differs from kube-proxy": a port a ClusterIP lacks is refused, an
//! unallocated ClusterIP is dropped, in both modes). No flow of these tables differs from
//! kube-proxy on any backend; a flow that did would be marked `DIVERGENCE:` here.

mod common;

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::netns::*;
use common::proxy::*;
use svcproxy::iptables::Variant;

on_every_backend!(
    no_endpoints_reject,
    cluster_ip_general,
    load_balancer,
    node_ports,
    external_traffic_policy_local,
    external_traffic_policy_cluster,
    internal_traffic_policy,
    terminating_endpoints_traffic_policy_local,
    terminating_endpoints_traffic_policy_cluster,
    internal_external_masquerade,
    categorize_endpoints,
);

/// kube-proxy's fake proxier's Service CIDR.
const SERVICE_CIDR: &[&str] = &["--service-cidr", "172.30.0.0/16"];

/// The blocked external client of kube-proxy's tables, a second address of our client.
const BLOCKED_CLIENT: &str = "203.0.113.130";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
}

/// One row of a kube-proxy packet-flow table, in kube-proxy's addresses.
#[derive(Debug, Clone)]
struct Flow {
    name: String,
    proto: Proto,
    from: String,
    to: String,
    port: u16,
    /// kube-proxy's `output`: "ip:port, ip:port", "DROP", "REJECT", or "" (no rule).
    output: String,
    masq: bool,
}

/// A TCP flow, as kube-proxy writes them.
fn flow(name: &str, from: &str, to: &str, port: u16, output: &str, masq: bool) -> Flow {
    Flow {
        name: name.into(),
        proto: Proto::Tcp,
        from: from.into(),
        to: to.into(),
        port,
        output: output.into(),
        masq,
    }
}

impl Flow {
    fn proto(mut self, proto: Proto) -> Flow {
        self.proto = proto;
        self
    }
}

/// Where a flow is sent from: the namespace, and the source address an endpoint sees when the
/// flow is not masqueraded.
#[derive(Debug, Clone)]
struct Src {
    ns: String,
    ip: IpAddr,
    /// The address is a secondary one of the client: sent through a source route.
    routed: bool,
}

/// A route in the client namespace sending to one destination from the blocked client's
/// address; removed when dropped.
struct SourceRoute {
    ns: String,
    dst: IpAddr,
}

impl SourceRoute {
    fn to(src: &Src, dst: IpAddr) -> Option<SourceRoute> {
        if !src.routed {
            return None;
        }
        let (dst_s, src_s) = (format!("{dst}/32"), src.ip.to_string());
        let mut args = vec!["ip", "-n", &src.ns, "route", "replace", &dst_s];
        if dst.to_string() == NODE_IP {
            args.extend(["dev", "eth0"]);
        } else {
            args.extend(["via", NODE_IP]);
        }
        args.extend(["src", &src_s]);
        sh(&args);
        Some(SourceRoute {
            ns: src.ns.clone(),
            dst,
        })
    }
}

impl Drop for SourceRoute {
    fn drop(&mut self) {
        // Not `sh`: a panic while a failed flow unwinds would abort the test run.
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.ns, "route", "del", &format!("{}/32", self.dst)])
            .status();
    }
}

/// A table's translation from kube-proxy's addresses to this world's.
struct Kp {
    sources: Vec<(String, Src)>,
    addrs: Vec<(String, IpAddr)>,
    /// Pods that may answer, by name, for telling which endpoint (address and port) answered.
    pods: Vec<Pod>,
}

impl Kp {
    /// The fixed translations (module doc): the node, the clients, LB and external IPs.
    fn new(p: &Proxy) -> Kp {
        let src = |ns: &str, ip: &str, routed| Src {
            ns: ns.to_string(),
            ip: ip.parse().unwrap(),
            routed,
        };
        let sources = vec![
            ("192.168.0.2", src(&p.w.node, NODE_IP, false)),
            ("2001:db8::1", src(&p.w.node, NODE_IP6, false)),
            ("203.0.113.2", src(&p.w.client, CLIENT_IP, false)),
            ("203.0.113.130", src(&p.w.client, BLOCKED_CLIENT, true)),
            ("2600:5200::1", src(&p.w.client, CLIENT_IP6, false)),
        ];
        let addrs = [
            ("192.168.0.2", NODE_IP),
            ("192.168.1.2", NODE_IP_TO_REMOTE),
            ("2001:db8::1", NODE_IP6),
            ("2001:db8:1::2", NODE_IP6_TO_REMOTE),
            ("1.2.3.4", "198.51.100.4"),
            ("5.6.7.8", "198.51.100.8"),
            ("9.10.11.12", "198.51.100.12"),
            ("192.168.99.11", "198.51.100.11"),
        ];
        Kp {
            sources: sources
                .into_iter()
                .map(|(k, s)| (k.to_string(), s))
                .collect(),
            addrs: addrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
                .collect(),
            pods: Vec::new(),
        }
    }

    /// kube-proxy's pod address `kp` is `pod` (its IPv4 or IPv6 address, as `kp` is), as a
    /// source and as an endpoint.
    fn pod(mut self, kp: &str, pod: &Pod) -> Kp {
        let ip = if kp.contains(':') { pod.ip6 } else { pod.ip };
        self.sources.push((
            kp.to_string(),
            Src {
                ns: pod.ns.clone(),
                ip,
                routed: false,
            },
        ));
        self.addrs.push((kp.to_string(), ip));
        if !self.pods.iter().any(|p| p.name == pod.name) {
            self.pods.push(pod.clone());
        }
        self
    }

    /// kube-proxy's address `kp` is `ours` (a Service address of this table).
    fn addr(mut self, kp: &str, ours: &str) -> Kp {
        self.addrs.retain(|(k, _)| k != kp);
        self.addrs.push((kp.to_string(), ours.parse().unwrap()));
        self
    }

    /// A source that is not in kube-proxy's fixed list (the LB IP held by the node).
    fn source(mut self, kp: &str, ns: &str, ours: &str) -> Kp {
        self.sources.push((
            kp.to_string(),
            Src {
                ns: ns.to_string(),
                ip: ours.parse().unwrap(),
                routed: false,
            },
        ));
        self
    }

    fn src(&self, kp: &str) -> &Src {
        self.sources
            .iter()
            .rev()
            .find(|(k, _)| k == kp)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no source for kube-proxy's {kp}"))
    }

    fn ip(&self, kp: &str) -> IpAddr {
        self.addrs
            .iter()
            .rev()
            .find(|(k, _)| k == kp)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| kp.parse().unwrap())
    }

    /// kube-proxy's endpoint list, in this world's addresses.
    fn endpoints(&self, output: &str) -> BTreeSet<SocketAddr> {
        output
            .split(", ")
            .map(|e| {
                let e: SocketAddr = e.parse().unwrap_or_else(|_| panic!("endpoint {e:?}"));
                SocketAddr::new(self.ip(&e.ip().to_string()), e.port())
            })
            .collect()
    }

    /// The endpoint that answered: the pod's address of the flow's family, and the port.
    fn answered(&self, r: &Reply, v6: bool) -> Option<SocketAddr> {
        let pod = self.pods.iter().find(|p| p.name == r.pod)?;
        Some(SocketAddr::new(if v6 { pod.ip6 } else { pod.ip }, r.port))
    }
}

/// One attempt of `proto` from `src` to `to`, answered within `timeout` or not.
fn probe(src: &Src, to: SocketAddr, proto: Proto, timeout: Duration) -> io::Result<Reply> {
    let _route = SourceRoute::to(src, to.ip());
    match proto {
        Proto::Tcp => tcp(&src.ns, to, timeout),
        Proto::Udp => {
            // Connected, so that an ICMP port unreachable comes back as an error.
            let sock = udp_socket(&src.ns);
            sock.set_read_timeout(Some(timeout))?;
            sock.connect(to)?;
            udp_ask(&sock, to)
        }
        Proto::Sctp => unreachable!("SCTP flows are not sent"),
    }
}

/// Connections per flow: at least `MIN` (so that an endpoint that must not answer has had its
/// chances), and until every expected endpoint answered, at most `MAX` (missing one of three
/// equally likely endpoints in 80 tries: 3 × (2/3)^80 ≈ 2e-14).
const MIN: usize = 20;
const MAX: usize = 80;

/// Sends one flow and compares what happened with kube-proxy's output.
fn check(kp: &Kp, f: &Flow) -> Result<(), String> {
    let src = kp.src(&f.from);
    let to = SocketAddr::new(kp.ip(&f.to), f.port);
    let what = format!("{:?} {} ({}) -> {to}", f.proto, src.ip, src.ns);
    match f.output.as_str() {
        "DROP" => {
            let dropped_here = match f.proto {
                Proto::Tcp => {
                    let _route = SourceRoute::to(src, to.ip());
                    dropped(&src.ns, to)
                }
                _ => probe(src, to, f.proto, Duration::from_millis(700)).is_err_and(|e| {
                    matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    )
                }),
            };
            if dropped_here {
                Ok(())
            } else {
                let got = probe(src, to, f.proto, T);
                Err(format!("{what}: expected DROP, got {got:?}"))
            }
        }
        "REJECT" => match probe(src, to, f.proto, Duration::from_secs(20)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
            got => Err(format!("{what}: expected REJECT, got {got:?}")),
        },
        // No rule: the packet reaches the node's own stack, where a server answers as "node".
        "" => match probe(src, to, f.proto, T) {
            Ok(r) if r.pod == "node" => Ok(()),
            got => Err(format!("{what}: expected the node itself, got {got:?}")),
        },
        output => {
            let want = kp.endpoints(output);
            let mut seen = BTreeSet::new();
            for n in 1..=MAX {
                let r = probe(src, to, f.proto, T).map_err(|e| format!("{what}: {e}"))?;
                let Some(ep) = kp.answered(&r, to.is_ipv6()) else {
                    return Err(format!("{what}: answered by {r:?}, not an endpoint"));
                };
                if !want.contains(&ep) {
                    return Err(format!(
                        "{what}: answered by {ep} ({}), want {want:?}",
                        r.pod
                    ));
                }
                if (r.peer != src.ip) != f.masq {
                    return Err(format!(
                        "{what}: {ep} saw {}: masq should be {}",
                        r.peer, f.masq
                    ));
                }
                seen.insert(ep);
                if n >= MIN && seen == want {
                    return Ok(());
                }
            }
            Err(format!("{what}: only {seen:?} of {want:?} answered"))
        }
    }
}

/// What `svcproxy trace` predicts for a flow, on the inputs last applied, compared with
/// kube-proxy's output for it: the same verdict, the same endpoints, masqueraded or not. Pure
/// (no packet), so it covers the flows this world cannot send (SCTP) too.
fn trace_agrees(p: &Proxy, kp: &Kp, f: &Flow) -> Result<(), String> {
    use svcproxy::trace::{Backend, Query, Verdict};
    let (snapshot, config) = p.applied.as_ref().expect("something applied");
    let src = kp.src(&f.from);
    let to = SocketAddr::new(kp.ip(&f.to), f.port);
    let proto = match f.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Sctp => "sctp",
    };
    let q = Query {
        source: src.ip,
        target: format!("{to}/{proto}")
            .parse()
            .map_err(|e| format!("{e:?}"))?,
        iifname: None,
        backend: match p.mode {
            Mode::Nftables => Backend::Nftables,
            Mode::Iptables(_) => Backend::Iptables,
        },
    };
    let t = svcproxy::trace::trace_snapshot(snapshot, config, &q).map_err(|e| e.to_string())?;
    let what = format!("trace {} -> {to}/{proto}", src.ip);
    let ok = match (f.output.as_str(), &t.verdict) {
        ("DROP", Verdict::Drop { .. })
        | ("REJECT", Verdict::Reject { .. })
        | ("", Verdict::LeftAlone { .. }) => true,
        ("DROP" | "REJECT" | "", _) => false,
        (output, Verdict::Dnat { .. }) => {
            let want = kp.endpoints(output);
            let got: BTreeSet<SocketAddr> = t.endpoints.iter().map(|c| c.state.address).collect();
            // The node's own connections are masqueraded or not by the source address the
            // kernel picks; the packet tests compare what the endpoint saw.
            let node = src.ip.to_string() == NODE_IP || src.ip.to_string() == NODE_IP6;
            got == want && (node || t.endpoints.iter().all(|c| c.masquerade == f.masq))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what}: kube-proxy's table says {:?} (masq {}), trace says:\n{t}",
            f.output, f.masq
        ))
    }
}

/// Sends every flow of a table; fails with every flow that differs from kube-proxy, in real
/// packets or in `svcproxy trace`'s prediction.
fn run_flows(p: &Proxy, kp: &Kp, table: &str, flows: &[Flow]) {
    let (mut failures, mut not_sent) = (Vec::new(), Vec::new());
    for f in flows {
        if let Err(e) = trace_agrees(p, kp, f) {
            failures.push(format!("  {}: {e}", f.name));
        }
        if f.proto == Proto::Sctp {
            not_sent.push(f.name.as_str());
            continue;
        }
        if let Err(e) = check(kp, f) {
            failures.push(format!("  {}: {e}", f.name));
        }
    }
    println!(
        "{table} ({:?}): {} flows sent",
        p.mode,
        flows.len() - not_sent.len()
    );
    if !not_sent.is_empty() {
        println!(
            "{table} ({:?}): {} flows not sent (SCTP: no SCTP in this kernel): {not_sent:?}",
            p.mode,
            not_sent.len()
        );
    }
    assert!(
        failures.is_empty(),
        "{table} ({:?}): {} of {} flows differ from kube-proxy:\n{}",
        p.mode,
        failures.len(),
        flows.len(),
        failures.join("\n")
    );
}

/// One endpoint of an EndpointSlice: its address, its `nodeName` (unset when `None`), and
/// further fields in YAML flow form (`conditions: …, hints: …`), or "".
fn ep(addr: IpAddr, node: Option<&str>, more: &str) -> String {
    let mut fields = vec![format!("addresses: ['{addr}']")];
    if let Some(node) = node {
        fields.push(format!("nodeName: {node}"));
    }
    if !more.is_empty() {
        fields.push(more.to_string());
    }
    format!("{{{}}}", fields.join(", "))
}

/// An EndpointSlice of `service` (in namespace default, as [`svc`] writes Services): address
/// type, ports and endpoints in YAML flow form.
fn eps(name: &str, service: &str, family: &str, ports: &str, endpoints: &[String]) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: {ports}\nendpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// This node's Node object with the given labels (YAML flow form, "" for none).
fn node(labels: &str) -> String {
    format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{{labels}}}}}\n")
}

/// Pods that serve `ports` (TCP and UDP), on this node or the remote one.
fn serving(p: &mut Proxy, names: &[(&str, bool)], ports: &[u16]) -> Vec<Pod> {
    names
        .iter()
        .map(|&(name, remote)| {
            let pod = p.w.pod(name, remote);
            for &port in ports {
                p.w.serve(&pod, port);
            }
            pod
        })
        .collect()
}

const P80: &str = "[{name: p80, port: 80, protocol: TCP}]";

// ---------------------------------------------------------------------------------------------
// TestNoEndpointsReject (pkg/proxy/nftables/proxier_test.go): a Service with no endpoints
// rejects connections to its ClusterIP, external IP, NodePort and LB IP.
fn no_endpoints_reject(mut p: Proxy) {
    let c = p.w.pod("c", false);
    let yaml = svc(
        "svc1",
        "{type: LoadBalancer, clusterIP: 172.30.0.41, externalIPs: [198.51.100.11], ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.4}]}}",
    );
    p.apply_with(&yaml, SERVICE_CIDR);
    let kp = Kp::new(&p).pod("10.0.0.2", &c);
    let (ip, np) = ("172.30.0.41", 3001);
    #[rustfmt::skip]
    let flows = [
        flow("pod to cluster IP with no endpoints", "10.0.0.2", ip, 80, "REJECT", false),
        flow("external to external IP with no endpoints", "203.0.113.2", "192.168.99.11", 80, "REJECT", false),
        flow("pod to NodePort with no endpoints", "10.0.0.2", "192.168.0.2", np, "REJECT", false),
        flow("external to NodePort with no endpoints", "203.0.113.2", "192.168.0.2", np, "REJECT", false),
        flow("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT", false),
        flow("external to LoadBalancer IP with no endpoints", "203.0.113.2", "1.2.3.4", 80, "REJECT", false),
    ];
    run_flows(&p, &kp, "TestNoEndpointsReject", &flows);
}

// TestClusterIPGeneral (pkg/proxy/nftables/proxier_test.go): ports, target ports, protocols on
// one port number, hairpin, ports a Service lacks, an unallocated ClusterIP.
fn cluster_ip_general(mut p: Proxy) {
    let pods = serving(
        &mut p,
        &[("a1", false), ("b1", true)],
        &[80, 8443, 53, 5353],
    );
    let (a1, b1) = (&pods[0], &pods[1]);
    let c = p.w.pod("c", false);
    let svc2_ports = "[{name: http, port: 80, protocol: TCP}, {name: https, port: 443, protocol: TCP, targetPort: 8443}, {name: dns-udp, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}, {name: dns-sctp, port: 53, protocol: SCTP}]";
    let svc2_slice_ports = "[{name: http, port: 80, protocol: TCP}, {name: https, port: 8443, protocol: TCP}, {name: dns-udp, port: 53, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}, {name: dns-sctp, port: 53, protocol: SCTP}]";
    let yaml = svc(
        "svc1",
        "{clusterIP: 172.30.0.41, ports: [{name: http, port: 80, protocol: TCP}]}",
    ) + &eps(
        "svc1-1",
        "svc1",
        "IPv4",
        "[{name: http, port: 80, protocol: TCP}]",
        &[ep(a1.ip, Some("node-a"), "")],
    ) + &svc(
        "svc2",
        &format!("{{clusterIP: 172.30.0.42, ports: {svc2_ports}}}"),
    ) + &eps(
        "svc2-1",
        "svc2",
        "IPv4",
        svc2_slice_ports,
        &[ep(a1.ip, Some("node-a"), ""), ep(b1.ip, Some("node2"), "")],
    );
    p.apply_with(&yaml, SERVICE_CIDR);
    let kp = Kp::new(&p)
        .pod("10.180.0.1", a1)
        .pod("10.180.2.1", b1)
        .pod("10.180.0.2", &c);
    #[rustfmt::skip]
    let flows = [
        flow("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", false),
        flow("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", true),
        flow("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", false),
        flow("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", false),
        flow("clusterIP with TCP, UDP, and SCTP on same port (TCP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", false)
            .proto(Proto::Tcp),
        // (kube-proxy names this UDP flow "(TCP)" too.)
        flow("clusterIP with TCP, UDP, and SCTP on same port (TCP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", false)
            .proto(Proto::Udp),
        flow("clusterIP with TCP, UDP, and SCTP on same port (SCTP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", false)
            .proto(Proto::Sctp),
        flow("TCP-only port does not match UDP traffic", "10.180.0.2", "172.30.0.42", 80, "REJECT", false)
            .proto(Proto::Udp),
        flow("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "REJECT", false),
        flow("packet to unallocated cluster ip", "10.180.0.2", "172.30.0.50", 80, "DROP", false),
    ];
    run_flows(&p, &kp, "TestClusterIPGeneral", &flows);
}

// TestLoadBalancer (pkg/proxy/nftables/proxier_test.go): loadBalancerSourceRanges. kube-proxy's
// ranges are the node's subnet 192.168.0.0/24 and " 203.0.113.0/25" (with its whitespace); our
// node and clients share 203.0.113.0/24, so the node's subnet becomes the node's own address,
// 203.0.113.1/32 (the point of that range: the node's IP is inside the ranges).
fn load_balancer(mut p: Proxy) {
    // kube-proxy's endpoint 10.180.0.1 has no nodeName: a pod on the remote node.
    let pods = serving(&mut p, &[("b1", true)], &[80]);
    let c = p.w.pod("c", false);
    sh(&[
        "ip",
        "-n",
        &p.w.client,
        "addr",
        "add",
        &format!("{BLOCKED_CLIENT}/24"),
        "dev",
        "eth0",
    ]);
    let yaml = svc(
        "svc1",
        "{type: LoadBalancer, clusterIP: 172.30.0.41, loadBalancerSourceRanges: ['203.0.113.1/32', ' 203.0.113.0/25'], ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.4}, {ip: 198.51.100.8}]}}",
    ) + &eps("svc1-1", "svc1", "IPv4", P80, &[ep(pods[0].ip, None, "")]);
    p.apply_with(&yaml, SERVICE_CIDR);
    let kp = Kp::new(&p)
        .pod("10.180.0.1", &pods[0])
        .pod("10.0.0.2", &c)
        // "same node to LB, SNATted to LB": the node's connection comes from the LB IP it holds.
        .source("1.2.3.4", &p.w.node, "198.51.100.4")
        .source("5.6.7.8", &p.w.node, "198.51.100.8");
    let ep = "10.180.0.1:80";
    #[rustfmt::skip]
    let flows = [
        flow("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, ep, false),
        flow("external to nodePort", "203.0.113.2", "192.168.0.2", 3001, ep, true),
        flow("nodePort bypasses LoadBalancerSourceRanges", "203.0.113.130", "192.168.0.2", 3001, ep, true),
        flow("accepted external to LB1", "203.0.113.2", "1.2.3.4", 80, ep, true),
        flow("accepted external to LB2", "203.0.113.2", "5.6.7.8", 80, ep, true),
        flow("blocked external to LB1", "203.0.113.130", "1.2.3.4", 80, "DROP", false),
        flow("blocked external to LB2", "203.0.113.130", "5.6.7.8", 80, "DROP", false),
        flow("pod to LB1 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "1.2.3.4", 80, "DROP", false),
        flow("pod to LB2 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "5.6.7.8", 80, "DROP", false),
        flow("node to LB1 (allowed by LoadBalancerSourceRanges)", "192.168.0.2", "1.2.3.4", 80, ep, true),
        flow("node to LB2 (allowed by LoadBalancerSourceRanges)", "192.168.0.2", "5.6.7.8", 80, ep, true),
    ];
    run_flows(&p, &kp, "TestLoadBalancer", &flows);
    // kube-proxy assumes something outside it makes the node's connections to a LB IP come
    // from that IP: here the node holds the LB IPs, so its connections to them do.
    for lb in ["198.51.100.4/32", "198.51.100.8/32"] {
        p.node_sh(&["ip", "addr", "add", lb, "dev", "lo"]);
    }
    #[rustfmt::skip]
    let flows = [
        flow("same node to LB1, SNATted to LB1 (implicitly allowed)", "1.2.3.4", "1.2.3.4", 80, ep, true),
        flow("same node to LB2, SNATted to LB2 (implicitly allowed)", "5.6.7.8", "5.6.7.8", 80, ep, true),
    ];
    run_flows(&p, &kp, "TestLoadBalancer", &flows);
}

// TestNodePorts (pkg/proxy/nftables/proxier_test.go): its four cases, IPv4 and IPv6 with the
// fake proxier's nodePortAddresses (the node's IP of each family: 192.168.0.2/32 and
// 2001:db8::1/128) and with several CIDRs, which take in the node's alternate IPs. kube-proxy
// runs one proxier per family; one dual-stack Service here carries both families' cases.
// "secondary nodeIP ignores NodePorts" (no rule): the node's own server on port 3001 answers.
fn node_ports(mut p: Proxy) {
    let pods = serving(&mut p, &[("a1", false), ("b1", true)], &[80]);
    let (a1, b1) = (&pods[0], &pods[1]);
    let c = p.w.pod("c", false);
    let host = Pod {
        name: "node".into(),
        ns: p.w.node.clone(),
        ip: NODE_IP.parse().unwrap(),
        ip6: NODE_IP6.parse().unwrap(),
        node: "node-a",
    };
    p.w.serve(&host, 3001);
    let slice = |v6: bool| {
        let addr = |pod: &Pod| if v6 { pod.ip6 } else { pod.ip };
        eps(
            if v6 { "svc1-v6" } else { "svc1-v4" },
            "svc1",
            if v6 { "IPv6" } else { "IPv4" },
            P80,
            &[ep(addr(b1), None, ""), ep(addr(a1), Some("node-a"), "")],
        )
    };
    let yaml = svc(
        "svc1",
        "{type: NodePort, clusterIP: 172.30.0.41, clusterIPs: [172.30.0.41, 'fd00:172:30::41'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]}",
    ) + &slice(false)
        + &slice(true);
    let kp = Kp::new(&p)
        .pod("10.180.0.1", b1)
        .pod("10.180.2.1", a1)
        .pod("fd00:10:180::1", b1)
        .pod("fd00:10:180::2:1", a1)
        .pod("10.0.0.2", &c)
        .pod("fd00:10::2", &c);
    // (nodePortAddresses, allowAltNodeIP), kube-proxy's addresses in comments.
    let cases = [
        // nil: the fake's 192.168.0.2/32 and 2001:db8::1/128.
        ("203.0.113.1/32,fd00:203::1/128", false),
        // 192.168.0.0/24, 192.168.1.0/24, 2001:db8::/64 (and 2001:db8:1::2/128 for IPv6).
        (
            "203.0.113.0/24,192.168.100.0/24,fd00:203::/64,fd00:100::1/128",
            true,
        ),
    ];
    for (addresses, alt) in cases {
        // Every node address (the alternate ones and IPv6 too), so that `svcproxy trace`, which
        // knows the node's addresses from the Node or --node-ip where the kernel has its own
        // list, sees them; the primary address stays first.
        let node_ips = format!("{NODE_IP6},{NODE_IP_TO_REMOTE},{NODE_IP6_TO_REMOTE}");
        let flags = [
            SERVICE_CIDR[0],
            SERVICE_CIDR[1],
            "--cluster-cidr",
            "fd01:244::/32",
            "--nodeport-addresses",
            addresses,
            "--node-ip",
            &node_ips,
        ];
        p.apply_with(&yaml, &flags);
        for v6 in [false, true] {
            let (svc_ip, ep1, ep2, node_ip, pod_ip, client, alt_ip) = if v6 {
                (
                    "fd00:172:30::41",
                    "fd00:10:180::1",
                    "fd00:10:180::2:1",
                    "2001:db8::1",
                    "fd00:10::2",
                    "2600:5200::1",
                    "2001:db8:1::2",
                )
            } else {
                (
                    "172.30.0.41",
                    "10.180.0.1",
                    "10.180.2.1",
                    "192.168.0.2",
                    "10.0.0.2",
                    "203.0.113.2",
                    "192.168.1.2",
                )
            };
            let j = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 80).to_string();
            let output = format!("{}, {}", j(ep1), j(ep2));
            let mut flows = vec![
                flow("pod to cluster IP", pod_ip, svc_ip, 80, &output, false),
                flow("external to nodePort", client, node_ip, 3001, &output, true),
                flow("node to nodePort", node_ip, node_ip, 3001, &output, true),
            ];
            flows.push(if alt {
                flow(
                    "external to nodePort on secondary IP",
                    client,
                    alt_ip,
                    3001,
                    &output,
                    true,
                )
            } else {
                flow(
                    "secondary nodeIP ignores NodePorts",
                    client,
                    alt_ip,
                    3001,
                    "",
                    false,
                )
            });
            let case = match (v6, alt) {
                (false, false) => "ipv4",
                (false, true) => "ipv4, multiple nodeport-addresses",
                (true, false) => "ipv6",
                (true, true) => "ipv6, multiple nodeport-addresses",
            };
            run_flows(&p, &kp, &format!("TestNodePorts/{case}"), &flows);
        }
    }
}

/// The Service of TestExternalTrafficPolicyLocal and …Cluster: a LoadBalancer with an external
/// IP, and endpoints 10.180.0.1 (no nodeName: on the remote node here) and 10.180.2.1 (on this
/// node). Sends the table.
fn external_traffic_policy(mut p: Proxy, policy: &str, table: &str, flows: &[Flow]) {
    let pods = serving(&mut p, &[("a1", false), ("b1", true)], &[80]);
    let (a1, b1) = (&pods[0], &pods[1]);
    let c = p.w.pod("c", false);
    let hc = if policy == "Local" {
        ", healthCheckNodePort: 30000"
    } else {
        ""
    };
    let yaml = svc(
        "svc1",
        &format!(
            "{{type: LoadBalancer, externalTrafficPolicy: {policy}, clusterIP: 172.30.0.41, externalIPs: [198.51.100.11], ports: [{{name: p80, port: 80, protocol: TCP, nodePort: 3001, targetPort: 80}}]{hc}}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.51.100.4}}]}}}}"
        ),
    ) + &eps(
        "svc1-1",
        "svc1",
        "IPv4",
        P80,
        &[ep(b1.ip, None, ""), ep(a1.ip, Some("node-a"), "")],
    );
    p.apply_with(&yaml, SERVICE_CIDR);
    let kp = Kp::new(&p)
        .pod("10.180.0.1", b1)
        .pod("10.180.2.1", a1)
        .pod("10.0.0.2", &c);
    run_flows(&p, &kp, table, flows);
}

// TestExternalTrafficPolicyLocal (pkg/proxy/nftables/proxier_test.go).
fn external_traffic_policy_local(p: Proxy) {
    let both = "10.180.0.1:80, 10.180.2.1:80";
    let local = "10.180.2.1:80";
    let (svc_ip, ext_ip, lb_ip, node_ip, np) = (
        "172.30.0.41",
        "192.168.99.11",
        "1.2.3.4",
        "192.168.0.2",
        3001,
    );
    #[rustfmt::skip]
    let flows = [
        flow("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", svc_ip, 80, both, false),
        flow("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", ext_ip, 80, both, false),
        flow("external to external IP hits only local endpoint, unmasqueraded", "203.0.113.2", ext_ip, 80, local, false),
        flow("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", lb_ip, 80, both, false),
        flow("external to LB IP hits only local endpoint, unmasqueraded", "203.0.113.2", lb_ip, 80, local, false),
        flow("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", node_ip, np, both, false),
        flow("external to NodePort hits only local endpoint, unmasqueraded", "203.0.113.2", node_ip, np, local, false),
    ];
    external_traffic_policy(p, "Local", "TestExternalTrafficPolicyLocal", &flows);
}

// TestExternalTrafficPolicyCluster (pkg/proxy/nftables/proxier_test.go).
fn external_traffic_policy_cluster(p: Proxy) {
    let both = "10.180.0.1:80, 10.180.2.1:80";
    let (svc_ip, ext_ip, lb_ip, node_ip, np) = (
        "172.30.0.41",
        "192.168.99.11",
        "1.2.3.4",
        "192.168.0.2",
        3001,
    );
    #[rustfmt::skip]
    let flows = [
        flow("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", svc_ip, 80, both, false),
        flow("pod to external IP hits both endpoints, masqueraded", "10.0.0.2", ext_ip, 80, both, true),
        flow("external to external IP hits both endpoints, masqueraded", "203.0.113.2", ext_ip, 80, both, true),
        flow("pod to LB IP hits both endpoints, masqueraded", "10.0.0.2", lb_ip, 80, both, true),
        flow("external to LB IP hits both endpoints, masqueraded", "203.0.113.2", lb_ip, 80, both, true),
        flow("pod to NodePort hits both endpoints, masqueraded", "10.0.0.2", node_ip, np, both, true),
        flow("external to NodePort hits both endpoints, masqueraded", "203.0.113.2", node_ip, np, both, true),
    ];
    external_traffic_policy(p, "Cluster", "TestExternalTrafficPolicyCluster", &flows);
}

/// One case of a table whose cases kube-proxy runs on fresh proxiers, one Service each: here
/// the cases are Services side by side in one apply, each with its own ClusterIP (and LB IP),
/// and each with its own translation of kube-proxy's endpoint addresses (an address that is
/// local in one case is remote in another).
struct Case {
    name: &'static str,
    kp: Kp,
    flows: Vec<Flow>,
}

/// Applies the cases' manifests, sends every case's flows, then deletes the EndpointSlices (the
/// Services stay) and sends `after` (kube-proxy's "endpoints deleted" flows) for every case.
fn run_cases(
    p: &mut Proxy,
    table: &str,
    services: &str,
    slices: &str,
    cases: &[Case],
    after: &[Flow],
) {
    p.apply_with(&(services.to_string() + slices), SERVICE_CIDR);
    for case in cases {
        run_flows(p, &case.kp, &format!("{table}/{}", case.name), &case.flows);
    }
    p.apply_with(services, SERVICE_CIDR);
    for case in cases {
        run_flows(
            p,
            &case.kp,
            &format!("{table}/{}: endpoints deleted", case.name),
            after,
        );
    }
}

// TestInternalTrafficPolicy (pkg/proxy/nftables/proxier_test.go): its four cases, Service
// 172.30.1.1 of each case at 172.30.1.1 … 172.30.1.4.
fn internal_traffic_policy(mut p: Proxy) {
    let pods = serving(
        &mut p,
        &[
            ("l1", false),
            ("l2", false),
            ("r1", true),
            ("r2", true),
            ("r3", true),
        ],
        &[80],
    );
    let (l1, l2, r1, r2, r3) = (&pods[0], &pods[1], &pods[2], &pods[3], &pods[4]);
    let c = p.w.pod("c", false);
    // (name, policy, [(kube-proxy address, pod, nodeName)], flow name, output)
    type Endpoints<'a> = Vec<(&'static str, &'a Pod, &'static str)>;
    let one_local: Endpoints = vec![
        ("10.0.1.1", l1, "node-a"),
        ("10.0.1.2", r1, "node1"),
        ("10.0.1.3", r2, "node2"),
    ];
    let table: [(&str, &str, Endpoints, &str, &str); 4] = [
        (
            "internalTrafficPolicy is cluster",
            "Cluster",
            one_local.clone(),
            "pod to ClusterIP hits all endpoints",
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80",
        ),
        (
            "internalTrafficPolicy is local and there is one local endpoint",
            "Local",
            one_local,
            "pod to ClusterIP hits only local endpoint",
            "10.0.1.1:80",
        ),
        (
            "internalTrafficPolicy is local and there are multiple local endpoints",
            "Local",
            vec![
                ("10.0.1.1", l1, "node-a"),
                ("10.0.1.2", l2, "node-a"),
                ("10.0.1.3", r2, "node2"),
            ],
            "pod to ClusterIP hits all local endpoints",
            "10.0.1.1:80, 10.0.1.2:80",
        ),
        (
            "internalTrafficPolicy is local and there are no local endpoints",
            "Local",
            vec![
                ("10.0.1.1", r3, "node0"),
                ("10.0.1.2", r1, "node1"),
                ("10.0.1.3", r2, "node2"),
            ],
            "no endpoints",
            "DROP",
        ),
    ];
    let (mut services, mut slices, mut cases) = (String::new(), String::new(), Vec::new());
    for (i, (name, policy, endpoints, flow_name, output)) in table.into_iter().enumerate() {
        let (svc_name, ip) = (format!("svc{}", i + 1), format!("172.30.1.{}", i + 1));
        services += &svc(
            &svc_name,
            &format!(
                "{{clusterIP: {ip}, internalTrafficPolicy: {policy}, selector: {{foo: bar}}, ports: [{{port: 80, protocol: TCP}}]}}"
            ),
        );
        let eps_yaml: Vec<String> = endpoints
            .iter()
            .map(|(_, pod, node)| ep(pod.ip, Some(node), "conditions: {ready: true}"))
            .collect();
        slices += &eps(
            &format!("{svc_name}-1"),
            &svc_name,
            "IPv4",
            "[{port: 80, protocol: TCP}]",
            &eps_yaml,
        );
        let mut kp = Kp::new(&p).pod("10.0.0.2", &c).addr("172.30.1.1", &ip);
        for (addr, pod, _) in &endpoints {
            kp = kp.pod(addr, pod);
        }
        let flows = vec![flow(flow_name, "10.0.0.2", "172.30.1.1", 80, output, false)];
        cases.push(Case { name, kp, flows });
    }
    let after = [flow(
        "endpoints deleted",
        "10.0.0.2",
        "172.30.1.1",
        80,
        "REJECT",
        false,
    )];
    run_cases(
        &mut p,
        "TestInternalTrafficPolicy",
        &services,
        &slices,
        &cases,
        &after,
    );
}

const READY: &str = "conditions: {ready: true, serving: true, terminating: false}";
const SERVING_TERMINATING: &str = "conditions: {ready: false, serving: true, terminating: true}";
const TERMINATING: &str = "conditions: {ready: false, serving: false, terminating: true}";

/// A case of the terminating tables: (case, [(kube-proxy address, pod index, nodeName,
/// conditions)], output of "pod to clusterIP", output of "external to LB", its masq).
type TerminatingCase = (
    &'static str,
    Vec<(&'static str, usize, &'static str, &'static str)>,
    &'static str,
    &'static str,
    bool,
);

/// TestTerminatingEndpointsTrafficPolicyLocal and …Cluster: a LoadBalancer Service 172.30.1.1
/// with LB IP 1.2.3.4 and no NodePort, four cases of endpoint conditions. Each case's Service
/// here: 172.30.1.N and 198.51.100.N.
fn terminating_endpoints(mut p: Proxy, policy: &str, table: &str, cases_in: &[TerminatingCase]) {
    let pods = serving(
        &mut p,
        &[
            ("l1", false),
            ("l2", false),
            ("l3", false),
            ("l4", false),
            ("r3", true),
            ("r4", true),
            ("r5", true),
        ],
        &[80],
    );
    let c = p.w.pod("c", false);
    let (mut services, mut slices, mut cases) = (String::new(), String::new(), Vec::new());
    for (i, (name, endpoints, to_cluster_ip, to_lb, masq)) in cases_in.iter().enumerate() {
        let n = i + 1;
        let (svc_name, ip, lb) = (
            format!("svc{n}"),
            format!("172.30.1.{n}"),
            format!("198.51.100.{n}"),
        );
        services += &svc(
            &svc_name,
            &format!(
                "{{type: LoadBalancer, externalTrafficPolicy: {policy}, clusterIP: {ip}, healthCheckNodePort: {}, ports: [{{port: 80, protocol: TCP, targetPort: 80}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {lb}}}]}}}}",
                30000 + n
            ),
        );
        let eps_yaml: Vec<String> = endpoints
            .iter()
            .map(|(_, pod, node, cond)| ep(pods[*pod].ip, Some(node), cond))
            .collect();
        slices += &eps(
            &format!("{svc_name}-1"),
            &svc_name,
            "IPv4",
            "[{port: 80, protocol: TCP}]",
            &eps_yaml,
        );
        let mut kp = Kp::new(&p)
            .pod("10.0.0.2", &c)
            .addr("172.30.1.1", &ip)
            .addr("1.2.3.4", &lb);
        for (addr, pod, _, _) in endpoints {
            kp = kp.pod(addr, &pods[*pod]);
        }
        let lb_name = match *to_lb {
            "DROP" => "external to LB, no locally-usable endpoints",
            "REJECT" => "external to LB, no usable endpoints",
            _ => "external to LB",
        };
        let cip_name = if *to_cluster_ip == "REJECT" && policy == "Local" {
            "pod to clusterIP, no usable endpoints"
        } else {
            "pod to clusterIP"
        };
        let flows = vec![
            flow(cip_name, "10.0.0.2", "172.30.1.1", 80, to_cluster_ip, false),
            flow(lb_name, "203.0.113.2", "1.2.3.4", 80, to_lb, *masq),
        ];
        cases.push(Case { name, kp, flows });
    }
    let after = [
        flow(
            "pod to clusterIP after endpoints deleted",
            "10.0.0.2",
            "172.30.1.1",
            80,
            "REJECT",
            false,
        ),
        flow(
            "external to LB after endpoints deleted",
            "203.0.113.2",
            "1.2.3.4",
            80,
            "REJECT",
            false,
        ),
    ];
    run_cases(&mut p, table, &services, &slices, &cases, &after);
}

// Pods of the two terminating tables, by index: l1 l2 l3 l4 on this node, r3 r4 r5 remote.
const L1: usize = 0;
const L2: usize = 1;
const L3: usize = 2;
const L4: usize = 3;
const R3: usize = 4;
const R4: usize = 5;
const R5: usize = 6;

// TestTerminatingEndpointsTrafficPolicyLocal (pkg/proxy/nftables/proxier_test.go). In "no
// usable endpoints on any node" kube-proxy lists 10.0.1.5 twice (on this node and on node-1);
// one address cannot be on two nodes here, so they are two pods, l4 and r5.
fn terminating_endpoints_traffic_policy_local(p: Proxy) {
    let cases = vec![
        (
            "ready endpoints exist",
            vec![
                ("10.0.1.1", L1, "node-a", READY),
                ("10.0.1.2", L2, "node-a", READY),
                ("10.0.1.3", L3, "node-a", SERVING_TERMINATING),
                ("10.0.1.4", L4, "node-a", TERMINATING),
                ("10.0.1.5", R5, "node-1", READY),
            ],
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
            "10.0.1.1:80, 10.0.1.2:80",
            false,
        ),
        (
            "only terminating endpoints exist",
            vec![
                ("10.0.1.2", L2, "node-a", SERVING_TERMINATING),
                ("10.0.1.3", L3, "node-a", SERVING_TERMINATING),
                ("10.0.1.4", L4, "node-a", TERMINATING),
                ("10.0.1.5", R5, "node-1", READY),
            ],
            "10.0.1.5:80",
            "10.0.1.2:80, 10.0.1.3:80",
            false,
        ),
        (
            "terminating endpoints on remote node",
            vec![("10.0.1.5", R5, "node-1", SERVING_TERMINATING)],
            "10.0.1.5:80",
            "DROP",
            false,
        ),
        (
            "no usable endpoints on any node",
            vec![
                ("10.0.1.5", L4, "node-a", TERMINATING),
                ("10.0.1.5", R5, "node-1", TERMINATING),
            ],
            "REJECT",
            "REJECT",
            false,
        ),
    ];
    terminating_endpoints(
        p,
        "Local",
        "TestTerminatingEndpointsTrafficPolicyLocal",
        &cases,
    );
}

// TestTerminatingEndpointsTrafficPolicyCluster (pkg/proxy/nftables/proxier_test.go); the same
// two-pods-for-one-address note as the Local table.
fn terminating_endpoints_traffic_policy_cluster(p: Proxy) {
    let cases = vec![
        (
            "ready endpoints exist",
            vec![
                ("10.0.1.1", L1, "node-a", READY),
                ("10.0.1.2", L2, "node-a", READY),
                ("10.0.1.3", R3, "another-node", SERVING_TERMINATING),
                ("10.0.1.4", R4, "another-node", TERMINATING),
                ("10.0.1.5", R5, "another-node", READY),
            ],
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
            true,
        ),
        (
            "only terminating endpoints exist",
            vec![
                ("10.0.1.2", L2, "node-a", SERVING_TERMINATING),
                ("10.0.1.3", L3, "node-a", SERVING_TERMINATING),
                ("10.0.1.4", R4, "another-node", TERMINATING),
                ("10.0.1.5", R5, "another-node", SERVING_TERMINATING),
            ],
            "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
            "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
            true,
        ),
        (
            "terminating endpoints on remote node",
            vec![("10.0.1.5", R5, "node-1", SERVING_TERMINATING)],
            "10.0.1.5:80",
            "10.0.1.5:80",
            true,
        ),
        (
            "no usable endpoints on any node",
            vec![
                ("10.0.1.5", L4, "node-a", TERMINATING),
                ("10.0.1.5", R5, "node-1", TERMINATING),
            ],
            "REJECT",
            "REJECT",
            false,
        ),
    ];
    terminating_endpoints(
        p,
        "Cluster",
        "TestTerminatingEndpointsTrafficPolicyCluster",
        &cases,
    );
}

// TestInternalExternalMasquerade (pkg/proxy/nftables/proxier_test.go): 27 flows in its four
// configurations, kube-proxy's overrides applied by name as it does. "no LocalTrafficDetector"
// (kube-proxy's NoOpLocalDetector) is `--detect-local-mode NodeCIDR` with no Node object: no
// pod CIDR, so no source is recognised as a pod (README, `--detect-local-mode`).
fn internal_external_masquerade(mut p: Proxy) {
    let pods = serving(
        &mut p,
        &[
            ("a1", false),
            ("b1", true),
            ("a2", false),
            ("b2", true),
            ("a3", false),
            ("b3", true),
        ],
        &[80],
    );
    let c = p.w.pod("c", false);
    let mut yaml = String::new();
    for (n, extra) in [
        (1, ""),
        (2, ", externalTrafficPolicy: Local"),
        (3, ", internalTrafficPolicy: Local"),
    ] {
        let lb = ["198.51.100.4", "198.51.100.8", "198.51.100.12"][n - 1];
        yaml += &svc(
            &format!("svc{n}"),
            &format!(
                "{{type: LoadBalancer, clusterIP: 172.30.0.4{n}, healthCheckNodePort: 3000{n}{extra}, ports: [{{name: p80, port: 80, protocol: TCP, nodePort: 300{n}}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {lb}}}]}}}}"
            ),
        );
        let (local, remote) = (&pods[2 * (n - 1)], &pods[2 * (n - 1) + 1]);
        yaml += &eps(
            &format!("svc{n}-1"),
            &format!("svc{n}"),
            "IPv4",
            P80,
            &[
                ep(local.ip, Some("node-a"), ""),
                ep(remote.ip, Some("remote"), ""),
            ],
        );
    }
    let kp = Kp::new(&p)
        .pod("10.180.0.1", &pods[0])
        .pod("10.180.1.1", &pods[1])
        .pod("10.180.0.2", &pods[2])
        .pod("10.180.1.2", &pods[3])
        .pod("10.180.0.3", &pods[4])
        .pod("10.180.1.3", &pods[5])
        .pod("10.0.0.2", &c);
    let (pod, node, ext) = ("10.0.0.2", "192.168.0.2", "203.0.113.2");
    let s1 = "10.180.0.1:80, 10.180.1.1:80";
    let s2 = "10.180.0.2:80, 10.180.1.2:80";
    let s3 = "10.180.0.3:80, 10.180.1.3:80";
    #[rustfmt::skip]
    let base = vec![
        flow("pod to ClusterIP", pod, "172.30.0.41", 80, s1, false),
        flow("pod to NodePort", pod, node, 3001, s1, true),
        flow("pod to LB", pod, "1.2.3.4", 80, s1, true),
        flow("node to ClusterIP", node, "172.30.0.41", 80, s1, true),
        flow("node to NodePort", node, node, 3001, s1, true),
        flow("node to LB", node, "1.2.3.4", 80, s1, true),
        flow("external to ClusterIP", ext, "172.30.0.41", 80, s1, true),
        flow("external to NodePort", ext, node, 3001, s1, true),
        flow("external to LB", ext, "1.2.3.4", 80, s1, true),
        flow("pod to ClusterIP with eTP:Local", pod, "172.30.0.42", 80, s2, false),
        flow("pod to NodePort with eTP:Local", pod, node, 3002, s2, false),
        flow("pod to LB with eTP:Local", pod, "5.6.7.8", 80, s2, false),
        flow("node to ClusterIP with eTP:Local", node, "172.30.0.42", 80, s2, true),
        // (kube-proxy's table sends this one to 3001, svc1's NodePort, and expects svc1's
        // endpoints: ported as written.)
        flow("node to NodePort with eTP:Local", node, node, 3001, s1, true),
        flow("node to LB with eTP:Local", node, "5.6.7.8", 80, s2, true),
        flow("external to ClusterIP with eTP:Local", ext, "172.30.0.42", 80, s2, true),
        flow("external to NodePort with eTP:Local", ext, node, 3002, "10.180.0.2:80", false),
        flow("external to LB with eTP:Local", ext, "5.6.7.8", 80, "10.180.0.2:80", false),
        flow("pod to ClusterIP with iTP:Local", pod, "172.30.0.43", 80, "10.180.0.3:80", false),
        flow("pod to NodePort with iTP:Local", pod, node, 3003, s3, true),
        flow("pod to LB with iTP:Local", pod, "9.10.11.12", 80, s3, true),
        flow("node to ClusterIP with iTP:Local", node, "172.30.0.43", 80, "10.180.0.3:80", true),
        flow("node to NodePort with iTP:Local", node, node, 3003, s3, true),
        flow("node to LB with iTP:Local", node, "9.10.11.12", 80, s3, true),
        flow("external to ClusterIP with iTP:Local", ext, "172.30.0.43", 80, "10.180.0.3:80", true),
        flow("external to NodePort with iTP:Local", ext, node, 3003, s3, true),
        flow("external to LB with iTP:Local", ext, "9.10.11.12", 80, s3, true),
    ];
    // kube-proxy's overrides: (flow, output, masq); None keeps the base value.
    type Overrides = &'static [(&'static str, Option<&'static str>, Option<bool>)];
    let no_detector: Overrides = &[
        ("node to ClusterIP", None, Some(false)),
        ("node to ClusterIP with eTP:Local", None, Some(false)),
        ("node to ClusterIP with iTP:Local", None, Some(false)),
        ("external to ClusterIP", None, Some(false)),
        ("external to ClusterIP with eTP:Local", None, Some(false)),
        ("external to ClusterIP with iTP:Local", None, Some(false)),
        (
            "pod to NodePort with eTP:Local",
            Some("10.180.0.2:80"),
            None,
        ),
        ("pod to LB with eTP:Local", Some("10.180.0.2:80"), None),
    ];
    let masquerade_all: Overrides = &[
        ("pod to ClusterIP", None, Some(true)),
        ("pod to ClusterIP with eTP:Local", None, Some(true)),
        ("pod to ClusterIP with iTP:Local", None, Some(true)),
    ];
    let both: Overrides = &[
        ("pod to ClusterIP", None, Some(true)),
        ("pod to ClusterIP with eTP:Local", None, Some(true)),
        ("pod to ClusterIP with iTP:Local", None, Some(true)),
        (
            "pod to NodePort with eTP:Local",
            Some("10.180.0.2:80"),
            None,
        ),
        ("pod to LB with eTP:Local", Some("10.180.0.2:80"), None),
    ];
    let no_detector_flags: &[&str] = &["--detect-local-mode", "NodeCIDR"];
    let configurations: [(&str, &[&str], Overrides); 4] = [
        ("base", &[], &[]),
        ("no LocalTrafficDetector", no_detector_flags, no_detector),
        ("masqueradeAll", &["--masquerade-all"], masquerade_all),
        (
            "masqueradeAll, no LocalTrafficDetector",
            &["--masquerade-all", "--detect-local-mode", "NodeCIDR"],
            both,
        ),
    ];
    for (name, flags, overrides) in configurations {
        let mut flows = base.clone();
        for (target, output, masq) in overrides {
            let f = flows
                .iter_mut()
                .find(|f| f.name == *target)
                .unwrap_or_else(|| panic!("override {target:?} matches no flow"));
            if let Some(o) = output {
                f.output = o.to_string();
            }
            if let Some(m) = masq {
                f.masq = *m;
            }
        }
        let all: Vec<&str> = SERVICE_CIDR.iter().chain(flags.iter()).copied().collect();
        p.apply_with(&yaml, &all);
        run_flows(
            &p,
            &kp,
            &format!("TestInternalExternalMasquerade/{name}"),
            &flows,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The topology tests: TestCategorizeEndpoints (pkg/proxy/topology_test.go), which checks
// CategorizeEndpoints' endpoint lists (cluster, local) without packets. Each case becomes a
// Service with those endpoints, and its lists become flows:
// - pod to ClusterIP: the local list under internalTrafficPolicy Local, else the cluster list;
// - with a NodePort, external to NodePort: the local list under externalTrafficPolicy Local
//   (unmasqueraded), else the cluster list (masqueraded);
// - with a NodePort under externalTrafficPolicy Local, pod to NodePort: the cluster list (pods
//   short-circuit the Local policy, TestInternalExternalMasquerade);
// - an empty list: DROP when the Service has usable endpoints elsewhere (hasAnyEndpoints),
//   REJECT when it has none.
// The stored table predates kube-proxy 1.35 in two ways, ported as 1.35 behaves
// (pkg/proxy/topology.go, as stored: topologyModeFromHints reads no annotation):
// - cases gated on the `service.kubernetes.io/topology-aware-hints` annotation ("disabled",
//   "aUto", empty: hints ignored) follow the hints here, as kube-proxy 1.35 follows them
//   whatever the annotation says (README, "Topology-aware routing");
// - cases with ProxyTerminatingEndpoints disabled are left out: the gate is locked on since
//   1.28, so 1.35 has no such behaviour to compare with (counted and printed).
// Node hints (PreferSameNode) are topology.go's; tests/dataplane.rs sends them.

/// An endpoint of a topology case: kube-proxy's address, whether it is on this node, its zone
/// hints, its conditions.
type TopoEndpoint = (&'static str, bool, &'static [&'static str], &'static str);

struct TopoCase {
    name: &'static str,
    /// The Node's labels (YAML flow form): cases with the same labels share one apply.
    node_labels: &'static str,
    annotation: Option<&'static str>,
    itp_local: bool,
    etp_local: bool,
    node_port: bool,
    endpoints: &'static [TopoEndpoint],
    cluster: &'static [&'static str],
    local: &'static [&'static str],
    /// kube-proxy's hasAnyEndpoints: usable endpoints somewhere, though none for this list.
    has_any: bool,
}

const R: &str = "conditions: {ready: true}";
const NOT_READY: &str = "conditions: {ready: false}";
const ZA: &[&str] = &["zone-a"];
const ZB: &[&str] = &["zone-b"];
const ZC: &[&str] = &["zone-c"];
const NONE: &[&str] = &[];
const ZONE_A: &str = "topology.kubernetes.io/zone: zone-a";

/// The four endpoints most zone cases use: 10.1.2.3 and .6 in zone-a, .4 in b, .5 in c.
const FOUR: &[TopoEndpoint] = &[
    ("10.1.2.3", false, ZA, R),
    ("10.1.2.4", false, ZB, R),
    ("10.1.2.5", false, ZC, R),
    ("10.1.2.6", false, ZA, R),
];
const ALL_FOUR: &[&str] = &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"];
const ZONE_A_EPS: &[&str] = &["10.1.2.3:80", "10.1.2.6:80"];

const fn topo(
    name: &'static str,
    endpoints: &'static [TopoEndpoint],
    cluster: &'static [&'static str],
) -> TopoCase {
    TopoCase {
        name,
        node_labels: ZONE_A,
        annotation: None,
        itp_local: false,
        etp_local: false,
        node_port: false,
        endpoints,
        cluster,
        local: &[],
        has_any: false,
    }
}

fn topology_cases() -> Vec<TopoCase> {
    let local_two: &'static [TopoEndpoint] = &[
        ("10.1.2.3", true, ZA, R),
        ("10.1.2.4", true, ZB, R),
        ("10.1.2.5", false, ZC, R),
        ("10.1.2.6", false, ZA, R),
    ];
    let some_local: &'static [TopoEndpoint] =
        &[("10.0.0.0", true, NONE, R), ("10.0.0.1", false, NONE, R)];
    let all_remote: &'static [TopoEndpoint] =
        &[("10.0.0.0", false, NONE, R), ("10.0.0.1", false, NONE, R)];
    let remote_terminating: &'static [TopoEndpoint] = &[
        ("10.0.0.0", false, NONE, SERVING_TERMINATING),
        ("10.0.0.1", false, NONE, SERVING_TERMINATING),
    ];
    let both_01: &'static [&'static str] = &["10.0.0.0:80", "10.0.0.1:80"];
    vec![
        TopoCase {
            annotation: Some("auto"),
            ..topo("hints enabled, hints annotation == auto", FOUR, ZONE_A_EPS)
        },
        TopoCase {
            annotation: Some("disabled"),
            ..topo(
                "hints, hints annotation == disabled, hints ignored",
                FOUR,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some("aUto"),
            ..topo(
                "hints, hints annotation == aUto (wrong capitalization), hints ignored",
                FOUR,
                ZONE_A_EPS,
            )
        },
        topo(
            "hints, hints annotation empty, hints ignored",
            FOUR,
            ZONE_A_EPS,
        ),
        TopoCase {
            annotation: Some("auto"),
            etp_local: true,
            node_port: true,
            local: &["10.1.2.3:80", "10.1.2.4:80"],
            ..topo(
                "externalTrafficPolicy: Local, topology ignored for Local endpoints",
                local_two,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some("auto"),
            itp_local: true,
            node_port: true,
            local: &["10.1.2.3:80", "10.1.2.4:80"],
            ..topo(
                "internalTrafficPolicy: Local, topology ignored for Local endpoints",
                local_two,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some("auto"),
            node_labels: "",
            ..topo(
                "empty node labels",
                &[("10.1.2.3", false, ZA, R)],
                &["10.1.2.3:80"],
            )
        },
        TopoCase {
            annotation: Some("auto"),
            node_labels: "topology.kubernetes.io/zone: ''",
            ..topo(
                "empty zone label",
                &[("10.1.2.3", false, ZA, R)],
                &["10.1.2.3:80"],
            )
        },
        TopoCase {
            annotation: Some("auto"),
            node_labels: "topology.kubernetes.io/zone: zone-b",
            ..topo(
                "node in different zone, no endpoint filtering",
                &[("10.1.2.3", false, ZA, R)],
                &["10.1.2.3:80"],
            )
        },
        TopoCase {
            annotation: Some("auto"),
            ..topo(
                "normal endpoint filtering, auto annotation",
                FOUR,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some("auto"),
            ..topo(
                "unready endpoint",
                &[
                    ("10.1.2.3", false, ZA, R),
                    ("10.1.2.4", false, ZB, R),
                    ("10.1.2.5", false, ZC, R),
                    ("10.1.2.6", false, ZA, NOT_READY),
                ],
                &["10.1.2.3:80"],
            )
        },
        TopoCase {
            annotation: Some("auto"),
            ..topo(
                "only unready endpoints in same zone (should not filter)",
                &[
                    ("10.1.2.3", false, ZA, NOT_READY),
                    ("10.1.2.4", false, ZB, R),
                    ("10.1.2.5", false, ZC, R),
                    ("10.1.2.6", false, ZA, NOT_READY),
                ],
                &["10.1.2.4:80", "10.1.2.5:80"],
            )
        },
        TopoCase {
            annotation: Some("Auto"),
            ..topo(
                "normal endpoint filtering, Auto annotation",
                FOUR,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some(""),
            ..topo(
                "hintsAnnotation empty, no filtering applied",
                FOUR,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some("disabled"),
            ..topo(
                "hintsAnnotation disabled, no filtering applied",
                FOUR,
                ZONE_A_EPS,
            )
        },
        TopoCase {
            annotation: Some("auto"),
            ..topo(
                "missing hints, no filtering applied",
                &[
                    ("10.1.2.3", false, ZA, R),
                    ("10.1.2.4", false, ZB, R),
                    ("10.1.2.5", false, NONE, R),
                    ("10.1.2.6", false, ZA, R),
                ],
                ALL_FOUR,
            )
        },
        TopoCase {
            annotation: Some("auto"),
            node_labels: "topology.kubernetes.io/zone: zone-c",
            ..topo(
                "multiple hints per endpoint, filtering includes any endpoint with zone included",
                &[
                    ("10.1.2.3", false, &["zone-a", "zone-b", "zone-c"], R),
                    ("10.1.2.4", false, &["zone-b", "zone-c"], R),
                    ("10.1.2.5", false, &["zone-b", "zone-d"], R),
                    ("10.1.2.6", false, ZC, R),
                ],
                &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"],
            )
        },
        TopoCase {
            annotation: Some("auto"),
            etp_local: true,
            node_port: true,
            local: &["10.0.0.0:80", "10.0.0.1:80"],
            ..topo(
                "conflicting topology and localness require merging allEndpoints",
                &[
                    ("10.0.0.0", true, ZA, R),
                    ("10.0.0.1", true, ZB, R),
                    ("10.0.0.2", false, ZA, R),
                    ("10.0.0.3", false, ZB, R),
                ],
                &["10.0.0.0:80", "10.0.0.2:80"],
            )
        },
        TopoCase {
            itp_local: true,
            ..topo(
                "internalTrafficPolicy: Local, with empty endpoints",
                &[],
                &[],
            )
        },
        TopoCase {
            itp_local: true,
            has_any: true,
            ..topo(
                "internalTrafficPolicy: Local, but all endpoints are remote",
                all_remote,
                &[],
            )
        },
        TopoCase {
            itp_local: true,
            local: both_01,
            ..topo(
                "internalTrafficPolicy: Local, all endpoints are local",
                &[("10.0.0.0", true, NONE, R), ("10.0.0.1", true, NONE, R)],
                &[],
            )
        },
        TopoCase {
            itp_local: true,
            local: &["10.0.0.0:80"],
            ..topo(
                "internalTrafficPolicy: Local, some endpoints are local",
                some_local,
                &[],
            )
        },
        topo(
            "Cluster traffic policy, endpoints not Ready",
            &[
                ("10.0.0.0", false, NONE, NOT_READY),
                ("10.0.0.1", false, NONE, NOT_READY),
            ],
            &[],
        ),
        topo(
            "Cluster traffic policy, some endpoints are Ready",
            &[
                ("10.0.0.0", false, NONE, NOT_READY),
                ("10.0.0.1", false, NONE, R),
            ],
            &["10.0.0.1:80"],
        ),
        topo(
            "Cluster traffic policy, PTE enabled, all endpoints are terminating",
            &[
                ("10.0.0.0", true, NONE, SERVING_TERMINATING),
                ("10.0.0.1", false, NONE, SERVING_TERMINATING),
            ],
            both_01,
        ),
        TopoCase {
            itp_local: true,
            node_port: true,
            local: &["10.0.0.0:80"],
            ..topo(
                "iTP: Local, eTP: Cluster, some endpoints local",
                some_local,
                both_01,
            )
        },
        TopoCase {
            etp_local: true,
            node_port: true,
            local: &["10.0.0.0:80"],
            ..topo(
                "iTP: Cluster, eTP: Local, some endpoints local",
                some_local,
                both_01,
            )
        },
        TopoCase {
            itp_local: true,
            etp_local: true,
            node_port: true,
            local: &["10.0.0.0:80"],
            ..topo(
                "iTP: Local, eTP: Local, some endpoints local",
                some_local,
                both_01,
            )
        },
        TopoCase {
            itp_local: true,
            etp_local: true,
            node_port: true,
            has_any: true,
            ..topo(
                "iTP: Local, eTP: Local, all endpoints remote",
                all_remote,
                both_01,
            )
        },
        TopoCase {
            itp_local: true,
            etp_local: true,
            node_port: true,
            has_any: true,
            ..topo(
                "iTP: Local, eTP: Local, PTE enabled, all endpoints remote and terminating",
                remote_terminating,
                both_01,
            )
        },
        TopoCase {
            etp_local: true,
            node_port: true,
            local: &["10.0.0.2:80"],
            ..topo(
                "iTP: Cluster, eTP: Local, PTE enabled, with terminating endpoints",
                &[
                    ("10.0.0.0", false, NONE, R),
                    (
                        "10.0.0.1",
                        true,
                        NONE,
                        "conditions: {ready: false, serving: false}",
                    ),
                    ("10.0.0.2", true, NONE, SERVING_TERMINATING),
                    ("10.0.0.3", false, NONE, SERVING_TERMINATING),
                ],
                &["10.0.0.0:80"],
            )
        },
        // A ClusterIP Service: no NodePort, so the external policy is never used.
        TopoCase {
            etp_local: true,
            ..topo(
                "externalTrafficPolicy ignored if not externally accessible",
                &[("10.0.0.0", false, NONE, R), ("10.0.0.1", true, NONE, R)],
                both_01,
            )
        },
        TopoCase {
            itp_local: true,
            local: &["10.0.0.1:80"],
            ..topo(
                "no cluster endpoints for iTP:Local internal-only service",
                &[("10.0.0.0", false, NONE, R), ("10.0.0.1", true, NONE, R)],
                &[],
            )
        },
    ]
}

/// The stored table's cases with ProxyTerminatingEndpoints disabled: not ported (module note).
const PTE_DISABLED: &[&str] = &[
    "Cluster traffic policy, PTE disabled, all endpoints are terminating",
    "iTP: Local, eTP: Local, PTE disabled, all endpoints remote and terminating",
    "iTP: Cluster, eTP: Local, PTE disabled, with terminating endpoints",
];

fn categorize_endpoints(mut p: Proxy) {
    // At most two endpoints of a case on this node and four elsewhere.
    let pods = serving(
        &mut p,
        &[
            ("l1", false),
            ("l2", false),
            ("r1", true),
            ("r2", true),
            ("r3", true),
            ("r4", true),
        ],
        &[80],
    );
    let c = p.w.pod("c", false);
    let cases = topology_cases();
    let mut groups: Vec<&str> = cases.iter().map(|t| t.node_labels).collect();
    let mut labels_seen = BTreeSet::new();
    groups.retain(|g| labels_seen.insert(*g));
    for labels in groups {
        let (mut yaml, mut runs) = (node(labels), Vec::new());
        for (i, case) in cases
            .iter()
            .enumerate()
            .filter(|(_, t)| t.node_labels == labels)
        {
            let (name, ip, np) = (
                format!("topo{i}"),
                format!("172.30.2.{}", i + 1),
                31000 + i as u16,
            );
            let mut spec = format!("clusterIP: {ip}, ports: [{{port: 80, protocol: TCP");
            if case.node_port {
                spec = format!("type: NodePort, {spec}, nodePort: {np}");
            }
            spec += "}]";
            if case.itp_local {
                spec += ", internalTrafficPolicy: Local";
            }
            if case.etp_local {
                spec += ", externalTrafficPolicy: Local";
            }
            let annotations = case
                .annotation
                .map(|a| {
                    format!(
                        "\n  annotations: {{service.kubernetes.io/topology-aware-hints: '{a}'}}"
                    )
                })
                .unwrap_or_default();
            yaml += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default{annotations}\nspec: {{{spec}}}\n"
            );
            // Endpoints on this node take l1, l2 in order; the others r1 … r4.
            let (mut here, mut there) = (pods[..2].iter(), pods[2..].iter());
            // (kube-proxy's topology cases send nothing: the pod source is ours, 10.0.0.99.)
            let mut kp = Kp::new(&p).pod("10.0.0.99", &c).addr("172.30.2.1", &ip);
            let mut endpoints = Vec::new();
            for (addr, local, zones, cond) in case.endpoints {
                let pod = if *local { here.next() } else { there.next() }.unwrap();
                kp = kp.pod(addr, pod);
                let hints = if zones.is_empty() {
                    String::new()
                } else {
                    let z: Vec<String> = zones.iter().map(|z| format!("{{name: {z}}}")).collect();
                    format!(", hints: {{forZones: [{}]}}", z.join(", "))
                };
                let node = if *local { "node-a" } else { "node-b" };
                endpoints.push(ep(pod.ip, Some(node), &format!("{cond}{hints}")));
            }
            yaml += &eps(
                &format!("{name}-1"),
                &name,
                "IPv4",
                "[{port: 80, protocol: TCP}]",
                &endpoints,
            );
            let list = |l: &[&str]| {
                if !l.is_empty() {
                    l.join(", ")
                } else if case.has_any {
                    "DROP".into()
                } else {
                    "REJECT".into()
                }
            };
            let mut flows = vec![flow(
                "pod to ClusterIP",
                "10.0.0.99",
                "172.30.2.1",
                80,
                &list(if case.itp_local {
                    case.local
                } else {
                    case.cluster
                }),
                false,
            )];
            if case.node_port {
                flows.push(if case.etp_local {
                    flow(
                        "external to NodePort",
                        "203.0.113.2",
                        "192.168.0.2",
                        np,
                        &list(case.local),
                        false,
                    )
                } else {
                    flow(
                        "external to NodePort",
                        "203.0.113.2",
                        "192.168.0.2",
                        np,
                        &list(case.cluster),
                        true,
                    )
                });
                if case.etp_local {
                    flows.push(flow(
                        "pod to NodePort",
                        "10.0.0.99",
                        "192.168.0.2",
                        np,
                        &list(case.cluster),
                        false,
                    ));
                }
            }
            runs.push((case.name, kp, flows));
        }
        p.apply_with(&yaml, SERVICE_CIDR);
        for (name, kp, flows) in &runs {
            run_flows(&p, kp, &format!("TestCategorizeEndpoints/{name}"), flows);
        }
    }
    println!(
        "TestCategorizeEndpoints ({:?}): {} cases sent, {} not ported (ProxyTerminatingEndpoints disabled, locked on since 1.28): {PTE_DISABLED:?}",
        p.mode,
        cases.len(),
        PTE_DISABLED.len()
    );
}
