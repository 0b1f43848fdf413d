//! Network programming latency through the real agent (kube-rs watch, compile, partial sync)
//! against the in-process test apiserver, with N background Services (`--endpoints` each)
//! loaded and the rules in the node namespace of the real-packet tests' world, with real pods.
//!
//! Two kinds of change, each after a quiet period (the pacer's burst refilled, as in a cluster
//! where changes come now and then):
//! - *endpoint change*: an existing Service's only endpoint moves from one pod to another;
//! - *new Service + slice*: a Service, then its EndpointSlice a few milliseconds later (as
//!   `kubectl expose` or a new app's rollout does), its endpoint a pod that nothing reached
//!   before.
//!
//! For each, from the EndpointSlice's write at the apiserver: to the sync that put it in the
//! kernel (the agent's sync record), and to the first TCP connection from a client pod through
//! the ClusterIP that the new pod answers (the client connects in a bounded loop, a new socket
//! every attempt, until the new pod's name comes back). Median and 90th percentile.
//!
//! `cargo bench --bench latency -- [--services 1000,10000] [--endpoints 10] [--changes 10]
//! [--min-sync-period-ms 1000] [--proxy-mode nftables|iptables] [--iptables-variant nft|legacy]`
//! (as root). `--min-sync-period-ms` defaults to kube-proxy's 1 s.

// tests/common/mod.rs allows dead code itself.
#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::apiserver::FakeApiServer;
use common::netns::{World, in_ns, sh};
use serde_json::{Value, json};
use svcproxy::agent::{AgentConfig, Phases, SyncRecord};
use svcproxy::backend::Mode;
use svcproxy::iptables::Variant;
use svcproxy::process::Runner;
use tokio::sync::mpsc::UnboundedReceiver;

#[allow(dead_code)]
mod support;
use support::arg;

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(service: &str, ips: &[String], node: impl Fn(usize) -> String) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(j, ip)| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node(j)}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abcde"), "namespace": "bench", "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

/// Background Service `i`: `endpoints` endpoints on other nodes (addresses nothing answers).
fn background(i: usize, endpoints: usize) -> (Value, Value) {
    let name = format!("svc-{i}");
    let ips: Vec<String> = (0..endpoints)
        .map(|j| svcproxy::synthetic::endpoint_ip(i, j, endpoints).to_string())
        .collect();
    (
        service(&name, &svcproxy::synthetic::cluster_ip(i).to_string()),
        slice(&name, &ips, |j| format!("node-{}", j % 100 + 1)),
    )
}

/// A measured Service's slice: one endpoint, a real pod on this node.
fn pod_slice(service: &str, pod: IpAddr) -> Value {
    slice(service, &[pod.to_string()], |_| "node-a".to_string())
}

/// A blocking server in the pod's namespace answering the pod's name (no polling delay in the
/// measured path); stopped by the flag and one last connection.
fn serve(ns: &str, name: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let listener = in_ns(ns, || TcpListener::bind(("0.0.0.0", 8080)).unwrap());
    let reply = format!("{name}\n");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut c) = conn {
                let _ = c.write_all(reply.as_bytes());
            }
        }
    })
}

/// Starts a client in namespace `ns` connecting to `to` until `want` answers (a new socket each
/// attempt, a short connect timeout: a SYN dropped before the rules exist would otherwise wait
/// out TCP's one-second retransmission). Returns once the client is running; the handle gives
/// when `want` first answered (`None` after `limit`).
fn client(
    ns: &str,
    to: SocketAddr,
    want: &str,
    limit: Duration,
) -> std::thread::JoinHandle<Option<Instant>> {
    let (ready, started) = std::sync::mpsc::channel();
    let (ns, want) = (ns.to_string(), format!("{want}\n"));
    let handle = std::thread::spawn(move || {
        in_ns(&ns, move || {
            let end = Instant::now() + limit;
            let _ = ready.send(());
            let mut reply = String::new();
            while Instant::now() < end {
                if let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(3)) {
                    let at = Instant::now();
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    reply.clear();
                    if s.read_to_string(&mut reply).is_ok() && reply == want {
                        return Some(at);
                    }
                }
                // Leave the agent the CPU it needs (two cores, shared).
                std::thread::sleep(Duration::from_micros(500));
            }
            None
        })
    });
    started.recv().expect("client started");
    handle
}

/// Waits for the first sync record that `done` accepts; returns when it came and how many
/// records came until then (included).
async fn sync_until(
    syncs: &mut UnboundedReceiver<SyncRecord>,
    done: impl Fn(&SyncRecord) -> bool,
) -> (Instant, usize, Phases) {
    let mut n = 0;
    loop {
        let r = tokio::time::timeout(Duration::from_secs(60), syncs.recv())
            .await
            .expect("a sync within 60 s")
            .expect("the agent runs");
        n += 1;
        if done(&r) {
            return (Instant::now(), n, r.phases);
        }
    }
}

#[derive(Default)]
struct Samples {
    kernel: Vec<Duration>,
    connection: Vec<Duration>,
    syncs: Vec<usize>,
    phases: Vec<Phases>,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn quantile<T: Ord + Copy>(v: &[T], q: usize) -> T {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * q / 100).min(v.len() - 1)]
}

struct Options {
    endpoints: usize,
    changes: usize,
    min_sync_period: Duration,
    mode: String,
    variant: Variant,
}

