//! Both backends and the agent loop against the in-memory kernel (`svcproxy::fake_kernel`): no
//! root, no namespaces, no processes. The kernel takes the same `nft -f` scripts and
//! `iptables-restore` inputs the real one does, refuses the same mistakes atomically, and
//! counts each transaction's operations, so these tests pin what the backends send: a
//! one-endpoint change is a couple of operations, a sync that changes nothing sends nothing, a
//! refused transaction changes nothing and the next sync repairs everything. What only the real
//! kernel can tell (packets, nft's own parser, conntrack) stays in the root tests
//! (dataplane.rs, incremental.rs, agent.rs).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::agent::{Agent, config as agent_config, eventually, node, service, slice};
use common::apiserver::FakeApiServer;
use common::changes::{changes, slice_of};
use serde_json::json;
use svcproxy::agent::SyncRecord;
use svcproxy::backend::{Live, Mode};
use svcproxy::fake_kernel::{FakeKernel, Transaction};
use svcproxy::iptables::Variant;
use svcproxy::model::{ProxyConfig, Snapshot};
use svcproxy::report::SyncKind;
use svcproxy::synthetic;

fn config() -> ProxyConfig {
    ProxyConfig {
        cluster_cidrs: vec!["10.128.0.0/9".parse().unwrap()],
        ..ProxyConfig::default()
    }
}

/// The two backends, each on a kernel of its own.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Nftables,
    Iptables,
}

const KINDS: [Kind; 2] = [Kind::Nftables, Kind::Iptables];

impl Kind {
    fn mode(self, k: &Arc<FakeKernel>) -> Mode {
        match self {
            Kind::Nftables => Mode::nftables(k.runner()),
            Kind::Iptables => Mode::iptables(k.runner(), Variant::Nft),
        }
    }
}

/// Everything the kernel holds, nftables and both iptables families, for comparing two
/// kernels.
fn holdings(k: &FakeKernel) -> String {
    format!(
        "{:#?}\n{:#?}\n{:#?}",
        k.nft_tables(),
        k.iptables("iptables-nft"),
        k.iptables("ip6tables-nft")
    )
}

/// What a fresh kernel holds after one full sync of `s`.
fn whole(kind: Kind, s: &Snapshot) -> String {
    let k = FakeKernel::new();
    let mut live = Live::new(kind.mode(&k), config());
    assert_eq!(live.sync(s.clone()).unwrap().report.kind, SyncKind::Full);
    holdings(&k)
}

/// The transactions after the first `from`.
fn since(k: &FakeKernel, from: usize) -> Vec<Transaction> {
    k.transactions()[from..].to_vec()
}

#[test]
fn one_service_changes_leave_what_a_full_sync_gives() {
    for kind in KINDS {
        let k = FakeKernel::new();
        let mut live = Live::new(kind.mode(&k), config());
        let mut s = synthetic::cluster(40, 3);
        assert_eq!(live.sync(s.clone()).unwrap().report.kind, SyncKind::Full);
        for (label, change) in changes() {
            change(&mut s);
            let out = live
                .sync(s.clone())
                .unwrap_or_else(|e| panic!("{kind:?}, {label}: {e}"));
            assert_eq!(
                out.report.kind,
                SyncKind::Partial,
                "{kind:?}, {label}: {out:?}"
            );
            assert!(out.services_compiled <= 1, "{kind:?}, {label}: {out:?}");
            assert_eq!(out.fallback, None, "{kind:?}, {label}");
            assert_eq!(holdings(&k), whole(kind, &s), "{kind:?}, after: {label}");
        }
        assert!(
            k.transactions().iter().all(|t| t.refused.is_none()),
            "{kind:?}: {:#?}",
            k.transactions()
        );
    }
}

