//! The agent's memory: the peak RSS (VmHWM) of the real `svcproxy run` process, started as a
//! child in a private network namespace with a kubeconfig pointing at the in-process test
//! apiserver (tests/common/apiserver.rs, listening inside that namespace), applying its rules
//! there.
//!
//! `cargo bench --bench memory -- [--services 10000,100000] [--endpoints 10] [--changes 200]
//! [--sync-period 30s] [--binary LABEL=PATH]...` (as root). For each size and binary: the cold
//! start (both lists, the first full sync), then three rounds of changes (each: `--changes`
//! EndpointSlices with one endpoint moved and one new Service with its slice), the last one
//! made while the apiserver is away and followed by a compacted history, so that the agent
//! re-lists everything (a restarted apiserver); then one periodic full resync (the agent runs with
//! `--sync-period 30s`, or `--sync-period D`; the bench waits for the first resync after the
//! rounds: at 100k Services the cold start outlasts 30 s, so the first resync falls within the
//! rounds unless the period is longer), which refreshes every table in place: the largest
//! moment of a long-running agent. Prints the VmHWM after the cold start, after the rounds and
//! after the resync, as a Markdown table. `--binary` (any number of times; `LABEL=self` is this
//! build's) compares builds in the same run, e.g. the previous commit's; without it, this
//! build's binary alone.

#[allow(dead_code)]
#[path = "../tests/common/apiserver.rs"]
mod apiserver;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use apiserver::FakeApiServer;
use serde_json::{Value, json};

#[allow(dead_code)]
mod support;
use support::{arg, args};

fn service(i: usize) -> Value {
    let ip = svcproxy::synthetic::cluster_ip(i).to_string();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{i}"), "namespace": "bench", "labels": {"app": format!("app-{i}")},
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP", "sessionAffinity": "None",
                    "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                    "selector": {"app": format!("app-{i}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
           "status": {"loadBalancer": {}}})
}

/// A slice like the EndpointSlice controller writes: labels, owner, trigger time, managed
/// fields (what a real apiserver sends and the agent must not keep).
fn slice(i: usize, endpoints: usize, generation: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            let ip = if j == 0 && generation > 0 {
                format!("10.255.{}.{}", generation / 250 % 250, generation % 250 + 1)
            } else {
                svcproxy::synthetic::endpoint_ip(i, j, endpoints).to_string()
            };
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", j % 100),
                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("app-{i}-{j}-abcde"), "uid": "00000000-0000-0000-0000-000000000000"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench", "generateName": format!("svc-{i}-"),
                        "labels": {"kubernetes.io/service-name": format!("svc-{i}"), "app": format!("app-{i}"),
                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": format!("svc-{i}"),
                                             "uid": "00000000-0000-0000-0000-000000000000", "controller": true, "blockOwnerDeletion": true}],
                        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1",
                                           "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                                           "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:metadata": {"f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}}, "f:generateName": {}, "f:labels": {".": {}, "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}}, "f:ownerReferences": {".": {}, "k:{\"uid\":\"00000000-0000-0000-0000-000000000000\"}": {}}}, "f:ports": {}}}]},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

/// `VmHWM` and `VmRSS` of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The children of `parent` (the `nft` and `conntrack` the agent runs), by pid.
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates live there).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// One sync the agent logged: (Services, EndpointSlices, a full sync).
type Synced = (u64, u64, bool);

struct Run {
    cold_start: Duration,
    cold: (f64, f64),
    rounds: (f64, f64),
    end: (f64, f64),
    /// The largest VmHWM seen of a child process (nft), sampled every 10 ms.
    child_peak: f64,
}

