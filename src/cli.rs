//! The command line: arguments (clap) and the commands behind them.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::convert::Converted;
use crate::manifests;
use crate::model::{DetectLocal, NodeInfo, NodePortAddresses, ProxyConfig, Snapshot};

/// svcproxy: Kubernetes Services on this node, programmed into nftables (or iptables).
#[derive(Debug, Parser)]
#[command(name = "svcproxy", version, about)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log verbosity, as kube-proxy's `--v`: up to 2 info, 3-4 debug, 5 and more trace
    /// ($SVCPROXY_LOG, a tracing filter, wins).
    #[arg(long = "v", global = true, value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the ruleset svcproxy would apply, from manifest files (`--from`) or read once from
    /// the cluster (`--kubeconfig`), without touching the kernel.
    Dump(DumpArgs),
    /// Run the node agent: watch the apiserver and keep the kernel's rules in sync.
    Run(RunArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Compile manifest files and apply the ruleset to this network namespace's kernel, once
    /// (a full sync: svcproxy's tables are replaced in one transaction).
    Apply(ApplyArgs),
    /// Delete svcproxy's nftables tables and its iptables chains and jump rules (both
    /// variants, both families), and nothing else.
    Cleanup,
    /// Where a new connection (or a ping) from SRC to DST goes on this node, and why: the
    /// Service and port, each decision with its reason, the endpoints and those left out, the
    /// verdict. Exit code 0: it reaches an endpoint; 3: dropped or rejected; 5: svcproxy leaves
    /// it alone; 1: bad input.
    Trace(TraceArgs),
    /// Every frontend (address, protocol, port) this node proxies, with its endpoints and
    /// their state, its policies, and what an outside client and a pod get.
    Services(ServicesArgs),
    /// Compare svcproxy's tables in this network namespace's kernel with what the manifests
    /// compile to, and name every difference (exit 0: equal, 4: different, 1: bad input).
    Verify(VerifyArgs),
}

/// Where the cluster state comes from, for `trace` and `services`.
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Manifest files (YAML or JSON) or directories of them; repeat for several.
    #[arg(long = "from", value_name = "PATH")]
    pub from: Vec<PathBuf>,
    /// Read the cluster once through this kubeconfig.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["from", "agent"])]
    pub kubeconfig: Option<PathBuf>,
    /// Ask a running agent for what it last applied (its metrics address, e.g.
    /// 127.0.0.1:10249).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["from", "kubeconfig"])]
    pub agent: Option<String>,
}

/// `--output` of `trace` and `services`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// The interface the packet arrives on (for --detect-local-mode InterfaceNamePrefix or
    /// BridgeInterface): tells a pod's packets from others.
    #[arg(long, value_name = "NAME")]
    pub iifname: Option<String>,
    /// Which backend's rules: they differ in one place (a guarded load balancer without
    /// endpoints drops in the iptables mode instead of refusing). Default: the agent's mode
    /// with --agent, else nftables.
    #[arg(long, value_enum)]
    pub proxy_mode: Option<ProxyModeArg>,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The source: an IP address (a pod, the node, an outside client), or `node` (this
    /// node's primary address of DST's family).
    #[arg(value_name = "SRC")]
    pub source: String,
    /// `IP:PORT[/tcp|udp|sctp]` (`[IPv6]:PORT`), or `IP` / `IP/icmp` for a ping.
    #[arg(value_name = "DST")]
    pub destination: crate::trace::Target,
}

#[derive(Debug, Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The output format of `dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An `nft -f` script that replaces svcproxy's tables atomically.
    Nft,
    /// libnftables JSON, as `nft -j list ruleset` prints it.
    Json,
}

/// `--proxy-mode` of `dump` and `apply`: which backend's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyModeArg {
    Nftables,
    Iptables,
}

/// `--iptables-variant`: which iptables implementation the iptables mode uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// The one the node already uses (see src/iptables/detect.rs).
    Auto,
    Legacy,
    Nft,
}

