//! The live agent against an in-process apiserver (tests/common/apiserver.rs) through the real
//! kube-rs client, applying to a private network namespace's kernel.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::agent::{Agent, eventually, node, service, slice};
use common::apiserver::FakeApiServer;
use common::netns::Netns;
use serde_json::{Value, json};
use svcproxy::agent::AgentConfig;
use svcproxy::backend::Mode;
use svcproxy::process::Runner;
use svcproxy::report::SyncKind;

/// A network namespace for one agent test's rules, deleted on drop.
fn agent_netns(tag: &str) -> Option<Netns> {
    if !common::have_nft() || !common::can_unshare_net() {
        common::cannot_run("the agent tests need root and nft");
    }
    Some(Netns::add(format!("sp{}-agent-{tag}", std::process::id())))
}

/// The agent's configuration for tests, its nft (and so its conntrack cleanup) in network
/// namespace `netns`.
fn config(api: &FakeApiServer, netns: &str) -> AgentConfig {
    common::agent::config(api, Mode::nftables(Runner::in_netns(netns)))
}

impl Agent {
    fn start(api: &FakeApiServer, ns: &Netns, tweak: impl FnOnce(&mut AgentConfig)) -> Agent {
        let mut c = config(api, &ns.0);
        tweak(&mut c);
        Agent::spawn(c)
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn rules_appear_only_after_both_lists_and_follow_changes() {
    let Some(ns) = agent_netns("follow") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.11", "10.244.1.12"]));
    api.hold_lists("EndpointSlice", true);
    let mut agent = Agent::start(&api, &ns, |_| {});

    // Services listed, EndpointSlices not yet: nothing may be written.
    assert!(
        agent.next_sync(Duration::from_millis(1500)).await.is_none(),
        "a sync before the lists were complete"
    );
    assert!(!ns.nft_ruleset().contains("svcproxy"));

    api.hold_lists("EndpointSlice", false);
    let first = agent.next_sync(5 * SECOND).await.expect("the first sync");
    assert_eq!(first.kind, SyncKind::Full);
    assert_eq!((first.services, first.slices), (1, 1));
    assert!(
        ns.nft_ruleset().contains("10.96.0.10 . tcp . 80"),
        "{}",
        ns.nft_ruleset()
    );

    // Add, modify, delete: the kernel follows, with partial syncs.
    api.apply(service("api", "10.96.0.20", json!({})));
    api.apply(slice("api-1", "api", &["10.244.1.21"]));
    assert!(
        eventually(3 * SECOND, || ns
            .nft_ruleset()
            .contains("10.244.1.21 . 8080"))
        .await
    );
    api.apply(slice("web-1", "web", &["10.244.1.11", "10.244.1.13"]));
    assert!(
        eventually(3 * SECOND, || ns
            .nft_ruleset()
            .contains("10.244.1.13 . 8080")
            && !ns.nft_ruleset().contains("10.244.1.12"))
        .await
    );
    api.delete("Service", "default", "api");
    assert!(eventually(3 * SECOND, || !ns.nft_ruleset().contains("10.96.0.20")).await);
    while let Ok(Some(s)) =
        tokio::time::timeout(Duration::from_millis(300), agent.syncs.recv()).await
    {
        assert_eq!(s.kind, SyncKind::Partial, "{s:?}");
    }
    agent.stop().await;
    // Stopping leaves the rules in place.
    assert!(ns.nft_ruleset().contains("10.96.0.10 . tcp . 80"));
}

/// Services and EndpointSlices are watched with kube-proxy's label selector: another proxy's
/// Services and headless slices are never sent to the agent; an object relabelled into or out
/// of the selection comes and goes with the apiserver's ADDED and DELETED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn foreign_and_headless_objects_are_not_watched() {
    let Some(ns) = agent_netns("selector") else {
        return;
    };
    let api = FakeApiServer::start().await;
    let proxy_name = |mut o: Value, v: Option<&str>| {
        o["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!(v);
        if v.is_none() {
            o["metadata"]["labels"]
                .as_object_mut()
                .unwrap()
                .remove("service.kubernetes.io/service-proxy-name");
        }
        o
    };
    api.apply(service("web", "10.96.0.15", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.15"]));
    let mut headless = slice("web-h", "web", &["10.244.1.99"]);
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    api.apply(headless);
    api.apply(proxy_name(
        service("other", "10.96.0.16", json!({})),
        Some("someone-else"),
    ));
    api.apply(slice("other-1", "other", &["10.244.1.16"]));
    let mut agent = Agent::start(&api, &ns, |_| {});
    let first = agent.next_sync(5 * SECOND).await.expect("the first sync");
    assert_eq!((first.services, first.slices), (1, 2), "{first:?}");
    let rules = ns.nft_ruleset();
    assert!(rules.contains("10.96.0.15 . tcp . 80"), "{rules}");
    assert!(
        !rules.contains("10.244.1.99") && !rules.contains("10.96.0.16"),
        "{rules}"
    );
    for kind in [
        "/api/v1/services?",
        "/apis/discovery.k8s.io/v1/endpointslices?",
    ] {
        let requests: Vec<String> = api
            .request_log()
            .into_iter()
            .filter(|r| r.contains(kind))
            .collect();
        assert!(!requests.is_empty());
        for r in &requests {
            assert!(
                r.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless")
                    || r.contains("labelSelector=!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"),
                "{r}"
            );
        }
    }

    // The other proxy lets go of its Service: it arrives; it claims it again: it goes.
    api.apply(service("other", "10.96.0.16", json!({})));
    assert!(
        eventually(3 * SECOND, || ns
            .nft_ruleset()
            .contains("10.96.0.16 . tcp . 80"))
        .await
    );
    api.apply(proxy_name(
        service("other", "10.96.0.16", json!({})),
        Some("someone-else"),
    ));
    assert!(eventually(3 * SECOND, || !ns.nft_ruleset().contains("10.96.0.16")).await);
    // The slice loses its headless label: its endpoint is used.
    api.apply(slice("web-h", "web", &["10.244.1.99"]));
    assert!(
        eventually(3 * SECOND, || ns
            .nft_ruleset()
            .contains("10.244.1.99 . 8080"))
        .await,
        "{}",
        ns.nft_ruleset()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn an_outage_keeps_the_rules_and_a_relist_catches_up() {
    let Some(ns) = agent_netns("outage") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.11"]));
    api.apply(service("gone", "10.96.0.30", json!({})));
    api.apply(slice("gone-1", "gone", &["10.244.1.31"]));
    let mut agent = Agent::start(&api, &ns, |_| {});
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    assert!(ns.nft_ruleset().contains("10.96.0.30"));

    // The apiserver goes away: the rules stay as they are.
    api.set_available(false);
    api.drop_watches();
    tokio::time::sleep(2 * SECOND).await;
    assert!(ns.nft_ruleset().contains("10.96.0.30") && ns.nft_ruleset().contains("10.96.0.10"));

    // Meanwhile a Service is deleted and history is compacted: the watch must re-list (410).
    api.delete("Service", "default", "gone");
    api.delete("EndpointSlice", "default", "gone-1");
    api.apply(slice("web-1", "web", &["10.244.1.12"]));
    api.compact();
    let (lists_before, _) = api.requests("Service");
    api.set_available(true);
    assert!(
        eventually(15 * SECOND, || {
            let r = ns.nft_ruleset();
            !r.contains("10.96.0.30") && r.contains("10.244.1.12 . 8080")
        })
        .await,
        "{}",
        ns.nft_ruleset()
    );
    assert!(
        api.requests("Service").0 > lists_before,
        "the Service watch listed again"
    );
    agent.stop().await;
}

/// 1,000 changes (500 Services and their slices) at `min_sync_period` = 1 s: a burst of at most
/// two syncs at once, then one per second, each taking in every change that arrived meanwhile,
/// until the last change is in. The exact spacing is proven by the pacer's unit tests with
/// explicit instants; here only what holds at any machine speed: however long the apiserver
/// takes to deliver the changes, no more syncs fit in that time than the pacing allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn a_burst_of_changes_is_coalesced() {
    let Some(ns) = agent_netns("burst") else {
        return;
    };
    let api = FakeApiServer::start().await;
    let mut agent = Agent::start(&api, &ns, |c| c.min_sync_period = SECOND);
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    let start = Instant::now();
    for i in 0..500 {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        api.apply(service(&format!("s{i}"), &ip, json!({})));
        api.apply(slice(
            &format!("s{i}-1"),
            &format!("s{i}"),
            &[&format!("10.245.{}.{}", i / 250, i % 250 + 1)],
        ));
    }
    let mut syncs = 0;
    loop {
        let s = agent
            .next_sync(30 * SECOND)
            .await
            .expect("syncs until all 500 Services and their slices are in");
        syncs += 1;
        if s.services == 500 && s.slices == 500 {
            break;
        }
    }
    // Two burst syncs, then at most one per started second of the time the changes took.
    let allowed = 2 + start.elapsed().as_secs() as usize + 1;
    eprintln!("{syncs} syncs in {:?}", start.elapsed());
    assert!(
        syncs <= allowed,
        "1,000 changes in {:?} took {syncs} syncs (at most {allowed} at 1 s apart)",
        start.elapsed()
    );
    let ruleset = ns.nft_ruleset();
    assert!(
        ruleset.contains("10.97.1.250 . tcp . 80 : 10.245.1.250 . 8080"),
        "{ruleset}"
    );
    agent.stop().await;
}

/// kube-proxy's pending-change gauges: Services and EndpointSlices changed and not yet synced.
/// With `min_sync_period` at an hour, the two syncs of the burst are the last for an hour, so
/// the changes after them stay pending, and the gauges count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn pending_changes_are_counted_until_synced() {
    let Some(ns) = agent_netns("pending") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(node());
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut agent = Agent::start(&api, &ns, |c| {
        c.metrics_address = Some(metrics);
        c.min_sync_period = Duration::from_secs(3600);
    });
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    let gauge = move |name: &str| -> i64 {
        let (_, body) = http_get(metrics, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    };
    const SERVICES: &str = "kubeproxy_sync_proxy_rules_service_changes_pending";
    const SLICES: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
    let (s, e) = tokio::task::spawn_blocking(move || (gauge(SERVICES), gauge(SLICES)))
        .await
        .unwrap();
    assert_eq!((s, e), (0, 0), "nothing pending after the first sync");
    // The second token of the burst: a change (or the Node's list completing) syncs at once.
    api.apply(service("first", "10.96.0.80", json!({})));
    agent
        .next_sync(10 * SECOND)
        .await
        .expect("the burst's second sync");
    // The bucket is empty now: these wait, and are counted.
    api.apply(service("a", "10.96.0.81", json!({})));
    api.apply(service("b", "10.96.0.82", json!({})));
    api.apply(slice("b-1", "b", &["10.244.1.82"]));
    let counted = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + 10 * SECOND;
        loop {
            let now = (gauge(SERVICES), gauge(SLICES));
            if now.0 >= 2 && now.1 >= 1 || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    })
    .await
    .unwrap();
    assert!(counted.0 >= 2 && counted.1 >= 1, "{counted:?}");
    assert!(!ns.nft_ruleset().contains("10.96.0.82"), "not synced yet");
    agent.stop().await;
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, SECOND).expect("connect");
    s.set_read_timeout(Some(2 * SECOND)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn health_metrics_and_health_check_node_ports() {
    let Some(ns) = agent_netns("health") else {
        return;
    };
    let api = FakeApiServer::start().await;
    let hcnp = free_port();
    api.apply(node());
    api.apply(service(
        "lb",
        "10.96.0.40",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": hcnp,
               "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30040, "protocol": "TCP"}]}),
    ));
    let mut lb_slice = slice("lb-1", "lb", &["10.244.1.41"]);
    lb_slice["ports"] = json!([{"port": 8080, "protocol": "TCP"}]);
    // A trigger time from before the agent started is not measured (as kube-proxy).
    lb_slice["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": "2020-01-01T00:00:00Z"});
    api.apply(lb_slice.clone());
    let (healthz, metrics) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let mut agent = Agent::start(&api, &ns, |c| {
        c.healthz_address = Some(healthz);
        c.metrics_address = Some(metrics);
    });
    agent.next_sync(5 * SECOND).await.expect("the first sync");

    // The network programming latency runs from the slice's trigger time (the change behind
    // it, as the EndpointSlice controller stamps it), not from the slice reaching the agent:
    // a change stamped 1.5 s before it is written counts at least 1.5 s. A change without
    // the annotation is not measured.
    let trigger = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut stamped = slice("lb-2", "lb", &["10.244.2.41"]);
    stamped["ports"] = json!([{"port": 8080, "protocol": "TCP"}]);
    stamped["endpoints"][0]["nodeName"] = json!("node-b");
    stamped["metadata"]["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time":
        k8s_openapi::jiff::Timestamp::try_from(trigger).unwrap().to_string()});
    api.apply(stamped.clone());
    agent
        .next_sync(5 * SECOND)
        .await
        .expect("a sync for the stamped slice");
    stamped["endpoints"][0]["addresses"] = json!(["10.244.2.42"]);
    stamped["metadata"]["annotations"] = json!({});
    api.apply(stamped);
    agent
        .next_sync(5 * SECOND)
        .await
        .expect("a sync for the unstamped change");

    // 200 once the agent has seen its Node too (its watch may come in after the first sync).
    let mut last = (0, String::new());
    assert!(
        eventually(5 * SECOND, || {
            last = http_get(healthz, "/healthz");
            last.0 == 200
        })
        .await,
        "{last:?}"
    );
    let body = last.1;
    let json_body = |out: &str| -> Value {
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or("")).expect(out)
    };
    let v = json_body(&body);
    assert!(
        v["lastUpdated"].as_str().unwrap().starts_with("20"),
        "{body}"
    );
    assert!(v["currentTime"].is_string(), "{body}");
    assert_eq!(v["nodeEligible"], true, "{body}");
    assert_eq!(v["healthy"], true, "{body}");
    assert_eq!(v["status"]["IPv4"]["healthy"], true, "{body}");
    assert!(
        body.to_lowercase()
            .contains("x-content-type-options: nosniff"),
        "{body}"
    );
    let (status, body) = tokio::task::spawn_blocking(move || http_get(healthz, "/livez"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(json_body(&body).get("nodeEligible").is_none(), "{body}");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        r#"kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1"#,
        r#"kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1"#,
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\",ip_family=\"IPv4\"} 0\n",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\",ip_family=\"IPv4\"} 1\n",
        "svcproxy_change_to_kernel_duration_seconds_count",
        r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#,
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "svcproxy_config_warnings 0\n",
        r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 0"#,
        r#"kubeproxy_proxy_healthz_total{code="200"} 1"#, // (a 503 before is possible)
        r#"kubeproxy_proxy_livez_total{code="200"} 1"#,
        r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"} 0"#,
    ] {
        assert!(body.contains(name), "missing {name} in\n{body}");
    }

    // The health check node port: 200 with one local endpoint...
    let hc = SocketAddr::from(([127, 0, 0, 1], hcnp));
    assert!(eventually(3 * SECOND, || std::net::TcpStream::connect(hc).is_ok()).await);
    let (status, body) = tokio::task::spawn_blocking(move || http_get(hc, "/"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("X-Load-Balancing-Endpoint-Weight: 1")
            || body.contains("x-load-balancing-endpoint-weight: 1"),
        "{body}"
    );
    assert!(
        body.contains("\"localEndpoints\": 1")
            && body.contains("\"name\": \"lb\"")
            && body.contains("\"serviceProxyHealthy\": true"),
        "{body}"
    );
    // ...503 with 0 when the only local endpoint is serving but terminating (it still gets
    // traffic, but the load balancer must drain the node)...
    lb_slice["endpoints"][0]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    api.apply(lb_slice.clone());
    let mut last = (0, String::new());
    assert!(
        eventually(3 * SECOND, || {
            last = http_get(hc, "/");
            last.0 == 503
        })
        .await,
        "{last:?}"
    );
    assert!(
        last.1.contains("\"localEndpoints\": 0")
            && last
                .1
                .to_lowercase()
                .contains("x-load-balancing-endpoint-weight: 0"),
        "{last:?}"
    );
    assert!(
        ns.nft_ruleset().contains("10.244.1.41"),
        "the terminating endpoint still serves"
    );
    // ...back to 200 when it is ready, 503 once the endpoint is on another node...
    lb_slice["endpoints"][0]["conditions"] = json!({"ready": true});
    api.apply(lb_slice.clone());
    assert!(
        eventually(3 * SECOND, || {
            last = http_get(hc, "/");
            last.0 == 200
        })
        .await,
        "{last:?}"
    );
    lb_slice["endpoints"][0]["nodeName"] = json!("node-b");
    api.apply(lb_slice);
    let (status, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        eventually(3 * SECOND, || {
            let (_, body) = http_get(metrics, "/metrics");
            body.contains(r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"} 1"#)
        })
        .await,
        "no local endpoint for the eTP=Local Service:\n{body}"
    );
    let mut last = (0, String::new());
    assert!(
        eventually(3 * SECOND, || {
            last = http_get(hc, "/");
            last.0 == 503
        })
        .await,
        "{last:?}"
    );
    // ...and closed with the Service.
    api.delete("Service", "default", "lb");
    assert!(eventually(3 * SECOND, || std::net::TcpStream::connect(hc).is_err()).await);
    agent.stop().await;
}

/// kube-proxy's `/healthz` fails while its Node is being deleted or carries the cluster
/// autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so that load balancers drain the node;
/// `/livez` does not (the proxy itself is fine, the kubelet must not restart it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn healthz_fails_while_the_node_goes_away() {
    let Some(ns) = agent_netns("nodegone") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.11"]));
    let (healthz, metrics) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let mut agent = Agent::start(&api, &ns, |c| {
        c.healthz_address = Some(healthz);
        c.metrics_address = Some(metrics);
    });
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    let get = move |path: &'static str| http_get(healthz, path);
    let body_of = |out: &str| -> Value {
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or("")).expect(out)
    };
    // Waits (generously) until /healthz answers `code`; returns that answer.
    let healthz_becomes = |code: u16| async move {
        let mut last = (0, String::new());
        let answered = eventually(20 * SECOND, || {
            last = get("/healthz");
            last.0 == code
        })
        .await;
        assert!(answered, "/healthz never answered {code}: {last:?}");
        last
    };
    // Eligible once the agent has seen its Node (its watch may come in after the first sync).
    healthz_becomes(200).await;

    // The autoscaler taints the node: /healthz 503 with nodeEligible false, /livez 200.
    let mut tainted = node();
    tainted["spec"] = json!({"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1795309323", "effect": "NoSchedule"}]});
    api.apply(tainted);
    let last = healthz_becomes(503).await;
    let v = body_of(&last.1);
    assert_eq!(v["nodeEligible"], false, "{last:?}");
    assert_eq!(v["healthy"], true, "the proxy itself is healthy: {last:?}");
    assert_eq!(get("/livez").0, 200);

    // Another taint only: eligible again.
    let mut other = node();
    other["spec"] = json!({"taints": [{"key": "example.com/maintenance", "effect": "NoSchedule"}]});
    api.apply(other);
    healthz_becomes(200).await;

    // The Node is being deleted (finalizers hold it): 503 again, /livez still 200.
    let mut deleting = node();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-22T01:02:03Z");
    deleting["metadata"]["finalizers"] = json!(["example.com/hold"]);
    api.apply(deleting);
    let last = healthz_becomes(503).await;
    assert_eq!(body_of(&last.1)["nodeEligible"], false, "{last:?}");
    let (code, livez) = get("/livez");
    assert_eq!(code, 200, "{livez}");
    assert!(body_of(&livez).get("nodeEligible").is_none(), "{livez}");
    let (_, text) = http_get(metrics, "/metrics");
    for line in [
        r#"kubeproxy_proxy_healthz_total{code="503"}"#,
        r#"kubeproxy_proxy_healthz_total{code="200"}"#,
        r#"kubeproxy_proxy_livez_total{code="200"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(
        !text.contains(r#"kubeproxy_proxy_livez_total{code="503"}"#),
        "{text}"
    );
    agent.stop().await;
}

/// End to end: the agent against the apiserver, its rules in a node namespace with real pods,
/// a client connecting through a Service while the Service's EndpointSlice changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn traffic_follows_endpoint_slice_changes() {
    use common::netns::{Pod, World, tcp};
    let Some(mut w) = World::new() else { return };
    let pods: Vec<Pod> = (1..=3).map(|i| w.pod(&format!("p{i}"), false)).collect();
    let client = w.pod("client", false);
    for p in &pods {
        w.serve(p, 8080);
    }
    let ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service("web", "10.96.0.50", json!({})));
    api.apply(slice("web-1", "web", &[&ips[0]]));
    let mut agent = Agent::spawn(AgentConfig {
        min_sync_period: Duration::from_millis(100),
        ..config(&api, &w.node)
    });
    agent.next_sync(5 * SECOND).await.expect("the first sync");

