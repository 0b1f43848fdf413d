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
