//! Each Service semantic, checked in the rendered nftables ruleset.

mod common;

use common::script;

const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.168.1.10}, {type: InternalIP, address: "fd00::10"}]}
"#;

fn svc(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {spec}\n"
    )
}

fn slice(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

fn has(s: &str, needle: &str) -> bool {
    s.lines()
        .any(|l| l.trim() == needle || l.trim().trim_end_matches(',') == needle)
}

#[track_caller]
fn assert_has(s: &str, needle: &str) {
    assert!(has(s, needle), "missing line `{needle}` in:\n{s}");
}

#[track_caller]
fn assert_lacks(s: &str, needle: &str) {
    assert!(!s.contains(needle), "unexpected `{needle}` in:\n{s}");
}

const TWO_EPS: &str =
    "[{addresses: [10.1.0.1], nodeName: node-a}, {addresses: [10.1.1.1], nodeName: node-b}]";

#[test]
fn clusterip_tcp_udp_sctp_and_several_ports() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "m",
            "{clusterIP: 10.0.0.1, ports: [{name: a, port: 80}, {name: b, port: 53, protocol: UDP}, {name: c, port: 36412, protocol: SCTP}]}"
        ),
        slice(
            "m-1",
            "m",
            "[{name: a, port: 8080}, {name: b, port: 5353, protocol: UDP}, {name: c, port: 36412, protocol: SCTP}]",
            TWO_EPS
        )
    );
    let s = script(&y, &[]);
    assert_has(
        &s,
        "10.0.0.1 . tcp . 80 comment \"ns/m:a/tcp\" : goto endpoints-of-2",
    );
    assert_has(
        &s,
        "10.0.0.1 . udp . 53 comment \"ns/m:b/udp\" : goto endpoints-of-2",
    );
    assert_has(
        &s,
        "10.0.0.1 . sctp . 36412 comment \"ns/m:c/sctp\" : goto endpoints-of-2",
    );
    assert_has(&s, "10.0.0.1 . tcp . 80 : 10.1.1.1 . 8080");
    assert_has(&s, "10.0.0.1 . udp . 53 : 10.1.0.1 . 5353");
    assert_has(&s, "10.0.0.1 . sctp . 36412 : 10.1.1.1 . 36412");
    assert_has(
        &s,
        "numgen random mod 2 vmap { 0 : goto endpoints-0, 1 : goto endpoints-1 }",
    );
    assert_has(
        &s,
        "meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @endpoints-1",
    );
    // Only the Service's own ports: anything else to the ClusterIP is refused.
    assert_has(
        &s,
        "ip daddr @cluster-ips goto reject-traffic comment \"port the Service does not have\"",
    );
}

#[test]
fn named_target_port_resolved_per_slice() {
    let y = format!(
        "{NODES}{}{}{}",
        svc(
            "n",
            "{clusterIP: 10.0.0.2, ports: [{name: http, port: 80, targetPort: http}]}"
        ),
        slice(
            "n-1",
            "n",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.1]}]"
        ),
        slice(
            "n-2",
            "n",
            "[{name: http, port: 9090}]",
            "[{addresses: [10.1.0.2]}]"
        ),
    );
    let s = script(&y, &[]);
    assert_has(&s, "10.0.0.2 . tcp . 80 : 10.1.0.1 . 8080");
    assert_has(&s, "10.0.0.2 . tcp . 80 : 10.1.0.2 . 9090");
}