    let to: SocketAddr = "10.96.0.50:80".parse().unwrap();
    let ns = client.ns.clone();
    let who = move || tcp(&ns, to, 2 * SECOND).map(|r| r.pod);
    assert_eq!(
        tokio::task::spawn_blocking(who.clone())
            .await
            .unwrap()
            .unwrap(),
        "p1"
    );

    // Scale out, then move: the answers follow, and no connection fails on the way. A client
    // connects in a loop (each connection new) until told to stop; each step waits for what
    // the client saw, with generous deadlines, not for a fixed time.
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Seen {
        answers: Vec<String>,
        failures: Vec<String>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (who, seen, stop) = (who.clone(), seen.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            // Bounded: the test ends it long before this.
            let deadline = Instant::now() + 120 * SECOND;
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                let r = who();
                let mut s = seen.lock().unwrap();
                match r {
                    Ok(p) => s.answers.push(p),
                    Err(e) => s.failures.push(e.to_string()),
                }
            }
        })
    };
    let answers_since = |from: usize| seen.lock().unwrap().answers[from..].to_vec();
    let count = || seen.lock().unwrap().answers.len();
    assert!(
        eventually(30 * SECOND, || count() >= 5).await,
        "the client gets answers"
    );

    // What the kernel holds decides where a new TCP connection goes: wait for it (a sync
    // record may be another sync's, a Node update say).
    let node_ns = w.node.clone();
    let ruleset = move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &node_ns, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from = count();
    api.apply(slice("web-1", "web", &[&ips[0], &ips[1], &ips[2]]));
    assert!(
        eventually(30 * SECOND, || {
            let r = ruleset();
            ips.iter().all(|ip| r.contains(ip.as_str()))
        })
        .await,
        "the scale-out reaches the kernel"
    );
    assert!(
        eventually(60 * SECOND, || {
            let a = answers_since(from);
            ["p1", "p2", "p3"].iter().all(|p| a.iter().any(|x| x == p))
        })
        .await,
        "after the scale-out every pod answers: {:?}",
        answers_since(from)
    );

    api.apply(slice("web-1", "web", &[&ips[2]]));
    assert!(
        eventually(30 * SECOND, || {
            let r = ruleset();
            !r.contains(ips[0].as_str()) && !r.contains(ips[1].as_str())
        })
        .await,
        "the move reaches the kernel"
    );
    // Connections opened after the sync reached the kernel go to p3 alone. The client connects
    // one at a time, so at most one answer still comes from a connection opened before.
    let from = count() + 1;
    assert!(
        eventually(60 * SECOND, || count() >= from + 20).await,
        "the client keeps getting answers"
    );
    stop.store(true, Ordering::Release);
    load.await.unwrap();
    let (failures, after) = {
        let s = seen.lock().unwrap();
        (s.failures.clone(), s.answers[from..].to_vec())
    };
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        after.iter().all(|p| p == "p3"),
        "after the last change only p3 answers: {after:?}"
    );
    agent.stop().await;
}