#[test]
fn a_one_endpoint_change_is_k_operations_and_a_sync_without_changes_sends_nothing() {
    for kind in KINDS {
        let k = FakeKernel::new();
        let mut live = Live::new(kind.mode(&k), config());
        let mut s = synthetic::cluster(100, 3);
        live.sync(s.clone()).unwrap();

        let before = k.transactions().len();
        live.sync(s.clone()).unwrap();
        assert_eq!(
            since(&k, before),
            [],
            "{kind:?}: nothing changed, nothing sent"
        );

        // The last endpoint (endpoints are in address order, each in its slot map) moves to
        // an address that keeps it last: one slot changes.
        slice_of(&mut s, 3).endpoints[2].address = "10.255.0.1".parse().unwrap();
        let out = live.sync(s.clone()).unwrap();
        let sent = since(&k, before);
        assert_eq!(sent.len(), 1, "{kind:?}: one transaction: {sent:#?}");
        let t = &sent[0];
        match kind {
            // The endpoint's slot map: the old element out, the new one in.
            Kind::Nftables => {
                assert_eq!(t.operations, 2, "{kind:?}: {}", t.input);
                assert!(t.input.contains("10.255.0.1"), "{}", t.input);
            }
            // The Service's chain declared again (which flushes it) and its rules: the
            // masquerade mark and one DNAT per endpoint (3).
            Kind::Iptables => {
                assert_eq!(t.operations, 5, "{kind:?}: {}", t.input);
                assert!(t.input.contains("10.255.0.1"), "{}", t.input);
            }
        }
        assert_eq!(
            out.report.kind,
            SyncKind::Partial,
            "{kind:?}: {:?}",
            out.report
        );
        println!(
            "{kind:?}: a one-endpoint change is {} operations:\n{}",
            t.operations, t.input
        );
    }
}

#[test]
fn a_refused_transaction_changes_nothing_and_the_next_sync_repairs_everything() {
    for kind in KINDS {
        let k = FakeKernel::new();
        let mut live = Live::new(kind.mode(&k), config());
        let mut s = synthetic::cluster(20, 2);
        live.sync(s.clone()).unwrap();
        let kept = holdings(&k);

        slice_of(&mut s, 2).endpoints[0].address = "10.255.0.2".parse().unwrap();
        k.refuse_next(1);
        let e = live.sync(s.clone()).unwrap_err();
        assert_eq!(e.metric_label(), "refused", "{kind:?}: {e}");
        assert_eq!(holdings(&k), kept, "{kind:?}: the kernel kept its rules");

        let out = live.sync(s.clone()).unwrap();
        assert_eq!(
            out.report.kind,
            SyncKind::Full,
            "{kind:?}: after a failure, a full sync"
        );
        assert_eq!(holdings(&k), whole(kind, &s), "{kind:?}");
    }
}

#[test]
fn drift_is_repaired_by_a_full_resync() {
    for kind in KINDS {
        let k = FakeKernel::new();
        let mut live = Live::new(kind.mode(&k), config());
        let s = synthetic::cluster(20, 2);
        live.sync(s.clone()).unwrap();
        let good = holdings(&k);
        // Someone deletes what svcproxy wrote.
        match kind {
            Kind::Nftables => k.tamper_nft("flush map ip svcproxy endpoints-0\n").unwrap(),
            Kind::Iptables => {
                let nat = &k.iptables("iptables-nft").tables["nat"];
                let chain = nat
                    .chains
                    .keys()
                    .find(|c| c.starts_with("SVCP-SEP-"))
                    .unwrap();
                k.tamper_iptables("iptables-nft", &format!("*nat\n-F {chain}\nCOMMIT\n"))
                    .unwrap();
            }
        }
        assert_ne!(holdings(&k), good);
        // A sync of the same state sends nothing: svcproxy does not read the kernel back.
        live.sync(s.clone()).unwrap();
        assert_ne!(holdings(&k), good, "{kind:?}");
        live.invalidate();
        assert_eq!(live.sync(s).unwrap().report.kind, SyncKind::Full);
        assert_eq!(holdings(&k), good, "{kind:?}: repaired");
    }
}

#[test]
fn the_first_sync_removes_the_other_modes_leftovers() {
    let s = synthetic::cluster(5, 1);
    // iptables rules left by an earlier run in the iptables mode.
    let k = FakeKernel::new();
    let mut old = Live::new(Kind::Iptables.mode(&k), config());
    old.sync(s.clone()).unwrap();
    assert!(holdings(&k).contains("SVCP-SERVICES"));
    let mut new = Live::new(Kind::Nftables.mode(&k), config());
    new.sync(s.clone()).unwrap();
    let after = holdings(&k);
    assert!(!after.contains("SVCP-"), "{after}");
    assert!(k.nft_table("ip", "svcproxy").is_some());
    // And back: the nftables tables go.
    let mut back = Live::new(Kind::Iptables.mode(&k), config());
    back.sync(s).unwrap();
    assert!(k.nft_table("ip", "svcproxy").is_none());
    assert!(holdings(&k).contains("SVCP-SERVICES"));
}

