//! kube-proxy's own configuration file, `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), so that an operator can point svcproxy at the
//! ConfigMap kube-proxy used.
//!
//! Every field kube-proxy has is known here: the ones that apply are honoured, the ones that do
//! not (IPVS, Windows, profiling, …) are accepted, with one warning each when set to anything but
//! their zero value, and a field that is not kube-proxy's at all (a misspelling) is an error
//! naming it and its line. Values are validated before anything touches the kernel.
//!
//! Zero and null mean what kube-proxy's defaulting (`pkg/proxy/apis/config/v1alpha1/
//! defaults.go`) makes of them, because that is how kubeadm writes the file: every field, most
//! of them `0s`, `""` or `null`. A file kubeadm wrote therefore starts with no warnings and
//! kube-proxy's defaults.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::{DetectLocal, NodePortAddresses, ProxyConfig};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A configuration problem: the file cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors and unknown (misspelled) fields, with their line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {value:?}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

fn invalid(field: &str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The file, as kube-proxy's v1alpha1 schema has it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesConfig>,
    pub ipvs: Option<Value>,
    pub nftables: Option<NftablesConfig>,
    pub winkernel: Option<Value>,
    pub windows: Option<Value>,
    pub linux: Option<LinuxConfig>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocalConfig>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<ConntrackConfig>,
    pub config_sync_period: Option<String>,
    pub port_range: Option<String>,
    pub logging: Option<Value>,
    pub windows_run_as_service: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocalConfig {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NftablesConfig {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IptablesConfig {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LinuxConfig {
    pub conntrack: Option<ConntrackConfig>,
    pub masquerade_all: Option<bool>,
    pub oom_score_adj: Option<i32>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConntrackConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_core: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_established_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_close_wait_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_be_liberal: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_stream_timeout: Option<String>,
}

/// Reads and parses a configuration file (without resolving it). The file may also be
/// kube-proxy's ConfigMap itself: its `config.conf` is read then.
pub fn read(path: &Path) -> Result<KubeProxyConfiguration, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if let Ok(cm) = serde_saphyr::from_str::<k8s_openapi::api::core::v1::ConfigMap>(&text)
        && text.contains("kind: ConfigMap")
    {
        let Some(conf) = cm.data.as_ref().and_then(|d| d.get("config.conf")) else {
            return Err(invalid(
                "data",
                "config.conf",
                "a ConfigMap holding no `config.conf` key",
            ));
        };
        return parse(&path.join("data/config.conf"), conf);
    }
    parse(path, &text)
}

/// Parses a configuration text; `path` names it in messages.
pub fn parse(path: &Path, text: &str) -> Result<KubeProxyConfiguration, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.with_snippet = false;
    let cfg: KubeProxyConfiguration =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if let Some(v) = &cfg.api_version
        && v != API_VERSION
    {
        return Err(invalid("apiVersion", v, format!("expected {API_VERSION}")));
    }
    if let Some(k) = &cfg.kind
        && k != KIND
    {
        return Err(invalid("kind", k, format!("expected {KIND}")));
    }
    Ok(cfg)
}

/// Which backend programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Nftables,
    /// iptables (legacy or nft variant, detected), for nodes where nftables cannot be used.
    Iptables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }
}

/// A conntrack sysctl kube-proxy sets, and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub name: &'static str,
    pub value: u64,
}

/// The settings the agent runs with, resolved from the file and the flags (flags win).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: ProxyMode,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub proxy: ProxyConfig,
    /// `bindAddress`, when it names one address: the node's primary IP.
    pub node_ip: Option<IpAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub conntrack: Vec<Sysctl>,
    /// The `conntrack` section as given (for the effective configuration).
    pub conntrack_config: ConntrackConfig,
    pub feature_gates: BTreeMap<String, bool>,
    /// One line per accepted-but-ignored field, unknown feature gate, or unsupported mode.
    pub warnings: Vec<String>,
}

/// What the command line says, each `None` when not given (so that the file's value stands).
#[derive(Debug, Clone, Default)]
pub struct FlagOverrides {
    pub mode: Option<String>,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub cluster_cidr: Option<String>,
    /// `--service-cidr` (no field in the file).
    pub service_cidr: Option<String>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub detect_local_mode: Option<String>,
    pub pod_interface_name_prefix: Option<String>,
    pub pod_bridge_interface: Option<String>,
}

/// Feature gates of kube-proxy that svcproxy knows of (accepted; none changes its behaviour).
const KNOWN_FEATURE_GATES: &[&str] = &[
    "NFTablesProxyMode",
    "MultiCIDRServiceAllocator",
    "ServiceTrafficDistribution",
    "TopologyAwareHints",
    "ProxyTerminatingEndpoints",
    "LoadBalancerIPMode",
    "KubeProxyDrainingTerminatingNodes",
    "PreferSameTrafficDistribution",
    "AllAlpha",
    "AllBeta",
];

