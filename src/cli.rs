//! The command line: arguments (clap) and the commands behind them.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::convert::Converted;
use crate::manifests;
use crate::model::{NodeInfo, NodePortAddresses, ProxyConfig, Snapshot};

/// svcproxy: Kubernetes Services on this node, programmed into nftables.
#[derive(Debug, Parser)]
#[command(name = "svcproxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the ruleset svcproxy would apply, from manifest files, without touching the kernel.
    Dump(DumpArgs),
    /// Compile manifest files and apply the ruleset to this network namespace's kernel, once
    /// (a full sync: svcproxy's tables are replaced in one transaction).
    Apply(ApplyArgs),
    /// Delete svcproxy's tables (and nothing else).
    Cleanup,
}

/// The output format of `dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An `nft -f` script that replaces svcproxy's tables atomically.
    Nft,
    /// libnftables JSON, as `nft -j list ruleset` prints it.
    Json,
}

/// `--nodeport-addresses`: `primary`, or a comma-separated list of CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortAddressesArg(pub NodePortAddresses);

impl FromStr for NodePortAddressesArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "primary" {
            return Ok(NodePortAddressesArg(NodePortAddresses::Primary));
        }
        let mut cidrs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net: IpNet = part.parse().map_err(|_| {
                format!("{part:?} is not a CIDR (expected e.g. 10.0.0.0/8, or `primary`)")
            })?;
            cidrs.push(net.trunc());
        }
        if cidrs.is_empty() {
            return Err("empty list (expected CIDRs, or `primary`)".into());
        }
        Ok(NodePortAddressesArg(NodePortAddresses::Cidrs(cidrs)))
    }
}

/// How the node and the proxy are set up: shared by every command that compiles a ruleset.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The node the proxy runs on (default: $NODE_NAME, else the host name). Its Node object, if
    /// among the inputs, supplies addresses, zone and pod CIDRs.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// The node's addresses (primary first); overrides the Node object's.
    #[arg(long = "node-ip", value_name = "IP", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// The cluster's pod network(s): traffic from outside it to a ClusterIP is masqueraded, and
    /// pods in it reach Local-policy external addresses through any endpoint.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub cluster_cidrs: Vec<IpNet>,
    /// Which local addresses answer NodePorts: `primary` (the node's primary IPs) or a
    /// comma-separated list of CIDRs. Default: every local address (never loopback).
    #[arg(long = "nodeport-addresses", value_name = "CIDRS|primary")]
    pub nodeport_addresses: Option<NodePortAddressesArg>,
    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// The packet mark bit (0-31) that flags packets for masquerading.
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..32))]
    pub masquerade_bit: u8,
}

impl NodeArgs {
    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            cluster_cidrs: self.cluster_cidrs.iter().map(IpNet::trunc).collect(),
            nodeport_addresses: self
                .nodeport_addresses
                .clone()
                .map(|a| a.0)
                .unwrap_or_default(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
        }
    }

    /// The node name: the flag, else $NODE_NAME, else the host name (as kube-proxy does).
    pub fn node_name(&self) -> String {
        self.node
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(hostname)
    }

    /// This node as the inputs and flags describe it; notices say what was missing.
    pub fn node_info(&self, converted: &Converted, notices: &mut Vec<String>) -> NodeInfo {
        let name = self.node_name();
        let mut info = match converted.nodes.get(&name) {
            Some(n) => n.clone(),
            None => {
                if !converted.nodes.is_empty() {
                    let known: Vec<&str> = converted.nodes.keys().map(String::as_str).collect();
                    notices.push(format!(
                        "no Node named {name:?} among the inputs (they have: {}); use --node to pick one",
                        known.join(", ")
                    ));
                }
                NodeInfo {
                    name,
                    ..NodeInfo::default()
                }
            }
        };
        if !self.node_ips.is_empty() {
            info.addresses = self.node_ips.clone();
        }
        info
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_default()
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Manifest files (YAML or JSON) or directories of them.
    #[arg(long = "from", value_name = "PATH", required = true, num_args = 1..)]
    pub from: Vec<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Nft)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest files (YAML or JSON) or directories of them.
    #[arg(long = "from", value_name = "PATH", required = true, num_args = 1..)]
    pub from: Vec<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Exit codes: everything was used / something was skipped / nothing usable was read.