fn main() {
    let sizes: Vec<usize> = arg("--services", "1000,10000")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let opts = Options {
        endpoints: arg("--endpoints", "10").parse().unwrap(),
        changes: arg("--changes", "10").parse().unwrap(),
        min_sync_period: Duration::from_millis(
            arg("--min-sync-period-ms", "1000").parse().unwrap(),
        ),
        mode: arg("--proxy-mode", "nftables"),
        variant: match arg("--iptables-variant", "nft").as_str() {
            "nft" => Variant::Nft,
            "legacy" => Variant::Legacy,
            other => panic!("--iptables-variant: {other:?}"),
        },
    };
    assert!(
        matches!(opts.mode.as_str(), "nftables" | "iptables"),
        "--proxy-mode nftables|iptables"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| Services | endpoints each | mode | change | slice write → rules in the kernel: median | p90 | → first connection to the new pod: median | p90 | syncs | first full sync | a sync's parts (medians): convert / compile / apply |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        rt.block_on(measure(n, &opts));
    }
}

async fn measure(n: usize, opts: &Options) {
    let Some(mut w) = World::new() else { return };
    let pods = [w.pod("a", false), w.pod("b", false), w.pod("c", false)];
    let client_pod = w.pod("client", false);
    for sysctl in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &client_pod.ns,
            "sysctl",
            "-qw",
            sysctl,
        ]);
    }
    let stop_servers = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = pods
        .iter()
        .map(|p| serve(&p.ns, &p.name, stop_servers.clone()))
        .collect();

    let api = FakeApiServer::start().await;
    for i in 0..n {
        let (s, e) = background(i, opts.endpoints);
        api.apply(s);
        api.apply(e);
    }
    // The Service whose endpoint moves between pods a and b.
    let probe: SocketAddr = "10.99.0.1:80".parse().unwrap();
    api.apply(service("probe", "10.99.0.1"));
    api.apply(pod_slice("probe", pods[0].ip));

    let (tx, mut syncs) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let config = AgentConfig {
        kube: api.kube_config(),
        node_name: "node-a".into(),
        node_ips: vec![],
        proxy: Default::default(),
        min_sync_period: opts.min_sync_period,
        sync_period: Duration::from_secs(3600),
        healthz_address: None,
        metrics_address: None,
        health_check_address: "127.0.0.1".parse().unwrap(),
        backend: if opts.mode == "iptables" {
            Mode::iptables(Runner::in_netns(&w.node), opts.variant)
        } else {
            Mode::nftables(Runner::in_netns(&w.node))
        },
        config_warnings: 0,
    };
    let start = Instant::now();
    let task = tokio::spawn(svcproxy::agent::run(config, stop_rx, Some(tx)));
    syncs.recv().await.expect("first sync");
    let first = start.elapsed();
    let reached = client(&client_pod.ns, probe, "a", Duration::from_secs(10));
    assert!(
        tokio::task::spawn_blocking(move || reached.join().unwrap())
            .await
            .unwrap()
            .is_some(),
        "the probe Service reaches pod a"
    );

    // Long enough for the pacer's bucket to refill (two syncs, one per min_sync_period).
    let quiet = opts.min_sync_period * 2 + Duration::from_millis(300);
    let (mut moved, mut created) = (Samples::default(), Samples::default());
    for c in 0..opts.changes {
        // An existing Service's endpoint moves: a → b → a → …
        tokio::time::sleep(quiet).await;
        while syncs.try_recv().is_ok() {}
        let to = &pods[(c + 1) % 2];
        let reached = client(&client_pod.ns, probe, &to.name, Duration::from_secs(30));
        let t0 = Instant::now();
        api.apply(pod_slice("probe", to.ip));
        let (kernel, count, phases) = sync_until(&mut syncs, |_| true).await;
        let at = tokio::task::spawn_blocking(move || reached.join().unwrap())
            .await
            .unwrap()
            .expect("the moved endpoint answers within 30 s");
        moved.kernel.push(kernel - t0);
        moved.connection.push(at.saturating_duration_since(t0));
        moved.syncs.push(count);
        moved.phases.push(phases);

        // A new Service, then its slice, 5 ms apart; pod c answers it.
        tokio::time::sleep(quiet).await;
        while syncs.try_recv().is_ok() {}
        let name = format!("new-{c}");
        let ip = format!("10.99.1.{}", c + 1);
        let to: SocketAddr = format!("{ip}:80").parse().unwrap();
        let reached = client(&client_pod.ns, to, "c", Duration::from_secs(30));
        api.apply(service(&name, &ip));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t0 = Instant::now();
        api.apply(pod_slice(&name, pods[2].ip));
        // The background slices, the probe's, and the new ones so far.
        let slices = n + 1 + c + 1;
        let (kernel, count, phases) = sync_until(&mut syncs, |r| r.slices >= slices).await;
        let at = tokio::task::spawn_blocking(move || reached.join().unwrap())
            .await
            .unwrap()
            .expect("the new Service answers within 30 s");
        created.kernel.push(kernel - t0);
        created.connection.push(at.saturating_duration_since(t0));
        created.syncs.push(count);
        created.phases.push(phases);
    }
    for (what, s) in [
        ("endpoint change", &moved),
        ("new Service + slice", &created),
    ] {
        let part = |f: fn(&Phases) -> Duration| {
            ms(quantile(&s.phases.iter().map(f).collect::<Vec<_>>(), 50))
        };
        println!(
            "| {n} | {} | {} | {what} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
            opts.endpoints,
            opts.mode,
            ms(quantile(&s.kernel, 50)),
            ms(quantile(&s.kernel, 90)),
            ms(quantile(&s.connection, 50)),
            ms(quantile(&s.connection, 90)),
            quantile(&s.syncs, 50),
            ms(first),
            part(|p| p.convert),
            part(|p| p.compile),
            part(|p| p.apply),
        );
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    stop_servers.store(true, Ordering::Relaxed);
    for p in &pods {
        let _ = in_ns(&p.ns, || TcpStream::connect(("127.0.0.1", 8080)).ok());
    }
    for s in servers {
        let _ = s.join();
    }
    drop(w);
}