/// svcproxy's full resync period when none is configured (kube-proxy's is 30s; a full sync here
/// rewrites everything, so it is only a drift repair).
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(3600);
/// kube-proxy's `minSyncPeriod` default.
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);

/// The modes of kube-proxy's `detectLocalMode`.
pub const DETECT_LOCAL_MODES: [&str; 4] = [
    "ClusterCIDR",
    "NodeCIDR",
    "InterfaceNamePrefix",
    "BridgeInterface",
];

/// Why a text cannot be an interface name or prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceNameError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than an interface name (15 bytes)")]
    TooLong,
    #[error("{0:?} cannot be part of an interface name")]
    Character(char),
}

/// An interface name or prefix as `detectLocal` takes it. Beyond kube-proxy's check (not
/// empty), it must fit in a Linux interface name (15 bytes) and hold no character that the
/// nftables and iptables spellings give a meaning (quotes, blanks, the `*`/`+` wildcards).
pub fn interface_name(text: &str) -> Result<String, InterfaceNameError> {
    if text.is_empty() {
        return Err(InterfaceNameError::Empty);
    }
    if text.len() > 15 {
        return Err(InterfaceNameError::TooLong);
    }
    if let Some(c) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '*' | '+' | '/'))
    {
        return Err(InterfaceNameError::Character(c));
    }
    Ok(text.to_string())
}

/// `detectLocalMode` with the `detectLocal` setting it needs, validated as kube-proxy does
/// (unset or empty: `ClusterCIDR`; `InterfaceNamePrefix` and `BridgeInterface` need their
/// name). A name given for another mode is not used: that is a warning.
pub fn detect_local(
    mode: Option<&str>,
    prefix: Option<&str>,
    bridge: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<DetectLocal, ConfigError> {
    let prefix = prefix.filter(|p| !p.is_empty());
    let bridge = bridge.filter(|b| !b.is_empty());
    let named = |field: &str, mode: &str, value: Option<&str>| match value {
        Some(v) => interface_name(v).map_err(|reason| invalid(field, v, reason.to_string())),
        None => Err(invalid(
            field,
            "",
            format!("must be set when detectLocalMode is {mode}"),
        )),
    };
    let detect = match mode.unwrap_or("") {
        "" | "ClusterCIDR" => DetectLocal::ClusterCidr,
        "NodeCIDR" => DetectLocal::NodeCidr,
        "InterfaceNamePrefix" => DetectLocal::InterfaceNamePrefix(named(
            "detectLocal.interfaceNamePrefix",
            "InterfaceNamePrefix",
            prefix,
        )?),
        "BridgeInterface" => DetectLocal::BridgeInterface(named(
            "detectLocal.bridgeInterface",
            "BridgeInterface",
            bridge,
        )?),
        other => {
            return Err(invalid(
                "detectLocalMode",
                other,
                format!("expected one of {}", DETECT_LOCAL_MODES.join(", ")),
            ));
        }
    };
    if prefix.is_some() && !matches!(detect, DetectLocal::InterfaceNamePrefix(_)) {
        warnings.push(format!(
            "detectLocal.interfaceNamePrefix: used only with detectLocalMode InterfaceNamePrefix \
             (the mode is {}); ignored",
            detect.mode_name()
        ));
    }
    if bridge.is_some() && !matches!(detect, DetectLocal::BridgeInterface(_)) {
        warnings.push(format!(
            "detectLocal.bridgeInterface: used only with detectLocalMode BridgeInterface \
             (the mode is {}); ignored",
            detect.mode_name()
        ));
    }
    Ok(detect)
}

/// Parses a Go duration (`1h0m0s`, `500ms`); negative durations are refused.
pub fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    text.parse::<crate::duration::GoDuration>()
        .map(|d| d.0)
        .map_err(|reason| invalid(field, text, reason.to_string()))
}

/// A duration field of the file: `None` when unset, null or zero, which kube-proxy's defaulting
/// replaces by the default.
fn file_duration(field: &str, text: Option<&String>) -> Result<Option<Duration>, ConfigError> {
    match text {
        None => Ok(None),
        Some(t) => Ok(Some(duration(field, t)?).filter(|d| !d.is_zero())),
    }
}

/// Whether a value is its type's zero value as Go marshals it (`false`, `0`, `""`, `"0s"`,
/// `"0"`, null, and lists and objects of nothing else): what kubeadm writes for a field nobody
/// set.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(t) => {
            t.is_empty()
                || t.parse::<crate::duration::GoDuration>()
                    .is_ok_and(|d| d.0.is_zero())
        }
        Value::Array(items) => items.iter().all(is_zero),
        Value::Object(fields) => fields.values().all(is_zero),
    }
}

/// The same for a typed section: its fields, as JSON.
fn section_is_zero(v: &impl serde::Serialize) -> bool {
    serde_json::to_value(v).is_ok_and(|v| is_zero(&v))
}

