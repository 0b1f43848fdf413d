//! Real packets through svcproxy's rules: a node namespace with the ruleset loaded, pods on it
//! and on a second node, and a client outside the cluster (see tests/common/netns.rs). Every
//! test builds its own world and tears it down. They need root; outside CI they skip, loudly.
//!
//! Each scenario is one function run once per backend ([`Mode`]): the test
//! `SCENARIO::nftables`, `SCENARIO::iptables_legacy` and `SCENARIO::iptables_nft` (see
//! [`on_every_backend!`]). The same packets, the same expectations: one plan, two renderers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::netns::*;
use common::proxy::*;
use svcproxy::backend::Rules;
use svcproxy::conntrack::UdpFlow;
use svcproxy::iptables::Variant;
use svcproxy::model::{IpFamily, Protocol};
use svcproxy::nft::apply::{NftCommand, SyncKind};
use svcproxy::nft::syntax::{Data, Element, Value, Verdict};
use svcproxy::trace::{Query, Verdict as Fate};

on_every_backend!(
    clusterip_spreads_over_ready_endpoints_only,
    udp_service_and_named_target_ports_on_several_ports,
    selector_less_service_and_terminating_fallback,
    session_affinity_keeps_a_client_on_one_endpoint,
    nodeport_cluster_and_local_traffic_policy,
    load_balancer_ip_and_external_ip,
    no_endpoints_and_unknown_ports_are_refused_at_once,
    hairpin_a_pod_reaches_itself_through_its_service,
    live_updates_under_load_lose_no_connection,
    a_refused_transaction_leaves_the_previous_rules_in_place,
    stale_udp_flows_move_to_the_new_endpoint,
    apply_and_cleanup_commands_leave_other_rules_alone,
    switching_modes_removes_the_other_modes_rules,
    dual_stack_service_answers_on_both_families,
    zone_hints_keep_traffic_in_the_zone_and_fall_back_when_incomplete,
    node_hints_keep_traffic_on_the_node,
    detect_local_modes_decide_which_sources_are_pods,
    load_balancer_source_ranges_guard_the_load_balancer_ip,
    unallocated_cluster_ips_are_dropped,
    invalid_conntrack_state_in_forward,
);

fn node_ip() -> IpAddr {
    NODE_IP.parse().unwrap()
}

fn client_ip() -> IpAddr {
    CLIENT_IP.parse().unwrap()
}

/// One datagram from namespace `ns` to `to` on a connected socket, and its answer.
fn udp_once(ns: &str, to: SocketAddr, timeout: Duration) -> io::Result<Reply> {
    in_ns(ns, move || {
        let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = std::net::UdpSocket::bind(any)?;
        s.set_read_timeout(Some(timeout))?;
        s.connect(to)?;
        s.send(b"hello")?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf)?;
        parse_reply(&String::from_utf8_lossy(&buf[..n]))
    })
}

/// One ICMP echo request (a raw socket: no ping program needed) from namespace `ns` to `to`
/// (IPv4): an echo reply is an answer, a destination unreachable a refusal, nothing within the
/// deadline a drop.
fn ping(ns: &str, to: IpAddr) -> Observed {
    let IpAddr::V4(v4) = to else {
        panic!("ping is IPv4 here")
    };
    in_ns(ns, move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let id: u16 = 0x5350;
            let mut pkt = [8u8, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1, b'p', b'i'];
            let mut sum: u32 = 0;
            for c in pkt.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let ck = !(sum as u16);
            pkt[2] = (ck >> 8) as u8;
            pkt[3] = ck as u8;
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                sin_zero: [0; 8],
            };
            let sent = libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            if sent < 0 {
                // A packet the node itself sends and its own netfilter drops or rejects
                // (OUTPUT) fails with EPERM; a reject then delivers its ICMP error, read below.
                let e = io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "ping {to}: {e}");
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut out = Observed::Dropped;
            let mut buf = [0u8; 1500];
            while Instant::now() < deadline {
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n <= 0 {
                    continue;
                }
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                match buf.get(ihl) {
                    Some(0) => {
                        out = Observed::Reached(BTreeMap::new());
                        break;
                    }
                    Some(3) => {
                        out = Observed::Refused;
                        break;
                    }
                    _ => {}
                }
            }
            libc::close(fd);
            out
        }
    })
}

/// What new TCP connections did, as real packets or as `svcproxy trace` predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Observed {
    /// Answered by these pods; for each, whether it saw another source address than the
    /// client's (masqueraded); `None` where that cannot be seen (the node is the client: its
    /// own address and its masquerading address are the same).
    Reached(BTreeMap<String, Option<bool>>),
    /// Refused at once (a TCP reset or an ICMP unreachable).
    Refused,
    /// No answer.
    Dropped,
}

impl Proxy {
    /// The pod with this address (`svcproxy trace` names endpoints by address).
    fn pod_named(&self, ip: IpAddr) -> String {
        self.w
            .pods
            .iter()
            .find(|p| p.ip == ip || p.ip6 == ip)
            .map_or_else(|| ip.to_string(), |p| p.name.clone())
    }

    /// `svcproxy trace`'s prediction for a TCP connection from `src` to `to`, on the inputs last
    /// applied and this backend.
    fn predict(
        &self,
        src: IpAddr,
        iifname: Option<&str>,
        to: &str,
    ) -> (Observed, svcproxy::trace::Trace) {
        let (snapshot, config) = self.applied.as_ref().expect("something applied");
        let q = Query {
            source: src,
            target: to.parse().unwrap(),
            iifname: iifname.map(String::from),
            backend: match self.mode {
                Mode::Nftables => svcproxy::trace::Backend::Nftables,
                Mode::Iptables(_) => svcproxy::trace::Backend::Iptables,
            },
        };
        let t = svcproxy::trace::trace_snapshot(snapshot, config, &q).unwrap();
        let node = src.to_string() == NODE_IP || src.to_string() == NODE_IP6;
        let o = match &t.verdict {
            Fate::Dnat { .. } => Observed::Reached(
                t.endpoints
                    .iter()
                    .map(|c| {
                        (
                            self.pod_named(c.state.address.ip()),
                            (!node).then_some(c.masquerade),
                        )
                    })
                    .collect(),
            ),
            Fate::Reject { .. } => Observed::Refused,
            Fate::Drop { .. } => Observed::Dropped,
            Fate::LeftAlone { .. } => panic!("{to} is not a Service's: {t}"),
        };
        (o, t)
    }

    /// Makes `n` TCP connections from namespace `ns` (whose address is `src`) to `to`, and
    /// asserts that `svcproxy trace` predicted exactly what they did: the same endpoints (all
    /// of them, unless session affinity keeps the client on one), masqueraded or not, refused
    /// or dropped. Returns what they did.
    fn probe(&self, ns: &str, src: IpAddr, to: SocketAddr, n: usize) -> Observed {
        self.probe_via(ns, src, None, to, n)
    }

    /// [`Proxy::probe`] with UDP datagrams (a connected socket, so that an ICMP port
    /// unreachable is seen as a refusal).
    fn probe_udp(&self, ns: &str, src: IpAddr, to: SocketAddr, n: usize) -> Observed {
        self.probe_proto(ns, src, None, to, Protocol::Udp, n)
    }

    /// A ping from namespace `ns` (address `src`) to `to`: what `svcproxy trace` predicts
    /// (refused: an ICMP port unreachable; dropped: no answer) is what happens.
    fn ping_agrees(&self, ns: &str, src: IpAddr, to: IpAddr) -> Observed {
        let (predicted, t) = self.predict(src, None, &to.to_string());
        let observed = ping(ns, to);
        assert_eq!(
            predicted, observed,
            "{:?}: ping {to} from {src}: trace predicted (left) what packets did (right)\n{t}",
            self.mode
        );
        observed
    }

