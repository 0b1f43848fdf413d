//! What the harness-less benches share: their flags, a network namespace of their own, and
//! medians. Each bench uses a part of it (`#[allow(dead_code)]` where it is included).

use std::process::Command;
use std::time::Duration;

/// Every value given to flag `name` (`--services 1000 --services 10000`: both), in order.
pub fn args(name: &str) -> Vec<String> {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .enumerate()
        .filter(|(_, a)| *a == name)
        .filter_map(|(i, _)| argv.get(i + 1).cloned())
        .collect()
}

/// The value of flag `name` (the last one given), else `default`.
pub fn arg(name: &str, default: &str) -> String {
    args(name).pop().unwrap_or_else(|| default.to_string())
}

/// A network namespace that is deleted when dropped; the bench's rules go there, never into
/// the host's ruleset.
pub struct Netns(pub String);

impl Netns {
    /// `svcp-bench-PID-TAG`.
    pub fn new(tag: &str) -> Netns {
        let name = format!("svcp-bench-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot create network namespace {name} (root needed)");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
