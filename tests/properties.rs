//! Property tests: arbitrary (often invalid) Services and EndpointSlices never panic the
//! compiler or either renderer, and the order of objects never changes their output.

mod common;

use std::path::Path;

use proptest::prelude::*;
use serde_json::{Value, json};
use svcproxy::manifests;
use svcproxy::model::Snapshot;

fn ip() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u8..4, 0u8..4).prop_map(|(a, b)| json!(format!("10.0.{a}.{b}"))),
        2 => (0u8..4).prop_map(|a| json!(format!("fd00::{a}"))),
        1 => Just(json!("None")),
        1 => Just(json!("300.1.1.1")),
        1 => Just(json!("")),
        1 => Just(json!(42)),
    ]
}

fn protocol() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP"]))
}

fn port_number() -> impl Strategy<Value = i64> {
    prop_oneof![8 => 1i64..100, 1 => Just(0i64), 1 => Just(70000i64), 1 => Just(-1i64)]
}

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c"])
}

fn service() -> impl Strategy<Value = Value> {
    (
        name(),
        prop::sample::select(vec!["ns1", "ns2"]),
        prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Bogus"]),
        prop::collection::vec(ip(), 0..3),
        prop::collection::vec((prop::sample::select(vec!["", "http", "dns"]), port_number(), protocol(), prop::option::of(30000i64..30005)), 0..3),
        prop::collection::vec(ip(), 0..2),
        prop::option::of(prop::sample::select(vec!["None", "ClientIP", "Sticky"])),
        prop::option::of(prop::sample::select(vec!["Cluster", "Local", "Elsewhere"])),
        prop::option::of(prop::sample::select(vec!["Cluster", "Local"])),
        prop::option::of(-5i64..100_000),
    )
        .prop_map(|(name, ns, ty, cips, ports, ext, aff, etp, itp, timeout)| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(n, p, proto, np)| json!({"name": n, "port": p, "protocol": proto, "nodePort": np}))
                .collect();
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"type": ty, "clusterIPs": cips, "ports": ports, "externalIPs": ext,
                         "sessionAffinity": aff, "externalTrafficPolicy": etp, "internalTrafficPolicy": itp,
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}}},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
            })
        })
}

fn slice() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["s1", "s2", "s3", "s4"]),
        prop::sample::select(vec!["ns1", "ns2"]),
        name(),
        prop::sample::select(vec!["IPv4", "IPv6", "FQDN", "IPX"]),
        prop::collection::vec((prop::sample::select(vec!["", "http", "dns"]), prop::option::of(port_number()), protocol()), 0..3),
        prop::collection::vec(
            (ip(), prop::option::of(any::<bool>()), prop::option::of(any::<bool>()), prop::option::of(any::<bool>()), prop::option::of(prop::sample::select(vec!["node-a", "node-b"]))),
            0..4,
        ),
    )
        .prop_map(|(name, ns, svc, at, ports, eps)| {
            let ports: Vec<Value> = ports.into_iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect();
            let eps: Vec<Value> = eps
                .into_iter()
                .map(|(addr, ready, serving, terminating, node)| json!({"addresses": [addr], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}, "nodeName": node}))
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
                "addressType": at, "ports": ports, "endpoints": eps
            })
        })
}

fn objects() -> impl Strategy<Value = Vec<Value>> {
    (
        prop::collection::vec(service(), 0..6),
        prop::collection::vec(slice(), 0..8),
    )
        .prop_map(|(mut a, b)| {
            a.extend(b);
            a
        })
}

/// The snapshot of `objects` and the flags' proxy configuration.
fn snapshot(objects: &[Value], flags: &[&str]) -> (Snapshot, svcproxy::model::ProxyConfig) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let mut loaded = manifests::load_text(Path::new("prop.json"), &list.to_string());
    let args = common::node_args(flags);
    let node = args.node_info(&loaded.converted, &mut Vec::new());
    let snapshot = Snapshot {
        services: std::mem::take(&mut loaded.converted.services),
        slices: std::mem::take(&mut loaded.converted.slices),
        node,
        service_cidrs: std::mem::take(&mut loaded.converted.service_cidrs),
    };
    (snapshot, args.proxy_config())
}

/// The iptables mode's dry-run of `objects`.
fn iptables_dump(objects: &[Value], flags: &[&str]) -> String {
    let (snapshot, config) = snapshot(objects, flags);
    svcproxy::iptables::render(&svcproxy::plan::plan(&snapshot, &config)).dump()
}

fn compile(objects: &[Value], flags: &[&str]) -> String {
    let (snapshot, config) = snapshot(objects, flags);
    let (_, ruleset) = svcproxy::compile(&snapshot, &config);
    let _ = ruleset.json();
    ruleset.script()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_objects_never_panic(objs in objects(), masq in any::<bool>()) {
        let flags: &[&str] = if masq { &["--masquerade-all", "--cluster-cidr", "10.0.0.0/8"] } else { &[] };
        compile(&objs, flags);
        iptables_dump(&objs, flags);
    }

    #[test]
    fn object_order_does_not_change_the_output(objs in objects().prop_shuffle().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle()))) {
        let (a, b) = objs;
        prop_assert_eq!(compile(&a, &[]), compile(&b, &[]));
        prop_assert_eq!(iptables_dump(&a, &[]), iptables_dump(&b, &[]));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Whatever the input, what the compiler prints is a ruleset nft 1.0.6 accepts.
    #[test]
    #[cfg_attr(not(root_tests), ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)")]
    fn nft_accepts_arbitrary_rulesets(objs in objects(), masq in any::<bool>()) {
        if !common::have_nft() || !common::can_unshare_net() {
            common::cannot_run("nft or network namespaces unavailable: generated rulesets not checked");
        }
        let flags: &[&str] = if masq { &["--masquerade-all", "--cluster-cidr", "10.0.0.0/8,fd00::/64", "--nodeport-addresses", "primary"] } else { &[] };
        let script = compile(&objs, flags);
        if let Err(e) = common::nft_check(&script) {
            prop_assert!(false, "nft -c refused:\n{}\n{}", e, script);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// Whatever the input, iptables-restore (legacy, both families) loads the iptables mode's
    /// input, in a private network namespace.
    #[test]
    #[cfg_attr(not(root_tests), ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)")]
    fn iptables_restore_loads_arbitrary_rulesets(objs in objects(), masq in any::<bool>()) {
        if !common::can_unshare_net()
            || std::process::Command::new("iptables-legacy-restore").arg("--version").output().is_err()
        {
            common::cannot_run("iptables-legacy or network namespaces unavailable: iptables inputs not loaded");
        }
        let flags: &[&str] = if masq { &["--masquerade-all", "--cluster-cidr", "10.0.0.0/8,fd00::/64", "--nodeport-addresses", "primary"] } else { &["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"] };
        let dump = iptables_dump(&objs, flags);
        let dir = tempfile::tempdir().unwrap();
        let (v4, v6) = dump.split_at(dump.find("# ip6tables-restore").unwrap());
        std::fs::write(dir.path().join("4"), v4).unwrap();
        std::fs::write(dir.path().join("6"), v6).unwrap();
        let script = format!(
            "iptables-legacy-restore --noflush < {0}/4 && ip6tables-legacy-restore --noflush < {0}/6",
            dir.path().display()
        );
        let out = std::process::Command::new("unshare").args(["--net", "--", "sh", "-c", &script]).output().unwrap();
        prop_assert!(out.status.success(), "iptables-restore refused:\n{}\n{}", String::from_utf8_lossy(&out.stderr), dump);
    }
}