fn bind(field: &str, text: &str, default_port: u16) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Some(SocketAddr::new(ip, default_port)));
    }
    // Port numbers out of range, or not numbers, fail here with the value named.
    text.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| invalid(field, text, "expected IP:PORT with a port from 0 to 65535"))
}

fn cidrs(field: &str, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            // Read as kube-proxy reads it (ParseCIDRSloppy: leading zeros are decimal).
            crate::convert::parse_cidr(p)
                .map(|n| n.trunc())
                .ok_or_else(|| invalid(field, p, "not a CIDR (e.g. 10.244.0.0/16)"))
        })
        .collect()
}

/// Resolves a configuration (the file's, or the default when there is none) and the flags
/// into the settings the agent runs with.
pub fn resolve(
    file: &KubeProxyConfiguration,
    flags: &FlagOverrides,
) -> Result<Settings, ConfigError> {
    let mut warnings = Vec::new();
    // A field svcproxy does not use is warned about only when set to something other than its
    // zero value: kubeadm writes every field, zero when nobody set it.
    let mut ignored = |field: &str, set: bool| {
        if set {
            warnings.push(format!("{field}: accepted but not used by svcproxy"));
        }
    };
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !is_zero(v));
    ignored("ipvs", set(&file.ipvs));
    ignored("winkernel", set(&file.winkernel));
    ignored("windows", set(&file.windows));
    ignored(
        "windowsRunAsService",
        file.windows_run_as_service == Some(true),
    );
    ignored("logging", set(&file.logging));
    ignored("enableProfiling", file.enable_profiling == Some(true));
    ignored(
        "showHiddenMetricsForVersion",
        file.show_hidden_metrics_for_version
            .as_deref()
            .is_some_and(|v| !v.is_empty()),
    );
    ignored(
        "bindAddressHardFail",
        file.bind_address_hard_fail == Some(true),
    );
    ignored("oomScoreAdj", file.oom_score_adj.is_some_and(|v| v != 0));
    ignored(
        "linux.oomScoreAdj",
        file.linux
            .as_ref()
            .is_some_and(|l| l.oom_score_adj.is_some_and(|v| v != 0)),
    );
    ignored(
        "configSyncPeriod",
        file.config_sync_period
            .as_ref()
            .is_some_and(|t| !is_zero(&Value::String(t.clone()))),
    );
    ignored(
        "portRange",
        file.port_range.as_deref().is_some_and(|p| !p.is_empty()),
    );
    if let Some(cc) = &file.client_connection {
        ignored(
            "clientConnection.acceptContentTypes",
            cc.accept_content_types
                .as_deref()
                .is_some_and(|v| !v.is_empty()),
        );
        ignored(
            "clientConnection.contentType",
            cc.content_type.as_deref().is_some_and(|v| !v.is_empty()),
        );
        ignored("clientConnection.qps", cc.qps.is_some_and(|v| v != 0.0));
        ignored("clientConnection.burst", cc.burst.is_some_and(|v| v != 0));
    }
    let mode_text = flags
        .mode
        .clone()
        .or_else(|| file.mode.clone())
        .unwrap_or_default();
    let mode = match mode_text.as_str() {
        "" | "nftables" => ProxyMode::Nftables,
        "iptables" => ProxyMode::Iptables,
        other => {
            return Err(invalid(
                "mode",
                other,
                "svcproxy supports nftables and iptables",
            ));
        }
    };
    // Each mode reads its own section, as kube-proxy does; the other one is accepted and unused.
    let section = mode.as_str();
    let nft = match mode {
        ProxyMode::Nftables => {
            ignored(
                "iptables",
                file.iptables.as_ref().is_some_and(|s| !section_is_zero(s)),
            );
            file.nftables.clone().unwrap_or_default()
        }
        ProxyMode::Iptables => {
            ignored(
                "nftables",
                file.nftables.as_ref().is_some_and(|s| !section_is_zero(s)),
            );
            let ipt = file.iptables.clone().unwrap_or_default();
            if ipt.localhost_node_ports == Some(true) {
                warnings.push(
                    "iptables.localhostNodePorts: NodePorts never answer on loopback in svcproxy"
                        .into(),
                );
            }
            if ipt.snat_node_internal_ip == Some(true) {
                warnings
                    .push("iptables.snatNodeInternalIP: accepted but not used by svcproxy".into());
            }
            NftablesConfig {
                masquerade_all: ipt.masquerade_all,
                masquerade_bit: ipt.masquerade_bit,
                sync_period: ipt.sync_period,
                min_sync_period: ipt.min_sync_period,
            }
        }
    };

    let file_detect = file.detect_local.clone().unwrap_or_default();
    let detect_local = detect_local(
        flags
            .detect_local_mode
            .as_deref()
            .or(file.detect_local_mode.as_deref()),
        flags
            .pod_interface_name_prefix
            .as_deref()
            .or(file_detect.interface_name_prefix.as_deref()),
        flags
            .pod_bridge_interface
            .as_deref()
            .or(file_detect.bridge_interface.as_deref()),
        &mut warnings,
    )?;

    let linux = file.linux.clone().unwrap_or_default();
    let cluster_cidrs = match flags.cluster_cidr.as_ref().or(file.cluster_cidr.as_ref()) {
        Some(text) => cidrs("clusterCIDR", text)?,
        None => Vec::new(),
    };
    let nodeport_addresses = match flags
        .nodeport_addresses
        .as_ref()
        .or(file.node_port_addresses.as_ref())
    {
        None => NodePortAddresses::All,
        Some(list) if list.is_empty() => NodePortAddresses::All,
        Some(list) if list.len() == 1 && list[0] == "primary" => NodePortAddresses::Primary,
        Some(list) => {
            let mut nets = Vec::new();
            for item in list {
                if item == "primary" {
                    return Err(invalid(
                        "nodePortAddresses",
                        item,
                        "`primary` must be the only entry",
                    ));
                }
                nets.extend(cidrs("nodePortAddresses", item)?);
            }
            NodePortAddresses::Cidrs(nets)
        }
    };
    let masquerade_bit = flags.masquerade_bit.or(nft.masquerade_bit).unwrap_or(14);
    if !(0..=31).contains(&masquerade_bit) {
        return Err(invalid(
            &format!("{section}.masqueradeBit"),
            masquerade_bit,
            "must be from 0 to 31",
        ));
    }
    let masquerade_all = flags
        .masquerade_all
        .or(nft.masquerade_all)
        .or(linux.masquerade_all)
        .unwrap_or(false);

    let node_ip = match file.bind_address.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => {
            let ip: IpAddr = crate::convert::parse_ip(text)
                .ok_or_else(|| invalid("bindAddress", text, "not an IP address"))?;
            (!ip.is_unspecified()).then_some(ip)
        }
    };
    // kube-proxy's defaults follow bindAddress's family; an empty address in the file is the
    // default (an empty flag means: serve nowhere).
    let ipv6 = file
        .bind_address
        .as_deref()
        .and_then(|t| crate::convert::parse_ip(t.trim()))
        .is_some_and(|ip| ip.is_ipv6());
    let (healthz_default, metrics_default) = if ipv6 {
        ("[::]:10256", "[::1]:10249")
    } else {
        ("0.0.0.0:10256", "127.0.0.1:10249")
    };
    let in_file = |v: &Option<String>| v.clone().filter(|t| !t.trim().is_empty());
    let healthz = flags
        .healthz_bind_address
        .clone()
        .or(in_file(&file.healthz_bind_address))
        .unwrap_or_else(|| healthz_default.into());
    let metrics = flags
        .metrics_bind_address
        .clone()
        .or(in_file(&file.metrics_bind_address))
        .unwrap_or_else(|| metrics_default.into());
    // The file's zero means the default (kube-proxy's defaulting); a flag means what it says.
    // svcproxy's full-resync default is 1h, not kube-proxy's 30s: see the README.
    let sync_field = format!("{section}.syncPeriod");
    let sync_period = match &flags.sync_period {
        Some(t) => {
            let d = duration("--sync-period", t)?;
            if d.is_zero() {
                return Err(invalid("--sync-period", t, "must be greater than zero"));
            }
            d
        }
        None => {
            file_duration(&sync_field, nft.sync_period.as_ref())?.unwrap_or(DEFAULT_SYNC_PERIOD)
        }
    };
    let min_sync_period = match &flags.min_sync_period {
        Some(t) => duration("--min-sync-period", t)?,
        None => file_duration(
            &format!("{section}.minSyncPeriod"),
            nft.min_sync_period.as_ref(),
        )?
        .unwrap_or(DEFAULT_MIN_SYNC_PERIOD),
    };

    let mut conntrack_cfg = file
        .conntrack
        .clone()
        .or(linux.conntrack)
        .unwrap_or_default();
    // kube-proxy's defaults for what is unset (null); a zero leaves the kernel's value alone.
    conntrack_cfg.max_per_core.get_or_insert(32 * 1024);
    conntrack_cfg.min.get_or_insert(128 * 1024);
    conntrack_cfg
        .tcp_established_timeout
        .get_or_insert_with(|| "24h0m0s".into());
    conntrack_cfg
        .tcp_close_wait_timeout
        .get_or_insert_with(|| "1h0m0s".into());
    let conntrack = conntrack_sysctls(
        &conntrack_cfg,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )?;

    let feature_gates = file.feature_gates.clone().unwrap_or_default();
    for (gate, on) in &feature_gates {
        // GA and locked on in kube-proxy 1.35, which refuses to start with it off.
        if gate == "PreferSameTrafficDistribution" && !on {
            return Err(invalid(
                "featureGates.PreferSameTrafficDistribution",
                "false",
                "the feature is GA and cannot be turned off (node hints are always followed)",
            ));
        }
        if !KNOWN_FEATURE_GATES.contains(&gate.as_str()) {
            warnings.push(format!("featureGates.{gate}: unknown to svcproxy, ignored"));
        }
    }

    Ok(Settings {
        mode,
        hostname_override: flags
            .hostname_override
            .clone()
            .or(file.hostname_override.clone())
            .filter(|h| !h.is_empty()),
        kubeconfig: flags.kubeconfig.clone().or_else(|| {
            file.client_connection
                .as_ref()
                .and_then(|c| c.kubeconfig.clone())
                .filter(|k| !k.is_empty())
                .map(PathBuf::from)
        }),
        proxy: ProxyConfig {
            cluster_cidrs,
            nodeport_addresses,
            masquerade_all,
            masquerade_bit: masquerade_bit as u8,
            detect_local,
            service_cidrs: match &flags.service_cidr {
                Some(text) => cidrs("--service-cidr", text)?,
                None => Vec::new(),
            },
            tcp_be_liberal: conntrack_cfg.tcp_be_liberal == Some(true),
        },
        node_ip,
        healthz_bind_address: bind("healthzBindAddress", &healthz, 10256)?,
        metrics_bind_address: bind("metricsBindAddress", &metrics, 10249)?,
        sync_period,
        min_sync_period,
        conntrack,
        conntrack_config: conntrack_cfg,
        feature_gates,
        warnings,
    })
}

