//! Per-packet cost against the number of Services: new TCP connections per second through one
//! ClusterIP while 10, 10k and 30k Services (10 endpoints each) are loaded, in the namespace
//! world of the real-packet tests (a client pod and a server pod on one node).
//!
//! `cargo bench --bench dataplane -- [--services 10,10000,30000] [--seconds 3] [--runs 3]
//! [--backends nftables,iptables-legacy,iptables-nft]` (as root). Each run is a bounded loop of
//! connect + read reply from one client. With iptables, the measured ClusterIP (10.99.0.1) sorts
//! after every generated one, so its rule is the last of the Service rules: the worst case of
//! iptables' linear search (nftables finds every Service with one map lookup).

// tests/common/mod.rs allows dead code itself.
#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::netns::{World, in_ns};
use svcproxy::backend::{Mode, OneShot};
use svcproxy::iptables::Variant;
use svcproxy::model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, ObjectRef, Protocol, ProxyConfig,
};
use svcproxy::process::Runner;

#[allow(dead_code)]
mod support;
use support::arg;

/// A blocking server (no polling delay in the measured path), stopped by a flag and one last
/// connection.
fn serve(ns: &str, port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let listener = in_ns(ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut c) = conn {
                let _ = c.write_all(b"ok\n");
            }
        }
    })
}

fn main() {
    let sizes: Vec<usize> = arg("--services", "10,10000,30000")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let seconds: u64 = arg("--seconds", "3").parse().unwrap();
    let runs: usize = arg("--runs", "3").parse().unwrap();
    let backends: Vec<String> = arg("--backends", "nftables")
        .split(',')
        .map(String::from)
        .collect();
    println!(
        "| Services loaded | backend | time to load the rules | new TCP connections per second through one ClusterIP (median of {runs} runs of {seconds} s) |"
    );
    println!("|---|---|---|---|");
    for n in sizes {
        for backend in &backends {
            measure(n, backend, seconds, runs);
        }
    }
}

fn measure(n: usize, backend_name: &str, seconds: u64, runs: usize) {
    {
        let Some(mut w) = World::new() else { return };
        let server = w.pod("server", false);
        let client = w.pod("client", false);
        // Thousands of short connections a second: let the client reuse TIME_WAIT ports.
        common::netns::sh(&[
            "ip",
            "netns",
            "exec",
            &client.ns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
        ]);
        common::netns::sh(&[
            "ip",
            "netns",
            "exec",
            &client.ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_local_port_range=1024 65000",
        ]);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = serve(&server.ns, 8080, stop.clone());

        // n-1 generated Services, plus the one the client uses.
        let mut snapshot = svcproxy::synthetic::cluster(n.saturating_sub(1), 10);
        let mut svc = svcproxy::synthetic::service(100_000);
        svc.id = ObjectRef::new("bench", "target");
        svc.cluster_ips = vec!["10.99.0.1".parse().unwrap()];
        snapshot.services.insert(svc.id.clone(), svc.clone().into());
        let slice = EndpointSlice {
            id: ObjectRef::new("bench", "target-1"),
            service: svc.id.clone(),
            family: IpFamily::V4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: vec![Endpoint {
                address: server.ip,
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("node-0".into()),
                zone: None,
                hints: None,
            }],
        };
        snapshot.slices.insert(slice.id.clone(), slice.into());
        let (plan, _) = svcproxy::compile(&snapshot, &ProxyConfig::default());
        let runner = Runner::in_netns(&w.node);
        let mode = match backend_name {
            "nftables" => Mode::nftables(runner),
            "iptables-legacy" => Mode::iptables(runner, Variant::Legacy),
            "iptables-nft" => Mode::iptables(runner, Variant::Nft),
            other => panic!("--backends: unknown backend {other:?}"),
        };
        let mut backend = OneShot::new(mode);
        let loaded = Instant::now();
        backend.apply(&plan).expect("apply");
        let load = loaded.elapsed();

        let to: SocketAddr = "10.99.0.1:80".parse().unwrap();
        let mut rates = Vec::new();
        for _ in 0..runs {
            let ns = client.ns.clone();
            let count = in_ns(&ns, move || {
                let deadline = Instant::now() + Duration::from_secs(seconds);
                let mut ok = 0u64;
                let mut buf = [0u8; 8];
                while Instant::now() < deadline {
                    if let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1))
                        && s.read(&mut buf).is_ok_and(|r| r > 0)
                    {
                        ok += 1;
                    }
                }
                ok
            });
            rates.push(count as f64 / seconds as f64);
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "| {n} | {backend_name} | {:.2} s | {:.0} |",
            load.as_secs_f64(),
            rates[rates.len() / 2]
        );
        stop.store(true, Ordering::Relaxed);
        let _ = in_ns(&server.ns, move || {
            TcpStream::connect(("127.0.0.1", 8080)).ok()
        });
        let _ = handle.join();
        drop(w);
    }
}
