//! `svcproxy verify` against real tables: `svcproxy apply` in a network namespace, then edits
//! by hand (an element deleted, one added, a chain changed, a table or chain gone), each found
//! and named after its Service; right after an apply, nothing. Both modes. Needs root.

mod common;

use std::process::{Command, Output};

use common::netns::Netns;

const ARGS: &[&str] = &["--node", "node-a", "--cluster-cidr", "10.244.0.0/16"];

fn svcproxy(ns: &str, cmd: &str, extra: &[&str]) -> Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_svcproxy"),
            cmd,
            "--from",
        ])
        .arg(common::examples_dir())
        .args(ARGS)
        .args(extra)
        .output()
        .unwrap()
}

fn apply(ns: &str, extra: &[&str]) {
    let out = svcproxy(ns, "apply", extra);
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(2),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs verify; returns its exit code and its report (stdout).
fn verify(ns: &str, extra: &[&str]) -> (i32, String) {
    let out = svcproxy(ns, "verify", extra);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 4,
        "verify exit {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, stdout)
}

/// Runs a shell command line in the namespace; fails the test if it fails.
fn sh(ns: &str, line: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", line])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(ns: &str, line: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", line])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has(report: &str, parts: &[&str]) -> bool {
    report.lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn verify_finds_every_hand_edit_of_the_nftables_tables() {
    if !common::can_unshare_net() || !common::have_nft() {
        common::cannot_run("needs root and nft");
    }
    let ns = Netns::add(format!("svcproxy-verify-nft-{}", std::process::id()));
    let ns = ns.0.as_str();
    apply(ns, &[]);
    assert_eq!(verify(ns, &[]), (0, String::new()), "right after apply");

    // (a) a deleted element
    sh(
        ns,
        "nft delete element ip svcproxy service-ips '{ 10.96.0.1 . tcp . 443 }'",
    );
    let (code, report) = verify(ns, &[]);
    assert_eq!(code, 4, "{report}");
    assert!(
        has(
            &report,
            &[
                "table ip svcproxy: map service-ips: element 10.96.0.1 . tcp . 443",
                "is missing",
                "(Service default/kubernetes:https/tcp)"
            ]
        ),
        "{report}"
    );
    assert_eq!(report.lines().count(), 1, "{report}");
    apply(ns, &[]);
    assert_eq!(verify(ns, &[]), (0, String::new()), "repaired by apply");

    // (b) an element added by hand: a third endpoint for kube-dns
    sh(
        ns,
        "nft add element ip svcproxy endpoints-2 '{ 10.96.0.10 . tcp . 53 : 172.17.9.9 . 53 }'",
    );
    let (code, report) = verify(ns, &[]);
    assert_eq!(code, 4, "{report}");
    assert!(
        has(
            &report,
            &[
                "map endpoints-2: element 10.96.0.10 . tcp . 53 : 172.17.9.9 . 53 is not in the plan",
                "(Service kube-system/kube-dns:dns-tcp/tcp)"
            ]
        ),
        "{report}"
    );
    apply(ns, &[]);

    // (c) a changed chain: a rule added to one, the rules of another removed
    let listing = output(ns, "nft list table ip svcproxy");
    let affinity: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain affinity-"))
        .filter_map(|l| l.strip_suffix(" {"))
        .filter(|l| l.contains('-'))
        .collect();
    assert!(affinity.len() >= 2, "{listing}");
    sh(
        ns,
        &format!("nft add rule ip svcproxy affinity-{} drop", affinity[0]),
    );
    sh(
        ns,
        &format!("nft flush chain ip svcproxy affinity-{}", affinity[1]),
    );
    let (code, report) = verify(ns, &[]);
    assert_eq!(code, 4, "{report}");
    assert!(
        has(
            &report,
            &[
                &format!(
                    "chain affinity-{}: rule 3 `drop` is not in the plan",
                    affinity[0]
                ),
                "(Service default/kubia-multi:"
            ]
        ),
        "{report}"
    );
    assert!(
        has(
            &report,
            &[
                &format!("chain affinity-{}: rule 1 `update @affinity-", affinity[1]),
                "is missing (Service default/kubia-multi:"
            ]
        ),
        "{report}"
    );
    apply(ns, &[]);

    // (d) a missing table
    sh(ns, "nft delete table ip6 svcproxy");
    let (code, report) = verify(ns, &[]);
    assert_eq!(
        (code, report.as_str()),
        (4, "table ip6 svcproxy is missing\n")
    );
    apply(ns, &[]);
    assert_eq!(verify(ns, &[]), (0, String::new()));
}

#[test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)"
)]
fn verify_finds_every_hand_edit_of_the_iptables_chains() {
    if !common::can_unshare_net() {
        common::cannot_run("needs root");
    }
    for variant in ["nft", "legacy"] {
        let ns = Netns::add(format!(
            "svcproxy-verify-ipt-{variant}-{}",
            std::process::id()
        ));
        let ns = ns.0.as_str();
        let mode = ["--proxy-mode", "iptables", "--iptables-variant", variant];
        let ipt = format!("iptables-{variant}");
        apply(ns, &mode);
        assert_eq!(
            verify(ns, &mode),
            (0, String::new()),
            "{variant}: after apply"
        );

        let save = output(ns, &format!("{ipt}-save -t nat"));
        let rule_of = |comment: &str| -> String {
            save.lines()
                .find(|l| l.starts_with("-A SVCP-SERVICES ") && l.contains(comment))
                .unwrap_or_else(|| panic!("no rule for {comment}: {save}"))
                .strip_prefix("-A ")
                .unwrap()
                .to_string()
        };

        // (a) a deleted "element": the kubernetes Service's rule in SVCP-SERVICES
        let kubernetes = rule_of("default/kubernetes:https/tcp cluster IP");
        sh(ns, &format!("{ipt} -t nat -D {kubernetes}"));
        let (code, report) = verify(ns, &mode);
        assert_eq!(code, 4, "{report}");
        assert!(
            has(
                &report,
                &[
                    "IPv4 table nat: chain SVCP-SERVICES: rule",
                    "is missing (Service default/kubernetes:https/tcp)"
                ]
            ),
            "{variant}: {report}"
        );
        assert_eq!(report.lines().count(), 1, "{report}");
        apply(ns, &mode);
        assert_eq!(verify(ns, &mode), (0, String::new()), "{variant}: repaired");

        // (b) one added by hand
        sh(
            ns,
            &format!(
                "{ipt} -t nat -A SVCP-SERVICES -d 10.96.77.77/32 -p tcp -m comment --comment 'default/handmade:80/tcp cluster IP' -m tcp --dport 80 -j SVCP-MARK-MASQ"
            ),
        );
        let (code, report) = verify(ns, &mode);
        assert_eq!(code, 4, "{report}");
        assert!(
            has(
                &report,
                &[
                    "chain SVCP-SERVICES: rule",
                    "10.96.77.77",
                    "is not in the plan (Service default/handmade:80/tcp)"
                ]
            ),
            "{variant}: {report}"
        );
        apply(ns, &mode);

        // (c) a changed chain: snackbar/order's endpoint chain emptied, a rule added
        let order = rule_of("snackbar/order:80/tcp cluster IP");
        let chain = order.rsplit(" -j ").next().unwrap().to_string();
        sh(ns, &format!("{ipt} -t nat -F {chain}"));
        sh(ns, &format!("{ipt} -t nat -A {chain} -j RETURN"));
        let (code, report) = verify(ns, &mode);
        assert_eq!(code, 4, "{report}");
        assert!(
            has(
                &report,
                &[
                    &format!("chain {chain}: rule 1"),
                    "is missing (Service snackbar/order:80/tcp)"
                ]
            ),
            "{variant}: {report}"
        );
        assert!(
            has(
                &report,
                &[
                    &format!("chain {chain}: rule 1 `-j RETURN` is not in the plan"),
                    "(Service snackbar/order:80/tcp)"
                ]
            ),
            "{variant}: {report}"
        );
        apply(ns, &mode);

        // (d) a missing chain
        sh(ns, &format!("{ipt} -t nat -D {order}"));
        sh(ns, &format!("{ipt} -t nat -F {chain}"));
        sh(ns, &format!("{ipt} -t nat -X {chain}"));
        let (code, report) = verify(ns, &mode);
        assert_eq!(code, 4, "{report}");
        assert!(
            has(
                &report,
                &[
                    &format!("IPv4 table nat: chain {chain} is missing"),
                    "(Service snackbar/order:80/tcp)"
                ]
            ),
            "{variant}: {report}"
        );
        apply(ns, &mode);
        assert_eq!(
            verify(ns, &mode),
            (0, String::new()),
            "{variant}: at the end"
        );
    }
}

/// Bad input is exit 1, before anything is read from the kernel.
#[test]
fn bad_input_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .args(["verify", "--from"])
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .args(["verify", "--proxy-mode", "ipvs", "--from", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