/// A client that keeps its UDP socket follows the endpoint as soon as the agent reports the
/// sync: the agent deletes the stale conntrack entry in the namespace its nft runs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn a_kept_udp_socket_follows_the_endpoint() {
    use common::netns::{Pod, World, udp_ask, udp_socket};
    let Some(mut w) = World::new() else { return };
    let pods: Vec<Pod> = (1..=2).map(|i| w.pod(&format!("p{i}"), false)).collect();
    let client = w.pod("client", false);
    for p in &pods {
        w.serve(p, 5353);
    }
    let dns_slice = |pod: &Pod| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "dns-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [pod.ip.to_string()], "conditions": {"ready": true}, "nodeName": "node-a"}]
        })
    };
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service(
        "dns",
        "10.96.0.53",
        json!({"ports": [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}),
    ));
    api.apply(dns_slice(&pods[0]));
    let mut agent = Agent::spawn(config(&api, &w.node));
    agent.next_sync(5 * SECOND).await.expect("the first sync");

    let to: SocketAddr = "10.96.0.53:53".parse().unwrap();
    let sock = std::sync::Arc::new(udp_socket(&client.ns));
    let ask = {
        let sock = sock.clone();
        move || udp_ask(&sock, to).map(|r| r.pod)
    };
    assert_eq!(
        tokio::task::spawn_blocking(ask.clone())
            .await
            .unwrap()
            .unwrap(),
        "p1"
    );
    // p1 keeps serving: only the rules and the conntrack entry decide who answers.
    api.apply(dns_slice(&pods[1]));
    // Waits for the sync of the change: the one that made UDP flows stale (other syncs, a
    // Node update say, may be reported before it, even while it runs). The agent reports a
    // sync only after its conntrack cleanup, so from here on no stale entry is left.
    loop {
        let record = agent
            .next_sync(30 * SECOND)
            .await
            .expect("the sync of the change");
        if record.stale_udp_flows > 0 {
            break;
        }
    }
    for _ in 0..3 {
        assert_eq!(
            tokio::task::spawn_blocking(ask.clone())
                .await
                .unwrap()
                .unwrap(),
            "p2"
        );
    }
    agent.stop().await;
}