#[test]
fn readiness_and_terminating_fallback() {
    let y = format!(
        "{NODES}{}{}{}{}",
        svc("r", "{clusterIP: 10.0.0.3, ports: [{port: 80}]}"),
        slice(
            "r-1",
            "r",
            "[{port: 8080}]",
            "[{addresses: [10.1.0.1]}, {addresses: [10.1.0.2], conditions: {ready: false}}, {addresses: [10.1.0.3], conditions: {ready: false, serving: true, terminating: true}}]"
        ),
        svc("t", "{clusterIP: 10.0.0.4, ports: [{port: 80}]}"),
        slice(
            "t-1",
            "t",
            "[{port: 8080}]",
            "[{addresses: [10.1.0.4], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.0.5], conditions: {ready: false, serving: false, terminating: true}}]"
        ),
    );
    let s = script(&y, &[]);
    assert_has(&s, "10.0.0.3 . tcp . 80 : 10.1.0.1 . 8080");
    assert_lacks(&s, "10.1.0.2 . 8080");
    assert_lacks(&s, "10.1.0.3 . 8080");
    assert_has(&s, "10.0.0.4 . tcp . 80 : 10.1.0.4 . 8080");
    assert_lacks(&s, "10.1.0.5 . 8080");
}

#[test]
fn no_endpoints_rejects_every_address() {
    let y = format!(
        "{NODES}{}",
        svc(
            "e",
            "{type: LoadBalancer, clusterIP: 10.0.0.5, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.5}]}}"
        ),
    );
    let s = script(&y, &[]);
    assert_has(
        &s,
        "10.0.0.5 . tcp . 80 comment \"ns/e:80/tcp\" : goto reject-traffic",
    );
    assert_has(
        &s,
        "203.0.113.5 . tcp . 80 comment \"ns/e:80/tcp external IP\" : goto reject-traffic",
    );
    assert_has(
        &s,
        "198.51.100.5 . tcp . 80 comment \"ns/e:80/tcp load balancer IP\" : goto reject-traffic",
    );
    assert_has(
        &s,
        "tcp . 30080 comment \"ns/e:30080/tcp node port\" : goto reject-traffic",
    );
    assert_has(&s, "meta l4proto tcp reject with tcp reset");
    assert_has(&s, "reject with icmp type port-unreachable");
}

#[test]
fn nodeport_external_ip_and_load_balancer_with_cluster_policy() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "lb",
            "{type: LoadBalancer, clusterIP: 10.0.0.6, externalIPs: [203.0.113.6], ports: [{port: 80, nodePort: 30081}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.6}, {hostname: lb.example}]}}"
        ),
        slice("lb-1", "lb", "[{port: 8080}]", TWO_EPS),
    );
    let s = script(&y, &[]);
    assert_has(
        &s,
        "203.0.113.6 . tcp . 80 comment \"ns/lb:80/tcp external IP\" : goto endpoints-of-2",
    );
    assert_has(
        &s,
        "198.51.100.6 . tcp . 80 comment \"ns/lb:80/tcp load balancer IP\" : goto endpoints-of-2",
    );
    assert_has(
        &s,
        "tcp . 30081 comment \"ns/lb:30081/tcp node port\" : goto nodeport-endpoints-of-2",
    );
    assert_has(&s, "tcp . 30081 : 10.1.1.1 . 8080");
    // External traffic under Cluster policy is masqueraded.
    assert_has(&s, "203.0.113.6 . tcp . 80");
    assert_has(
        &s,
        "ip daddr . meta l4proto . th dport @external-masquerade jump mark-for-masquerade",
    );
    assert_has(
        &s,
        "meta l4proto . th dport @nodeport-masquerade jump mark-for-masquerade",
    );
    // NodePorts on every local address but loopback, by default.
    assert_has(
        &s,
        "fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports",
    );
}

