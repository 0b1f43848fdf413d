//! Prometheus metrics, on kube-proxy's names where they apply, so that existing dashboards and
//! alerts keep working.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::watch::Changes;

/// Every metric the agent updates.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub full_sync_duration: Histogram,
    pub partial_sync_duration: Histogram,
    /// kube-proxy's network programming latency, by `ip_family`: from an EndpointSlice's
    /// trigger time to its rules in the kernel.
    network_programming: HistogramFamily,
    /// svcproxy's own figure: from a change reaching the agent to its rules in the kernel.
    pub change_to_kernel: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub sync_failures: Counter,
    pub conntrack_failures: Counter,
    pub invalid_objects: Family<Vec<(String, String)>, Gauge>,
    /// Elements (an address, a port, an endpoint) left out of objects that are otherwise used.
    pub skipped_fields: Family<Vec<(String, String)>, Gauge>,
}

/// Histograms by label, each made with kube-proxy's buckets for its metric.
type HistogramFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// kube-proxy's buckets for the network programming latency (pkg/proxy/metrics): 0.25 s and
/// 0.5 s, then every second to 59 s, every 5 s to 115 s, every 30 s to 300 s.
fn network_programming_histogram() -> Histogram {
    let buckets = [0.25, 0.5]
        .into_iter()
        .chain((1..=59).map(f64::from))
        .chain((0..12).map(|i| f64::from(60 + 5 * i)))
        .chain((0..7).map(|i| f64::from(120 + 30 * i)));
    Histogram::new(buckets)
}

fn seconds_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    /// `iptables`: the iptables mode (its failure counter has kube-proxy's iptables name).
    pub fn new(changes: &Changes, iptables: bool) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            sync_duration: seconds_histogram(),
            full_sync_duration: seconds_histogram(),
            partial_sync_duration: seconds_histogram(),
            network_programming: Family::new_with_constructor(network_programming_histogram),
            change_to_kernel: seconds_histogram(),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            sync_failures: Counter::default(),
            conntrack_failures: Counter::default(),
            invalid_objects: Family::default(),
            skipped_fields: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds (full and partial)",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From the time of the change behind an EndpointSlice update (its endpoints.kubernetes.io/last-change-trigger-time) to its rules in the kernel",
            m.network_programming.clone(),
        );
        registry.register(
            "svcproxy_change_to_kernel_duration_seconds",
            "From a change arriving from the apiserver to the rules for it in the kernel",
            m.change_to_kernel.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of rules was queued",
            m.last_queued_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative Service changes",
            changes.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative EndpointSlice changes",
            changes.endpoint_changes.clone(),
        );
        if iptables {
            registry.register(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                "iptables-restore runs that failed",
                m.sync_failures.clone(),
            );
        } else {
            registry.register(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "nftables transactions the kernel refused (or nft could not be run)",
                m.sync_failures.clone(),
            );
        }
        registry.register(
            "svcproxy_conntrack_cleanup_failures",
            "Failed deletions of stale UDP conntrack entries",
            m.conntrack_failures.clone(),
        );
        registry.register(
            "svcproxy_watch_errors",
            "Errors from the apiserver watches (each is retried with backoff)",
            changes.watch_errors.clone(),
        );
        registry.register(
            "svcproxy_node_changes",
            "Changes to this node's Node object",
            changes.node_changes.clone(),
        );
        registry.register(
            "svcproxy_invalid_objects",
            "Objects skipped in the last sync because they are invalid, by kind",
            m.invalid_objects.clone(),
        );
        registry.register(
            "svcproxy_skipped_fields",
            "Fields (an address, a port, an endpoint) left out of objects that are otherwise used, in the last sync, by kind",
            m.skipped_fields.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The network programming latency histogram of one address family.
    pub fn network_programming(&self, family: crate::model::IpFamily) -> Histogram {
        let family = match family {
            crate::model::IpFamily::V4 => "IPv4",
            crate::model::IpFamily::V6 => "IPv6",
        };
        self.network_programming
            .get_or_create(&vec![("ip_family".to_string(), family.to_string())])
            .clone()
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