/// `svcproxy dump --kubeconfig`: read the cluster once and print the ruleset, writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_reads_the_cluster_once() {
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service("web", "10.96.0.60", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.61"]));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: nobody}}\ncurrent-context: fake\nusers:\n- name: nobody\n  user: {{}}\n",
            api.url()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_svcproxy"))
            .args(["dump", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--node", "node-a"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("10.96.0.60 . tcp . 80 comment \"default/web:http/tcp\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("10.96.0.60 . tcp . 80 : 10.244.1.61 . 8080"),
        "{stdout}"
    );
    assert_eq!(api.requests("Service").1, 0, "no watch: one read");
}

/// `dump --kubeconfig` exits 2 when something was skipped, as `dump --from` does, and names each
/// skipped thing on stderr; what is usable is still printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_of_the_cluster_exits_2_and_names_what_it_skipped() {
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service(
        "web",
        "10.96.0.62",
        json!({"externalIPs": ["203.0.113.62", "203.0.113.bogus"]}),
    ));
    api.apply(service("broken", "10.96.0.999", json!({})));
    let mut s = slice("web-1", "web", &["10.244.1.62", "10.244.1.63"]);
    s["endpoints"][1]["addresses"] = json!([]);
    api.apply(s);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: nobody}}\ncurrent-context: fake\nusers:\n- name: nobody\n  user: {{}}\n",
            api.url()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_svcproxy"))
            .args(["dump", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--node", "node-a"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for skipped in [
        "Service default/web: spec.externalIPs[1]: \"203.0.113.bogus\" is not an IP address",
        "Service default/broken: spec.clusterIPs[0]: \"10.96.0.999\" is not an IP address",
        "EndpointSlice default/web-1: endpoints[1].addresses: empty",
    ] {
        assert!(stderr.contains(&format!("skipped: {skipped}")), "{stderr}");
    }
    assert!(
        stdout.contains("10.96.0.62 . tcp . 80 : 10.244.1.62 . 8080")
            && stdout.contains("203.0.113.62 . tcp . 80"),
        "the rest of the Service and of the slice is used: {stdout}"
    );
}

