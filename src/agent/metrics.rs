//! Prometheus metrics, on kube-proxy's names, labels and buckets where they apply, so that
//! existing dashboards and alerts keep working.
//!
//! kube-proxy (1.33 and later) labels the metrics of its per-family proxiers with `ip_family`
//! (`IPv4`, `IPv6`). svcproxy programs both families in one sync, so a sync is recorded under
//! both labels (each family's rules took that long to program, and both failed together).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::watch::Changes;
use crate::model::IpFamily;
use crate::plan::{DestinationKind, Plan, Route};
use crate::report::SyncKind;

/// Label sets, as `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Kubernetes' name of a family (`v1.IPFamily`), the value of the `ip_family` labels.
pub fn family_label(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

fn family_labels(family: IpFamily) -> Labels {
    vec![("ip_family".to_string(), family_label(family).to_string())]
}

/// Every metric the agent updates.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: HistogramFamily,
    pub full_sync_duration: HistogramFamily,
    pub partial_sync_duration: HistogramFamily,
    pub network_programming: HistogramFamily,
    pub last_sync_timestamp: Family<Labels, Gauge<f64, AtomicU64>>,
    pub last_queued_timestamp: Family<Labels, Gauge<f64, AtomicU64>>,
    pub sync_failures: Family<Labels, Counter>,
    /// Failed syncs by reason (`BackendError::metric_label`): kube-proxy's failure counters
    /// keep their own labels (`ip_family` only), so the reason gets a counter of its own.
    pub sync_failure_reasons: Family<Vec<(String, String)>, Counter>,
    pub no_local_endpoints: Family<Labels, Gauge>,
    pub healthz: Family<Labels, Counter>,
    pub livez: Family<Labels, Counter>,
    /// svcproxy's own figure: from a change reaching the agent to its rules in the kernel.
    pub change_to_kernel: Histogram,
    pub conntrack_failures: Counter,
    /// The configuration's warnings at start-up (see `AgentConfig::config_warnings`).
    pub config_warnings: Gauge,
    pub invalid_objects: Family<Labels, Gauge>,
    /// Elements (an address, a port, an endpoint) left out of objects that are otherwise used.
    pub skipped_fields: Family<Labels, Gauge>,
    // Pending changes (h1-sync): Services and EndpointSlices changed and not yet synced.
    pub service_changes_pending: Gauge,
    pub endpoint_changes_pending: Gauge,
    /// Syncs that compiled every Service because the change could not be compiled Service by
    /// Service, by reason (`incremental::Fallback::reason`).
    pub incremental_fallbacks: Family<Vec<(String, String)>, Counter>,
    /// Differences between the kernel's tables and the last plan, found just before each
    /// periodic full resync rewrites them (`svcproxy verify`'s comparison); -1: the tables
    /// could not be read.
    pub ruleset_drift: Gauge,
}

/// kube-proxy's sync-duration buckets: `ExponentialBuckets(0.001, 2, 15)`, 1 ms to ~16 s.
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network-programming buckets: its `merge()` starts from a 0 bucket, then
/// 0.25 s, 0.5 s, 1 s to 59 s by 1 s, 60 s to 115 s by 5 s, 120 s to 300 s by 30 s.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn network_programming_histogram() -> Histogram {
    Histogram::new(network_programming_buckets())
}

/// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`, recounted at each sync: per family,
/// the Service ports that have endpoints but none on this node, under a Local internal
/// (`internal`: their ClusterIP traffic is dropped) or external (`external`: their external
/// traffic from outside the cluster is dropped) traffic policy. A Service port without any
/// endpoint is not counted: it rejects everything, whatever its policy.
pub fn no_local_endpoints(plan: &Plan) -> BTreeMap<(IpFamily, &'static str), i64> {
    let mut out = BTreeMap::new();
    for f in &plan.families {
        let mut internal = std::collections::BTreeSet::new();
        let mut external = std::collections::BTreeSet::new();
        for d in &f.destinations {
            let port = (&d.service, &d.port_name, d.protocol);
            match (&d.route, d.kind) {
                (Route::Drop, DestinationKind::ClusterIp) => {
                    internal.insert(port);
                }
                (Route::ExternalLocal { local: None, .. }, _) => {
                    external.insert(port);
                }
                _ => {}
            }
        }
        out.insert((f.family, "internal"), internal.len() as i64);
        out.insert((f.family, "external"), external.len() as i64);
    }
    out
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// `iptables`: the iptables mode (its failure counter has kube-proxy's iptables name).
    pub fn new(changes: &Changes, iptables: bool) -> Metrics {
        let mut registry = Registry::default();
        let histograms = || -> HistogramFamily { Family::new_with_constructor(sync_histogram) };
        let m = Metrics {
            sync_duration: histograms(),
            full_sync_duration: histograms(),
            partial_sync_duration: histograms(),
            network_programming: Family::new_with_constructor(network_programming_histogram),
            last_sync_timestamp: Family::default(),
            last_queued_timestamp: Family::default(),
            sync_failures: Family::default(),
            sync_failure_reasons: Family::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            change_to_kernel: sync_histogram(),
            conntrack_failures: Counter::default(),
            config_warnings: Gauge::default(),
            invalid_objects: Family::default(),
            skipped_fields: Family::default(),
            service_changes_pending: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            incremental_fallbacks: Family::default(),
            ruleset_drift: Gauge::default(),
            registry: Registry::default(),
        };
        // Both families from the start, so that a dashboard sees 0 rather than nothing.
        for family in IpFamily::ALL {
            let _ = m.sync_failures.get_or_create(&family_labels(family));
            for policy in ["internal", "external"] {
                let _ = m
                    .no_local_endpoints
                    .get_or_create(&no_local_labels(family, policy));
            }
        }
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
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
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
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes: Services changed and not yet synced",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes: EndpointSlices changed and not yet synced",
            m.endpoint_changes_pending.clone(),
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
            "svcproxy_sync_failures",
            "Failed syncs, by reason: spawn (the program could not be run), refused (it refused the transaction), command_failed, not_installed",
            m.sync_failure_reasons.clone(),
        );
        registry.register(
            "svcproxy_conntrack_cleanup_failures",
            "Failed deletions of stale UDP conntrack entries",
            m.conntrack_failures.clone(),
        );
        registry.register(
            "svcproxy_config_warnings",
            "Warnings the configuration gave at start-up: fields set that svcproxy does not use, or reads differently",
            m.config_warnings.clone(),
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
        // The incremental backends' fallbacks to a whole compile.
        registry.register(
            "svcproxy_incremental_fallbacks",
            "Syncs that compiled every Service instead of only the changed ones, by reason",
            m.incremental_fallbacks.clone(),
        );
        registry.register(
            "svcproxy_ruleset_drift",
            "Differences between the kernel's rules and the plan found before the last periodic full resync (0: none, -1: could not be read)",
            m.ruleset_drift.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A change was queued for a sync at `at` (both families).
    pub fn queued(&self, at: SystemTime) {
        for family in IpFamily::ALL {
            self.last_queued_timestamp
                .get_or_create(&family_labels(family))
                .set(unix_seconds(at));
        }
    }

    /// A sync of `kind` succeeded at `at` after `elapsed`, leaving `plan` in the kernel.
    pub fn synced(&self, kind: SyncKind, elapsed: Duration, at: SystemTime, plan: &Plan) {
        let secs = elapsed.as_secs_f64();
        for family in IpFamily::ALL {
            let l = family_labels(family);
            self.sync_duration.get_or_create(&l).observe(secs);
            match kind {
                SyncKind::Full => self.full_sync_duration.get_or_create(&l).observe(secs),
                SyncKind::Partial => self.partial_sync_duration.get_or_create(&l).observe(secs),
            }
            self.last_sync_timestamp
                .get_or_create(&l)
                .set(unix_seconds(at));
        }
        for ((family, policy), n) in no_local_endpoints(plan) {
            self.no_local_endpoints
                .get_or_create(&no_local_labels(family, policy))
                .set(n);
        }
    }

    /// A sync failed (one transaction for both families: both failed), for `reason`
    /// (`BackendError::metric_label`).
    pub fn sync_failed(&self, reason: &str) {
        for family in IpFamily::ALL {
            self.sync_failures
                .get_or_create(&family_labels(family))
                .inc();
        }
        self.sync_failure_reasons
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// A change's rules reached the kernel `latency` after the change, in `family`.
    pub fn network_programmed(&self, family: IpFamily, latency: Duration) {
        self.network_programming
            .get_or_create(&family_labels(family))
            .observe(latency.as_secs_f64());
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

fn no_local_labels(family: IpFamily, policy: &str) -> Labels {
    vec![
        ("ip_family".to_string(), family_label(family).to_string()),
        ("traffic_policy".to_string(), policy.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Converted;
    use crate::model::{NodeInfo, ProxyConfig, Snapshot};
    use serde_json::{Value, json};

    fn plan_of(objects: &[Value]) -> Plan {
        let mut c = Converted::default();
        for o in objects {
            let skipped = match o["kind"].as_str() {
                Some("Service") => c.add_service(&serde_json::from_value(o.clone()).unwrap()),
                _ => c.add_slice(&serde_json::from_value(o.clone()).unwrap()),
            };
            assert!(skipped.is_empty(), "{skipped:?}");
        }
        let snapshot = Snapshot {
            services: c.services,
            slices: c.slices,
            node: NodeInfo {
                name: "node-a".into(),
                ..NodeInfo::default()
            },
            service_cidrs: Vec::new(),
        };
        crate::plan::plan(&snapshot, &ProxyConfig::default())
    }

    fn service(name: &str, spec: Value) -> Value {
        let mut s = json!({"clusterIP": "10.96.0.1", "ports": [
            {"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 30081}]});
        s.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": s})
    }

    fn slice(service: &str, node: &str, ready: bool) -> Value {
        json!({"kind": "EndpointSlice", "metadata": {"name": format!("{service}-1"), "namespace": "ns",
                   "labels": {"kubernetes.io/service-name": service}},
               "addressType": "IPv4", "ports": [{"name": "a", "port": 8080}, {"name": "b", "port": 8081}],
               "endpoints": [{"addresses": ["10.244.0.1"], "nodeName": node,
                              "conditions": {"ready": ready, "serving": true, "terminating": !ready}}]})
    }

    #[test]
    fn no_local_endpoints_counts_service_ports_as_kube_proxy() {
        let counts = no_local_endpoints(&plan_of(&[
            // iTP Local, endpoints only elsewhere: both ports counted as internal.
            service(
                "itp",
                json!({"clusterIP": "10.96.0.1", "internalTrafficPolicy": "Local"}),
            ),
            slice("itp", "node-b", true),
            // eTP Local NodePort, endpoints only elsewhere: external (once per port, not per
            // address).
            service(
                "etp",
                json!({"clusterIP": "10.96.0.2", "type": "NodePort", "externalTrafficPolicy": "Local",
                "externalIPs": ["192.0.2.1"], "ports": [{"name": "a", "port": 80, "nodePort": 30090}]}),
            ),
            slice("etp", "node-b", true),
            // Local, but a serving-terminating local endpoint still serves: not counted.
            service(
                "term",
                json!({"clusterIP": "10.96.0.3", "internalTrafficPolicy": "Local"}),
            ),
            slice("term", "node-a", false),
            // No endpoint at all: rejected, not counted.
            service(
                "none",
                json!({"clusterIP": "10.96.0.4", "internalTrafficPolicy": "Local"}),
            ),
        ]));
        assert_eq!(counts[&(IpFamily::V4, "internal")], 2);
        assert_eq!(counts[&(IpFamily::V4, "external")], 1);
        assert_eq!(counts[&(IpFamily::V6, "internal")], 0);
        assert_eq!(counts[&(IpFamily::V6, "external")], 0);
    }

    #[test]
    fn buckets_are_kube_proxys() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 81);
        assert_eq!(&b[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(b[62], 60.0);
        assert_eq!(b[73], 115.0);
        assert_eq!(b[74], 120.0);
        assert_eq!(b[80], 300.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn metrics_carry_ip_family_where_kube_proxy_does() {
        let m = Metrics::new(&Changes::default(), false);
        let plan = plan_of(&[
            service("itp", json!({"internalTrafficPolicy": "Local"})),
            slice("itp", "node-b", true),
        ]);
        m.queued(SystemTime::UNIX_EPOCH + Duration::from_secs(100));
        m.synced(
            SyncKind::Full,
            Duration::from_millis(3),
            SystemTime::UNIX_EPOCH + Duration::from_secs(101),
            &plan,
        );
        m.sync_failed("refused");
        m.network_programmed(IpFamily::V6, Duration::from_millis(300));
        let _ = m
            .healthz
            .get_or_create(&vec![("code".into(), "503".into())]);
        let text = m.encode();
        for line in [
            r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.004",ip_family="IPv6"} 1"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="16.384",ip_family="IPv4"} 1"#,
            r#"kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1"#,
            r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 101.0"#,
            r#"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv6"} 100.0"#,
            r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 1"#,
            r#"svcproxy_sync_failures_total{reason="refused"} 1"#,
            r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="internal"} 2"#,
            r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv6",traffic_policy="external"} 0"#,
            r#"kubeproxy_network_programming_duration_seconds_bucket{le="0.5",ip_family="IPv6"} 1"#,
            r#"kubeproxy_proxy_healthz_total{code="503"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains(r#"le="32.768""#),
            "15 buckets, as kube-proxy"
        );
    }
}