    /// [`Proxy::probe`] for a source arriving on interface `iifname` of the node.
    fn probe_via(
        &self,
        ns: &str,
        src: IpAddr,
        iifname: Option<&str>,
        to: SocketAddr,
        n: usize,
    ) -> Observed {
        self.probe_proto(ns, src, iifname, to, Protocol::Tcp, n)
    }

    fn probe_proto(
        &self,
        ns: &str,
        src: IpAddr,
        iifname: Option<&str>,
        to: SocketAddr,
        proto: Protocol,
        n: usize,
    ) -> Observed {
        let (predicted, t) = self.predict(src, iifname, &format!("{to}/{proto}"));
        let node = src.to_string() == NODE_IP || src.to_string() == NODE_IP6;
        let mut seen = BTreeMap::new();
        let mut observed = None;
        for _ in 0..n {
            let timeout = if seen.is_empty() {
                Duration::from_millis(700)
            } else {
                T
            };
            let answer = match proto {
                Protocol::Tcp => tcp(ns, to, timeout),
                _ => udp_once(ns, to, timeout),
            };
            match answer {
                Ok(r) => {
                    let masq = (!node).then_some(r.peer != src);
                    let prev = seen.insert(r.pod.clone(), masq);
                    assert!(
                        prev.is_none() || prev == Some(masq),
                        "{to} from {src}: {} seen both masqueraded and not",
                        r.pod
                    );
                }
                Err(e) if seen.is_empty() => {
                    observed = Some(match e.kind() {
                        io::ErrorKind::ConnectionRefused => Observed::Refused,
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Observed::Dropped,
                        _ => panic!("{to} from {ns}: {e:?}"),
                    });
                    break;
                }
                Err(e) => panic!("{to} from {ns}: {e:?} after answers {seen:?}"),
            }
        }
        let observed = observed.unwrap_or(Observed::Reached(seen));
        let affinity = t.steps.iter().any(|s| s.decision == "session-affinity");
        match (&predicted, &observed) {
            (Observed::Reached(p), Observed::Reached(o)) if affinity => {
                assert_eq!(o.len(), 1, "affinity keeps one endpoint: {o:?}");
                assert!(
                    o.iter().all(|(k, v)| p.get(k) == Some(v)),
                    "{:?}: {to} from {src}: trace predicted {p:?}, packets did {o:?}\n{t}",
                    self.mode
                );
            }
            _ => assert_eq!(
                predicted, observed,
                "{:?}: {to} from {src}: trace predicted (left) what packets did (right)\n{t}",
                self.mode
            ),
        }
        observed
    }
}

fn clusterip_spreads_over_ready_endpoints_only(mut p: Proxy) {
    let (a1, a2, a3, b1, c) = (
        p.w.pod("a1", false),
        p.w.pod("a2", false),
        p.w.pod("a3", false),
        p.w.pod("b1", true),
        p.w.pod("c", false),
    );
    for pod in [&a1, &a2, &a3, &b1] {
        p.w.serve(pod, 8080);
    }
    let yaml = svc(
        "web",
        "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice(
        "web-1",
        "web",
        "[{port: 8080}]",
        &[
            (&a1, READY),
            (&a2, READY),
            (&b1, READY),
            (&a3, "{ready: false}"),
        ],
    );
    let report = p.apply(&yaml);
    assert_eq!(report.kind, SyncKind::Full);
    let seen = who_answers(&c.ns, sa("10.96.0.10:80"), 60);
    assert_eq!(names(&seen), BTreeSet::from(["a1", "a2", "b1"]), "{seen:?}");
    // The pod's own address is kept inside the cluster.
    assert_eq!(tcp(&c.ns, sa("10.96.0.10:80"), T).unwrap().peer, c.ip);
    // From the node itself, and from outside the cluster (masqueraded: the pod must answer
    // through this node).
    let from_node = tcp(&p.w.node, sa("10.96.0.10:80"), T).unwrap();
    assert!(["a1", "a2", "b1"].contains(&from_node.pod.as_str()));
    for _ in 0..6 {
        let r = tcp(&p.w.client, sa("10.96.0.10:80"), T).unwrap();
        assert_ne!(
            r.peer.to_string(),
            CLIENT_IP,
            "traffic from outside the cluster CIDR is masqueraded"
        );
    }
    // trace predicts each of these.
    let to = sa("10.96.0.10:80");
    p.probe(&c.ns, c.ip, to, 40);
    p.probe(&p.w.client, client_ip(), to, 40);
    p.probe(&p.w.node, node_ip(), to, 40);
}

/// A dual-stack Service: each of its ClusterIPs spreads over the endpoints of its own family,
/// for pods and for clients outside the cluster; its NodePort answers on the node's IPv6
/// address too.
fn dual_stack_service_answers_on_both_families(mut p: Proxy) {
    let (a1, b1, c) = (
        p.w.pod("a1", false),
        p.w.pod("b1", true),
        p.w.pod("c", false),
    );
    for pod in [&a1, &b1] {
        p.w.serve(pod, 8080);
    }
    let v6_endpoints: Vec<String> = [&a1, &b1]
        .iter()
        .map(|p| {
            format!(
                "{{addresses: ['{}'], nodeName: {}, conditions: {READY}}}",
                p.ip6, p.node
            )
        })
        .collect();
    let yaml = svc(
        "web",
        "{type: NodePort, clusterIP: 10.96.0.60, clusterIPs: [10.96.0.60, 'fd00:96::60'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{port: 80, targetPort: 8080, nodePort: 30660}]}",
    ) + &slice(
        "web-v4",
        "web",
        "[{port: 8080}]",
        &[(&a1, READY), (&b1, READY)],
    ) + &format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv6\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        v6_endpoints.join(", ")
    );
    // The node's IPv6 address too, as a dual-stack Node lists it: trace knows the node's
    // addresses from it (the kernel's list of local addresses decides NodePorts).
    p.apply_with(&yaml, &["--node-ip", NODE_IP6]);
    let both = BTreeSet::from(["a1", "b1"]);
    for to in ["10.96.0.60:80", "[fd00:96::60]:80"] {
        let seen = who_answers(&c.ns, sa(to), 30);
        assert_eq!(names(&seen), both, "{to} from a pod: {seen:?}");
        let seen = who_answers(&p.w.client, sa(to), 30);
        assert_eq!(names(&seen), both, "{to} from outside: {seen:?}");
    }
    // Inside the cluster the endpoint sees the pod's own IPv6 address.
    let r = tcp(&c.ns, sa("[fd00:96::60]:80"), T).unwrap();
    assert_eq!(r.peer, c.ip6);
    // The NodePort, on the node's IPv6 address, from outside.
    let seen = who_answers(
        &p.w.client,
        SocketAddr::new(NODE_IP6.parse().unwrap(), 30660),
        30,
    );
    assert_eq!(names(&seen), both, "NodePort over IPv6: {seen:?}");
    for to in ["10.96.0.60:80", "[fd00:96::60]:80"] {
        let to = sa(to);
        let pod = if to.is_ipv4() { c.ip } else { c.ip6 };
        let client: IpAddr = if to.is_ipv4() { CLIENT_IP } else { CLIENT_IP6 }
            .parse()
            .unwrap();
        p.probe(&c.ns, pod, to, 30);
        p.probe(&p.w.client, client, to, 30);
    }
    p.probe(
        &p.w.client,
        CLIENT_IP6.parse().unwrap(),
        SocketAddr::new(NODE_IP6.parse().unwrap(), 30660),
        30,
    );
}