/// The agent leaves out a bad element, keeps the rest of its object, and counts what it left
/// out, by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn the_agent_skips_bad_elements_and_counts_them() {
    let Some(ns) = agent_netns("skipped") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service(
        "web",
        "10.96.0.64",
        json!({"externalIPs": ["203.0.113.bogus", "203.0.113.064"]}),
    ));
    api.apply(service("broken", "10.96.0.999", json!({})));
    let mut s = slice("web-1", "web", &["10.244.1.64", "10.244.1.65"]);
    s["endpoints"][1]["addresses"] = json!([]);
    api.apply(s);
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut agent = Agent::start(&api, &ns, |c| c.metrics_address = Some(metrics));
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    let rules = ns.nft_ruleset();
    assert!(
        rules.contains("10.96.0.64 . tcp . 80") && rules.contains("203.0.113.64 . tcp . 80"),
        "{rules}"
    );
    assert!(rules.contains("10.244.1.64 . 8080"), "{rules}");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    for line in [
        "svcproxy_skipped_fields{kind=\"Service\"} 1",
        "svcproxy_skipped_fields{kind=\"EndpointSlice\"} 1",
        "svcproxy_invalid_objects{kind=\"Service\"} 1",
        "svcproxy_invalid_objects{kind=\"EndpointSlice\"} 0",
    ] {
        assert!(body.contains(line), "missing {line} in\n{body}");
    }
    agent.stop().await;
}