// The agent loop: the watch through the real kube-rs client against the in-process apiserver,
// the sync loop, and the backend seam, on the in-memory kernel.

/// The next sync, within a generous deadline.
async fn next_sync(agent: &mut Agent) -> SyncRecord {
    agent
        .next_sync(Duration::from_secs(30))
        .await
        .expect("a sync within 30 s")
}

const LONG: Duration = Duration::from_secs(30);

/// The element texts of nft map `name` in `ip svcproxy`.
fn elements(k: &FakeKernel, name: &str) -> Vec<String> {
    k.nft_table("ip", "svcproxy")
        .map(|t| t.elements(name).into_iter().map(String::from).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_changes_and_sends_nothing_for_an_irrelevant_one() {
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.11"]));
    let k = FakeKernel::new();
    let mut agent = Agent::spawn(agent_config(&api, Mode::nftables(k.runner())));
    assert_eq!(next_sync(&mut agent).await.kind, SyncKind::Full);
    assert!(
        elements(&k, "endpoints-0")
            .iter()
            .any(|e| e.contains("10.244.1.11")),
        "{:?}",
        elements(&k, "endpoints-0")
    );

    // The endpoint moves: one partial transaction of four operations (its slot map's element
    // and, the endpoint being on this node, its hairpin element: each out and in).
    let before = k.transactions().len();
    api.apply(slice("web-1", "web", &["10.244.1.12"]));
    assert!(
        eventually(LONG, || elements(&k, "endpoints-0")
            .iter()
            .any(|e| e.contains("10.244.1.12")))
        .await,
        "{:?}",
        elements(&k, "endpoints-0")
    );
    let sent = since(&k, before);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0].operations, 4, "{}", sent[0].input);

    // A label the proxy does not read, then the Service goes: one transaction, the
    // deletion's (the label sent nothing, if it made a sync at all).
    agent.drain();
    let before = k.transactions().len();
    let mut labelled = service("web", "10.96.0.10", json!({}));
    labelled["metadata"]["labels"] = json!({"team": "a"});
    api.apply(labelled);
    api.delete("Service", "default", "web");
    assert!(
        eventually(LONG, || !elements(&k, "service-ips")
            .iter()
            .any(|e| e.contains("10.96.0.10")))
        .await
    );
    let sent = since(&k, before);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert!(
        sent[0]
            .input
            .contains("delete element ip svcproxy service-ips"),
        "{}",
        sent[0].input
    );
    while let Ok(r) = agent.syncs.try_recv() {
        assert!(r.report.commands <= sent[0].input.lines().count(), "{r:?}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_retries_a_refused_transaction_as_a_full_sync() {
    for kind in KINDS {
        let api = FakeApiServer::start().await;
        api.apply(node());
        api.apply(service("web", "10.96.0.10", json!({})));
        api.apply(slice("web-1", "web", &["10.244.1.11"]));
        let k = FakeKernel::new();
        // After the first sync, the kernel refuses the next transaction: the endpoint move's.
        let mut agent = Agent::spawn(agent_config(&api, kind.mode(&k)));
        let first = next_sync(&mut agent).await;
        assert_eq!(first.kind, SyncKind::Full, "{kind:?}");
        k.refuse_next(1);
        api.apply(slice("web-1", "web", &["10.244.1.12"]));
        // The refused sync sends no record; the retry does, as a full sync that holds the
        // change (syncs that sent nothing may come before it).
        loop {
            let r = next_sync(&mut agent).await;
            if r.kind == SyncKind::Full {
                break;
            }
            assert_eq!(r.report.commands, 0, "{kind:?}: {r:?}");
        }
        let log = k.transactions();
        assert!(
            log.iter().any(|t| t.refused.is_some()),
            "{kind:?}: {log:#?}"
        );
        assert!(holdings(&k).contains("10.244.1.12"), "{kind:?}");
        agent.stop().await;
    }
}

// Keeping the fake honest, as recorded responses keep the test apiserver honest: the same
// scripts, given to the real kernel (in a private network namespace) and to the fake, are
// accepted or refused alike.

/// Runs the real `program` (with `args`) in network namespace `ns`, `input` on its standard
/// input: `Err` with its error output when it fails.
fn real(ns: &str, program: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(program)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The real `nft -f -` in network namespace `ns`.
fn real_nft(ns: &str, script: &str) -> Result<(), String> {
    real(ns, &["nft", "-f", "-"], script)
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn the_fake_accepts_and_refuses_what_the_real_kernel_does() {
    if !common::can_unshare_net() || !common::have_nft() {
        common::cannot_run("needs root and nft");
    }
    let ns = common::netns::Netns::add(format!("svcproxy-fake-{}", std::process::id()));
    let (_, ruleset) = svcproxy::compile(&synthetic::cluster(5, 2), &config());
    let k = FakeKernel::new();
    let full = ruleset.script();
    assert_eq!(real_nft(&ns.0, &full), Ok(()));
    k.tamper_nft(&full).unwrap();
    let table = k.nft_table("ip", "svcproxy").unwrap();
    let first = table.elements("service-ips")[0].to_string();
    let key = first.split(" comment ").next().unwrap();
    let key = key.split(" : ").next().unwrap();
    let cases: Vec<(String, bool)> =
        vec![
        // Accepted: the same things again, flushes, a new chain jumped to.
        (format!("add element ip svcproxy service-ips {{ {first} }}"), true),
        ("add chain ip svcproxy services".into(), true),
        ("flush set ip svcproxy cluster-ips".into(), true),
        (
            "add chain ip svcproxy extra\nadd rule ip svcproxy services jump extra".into(),
            true,
        ),
        // Refused.
        ("add rule ip svcproxy services jump no-such-chain".into(), false),
        (
            "add element ip svcproxy service-ips { 10.96.99.9 . tcp . 80 : goto no-such-chain }"
                .into(),
            false,
        ),
        (format!("add element ip svcproxy service-ips {{ {key} : drop }}"), false),
        ("add element ip svcproxy no-such-set { 10.1.2.3 }".into(), false),
        ("delete element ip svcproxy cluster-ips { 10.99.99.99 }".into(), false),
        ("add rule ip svcproxy services ip daddr @no-such-set accept".into(), false),
        ("delete chain ip svcproxy services".into(), false),
        (
            "flush chain ip svcproxy endpoints-0\ndelete chain ip svcproxy endpoints-0".into(),
            false,
        ),
        ("delete map ip svcproxy endpoints-0".into(), false),
        ("add set ip svcproxy cluster-ips { type ipv6_addr; }".into(), false),
        ("delete table ip no-such-table".into(), false),
    ];
    for (script, accepted) in cases {
        let real = real_nft(&ns.0, &script);
        let fake = k.tamper_nft(&script);
        assert_eq!(
            real.is_ok(),
            accepted,
            "the real kernel on `{script}`: {real:?}"
        );
        assert_eq!(fake.is_ok(), accepted, "the fake on `{script}`: {fake:?}");
    }
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn the_fake_iptables_accepts_and_refuses_what_the_real_one_does() {
    if !common::can_unshare_net() {
        common::cannot_run("needs root");
    }
    let ns = common::netns::Netns::add(format!("svcproxy-fakeipt-{}", std::process::id()));
    let k = FakeKernel::new();
    let cases = [
        (
            "*nat\n:SVCP-A - [0:0]\n:SVCP-B - [0:0]\n-A SVCP-A -j SVCP-B\nCOMMIT\n",
            true,
        ),
        // Declared again: flushed, accepted.
        ("*nat\n:SVCP-B - [0:0]\n-A SVCP-B -j RETURN\nCOMMIT\n", true),
        ("*nat\n-A SVCP-A -j SVCP-NOPE\nCOMMIT\n", false),
        ("*nat\n-X SVCP-B\nCOMMIT\n", false),
        ("*nat\n-F SVCP-B\n-X SVCP-B\nCOMMIT\n", false),
        ("*nat\n-D SVCP-A -j SVCP-NOPE\nCOMMIT\n", false),
        ("*nat\n-F SVCP-NOPE\nCOMMIT\n", false),
        (
            "*nat\n-F SVCP-A\n-F SVCP-B\n-X SVCP-B\n-X SVCP-A\nCOMMIT\n",
            true,
        ),
    ];
    for (input, accepted) in cases {
        let real = real(
            &ns.0,
            &["iptables-nft-restore", "-w", "5", "--noflush"],
            input,
        );
        let fake = k.tamper_iptables("iptables-nft", input);
        assert_eq!(
            real.is_ok(),
            accepted,
            "the real one on `{input}`: {real:?}"
        );
        assert_eq!(fake.is_ok(), accepted, "the fake on `{input}`: {fake:?}");
    }
}