#[test]
fn nodeport_addresses_restricted() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "np",
            "{type: NodePort, clusterIP: 10.0.0.7, ports: [{port: 80, nodePort: 30082}]}"
        ),
        slice("np-1", "np", "[{port: 8080}]", TWO_EPS),
    );
    let s = script(&y, &["--nodeport-addresses", "primary"]);
    assert_has(&s, "ip daddr @nodeport-ips jump nodeports");
    assert_has(&s, "192.168.1.10");
    assert_has(&s, "ip6 daddr @nodeport-ips jump nodeports");
    let s = script(&y, &["--nodeport-addresses", "192.168.0.0/16"]);
    assert_has(
        &s,
        "fib daddr type local ip daddr @nodeport-cidrs ip daddr != 127.0.0.0/8 jump nodeports",
    );
    assert_has(&s, "192.168.0.0/16");
    // No IPv6 CIDR given: IPv6 answers no NodePort at all.
    let v6 = &s[s.find("table ip6 svcproxy {").unwrap()..];
    assert_lacks(v6, "jump nodeports");
    // Loopback is never a NodePort address, even when named.
    let s = script(
        &y,
        &["--node-ip", "127.0.0.1", "--nodeport-addresses", "primary"],
    );
    assert_lacks(&s, "ip daddr @nodeport-ips jump nodeports");
}

#[test]
fn session_affinity_with_timeout() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "a",
            "{clusterIP: 10.0.0.8, ports: [{port: 80}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}}"
        ),
        slice("a-1", "a", "[{port: 8080}]", TWO_EPS),
    );
    let s = script(&y, &[]);
    assert!(
        s.contains("10.0.0.8 . tcp . 80 comment \"ns/a:80/tcp\" : goto affinity-"),
        "{s}"
    );
    assert_has(&s, "flags dynamic,timeout");
    assert_has(&s, "timeout 60s");
    assert!(
        s.contains("meta l4proto tcp dnat ip to 10.1.0.1:8080"),
        "{s}"
    );
    assert!(
        s.contains("numgen random mod 2 vmap { 0 : goto affinity-"),
        "{s}"
    );
    assert!(s.contains("update @affinity-"), "{s}");
    // Default timeout: 3 hours.
    let y = y.replace(
        ", sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
        "",
    );
    assert_has(&script(&y, &[]), "timeout 10800s");
}

#[test]
fn external_traffic_policy_local() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "l",
            "{type: LoadBalancer, clusterIP: 10.0.0.9, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80, nodePort: 30083}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}"
        ),
        slice("l-1", "l", "[{port: 8080}]", TWO_EPS),
    );
    let s = script(&y, &["--cluster-cidr", "10.1.0.0/16"]);
    // The ClusterIP keeps every endpoint.
    assert_has(
        &s,
        "10.0.0.9 . tcp . 80 comment \"ns/l:80/tcp\" : goto endpoints-of-2",
    );
    // External addresses go through the Local policy: local endpoints for outside clients...
    assert_has(
        &s,
        "198.51.100.9 . tcp . 80 comment \"ns/l:80/tcp load balancer IP\" : goto local-policy",
    );
    assert_has(&s, "198.51.100.9 . tcp . 80 : goto local-endpoints-0");
    assert_has(&s, "198.51.100.9 . tcp . 80 : 10.1.0.1 . 8080");
    assert_has(&s, "tcp . 30083 : goto nodeport-local-endpoints-0");
    // ...every endpoint for pods and the node itself (the node's traffic masqueraded)...
    assert_has(&s, "198.51.100.9 . tcp . 80 : goto endpoints-of-2");
    assert_has(
        &s,
        "ip saddr @pod-cidrs ip daddr . meta l4proto . th dport vmap @local-policy-ips-internal",
    );
    assert_has(&s, "fib saddr type local jump mark-for-masquerade");
    // ...and no masquerading of outside clients.
    assert_lacks(&s, "198.51.100.9 . tcp . 80\n");
    assert_lacks(
        &s,
        "external-masquerade {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t\tcomment \"external addresses with Cluster traffic policy\"\n\t\telements",
    );

    // No local endpoint: outside clients are dropped.
    let y = y.replace("nodeName: node-a", "nodeName: node-c");
    let s = script(&y, &[]);
    assert_has(&s, "198.51.100.9 . tcp . 80 : drop");
    assert_has(&s, "tcp . 30083 : drop");
}