/// `svcproxy_ruleset_drift` from the agent's metrics.
async fn drift(metrics: SocketAddr) -> i64 {
    let (status, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("svcproxy_ruleset_drift "))
        .unwrap_or_else(|| panic!("no svcproxy_ruleset_drift in\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// A full resync every sync period repairs drift: someone deleting svcproxy's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn the_periodic_full_sync_repairs_drift() {
    let Some(ns) = agent_netns("drift") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(service("web", "10.96.0.70", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.71"]));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut agent = Agent::start(&api, &ns, |c| {
        c.sync_period = Duration::from_secs(2);
        c.metrics_address = Some(metrics);
    });
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    let ok = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "delete", "table", "ip", "svcproxy",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(!ns.nft_ruleset().contains("10.96.0.70"));
    // Other syncs (the Node watch completing its list) may come first; the resync is a full one.
    loop {
        let s = agent
            .next_sync(5 * SECOND)
            .await
            .expect("the periodic resync");
        if s.kind == SyncKind::Full {
            break;
        }
    }
    assert!(
        ns.nft_ruleset().contains("10.96.0.70 . tcp . 80"),
        "{}",
        ns.nft_ruleset()
    );
    // The drift was measured before the resync repaired it: one difference, the missing table.
    assert_eq!(drift(metrics).await, 1);
    agent.stop().await;
}

/// The binary: `svcproxy run` in a network namespace, against an apiserver listening inside that
/// namespace. It tells systemd READY only once its first ruleset is in the kernel, logs JSON,
/// and SIGTERM stops it and leaves the rules in place.
#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn the_binary_runs_until_sigterm_and_leaves_the_rules() {
    let Some(ns) = agent_netns("binary") else {
        return;
    };
    Command::new("ip")
        .args(["-n", &ns.0, "link", "set", "lo", "up"])
        .status()
        .unwrap();
    // The apiserver's socket is created inside the namespace, so the agent there can reach it.
    let (api_tx, api_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let ns_name = ns.0.clone();
    let server = std::thread::spawn(move || {
        common::netns::in_ns(&ns_name, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let api = FakeApiServer::start().await;
                api.apply(node());
                api.apply(service("web", "10.96.0.80", json!({})));
                api.apply(slice("web-1", "web", &["10.244.1.81"]));
                api.hold_lists("EndpointSlice", true);
                api_tx.send(api.clone()).unwrap();
                let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
            });
        })
    });
    let api = api_rx.recv_timeout(5 * SECOND).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: f\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: f\n  context: {{cluster: f, user: u}}\ncurrent-context: f\nusers:\n- name: u\n  user: {{}}\n", api.url()),
    )
    .unwrap();
    // systemd's notification socket, played by the test.
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_svcproxy"),
            "run",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .args([
            "--hostname-override",
            "node-a",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--log-format",
            "json",
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        notify.recv(&mut buf).is_err(),
        "READY before the EndpointSlices were listed"
    );
    assert!(!ns.nft_ruleset().contains("svcproxy"));
    api.hold_lists("EndpointSlice", false);
    notify.set_read_timeout(Some(10 * SECOND)).unwrap();
    let n = notify.recv(&mut buf).expect("READY=1");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        ns.nft_ruleset().contains("10.96.0.80 . tcp . 80"),
        "READY only with the rules in place: {}",
        ns.nft_ruleset()
    );
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(
        ns.nft_ruleset().contains("10.96.0.80 . tcp . 80"),
        "the rules stay after SIGTERM"
    );
    // JSON logs, one sync line with its kind.
    let synced: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "synced")
        .collect();
    assert!(!synced.is_empty(), "{logs}");
    assert_eq!(synced[0]["fields"]["kind"], "full", "{logs}");
    // `--cleanup`, as `kube-proxy --cleanup`: the tables go, and nothing else happens.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_svcproxy"),
            "run",
            "--cleanup",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ns.nft_ruleset().contains("svcproxy"));
    let _ = done_tx.send(());
    let _ = server.join();
}

