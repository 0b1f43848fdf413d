//! Network programming latency: an EndpointSlice change at the apiserver → its rules committed
//! to the kernel, through the real agent (kube-rs watch, compile, partial sync) against the
//! in-process test apiserver, with the rules in a private network namespace.
//!
//! `cargo bench --bench latency -- [--services 1000,10000] [--endpoints 10] [--changes 20]`
//! (as root). Prints the median and the 90th percentile per cluster size.

#[allow(dead_code)]
#[path = "../tests/common/apiserver.rs"]
mod apiserver;

use std::process::Command;
use std::time::{Duration, Instant};

use apiserver::FakeApiServer;
use serde_json::{Value, json};
use svcproxy::agent::AgentConfig;
use svcproxy::nft::apply::NftCommand;

fn service(i: usize) -> Value {
    let ip = svcproxy::synthetic::cluster_ip(i).to_string();
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(i: usize, endpoints: usize, generation: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            let ip = if j == 0 && generation > 0 {
                format!("10.255.{}.{}", generation / 250, generation % 250 + 1)
            } else {
                svcproxy::synthetic::endpoint_ip(i, j, endpoints).to_string()
            };
            json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": format!("node-{}", j % 100)})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

fn arg(name: &str, default: &str) -> String {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let sizes: Vec<usize> = arg("--services", "1000,10000")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let endpoints: usize = arg("--endpoints", "10").parse().unwrap();
    let changes: usize = arg("--changes", "20").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| Services | endpoints each | EndpointSlice change → rules in the kernel: median | p90 | first full sync | a partial sync's parts (medians): convert / compile (the changed Services, and the difference) / nft |"
    );
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let ns = format!("svcproxy-latency-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &ns])
                .status()
                .unwrap()
                .success(),
            "needs root"
        );
        rt.block_on(async {
            let api = FakeApiServer::start().await;
            for i in 0..n {
                api.apply(service(i));
                api.apply(slice(i, endpoints, 0));
            }
            let (tx, mut syncs) = tokio::sync::mpsc::unbounded_channel();
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let config = AgentConfig {
                kube: api.kube_config(),
                node_name: "node-0".into(),
                node_ips: vec![],
                proxy: Default::default(),
                min_sync_period: Duration::ZERO,
                sync_period: Duration::from_secs(3600),
                healthz_address: None,
                metrics_address: None,
                health_check_address: "127.0.0.1".parse().unwrap(),
                nft: NftCommand::in_netns(&ns),
                iptables: None,
            };
            let start = Instant::now();
            let task = tokio::spawn(svcproxy::agent::run(config, stop_rx, Some(tx)));
            syncs.recv().await.expect("first sync");
            let first = start.elapsed();
            let mut times = Vec::new();
            let mut phases = Vec::new();
            for c in 1..=changes {
                tokio::time::sleep(Duration::from_millis(200)).await;
                while syncs.try_recv().is_ok() {}
                let t = Instant::now();
                api.apply(slice(c % n, endpoints, c));
                let record = syncs.recv().await.expect("a sync");
                assert!(record.report.elements_added > 0, "{record:?}");
                times.push(t.elapsed());
                phases.push(record.phases);
            }
            times.sort();
            let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
            let median_of = |f: fn(&svcproxy::agent::Phases) -> Duration| {
                let mut v: Vec<Duration> = phases.iter().map(f).collect();
                v.sort();
                ms(v[v.len() / 2])
            };
            println!(
                "| {n} | {endpoints} | {} | {} | {} | {} / {} / {} |",
                ms(times[times.len() / 2]),
                ms(times[times.len() * 9 / 10]),
                ms(first),
                median_of(|p| p.convert),
                median_of(|p| p.compile),
                median_of(|p| p.apply),
            );
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        });
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}