/// The sysctls kube-proxy sets from `conntrack`: the table size and TCP/UDP timeouts.
fn conntrack_sysctls(c: &ConntrackConfig, cores: usize) -> Result<Vec<Sysctl>, ConfigError> {
    let mut out = Vec::new();
    let nonneg = |field: &str, v: i64| {
        u64::try_from(v).map_err(|_| invalid(field, v, "must not be negative"))
    };
    let per_core = c
        .max_per_core
        .map(|v| nonneg("conntrack.maxPerCore", v))
        .transpose()?
        .unwrap_or(0);
    let min = c
        .min
        .map(|v| nonneg("conntrack.min", v))
        .transpose()?
        .unwrap_or(0);
    // kube-proxy: max(maxPerCore × cores, min); 0 for maxPerCore leaves the limit alone.
    if per_core > 0 {
        out.push(Sysctl {
            name: "net/netfilter/nf_conntrack_max",
            value: per_core.saturating_mul(cores as u64).max(min),
        });
    }
    let secs = |field: &str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(t) => {
                // Zero (and anything under a second, which the sysctl cannot hold) leaves the
                // kernel's value alone.
                let d = duration(field, t)?;
                Ok(Some(d.as_secs()).filter(|s| *s > 0))
            }
        }
    };
    for (name, field, value) in [
        (
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            "conntrack.tcpEstablishedTimeout",
            &c.tcp_established_timeout,
        ),
        (
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            "conntrack.tcpCloseWaitTimeout",
            &c.tcp_close_wait_timeout,
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout",
            "conntrack.udpTimeout",
            &c.udp_timeout,
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            "conntrack.udpStreamTimeout",
            &c.udp_stream_timeout,
        ),
    ] {
        if let Some(v) = secs(field, value)? {
            out.push(Sysctl { name, value: v });
        }
    }
    if c.tcp_be_liberal == Some(true) {
        out.push(Sysctl {
            name: "net/netfilter/nf_conntrack_tcp_be_liberal",
            value: 1,
        });
    }
    Ok(out)
}