/// The backend of a mode, on this node: for iptables, the variant given, or the one detected
/// (logged with why).
pub fn backend_mode(iptables: bool, variant: VariantArg) -> anyhow::Result<crate::backend::Mode> {
    use crate::iptables::{Variant, detect};
    let runner = crate::process::Runner::here();
    if !iptables {
        return Ok(crate::backend::Mode::nftables(runner));
    }
    let variant = match variant {
        VariantArg::Legacy => Variant::Legacy,
        VariantArg::Nft => Variant::Nft,
        VariantArg::Auto => {
            let (v, why) = detect::decide(&detect::evidence(&runner)).ok_or_else(|| {
                anyhow::anyhow!(
                    "iptables mode: neither iptables-legacy nor iptables-nft is installed"
                )
            })?;
            tracing::info!("using iptables-{v}: {why}");
            v
        }
    };
    Ok(crate::backend::Mode::iptables(runner, variant))
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
    #[arg(long, visible_alias = "hostname-override", value_name = "NAME")]
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
    /// How traffic from pods is recognised: ClusterCIDR (sources in --cluster-cidr), NodeCIDR
    /// (sources in the Node's spec.podCIDRs), InterfaceNamePrefix, BridgeInterface.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "ClusterCIDR",
        value_parser = clap::builder::PossibleValuesParser::new(crate::config::DETECT_LOCAL_MODES)
    )]
    pub detect_local_mode: String,
    /// With --detect-local-mode InterfaceNamePrefix: pods' interfaces start with this (`veth`).
    #[arg(long, value_name = "PREFIX", value_parser = crate::config::interface_name,
          required_if_eq("detect_local_mode", "InterfaceNamePrefix"))]
    pub pod_interface_name_prefix: Option<String>,
    /// With --detect-local-mode BridgeInterface: the bridge pods are attached to (`cbr0`).
    #[arg(long, value_name = "NAME", value_parser = crate::config::interface_name,
          required_if_eq("detect_local_mode", "BridgeInterface"))]
    pub pod_bridge_interface: Option<String>,
    /// The Service CIDR(s), used when the inputs hold no ServiceCIDR object: traffic to an
    /// address inside them that no Service holds is dropped.
    #[arg(long = "service-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub service_cidrs: Vec<IpNet>,
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
            detect_local: self.detect_local(),
            service_cidrs: self.service_cidrs.iter().map(IpNet::trunc).collect(),
            tcp_be_liberal: false,
        }
    }

    /// clap has checked the flags (a known mode, and the name it needs); a name given for
    /// another mode is not used, and said so.
    fn detect_local(&self) -> DetectLocal {
        let prefix = self.pod_interface_name_prefix.clone();
        let bridge = self.pod_bridge_interface.clone();
        let detect = match (self.detect_local_mode.as_str(), &prefix, &bridge) {
            ("NodeCIDR", _, _) => DetectLocal::NodeCidr,
            ("InterfaceNamePrefix", Some(p), _) => DetectLocal::InterfaceNamePrefix(p.clone()),
            ("BridgeInterface", _, Some(b)) => DetectLocal::BridgeInterface(b.clone()),
            _ => DetectLocal::ClusterCidr,
        };
        let mode = detect.mode_name();
        if prefix.is_some() && mode != "InterfaceNamePrefix" {
            tracing::warn!(
                "--pod-interface-name-prefix is not used with --detect-local-mode {mode}"
            );
        }
        if bridge.is_some() && mode != "BridgeInterface" {
            tracing::warn!("--pod-bridge-interface is not used with --detect-local-mode {mode}");
        }
        detect
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
    #[arg(long = "from", value_name = "PATH", num_args = 1.., required_unless_present_any = ["kubeconfig", "agent"])]
    pub from: Vec<PathBuf>,
    /// Read the cluster once through this kubeconfig instead of manifest files.
    #[arg(long, value_name = "PATH", conflicts_with = "from")]
    pub kubeconfig: Option<PathBuf>,
    /// Print what a running agent last applied (its metrics address, e.g. 127.0.0.1:10249):
    /// its snapshot and its configuration (the node options are then not used).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["from", "kubeconfig"])]
    pub agent: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Output format (nftables mode).
    #[arg(long, value_enum, default_value_t = Format::Nft)]
    pub format: Format,
    /// Which backend's rules to print: an `nft -f` script, or (iptables) each family's exact
    /// `iptables-restore --noflush` input.
    #[arg(long, value_enum, default_value_t = ProxyModeArg::Nftables)]
    pub proxy_mode: ProxyModeArg,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest files (YAML or JSON) or directories of them.
    #[arg(long = "from", value_name = "PATH", required = true, num_args = 1..)]
    pub from: Vec<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Which backend programs the kernel.
    #[arg(long, value_enum, default_value_t = ProxyModeArg::Nftables)]
    pub proxy_mode: ProxyModeArg,
    /// iptables mode: iptables-legacy, iptables-nft, or the one the node uses (auto).
    #[arg(long, value_enum, default_value_t = VariantArg::Auto)]
    pub iptables_variant: VariantArg,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// YAML or JSON manifests, or directories of them (as `apply`).
    #[arg(long = "from", value_name = "PATH", required = true, num_args = 1..)]
    pub from: Vec<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Which backend's rules to read back: svcproxy's nftables tables, or its iptables chains.
    #[arg(long, value_enum, default_value_t = ProxyModeArg::Nftables)]
    pub proxy_mode: ProxyModeArg,
    /// The iptables variant to read (iptables mode; default: detected, as `apply` does).
    #[arg(long, value_enum, default_value_t = VariantArg::Auto)]
    pub iptables_variant: VariantArg,
}

