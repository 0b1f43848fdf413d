//! Decides, when the tests are built, whether this machine can run the tests that need root:
//! they create network namespaces and load real rulesets with nft, iproute2 and both iptables
//! variants. Where it cannot, those tests are compiled as `#[ignore]`d with the reason (the cfg
//! `root_tests` is not set), so that `cargo test` reports them as ignored and counts them in its
//! summary, instead of reporting `ok` for a test that did not run. `.ci/run` fails if any test
//! was ignored, so CI proves that every one of them ran.
//!
//! The probe runs as the user that builds, which is the user that runs `cargo test`. It is
//! repeated when this file, `CI` or `SVCPROXY_ROOT_TESTS` changes; after installing a missing
//! tool, `touch build.rs`.

use std::process::Command;

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the root tests need and this machine lacks, in words.
fn missing() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // Creating a network namespace needs root (CAP_SYS_ADMIN) and util-linux's unshare.
    if !succeeds("unshare", &["--net", "--", "true"]) {
        missing.push("root and network namespaces (unshare --net)");
    }
    let tools: [(&str, &[&str], &str); 4] = [
        ("nft", &["--version"], "nft (nftables)"),
        ("ip", &["-V"], "ip (iproute2)"),
        ("iptables-legacy-restore", &["--version"], "iptables-legacy"),
        ("iptables-nft-restore", &["--version"], "iptables-nft"),
    ];
    for (program, args, name) in tools {
        if !succeeds(program, args) {
            missing.push(name);
        }
    }
    missing
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(root_tests)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=SVCPROXY_ROOT_TESTS");
    // `SVCPROXY_ROOT_TESTS=0`: compile them as ignored even where they could run (a quick run).
    let mut missing = missing();
    if std::env::var("SVCPROXY_ROOT_TESTS").as_deref() == Ok("0") {
        missing.push("(not looked for: SVCPROXY_ROOT_TESTS=0)");
    }
    if missing.is_empty() {
        println!("cargo::rustc-cfg=root_tests");
    } else if std::env::var("PROFILE").as_deref() != Ok("release") {
        // Said only where tests are built: a release build of the binary does not care.
        println!(
            "cargo::warning=tests that need root are compiled as ignored; missing: {}",
            missing.join(", ")
        );
    }
}
