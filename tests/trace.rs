//! `svcproxy trace` and `svcproxy services` end to end: the three sources of cluster state
//! (manifests, the cluster read through a kubeconfig, a running agent), the exit codes, the
//! JSON, and the kubectl plugin (the binary run under the name `kubectl-svcproxy`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::apiserver::FakeApiServer;
use common::examples_dir;
use serde_json::{Value, json};

fn run(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn svcproxy(args: &[&str]) -> (i32, String, String) {
    run(Path::new(env!("CARGO_BIN_EXE_svcproxy")), args, &[])
}

/// `trace --from examples/ --node node-a --cluster-cidr 172.17.0.0/16 ARGS...`.
fn trace_examples(args: &[&str]) -> (i32, String, String) {
    let ex = examples_dir();
    let mut argv = vec![
        "trace",
        "--from",
        ex.to_str().unwrap(),
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16",
        "--service-cidr",
        "10.96.0.0/12",
    ];
    argv.extend_from_slice(args);
    svcproxy(&argv)
}

#[test]
fn trace_exit_codes_say_what_becomes_of_the_packet() {
    // Reaches an endpoint: 0.
    let (code, out, err) = trace_examples(&["172.17.0.5", "10.111.241.153:80"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("DNAT to one of 3 endpoints"), "{out}");
    // A ping to a ClusterIP: rejected, 3.
    let (code, out, _) = trace_examples(&["172.17.0.5", "10.111.241.153"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("ICMP port unreachable"), "{out}");
    // Not a Service's: left alone, 5.
    let (code, out, _) = trace_examples(&["172.17.0.5", "8.8.8.8:53/udp"]);
    assert_eq!(code, 5, "{out}");
    // Bad input: 1.
    for bad in [
        &["172.17.0.5", "10.111.241.153:99999"][..],
        &["not-an-ip", "10.111.241.153:80"],
        &["fd00::1", "10.111.241.153:80"],
    ] {
        let (code, out, err) = trace_examples(bad);
        assert_eq!(code, 1, "{bad:?}: {out}{err}");
    }
    let (code, _, err) = svcproxy(&["trace", "10.0.0.1", "10.0.0.2:80"]);
    assert_eq!(code, 1, "no source of cluster state: {err}");
    // `node` as the source: the node's primary address.
    let (code, out, _) = trace_examples(&["node", "10.111.241.153:80"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("192.168.64.4 is this node"), "{out}");
}

#[test]
fn trace_json_carries_the_same_content() {
    let (code, out, err) = trace_examples(&["203.0.113.5", "35.167.185.8:32143", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["frontend"]["kind"], "NodePort");
    assert_eq!(v["frontend"]["service"], "default/kubia-loadbalancer");
    assert_eq!(v["verdict"], json!({"verdict": "dnat", "endpoints": 1}));
    assert_eq!(v["endpoints"][0]["address"], "172.17.0.7:8080");
    assert_eq!(v["endpoints"][0]["masquerade"], false);
    let reasons: Vec<&str> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["other-node", "other-node"]);
    let decisions: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        [
            "source",
            "service",
            "traffic-policy",
            "endpoints",
            "masquerade"
        ]
    );
}

#[test]
fn services_lists_every_frontend() {
    let ex = examples_dir();
    let base = [
        "services",
        "--from",
        ex.to_str().unwrap(),
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16",
    ];
    let (code, out, err) = svcproxy(&[&base[..], &["-o", "json"]].concat());
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let frontends = v["frontends"].as_array().unwrap();
    let find = |addr: &str, port: u64| {
        frontends
            .iter()
            .find(|f| f["address"] == addr && f["port"] == port)
            .unwrap_or_else(|| panic!("no frontend {addr}:{port}"))
    };
    let lb = find("130.211.53.173", 80);
    assert_eq!(lb["kind"], "LoadBalancer");
    assert_eq!(lb["external_traffic_policy"], "Local");
    assert_eq!(lb["outside_client"], "DNAT to 1 of 1, source kept");
    assert_eq!(lb["pod"], "DNAT to 1 of 3, source kept");
    assert_eq!(lb["endpoints"].as_array().unwrap().len(), 3);
    let np = find("node", 32143);
    assert_eq!(np["kind"], "NodePort");
    let (code, text, _) = svcproxy(&base);
    assert_eq!(code, 0);
    assert!(
        text.contains("130.211.53.173:80/tcp  LoadBalancer  default/kubia-loadbalancer"),
        "{text}"
    );
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}})
}