pub const EXIT_OK: u8 = 0;
pub const EXIT_NOTHING: u8 = 1;
pub const EXIT_SKIPPED: u8 = 2;

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Dump(args) => dump(&args, &mut std::io::stdout().lock()),
        Command::Apply(args) => apply(&args),
        Command::Cleanup => cleanup(),
    }
}

/// Manifests → snapshot, with every problem logged. `Err(())`: nothing usable was read.
fn load_snapshot(from: &[PathBuf], node_args: &NodeArgs) -> Result<(Snapshot, bool), ()> {
    let mut loaded = manifests::load(from);
    for e in &loaded.errors {
        tracing::warn!("skipped: {e}");
    }
    if loaded.is_empty() {
        tracing::error!("nothing usable was read from {from:?}");
        return Err(());
    }
    let node = node_args.node_info(&loaded.converted, &mut loaded.notices);
    for n in &loaded.notices {
        tracing::info!("{n}");
    }
    let snapshot = Snapshot {
        services: std::mem::take(&mut loaded.converted.services),
        slices: std::mem::take(&mut loaded.converted.slices),
        node,
    };
    Ok((snapshot, loaded.errors.is_empty()))
}

/// `svcproxy apply`: manifests → ruleset → kernel, in one transaction.
pub fn apply(args: &ApplyArgs) -> u8 {
    let Ok((snapshot, clean)) = load_snapshot(&args.from, &args.node) else {
        return EXIT_NOTHING;
    };
    let (plan, ruleset) = crate::compile(&snapshot, &args.node.proxy_config());
    for c in &plan.conflicts {
        tracing::warn!("skipped: {c}");
    }
    let mut backend = crate::nft::apply::Nftables::new(Default::default());
    match backend.apply_full(ruleset) {
        Ok(report) => {
            tracing::info!(
                kind = report.kind.as_str(),
                services = snapshot.services.len(),
                elements = report.elements_added,
                chains = report.chains_changed,
                bytes = report.script_bytes,
                duration_ms = report.duration.as_secs_f64() * 1e3,
                "applied"
            );
            if clean && plan.conflicts.is_empty() {
                EXIT_OK
            } else {
                EXIT_SKIPPED
            }
        }
        Err(e) => {
            tracing::error!("apply failed, the kernel keeps its previous rules: {e}");
            EXIT_NOTHING
        }
    }
}

/// `svcproxy cleanup`: delete svcproxy's tables.
pub fn cleanup() -> u8 {
    let tables = [("ip", crate::nft::TABLE), ("ip6", crate::nft::TABLE)];
    match crate::nft::apply::cleanup(&Default::default(), &tables) {
        Ok(()) => {
            tracing::info!("deleted tables ip {0} and ip6 {0}", crate::nft::TABLE);
            EXIT_OK
        }
        Err(e) => {
            tracing::error!("cleanup failed: {e}");
            EXIT_NOTHING
        }
    }
}

/// `svcproxy dump`: manifests → model → plan → nftables, printed to `out`. Problems go to the
/// log (stderr), each naming the file, the object and the field.
pub fn dump(args: &DumpArgs, out: &mut impl Write) -> u8 {
    let Ok((snapshot, clean)) = load_snapshot(&args.from, &args.node) else {
        return EXIT_NOTHING;
    };
    let (plan, ruleset) = crate::compile(&snapshot, &args.node.proxy_config());
    for c in &plan.conflicts {
        tracing::warn!("skipped: {c}");
    }
    let text = match args.format {
        Format::Nft => ruleset.script(),
        Format::Json => {
            let mut s =
                serde_json::to_string_pretty(&ruleset.json()).expect("JSON values serialize");
            s.push('\n');
            s
        }
    };
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        tracing::error!("writing the ruleset: {e}");
        return EXIT_NOTHING;
    }
    if clean && plan.conflicts.is_empty() {
        EXIT_OK
    } else {
        EXIT_SKIPPED
    }
}
