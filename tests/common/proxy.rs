//! The harness of the real-packet tests (tests/dataplane.rs, tests/conformance.rs): svcproxy's
//! backend in the node namespace of a [`World`], each scenario run once per backend
//! ([`on_every_backend!`]), and the manifest and probe helpers they share.
//!
//! `on_every_backend!` expands, where it is invoked, to `use super::*;` and calls to `run` with
//! `Mode` and `Variant`: the invoking file imports this module's items and
//! `svcproxy::iptables::Variant`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common;
use crate::common::netns::*;
use svcproxy::backend::{self, OneShot};
use svcproxy::conntrack::stale_udp;
use svcproxy::iptables::Variant;
use svcproxy::model::{ProxyConfig, Snapshot};
use svcproxy::plan::Plan;
use svcproxy::process::Runner;
use svcproxy::report::ApplyReport;

pub const FLAGS: &[&str] = &["--node-ip", NODE_IP, "--cluster-cidr", "10.244.0.0/16"];
pub const T: Duration = Duration::from_secs(2);

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    Iptables(Variant),
}

impl Mode {
    /// svcproxy's backend mode of this test mode, with its programs in namespace `ns`.
    pub fn backend(self, ns: &str) -> backend::Mode {
        match self {
            Mode::Nftables => backend::Mode::nftables(Runner::in_netns(ns)),
            Mode::Iptables(v) => backend::Mode::iptables(Runner::in_netns(ns), v),
        }
    }

    /// `svcproxy apply`'s flags for this mode.
    pub fn flags(self) -> Vec<&'static str> {
        match self {
            Mode::Nftables => vec!["--proxy-mode", "nftables"],
            Mode::Iptables(Variant::Legacy) => {
                vec!["--proxy-mode", "iptables", "--iptables-variant", "legacy"]
            }
            Mode::Iptables(Variant::Nft) => {
                vec!["--proxy-mode", "iptables", "--iptables-variant", "nft"]
            }
        }
    }
}

/// Whether this mode's tools are installed (nft is checked by `World::new`).
pub fn have_tools(mode: Mode) -> bool {
    match mode {
        Mode::Nftables => true,
        Mode::Iptables(v) => ["iptables", "ip6tables"].iter().all(|f| {
            std::process::Command::new(format!("{f}-{v}-restore"))
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        }),
    }
}

/// Runs a scenario once per backend: `mod NAME { nftables, iptables_legacy, iptables_nft }`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            #[cfg_attr(not(root_tests), ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)")]
            fn nftables() {
                run(Mode::Nftables, super::$name);
            }

            #[test]
            #[cfg_attr(not(root_tests), ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)")]
            fn iptables_legacy() {
                run(Mode::Iptables(Variant::Legacy), super::$name);
            }

            #[test]
            #[cfg_attr(not(root_tests), ignore = "needs root, network namespaces, nft, iproute2 and both iptables variants (build.rs)")]
            fn iptables_nft() {
                run(Mode::Iptables(Variant::Nft), super::$name);
            }
        }
    )*};
}

/// Builds the world for `mode` and runs the scenario.
pub fn run(mode: Mode, scenario: fn(Proxy)) {
    if !have_tools(mode) {
        common::cannot_run(&format!("{mode:?} needs its iptables programs"));
    }
    if let Some(p) = Proxy::new(mode) {
        scenario(p);
    }
}

/// A world plus svcproxy's backend in its node namespace.
pub struct Proxy {
    pub w: World,
    pub mode: Mode,
    pub backend: OneShot,
    pub plan: Option<Plan>,
    /// The inputs last applied, for `svcproxy trace`'s predictions (`Proxy::probe` in
    /// tests/dataplane.rs).
    pub applied: Option<(Snapshot, ProxyConfig)>,
}

impl Proxy {
    pub fn new(mode: Mode) -> Option<Proxy> {
        let w = World::new()?;
        let backend = OneShot::new(mode.backend(&w.node));
        Some(Proxy {
            w,
            mode,
            backend,
            plan: None,
            applied: None,
        })
    }

    /// The plan of the manifests.
    pub fn plan_of(&self, yaml: &str) -> Plan {
        let (snapshot, config) = common::snapshot_yaml(yaml, FLAGS);
        svcproxy::plan::plan(&snapshot, &config)
    }

    /// Compiles the manifests and applies them (partial when possible), flushing stale UDP flows.
    pub fn apply(&mut self, yaml: &str) -> ApplyReport {
        self.apply_with(yaml, &[])
    }

    /// [`Proxy::apply`], with more `dump` flags after the usual ones.
    pub fn apply_with(&mut self, yaml: &str, extra: &[&str]) -> ApplyReport {
        let flags: Vec<&str> = FLAGS.iter().chain(extra).copied().collect();
        let (snapshot, config) = common::snapshot_yaml(yaml, &flags);
        let plan = svcproxy::plan::plan(&snapshot, &config);
        self.applied = Some((snapshot, config));
        let report = self
            .backend
            .apply(&plan)
            .unwrap_or_else(|e| panic!("apply failed: {e}"));
        if let Some(old) = &self.plan {
            // Where the backend's programs run, as the agent does.
            self.backend
                .mode()
                .conntrack()
                .unwrap()
                .flush(&stale_udp(old, &plan))
                .unwrap();
        }
        self.plan = Some(plan);
        report
    }

    /// Applies the manifests with `conntrack.tcpBeLiberal` set as given.
    pub fn apply_liberal(&mut self, yaml: &str, tcp_be_liberal: bool) -> ApplyReport {
        let (snapshot, config) = common::snapshot_yaml(yaml, FLAGS);
        let mut plan = svcproxy::plan::plan(&snapshot, &config);
        self.applied = Some((snapshot, config));
        plan.drop_invalid = !tcp_be_liberal;
        let report = self
            .backend
            .apply(&plan)
            .unwrap_or_else(|e| panic!("apply failed: {e}"));
        self.plan = Some(plan);
        report
    }

    /// Runs a program in the node namespace; its stdout.
    pub fn node_sh(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.w.node])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

pub fn svc(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

/// An EndpointSlice; endpoints as (pod, conditions) with conditions in YAML flow form.
pub fn slice(name: &str, service: &str, ports: &str, eps: &[(&Pod, &str)]) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|(p, cond)| {
            format!(
                "{{addresses: [{}], nodeName: {}, conditions: {cond}}}",
                p.ip, p.node
            )
        })
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

pub const READY: &str = "{ready: true}";

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Who answered `n` TCP requests from `ns` to `to`.
pub fn who_answers(ns: &str, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let r = tcp(ns, to, T).unwrap_or_else(|e| panic!("request to {to} from {ns}: {e}"));
        *seen.entry(r.pod).or_default() += 1;
    }
    seen
}

pub fn names(m: &BTreeMap<String, usize>) -> BTreeSet<&str> {
    m.keys().map(String::as_str).collect()
}

/// Whether a TCP connection attempt from `ns` to `to` is dropped (times out) rather than
/// answered or refused.
pub fn dropped(ns: &str, to: SocketAddr) -> bool {
    match tcp(ns, to, Duration::from_millis(700)) {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ),
    }
}