/// `svcproxy run`: kube-proxy's flags (by kube-proxy's names), over kube-proxy's configuration
/// file; a flag given wins over the file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), e.g. kube-proxy's
    /// ConfigMap.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kubeconfig to reach the apiserver (default: the file's clientConnection.kubeconfig, else
    /// $KUBECONFIG, else the in-cluster service account, else ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The node the proxy runs on (default: $NODE_NAME, else the host name).
    #[arg(long, visible_alias = "node", value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// The node's addresses, primary first (default: the Node object's).
    #[arg(long = "node-ip", value_name = "IP", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// `nftables` (default) or `iptables`.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// iptables mode: iptables-legacy, iptables-nft, or the one the node uses (auto).
    #[arg(long, value_enum, default_value_t = VariantArg::Auto)]
    pub iptables_variant: VariantArg,
    /// The cluster's pod network(s), comma-separated.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// The Service CIDR(s), comma-separated, used while the cluster has no ServiceCIDR objects
    /// (KubeProxyConfiguration has no such field).
    #[arg(long, value_name = "CIDRS")]
    pub service_cidr: Option<String>,
    /// Which local addresses answer NodePorts: `primary`, or comma-separated CIDRs.
    #[arg(long, value_name = "CIDRS|primary", value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<String>>,
    /// How traffic from pods is recognised: ClusterCIDR (default), NodeCIDR,
    /// InterfaceNamePrefix, BridgeInterface (`detectLocalMode`).
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// The pods' interface name prefix, for InterfaceNamePrefix (`detectLocal.interfaceNamePrefix`).
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// The pods' bridge, for BridgeInterface (`detectLocal.bridgeInterface`).
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// The packet mark bit (0-31) that flags packets for masquerading (default 14).
    #[arg(long, value_name = "BIT", allow_hyphen_values = true)]
    pub masquerade_bit: Option<i32>,
    /// At most one sync per this period (default 1s; 0: at once).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub min_sync_period: Option<String>,
    /// A full resync this often, repairing any drift (default 1h).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub sync_period: Option<String>,
    /// Where `/healthz` and `/livez` are served (default 0.0.0.0:10256; empty: nowhere).
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,
    /// Where Prometheus `/metrics` are served (default 127.0.0.1:10249; empty: nowhere).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,
    /// Delete svcproxy's tables and chains (both modes) and exit (as `kube-proxy --cleanup`).
    #[arg(long)]
    pub cleanup: bool,
    /// Write the effective configuration to this file and exit.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,
}

