//! kube-proxy's configuration file and flags: `config check`, `run --write-config-to`, and
//! invalid values stopping start-up before anything touches the kernel.

use std::process::Command;

fn svcproxy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const GOOD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: []
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  syncPeriod: 1h0m0s
  minSyncPeriod: 1s
ipvs:
  scheduler: rr
featureGates:
  NFTablesProxyMode: true
";

#[test]
fn config_check_prints_the_effective_settings() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let (code, out, err) = svcproxy(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("clusterCIDR: 10.244.0.0/16"), "{out}");
    assert!(out.contains("syncPeriod: 1h0m0s"), "{out}");
    assert!(
        err.contains("ipvs: accepted but not used by svcproxy"),
        "one warning per field that does not apply: {err}"
    );
}

#[test]
fn config_check_names_a_misspelled_field_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        GOOD.replace("  masqueradeBit: 14", "  masqueradeBits: 14"),
    )
    .unwrap();
    let (code, _, err) = svcproxy(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown field `masqueradeBits`") && err.contains("line 10"),
        "{err}"
    );
}

#[test]
fn invalid_values_stop_start_up_with_the_value_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let f = file.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["run", "--config", f, "--cluster-cidr", "10.244.0.0/33"],
            "\"10.244.0.0/33\": not a CIDR",
        ),
        (
            vec![
                "run",
                "--config",
                f,
                "--healthz-bind-address",
                "0.0.0.0:99999",
            ],
            "\"0.0.0.0:99999\"",
        ),
        (
            vec!["run", "--config", f, "--sync-period", "-5m"],
            "negative",
        ),
        (
            vec!["run", "--config", f, "--proxy-mode", "ipvs"],
            "mode: \"ipvs\"",
        ),
        (
            vec!["run", "--config", f, "--masquerade-bit", "32"],
            "0 to 31",
        ),
    ] {
        let (code, _, err) = svcproxy(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("invalid configuration") && err.contains(expect),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn write_config_to_writes_the_effective_configuration_with_flags_applied() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let out = dir.path().join("effective.yaml");
    let (code, _, err) = svcproxy(&[
        "run",
        "--config",
        file.to_str().unwrap(),
        "--masquerade-all",
        "--min-sync-period",
        "250ms",
        "--write-config-to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(
        written.contains("masqueradeAll: true"),
        "the flag wins over the file: {written}"
    );
    assert!(written.contains("minSyncPeriod: 250ms"), "{written}");
    let (code, _, err) = svcproxy(&["config", "check", out.to_str().unwrap()]);
    assert_eq!(code, 0, "what svcproxy writes, it reads: {err}");
}

/// kube-proxy's ConfigMap as kubeadm writes it (tests/fixtures/kubeadm-kube-proxy-configmap.yaml:
/// every field, most of them zero or null) loads with no warning, and the effective settings are
/// kube-proxy's defaults (except svcproxy's own full-resync period, 1h).
#[test]
fn kubeadms_configmap_loads_with_no_warning_and_kube_proxys_defaults() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kubeadm-kube-proxy-configmap.yaml"
    );
    let file = svcproxy::config::read(std::path::Path::new(fixture)).unwrap();
    let s = svcproxy::config::resolve(&file, &Default::default()).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(s.mode, svcproxy::config::ProxyMode::Nftables);
    assert_eq!(s.proxy.masquerade_bit, 14);
    assert!(!s.proxy.masquerade_all);
    assert!(s.proxy.cluster_cidrs.is_empty());
    assert_eq!(s.min_sync_period, std::time::Duration::from_secs(1));
    assert_eq!(s.sync_period, svcproxy::config::DEFAULT_SYNC_PERIOD);
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        s.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(s.node_ip, None, "bindAddress 0.0.0.0 names no address");
    assert_eq!(
        s.kubeconfig.as_deref(),
        Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let sysctls: Vec<(&str, u64)> = s.conntrack.iter().map(|c| (c.name, c.value)).collect();
    assert_eq!(
        sysctls,
        [
            (
                "net/netfilter/nf_conntrack_max",
                (32768 * cores).max(131072)
            ),
            ("net/netfilter/nf_conntrack_tcp_timeout_established", 86400),
            ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 3600),
        ],
        "kube-proxy's conntrack defaults; udpTimeout 0s leaves the kernel's value"
    );

    // And through the binary: `config check` prints no warning.
    let (code, out, err) = svcproxy(&["config", "check", fixture]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("WARN"), "{err}");
    assert!(
        out.contains("syncPeriod: 1h0m0s") && out.contains("minSyncPeriod: 1s"),
        "{out}"
    );
}

/// A duration too long to represent (Go's limit, about 292 years) is an error naming the value,
/// from the command line and from the file, never a panic.
#[test]
fn durations_too_long_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let f = file.to_str().unwrap();
    let out = dir.path().join("out.yaml");
    let o = out.to_str().unwrap();
    for flag in ["--sync-period", "--min-sync-period"] {
        for value in [
            "9999999999999999h",
            "99999999999999999999999999h",
            "2562047h48m",
        ] {
            let (code, _, err) =
                svcproxy(&["run", "--config", f, flag, value, "--write-config-to", o]);
            assert_eq!(code, 1, "{flag} {value}: {err}");
            assert!(
                err.contains(&format!("{flag}: \"{value}\"")) && err.contains("too long"),
                "{flag} {value}: {err}"
            );
        }
    }
    let huge = dir.path().join("huge.yaml");
    std::fs::write(
        &huge,
        GOOD.replace("syncPeriod: 1h0m0s", "syncPeriod: 9999999999999999h"),
    )
    .unwrap();
    let (code, _, err) = svcproxy(&["config", "check", huge.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("nftables.syncPeriod: \"9999999999999999h\"") && err.contains("too long"),
        "{err}"
    );
    let (code, _, err) = svcproxy(&[
        "run",
        "--config",
        huge.to_str().unwrap(),
        "--write-config-to",
        o,
    ]);
    assert_eq!(code, 1, "{err}");
    // The longest representable one is accepted and written back exactly.
    let (code, _, err) = svcproxy(&[
        "run",
        "--config",
        f,
        "--sync-period",
        "2562047h47m16.854775807s",
        "--write-config-to",
        o,
    ]);
    assert_eq!(code, 0, "{err}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(
        written.contains("syncPeriod: 2562047h47m16.854775807s"),
        "{written}"
    );
}