fn udp_service_and_named_target_ports_on_several_ports(mut p: Proxy) {
    let (a1, b1, c) = (
        p.w.pod("a1", false),
        p.w.pod("b1", true),
        p.w.pod("c", false),
    );
    p.w.serve(&a1, 8080);
    p.w.serve(&a1, 9090);
    p.w.serve(&a1, 5353);
    p.w.serve(&b1, 8081);
    p.w.serve(&b1, 9091);
    // Port names resolve per slice: a1 listens on 8080/9090, b1 on 8081/9091.
    let yaml = svc(
        "multi",
        "{clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 90, targetPort: metrics}, {name: dns, port: 53, protocol: UDP, targetPort: 5353}]}",
    ) + &slice(
        "multi-a",
        "multi",
        "[{name: http, port: 8080}, {name: metrics, port: 9090}, {name: dns, port: 5353, protocol: UDP}]",
        &[(&a1, READY)],
    ) + &slice(
        "multi-b",
        "multi",
        "[{name: http, port: 8081}, {name: metrics, port: 9091}]",
        &[(&b1, READY)],
    );
    p.apply(&yaml);
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        for (port, a_port, b_port) in [(80, 8080, 8081), (90, 9090, 9091)] {
            let r = tcp(
                &c.ns,
                SocketAddr::new("10.96.0.20".parse().unwrap(), port),
                T,
            )
            .unwrap();
            let expected = if r.pod == "a1" { a_port } else { b_port };
            assert_eq!(r.port, expected, "{r:?} for service port {port}");
            seen.insert((port, r.pod));
        }
    }
    assert_eq!(seen.len(), 4, "both pods answer on both ports: {seen:?}");
    let sock = udp_socket(&c.ns);
    let r = udp_ask(&sock, sa("10.96.0.20:53")).unwrap();
    assert_eq!((r.pod.as_str(), r.port), ("a1", 5353));
    // trace predicts each of these (named ports resolved per slice, UDP too).
    p.probe(&c.ns, c.ip, sa("10.96.0.20:80"), 30);
    p.probe(&c.ns, c.ip, sa("10.96.0.20:90"), 30);
    p.probe_udp(&c.ns, c.ip, sa("10.96.0.20:53"), 5);
}

fn selector_less_service_and_terminating_fallback(mut p: Proxy) {
    let (a1, a2, b1, c) = (
        p.w.pod("a1", false),
        p.w.pod("a2", false),
        p.w.pod("b1", true),
        p.w.pod("c", false),
    );
    for pod in [&a1, &a2, &b1] {
        p.w.serve(pod, 8080);
    }
    // A hand-made slice for a Service without a selector, its endpoint with no nodeName.
    let manual = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ext-1, namespace: default, labels: {{kubernetes.io/service-name: ext}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{}]}}]\n",
        b1.ip
    );
    let yaml = svc("ext", "{clusterIP: 10.96.0.30, ports: [{port: 80}]}")
        + &manual
        + &svc(
            "draining",
            "{clusterIP: 10.96.0.31, ports: [{port: 80, targetPort: 8080}]}",
        )
        + &slice(
            "draining-1",
            "draining",
            "[{port: 8080}]",
            &[
                (&a1, "{ready: false, serving: true, terminating: true}"),
                (&a2, "{ready: false, serving: false, terminating: true}"),
            ],
        );
    p.apply(&yaml);
    assert_eq!(
        names(&who_answers(&c.ns, sa("10.96.0.30:80"), 5)),
        BTreeSet::from(["b1"])
    );
    assert_eq!(
        names(&who_answers(&c.ns, sa("10.96.0.31:80"), 10)),
        BTreeSet::from(["a1"])
    );
    p.probe(&c.ns, c.ip, sa("10.96.0.30:80"), 5);
    p.probe(&c.ns, c.ip, sa("10.96.0.31:80"), 10);
}

fn session_affinity_keeps_a_client_on_one_endpoint(mut p: Proxy) {
    let pods: Vec<Pod> = (1..=4).map(|i| p.w.pod(&format!("a{i}"), i > 2)).collect();
    let c = p.w.pod("c", false);
    for pod in &pods {
        p.w.serve(pod, 8080);
    }
    let eps: Vec<(&Pod, &str)> = pods.iter().map(|p| (p, READY)).collect();
    let yaml = svc(
        "sticky",
        "{clusterIP: 10.96.0.40, ports: [{port: 80, targetPort: 8080}], sessionAffinity: ClientIP}",
    ) + &slice("sticky-1", "sticky", "[{port: 8080}]", &eps)
        + &svc(
            "brief",
            "{clusterIP: 10.96.0.41, ports: [{port: 80, targetPort: 8080}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}}",
        )
        + &slice("brief-1", "brief", "[{port: 8080}]", &eps);
    p.apply(&yaml);
    let seen = who_answers(&c.ns, sa("10.96.0.40:80"), 20);
    assert_eq!(
        seen.len(),
        1,
        "20 connections from one client, one endpoint: {seen:?}"
    );
    // With a 1 s timeout, the choice may change once the client was idle longer than that.
    let mut chosen = BTreeSet::new();
    for _ in 0..7 {
        let first = tcp(&c.ns, sa("10.96.0.41:80"), T).unwrap().pod;
        let again = tcp(&c.ns, sa("10.96.0.41:80"), T).unwrap().pod;
        assert_eq!(first, again, "affinity holds within the timeout");
        chosen.insert(first);
        std::thread::sleep(Duration::from_millis(1300));
    }
    assert!(
        chosen.len() > 1,
        "after idling past the timeout the client is balanced again: {chosen:?}"
    );
    p.probe(&c.ns, c.ip, sa("10.96.0.40:80"), 10);
}

fn nodeport_cluster_and_local_traffic_policy(mut p: Proxy) {
    let (a1, b1, c) = (
        p.w.pod("a1", false),
        p.w.pod("b1", true),
        p.w.pod("c", false),
    );
    p.w.serve(&a1, 8080);
    p.w.serve(&b1, 8080);
    let yaml = svc(
        "np-cluster",
        "{type: NodePort, clusterIP: 10.96.0.50, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}",
    ) + &slice(
        "np-cluster-1",
        "np-cluster",
        "[{port: 8080}]",
        &[(&a1, READY), (&b1, READY)],
    ) + &svc(
        "np-local",
        "{type: NodePort, clusterIP: 10.96.0.51, externalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080, nodePort: 30081}]}",
    ) + &slice(
        "np-local-1",
        "np-local",
        "[{port: 8080}]",
        &[(&a1, READY), (&b1, READY)],
    ) + &svc(
        "np-elsewhere",
        "{type: NodePort, clusterIP: 10.96.0.52, externalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080, nodePort: 30082}]}",
    ) + &slice(
        "np-elsewhere-1",
        "np-elsewhere",
        "[{port: 8080}]",
        &[(&b1, READY)],
    );
    p.apply(&yaml);
    let node_port = |port: u16| SocketAddr::new(NODE_IP.parse().unwrap(), port);
    // Cluster: any endpoint, and the pod sees the node's address.
    let seen = who_answers(&p.w.client, node_port(30080), 30);
    assert_eq!(names(&seen), BTreeSet::from(["a1", "b1"]));
    for _ in 0..5 {
        let r = tcp(&p.w.client, node_port(30080), T).unwrap();
        assert_ne!(
            r.peer.to_string(),
            CLIENT_IP,
            "masqueraded under Cluster policy"
        );
    }
    // Local: only this node's endpoint, and the pod sees the real client.
    for _ in 0..10 {
        let r = tcp(&p.w.client, node_port(30081), T).unwrap();
        assert_eq!(
            (r.pod.as_str(), r.peer.to_string().as_str()),
            ("a1", CLIENT_IP)
        );
    }
    // Local with no endpoint on this node: dropped (a timeout, not a refusal)...
    let e = tcp(&p.w.client, node_port(30082), Duration::from_millis(700)).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ),
        "{e:?}"
    );
    // ...while pods on this node still reach the Service through its ClusterIP and NodePort.
    assert_eq!(tcp(&c.ns, sa("10.96.0.52:80"), T).unwrap().pod, "b1");
    assert_eq!(tcp(&c.ns, node_port(30082), T).unwrap().pod, "b1");
    // trace predicts each of these.
    for port in [30080, 30081, 30082] {
        p.probe(&p.w.client, client_ip(), node_port(port), 30);
        p.probe(&c.ns, c.ip, node_port(port), 30);
    }
    p.probe(&c.ns, c.ip, sa("10.96.0.52:80"), 5);
}