impl RunArgs {
    /// The file (if any) and the flags, resolved; an error names the value and the reason.
    pub fn settings(&self) -> Result<crate::config::Settings, crate::config::ConfigError> {
        let file = match &self.config {
            Some(p) => crate::config::read(p)?,
            None => Default::default(),
        };
        let flags = crate::config::FlagOverrides {
            mode: self.proxy_mode.clone(),
            hostname_override: self.hostname_override.clone(),
            kubeconfig: self.kubeconfig.clone(),
            cluster_cidr: self.cluster_cidr.clone(),
            service_cidr: self.service_cidr.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            masquerade_all: self.masquerade_all.then_some(true),
            masquerade_bit: self.masquerade_bit,
            healthz_bind_address: self.healthz_bind_address.clone(),
            metrics_bind_address: self.metrics_bind_address.clone(),
            sync_period: self.sync_period.clone(),
            min_sync_period: self.min_sync_period.clone(),
            detect_local_mode: self.detect_local_mode.clone(),
            pod_interface_name_prefix: self.pod_interface_name_prefix.clone(),
            pod_bridge_interface: self.pod_bridge_interface.clone(),
        };
        crate::config::resolve(&file, &flags)
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a KubeProxyConfiguration file and print the effective settings.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `svcproxy config check FILE`.
pub fn config_check(file: &Path) -> u8 {
    let settings =
        crate::config::read(file).and_then(|c| crate::config::resolve(&c, &Default::default()));
    match settings {
        Ok(s) => {
            for w in &s.warnings {
                tracing::warn!("{}: {w}", file.display());
            }
            print!("{}", crate::config::effective_yaml(&s));
            EXIT_OK
        }
        Err(e) => {
            tracing::error!("{e}");
            EXIT_NOTHING
        }
    }
}

/// The kube client configuration: `--kubeconfig`, else `$KUBECONFIG`/in-cluster/~/.kube.
async fn kube_config(path: Option<&PathBuf>) -> anyhow::Result<kube::Config> {
    use anyhow::Context;
    match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using {}", p.display()))
        }
        None => kube::Config::infer().await.context("finding a cluster"),
    }
}

/// A failure already logged where it happened (each problem of the manifests, with its file):
/// the command exits without logging it again.
#[derive(Debug, thiserror::Error)]
#[error("already reported")]
struct Reported;

/// Logs a command's failure (with its causes) unless it was reported already.
fn log_failure(e: &anyhow::Error) {
    if e.downcast_ref::<Reported>().is_none() {
        tracing::error!("{e:#}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `svcproxy run`.
pub fn run_agent(args: &RunArgs) -> u8 {
    // Everything is validated before anything touches the kernel.
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return EXIT_NOTHING;
        }
    };
    for w in &settings.warnings {
        tracing::warn!("configuration: {w}");
    }
    if let Some(path) = &args.write_config_to {
        return match std::fs::write(path, crate::config::effective_yaml(&settings)) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!("{}: {e}", path.display());
                EXIT_NOTHING
            }
        };
    }
    if args.cleanup {
        return cleanup();
    }
    for problem in crate::agent::sysctl::apply(&settings.conntrack) {
        tracing::warn!("conntrack setting not applied: {problem}");
    }
    let node_name = settings
        .hostname_override
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(hostname);
    let mut node_ips = args.node_ips.clone();
    if node_ips.is_empty()
        && let Some(ip) = settings.node_ip
    {
        node_ips.push(ip);
    }
    let iptables = settings.mode == crate::config::ProxyMode::Iptables;
    let backend = match backend_mode(iptables, args.iptables_variant) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("{e:#}");
            return EXIT_NOTHING;
        }
    };
    let rt = runtime();
    rt.block_on(async {
        let kube = match kube_config(settings.kubeconfig.as_ref()).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("{e:#}");
                return EXIT_NOTHING;
            }
        };
        let config = crate::agent::AgentConfig {
            kube,
            node_name,
            node_ips,
            proxy: settings.proxy.clone(),
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            healthz_address: settings.healthz_bind_address,
            metrics_address: settings.metrics_bind_address,
            health_check_address: std::net::Ipv4Addr::UNSPECIFIED.into(),
            backend,
            config_warnings: settings.warnings.len(),
        };
        tracing::info!(node = %config.node_name, mode = settings.mode.as_str(), "starting");
        match crate::agent::run_until_signalled(config).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!("{e}");
                EXIT_NOTHING
            }
        }
    })
}

