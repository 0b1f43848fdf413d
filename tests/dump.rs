//! `svcproxy dump` end to end: golden rulesets for every example, exit codes, byte-identical
//! output whatever the order of files and objects, and `nft -c` acceptance.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn svcproxy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn example_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    files
}

#[test]
fn golden_ruleset_per_example() {
    let node = examples_dir().join("00-node.yaml").display().to_string();
    for file in example_files() {
        let name = Path::new(&file)
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let (code, out, err) = svcproxy(&["dump", "--from", &node, &file, "--node", "node-a"]);
        assert_eq!(code, 0, "{file}: {err}");
        insta::assert_snapshot!(format!("example-{name}"), out);
    }
}

/// Each `detectLocalMode` on the Service that uses both of its effects (ClusterIP masquerading
/// and the externalTrafficPolicy Local short-circuit for pods), in both modes' languages.
#[test]
fn golden_detect_local_modes() {
    let node = examples_dir().join("00-node.yaml").display().to_string();
    let file = examples_dir()
        .join("05-kubia-loadbalancer-local.yaml")
        .display()
        .to_string();
    for (name, flags) in [
        ("node-cidr", &["--detect-local-mode", "NodeCIDR"][..]),
        (
            "interface-name-prefix",
            &[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "veth",
            ][..],
        ),
        (
            "bridge-interface",
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0",
            ][..],
        ),
    ] {
        for mode in ["nftables", "iptables"] {
            let mut args = vec![
                "dump",
                "--from",
                &node,
                &file,
                "--node",
                "node-a",
                "--proxy-mode",
                mode,
            ];
            args.extend_from_slice(flags);
            let (code, out, err) = svcproxy(&args);
            assert_eq!(code, 0, "{args:?}: {err}");
            insta::assert_snapshot!(format!("detect-local-{name}-{mode}"), out);
        }
    }
    // The mode's name is required with its mode.
    let (code, _, err) = svcproxy(&[
        "dump",
        "--from",
        &node,
        "--detect-local-mode",
        "InterfaceNamePrefix",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--pod-interface-name-prefix"), "{err}");
}

#[test]
fn golden_all_examples_nft_and_json() {
    let dir = examples_dir().display().to_string();
    let (code, out, err) = svcproxy(&[
        "dump",
        "--from",
        &dir,
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16",
    ]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("all-examples", out);
    let (code, json, err) = svcproxy(&[
        "dump",
        "--from",
        &dir,
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    insta::assert_json_snapshot!("all-examples-json", v);
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn nft_accepts_every_example() {
    if !have_nft() {
        cannot_run("nft is not installed: the rulesets were not checked with `nft -c`");
    }
    if !can_unshare_net() {
        cannot_run("cannot create a network namespace for `nft -c` (not root?)");
    }
    let mut inputs: Vec<Vec<String>> = example_files().into_iter().map(|f| vec![f]).collect();
    inputs.push(vec![examples_dir().display().to_string()]);
    for input in inputs {
        for extra in [
            &[][..],
            &["--cluster-cidr", "172.17.0.0/16,fd00:17::/48"][..],
            &["--masquerade-all", "--nodeport-addresses", "primary"][..],
            &["--nodeport-addresses", "192.168.64.0/24,fd00::/8"][..],
            &["--detect-local-mode", "NodeCIDR"][..],
            &[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "veth",
            ][..],
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0",
            ][..],
        ] {
            let mut args = vec!["dump", "--node", "node-a", "--from"];
            args.extend(input.iter().map(String::as_str));
            args.extend_from_slice(extra);
            let (code, out, err) = svcproxy(&args);
            assert_eq!(code, 0, "{args:?}: {err}");
            if let Err(e) = nft_check(&out) {
                panic!("nft -c refused the ruleset for {args:?}:\n{e}");
            }
        }
    }
}

#[test]
fn output_does_not_depend_on_file_or_object_order() {
    let dir = tempfile::tempdir().unwrap();
    // Every document of every example, as one file in order and one in reverse order.
    let mut docs = Vec::new();
    for f in example_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        docs.extend(text.split("\n---\n").map(str::to_string));
    }
    let forward = dir.path().join("forward.yaml");
    std::fs::write(&forward, docs.join("\n---\n")).unwrap();
    let backward = dir.path().join("backward.yaml");
    docs.reverse();
    std::fs::write(&backward, docs.join("\n---\n")).unwrap();
    let (c1, a, _) = svcproxy(&[
        "dump",
        "--node",
        "node-a",
        "--from",
        forward.to_str().unwrap(),
    ]);
    let (c2, b, _) = svcproxy(&[
        "dump",
        "--node",
        "node-a",
        "--from",
        backward.to_str().unwrap(),
    ]);
    let mut files = example_files();
    files.reverse();
    let mut args = vec!["dump", "--node", "node-a", "--from"];
    args.extend(files.iter().map(String::as_str));
    let (c3, c, _) = svcproxy(&args);
    assert_eq!((c1, c2, c3), (0, 0, 0));
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: web}\nspec: {clusterIP: 10.0.0.999, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [not-an-ip]}]\n---\n: : :\n",
    )
    .unwrap();
    let (code, out, err) = svcproxy(&["dump", "--from", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.0.0.1 . tcp . 80"));
    assert!(
        err.contains("skipping apps/v1 Deployment default/d"),
        "{err}"
    );

    let (code, out, err) = svcproxy(&[
        "dump",
        "--from",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        out.contains("10.0.0.1 . tcp . 80"),
        "the good Service is still compiled"
    );
    assert!(
        err.contains("Service web/b: spec.clusterIP: \"10.0.0.999\" is not an IP address"),
        "{err}"
    );
    assert!(
        err.contains("EndpointSlice default/a-1: endpoints[0].addresses[0]"),
        "{err}"
    );
    assert!(err.contains("document 3"), "{err}");

    // A bad loadBalancerSourceRanges entry: the Service keeps working, the dump exits 2.
    let ranges = dir.path().join("ranges.yaml");
    std::fs::write(
        &ranges,
        "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: web}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.2, loadBalancerSourceRanges: [10.0.0.0/8, 300.0.0.0/8], ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.2}]}}\n",
    )
    .unwrap();
    let (code, out, err) = svcproxy(&["dump", "--from", ranges.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        out.contains("198.51.100.2 . tcp . 80 . 10.0.0.0/8"),
        "{out}"
    );
    assert!(
        err.contains(
            "Service web/lb: spec.loadBalancerSourceRanges[1]: \"300.0.0.0/8\" is not a CIDR"
        ),
        "{err}"
    );

    // One bad element costs only itself: the rest of its Service is compiled, and the leading
    // zeros the apiserver once accepted are read as kube-proxy reads them.
    let partial = dir.path().join("partial.yaml");
    std::fs::write(
        &partial,
        "apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: web}\nspec: {clusterIP: 10.0.0.003, externalIPs: [203.0.113.7, 203.0.113.x], ports: [{port: 80}]}\n",
    )
    .unwrap();
    let (code, out, err) = svcproxy(&["dump", "--from", partial.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "skipped: {}: Service web/c: spec.externalIPs[1]: \"203.0.113.x\" is not an IP address",
            partial.display()
        )),
        "{err}"
    );
    assert!(
        out.contains("10.0.0.3 . tcp . 80") && out.contains("203.0.113.7 . tcp . 80"),
        "{out}"
    );

    // The slice is read (its bad endpoint alone is left out): something usable, so 2.
    let (code, _, err) = svcproxy(&["dump", "--from", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let worse = dir.path().join("worse.yaml");
    std::fs::write(
        &worse,
        "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: web}\nspec: {clusterIP: 10.0.0.999, ports: [{port: 80}]}\n---\n: : :\n",
    )
    .unwrap();
    let (code, out, _) = svcproxy(&["dump", "--from", worse.to_str().unwrap()]);
    assert_eq!(code, 1, "nothing usable");
    assert!(out.is_empty());
    let (code, _, _) = svcproxy(&["dump", "--from", "/nonexistent/manifests"]);
    assert_eq!(code, 1);
}

#[test]
fn bad_flags_are_refused_with_the_value() {
    let (code, _, err) = svcproxy(&["dump", "--from", "x", "--cluster-cidr", "10.0.0.0/33"]);
    assert_eq!(code, 1, "a usage error");
    assert!(err.contains("10.0.0.0/33"), "{err}");
    let (code, _, err) = svcproxy(&[
        "dump",
        "--from",
        "x",
        "--nodeport-addresses",
        "10.0.0.0/8,nope",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("\"nope\" is not a CIDR"), "{err}");
}

/// The JSON output describes the same objects as the script: load the script into a private
/// namespace, list it back as JSON with nft, and compare what each holds (chains and their rule
/// counts, sets and their element counts).
#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn json_output_lists_what_nft_lists() {
    if !have_nft() || !can_unshare_net() {
        cannot_run("nft or network namespaces unavailable: JSON not compared with nft's");
    }
    let dir = examples_dir().display().to_string();
    let args = [
        "dump",
        "--from",
        &dir,
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16",
    ];
    let (_, script, _) = svcproxy(&args);
    let mut json_args = args.to_vec();
    json_args.extend(["--format", "json"]);
    let (_, ours, _) = svcproxy(&json_args);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("r.nft");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg(format!("nft -f {} && nft -j list ruleset", file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inventory = |json: &str| {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let mut inv = std::collections::BTreeMap::new();
        for o in v["nftables"].as_array().unwrap() {
            let (kind, body) = o.as_object().unwrap().iter().next().unwrap();
            let family = body["family"].as_str().unwrap_or("").to_string();
            match kind.as_str() {
                "set" | "map" => {
                    let n = body
                        .get("elem")
                        .and_then(|e| e.as_array())
                        .map_or(0, Vec::len);
                    inv.insert(
                        (
                            kind.clone(),
                            family,
                            body["name"].as_str().unwrap().to_string(),
                        ),
                        n,
                    );
                }
                "chain" => {
                    inv.entry((
                        "chain".into(),
                        family,
                        body["name"].as_str().unwrap().to_string(),
                    ))
                    .or_insert(0);
                }
                "rule" => {
                    *inv.entry((
                        "chain".into(),
                        family,
                        body["chain"].as_str().unwrap().to_string(),
                    ))
                    .or_insert(0) += 1;
                }
                _ => {}
            }
        }
        inv
    };
    assert_eq!(
        inventory(&ours),
        inventory(&String::from_utf8(out.stdout).unwrap())
    );
}

/// The iptables mode's dry-run: each family's `iptables-restore` input, for every example.
#[test]
fn golden_iptables_restore_input_per_example() {
    let node = examples_dir().join("00-node.yaml").display().to_string();
    for file in example_files() {
        let name = Path::new(&file)
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let (code, out, err) = svcproxy(&[
            "dump",
            "--from",
            &node,
            &file,
            "--node",
            "node-a",
            "--proxy-mode",
            "iptables",
        ]);
        assert_eq!(code, 0, "{file}: {err}");
        insta::assert_snapshot!(format!("iptables-example-{name}"), out);
    }
    let dir = examples_dir().display().to_string();
    let (code, out, err) = svcproxy(&[
        "dump",
        "--from",
        &dir,
        "--node",
        "node-a",
        "--cluster-cidr",
        "172.17.0.0/16",
        "--proxy-mode",
        "iptables",
    ]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("iptables-all-examples", out);
    let (code, _, err) = svcproxy(&[
        "dump",
        "--from",
        &dir,
        "--proxy-mode",
        "iptables",
        "--format",
        "json",
    ]);
    assert_eq!(code, 1, "JSON is the nftables mode's: {err}");
}

/// Splits the iptables dry-run into (program, input) per family.
fn restore_inputs(dump: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in dump.lines() {
        if let Some(rest) = line.strip_prefix("# ")
            && let Some(program) = rest
                .strip_suffix(" --noflush (IPv4)")
                .or_else(|| rest.strip_suffix(" --noflush (IPv6)"))
        {
            out.push((program.to_string(), String::new()));
        }
        let last = out.last_mut().expect("a family header first");
        last.1.push_str(line);
        last.1.push('\n');
    }
    out
}

/// iptables-restore (both variants, both families) loads what the dry-run prints, for every
/// example and several flag sets, in a private network namespace.
#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn iptables_restore_loads_every_example() {
    if !can_unshare_net() {
        cannot_run("cannot create a network namespace for iptables-restore (not root?)");
    }
    for v in ["legacy", "nft"] {
        if Command::new(format!("iptables-{v}-restore"))
            .arg("--version")
            .output()
            .is_err()
        {
            cannot_run(&format!("iptables-{v}-restore is not installed"));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut inputs: Vec<Vec<String>> = example_files().into_iter().map(|f| vec![f]).collect();
    inputs.push(vec![examples_dir().display().to_string()]);
    for input in inputs {
        for extra in [
            &[][..],
            &["--cluster-cidr", "172.17.0.0/16,fd00:17::/48"][..],
            &["--cluster-cidr", "172.17.0.0/16,172.18.0.0/16"][..],
            &["--masquerade-all", "--nodeport-addresses", "primary"][..],
            &["--nodeport-addresses", "192.168.64.0/24,fd00::/8"][..],
            &["--detect-local-mode", "NodeCIDR"][..],
            &[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "veth",
            ][..],
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0",
            ][..],
        ] {
            let mut args = vec![
                "dump",
                "--node",
                "node-a",
                "--proxy-mode",
                "iptables",
                "--from",
            ];
            args.extend(input.iter().map(String::as_str));
            args.extend_from_slice(extra);
            let (code, out, err) = svcproxy(&args);
            assert_eq!(code, 0, "{args:?}: {err}");
            let families = restore_inputs(&out);
            assert_eq!(families.len(), 2, "{out}");
            let mut script = String::from("set -e\n");
            for (i, (program, text)) in families.into_iter().enumerate() {
                let file = tmp.path().join(format!("in-{i}"));
                std::fs::write(&file, text).unwrap();
                for v in ["legacy", "nft"] {
                    let variant_program =
                        program.replace("tables-restore", &format!("tables-{v}-restore"));
                    script.push_str(&format!(
                        "{variant_program} --noflush < {}\n",
                        file.display()
                    ));
                }
            }
            let out = Command::new("unshare")
                .args(["--net", "--", "sh", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