fn load_balancer_ip_and_external_ip(mut p: Proxy) {
    let (a1, b1) = (p.w.pod("a1", false), p.w.pod("b1", true));
    p.w.serve(&a1, 8080);
    p.w.serve(&b1, 8080);
    let yaml = svc(
        "lb",
        "{type: LoadBalancer, clusterIP: 10.96.0.60, externalIPs: [198.51.100.20], ports: [{port: 80, targetPort: 8080, nodePort: 30090}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}",
    ) + &slice(
        "lb-1",
        "lb",
        "[{port: 8080}]",
        &[(&a1, READY), (&b1, READY)],
    );
    p.apply(&yaml);
    for addr in ["198.51.100.10:80", "198.51.100.20:80"] {
        let seen = who_answers(&p.w.client, sa(addr), 20);
        assert_eq!(
            names(&seen),
            BTreeSet::from(["a1", "b1"]),
            "{addr}: {seen:?}"
        );
        p.probe(&p.w.client, client_ip(), sa(addr), 30);
    }
    p.probe(
        &p.w.client,
        client_ip(),
        SocketAddr::new(node_ip(), 30090),
        30,
    );
}

fn no_endpoints_and_unknown_ports_are_refused_at_once(mut p: Proxy) {
    let (a1, c) = (p.w.pod("a1", false), p.w.pod("c", false));
    p.w.serve(&a1, 8080);
    let yaml = svc(
        "empty",
        "{type: NodePort, clusterIP: 10.96.0.70, ports: [{port: 80, nodePort: 30070}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]}",
    ) + &svc(
        "one-port",
        "{clusterIP: 10.96.0.71, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice("one-port-1", "one-port", "[{port: 8080}]", &[(&a1, READY)]);
    p.apply(&yaml);
    // "At once" without a clock: a refusal is an answer (a TCP reset, or ICMP unreachable),
    // where a dropped SYN would only time out; the deadline is generous and never reached.
    let refused_fast = |ns: &str, to: SocketAddr| {
        let e = tcp(ns, to, Duration::from_secs(20)).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "{to} from {ns}: {e:?}"
        );
    };
    refused_fast(&c.ns, sa("10.96.0.70:80"));
    refused_fast(&p.w.node, sa("10.96.0.70:80"));
    refused_fast(
        &p.w.client,
        SocketAddr::new(NODE_IP.parse().unwrap(), 30070),
    );
    // A port the Service does not have, on a ClusterIP that works.
    assert_eq!(tcp(&c.ns, sa("10.96.0.71:80"), T).unwrap().pod, "a1");
    refused_fast(&c.ns, sa("10.96.0.71:81"));
    // trace predicts each of these.
    p.probe(&c.ns, c.ip, sa("10.96.0.70:80"), 1);
    p.probe(&p.w.node, node_ip(), sa("10.96.0.70:80"), 1);
    p.probe(
        &p.w.client,
        client_ip(),
        SocketAddr::new(node_ip(), 30070),
        1,
    );
    p.probe(&c.ns, c.ip, sa("10.96.0.71:80"), 3);
    p.probe(&c.ns, c.ip, sa("10.96.0.71:81"), 1);
    p.probe_udp(&c.ns, c.ip, sa("10.96.0.70:53"), 1);
    // A ping to a ClusterIP: refused (ICMP port unreachable), with or without endpoints.
    p.ping_agrees(&c.ns, c.ip, "10.96.0.71".parse().unwrap());
    p.ping_agrees(&c.ns, c.ip, "10.96.0.70".parse().unwrap());
    // UDP: ICMP port unreachable, seen by a connected socket.
    let e = in_ns(&c.ns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.connect("10.96.0.70:53")?;
        s.send(b"x")?;
        s.recv(&mut [0u8; 64])
    })
    .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e:?}");
}

fn hairpin_a_pod_reaches_itself_through_its_service(mut p: Proxy) {
    let a1 = p.w.pod("a1", false);
    p.w.serve(&a1, 8080);
    let yaml = svc(
        "self",
        "{clusterIP: 10.96.0.80, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice("self-1", "self", "[{port: 8080}]", &[(&a1, READY)]);
    p.apply(&yaml);
    let r = tcp(&a1.ns, sa("10.96.0.80:80"), T).unwrap();
    assert_eq!(r.pod, "a1");
    assert_ne!(
        r.peer, a1.ip,
        "hairpin traffic is masqueraded, so the reply comes back through the node"
    );
    assert_eq!(
        p.probe(&a1.ns, a1.ip, sa("10.96.0.80:80"), 3),
        Observed::Reached(BTreeMap::from([("a1".to_string(), Some(true))]))
    );
}

fn live_updates_under_load_lose_no_connection(mut p: Proxy) {
    let pods: Vec<Pod> = (1..=4).map(|i| p.w.pod(&format!("a{i}"), i == 4)).collect();
    let c = p.w.pod("c", false);
    for pod in &pods {
        p.w.serve(pod, 8080);
    }
    let config = |eps: &[usize]| {
        let eps: Vec<(&Pod, &str)> = eps.iter().map(|&i| (&pods[i], READY)).collect();
        svc(
            "busy",
            "{clusterIP: 10.96.0.90, ports: [{port: 80, targetPort: 8080}]}",
        ) + &slice("busy-1", "busy", "[{port: 8080}]", &eps)
            + &svc(
                "other",
                "{clusterIP: 10.96.0.91, ports: [{port: 80, targetPort: 8080}]}",
            )
            + &slice(
                "other-1",
                "other",
                "[{port: 8080}]",
                &[(&pods[0], READY), (&pods[1], READY), (&pods[2], READY)],
            )
    };
    p.apply(&config(&[0, 1]));
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, ns) = (stop.clone(), c.ns.clone());
    let load = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            match tcp(&ns, sa("10.96.0.90:80"), T) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    });
    let steps: [&[usize]; 6] = [
        &[0, 1, 3],
        &[1, 3],
        &[1, 2, 3],
        &[2, 3],
        &[0, 2],
        &[0, 1, 2, 3],
    ];
    for eps in steps {
        std::thread::sleep(Duration::from_millis(300));
        let r = p.apply(&config(eps));
        assert_eq!(r.kind, SyncKind::Partial, "{r:?}");
        match p.mode {
            Mode::Nftables => assert!(
                r.elements_added + r.elements_deleted <= 10,
                "element operations only: {r:?}"
            ),
            // The Service's endpoint chain, and the chain of a local endpoint that came or went.
            Mode::Iptables(_) => assert!(r.chains_changed <= 3, "only busy's chains: {r:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 50, "the client made {ok} connections");
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    // After the last partial sync, trace (on the last inputs) and the kernel agree.
    p.probe(&c.ns, c.ip, sa("10.96.0.90:80"), 60);
    p.probe(&c.ns, c.ip, sa("10.96.0.91:80"), 40);
}

fn a_refused_transaction_leaves_the_previous_rules_in_place(mut p: Proxy) {
    let (a1, c) = (p.w.pod("a1", false), p.w.pod("c", false));
    p.w.serve(&a1, 8080);
    let yaml = svc(
        "keep",
        "{clusterIP: 10.96.0.100, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice("keep-1", "keep", "[{port: 8080}]", &[(&a1, READY)]);
    p.apply(&yaml);
    // A ruleset the kernel refuses (a jump to a chain that does not exist), next to a change
    // (another Service, refused for lack of endpoints) that would be fine on its own.
    let with_new = yaml.clone() + &svc("new", "{clusterIP: 10.96.0.101, ports: [{port: 80}]}");
    let plan = p.plan_of(&with_new);
    let sabotage = |rules: Rules<'_>| match rules {
        Rules::Nftables(bad) => {
            let map = bad.tables[0]
                .sets
                .iter_mut()
                .find(|s| s.name == "service-ips")
                .unwrap();
            map.elements.push(Element::map(
                vec![
                    Value::Addr("10.96.0.102".parse().unwrap()),
                    Value::Proto(svcproxy::model::Protocol::Tcp),
                    Value::Port(80),
                ],
                Data::Verdict(Verdict::Goto("no-such-chain".into())),
            ));
        }
        Rules::Iptables(bad) => {
            let nat = &mut bad.families[0].tables[0];
            let services = nat
                .chains
                .iter_mut()
                .find(|c| c.name == "SVCP-SERVICES")
                .unwrap();
            services
                .rules
                .push("-d 10.96.0.102/32 -p tcp -m tcp --dport 80 -j SVCP-NO-SUCH-CHAIN".into());
        }
    };
    for attempt in ["partial", "full"] {
        let err = p
            .backend
            .apply_edited(&plan, sabotage)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-chain")
                || err.contains("No such file or directory")
                || err.contains("SVCP-NO-SUCH-CHAIN"),
            "{attempt}: the tool's own message: {err}"
        );
        assert_eq!(
            tcp(&c.ns, sa("10.96.0.100:80"), T).unwrap().pod,
            "a1",
            "{attempt}: old rules still answer"
        );
        let e = tcp(&c.ns, sa("10.96.0.101:80"), Duration::from_millis(500)).unwrap_err();
        assert_ne!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "{attempt}: none of the refused change took effect"
        );
    }
    // After a failure the next apply is a full one, and it works.
    let r = p.backend.apply(&p.plan_of(&yaml)).unwrap();
    assert_eq!(r.kind, SyncKind::Full);
    assert_eq!(tcp(&c.ns, sa("10.96.0.100:80"), T).unwrap().pod, "a1");
}