#[test]
fn internal_traffic_policy_local() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "i",
            "{clusterIP: 10.0.0.10, internalTrafficPolicy: Local, ports: [{port: 80}]}"
        ),
        slice("i-1", "i", "[{port: 8080}]", TWO_EPS),
    );
    let s = script(&y, &[]);
    assert_has(
        &s,
        "10.0.0.10 . tcp . 80 comment \"ns/i:80/tcp\" : goto endpoints-0",
    );
    assert_has(&s, "10.0.0.10 . tcp . 80 : 10.1.0.1 . 8080");
    assert_lacks(&s, "10.1.1.1 . 8080");
    let s = script(&y.replace("nodeName: node-a", "nodeName: node-c"), &[]);
    assert_has(&s, "10.0.0.10 . tcp . 80 comment \"ns/i:80/tcp\" : drop");
}

#[test]
fn masquerade_rules() {
    let y = format!(
        "{NODES}{}{}",
        svc("m", "{clusterIP: 10.0.0.11, ports: [{port: 80}]}"),
        slice("m-1", "m", "[{port: 8080}]", TWO_EPS),
    );
    // No cluster CIDR known: ClusterIP traffic is not masqueraded.
    let s = script(&y, &[]);
    assert_lacks(&s, "@pod-cidrs");
    // From outside the cluster CIDR: masqueraded.
    let s = script(&y, &["--cluster-cidr", "10.1.0.0/16"]);
    assert_has(
        &s,
        "ip daddr @cluster-ips ip saddr != @pod-cidrs jump mark-for-masquerade comment \"ClusterIP traffic not from a pod\"",
    );
    assert_has(&s, "10.1.0.0/16");
    // All of it.
    let s = script(&y, &["--masquerade-all"]);
    assert_has(
        &s,
        "ip daddr @cluster-ips jump mark-for-masquerade comment \"masquerade-all\"",
    );
    // The mark bit is configurable; the mark is cleared before masquerading.
    let s = script(&y, &["--masquerade-bit", "5"]);
    assert_has(&s, "meta mark set meta mark | 0x00000020");
    assert_has(&s, "meta mark & 0x00000020 == 0 return");
    assert_has(&s, "meta mark set meta mark ^ 0x00000020");
    assert_has(&s, "masquerade fully-random");
    // Hairpin: only endpoints on this node can reach themselves through the node.
    assert_has(&s, "10.1.0.1 . 10.1.0.1");
    assert_lacks(&s, "10.1.1.1 . 10.1.1.1");
    assert_has(
        &s,
        "ct status dnat ip saddr . ip daddr @hairpin masquerade comment \"hairpin\"",
    );
}

#[test]
fn services_without_rules() {
    let y = format!(
        "{NODES}{}{}{}{}",
        svc("headless", "{clusterIP: None, ports: [{port: 80}]}"),
        slice("headless-1", "headless", "[{port: 8080}]", TWO_EPS),
        svc("ext", "{type: ExternalName, externalName: db.example.com}"),
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: someone-else}}\nspec: {clusterIP: 10.0.0.12, ports: [{port: 80}]}\n",
    );
    let s = script(&y, &[]);
    assert_lacks(&s, "ns/headless");
    assert_lacks(&s, "ns/ext");
    assert_lacks(&s, "10.0.0.12");
    assert_lacks(&s, "10.1.0.1 . 8080");
}

#[test]
fn selector_less_service_with_hand_made_slice() {
    let y = format!(
        "{NODES}{}{}",
        svc("db", "{clusterIP: 10.0.0.13, ports: [{port: 5432}]}"),
        slice(
            "db-manual",
            "db",
            "[{port: 5432}]",
            "[{addresses: [203.0.113.40]}]"
        ),
    );
    let s = script(&y, &[]);
    assert_has(&s, "10.0.0.13 . tcp . 5432 : 203.0.113.40 . 5432");
}