/// Exit codes: everything was used / something was skipped / nothing usable was read.
pub const EXIT_OK: u8 = 0;
pub const EXIT_NOTHING: u8 = 1;
pub const EXIT_SKIPPED: u8 = 2;
/// `verify`: the kernel's tables differ from the plan.
pub const EXIT_DIFFERENT: u8 = 4;

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    run_as(cli, false)
}

/// Whether the program was started as the kubectl plugin `kubectl-svcproxy` (its file name):
/// then `trace` and `services` read the cluster through the current kubeconfig context unless
/// told otherwise, as kubectl users expect.
pub fn is_kubectl_plugin(argv0: &std::ffi::OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "kubectl-svcproxy")
}

/// [`run`], as the kubectl plugin when `plugin`.
pub fn run_as(cli: Cli, plugin: bool) -> u8 {
    match cli.command {
        Command::Trace(args) => trace(&args, plugin, &mut std::io::stdout().lock()),
        Command::Services(args) => services(&args, plugin, &mut std::io::stdout().lock()),
        Command::Dump(args) => dump(&args, &mut std::io::stdout().lock()),
        Command::Run(args) => run_agent(&args),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Apply(args) => apply(&args),
        Command::Cleanup => cleanup(),
        Command::Verify(args) => verify(&args, &mut std::io::stdout().lock()),
    }
}

/// The cluster read once through a kubeconfig (`None`: `kube::Config::infer`, the current
/// context), as a snapshot seen from the node; whether nothing was skipped.
fn read_cluster(path: Option<&PathBuf>, node_args: &NodeArgs) -> anyhow::Result<(Snapshot, bool)> {
    runtime().block_on(async {
        let config = kube_config(path).await?;
        let client = kube::Client::try_from(config)?;
        let (converted, problems) =
            crate::agent::fetch::cluster(client, &node_args.node_name()).await?;
        for e in &problems {
            tracing::warn!("skipped: {e}");
        }
        let mut notices = Vec::new();
        let node = node_args.node_info(&converted, &mut notices);
        for n in &notices {
            tracing::info!("{n}");
        }
        Ok::<_, anyhow::Error>((
            Snapshot {
                services: converted.services,
                slices: converted.slices,
                node,
                service_cidrs: converted.service_cidrs,
            },
            problems.is_empty(),
        ))
    })
}

/// The snapshot and configuration `trace` and `services` work on: from manifests, the cluster
/// or a running agent. The agent's answer carries its own configuration; otherwise the node
/// options give it.
fn load_input(
    input: &InputArgs,
    node_args: &NodeArgs,
    plugin: bool,
) -> anyhow::Result<(Snapshot, ProxyConfig, Option<String>)> {
    if let Some(addr) = &input.agent {
        return Ok(crate::agent::state::fetch(addr).map(|a| (a.snapshot, a.config, Some(a.mode)))?);
    }
    let config = node_args.proxy_config();
    let loaded = if let Some(path) = &input.kubeconfig {
        read_cluster(Some(path), node_args)
    } else if !input.from.is_empty() {
        load_snapshot(&input.from, node_args).map_err(|()| Reported.into())
    } else if plugin {
        read_cluster(None, node_args)
    } else {
        anyhow::bail!(
            "say where the cluster state comes from: --from PATH, --kubeconfig PATH or --agent ADDR"
        );
    };
    loaded.map(|(s, _)| (s, config, None))
}

