//! The incremental backends against the real kernel: a sequence of one-Service changes, each
//! sent as a partial sync that compiled only that Service, must leave the kernel holding exactly
//! what a full apply of the final cluster gives (nftables, and iptables-nft). Needs root;
//! where the machine cannot run them they are ignored, with the reason (build.rs).

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::changes::{changes, slice_of};
use common::netns::Netns;
use serde_json::Value;
use svcproxy::model::{ProxyConfig, Service};
use svcproxy::nft::apply::{NftCommand, SyncKind};
use svcproxy::nft::incremental::Incremental;
use svcproxy::synthetic;

fn netns(tag: &str) -> Netns {
    Netns::add(format!("svcproxy-inc-{tag}-{}", std::process::id()))
}

/// What nft lists for `ip svcproxy`, in a form that does not depend on the order things were
/// created in: sets with their sorted elements, chains with their rules.
fn inventory(ns: &str) -> BTreeMap<String, Vec<String>> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "-j", "list", "table", "ip", "svcproxy",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut inv: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in json["nftables"].as_array().unwrap() {
        let obj = item.as_object().unwrap();
        let (kind, body) = obj.iter().next().unwrap();
        match kind.as_str() {
            "set" | "map" => {
                let mut elems: Vec<String> = body["elem"]
                    .as_array()
                    .map(|a| a.iter().map(|e| e.to_string()).collect())
                    .unwrap_or_default();
                elems.sort();
                let mut head = body.clone();
                head.as_object_mut().unwrap().remove("elem");
                head.as_object_mut().unwrap().remove("handle");
                elems.insert(0, head.to_string());
                inv.insert(format!("{kind} {}", body["name"]), elems);
            }
            "chain" => {
                inv.entry(format!("chain {}", body["name"])).or_default();
            }
            "rule" => {
                inv.entry(format!("chain {}", body["chain"]))
                    .or_default()
                    .push(body["expr"].to_string());
            }
            _ => {}
        }
    }
    inv
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn one_service_changes_leave_what_a_full_apply_gives() {
    if !common::can_unshare_net() || !common::have_nft() {
        common::cannot_run("needs root and nft");
    }
    let config = ProxyConfig {
        cluster_cidrs: vec!["10.128.0.0/9".parse().unwrap()],
        ..ProxyConfig::default()
    };
    let ns = netns("a");
    let mut backend = Incremental::new(NftCommand::in_netns(&ns.0), config.clone());
    let mut s = synthetic::cluster(40, 3);
    let first = backend.sync(s.clone()).unwrap();
    assert_eq!(first.report.kind, SyncKind::Full);

    for (label, change) in changes() {
        change(&mut s);
        let out = backend
            .sync(s.clone())
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            out.report.kind,
            SyncKind::Partial,
            "{label}: {:?}",
            out.report
        );
        assert!(out.services_compiled <= 1, "{label}: {:?}", out);
    }

    let fresh = netns("b");
    Incremental::new(NftCommand::in_netns(&fresh.0), config)
        .sync(s)
        .unwrap();
    let (patched, whole) = (inventory(&ns.0), inventory(&fresh.0));
    assert!(
        whole.contains_key("map \"nodeport-local-endpoints-0\""),
        "{:#?}",
        whole.keys()
    );
    assert_eq!(patched, whole);
}

/// The name of the first dynamic (session affinity) set in `ip svcproxy`.
fn affinity_set(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-j", "list", "sets", "ip"])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["set"]["name"].as_str())
        .find(|n| n.starts_with("affinity-"))
        .expect("an affinity set")
        .to_string()
}