/// A UDP socket bound to `[::]` in namespace `ns` (it stays there), as [`udp_socket`] for IPv4.
fn udp_socket6(ns: &str) -> std::net::UdpSocket {
    in_ns(ns, || {
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    })
}

/// Clients that keep their UDP socket, as resolvers do, follow the Service's endpoint at once:
/// when it gains its first one and when it is replaced. On both families of a dual-stack
/// Service, through its ClusterIPs (from a pod) and its NodePort (from outside the cluster);
/// an unrelated UDP flow keeps its conntrack entry.
fn stale_udp_flows_move_to_the_new_endpoint(mut p: Proxy) {
    let (a1, a2, k, c) = (
        p.w.pod("a1", false),
        p.w.pod("a2", false),
        p.w.pod("k", false),
        p.w.pod("c", false),
    );
    for pod in [&a1, &a2, &k] {
        p.w.serve(pod, 5353);
    }
    let endpoints = |pod: Option<&Pod>, v6: bool| -> String {
        pod.map(|p| {
            let ip = if v6 { p.ip6 } else { p.ip };
            format!(
                "{{addresses: ['{ip}'], nodeName: {}, conditions: {READY}}}",
                p.node
            )
        })
        .unwrap_or_default()
    };
    let dns = |pod: Option<&Pod>| {
        svc(
            "dns",
            "{type: NodePort, clusterIP: 10.96.0.110, clusterIPs: [10.96.0.110, 'fd00:96::110'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{port: 53, protocol: UDP, targetPort: 5353, nodePort: 30110}]}",
        ) + &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-v4, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{port: 5353, protocol: UDP}}]\nendpoints: [{}]\n",
            endpoints(pod, false)
        ) + &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-v6, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv6\nports: [{{port: 5353, protocol: UDP}}]\nendpoints: [{}]\n",
            endpoints(pod, true)
        ) + &svc(
            "keep",
            "{clusterIP: 10.96.0.111, ports: [{port: 53, protocol: UDP, targetPort: 5353}]}",
        ) + &slice(
            "keep-1",
            "keep",
            "[{port: 5353, protocol: UDP}]",
            &[(&k, READY)],
        )
    };
    // Each client keeps one socket throughout: (socket, destination, what it is).
    let node_port = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 30110);
    let clients = [
        (udp_socket(&c.ns), sa("10.96.0.110:53"), "IPv4 ClusterIP"),
        (
            udp_socket6(&c.ns),
            sa("[fd00:96::110]:53"),
            "IPv6 ClusterIP",
        ),
        (udp_socket(&p.w.client), node_port(NODE_IP), "IPv4 NodePort"),
        (
            udp_socket6(&p.w.client),
            node_port(NODE_IP6),
            "IPv6 NodePort",
        ),
    ];
    let keeper = udp_socket(&c.ns);
    let answers = |clients: &[(std::net::UdpSocket, SocketAddr, &str)]| -> Vec<String> {
        clients
            .iter()
            .map(|(sock, to, what)| match udp_ask(sock, *to) {
                Ok(r) => format!("{what}: {}", r.pod),
                Err(_) => format!("{what}: no answer"),
            })
            .collect()
    };
    let expect = |pod: &str| -> Vec<String> {
        clients
            .iter()
            .map(|(_, _, what)| format!("{what}: {pod}"))
            .collect()
    };
    p.apply(&dns(None));
    assert_eq!(answers(&clients), expect("no answer"), "no endpoint yet");
    assert_eq!(udp_ask(&keeper, sa("10.96.0.111:53")).unwrap().pod, "k");
    // The Service gains its first endpoint: the same sockets reach it at once.
    p.apply(&dns(Some(&a1)));
    assert_eq!(answers(&clients), expect("a1"));
    // The endpoint is replaced (a1 keeps running: only the rules and conntrack decide).
    let r = p.apply(&dns(Some(&a2)));
    assert_eq!(r.kind, SyncKind::Partial);
    // The flows to a1 are gone from conntrack; the unrelated one to `keep` is not.
    let conntrack = p.backend.mode().conntrack().unwrap();
    let flows: Vec<UdpFlow> = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .flat_map(|f| conntrack.udp_flows(f).unwrap())
        .collect();
    assert!(
        !flows
            .iter()
            .any(|f| f.reply_src == a1.ip || f.reply_src == a1.ip6),
        "{flows:?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f.orig_dst == sa("10.96.0.111:53").ip() && f.reply_src == k.ip && f.dnat),
        "{flows:?}"
    );
    for _ in 0..3 {
        assert_eq!(answers(&clients), expect("a2"));
    }
    p.probe_udp(&c.ns, c.ip, sa("10.96.0.110:53"), 3);
}

/// What svcproxy has in the node namespace: (`ip svcproxy` table present, SVCP rule lines in
/// iptables-legacy, in iptables-nft).
fn svcproxy_rules(p: &Proxy) -> (bool, usize, usize) {
    let tables = p.node_sh(&["nft", "list", "tables"]);
    let count = |v: Variant| {
        p.node_sh(&[&format!("iptables-{v}-save")])
            .lines()
            .filter(|l| l.contains("SVCP-"))
            .count()
    };
    (
        tables.contains("table ip svcproxy"),
        count(Variant::Legacy),
        count(Variant::Nft),
    )
}

/// Runs the svcproxy binary in the node namespace; panics with its stderr if it fails.
fn svcproxy_cmd(p: &Proxy, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &p.w.node, env!("CARGO_BIN_EXE_svcproxy")])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `svcproxy apply` of `file` in `mode`.
fn apply_cmd(p: &Proxy, file: &std::path::Path, mode: Mode) {
    let mut args = vec![
        "apply",
        "--from",
        file.to_str().unwrap(),
        "--node",
        "node-a",
        "--node-ip",
        NODE_IP,
    ];
    args.extend(mode.flags());
    svcproxy_cmd(p, &args);
}