fn print(out: &mut impl Write, text: &str) -> bool {
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            tracing::error!("writing the answer: {e}");
            false
        }
    }
}

/// `svcproxy trace`.
pub fn trace(args: &TraceArgs, plugin: bool, out: &mut impl Write) -> u8 {
    let (snapshot, config, agent_mode) = match load_input(&args.input, &args.node, plugin) {
        Ok(l) => l,
        Err(e) => {
            log_failure(&e);
            return EXIT_NOTHING;
        }
    };
    let family = crate::model::IpFamily::of(&args.destination.address);
    let source = if args.source == "node" {
        match snapshot.node.primary(family) {
            Some(ip) => ip,
            None => {
                tracing::error!(
                    "the node {} has no address of the destination's family (--node-ip, or its Node object)",
                    snapshot.node.name
                );
                return EXIT_NOTHING;
            }
        }
    } else {
        match args.source.parse() {
            Ok(ip) => ip,
            Err(_) => {
                tracing::error!("{:?} is not an IP address (or `node`)", args.source);
                return EXIT_NOTHING;
            }
        }
    };
    let query = crate::trace::Query {
        source,
        target: args.destination,
        iifname: args.iifname.clone(),
        backend: match (args.proxy_mode, agent_mode.as_deref()) {
            (Some(ProxyModeArg::Iptables), _) | (None, Some("iptables")) => {
                crate::trace::Backend::Iptables
            }
            _ => crate::trace::Backend::Nftables,
        },
    };
    let t = match crate::trace::trace_snapshot(&snapshot, &config, &query) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_NOTHING;
        }
    };
    let text = match args.output {
        Output::Text => t.to_string(),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(&t).expect("a trace serializes");
            s.push('\n');
            s
        }
    };
    if !print(out, &text) {
        return EXIT_NOTHING;
    }
    t.verdict.exit_code()
}

/// `svcproxy services`.
pub fn services(args: &ServicesArgs, plugin: bool, out: &mut impl Write) -> u8 {
    let (snapshot, config, _) = match load_input(&args.input, &args.node, plugin) {
        Ok(l) => l,
        Err(e) => {
            log_failure(&e);
            return EXIT_NOTHING;
        }
    };
    let table = crate::services::services(&snapshot, &config);
    let text = match args.output {
        Output::Text => table.to_string(),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(&table).expect("a table serializes");
            s.push('\n');
            s
        }
    };
    if !print(out, &text) {
        return EXIT_NOTHING;
    }
    EXIT_OK
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
        service_cidrs: std::mem::take(&mut loaded.converted.service_cidrs),
    };
    Ok((snapshot, loaded.errors.is_empty()))
}