/// A duration as Go prints one (`1h0m0s`, `1m30s`, `1.5s`, `500ms`), as kube-proxy writes them:
/// exactly, to the nanosecond.
fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    // `value` in units of `unit` nanoseconds (a power of ten), with the fraction Go prints.
    let decimal = |value: u128, unit: u128| {
        let (int, rem) = (value / unit, value % unit);
        if rem == 0 {
            return int.to_string();
        }
        let width = unit.to_string().len() - 1;
        let frac = format!("{rem:0width$}");
        format!("{int}.{}", frac.trim_end_matches('0'))
    };
    match ns {
        0 => "0s".into(),
        1..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{}µs", decimal(ns, 1_000)),
        1_000_000..1_000_000_000 => format!("{}ms", decimal(ns, 1_000_000)),
        _ => {
            let secs = format!("{}s", decimal(ns % 60_000_000_000, 1_000_000_000));
            let minutes = ns / 60_000_000_000;
            match (minutes / 60, minutes % 60) {
                (0, 0) => secs,
                (0, m) => format!("{m}m{secs}"),
                (h, m) => format!("{h}h{m}m{secs}"),
            }
        }
    }
}

/// The effective settings written back as a KubeProxyConfiguration (`config check`,
/// `--write-config-to`).
pub fn effective_yaml(s: &Settings) -> String {
    let nodeport: Vec<String> = match &s.proxy.nodeport_addresses {
        NodePortAddresses::All => vec![],
        NodePortAddresses::Primary => vec!["primary".into()],
        NodePortAddresses::Cidrs(c) => c.iter().map(ToString::to_string).collect(),
    };
    let addr = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    let v = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "mode": s.mode.as_str(),
        "hostnameOverride": s.hostname_override.clone().unwrap_or_default(),
        "bindAddress": s.node_ip.map(|i| i.to_string()).unwrap_or_else(|| "0.0.0.0".into()),
        "healthzBindAddress": addr(&s.healthz_bind_address),
        "metricsBindAddress": addr(&s.metrics_bind_address),
        "clusterCIDR": s.proxy.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "detectLocalMode": s.proxy.detect_local.mode_name(),
        "detectLocal": match &s.proxy.detect_local {
            DetectLocal::InterfaceNamePrefix(p) => json!({"interfaceNamePrefix": p}),
            DetectLocal::BridgeInterface(b) => json!({"bridgeInterface": b}),
            _ => json!({}),
        },
        "nodePortAddresses": nodeport,
        "clientConnection": {"kubeconfig": s.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default()},
        s.mode.as_str(): {
            "masqueradeAll": s.proxy.masquerade_all,
            "masqueradeBit": s.proxy.masquerade_bit,
            "syncPeriod": go_duration(s.sync_period),
            "minSyncPeriod": go_duration(s.min_sync_period),
        },
        "conntrack": s.conntrack_config,
        "featureGates": s.feature_gates,
    });
    serde_saphyr::to_string(&v).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<KubeProxyConfiguration, ConfigError> {
        parse(Path::new("config.yaml"), text)
    }

    const FULL: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.000.0/16,fd00:10:244::/56