fn measure(
    binary: &str,
    services: usize,
    endpoints: usize,
    changes: usize,
    sync_period: &str,
) -> Run {
    let ns = format!("svcproxy-memory-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "needs root (ip netns add)");
    Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status()
        .unwrap();

    // The apiserver, its listening socket inside the namespace; its runtime on a thread of its
    // own until `done` is dropped.
    let (api_tx, api_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let server = {
        let ns = ns.clone();
        std::thread::spawn(move || {
            in_ns(&ns, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let api = FakeApiServer::start().await;
                    api_tx.send(api.clone()).unwrap();
                    let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
                });
            })
        })
    };
    let api = api_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    for i in 0..services {
        api.apply(service(i));
        api.apply(slice(i, endpoints, 0));
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: f\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: f\n  context: {{cluster: f, user: u}}\ncurrent-context: f\nusers:\n- name: u\n  user: {{}}\n", api.url()),
    )
    .unwrap();

    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, binary, "run", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--hostname-override", "node-0", "--log-format", "json"])
        .args(["--sync-period", sync_period])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("svcproxy run");
    // `ip netns exec` execs the program in place: the child is svcproxy itself.
    let pid = child.id();
    // The agent's children count against a container's memory limit too: sample their peak.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0f64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                // Only once the child has exec'd: before that it shares or copies the agent's
                // memory, and its figures are the agent's.
                let own_comm =
                    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                for c in children(pid).into_iter().filter(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/comm"))
                        .is_ok_and(|comm| comm != own_comm)
                }) {
                    let hwm = memory(c).0;
                    if hwm > peak {
                        peak = hwm;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let (tx, syncs) = mpsc::channel::<Synced>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] == "synced" {
                let n = |k: &str| f[k].as_u64().unwrap_or(0);
                let _ = tx.send((n("services"), n("endpoint_slices"), f["kind"] == "full"));
            } else if v["level"] == "ERROR" {
                eprintln!("svcproxy: {line}");
            }
        }
    });
    // Waits for a sync of `want` Services and slices (a full one, if `full`).
    let wait_for = |want: u64, full: bool| {
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match syncs.recv_timeout(left) {
                Ok((s, e, f)) if s == want && e == want && (f || !full) => return,
                Ok(_) => {}
                Err(e) => panic!("no sync of {want} Services: {e}"),
            }
        }
    };
    let mut total = services as u64;
    wait_for(total, false);
    let cold_start = start.elapsed();
    // Let the process settle (the first sync's buffers freed), then read its peak.
    std::thread::sleep(Duration::from_millis(500));
    let cold = memory(pid);

    let mut generation = 0;
    for round in 0..3 {
        if round == 2 {
            // The apiserver goes away; the changes happen meanwhile and history is compacted,
            // so the agent sees them only by listing everything again.
            api.set_available(false);
            api.drop_watches();
        }
        for c in 0..changes {
            generation += 1;
            api.apply(slice(
                (c * 7919 + round * 104729) % services,
                endpoints,
                generation,
            ));
        }
        // A new Service and its slice: the sync that holds it holds every change before it.
        let new = services + round;
        api.apply(service(new));
        api.apply(slice(new, endpoints, 0));
        total += 1;
        if round == 2 {
            api.compact();
            api.set_available(true);
        }
        wait_for(total, false);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rounds = memory(pid);
    wait_for(total, true);
    std::thread::sleep(Duration::from_millis(500));
    let end = memory(pid);

    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let child_peak = sampler.join().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = reader.join();
    drop(done_tx);
    let _ = server.join();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    Run {
        cold_start,
        cold,
        rounds,
        end,
        child_peak,
    }
}

fn main() {
    let sizes: Vec<usize> = arg("--services", "10000")
        .split(',')
        .map(|s| s.parse().expect("--services N,..."))
        .collect();
    let endpoints: usize = arg("--endpoints", "10").parse().unwrap();
    let changes: usize = arg("--changes", "200").parse().unwrap();
    let sync_period = arg("--sync-period", "30s");
    let own = env!("CARGO_BIN_EXE_svcproxy");
    let mut binaries: Vec<(String, String)> = args("--binary")
        .into_iter()
        .map(|b| match b.split_once('=') {
            Some((label, "self")) => (label.to_string(), own.to_string()),
            Some((label, path)) => (label.to_string(), path.to_string()),
            None => (b.clone(), b),
        })
        .collect();
    if binaries.is_empty() {
        binaries.push(("this build".into(), own.to_string()));
    }
    println!(
        "| Services | endpoints each | svcproxy | cold start | VmHWM after the cold start | VmHWM after 3 × {changes} changes and a re-list | VmHWM after a periodic resync | VmRSS then | nft's peak (sampled) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &sizes {
        for (label, binary) in &binaries {
            let r = measure(binary, n, endpoints, changes, &sync_period);
            println!(
                "| {n} | {endpoints} | {label} | {:.1} s | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
                r.cold_start.as_secs_f64(),
                r.cold.0,
                r.rounds.0,
                r.end.0,
                r.end.1,
                r.child_peak,
            );
        }
    }
}
