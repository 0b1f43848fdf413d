//! Helpers shared by the scenario tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use svcproxy::cli::NodeArgs;
use svcproxy::manifests;
use svcproxy::model::{ProxyConfig, Snapshot};
use svcproxy::nft::Ruleset;
use svcproxy::plan::Plan;

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Node flags as tests use them: node-a, nothing else unless given.
pub fn node_args(extra: &[&str]) -> NodeArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        node: NodeArgs,
    }
    let mut argv = vec!["test", "--node", "node-a"];
    argv.extend_from_slice(extra);
    Wrapper::parse_from(argv).node
}

/// The snapshot and configuration of manifests given as YAML text, with node flags (node-a
/// unless the flags say otherwise): what [`compile_yaml`] compiles.
pub fn snapshot_yaml(yaml: &str, flags: &[&str]) -> (Snapshot, ProxyConfig) {
    let mut loaded = manifests::load_text(Path::new("inline.yaml"), yaml);
    // Any problem in a test's manifests is a mistake in the test, except a topology value
    // svcproxy warns about and reads as kube-proxy does (the conformance tables send such
    // Services on purpose).
    let unexpected: Vec<_> = loaded
        .errors
        .iter()
        .filter(|e| {
            !matches!(e, manifests::ManifestError::Rejected { rejected, .. }
                if rejected.field.starts_with("metadata.annotations[service.kubernetes.io/topology")
                    || rejected.field == "spec.trafficDistribution")
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    let args = node_args(flags);
    let mut notices = Vec::new();
    let node = args.node_info(&loaded.converted, &mut notices);
    let snapshot = Snapshot {
        services: std::mem::take(&mut loaded.converted.services),
        slices: std::mem::take(&mut loaded.converted.slices),
        node,
        service_cidrs: std::mem::take(&mut loaded.converted.service_cidrs),
    };
    (snapshot, args.proxy_config())
}

/// Compiles manifests given as YAML text (node-a unless the flags say otherwise).
pub fn compile_yaml(yaml: &str, flags: &[&str]) -> (Plan, Ruleset) {
    let (snapshot, config) = snapshot_yaml(yaml, flags);
    svcproxy::compile(&snapshot, &config)
}

/// The nft script of manifests given as YAML text.
pub fn script(yaml: &str, flags: &[&str]) -> String {
    compile_yaml(yaml, flags).1.script()
}

/// Whether `nft` is installed.
pub fn have_nft() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A test that needs root and tools found it cannot run: it fails, never passes without having
/// run. Tests that need them are compiled as ignored where build.rs's probe finds them
/// missing, so reaching this means the machine changed between the build and the run (or the
/// probe missed something): `touch build.rs` rebuilds with a new probe.
pub fn cannot_run(reason: &str) -> ! {
    panic!("cannot run: {reason}");
}

/// Checks an nft script with `nft -c -f` in a private network namespace (so that the check
/// never sees or touches the host's ruleset). Returns nft's stderr on failure.
pub fn nft_check(script: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ruleset.nft");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--", "nft", "-c", "-f"])
        .arg(&file)
        .output()
        .map_err(|e| format!("running unshare/nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Whether this process may create network namespaces (root, or CAP_SYS_ADMIN).
pub fn can_unshare_net() -> bool {
    Command::new("unshare")
        .args(["--net", "--", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}
pub mod agent;
pub mod apiserver;
pub mod changes;
pub mod netns;
pub mod proxy;
