//! The agent under test: Kubernetes objects as the in-process apiserver serves them, and the
//! agent run on the current runtime with its sync records, for tests/agent.rs (against a network
//! namespace's kernel) and tests/fake_kernel.rs (against the in-memory one).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use svcproxy::agent::{AgentConfig, SyncRecord};
use svcproxy::backend::Mode;
use tokio::sync::{mpsc, watch};

use super::apiserver::FakeApiServer;

pub fn service(name: &str, ip: &str, extra: Value) -> Value {
    let mut spec = json!({"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]});
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

pub fn slice(name: &str, service: &str, ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-a"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    })
}

pub fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}})
}

/// The agent's configuration for tests: node-a, syncs at once, no HTTP servers, its backend
/// `backend`.
pub fn config(api: &FakeApiServer, backend: Mode) -> AgentConfig {
    AgentConfig {
        kube: api.kube_config(),
        node_name: "node-a".into(),
        node_ips: vec![],
        proxy: Default::default(),
        min_sync_period: Duration::ZERO,
        sync_period: Duration::from_secs(3600),
        healthz_address: None,
        metrics_address: None,
        health_check_address: "127.0.0.1".parse().unwrap(),
        backend,
        config_warnings: 0,
    }
}

/// A running agent: its sync records, and how to stop it.
pub struct Agent {
    pub syncs: mpsc::UnboundedReceiver<SyncRecord>,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Runs the agent with `config` on the current runtime.
    pub fn spawn(config: AgentConfig) -> Agent {
        let (tx, syncs) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            svcproxy::agent::run(config, stop_rx, Some(tx))
                .await
                .unwrap();
        });
        Agent { syncs, stop, task }
    }

    /// The next sync, within `limit`.
    pub async fn next_sync(&mut self, limit: Duration) -> Option<SyncRecord> {
        tokio::time::timeout(limit, self.syncs.recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Forgets the sync records so far.
    pub fn drain(&mut self) {
        while self.syncs.try_recv().is_ok() {}
    }
}

/// Waits until `f` holds, polling, for at most `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}