fn apply_and_cleanup_commands_leave_other_rules_alone(mut p: Proxy) {
    let (a1, c) = (p.w.pod("a1", false), p.w.pod("c", false));
    p.w.serve(&a1, 8080);
    // A host firewall of someone else's, with a rule and a counter.
    let fw = "table inet hostfw {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 9999 counter drop\n }\n}\n";
    NftCommand::in_netns(&p.w.node).run_script(fw).unwrap();
    // Someone else's iptables rules in nat: kube-proxy's chain name, and a jump into it.
    let variant = match p.mode {
        Mode::Iptables(v) => v,
        Mode::Nftables => Variant::Legacy,
    };
    let ipt = format!("iptables-{variant}");
    p.node_sh(&[&ipt, "-t", "nat", "-N", "KUBE-SERVICES"]);
    p.node_sh(&[
        &ipt,
        "-t",
        "nat",
        "-A",
        "KUBE-SERVICES",
        "-p",
        "tcp",
        "--dport",
        "9999",
        "-j",
        "RETURN",
    ]);
    p.node_sh(&[&ipt, "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
    let foreign = |p: &Proxy| {
        let save = p.node_sh(&[&format!("{ipt}-save"), "-t", "nat"]);
        let tables = p.node_sh(&["nft", "list", "ruleset"]);
        assert!(
            save.contains("-A KUBE-SERVICES -p tcp -m tcp --dport 9999 -j RETURN")
                && save.contains("-A PREROUTING -j KUBE-SERVICES"),
            "{save}"
        );
        assert!(
            tables.contains("table inet hostfw") && tables.contains("tcp dport 9999 counter"),
            "{tables}"
        );
        save
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(
        &file,
        svc(
            "web",
            "{clusterIP: 10.96.0.120, ports: [{port: 80, targetPort: 8080}]}",
        ) + &slice("web-1", "web", "[{port: 8080}]", &[(&a1, READY)]),
    )
    .unwrap();
    apply_cmd(&p, &file, p.mode);
    assert_eq!(tcp(&c.ns, sa("10.96.0.120:80"), T).unwrap().pod, "a1");
    // Applying again replaces svcproxy's rules, not anyone else's, and adds no second jump.
    apply_cmd(&p, &file, p.mode);
    assert_eq!(tcp(&c.ns, sa("10.96.0.120:80"), T).unwrap().pod, "a1");
    let save = foreign(&p);
    match p.mode {
        Mode::Nftables => assert!(p.node_sh(&["nft", "list", "tables"]).contains("table ip svcproxy")),
        Mode::Iptables(_) => assert_eq!(
            save.matches("-A PREROUTING -m comment --comment \"svcproxy: Kubernetes Services\" -j SVCP-SERVICES").count(),
            1,
            "{save}"
        ),
    }
    svcproxy_cmd(&p, &["cleanup"]);
    assert_eq!(svcproxy_rules(&p), (false, 0, 0));
    foreign(&p);
    assert!(tcp(&c.ns, sa("10.96.0.120:80"), Duration::from_millis(500)).is_err());
}

fn switching_modes_removes_the_other_modes_rules(mut p: Proxy) {
    let (a1, c) = (p.w.pod("a1", false), p.w.pod("c", false));
    p.w.serve(&a1, 8080);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(
        &file,
        svc(
            "web",
            "{clusterIP: 10.96.0.130, ports: [{port: 80, targetPort: 8080}]}",
        ) + &slice("web-1", "web", "[{port: 8080}]", &[(&a1, READY)]),
    )
    .unwrap();
    // Every other mode first, then this test's: each start leaves only its own rules.
    let mut modes: Vec<Mode> = [
        Mode::Nftables,
        Mode::Iptables(Variant::Legacy),
        Mode::Iptables(Variant::Nft),
    ]
    .into_iter()
    .filter(|m| *m != p.mode)
    .collect();
    modes.push(p.mode);
    for mode in modes {
        apply_cmd(&p, &file, mode);
        let (nft, legacy, ipt_nft) = svcproxy_rules(&p);
        assert_eq!(
            (nft, legacy > 0, ipt_nft > 0),
            (
                mode == Mode::Nftables,
                mode == Mode::Iptables(Variant::Legacy),
                mode == Mode::Iptables(Variant::Nft)
            ),
            "after applying in {mode:?}"
        );
        assert_eq!(
            tcp(&c.ns, sa("10.96.0.130:80"), T).unwrap().pod,
            "a1",
            "{mode:?}"
        );
    }
    // The agent's backend, started in this mode, finds nothing of the others either.
    p.apply(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(tcp(&c.ns, sa("10.96.0.130:80"), T).unwrap().pod, "a1");
}

/// `--iptables-variant auto` in a namespace: the kubelet's marker chain wins, else the variant
/// holding more rules.
#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn variant_detection_follows_what_the_node_uses() {
    use svcproxy::iptables::detect;
    if !have_tools(Mode::Iptables(Variant::Legacy)) || !have_tools(Mode::Iptables(Variant::Nft)) {
        common::cannot_run("variant detection needs both iptables variants");
    }
    let Some(p) = Proxy::new(Mode::Nftables) else {
        return;
    };
    let runner = svcproxy::process::Runner::in_netns(&p.w.node);
    let chosen = || detect::decide(&detect::evidence(&runner)).unwrap();
    // Two rules in legacy's filter table: legacy holds more.
    for port in ["1", "2"] {
        p.node_sh(&[
            "iptables-legacy",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "ACCEPT",
        ]);
    }
    let (v, why) = chosen();
    assert_eq!(v, Variant::Legacy, "{why}");
    // Three in nft's: nft holds more.
    for port in ["1", "2", "3"] {
        p.node_sh(&[
            "iptables-nft",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "ACCEPT",
        ]);
    }
    let (v, why) = chosen();
    assert_eq!(v, Variant::Nft, "{why}");
    // The kubelet's marker chain in legacy's mangle table decides, whatever the counts.
    p.node_sh(&[
        "iptables-legacy",
        "-t",
        "mangle",
        "-N",
        "KUBE-IPTABLES-HINT",
    ]);
    let (v, why) = chosen();
    assert_eq!(v, Variant::Legacy, "{why}");
    assert!(why.contains("kubelet"), "{why}");
}

/// The proxy's Node, in a zone, with its pod CIDR.
fn node_a(zone: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\nspec: {{podCIDRs: [10.244.1.0/24]}}\n"
    )
}

/// An EndpointSlice whose endpoints carry topology hints: (pod, zone of the endpoint, hints in
/// YAML flow form or "" for none).
fn hinted_slice(name: &str, service: &str, eps: &[(&Pod, &str, &str)]) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|(p, zone, hints)| {
            let hints = if hints.is_empty() {
                String::new()
            } else {
                format!(", hints: {hints}")
            };
            format!(
                "{{addresses: [{}], nodeName: {}, zone: {zone}, conditions: {READY}{hints}}}",
                p.ip, p.node
            )
        })
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

/// Zone hints (`trafficDistribution: PreferClose` / `PreferSameZone`, `topology-mode: Auto`:
/// the EndpointSlice controller writes `hints.forZones`), as kube-proxy follows them
/// (pkg/proxy/topology.go): this node is in zone-a, so its traffic goes to the endpoints
/// hinted for zone-a, wherever they run, from pods and from outside (NodePort, Cluster
/// policy) alike. One ready endpoint without a hint, and every endpoint is used again.
/// internalTrafficPolicy Local wins over hints.
fn zone_hints_keep_traffic_in_the_zone_and_fall_back_when_incomplete(mut p: Proxy) {
    let (a1, b1, b2, c) = (
        p.w.pod("a1", false),
        p.w.pod("b1", true),
        p.w.pod("b2", true),
        p.w.pod("c", false),
    );
    for pod in [&a1, &b1, &b2] {
        p.w.serve(pod, 8080);
    }
    let za = "{forZones: [{name: zone-a}]}";
    let zb = "{forZones: [{name: zone-b}]}";
    let services = svc(
        "close",
        "{type: NodePort, clusterIP: 10.96.0.70, trafficDistribution: PreferClose, ports: [{port: 80, targetPort: 8080, nodePort: 30070}]}",
    ) + &svc(
        "close-local",
        "{clusterIP: 10.96.0.71, internalTrafficPolicy: Local, trafficDistribution: PreferClose, ports: [{port: 80, targetPort: 8080}]}",
    );
    let hinted = |b2_hints: &str| {
        hinted_slice(
            "close-1",
            "close",
            &[
                (&a1, "zone-a", za),
                (&b1, "zone-a", za),
                (&b2, "zone-b", b2_hints),
            ],
        ) + &hinted_slice(
            // a1 (on this node) hinted for the other zone: Local policy still picks it.
            "close-local-1",
            "close-local",
            &[(&a1, "zone-a", zb), (&b1, "zone-a", za)],
        )
    };
    p.apply(&(services.clone() + &node_a("zone-a") + &hinted(zb)));
    let zone_a = BTreeSet::from(["a1", "b1"]);
    let seen = who_answers(&c.ns, sa("10.96.0.70:80"), 40);
    assert_eq!(names(&seen), zone_a, "from a pod: {seen:?}");
    let node_port = SocketAddr::new(NODE_IP.parse().unwrap(), 30070);
    let seen = who_answers(&p.w.client, node_port, 40);
    assert_eq!(names(&seen), zone_a, "from outside, NodePort: {seen:?}");
    let seen = who_answers(&c.ns, sa("10.96.0.71:80"), 10);
    assert_eq!(names(&seen), BTreeSet::from(["a1"]), "iTP Local: {seen:?}");
    p.probe(&c.ns, c.ip, sa("10.96.0.70:80"), 40);
    p.probe(&p.w.client, client_ip(), node_port, 40);
    p.probe(&c.ns, c.ip, sa("10.96.0.71:80"), 10);

    // b2 loses its hint (the controller mid-update): hints are all or nothing.
    p.apply(&(services.clone() + &node_a("zone-a") + &hinted("")));
    let all = BTreeSet::from(["a1", "b1", "b2"]);
    let seen = who_answers(&c.ns, sa("10.96.0.70:80"), 60);
    assert_eq!(names(&seen), all, "incomplete hints: {seen:?}");
    p.probe(&c.ns, c.ip, sa("10.96.0.70:80"), 60);

    // A node in a zone no endpoint is hinted for: every endpoint too.
    p.apply(&(services + &node_a("zone-c") + &hinted(zb)));
    let seen = who_answers(&c.ns, sa("10.96.0.70:80"), 60);
    assert_eq!(names(&seen), all, "no hint for this zone: {seen:?}");
    p.probe(&c.ns, c.ip, sa("10.96.0.70:80"), 60);
}

/// Node hints (`trafficDistribution: PreferSameNode`: `hints.forNodes`): when every ready
/// endpoint has one and some name this node, only those are used (kube-proxy 1.35, where the
/// PreferSameTrafficDistribution gate is locked on). One endpoint without a node hint: the
/// zone hints decide instead.
fn node_hints_keep_traffic_on_the_node(mut p: Proxy) {
    let (a1, b1, b2, c) = (
        p.w.pod("a1", false),
        p.w.pod("b1", true),
        p.w.pod("b2", true),
        p.w.pod("c", false),
    );
    for pod in [&a1, &b1, &b2] {
        p.w.serve(pod, 8080);
    }
    let yaml = |b1_hints: &str| {
        svc(
            "same-node",
            "{clusterIP: 10.96.0.72, trafficDistribution: PreferSameNode, ports: [{port: 80, targetPort: 8080}]}",
        ) + &node_a("zone-a")
            + &hinted_slice(
                "same-node-1",
                "same-node",
                &[
                    (
                        &a1,
                        "zone-a",
                        "{forNodes: [{name: node-a}], forZones: [{name: zone-a}]}",
                    ),
                    (&b1, "zone-a", b1_hints),
                    (
                        &b2,
                        "zone-b",
                        "{forNodes: [{name: node-b}], forZones: [{name: zone-b}]}",
                    ),
                ],
            )
    };
    p.apply(&yaml(
        "{forNodes: [{name: node-b}], forZones: [{name: zone-a}]}",
    ));
    let seen = who_answers(&c.ns, sa("10.96.0.72:80"), 20);
    assert_eq!(names(&seen), BTreeSet::from(["a1"]), "{seen:?}");
    let seen = who_answers(&p.w.client, sa("10.96.0.72:80"), 10);
    assert_eq!(
        names(&seen),
        BTreeSet::from(["a1"]),
        "from outside: {seen:?}"
    );
    p.probe(&c.ns, c.ip, sa("10.96.0.72:80"), 20);
    p.probe(&p.w.client, client_ip(), sa("10.96.0.72:80"), 10);

    p.apply(&yaml("{forZones: [{name: zone-a}]}"));
    let seen = who_answers(&c.ns, sa("10.96.0.72:80"), 40);
    assert_eq!(
        names(&seen),
        BTreeSet::from(["a1", "b1"]),
        "a node hint missing, zone hints: {seen:?}"
    );
    p.probe(&c.ns, c.ip, sa("10.96.0.72:80"), 40);
}

/// `detectLocalMode` decides which sources are pods: their ClusterIP traffic keeps its
/// source address, everything else is masqueraded; and pods reach an externalTrafficPolicy
/// Local NodePort through any endpoint while outside clients are dropped without a local one.
/// Pods here sit behind veths named `vpK` (pod c is `vp1`, d is `vp2`), like a ptp CNI.
fn detect_local_modes_decide_which_sources_are_pods(mut p: Proxy) {
    let (c, d, b1) = (
        p.w.pod("c", false),
        p.w.pod("d", false),
        p.w.pod("b1", true),
    );
    p.w.serve(&b1, 8080);
    let yaml = svc(
        "web",
        "{clusterIP: 10.96.0.80, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice("web-1", "web", "[{port: 8080}]", &[(&b1, READY)])
        + &svc(
            "elsewhere",
            "{type: NodePort, clusterIP: 10.96.0.81, externalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080, nodePort: 30081}]}",
        )
        + &slice(
            "elsewhere-1",
            "elsewhere",
            "[{port: 8080}]",
            &[(&b1, READY)],
        )
        + &node_a("zone-a");
    let node_port = SocketAddr::new(NODE_IP.parse().unwrap(), 30081);
    for (flags, pods, not_pods) in [
        (
            &[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "vp",
            ][..],
            vec![&c, &d],
            vec![],
        ),
        (
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "vp1",
            ][..],
            vec![&c],
            vec![&d],
        ),
        (
            &["--detect-local-mode", "NodeCIDR"][..],
            vec![&c, &d],
            vec![],
        ),
    ] {
        p.apply_with(&yaml, flags);
        for pod in &pods {
            let r = tcp(&pod.ns, sa("10.96.0.80:80"), T).unwrap();
            assert_eq!(
                r.peer, pod.ip,
                "{flags:?}: {} is a pod: not masqueraded",
                pod.name
            );
            let r = tcp(&pod.ns, node_port, T).unwrap();
            assert_eq!(
                r.pod, "b1",
                "{flags:?}: {} short-circuits eTP Local",
                pod.name
            );
        }
        for pod in &not_pods {
            let r = tcp(&pod.ns, sa("10.96.0.80:80"), T).unwrap();
            assert_ne!(r.peer, pod.ip, "{flags:?}: {} is not a pod here", pod.name);
        }
        let r = tcp(&p.w.client, sa("10.96.0.80:80"), T).unwrap();
        assert_ne!(
            r.peer.to_string(),
            CLIENT_IP,
            "{flags:?}: outside is masqueraded"
        );
        let e = tcp(&p.w.client, node_port, Duration::from_millis(700)).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{flags:?}: eTP Local without a local endpoint drops outside clients: {e:?}"
        );
        // trace predicts each of these (pod c arrives on vp1, d on vp2).
        for (pod, iif) in [(&c, "vp1"), (&d, "vp2")] {
            for to in [sa("10.96.0.80:80"), node_port] {
                p.probe_via(&pod.ns, pod.ip, Some(iif), to, 3);
            }
        }
        p.probe(&p.w.client, client_ip(), sa("10.96.0.80:80"), 3);
        p.probe(&p.w.client, client_ip(), node_port, 1);
    }
}