/// NodePorts follow the node's addresses while the agent runs: an address added to an interface
/// answers at once, a removed one stops, one outside `--nodeport-addresses` never answers; with
/// `primary`, the Node object's address (changed through the apiserver) is the one that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn node_ports_follow_the_node_addresses() {
    use common::netns::{World, sh, tcp};
    use svcproxy::model::NodePortAddresses;
    let Some(mut w) = World::new() else { return };
    let pod = w.pod("p1", false);
    w.serve(&pod, 8080);
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(service(
        "np",
        "10.96.0.90",
        json!({"type": "NodePort", "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30090, "protocol": "TCP"}]}),
    ));
    let mut s = slice("np-1", "np", &[&pod.ip.to_string()]);
    s["ports"] = json!([{"port": 8080, "protocol": "TCP"}]);
    api.apply(s);
    let start_agent = |addresses: NodePortAddresses| {
        let mut c = config(&api, &w.node);
        c.proxy.nodeport_addresses = addresses;
        Agent::spawn(c)
    };
    let client = w.client.clone();
    let answers = move |ip: &str| {
        let to: SocketAddr = format!("{ip}:30090").parse().unwrap();
        tcp(&client, to, Duration::from_millis(300)).is_ok_and(|r| r.pod == "p1")
    };
    let answers_within = |ip: &'static str, secs: u64| {
        let answers = answers.clone();
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                if answers(ip) {
                    return Some(start.elapsed());
                }
            }
            None
        })
    };

    // Only local addresses in 198.18.0.0/24 answer NodePorts.
    let mut agent = start_agent(NodePortAddresses::Cidrs(vec![
        "198.18.0.0/24".parse().unwrap(),
    ]));
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    let node_ip_answers = tokio::task::spawn_blocking({
        let answers = answers.clone();
        move || answers("203.0.113.1")
    });
    assert!(
        !node_ip_answers.await.unwrap(),
        "203.0.113.1 is outside the allowed CIDRs"
    );
    sh(&[
        "ip",
        "-n",
        &w.node,
        "addr",
        "add",
        "198.18.0.5/32",
        "dev",
        "eth-x",
    ]);
    // The rules match local addresses as they are, without a sync: answers at once (a
    // generous deadline here; how fast is for the benches).
    answers_within("198.18.0.5", 10)
        .await
        .unwrap()
        .expect("the new address answers");
    sh(&[
        "ip",
        "-n",
        &w.node,
        "addr",
        "del",
        "198.18.0.5/32",
        "dev",
        "eth-x",
    ]);
    let still = tokio::task::spawn_blocking({
        let answers = answers.clone();
        move || answers("198.18.0.5")
    });
    assert!(!still.await.unwrap(), "a removed address stops answering");
    // An address outside the CIDRs never answers, even while local.
    sh(&[
        "ip",
        "-n",
        &w.node,
        "addr",
        "add",
        "198.19.0.5/32",
        "dev",
        "eth-x",
    ]);
    assert!(answers_within("198.19.0.5", 1).await.unwrap().is_none());
    agent.stop().await;

    // `primary`: the Node object's address; it moves when the Node does.
    let mut agent = start_agent(NodePortAddresses::Primary);
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    sh(&[
        "ip",
        "-n",
        &w.node,
        "addr",
        "add",
        "192.168.1.10/32",
        "dev",
        "eth-x",
    ]);
    assert!(
        answers_within("192.168.1.10", 3).await.unwrap().is_some(),
        "the Node's InternalIP answers"
    );
    assert!(
        answers_within("198.19.0.5", 1).await.unwrap().is_none(),
        "another local address does not"
    );
    let mut moved = node();
    moved["status"]["addresses"][0]["address"] = json!("198.19.0.5");
    api.apply(moved);
    assert!(
        answers_within("198.19.0.5", 3).await.unwrap().is_some(),
        "the new InternalIP answers"
    );
    assert!(
        answers_within("192.168.1.10", 1).await.unwrap().is_none(),
        "the old one no longer does"
    );
    agent.stop().await;
}