bindAddress: 0.0.0.0
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["192.168.0.0/16"]
detectLocalMode: ClusterCIDR
clientConnection: {kubeconfig: /etc/svcproxy/kubeconfig, qps: 5}
nftables: {masqueradeAll: true, masqueradeBit: 15, syncPeriod: 30m0s, minSyncPeriod: 500ms}
iptables: {masqueradeBit: 14, syncPeriod: 30s}
ipvs: {scheduler: rr}
conntrack: {maxPerCore: 32768, min: 131072, tcpEstablishedTimeout: 24h0m0s, tcpCloseWaitTimeout: 1h0m0s}
featureGates: {NFTablesProxyMode: true, MadeUpGate: false}
"#;

    #[test]
    fn kube_proxy_configuration_is_honoured() {
        let s = resolve(&cfg(FULL).unwrap(), &FlagOverrides::default()).unwrap();
        assert_eq!(s.proxy.cluster_cidrs.len(), 2);
        assert_eq!(
            s.proxy.cluster_cidrs[0].to_string(),
            "10.244.0.0/16",
            "read sloppily"
        );
        assert!(s.proxy.masquerade_all);
        assert_eq!(s.proxy.masquerade_bit, 15);
        assert_eq!(s.sync_period, Duration::from_secs(1800));
        assert_eq!(s.min_sync_period, Duration::from_millis(500));
        assert_eq!(
            s.kubeconfig.as_deref(),
            Some(Path::new("/etc/svcproxy/kubeconfig"))
        );
        assert_eq!(
            s.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert!(
            matches!(s.proxy.nodeport_addresses, NodePortAddresses::Cidrs(ref c) if c.len() == 1)
        );
        assert_eq!(
            s.conntrack[1],
            Sysctl {
                name: "net/netfilter/nf_conntrack_tcp_timeout_established",
                value: 86400
            }
        );
        for w in [
            "ipvs",
            "iptables",
            "clientConnection.qps",
            "featureGates.MadeUpGate",
        ] {
            assert!(
                s.warnings.iter().any(|x| x.starts_with(w)),
                "no warning for {w}: {:?}",
                s.warnings
            );
        }
        assert_eq!(s.warnings.len(), 4, "{:?}", s.warnings);
    }

    #[test]
    fn flags_override_the_file() {
        let flags = FlagOverrides {
            cluster_cidr: Some("10.0.0.0/8".into()),
            masquerade_all: Some(false),
            healthz_bind_address: Some("127.0.0.1:9999".into()),
            min_sync_period: Some("0".into()),
            ..FlagOverrides::default()
        };
        let s = resolve(&cfg(FULL).unwrap(), &flags).unwrap();
        assert_eq!(
            s.proxy.cluster_cidrs,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert!(!s.proxy.masquerade_all);
        assert_eq!(
            s.healthz_bind_address,
            Some("127.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(s.min_sync_period, Duration::ZERO);
    }

    #[test]
    fn misspelled_fields_are_errors_with_their_line() {
        let e = cfg("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCidr: 10.0.0.0/8\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("unknown field `clusterCidr`") && msg.contains("line 3"),
            "{msg}"
        );
        let e = cfg("nftables:\n  masqueradeAll: true\n  syncPeriods: 1h\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`syncPeriods`") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_value() {
        let bad = |text: &str| {
            resolve(&cfg(text).unwrap(), &FlagOverrides::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad("clusterCIDR: 10.0.0.0/33\n"),
            "clusterCIDR: \"10.0.0.0/33\": not a CIDR (e.g. 10.244.0.0/16)"
        );
        assert!(
            bad("healthzBindAddress: 0.0.0.0:70000\n")
                .starts_with("healthzBindAddress: \"0.0.0.0:70000\"")
        );
        assert!(bad("nftables: {syncPeriod: -1s}\n").contains("negative"));
        assert!(bad("mode: ipvs\n").starts_with("mode: \"ipvs\""));
        let s = resolve(
            &cfg("mode: iptables\niptables: {masqueradeBit: 12, syncPeriod: 30s}\nnftables: {masqueradeBit: 3}\n").unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            (s.mode, s.proxy.masquerade_bit, s.sync_period),
            (ProxyMode::Iptables, 12, Duration::from_secs(30)),
            "iptables mode reads the iptables section"
        );
        assert!(
            s.warnings.iter().any(|w| w.starts_with("nftables")),
            "{:?}",
            s.warnings
        );
        assert!(effective_yaml(&s).contains("mode: iptables"));
        assert!(
            bad("mode: iptables\niptables: {masqueradeBit: 40}\n")
                .starts_with("iptables.masqueradeBit")
        );
        assert!(bad("nftables: {masqueradeBit: 40}\n").contains("0 to 31"));
        assert!(bad("conntrack: {min: -1}\n").contains("negative"));
        let e = cfg("kind: KubeletConfiguration\n").unwrap_err().to_string();
        assert!(e.contains("expected KubeProxyConfiguration"), "{e}");
    }

    #[test]
    fn zero_and_null_mean_kube_proxys_default() {
        let s = resolve(
            &cfg("nftables: {syncPeriod: 0s, minSyncPeriod: 0s, masqueradeBit: null}\nhealthzBindAddress: \"\"\nmetricsBindAddress: \"\"\nconntrack: {maxPerCore: null, tcpEstablishedTimeout: 0s, udpTimeout: 0s}\n").unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(s.sync_period, DEFAULT_SYNC_PERIOD);
        assert_eq!(s.min_sync_period, Duration::from_secs(1));
        assert_eq!(s.proxy.masquerade_bit, 14);
        assert_eq!(
            s.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            s.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        let names: Vec<&str> = s.conntrack.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "net/netfilter/nf_conntrack_max",
                "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            ],
            "null: kube-proxy's default; zero: the kernel's value stays"
        );
        assert_eq!(s.conntrack[1].value, 3600);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        // maxPerCore 0 leaves the table size alone; IPv6 bindAddress moves the defaults.
        let s = resolve(
            &cfg("bindAddress: \"::\"\nconntrack: {maxPerCore: 0, min: 5}\n").unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert!(
            !s.conntrack
                .iter()
                .any(|c| c.name.ends_with("conntrack_max"))
        );
        assert_eq!(s.healthz_bind_address, Some("[::]:10256".parse().unwrap()));
        assert_eq!(s.metrics_bind_address, Some("[::1]:10249".parse().unwrap()));
        // A flag means what it says: 0 is "at once" for minSyncPeriod, and refused for syncPeriod.
        let flags = FlagOverrides {
            sync_period: Some("0s".into()),
            ..FlagOverrides::default()
        };
        let e = resolve(&cfg("{}").unwrap(), &flags)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--sync-period: \"0s\": must be greater than zero");
    }

    #[test]
    fn unused_fields_warn_only_when_set() {
        let quiet = "ipvs: {scheduler: \"\", syncPeriod: 0s, excludeCIDRs: null, strictARP: false}\niptables: {masqueradeBit: null, syncPeriod: 0s, localhostNodePorts: null, snatNodeInternalIP: null}\nwinkernel: {enableDSR: false, networkName: \"\"}\nlogging: {flushFrequency: 0, verbosity: 0, options: {json: {infoBufferSize: \"0\"}}}\ndetectLocal: {bridgeInterface: \"\"}\nenableProfiling: false\nbindAddressHardFail: false\noomScoreAdj: null\nconfigSyncPeriod: 0s\nportRange: \"\"\nshowHiddenMetricsForVersion: \"\"\nclientConnection: {qps: 0, burst: 0, contentType: \"\", acceptContentTypes: \"\"}\n";
        let s = resolve(&cfg(quiet).unwrap(), &FlagOverrides::default()).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let loud = "ipvs: {strictARP: true}\nlogging: {verbosity: 4}\nenableProfiling: true\noomScoreAdj: -999\nconfigSyncPeriod: 15m\nclientConnection: {burst: 10}\niptables: {syncPeriod: 30s}\nwindowsRunAsService: true\n";
        let s = resolve(&cfg(loud).unwrap(), &FlagOverrides::default()).unwrap();
        let fields: Vec<&str> = s
            .warnings
            .iter()
            .map(|w| w.split(':').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "ipvs",
                "windowsRunAsService",
                "logging",
                "enableProfiling",
                "oomScoreAdj",
                "configSyncPeriod",
                "clientConnection.burst",
                "iptables"
            ]
        );
    }

    #[test]
    fn durations_that_cannot_be_represented_are_errors() {
        let e = resolve(
            &cfg("nftables: {syncPeriod: 9999999999999999h}\n").unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("nftables.syncPeriod: \"9999999999999999h\"") && e.contains("too long"),
            "{e}"
        );
        let e = resolve(
            &cfg("conntrack: {udpTimeout: 99999999999999999999s}\n").unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("conntrack.udpTimeout"), "{e}");
        // The longest one is fine, and nothing downstream overflows on it.
        let s = resolve(
            &cfg("nftables: {syncPeriod: 2562047h47m16.854775807s, minSyncPeriod: 2562047h}\nconntrack: {maxPerCore: 2147483647, min: 2147483647}\n").unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(s.sync_period, crate::duration::MAX_DURATION);
        assert!(effective_yaml(&s).contains("syncPeriod: 2562047h47m16.854775807s"));
    }

    #[test]
    fn durations_print_as_go_does() {
        for (secs, text) in [
            (3600.0, "1h0m0s"),
            (1.0, "1s"),
            (0.5, "500ms"),
            (90.0, "1m30s"),
            (1.5, "1.5s"),
            (0.0, "0s"),
            (0.0015, "1.5ms"),
            (0.000002, "2µs"),
            (7200.25, "2h0m0.25s"),
        ] {
            assert_eq!(go_duration(Duration::from_secs_f64(secs)), text);
        }
    }

    #[test]
    fn effective_configuration_reads_back() {
        let s = resolve(&cfg(FULL).unwrap(), &FlagOverrides::default()).unwrap();
        let yaml = effective_yaml(&s);
        let again = resolve(&cfg(&yaml).unwrap(), &FlagOverrides::default()).unwrap();
        assert_eq!(again.proxy, s.proxy);
        assert_eq!(again.sync_period, s.sync_period);
        assert_eq!(again.min_sync_period, s.min_sync_period);
    }

    #[test]
    fn detect_local_modes() {
        let resolved = |text: &str| resolve(&cfg(text).unwrap(), &FlagOverrides::default());
        let mode = |text: &str| resolved(text).unwrap().proxy.detect_local;
        assert_eq!(mode(""), DetectLocal::ClusterCidr);
        assert_eq!(mode("detectLocalMode: \"\"\n"), DetectLocal::ClusterCidr);
        assert_eq!(mode("detectLocalMode: NodeCIDR\n"), DetectLocal::NodeCidr);
        assert_eq!(
            mode(
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth}\n"
            ),
            DetectLocal::InterfaceNamePrefix("veth".into())
        );
        assert_eq!(
            mode("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cbr0}\n"),
            DetectLocal::BridgeInterface("cbr0".into())
        );
        // kubeadm writes both names empty: no warning.
        let s = resolved(
            "detectLocalMode: ClusterCIDR\ndetectLocal: {bridgeInterface: \"\", interfaceNamePrefix: \"\"}\n",
        )
        .unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        // A name for another mode is not used: said so.
        let s = resolved("detectLocal: {interfaceNamePrefix: veth}\n").unwrap();
        assert_eq!(s.proxy.detect_local, DetectLocal::ClusterCidr);
        assert!(
            s.warnings
                .iter()
                .any(|w| w.starts_with("detectLocal.interfaceNamePrefix")),
            "{:?}",
            s.warnings
        );
        // Flags win over the file.
        let flags = FlagOverrides {
            detect_local_mode: Some("BridgeInterface".into()),
            pod_bridge_interface: Some("br0".into()),
            ..FlagOverrides::default()
        };
        let s = resolve(&cfg("detectLocalMode: NodeCIDR\n").unwrap(), &flags).unwrap();
        assert_eq!(
            s.proxy.detect_local,
            DetectLocal::BridgeInterface("br0".into())
        );
        // Refused: an unknown mode, a mode without its name, a name no interface can have.
        for (text, needle) in [
            ("detectLocalMode: PodCIDR\n", "expected one of"),
            ("detectLocalMode: InterfaceNamePrefix\n", "must be set"),
            (
                "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: \"\"}\n",
                "must be set",
            ),
            (
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: \"ve th\"}\n",
                "cannot be part",
            ),
            (
                "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: averyverylongbridge}\n",
                "15 bytes",
            ),
        ] {
            let e = resolved(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        // The effective configuration keeps the mode and its name.
        let s = resolved(
            "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}\n",
        )
        .unwrap();
        let again = resolve(
            &cfg(&effective_yaml(&s)).unwrap(),
            &FlagOverrides::default(),
        )
        .unwrap();
        assert_eq!(again.proxy.detect_local, s.proxy.detect_local);
    }

    #[test]
    fn prefer_same_traffic_distribution_is_locked_on() {
        let resolved = |text: &str| resolve(&cfg(text).unwrap(), &FlagOverrides::default());
        let s = resolved("featureGates: {PreferSameTrafficDistribution: true}\n").unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let e = resolved("featureGates: {PreferSameTrafficDistribution: false}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be turned off"), "{e}");
    }
}