// loadBalancerSourceRanges (kube-proxy's TestLoadBalancer "firewall" flows and
// TestOverallNFTablesRules' firewall-ips): only sources in the ranges reach the load-balancer
// IP, pods included; NodePorts are not guarded; the node is allowed when its IP is in the
// ranges, and so is traffic whose source is the LB IP itself.
fn load_balancer_source_ranges_guard_the_load_balancer_ip(mut p: Proxy) {
    let (a1, c) = (p.w.pod("a1", false), p.w.pod("c", false));
    p.w.serve(&a1, 8080);
    let lb = sa("198.51.100.30:80");
    let yaml = |ranges: &str| {
        svc(
            "guarded",
            &format!(
                "{{type: LoadBalancer, clusterIP: 10.96.0.90, loadBalancerSourceRanges: {ranges}, ports: [{{port: 80, targetPort: 8080, nodePort: 30095}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.51.100.30}}]}}}}"
            ),
        ) + &slice("guarded-1", "guarded", "[{port: 8080}]", &[(&a1, READY)])
    };
    // Only the client: the pod and the node are outside the ranges.
    p.apply(&yaml(r#"["203.0.113.2/32"]"#));
    assert_eq!(tcp(&p.w.client, lb, T).unwrap().pod, "a1");
    assert!(
        dropped(&c.ns, lb),
        "a pod outside the ranges reached the LB IP"
    );
    assert!(
        dropped(&p.w.node, lb),
        "the node outside the ranges reached the LB IP"
    );
    // NodePorts and the ClusterIP are not guarded.
    let node_port = SocketAddr::new(NODE_IP.parse().unwrap(), 30095);
    assert_eq!(tcp(&c.ns, node_port, T).unwrap().pod, "a1");
    assert_eq!(tcp(&c.ns, sa("10.96.0.90:80"), T).unwrap().pod, "a1");
    // trace predicts each of these.
    p.probe(&p.w.client, client_ip(), lb, 3);
    p.probe(&c.ns, c.ip, lb, 1);
    p.probe(&p.w.node, node_ip(), lb, 1);
    p.probe(&c.ns, c.ip, node_port, 3);
    p.probe(&c.ns, c.ip, sa("10.96.0.90:80"), 3);
    // Ranges with whitespace around them are valid.
    p.apply(&yaml(r#"[" 198.18.0.0/15 "]"#));
    assert!(
        dropped(&p.w.client, lb),
        "a client outside the ranges reached the LB IP"
    );
    p.probe(&p.w.client, client_ip(), lb, 1);
    // The LB IP held by the node (a VIP-like load balancer): the node's requests to it come
    // from the LB IP itself. Allowed only when the node's own IP is in the ranges.
    p.node_sh(&["ip", "addr", "add", "198.51.100.30/32", "dev", "lo"]);
    p.apply(&yaml(r#"["203.0.113.2/32"]"#));
    assert!(
        dropped(&p.w.node, lb),
        "the node outside the ranges reached its LB IP"
    );
    p.apply(&yaml(r#"[" 203.0.113.0/24", "10.244.1.0/24"]"#));
    assert_eq!(tcp(&p.w.node, lb, T).unwrap().pod, "a1");
    assert_eq!(tcp(&c.ns, lb, T).unwrap().pod, "a1");
    assert_eq!(tcp(&p.w.client, lb, T).unwrap().pod, "a1");
    p.probe(&c.ns, c.ip, lb, 3);
    p.probe(&p.w.client, client_ip(), lb, 3);
}

// Traffic to an address of the Service CIDRs (a ServiceCIDR object) that no Service holds is
// dropped (kube-proxy's nftables "cluster-ips-check"); an allocated ClusterIP on a port it
// lacks is still refused at once.
fn unallocated_cluster_ips_are_dropped(mut p: Proxy) {
    let (a1, c) = (p.w.pod("a1", false), p.w.pod("c", false));
    p.w.serve(&a1, 8080);
    // Without the drop, 10.96.0.99 would be routed on, to a host that answers on it.
    let outside = Pod {
        name: "outside".into(),
        ns: p.w.client.clone(),
        ip: "10.96.0.99".parse().unwrap(),
        ip6: "fd00:96::99".parse().unwrap(),
        node: "none",
    };
    sh(&[
        "ip",
        "-n",
        &p.w.client,
        "addr",
        "add",
        "10.96.0.99/32",
        "dev",
        "lo",
    ]);
    p.w.serve(&outside, 80);
    let yaml = svc(
        "web",
        "{clusterIP: 10.96.0.80, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice("web-1", "web", "[{port: 8080}]", &[(&a1, READY)]);
    p.apply(&yaml);
    assert_eq!(tcp(&c.ns, sa("10.96.0.99:80"), T).unwrap().pod, "outside");
    p.apply(
        &(yaml
            + "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16]}\n"),
    );
    for ns in [c.ns.clone(), p.w.node.clone()] {
        assert_eq!(tcp(&ns, sa("10.96.0.80:80"), T).unwrap().pod, "a1");
        let e = tcp(&ns, sa("10.96.0.80:81"), T).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "from {ns}: {e:?}"
        );
        assert!(dropped(&ns, sa("10.96.0.99:80")), "from {ns}: not dropped");
    }
    for (ns, src) in [(c.ns.clone(), c.ip), (p.w.node.clone(), node_ip())] {
        p.probe(&ns, src, sa("10.96.0.80:80"), 3);
        p.probe(&ns, src, sa("10.96.0.80:81"), 1);
        p.probe(&ns, src, sa("10.96.0.99:80"), 1);
        // A ping to an unallocated ClusterIP is dropped too; to an allocated one, refused.
        p.ping_agrees(&ns, src, "10.96.0.99".parse().unwrap());
        p.ping_agrees(&ns, src, "10.96.0.80".parse().unwrap());
    }
}

/// Opens a TCP connection from the client straight to `pod` (no Service), reads the server's
/// reply, makes the node's conntrack forget it, then writes again: with
/// `nf_conntrack_tcp_loose=0` these segments (and the pod's reset) are INVALID. `true` when
/// they are dropped in forward (no reset comes back within the deadline).
fn stray_segments_dropped(p: &Proxy, pod: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut s = in_ns(&p.w.client, move || {
        std::net::TcpStream::connect_timeout(&pod, T)
    })
    .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    p.node_sh(&["conntrack", "-F"]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if s.write_all(b"x").is_err() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

// ctstate INVALID: kube-proxy's iptables mode drops it in forward (KUBE-FORWARD) unless
// conntrack.tcpBeLiberal; its nftables mode never does.
fn invalid_conntrack_state_in_forward(mut p: Proxy) {
    let a1 = p.w.pod("a1", false);
    p.w.serve(&a1, 8080);
    p.node_sh(&["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"]);
    let yaml = svc(
        "web",
        "{clusterIP: 10.96.0.81, ports: [{port: 80, targetPort: 8080}]}",
    ) + &slice("web-1", "web", "[{port: 8080}]", &[(&a1, READY)]);
    let pod = SocketAddr::new(a1.ip, 8080);
    for liberal in [false, true] {
        p.apply_liberal(&yaml, liberal);
        let expected = matches!(p.mode, Mode::Iptables(_)) && !liberal;
        assert_eq!(
            stray_segments_dropped(&p, pod),
            expected,
            "{:?}, tcpBeLiberal {liberal}",
            p.mode
        );
    }
}
