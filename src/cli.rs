//! The command line: arguments (clap) and the commands behind them.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::convert::Converted;
use crate::manifests;
use crate::model::{NodeInfo, NodePortAddresses, ProxyConfig, Snapshot};

/// svcproxy: Kubernetes Services on this node, programmed into nftables.
#[derive(Debug, Parser)]
#[command(name = "svcproxy", version, about)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    #[arg(long = "from", value_name = "PATH", num_args = 1.., required_unless_present = "kubeconfig")]
    pub from: Vec<PathBuf>,
    /// Read the cluster once through this kubeconfig instead of manifest files.
    #[arg(long, value_name = "PATH", conflicts_with = "from")]
    pub kubeconfig: Option<PathBuf>,
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

/// `--min-sync-period 1s`, `--sync-period 1h`: Go-style durations, as kube-proxy takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl FromStr for GoDuration {
    type Err = String;

    /// `0`, or a sequence of numbers with units: `1h30m`, `500ms`, `1.5s` (ns, us, ms, s, m, h).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        if s.starts_with('-') {
            return Err(format!("{s:?}: a duration cannot be negative"));
        }
        let mut total = 0f64;
        let mut rest = s;
        if rest.is_empty() {
            return Err("empty duration".into());
        }
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let unit_len = rest[num_len..]
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len() - num_len);
            let (num, unit) = (&rest[..num_len], &rest[num_len..num_len + unit_len]);
            let n: f64 = num
                .parse()
                .map_err(|_| format!("{s:?} is not a duration (e.g. 1s, 500ms, 1h30m)"))?;
            let scale = match unit {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(format!("{s:?} is not a duration (e.g. 1s, 500ms, 1h30m)")),
            };
            total += n * scale;
            rest = &rest[num_len + unit_len..];
        }
        Ok(GoDuration(Duration::from_secs_f64(total)))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kubeconfig to reach the apiserver (default: $KUBECONFIG, else the in-cluster service
    /// account, else ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// At most one sync per this period: changes arriving meanwhile are coalesced (0: at once).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub min_sync_period: GoDuration,
    /// A full resync this often, which repairs any drift of the kernel's rules.
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub sync_period: GoDuration,
    /// Where `/healthz` and `/livez` are served (empty: nowhere).
    #[arg(long, default_value = "0.0.0.0:10256", value_name = "IP:PORT")]
    pub healthz_bind_address: String,
    /// Where Prometheus `/metrics` are served (empty: nowhere).
    #[arg(long, default_value = "127.0.0.1:10249", value_name = "IP:PORT")]
    pub metrics_bind_address: String,
}

fn bind_address(flag: &str, value: &str) -> Result<Option<SocketAddr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| format!("--{flag} {value:?}: expected IP:PORT"))
}

/// The kube client configuration: `--kubeconfig`, else `$KUBECONFIG`/in-cluster/~/.kube.
async fn kube_config(path: Option<&PathBuf>) -> Result<kube::Config, String> {
    match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("reading {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("using {}: {e}", p.display()))
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("finding a cluster: {e}")),
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
    let rt = runtime();
    rt.block_on(async {
        let healthz = bind_address("healthz-bind-address", &args.healthz_bind_address);
        let metrics = bind_address("metrics-bind-address", &args.metrics_bind_address);
        let (healthz, metrics) = match (healthz, metrics) {
            (Ok(h), Ok(m)) => (h, m),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("{e}");
                return EXIT_NOTHING;
            }
        };
        let kube = match kube_config(args.kubeconfig.as_ref()).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("{e}");
                return EXIT_NOTHING;
            }
        };
        let config = crate::agent::AgentConfig {
            kube,
            node_name: args.node.node_name(),
            node_ips: args.node.node_ips.clone(),
            proxy: args.node.proxy_config(),
            min_sync_period: args.min_sync_period.0,
            sync_period: args.sync_period.0,
            healthz_address: healthz,
            metrics_address: metrics,
            health_check_address: std::net::Ipv4Addr::UNSPECIFIED.into(),
            nft: Default::default(),
            conntrack: Default::default(),
        };
        tracing::info!(node = %config.node_name, "starting");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping; the rules stay in place");
            let _ = stop_tx.send(true);
        });
        match crate::agent::run(config, stop_rx, None).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!("{e}");
                EXIT_NOTHING
            }
        }
    })
}

/// Reads Services, EndpointSlices and this node's Node from the cluster, once.
pub async fn fetch_cluster(
    client: kube::Client,
    node_name: &str,
) -> Result<Converted, kube::Error> {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, ListParams};
    let mut converted = Converted::default();
    for svc in Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        if let Err(e) = converted.add_service(&svc) {
            tracing::warn!("skipped: {e}");
        }
    }
    for slice in Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        if let Err(e) = converted.add_slice(&slice) {
            tracing::warn!("skipped: {e}");
        }
    }
    if let Some(node) = Api::<Node>::all(client).get_opt(node_name).await? {
        for e in converted.add_node(&node) {
            tracing::warn!("skipped: {e}");
        }
    }
    Ok(converted)
}

/// Exit codes: everything was used / something was skipped / nothing usable was read.
pub const EXIT_OK: u8 = 0;
pub const EXIT_NOTHING: u8 = 1;
pub const EXIT_SKIPPED: u8 = 2;

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Dump(args) => dump(&args, &mut std::io::stdout().lock()),
        Command::Run(args) => run_agent(&args),
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
    let loaded = match &args.kubeconfig {
        Some(path) => runtime().block_on(async {
            let config = kube_config(Some(path)).await?;
            let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
            let converted = fetch_cluster(client, &args.node.node_name())
                .await
                .map_err(|e| e.to_string())?;
            let mut notices = Vec::new();
            let node = args.node.node_info(&converted, &mut notices);
            Ok::<_, String>((
                Snapshot {
                    services: converted.services,
                    slices: converted.slices,
                    node,
                },
                true,
            ))
        }),
        None => load_snapshot(&args.from, &args.node).map_err(|()| String::new()),
    };
    let (snapshot, clean) = match loaded {
        Ok(l) => l,
        Err(e) => {
            if !e.is_empty() {
                tracing::error!("{e}");
            }
            return EXIT_NOTHING;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s: &str| s.parse::<GoDuration>().map(|d| d.0);
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(d("-1s").unwrap_err().contains("negative"));
        assert!(d("10").is_err(), "a unit is required");
        assert!(d("1d").is_err());
        assert!(d("").is_err());
    }
}