/// `svcproxy apply`: manifests → ruleset → kernel, in one transaction.
pub fn apply(args: &ApplyArgs) -> u8 {
    let Ok((snapshot, clean)) = load_snapshot(&args.from, &args.node) else {
        return EXIT_NOTHING;
    };
    let plan = crate::plan::plan(&snapshot, &args.node.proxy_config());
    for c in &plan.conflicts {
        tracing::warn!("skipped: {c}");
    }
    let iptables = args.proxy_mode == ProxyModeArg::Iptables;
    let mode = match backend_mode(iptables, args.iptables_variant) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("{e:#}");
            return EXIT_NOTHING;
        }
    };
    let mut backend = crate::backend::OneShot::new(mode);
    match backend.apply_full(&plan) {
        Ok(report) => {
            tracing::info!(
                kind = report.kind.as_str(),
                backend = backend.mode().name(),
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

/// `svcproxy cleanup`: delete svcproxy's nftables tables, and its iptables chains and jump
/// rules in both variants and both families. A tool that is not installed has nothing to clean.
pub fn cleanup() -> u8 {
    let mut code = EXIT_OK;
    let tables = [("ip", crate::nft::TABLE), ("ip6", crate::nft::TABLE)];
    let nft = crate::nft::apply::NftCommand::default();
    if nft.installed() {
        match crate::nft::apply::cleanup(&nft, &tables) {
            Ok(()) => tracing::info!("deleted tables ip {0} and ip6 {0}", crate::nft::TABLE),
            Err(e) => {
                tracing::error!("cleanup of the nftables tables failed: {e}");
                code = EXIT_NOTHING;
            }
        }
    }
    match crate::iptables::apply::cleanup(&nft.runner, &crate::iptables::Variant::ALL) {
        Ok(c) if c.chains + c.jumps > 0 => tracing::info!(
            chains = c.chains,
            jump_rules = c.jumps,
            "deleted svcproxy's iptables chains: {}",
            c.places.join(", ")
        ),
        Ok(_) => tracing::info!("no svcproxy iptables chains"),
        Err(e) => {
            tracing::error!("cleanup of the iptables chains failed: {e}");
            code = EXIT_NOTHING;
        }
    }
    code
}

/// `svcproxy dump`: manifests → model → plan → nftables, printed to `out`. Problems go to the
/// log (stderr), each naming the file, the object and the field.
pub fn dump(args: &DumpArgs, out: &mut impl Write) -> u8 {
    let mut config = args.node.proxy_config();
    let loaded = match (&args.agent, &args.kubeconfig) {
        (Some(addr), _) => crate::agent::state::fetch(addr)
            .map(|a| {
                config = a.config;
                (a.snapshot, true)
            })
            .map_err(anyhow::Error::from),
        (None, Some(path)) => read_cluster(Some(path), &args.node),
        (None, None) => load_snapshot(&args.from, &args.node).map_err(|()| Reported.into()),
    };
    let (snapshot, clean) = match loaded {
        Ok(l) => l,
        Err(e) => {
            log_failure(&e);
            return EXIT_NOTHING;
        }
    };
    let (plan, ruleset) = crate::compile(&snapshot, &config);
    for c in &plan.conflicts {
        tracing::warn!("skipped: {c}");
    }
    let text = match (args.proxy_mode, args.format) {
        (ProxyModeArg::Iptables, Format::Nft) => crate::iptables::render(&plan).dump(),
        (ProxyModeArg::Iptables, Format::Json) => {
            tracing::error!("--format json is for the nftables mode");
            return EXIT_NOTHING;
        }
        (ProxyModeArg::Nftables, Format::Nft) => ruleset.script(),
        (ProxyModeArg::Nftables, Format::Json) => {
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

/// `svcproxy verify`: the plan of the manifests against the kernel's tables, one line per
/// difference on `out`.
pub fn verify(args: &VerifyArgs, out: &mut impl Write) -> u8 {
    let Ok((snapshot, _clean)) = load_snapshot(&args.from, &args.node) else {
        return EXIT_NOTHING;
    };
    let plan = crate::plan::plan(&snapshot, &args.node.proxy_config());
    for c in &plan.conflicts {
        tracing::warn!("skipped: {c}");
    }
    let iptables = args.proxy_mode == ProxyModeArg::Iptables;
    let result = match backend_mode(iptables, args.iptables_variant) {
        Ok(mode) => mode.verify(&plan),
        Err(e) => {
            tracing::error!("{e:#}");
            return EXIT_NOTHING;
        }
    };
    let differences = match result {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("reading the kernel's tables: {e}");
            return EXIT_NOTHING;
        }
    };
    let mut text = String::new();
    for d in &differences {
        text.push_str(&d.to_string());
        text.push('\n');
    }
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        tracing::error!("writing the differences: {e}");
        return EXIT_NOTHING;
    }
    if differences.is_empty() {
        tracing::info!("the kernel holds exactly the plan's rules");
        EXIT_OK
    } else {
        tracing::warn!(
            "{} differences between the kernel and the plan",
            differences.len()
        );
        EXIT_DIFFERENT
    }
}