fn web() -> (Value, Value) {
    (
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.60", "clusterIPs": ["10.96.0.60"],
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["10.244.1.61"], "conditions": {"ready": true}, "nodeName": "node-a"},
                             {"addresses": ["10.244.2.62"], "conditions": {"ready": false}, "nodeName": "node-b"}]}),
    )
}

/// Installed as `kubectl-svcproxy`, the binary reads the cluster through the current kubeconfig
/// context when no source is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_kubectl_plugin_it_reads_the_current_context() {
    let api = FakeApiServer::start().await;
    api.apply(node());
    let (svc, slice) = web();
    api.apply(svc);
    api.apply(slice);
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
    let plugin = dir.path().join("kubectl-svcproxy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_svcproxy"), &plugin).unwrap();
    let home = dir.path().to_path_buf();
    let (trace, services, plain) = tokio::task::spawn_blocking(move || {
        let env = [
            ("KUBECONFIG", kubeconfig.as_path()),
            ("HOME", home.as_path()),
        ];
        (
            run(
                &plugin,
                &["trace", "--node", "node-a", "10.244.1.5", "10.96.0.60:80"],
                &env,
            ),
            run(
                &plugin,
                &["services", "--node", "node-a", "-o", "json"],
                &env,
            ),
            // The same binary under its own name wants to be told where to look.
            run(
                Path::new(env!("CARGO_BIN_EXE_svcproxy")),
                &["trace", "--node", "node-a", "10.244.1.5", "10.96.0.60:80"],
                &env,
            ),
        )
    })
    .await
    .unwrap();
    let (code, out, err) = trace;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("DNAT to 10.244.1.61:8080"), "{out}");
    assert!(
        out.contains("10.244.2.62:8080"),
        "the unready one is named: {out}"
    );
    let (code, out, err) = services;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["frontends"][0]["service"], "default/web");
    let (code, _, err) = plain;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--from PATH, --kubeconfig PATH or --agent ADDR"),
        "{err}"
    );
    // The plugin's help names it as kubectl does.
    let (_, help, _) = run(
        &dir.path().join("kubectl-svcproxy"),
        &["trace", "--help"],
        &[],
    );
    assert!(help.contains("Usage: kubectl svcproxy trace"), "{help}");
}