/// The agent in the iptables mode (`--proxy-mode iptables`): partial syncs follow changes, and
/// the periodic full sync repairs a flushed chain and a deleted jump rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn iptables_mode_follows_changes_and_repairs_drift() {
    use svcproxy::iptables::Variant;
    let Some(ns) = agent_netns("iptables") else {
        return;
    };
    if Command::new("iptables-legacy-restore")
        .arg("--version")
        .output()
        .is_err()
    {
        common::cannot_run("iptables-legacy is not installed");
    }
    let sh = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let nat = || sh(&["iptables-legacy-save", "-t", "nat"]);
    let api = FakeApiServer::start().await;
    api.apply(service("web", "10.96.0.90", json!({})));
    api.apply(slice("web-1", "web", &["10.244.1.91"]));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut agent = Agent::start(&api, &ns, |c| {
        c.backend = Mode::iptables(Runner::in_netns(&ns.0), Variant::Legacy);
        c.sync_period = Duration::from_secs(3);
        c.metrics_address = Some(metrics);
    });
    let first = agent.next_sync(5 * SECOND).await.expect("the first sync");
    assert_eq!(first.kind, SyncKind::Full);
    assert!(
        nat().contains("--to-destination 10.244.1.91:8080"),
        "{}",
        nat()
    );
    assert!(!ns.nft_ruleset().contains("table ip svcproxy"));

    api.apply(slice("web-1", "web", &["10.244.1.92"]));
    assert!(
        eventually(3 * SECOND, || nat()
            .contains("--to-destination 10.244.1.92:8080")
            && !nat().contains("10.244.1.91"))
        .await,
        "{}",
        nat()
    );
    // Drift: the dispatch chain flushed, a jump rule deleted.
    sh(&["iptables-legacy", "-t", "nat", "-F", "SVCP-SERVICES"]);
    sh(&[
        "iptables-legacy",
        "-t",
        "nat",
        "-D",
        "OUTPUT",
        "-m",
        "comment",
        "--comment",
        "svcproxy: Kubernetes Services",
        "-j",
        "SVCP-SERVICES",
    ]);
    loop {
        let s = agent
            .next_sync(6 * SECOND)
            .await
            .expect("the periodic resync");
        if s.kind == SyncKind::Full {
            break;
        }
    }
    let repaired = nat();
    assert!(
        repaired.contains("-A SVCP-SERVICES -d 10.96.0.90/32")
            && repaired.contains(
                "-A OUTPUT -m comment --comment \"svcproxy: Kubernetes Services\" -j SVCP-SERVICES"
            ),
        "{repaired}"
    );
    // Measured before the repair: the flushed chain's rules and the deleted jump rule (IPv4).
    let d = drift(metrics).await;
    assert!(d >= 2, "svcproxy_ruleset_drift {d}");
    agent.stop().await;
}

/// ServiceCIDRs are watched: their CIDRs drop unallocated ClusterIPs, and follow the objects;
/// load-balancer source ranges reach the firewall sets, a bad one left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn service_cidrs_and_source_ranges_follow_the_cluster() {
    let Some(ns) = agent_netns("cidrs") else {
        return;
    };
    let api = FakeApiServer::start().await;
    api.apply(node());
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                     "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/12"]}}),
    );
    api.apply(service(
        "lb",
        "10.96.0.30",
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [" 203.0.113.0/25", "nope"]}),
    ));
    api.apply(slice("lb-1", "lb", &["10.244.1.31"]));
    let mut agent = Agent::start(&api, &ns, |_| {});
    agent.next_sync(5 * SECOND).await.expect("the first sync");
    assert!(
        eventually(3 * SECOND, || ns.nft_ruleset().contains("10.96.0.0/12")).await,
        "{}",
        ns.nft_ruleset()
    );
    // The load balancer gets its ingress IP: its ranges guard it.
    let mut lb = service(
        "lb",
        "10.96.0.30",
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [" 203.0.113.0/25", "nope"]}),
    );
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.30"}]}});
    api.apply(lb);
    assert!(
        eventually(3 * SECOND, || ns
            .nft_ruleset()
            .contains("198.51.100.30 . tcp . 80 . 203.0.113.0/25"))
        .await,
        "{}",
        ns.nft_ruleset()
    );
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                     "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.100.0.0/16"]}}),
    );
    assert!(
        eventually(3 * SECOND, || {
            let r = ns.nft_ruleset();
            r.contains("10.100.0.0/16") && !r.contains("10.96.0.0/12")
        })
        .await,
        "{}",
        ns.nft_ruleset()
    );
    agent.stop().await;
}