fn nft(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn a_periodic_full_resync_keeps_session_affinity_and_repairs_drift() {
    if !common::can_unshare_net() || !common::have_nft() {
        common::cannot_run("needs root and nft");
    }
    let ns = netns("r");
    let mut backend = Incremental::new(NftCommand::in_netns(&ns.0), ProxyConfig::default());
    let mut s = synthetic::cluster(5, 3);
    let mut svc: Service = (*s.services[&synthetic::service(2).id]).clone();
    svc.affinity_timeout = Some(600);
    s.services.insert(svc.id.clone(), svc.into());
    backend.sync(s.clone()).unwrap();
    // What the kernel learned: a client pinned to an endpoint.
    let set = affinity_set(&ns.0);
    nft(
        &ns.0,
        &["add", "element", "ip", "svcproxy", &set, "{ 192.0.2.7 }"],
    );

    // The periodic full resync: every rule and element written anew, in place.
    backend.invalidate();
    slice_of(&mut s, 4).endpoints.pop();
    let out = backend.sync(s.clone()).unwrap();
    assert_eq!(out.report.kind, SyncKind::Full);
    let because = out.report.full_because.unwrap();
    assert!(because.ends_with("refreshed in place"), "{because}");
    assert!(
        nft(&ns.0, &["list", "set", "ip", "svcproxy", &set]).contains("192.0.2.7"),
        "the client's endpoint is still remembered"
    );
    let fresh = netns("rf");
    Incremental::new(NftCommand::in_netns(&fresh.0), ProxyConfig::default())
        .sync(s.clone())
        .unwrap();
    let without = |mut inv: BTreeMap<String, Vec<String>>| {
        inv.remove(&format!("set {:?}", set));
        inv
    };
    assert_eq!(without(inventory(&ns.0)), without(inventory(&fresh.0)));

    // Drift in the elements and rules: refreshing repairs it.
    nft(&ns.0, &["flush", "map", "ip", "svcproxy", "service-ips"]);
    nft(&ns.0, &["flush", "chain", "ip", "svcproxy", "services"]);
    backend.invalidate();
    let out = backend.sync(s.clone()).unwrap();
    assert!(
        out.report
            .full_because
            .unwrap()
            .ends_with("refreshed in place")
    );
    assert_eq!(without(inventory(&ns.0)), without(inventory(&fresh.0)));

    // Drift nft refuses to refresh (someone deleted the table): the tables are replaced.
    nft(&ns.0, &["delete", "table", "ip", "svcproxy"]);
    backend.invalidate();
    let out = backend.sync(s.clone()).unwrap();
    let because = out.report.full_because.unwrap();
    assert!(!because.ends_with("refreshed in place"), "{because}");
    assert_eq!(inventory(&ns.0), inventory(&fresh.0));
}

/// svcproxy's chains in one table of `iptables-nft-save`, without counters, sorted by chain, each
/// chain's rules in their order (a dispatch chain edited in place must keep the plan's order).
fn svcp_lines(ns: &str, table: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-nft-save", "-t", table])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("SVCP-"))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect();
    // `:CHAIN` declarations before `-A CHAIN` rules; a stable sort keeps each chain's order.
    lines.sort_by_key(|l| match l.strip_prefix(':') {
        Some(decl) => (
            0,
            decl.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        None => (
            1,
            l.split_whitespace().nth(1).unwrap_or_default().to_string(),
        ),
    });
    lines
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn iptables_one_service_changes_leave_what_a_full_apply_gives() {
    use svcproxy::iptables::incremental::Incremental;
    use svcproxy::iptables::{IptablesCommand, Variant};
    let have = Command::new("iptables-nft-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !common::can_unshare_net() || !have {
        common::cannot_run("needs root and iptables-nft");
    }
    let config = ProxyConfig {
        cluster_cidrs: vec!["10.128.0.0/9".parse().unwrap()],
        ..ProxyConfig::default()
    };
    let ns = netns("ipt");
    let mut backend = Incremental::new(
        IptablesCommand::in_netns(&ns.0, Variant::Nft),
        config.clone(),
    );
    let mut s = synthetic::cluster(40, 3);
    assert_eq!(backend.sync(s.clone()).unwrap().report.kind, SyncKind::Full);
    for (label, change) in changes() {
        change(&mut s);
        let out = backend
            .sync(s.clone())
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(out.report.kind, SyncKind::Partial, "{label}: {out:?}");
        assert!(out.services_compiled <= 1, "{label}: {out:?}");
        assert_eq!(out.fallback, None, "{label}");
    }
    let fresh = netns("iptf");
    Incremental::new(IptablesCommand::in_netns(&fresh.0, Variant::Nft), config)
        .sync(s)
        .unwrap();
    for table in ["nat", "filter"] {
        let (patched, whole) = (svcp_lines(&ns.0, table), svcp_lines(&fresh.0, table));
        assert!(whole.len() > 40, "{table}: {whole:#?}");
        assert_eq!(patched, whole, "{table}");
    }
}