/// A running agent serves what it last applied, read-only, on its metrics address; `trace`,
/// `services` and `dump` read it with `--agent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
async fn the_agent_serves_its_state_read_only() {
    use svcproxy::agent::AgentConfig;
    use svcproxy::backend::Mode;
    use svcproxy::process::Runner;
    if !common::have_nft() || !common::can_unshare_net() {
        common::cannot_run("the agent tests need root and nft");
    }
    let ns = common::netns::Netns::add(format!("sp{}-trace-agent", std::process::id()));
    let api = FakeApiServer::start().await;
    api.apply(node());
    let (svc, slice) = web();
    api.apply(svc);
    api.apply(slice);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = AgentConfig {
        kube: api.kube_config(),
        node_name: "node-a".into(),
        node_ips: vec![],
        proxy: svcproxy::model::ProxyConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..Default::default()
        },
        min_sync_period: Duration::ZERO,
        sync_period: Duration::from_secs(3600),
        healthz_address: None,
        metrics_address: Some(metrics),
        health_check_address: "127.0.0.1".parse().unwrap(),
        backend: Mode::nftables(Runner::in_netns(&ns.0)),
        config_warnings: 0,
    };
    let (tx, mut syncs) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        svcproxy::agent::run(config, stop_rx, Some(tx))
            .await
            .unwrap();
    });
    tokio::time::timeout(Duration::from_secs(20), syncs.recv())
        .await
        .expect("a first sync")
        .unwrap();
    let addr = metrics.to_string();
    let (trace, services, dump, sync, plan, post) = tokio::task::spawn_blocking(move || {
        let post = {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(metrics).unwrap();
            write!(
                s,
                "POST /state/snapshot HTTP/1.0\r\nContent-Length: 2\r\n\r\n{{}}"
            )
            .unwrap();
            let mut a = String::new();
            s.read_to_string(&mut a).unwrap();
            a
        };
        (
            // The agent's configuration comes with its snapshot: no --cluster-cidr here.
            svcproxy(&["trace", "--agent", &addr, "203.0.113.9", "10.96.0.60:80"]),
            svcproxy(&["services", "--agent", &addr, "-o", "json"]),
            svcproxy(&["dump", "--agent", &addr]),
            svcproxy::agent::state::get_path(&addr, "/state/sync").unwrap(),
            (
                svcproxy::agent::state::get_path(&addr, "/state/plan").unwrap(),
                svcproxy::agent::state::fetch(&addr).unwrap(),
            ),
            post,
        )
    })
    .await
    .unwrap();
    let (code, out, err) = trace;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("DNAT to 10.244.1.61:8080"), "{out}");
    assert!(
        out.contains("masqueraded: ClusterIP traffic not from a pod"),
        "{out}"
    );
    let (code, out, err) = services;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.96.0.60"), "{out}");
    let (code, out, err) = dump;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("10.96.0.60 . tcp . 80 : 10.244.1.61 . 8080"),
        "{out}"
    );
    let sync: Value = serde_json::from_slice(&sync).unwrap();
    // The first sync is full; a later one (the Node's watch coming in) may be partial.
    assert_eq!(sync["ok"], json!(true), "{sync}");
    assert!(
        ["full", "partial"].contains(&sync["kind"].as_str().unwrap()),
        "{sync}"
    );
    assert_eq!(sync["services"], 1);
    let (plan, applied) = plan;
    assert_eq!(applied.mode, "nftables");
    assert_eq!(applied.snapshot.node.name, "node-a");
    assert_eq!(applied.config.cluster_cidrs.len(), 1);
    let plan: Value = serde_json::from_slice(&plan).unwrap();
    assert!(plan["families"][0]["destinations"].is_array(), "{plan}");
    assert!(
        post.starts_with("HTTP/1.0 405"),
        "nothing is writable: {post}"
    );
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// The table of the bundled examples, as a golden file (`INSTA_UPDATE=always cargo test --test
/// trace` after an intended change; review the diff).
#[test]
fn services_of_the_examples() {
    let ex = examples_dir();
    let (code, text, err) = svcproxy(&[
        "services",
        "--from",
        ex.to_str().unwrap(),
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16,fd00:17::/48",
    ]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("services-examples", text);
}

/// The README's "Troubleshooting a Service" shows real output: each `$ svcproxy trace …` there
/// prints exactly what is pasted under it, with the exit code given.
#[test]
fn the_readme_troubleshooting_walk_is_real_output() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme.find("## Troubleshooting a Service").unwrap();
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let lines: Vec<&str> = section.lines().collect();
    let mut checked = 0;
    let mut i = 0;
    while i < lines.len() {
        let Some(cmd) = lines[i].strip_prefix("$ svcproxy trace ") else {
            i += 1;
            continue;
        };
        let end = (i..lines.len())
            .find(|&j| lines[j].starts_with("(exit "))
            .unwrap();
        let want = lines[i + 1..end].join("\n");
        let code: i32 = lines[end]
            .trim_start_matches("(exit ")
            .trim_end_matches(')')
            .parse()
            .unwrap();
        let mut args = vec!["trace"];
        args.extend(cmd.split_whitespace());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
            .args(&args)
            .current_dir(dir)
            .env_remove("NODE_NAME")
            .output()
            .unwrap();
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(got.trim_end(), want, "README: svcproxy trace {cmd}");
        assert_eq!(
            out.status.code(),
            Some(code),
            "README: svcproxy trace {cmd}"
        );
        checked += 1;
        i = end + 1;
    }
    assert!(checked >= 7, "{checked} commands");
}