#[test]
fn ipv6_and_dual_stack() {
    let y = format!(
        "{NODES}{}{}{}",
        svc(
            "d",
            "{clusterIP: 10.0.0.14, clusterIPs: [10.0.0.14, \"fd00:96::14\"], ports: [{port: 80, protocol: UDP}]}"
        ),
        slice(
            "d-4",
            "d",
            "[{port: 8080, protocol: UDP}]",
            "[{addresses: [10.1.0.1], nodeName: node-a}]"
        ),
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: d-6, namespace: ns, labels: {kubernetes.io/service-name: d}}\naddressType: IPv6\nports: [{port: 8080, protocol: UDP}]\nendpoints: [{addresses: [\"fd01::1\"], nodeName: node-a}]\n",
    );
    let s = script(&y, &[]);
    let (v4, v6) = s.split_at(s.find("table ip6 svcproxy {").unwrap());
    assert_has(v4, "10.0.0.14 . udp . 80 : 10.1.0.1 . 8080");
    assert_lacks(v4, "fd01::1");
    assert_has(v6, "fd00:96::14 . udp . 80 : fd01::1 . 8080");
    assert_has(
        v6,
        "meta l4proto { tcp, udp, sctp } dnat ip6 to ip6 daddr . meta l4proto . th dport map @endpoints-0",
    );
    assert_has(v6, "reject with icmpv6 type port-unreachable");
    assert_has(v6, "fib daddr type local ip6 daddr != ::1 jump nodeports");
}

#[test]
fn load_balancer_source_ranges() {
    let y = format!(
        "{NODES}{}{}",
        svc(
            "lb",
            "{type: LoadBalancer, clusterIP: 10.0.0.7, loadBalancerSourceRanges: [\" 203.0.113.0/25\", 192.168.1.0/24], ports: [{port: 80, nodePort: 30082}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}"
        ),
        slice("lb-1", "lb", "[{port: 8080}]", TWO_EPS),
    );
    let s = script(&y, &[]);
    // The load-balancer IP is guarded; its ranges (trimmed), and the LB IP itself since the
    // node's address 192.168.1.10 is inside them, are its allowed sources.
    assert_has(
        &s,
        "198.51.100.7 . tcp . 80 comment \"ns/lb:80/tcp load balancer IP\"",
    );
    assert_has(&s, "198.51.100.7 . tcp . 80 . 203.0.113.0/25");
    assert_has(&s, "198.51.100.7 . tcp . 80 . 192.168.1.0/24");
    assert_has(&s, "198.51.100.7 . tcp . 80 . 198.51.100.7/32");
    assert_has(
        &s,
        "ip daddr . meta l4proto . th dport @firewall-ips ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop",
    );
    // Neither the ClusterIP nor the NodePort is guarded.
    assert_lacks(&s, "10.0.0.7 . tcp . 80 . ");
    // A node outside the ranges: the LB IP is no allowed source.
    let s = script(&y, &["--node-ip", "192.0.2.1"]);
    assert_lacks(&s, "198.51.100.7 . tcp . 80 . 198.51.100.7/32");
}

#[test]
fn unallocated_cluster_ips_from_the_flag_or_service_cidr_objects() {
    let y = format!(
        "{NODES}{}",
        svc("a", "{clusterIP: 10.96.0.7, ports: [{port: 80}]}")
    );
    // No CIDRs known: the set is empty.
    let s = script(&y, &[]);
    assert_lacks(&s, "10.96.0.0/12");
    assert_has(
        &s,
        "ip daddr @service-cidrs drop comment \"unallocated ClusterIP\"",
    );
    let s = script(&y, &["--service-cidr", "10.96.0.0/12,fd00:96::/112"]);
    assert_has(&s, "10.96.0.0/12");
    assert_has(&s, "fd00:96::/112");
    // ServiceCIDR objects win over the flag.
    let with_object = format!(
        "{y}---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {{name: kubernetes}}\nspec: {{cidrs: [10.100.0.0/16]}}\n"
    );
    let s = script(&with_object, &["--service-cidr", "10.96.0.0/12"]);
    assert_has(&s, "10.100.0.0/16");
    assert_lacks(&s, "10.96.0.0/12");
}
